"""Host image preprocessing with mmdet 3.3.0's exact pixels: cv2 decode, keep-ratio resize.

mmdet's test pipeline (`LoadImageFromFile` -> `Resize(keep_ratio=True)` ->
`DetDataPreprocessor`) and its train pipeline up to the flip do, per image:

1. `cv2.imdecode(bytes, IMREAD_COLOR)`: BGR uint8, libjpeg's accurate integer IDCT and the
   EXIF orientation applied (TF's default decoder uses the fast IDCT and ignores EXIF);
2. `mmcv.imrescale`: scale factor min(long / max(h, w), short / min(h, w)), new size
   `int(x * sf + 0.5)`, `cv2.resize(INTER_LINEAR)` **on uint8** (OpenCV's fixed-point
   bilinear, rounded to uint8; for an exact 2x shrink OpenCV switches to INTER_AREA);
3. BGR -> RGB, `(x - mean) / std` in float32, zero padding bottom/right.

Reimplementing OpenCV's fixed-point arithmetic in TF would be a copy that can drift, so
both the tf.data pipelines (through `tf.numpy_function`; cv2 releases the GIL while it
works) and `solov2_jax.predict` call these functions: one implementation of the pixels.

Shapes are HWC; `hw` pairs are (height, width).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

# cv2 threads would compete with tf.data's parallel calls and XLA for the same cores.
cv2.setNumThreads(1)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] BGR, exactly as mmcv.imfrombytes('color')."""
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise ImageError(f"{name}: not a readable image (OpenCV cannot decode it)")
    return img


def read(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] BGR (EXIF orientation applied, as mmdet)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from e
    return decode(data, path)


def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv.rescale_size for a (long, short) bound: (new_h, new_w), Python float64."""
    long_side, short_side = max(scale), min(scale)
    sf = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * float(sf) + 0.5), int(w * float(sf) + 0.5)


def resize(img: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [h, w, C] with cv2 INTER_LINEAR (mmcv.imresize 'bilinear')."""
    h, w = int(hw[0]), int(hw[1])
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def normalise(img_bgr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [H, W, 3] BGR -> float32 [H, W, 3] RGB, (x - mean) / std in float32."""
    rgb = img_bgr[..., ::-1].astype(np.float32)
    return (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def ceil_to(x: int, divisor: int) -> int:
    return -(-int(x) // int(divisor)) * int(divisor)


def canvas_of(hw: Sequence[int], divisor: int = 32) -> tuple[int, int]:
    """mmdet's padded size of a batch whose largest image is `hw`: each side up to x`divisor`."""
    return ceil_to(hw[0], divisor), ceil_to(hw[1], divisor)


def pad(x: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """[h, w, C] -> [H, W, C], zeros bottom/right (mmdet's pad_value 0 after normalising)."""
    h, w = x.shape[:2]
    if h > hw[0] or w > hw[1]:
        raise ValueError(f"image {h}x{w} does not fit the {hw[0]}x{hw[1]} input")
    return np.pad(x, ((0, int(hw[0]) - h), (0, int(hw[1]) - w), (0, 0)))


def resized_bgr(img_bgr: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """uint8 BGR at mmdet's keep-ratio size for `scale` (long, short)."""
    return resize(img_bgr, rescale_size(*img_bgr.shape[:2], scale))


def eval_example(img_bgr: np.ndarray, *, scale: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], input_hw: Sequence[int], divisor: int = 32) -> dict:
    """One image as mmdet's test pipeline sees it, padded into a static `input_hw`.

    Returns image float32 [Hi, Wi, 3] (RGB, normalised, zero padded), img_shape (h, w)
    after resize, ori_shape (h, w) of the decoded image and canvas (h, w): the image's
    own x`divisor` padded size, which is what mmdet's batch-1 test loop runs the network
    on (the model treats everything outside it as absent; see `models.canvas`).
    """
    resized = resized_bgr(img_bgr, scale)
    return {
        "image": pad(normalise(resized, mean, std), input_hw),
        "img_shape": np.asarray(resized.shape[:2], np.int32),
        "ori_shape": np.asarray(img_bgr.shape[:2], np.int32),
        "canvas": np.asarray(canvas_of(resized.shape[:2], divisor), np.int32),
    }
