"""Overlay pictures of instance masks: one drawing implementation for every picture.

`draw_instances` paints each instance's mask in its own colour (alpha-blended), its
outline, a "name score" tag at its box (placed by `place_tags` so that tags do not cover
each other), and a legend panel on the right; `side_by_side` puts pictures next to each
other with titles (e.g. predictions beside ground truth); `save_png` writes one
atomically. Images are RGB uint8 [H, W, 3] throughout; only numpy and OpenCV are used
(no display, no matplotlib).
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def palette(n: int) -> np.ndarray:
    """n distinct, saturated RGB colours [n, 3] uint8 (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        h = (0.13 + i * 0.618033988749895) % 1.0
        s, v = (0.85, 0.95) if i % 2 == 0 else (0.65, 0.85)
        out.append([int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(out, np.uint8).reshape(-1, 3)


def _text_scale(h: int, w: int) -> tuple[float, int]:
    scale = float(np.clip(min(h, w) / 900.0, 0.35, 1.2))
    return scale, max(1, int(round(scale * 2)))


def _tag_size(text: str, scale: float, thick: int) -> tuple[int, int]:
    """(width, height) in pixels of the filled rectangle `_tag` draws for `text`."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    return tw + 5, th + base + 5


def _tag(img: np.ndarray, text: str, x: int, y: int, color, scale: float, thick: int):
    """A filled tag with dark or light text (whichever contrasts) at (x, y) top-left,
    moved inside the picture where it would stick out."""
    tw, th = _tag_size(text, scale, thick)
    h, w = img.shape[:2]
    x = int(np.clip(x, 0, max(0, w - tw)))
    y = int(np.clip(y, 0, max(0, h - th)))
    cv2.rectangle(img, (x, y), (x + tw - 1, y + th - 1), tuple(int(c) for c in color), -1)
    dark = sum(int(c) * k for c, k in zip(color, (0.299, 0.587, 0.114), strict=True)) > 140
    text_h = cv2.getTextSize(text, _FONT, scale, thick)[0][1]
    cv2.putText(img, text, (x + 2, y + text_h + 2), _FONT, scale,
                (0, 0, 0) if dark else (255, 255, 255), thick, cv2.LINE_AA)


# Where a tag may go, after the three anchors: shifts of the box's inside top-left corner
# in tag heights (rows, columns), nearest first; at equal distance down before right
# before up/left, so crowded tags stack into a readable column under the box's corner.
_STEPS = 8
_SHIFTS = np.asarray(sorted(
    ((r, c) for r in range(-_STEPS, _STEPS + 1) for c in range(-_STEPS, _STEPS + 1)
     if (r, c) != (0, 0)),
    key=lambda rc: (abs(rc[0]) + abs(rc[1]), (rc[0] < 0) + (rc[1] < 0), abs(rc[1]),
                    rc[0] < 0)), np.int64).reshape(-1, 2)


def _overlap(cands: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """Total intersection area [C] of each candidate rectangle [C, 4] with placed [P, 4]
    (xyxy, x2/y2 exclusive)."""
    if not len(placed):
        return np.zeros(len(cands), np.int64)
    iw = (np.minimum(cands[:, None, 2], placed[None, :, 2])
          - np.maximum(cands[:, None, 0], placed[None, :, 0])).clip(0)
    ih = (np.minimum(cands[:, None, 3], placed[None, :, 3])
          - np.maximum(cands[:, None, 1], placed[None, :, 1])).clip(0)
    return (iw * ih).sum(axis=1)


def _placing_order(scores, n: int) -> np.ndarray:
    """Indices [n]: highest score first (ties and scores=None: index order)."""
    if scores is None:
        return np.arange(n)
    return np.argsort(-np.asarray(scores, np.float64).reshape(-1), kind="stable")


def place_tags(sizes, boxes, hw: tuple[int, int], scores=None, taken=None) -> np.ndarray:
    """Non-overlapping tag rectangles [N, 4] int xyxy (x2/y2 exclusive), one per box.

    sizes [N, 2] (width, height) of each tag, boxes [N, 4] xyxy, hw the picture's
    (height, width); scores [N] or None (then index order) decide who is placed first
    (highest first, ties by index); taken [M, 4] are rectangles to keep clear (a title).
    Each tag takes the first candidate that overlaps no tag placed before it — above the
    box's top-left corner, inside it, below the bottom-left corner, then the inside
    corner shifted by whole tag heights (`_SHIFTS`) — every candidate moved inside the
    picture; if none is free, the candidate with the least overlap area. Deterministic.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n, (h, w) = len(sizes), hw
    if len(boxes) != n:
        raise ValueError(f"place_tags: {n} tag sizes but {len(boxes)} boxes")
    placed = [np.asarray([] if taken is None else taken, np.int64).reshape(-1, 4)]
    out = np.zeros((n, 4), np.int64)
    for i in _placing_order(scores, n):
        tw, th = (int(v) for v in sizes[i])
        x1, y1, y2 = int(np.floor(boxes[i, 0])), int(np.floor(boxes[i, 1])), int(boxes[i, 3])
        xy = np.concatenate([[[x1, y1 - th], [x1, y1], [x1, y2]],
                             [x1, y1] + _SHIFTS[:, ::-1] * th])
        xy[:, 0] = xy[:, 0].clip(0, max(0, w - tw))
        xy[:, 1] = xy[:, 1].clip(0, max(0, h - th))
        cands = np.concatenate([xy, xy + [tw, th]], axis=1)
        area = _overlap(cands, np.concatenate(placed))
        out[i] = cands[int(np.argmin(area))]  # the first free one, else the least overlap
        placed.append(out[i][None])
    return out


def draw_instances(image: np.ndarray, masks, labels, scores, class_names: Sequence[str],
                   boxes=None, *, alpha: float = 0.5, legend: bool = True,
                   max_legend: int = 24, title: str | None = None,
                   min_side: int = 0) -> np.ndarray:
    """RGB uint8 [H, W, 3] with every instance drawn; returns a new image.

    masks [N, H, W] bool, labels [N] int (index into class_names), scores [N] float or
    None (ground truth: no score), boxes [N, 4] xyxy or None (computed from the masks).
    Instance i gets colour palette(N)[i]; the legend lists "i name score" per instance
    (the first max_legend, then "+k more"). A picture whose short side is below
    `min_side` is enlarged by an integer factor first (pixels repeated, so masks stay
    exact) to leave room for the text.
    """
    img = np.ascontiguousarray(np.asarray(image, np.uint8)[..., :3]).copy()
    h, w = img.shape[:2]
    masks = np.asarray(masks, bool).reshape(-1, h, w)
    n = masks.shape[0]
    labels = np.asarray(labels, np.int64).reshape(-1)
    if boxes is None:
        from solov2_jax.predict import mask_boxes

        boxes = mask_boxes(masks, xp=np) if n else np.zeros((0, 4), np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    f = -(-int(min_side) // min(h, w)) if min_side and min(h, w) < min_side else 1
    if f > 1:
        img = img.repeat(f, axis=0).repeat(f, axis=1)
        masks = masks.repeat(f, axis=1).repeat(f, axis=2)
        boxes = boxes * f
        h, w = img.shape[:2]
    colors = palette(n)
    scale, thick = _text_scale(h, w)
    line = max(1, int(round(min(h, w) / 300)))

    def name(i):
        lab = int(labels[i])
        text = class_names[lab] if 0 <= lab < len(class_names) else f"class_{lab}"
        return text if scores is None else f"{text} {float(np.asarray(scores)[i]):.2f}"

    # Larger masks first, so small ones stay visible on top.
    order = sorted(range(n), key=lambda i: -int(masks[i].sum()))
    blend = img.astype(np.float32)
    for i in order:
        m = masks[i]
        blend[m] = (1 - alpha) * blend[m] + alpha * colors[i].astype(np.float32)
    img = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    for i in order:
        contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, tuple(int(c) for c in colors[i]), line,
                         cv2.LINE_AA)
    tagged = [i for i in range(n) if masks[i].any()]
    texts = [f"{i}: {name(i)}" for i in tagged]
    tag_scale, tag_thick = scale * 0.8, max(1, thick - 1)
    taken = np.zeros((0, 4), np.int64)
    if title:  # drawn last at the top-left corner: tags keep clear of it
        taken = np.asarray([[0, 0, *_tag_size(title, scale, thick)]], np.int64)
    tag_scores = None if scores is None else np.asarray(scores, np.float64)[tagged]
    rects = place_tags([_tag_size(t, tag_scale, tag_thick) for t in texts], boxes[tagged],
                       (h, w), tag_scores, taken)
    # Placement order reversed: where tags had to overlap, the best-scored one is on top.
    for k in _placing_order(tag_scores, len(tagged))[::-1]:
        _tag(img, texts[k], int(rects[k, 0]), int(rects[k, 1]), colors[tagged[k]],
             tag_scale, tag_thick)
    if title:
        _tag(img, title, 0, 0, (32, 32, 32), scale, thick)
    if not legend:
        return img
    return np.concatenate([img, _legend(h, [f"{i}: {name(i)}" for i in range(n)], colors,
                                        max_legend, scale)], axis=1)


def _legend(h: int, entries: Sequence[str], colors: np.ndarray, max_rows: int,
            scale: float) -> np.ndarray:
    """A white panel [h, W, 3] listing entries with colour swatches."""
    scale = max(scale * 0.8, 0.35)
    row = int(cv2.getTextSize("Ag", _FONT, scale, 1)[0][1] * 2.0) + 2
    shown = list(entries[:max_rows])
    if len(entries) > max_rows:
        shown.append(f"+{len(entries) - max_rows} more")
    if not entries:
        shown = ["no detections"]
    width = max(cv2.getTextSize(t, _FONT, scale, 1)[0][0] for t in shown) + row + 16
    total = max(h, row * (len(shown) + 1))
    panel = np.full((total, width, 3), 255, np.uint8)
    for k, text in enumerate(shown):
        y = row // 2 + k * row
        if k < min(len(entries), max_rows):
            cv2.rectangle(panel, (6, y + 2), (6 + row - 6, y + row - 4),
                          tuple(int(c) for c in colors[k]), -1)
        cv2.putText(panel, text, (row + 6, y + row - 6), _FONT, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    if total > h:  # more rows than the picture is tall: shrink the panel to fit
        panel = cv2.resize(panel, (max(1, width * h // total), h), interpolation=cv2.INTER_AREA)
    return panel


def side_by_side(images: Sequence[np.ndarray], titles: Sequence[str] | None = None,
                 gap: int = 8) -> np.ndarray:
    """RGB pictures in one row (bottom-padded white to the tallest), each optionally titled."""
    images = [np.asarray(im, np.uint8) for im in images]
    if titles:
        images = [im.copy() for im in images]
        for im, t in zip(images, titles, strict=True):
            scale, thick = _text_scale(*im.shape[:2])
            _tag(im, t, 0, 0, (32, 32, 32), scale, thick)
    h = max(im.shape[0] for im in images)
    parts = []
    for k, im in enumerate(images):
        if k:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)


def save_png(path: str | os.PathLike, image_rgb: np.ndarray) -> str:
    """Writes an RGB uint8 image as PNG (atomically); returns the path."""
    from solov2_jax.checkpoint import atomic_write

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image_rgb)[..., ::-1]))
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    atomic_write(os.fspath(path), buf.tobytes())
    return os.fspath(path)
