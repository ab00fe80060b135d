"""Writes a small synthetic COCO-format dataset of 4 shape classes (the demo/test data).

Layout and conventions follow COCO 2017 exactly, so the same builder reads it:
`out/annotations/instances_{train,val}2017.json`, `out/{train,val}2017/<id:012d>.jpg`.
What it exercises on purpose: non-contiguous category ids (1, 3, 7, 9 -> labels 0..3),
tiny to large objects, occlusion (later shapes cover earlier ones; annotations describe the
visible part, so occluded shapes can become multi-part polygons), rings with holes stored
as compressed RLE, crowd regions stored as uncompressed RLE with iscrowd=1 (as COCO does),
images without annotations, and landscape/portrait images of 96-256 px. That is the
`hard` preset (the default; the tests' data).

The `easy` preset is what `make demo` trains on, chosen so that a small SOLOv2 trained
from scratch on 2 CPU cores learns it in minutes: 128 x 128 images on a plain background,
1-3 well-separated, unoccluded shapes of 24-64 px per image, each class with its own
shape *and* hue (jittered), no crowds and no empty images.

Deterministic: image i of a split is drawn from its own generator seeded by
(seed, split, i), so the same seed gives the same bytes whatever the split sizes.

    python -m solov2_jax.data.make_demo --out /tmp/demo_coco [--seed 0 --num_train 48
        --preset easy]
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from solov2_jax.checkpoint import atomic_write

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
]
_SPLITS = (("train2017", 0, 1), ("val2017", 1, 500_001))  # (dir, rng stream, first id)
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 92]
_MIN_VISIBLE = 6  # pixels; fully (or almost) occluded shapes are not annotated


def _background(rng, h, w) -> np.ndarray:
    """Smooth two-colour gradient plus mild noise (so JPEG has something to encode)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1.0) / 2.0
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng, cat_id: int, h: int, w: int) -> np.ndarray:
    """Filled mask of one shape; sizes log-uniform from tiny (~4 px) to ~85% of the image."""
    size = float(np.exp(rng.uniform(np.log(4.0), np.log(0.85 * min(h, w)))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    mask = np.zeros((h, w), np.uint8)
    if cat_id == 1:
        cv2.circle(mask, (round(cx), round(cy)), max(2, round(size / 2)), 1, -1)
    elif cat_id == 3:
        rect = ((cx, cy), (size, size * rng.uniform(0.3, 1.0)), rng.uniform(0, 180))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    elif cat_id == 7:
        ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-.3, .3, 3)
        pts = np.stack([cx + size / 2 * np.cos(ang), cy + size / 2 * np.sin(ang)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:  # ring: the hole is why it is stored as RLE
        r = max(3, round(size / 2))
        cv2.circle(mask, (round(cx), round(cy)), r, 1, -1)
        cv2.circle(mask, (round(cx), round(cy)), max(1, round(r * rng.uniform(.4, .7))), 0, -1)
    return mask


def _crowd_mask(rng, h: int, w: int) -> np.ndarray:
    """A cluster of many small circles: one iscrowd=1 region, like COCO's crowds."""
    mask = np.zeros((h, w), np.uint8)
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    spread = 0.15 * min(h, w)
    for _ in range(int(rng.integers(8, 20))):
        x, y = rng.normal(cx, spread), rng.normal(cy, spread)
        cv2.circle(mask, (round(x), round(y)), int(rng.integers(2, 5)), 1, -1)
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _compressed_rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE (pycocotools), counts as a JSON string: how rings are stored."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours as COCO polygons (several parts when occlusion split the shape)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def _annotation(segm, height, width, cat_id, crowd):
    """COCO fields derived from the stored segmentation itself (bbox, area)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    area = float(mask_utils.area(rle))
    if area <= 0 or bbox[2] < 1 or bbox[3] < 1:
        return None
    return {"segmentation": segm, "area": area, "iscrowd": int(crowd),
            "bbox": bbox, "category_id": cat_id}


def _draw_image(rng, index: int):
    """(BGR image, annotations without ids) of one demo image."""
    short, long = int(rng.integers(96, 192)), int(rng.integers(160, 257))
    h, w = (short, long) if rng.random() < 0.6 else (long, short)
    image = _background(rng, h, w)
    if index % 8 == 5:  # a deterministic share of images without any annotation
        return image, []
    n = int(rng.integers(1, 6))
    # Object 0 cycles through the classes so every class appears in a few images.
    cats = [CATEGORIES[(index + j) % 4]["id"] if j == 0 else
            CATEGORIES[int(rng.integers(0, 4))]["id"] for j in range(n)]
    shapes = [(c, _shape_mask(rng, c, h, w), False) for c in cats]
    if index % 5 == 2:
        shapes.insert(0, (CATEGORIES[int(rng.integers(0, 4))]["id"], _crowd_mask(rng, h, w),
                          True))
    if index % 4 == 1:  # a thin bar on top splits what it crosses: multi-part polygons
        bar = np.zeros((h, w), np.uint8)
        rect = ((w / 2, h / 2), (1.2 * max(h, w), float(rng.integers(3, 7))),
                rng.uniform(0, 180))
        cv2.fillPoly(bar, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
        shapes.append((3, bar, False))
    covered = np.zeros((h, w), np.uint8)
    anns = []
    for cat_id, mask, crowd in reversed(shapes):  # topmost first: visible = not covered
        visible = mask & (1 - covered)
        color = rng.uniform(0, 255, 3)
        image[mask.astype(bool) & ~covered.astype(bool)] = color.astype(np.uint8)
        covered |= mask
        if visible.sum() < _MIN_VISIBLE:
            continue
        if crowd:
            segm = _uncompressed_rle(visible)
        elif cat_id == 9:
            segm = _compressed_rle(visible)
        else:
            segm = _polygons(visible)
            if not segm:
                continue
        ann = _annotation(segm, h, w, cat_id, crowd)
        if ann is not None:
            anns.append(ann)
    return image, anns[::-1]


# Easy preset: one hue per class (RGB; jittered per shape) and the image side.
_EASY_COLORS = {1: (220, 60, 50), 3: (60, 180, 70), 7: (50, 90, 220), 9: (230, 200, 40)}
_EASY_SIDE = 128
PRESETS = ("hard", "easy")


def _easy_shape(cat_id: int, cx: float, cy: float, size: float, rng, h: int, w: int):
    """Filled mask of one easy-preset shape of diameter `size` centred at (cx, cy)."""
    mask = np.zeros((h, w), np.uint8)
    c = (round(cx), round(cy))
    if cat_id == 1:
        cv2.circle(mask, c, round(size / 2), 1, -1)
    elif cat_id == 3:  # a rectangle inscribed in the disc, any rotation
        aspect = rng.uniform(0.5, 1.0)
        side = size / np.sqrt(1 + aspect ** 2)
        rect = ((cx, cy), (side, side * aspect), rng.uniform(0, 180))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    elif cat_id == 7:  # a roughly equilateral triangle inscribed in the disc
        ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2.094, 4.189]) + rng.uniform(-.15, .15, 3)
        pts = np.stack([cx + size / 2 * np.cos(ang), cy + size / 2 * np.sin(ang)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:  # ring with a clear hole
        r = round(size / 2)
        cv2.circle(mask, c, r, 1, -1)
        cv2.circle(mask, c, round(r * rng.uniform(0.45, 0.6)), 0, -1)
    return mask


def _draw_easy_image(rng, index: int):
    """(BGR image, annotations without ids) of one easy-preset image."""
    h = w = _EASY_SIDE
    image = np.empty((h, w, 3), np.float32)
    image[:] = rng.uniform(100, 160, 3)  # plain grey-ish background (RGB)
    image += rng.normal(0, 3, (h, w, 3))
    n = int(rng.integers(1, 4))
    placed: list[tuple[float, float, float]] = []  # (cx, cy, radius)
    anns = []
    for j in range(n):
        cat_id = CATEGORIES[(index + j) % 4 if j == 0 else int(rng.integers(0, 4))]["id"]
        for _ in range(50):  # rejection sampling: inside the image, 6 px from the others
            size = float(rng.uniform(24, 64))
            r = size / 2
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(np.hypot(cx - x, cy - y) >= r + q + 6 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        mask = _easy_shape(cat_id, cx, cy, size, rng, h, w)
        color = np.clip(np.asarray(_EASY_COLORS[cat_id]) + rng.uniform(-25, 25, 3), 0, 255)
        image[mask.astype(bool)] = color
        if cat_id == 9:
            segm = _compressed_rle(mask)
        else:
            segm = _polygons(mask)
        ann = _annotation(segm, h, w, cat_id, False)
        if ann is not None:
            anns.append(ann)
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1]), anns


def make_demo(out_dir: str, *, seed: int = 0, num_train: int = 48, num_val: int = 16,
              preset: str = "hard") -> dict:
    """Writes the demo dataset under `out_dir`; returns counts per split.

    preset: 'hard' (the default, every hard case) or 'easy' (what `make demo` learns).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown make_demo preset {preset!r} (one of {', '.join(PRESETS)})")
    draw = _draw_image if preset == "hard" else _draw_easy_image
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    summary = {"out_dir": os.path.abspath(out_dir), "splits": {}}
    ann_id = 1
    for (split, stream, first_id), count in zip(_SPLITS, (num_train, num_val), strict=True):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        images, anns = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, stream, i])
            image, img_anns = draw(rng, i)
            image_id = first_id + i
            name = f"{image_id:012d}.jpg"
            ok, buf = cv2.imencode(".jpg", image, _JPEG_PARAMS)
            assert ok, "JPEG encoding failed"
            atomic_write(os.path.join(out_dir, split, name), buf.tobytes())
            images.append({"id": image_id, "file_name": name,
                           "height": image.shape[0], "width": image.shape[1]})
            for a in img_anns:
                anns.append({"id": ann_id, "image_id": image_id, **a})
                ann_id += 1
        data = {"info": {"description": "solov2-jax synthetic shapes demo", "version": "1.0",
                         "seed": seed, "preset": preset},
                "licenses": [], "images": images, "annotations": anns,
                "categories": CATEGORIES}
        # Atomic, and after the split's images: a kill never leaves a truncated JSON, and
        # a JSON that exists describes images that do (val2017 is written last).
        atomic_write(os.path.join(out_dir, "annotations", f"instances_{split}.json"),
                     json.dumps(data))
        with_anns = {a["image_id"] for a in anns}
        summary["splits"][split] = {
            "images": len(images), "annotations": len(anns),
            "crowd": sum(a["iscrowd"] for a in anns),
            "images_without_annotations": len(images) - len(with_anns)}
    return summary


def _define_flags(fv, argv):
    from absl import flags

    flags.DEFINE_string("out", None, "output COCO-format directory", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "image i of a split is drawn from (seed, split, i)",
                         flag_values=fv)
    flags.DEFINE_integer("num_train", 48, "train2017 images", flag_values=fv)
    flags.DEFINE_integer("num_val", 16, "val2017 images", flag_values=fv)
    flags.DEFINE_enum("preset", "hard", PRESETS, "hard: every hard case (tests); easy: "
                      "large, separate shapes on plain backgrounds (make demo)", flag_values=fv)


def _execute(fv, inputs) -> int:
    from solov2_jax.cli import UserError

    if not fv.out:
        raise UserError("--out DIR is required")
    if inputs:
        raise UserError(f"unexpected arguments: {' '.join(inputs)}")
    if fv.num_train < 0 or fv.num_val < 0:
        raise UserError("--num_train and --num_val must be >= 0")
    summary = make_demo(fv.out, seed=fv.seed, num_train=fv.num_train, num_val=fv.num_val,
                        preset=fv.preset)
    for split, s in summary["splits"].items():
        print(f"{split}: {s['images']} images, {s['annotations']} annotations "
              f"({s['crowd']} crowd), {s['images_without_annotations']} without annotations")
    print(f"written to {summary['out_dir']}")
    return 0


def main(argv: list[str]) -> int:
    """CLI (callable in-process; argv[0] is the program name); returns the exit status."""
    from solov2_jax import cli

    return cli.absl_main("solov2-make-demo", __doc__, _define_flags, _execute, argv)


def run() -> None:
    """Console entry point (`solov2-make-demo`)."""
    from solov2_jax import cli

    cli.console_entry(main)


if __name__ == "__main__":
    run()
