"""Transforms vs numpy/OpenCV/mmdet references: mask reductions, resize rule, flip, pad."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from solov2_jax import mask_ops
from solov2_jax.data import transforms as T

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# (h, w) spread: both orientations, squares, extreme aspect ratios, odd sizes.
SIZES = [(480, 640), (640, 480), (427, 640), (640, 427), (500, 500), (333, 1000),
         (1000, 333), (97, 255), (255, 97), (1, 1), (612, 612), (375, 500), (800, 1333),
         (1333, 800), (37, 64), (64, 37), (1200, 1900)]
SCALES = [(1333, 800), (768, 448), (800, 1333), (160, 96), (1333, 640)]


def _random_masks(rng, n, h, w):
    """Blobby binary masks (plus one empty) so resize/flip effects are non-trivial."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), np.uint8)
    for i in range(n - 1):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 2), rng.uniform(1, w / 2)
        out[i] = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        out[i] |= (rng.random((h, w)) < 0.02).astype(np.uint8)
    return out


def test_downsample_and_center_equal_numpy():
    rng = np.random.default_rng(0)
    for h, w in [(32, 64), (96, 32), (128, 160)]:
        m = (rng.random((5, h, w)) < rng.random((5, 1, 1))).astype(np.uint8)
        m[0] = 0  # empty mask: centre (0, 0) like mmdet's clamp to 1e-6
        np.testing.assert_array_equal(T.downsample_x4(m).numpy(), mask_ops.downsample_x4(m))
        np.testing.assert_array_equal(T.center_of_mass(m).numpy(), mask_ops.center_of_mass(m))


@pytest.mark.parametrize("h,w", [(480, 640), (97, 255), (333, 100), (7, 5)])
def test_nearest_resize_equals_cv2(h, w):
    rng = np.random.default_rng(h)
    m = (rng.random((1, h, w)) < 0.5).astype(np.uint8)
    for scale in SCALES:
        nh, nw, _ = (int(v) for v in T.rescale_size(h, w, scale))
        ref = cv2.resize(m[0], (nw, nh), interpolation=cv2.INTER_NEAREST)
        got = T.resize_masks_nearest(m, nh, nw).numpy()[0]
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("flip", [False, True])
def test_image_equals_cv2_then_normalised_and_padded(flip):
    """Bit-exact: mmdet's cv2 INTER_LINEAR uint8 resize, flip, normalise (incl. the exact
    2x shrink, where OpenCV switches to INTER_AREA)."""
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8), (5, 5), 0)
    for nh, nw in [(96, 160), (481, 801), (61, 99), (60, 100)]:
        ref = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        ref = ((ref[:, ::-1] if flip else ref) - np.float32(MEAN)) / np.float32(STD)
        got = T.resize_image(img, nh, nw, tf.constant(flip), MEAN, STD, nh + 31, nw + 3)
        got = got.numpy()
        assert got.shape == (nh + 31, nw + 3, 3)
        assert (got[nh:] == 0).all() and (got[:, nw:] == 0).all()
        np.testing.assert_array_equal(got[:nh, :nw], ref)


@pytest.mark.parametrize("flip", [False, True])
def test_mask_targets_equal_full_resolution_reference(flip):
    """Fast targets == mask_ops on the cv2-resized, flipped, zero-padded full mask."""
    rng = np.random.default_rng(int(flip))
    for h, w in [(97, 255), (200, 150), (64, 64)]:
        m = _random_masks(rng, 6, h, w)
        for scale in [(160, 96), (300, 200)]:
            nh, nw, _ = (int(v) for v in T.rescale_size(h, w, scale))
            ph, pw = T.bucket_shape(scale, w >= h)
            full = np.stack([cv2.resize(x, (nw, nh), interpolation=cv2.INTER_NEAREST)
                             for x in m])
            if flip:
                full = full[:, :, ::-1]
            padded = np.zeros((len(m), ph, pw), np.uint8)
            padded[:, :nh, :nw] = full
            q, c, ne = (x.numpy() for x in T.mask_targets(m, nh, nw, tf.constant(flip), ph, pw))
            np.testing.assert_array_equal(q, mask_ops.downsample_x4(padded))
            np.testing.assert_array_equal(c, mask_ops.center_of_mass(padded))
            np.testing.assert_array_equal(ne, padded.sum(axis=(1, 2)) > 0)


def test_resize_matches_mmdet(mmdet):
    """Sizes, scale factors and boxes (resize + clip + flip) equal mmdet's transforms."""
    from mmdet.datasets.transforms import RandomFlip, Resize
    from mmdet.structures.bbox import HorizontalBoxes

    rng = np.random.default_rng(2)
    for scale in SCALES:
        for h, w in SIZES:
            boxes = np.sort(rng.uniform(-5, max(h, w) + 5, (4, 2, 2)), axis=1)
            boxes = boxes.transpose(0, 2, 1).reshape(4, 4)[:, [0, 2, 1, 3]].astype(np.float32)
            res = Resize(scale=scale, keep_ratio=True)(
                {"img": np.zeros((h, w, 3), np.uint8), "gt_bboxes": HorizontalBoxes(boxes)})
            nh, nw, _ = T.rescale_size(h, w, scale)
            assert (int(nh), int(nw)) == res["img_shape"], (scale, h, w)
            ph, pw = T.bucket_shape(scale, w >= h)
            assert nh <= ph and nw <= pw and ph % 32 == 0 and pw % 32 == 0
            for flip in (False, True):
                got = T._resize_boxes(boxes, h, w, nh, nw, tf.constant(flip)).numpy()
                ref = res["gt_bboxes"].clone()
                if flip:
                    ref = RandomFlip(prob=1.0)({**res, "gt_bboxes": ref})["gt_bboxes"]
                np.testing.assert_array_equal(got, ref.numpy())


def test_bucket_shapes_finite_set():
    assert T.bucket_shapes([(1333, 800)]) == [(800, 1344), (1344, 800)]
    assert len(set(T.bucket_shapes([(1333, s) for s in (800, 768, 736, 704, 672, 640)]))) == 12


def test_train_transform_example():
    rng = np.random.default_rng(3)
    h, w, n = 90, 120, 5
    masks = _random_masks(rng, n, h, w)
    ex = {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "image_id": np.int64(7), "height": np.int32(h), "width": np.int32(w),
        "boxes": np.tile(np.float32([[1, 2, 50, 60]]), (n, 1)),
        "labels": np.arange(n, dtype=np.int32),
        "is_crowd": np.array([False, True, False, False, False]),
        "masks": masks, "ann_ids": np.arange(n, dtype=np.int64) + 10,
    }
    scale = (160, 96)
    ph, pw = T.bucket_shape(scale, True)
    out = T.train_transform(ex, tf.constant(scale), tf.constant(True), (ph, pw), mean=MEAN,
                            std=STD, max_instances=2, return_meta=True)
    out = {k: np.asarray(v) for k, v in out.items()}
    nh, nw = out["img_shape"]
    assert out["image"].shape == (ph, pw, 3) and out["gt_masks"].shape == (2, ph // 4, pw // 4)
    assert (out["image"][nh:] == 0).all() and (out["image"][:, nw:] == 0).all()
    # Instance 4 is the empty mask; 1 is crowd: valid = [0, 2, 3] -> keep 0, 2, drop 3.
    np.testing.assert_array_equal(out["gt_labels"], [0, 2])
    assert out["gt_valid"].all() and out["num_truncated"] == 1
    assert out["meta_flip"] and out["meta_masks"].shape == (n, nh, nw)
    full = np.zeros((n, ph, pw), np.uint8)
    full[:, :nh, :nw] = out["meta_masks"]
    np.testing.assert_array_equal(out["gt_masks"], mask_ops.downsample_x4(full)[[0, 2]])
    np.testing.assert_array_equal(out["gt_centers"], mask_ops.center_of_mass(full)[[0, 2]])
    ref = cv2.resize(ex["image"], (nw, nh), interpolation=cv2.INTER_LINEAR)[:, ::-1]
    img = out["image"][:nh, :nw] * np.float32(STD) + np.float32(MEAN)
    assert np.abs(img - ref).max() <= 1.01
