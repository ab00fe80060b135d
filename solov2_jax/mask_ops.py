"""Exact host/graph versions of mmdet's per-instance mask reductions used for targets.

mmdet computes, per ground-truth mask at padded input resolution, its centre of mass
(`mmdet.models.utils.center_of_mass`) and the 1/4-scale mask target
(`mmcv.imrescale(mask_uint8, 1/4)`, OpenCV INTER_LINEAR on uint8). For a binary mask
whose sides are multiples of 4, OpenCV's fixed-point bilinear at exactly 1/4 samples the
centre 2x2 pixels of each 4x4 block with weight 1/4 and rounds, which reduces to
"at least two of those four pixels are set" (verified bit-exact against mmcv in tests).
These are written with array methods that numpy and TensorFlow share, so the tf.data
pipeline and the tests use the same definition.
"""

from __future__ import annotations

import numpy as np


def downsample_x4(masks: np.ndarray) -> np.ndarray:
    """[..., H, W] {0,1} uint8 (H, W multiples of 4) -> [..., H/4, W/4] uint8."""
    h, w = masks.shape[-2:]
    if h % 4 or w % 4:
        raise ValueError(f"mask size {h}x{w} is not a multiple of 4 (pad to 32 first)")
    m = masks.astype(np.int32)
    count = (
        m[..., 1::4, 1::4] + m[..., 1::4, 2::4] + m[..., 2::4, 1::4] + m[..., 2::4, 2::4]
    )
    return (count >= 2).astype(np.uint8)


def center_of_mass(masks: np.ndarray) -> np.ndarray:
    """[..., H, W] {0,1} -> [..., 2] float32 (center_h, center_w), as mmdet computes it.

    mmdet sums integer coordinates exactly (int64), then divides in float32 by the pixel
    count clamped to 1e-6; reproducing that order keeps grid-cell assignment identical.
    """
    h, w = masks.shape[-2:]
    m = masks.astype(np.int64)
    count = m.sum(axis=(-2, -1))
    sum_h = (m.sum(axis=-1) * np.arange(h, dtype=np.int64)).sum(axis=-1)
    sum_w = (m.sum(axis=-2) * np.arange(w, dtype=np.int64)).sum(axis=-1)
    norm = np.maximum(count.astype(np.float32), np.float32(1e-6))
    return np.stack(
        [sum_h.astype(np.float32) / norm, sum_w.astype(np.float32) / norm], axis=-1
    ).astype(np.float32)
