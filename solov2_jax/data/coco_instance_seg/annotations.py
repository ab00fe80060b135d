"""COCO JSON -> TFDS examples: validation, mmdet's skip rules, mask rasterisation, stats.

The error-vs-skip policy implemented here is tabulated in `solov2_jax.data.coco_builder`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from solov2_jax.data.coco_builder import DataError

# Low deflate level: binary masks already shrink ~50x at level 1; higher levels cost
# prepare time for a few percent of size.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
_IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")  # what tf.io.decode_image reads


class SplitStats:
    """Counts of kept items and of skipped ones per reason (with a few examples)."""

    def __init__(self, max_examples: int = 5):
        self.max_examples = max_examples
        self.images = 0
        self.instances = 0
        self.crowd = 0
        self.reasons: dict[str, dict] = {}

    def count(self, reason: str, example, n: int = 1) -> None:
        entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += n
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(example)

    def as_dict(self) -> dict:
        return {"images": self.images, "instances": self.instances, "crowd": self.crowd,
                "skipped": {k: dict(v) for k, v in sorted(self.reasons.items())}}


def check_image_bytes(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image; raises if unreadable, truncated or unsupported."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format not in _IMAGE_FORMATS:
            raise ValueError(f"unsupported format {im.format}")
        size = im.size
        if im.getexif().get(0x0112, 1) != 1:
            # EXIF orientation: OpenCV (mmdet's decoder, ours too) turns the pixels, so
            # its shape is the size that counts.
            from solov2_jax.data import preprocess

            img = preprocess.decode(data)
            return img.shape[1], img.shape[0]
        if im.format == "JPEG":
            # DCT-scaled 1/8 decode: ~10x cheaper, still walks the whole entropy stream.
            im.draft("L", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()  # raises OSError on truncated data
    return size


def ann_to_rle(ann: dict, height: int, width: int, stats: SplitStats):
    """pycocotools RLE of an annotation (as COCO.annToRLE), or None if it must be skipped.

    Polygon parts are filtered like mmdet's LoadAnnotations (even length, >= 3 points);
    pycocotools would otherwise misread a 2-point part as a box or crash on shorter ones.
    """
    aid = ann.get("id")
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        try:
            parts = [[float(v) for v in p] for p in segm]
        except TypeError as e:
            raise AnnotationError(f"annotation {aid}: polygon segmentation must be a list of "
                             f"coordinate lists") from e
        valid = [p for p in parts if len(p) % 2 == 0 and len(p) >= 6]
        if not valid:
            stats.count("invalid_polygon", aid)
            return None
        if len(valid) < len(parts):
            stats.count("polygon_parts_dropped", aid, len(parts) - len(valid))
        return mask_utils.merge(mask_utils.frPyObjects(valid, height, width))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(s) for s in segm["size"]] != [height, width]:
            raise AnnotationError(f"annotation {aid}: RLE size {segm['size']} != image size "
                             f"{[height, width]}")
        if isinstance(segm["counts"], list):  # uncompressed RLE (COCO crowd)
            return mask_utils.frPyObjects(segm, height, width)
        counts = segm["counts"]
        return {"size": [height, width],
                "counts": counts.encode() if isinstance(counts, str) else counts}
    raise AnnotationError(f"annotation {aid}: segmentation is neither polygons nor RLE "
                     f"({type(segm).__name__})")


class AnnotationError(DataError):
    """An annotation file that must be fixed; the message names the file and the id."""


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def rle_string_counts(counts: str | bytes) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString in Python),
    or None if the string is malformed. Lets us check the total before pycocotools,
    which writes past its buffer for runs that exceed height * width."""
    data = counts.encode() if isinstance(counts, str) else bytes(counts)
    out, p = [], 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                return None
            c = data[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def validate_annotation(ann: dict, img: dict, where: str) -> None:
    """Checks one annotation before anything expensive sees it (pycocotools rasterises a
    polygon in memory proportional to its coordinates: one NaN or 1e12 exhausts RAM).

    Raises AnnotationError naming `where` (the file) and the annotation id for: a bbox
    that is not 4 finite numbers; a non-finite area; polygon coordinates that are not
    finite numbers or lie more than one image size outside the image; an RLE whose runs
    are malformed or do not cover height * width exactly.
    """
    aid = ann.get("id")
    bad = lambda what: AnnotationError(f"{where}: annotation {aid}: {what}")  # noqa: E731
    bbox = ann.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(
            _is_number(v) and math.isfinite(v) for v in bbox):
        raise bad(f"bbox {bbox!r} must be 4 finite numbers [x, y, w, h]")
    area = ann.get("area")
    if area is not None and not (_is_number(area) and math.isfinite(area)):
        raise bad(f"area {area!r} must be a finite number")
    height, width = int(img["height"]), int(img["width"])
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        # A flat list of numbers is malformed but harmless when the box rules drop the
        # instance first (ann_to_rle rejects it otherwise): check its numbers all the same.
        parts = [segm] if segm and all(_is_number(v) for v in segm) else segm
        for part in parts:
            if not isinstance(part, list | tuple):
                raise bad("polygon segmentation must be a list of coordinate lists")
            for i, v in enumerate(part):
                if not _is_number(v):
                    raise bad(f"polygon coordinate {v!r} is not a number")
                if not math.isfinite(v):
                    raise bad(f"polygon coordinate {v!r} is not finite")
                lim = width if i % 2 == 0 else height
                if not -lim <= v <= 2 * lim:
                    raise bad(f"polygon {'xy'[i % 2]} coordinate {v!r} is more than one image "
                              f"size outside the {width}x{height} image")
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if not (isinstance(size, list | tuple) and len(size) == 2
                and all(_is_number(v) for v in size)):
            raise bad(f"RLE size {size!r} must be [height, width]")
        if [int(v) for v in size] != [height, width]:
            raise bad(f"RLE size {list(size)} != image size {[height, width]}")
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                       for c in counts):
                raise bad("uncompressed RLE counts must be non-negative integers")
        elif isinstance(counts, str | bytes):
            counts = rle_string_counts(counts)
            if counts is None or any(c < 0 for c in counts):
                raise bad("compressed RLE counts string is malformed")
        else:
            raise bad(f"RLE counts must be a list or a string, not {type(counts).__name__}")
        if sum(counts) != height * width:
            raise bad(f"RLE runs cover {sum(counts)} pixels, not height*width = "
                      f"{height * width}")


def _encode_png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8), _PNG_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding of a mask failed")
    return buf.tobytes()


def load_json(path) -> dict:
    """A COCO JSON file as a dict; AnnotationError naming the file if it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        size = os.path.getsize(path)
        raise AnnotationError(f"{path}: not valid JSON ({e}; file size {size} bytes"
                              f"{', empty: an interrupted write?' if size == 0 else ''})"
                              ) from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON (not UTF-8 text: {e})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with 'images', "
                              f"'annotations' and 'categories', got {type(data).__name__}")
    return data


def _load_split(path: Path, categories) -> tuple[dict, dict, dict]:
    """Parses and cross-checks one instances JSON; returns (images, anns_by_image, labels)."""
    data = load_json(path)
    known = dict(categories)
    for c in data.get("categories") or []:
        if known.get(int(c["id"])) != str(c["name"]):
            raise AnnotationError(f"{path}: category {c['id']} ({c['name']!r}) is not in the "
                             f"dataset's category list {sorted(known.items())}; all "
                             "instances_*.json files must share one list")
    labels = {cid: k for k, (cid, _) in enumerate(categories)}
    if not data.get("images"):
        raise AnnotationError(f"{path}: the 'images' list is empty: nothing to prepare")
    images: dict[int, dict] = {}
    for img in data.get("images") or []:
        iid = int(img["id"])
        if iid in images:
            raise AnnotationError(f"{path}: duplicate image id {iid}")
        images[iid] = img
    anns: dict[int, list] = defaultdict(list)
    seen: set[int] = set()
    for ann in data.get("annotations") or []:
        aid = ann.get("id")
        if aid is None or aid in seen:
            raise AnnotationError(f"{path}: annotation id {aid} is missing or duplicated")
        seen.add(aid)
        if ann.get("image_id") not in images:
            raise AnnotationError(f"{path}: annotation {aid} refers to unknown image id "
                             f"{ann.get('image_id')}")
        if ann.get("category_id") not in labels:
            raise AnnotationError(f"{path}: annotation {aid} refers to unknown category id "
                             f"{ann.get('category_id')}")
        validate_annotation(ann, images[ann["image_id"]], str(path))
        anns[ann["image_id"]].append(ann)
    return images, anns, labels


def _instances(anns, height, width, labels, stats):
    """Kept instances of one image, mmdet's box rules first, then the mask."""
    rows = []
    for ann in sorted(anns, key=lambda a: a["id"]):
        aid = ann["id"]
        x, y, w, h = (float(v) for v in ann["bbox"])
        area = ann.get("area")
        if w < 1 or h < 1 or (area is not None and area <= 0):
            stats.count("degenerate_box", aid)
            continue
        inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
        inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
        if inter_w * inter_h == 0:
            stats.count("box_outside_image", aid)
            continue
        rle = ann_to_rle(ann, height, width, stats)
        if rle is None:
            continue
        if area is None:  # some exporters omit it; COCO defines it as the mask area
            area = float(mask_utils.area(rle))
        mask = mask_utils.decode(rle)
        rows.append(([x, y, w, h], labels[ann["category_id"]], ann["category_id"],
                     bool(ann.get("iscrowd", 0)), float(area), aid, _encode_png(mask)))
    return rows


def generate(root: Path, stem: str, categories, stats: SplitStats, *, progress=False,
             desc: str = ""):
    """Yields (image id, TFDS example) for `instances_<stem>.json`, filling `stats`."""
    from tqdm import tqdm

    images, anns, labels = _load_split(root / "annotations" / f"instances_{stem}.json",
                                       categories)
    for iid in tqdm(sorted(images), desc=f"{desc} images", disable=not progress):
        img = images[iid]
        fname = str(img["file_name"])
        height, width = int(img["height"]), int(img["width"])
        path = root / stem / fname
        reason = None
        if not path.is_file():
            reason = "missing_image_file"
        else:
            data = path.read_bytes()
            try:
                size = check_image_bytes(data)
            except Exception:  # noqa: BLE001 - any decoder failure means unreadable
                reason = "unreadable_image"
            else:
                if size != (width, height):
                    reason = "image_size_mismatch"
        if reason:
            stats.count(reason, fname)
            if anns.get(iid):
                stats.count("annotations_of_skipped_images", fname, len(anns[iid]))
            continue
        rows = _instances(anns.get(iid, ()), height, width, labels, stats)
        stats.images += 1
        stats.instances += len(rows)
        stats.crowd += sum(r[3] for r in rows)
        cols = list(zip(*rows, strict=True)) if rows else [()] * 7
        yield iid, {
            "image": data,  # the file's bytes, untouched
            "image_id": iid,
            "file_name": fname,
            "height": height,
            "width": width,
            # Annotations in the JSON before any skip: mmdet's filter_empty_gt keeps an
            # image with any annotation, even if none of them survives as an instance.
            "num_annotations": len(anns.get(iid, ())),
            "objects": {
                "bbox": np.asarray(cols[0], np.float32).reshape(-1, 4),
                "label": np.asarray(cols[1], np.int64),
                "category_id": np.asarray(cols[2], np.int64),
                "is_crowd": np.asarray(cols[3], np.bool_),
                "area": np.asarray(cols[4], np.float32),
                "id": np.asarray(cols[5], np.int64),
                "mask": list(cols[6]),
            },
        }
