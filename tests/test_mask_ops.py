"""mask_ops reproduce mmcv.imrescale(1/4) and mmdet center_of_mass bit-exactly."""

import numpy as np
import pytest

from solov2_jax import mask_ops


def random_masks(rng, n, h, w):
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 2), rng.uniform(1, w / 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks.append(m | (rng.random((h, w)) < 0.02))
    masks.append(np.zeros((h, w), bool))  # empty mask
    return np.stack(masks).astype(np.uint8)


@pytest.mark.parity
def test_downsample_x4_equals_mmcv_imrescale(mmdet):
    import mmcv

    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (96, 128), (224, 160)]:
        masks = random_masks(rng, 6, h, w)
        ours = mask_ops.downsample_x4(masks)
        for m, o in zip(masks, ours, strict=True):
            ref = mmcv.imrescale(m, scale=0.25)
            assert ref.shape == o.shape
            np.testing.assert_array_equal(o, ref)


def test_downsample_x4_rejects_unpadded():
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_ops.downsample_x4(np.zeros((1, 30, 32), np.uint8))


@pytest.mark.parity
def test_center_of_mass_equals_mmdet(mmdet):
    import torch
    from mmdet.models.utils import center_of_mass

    rng = np.random.default_rng(1)
    masks = random_masks(rng, 8, 96, 160)
    ours = mask_ops.center_of_mass(masks)
    for m, o in zip(masks, ours, strict=True):
        ch, cw = center_of_mass(torch.from_numpy(m.astype(bool)))
        assert o[0] == np.float32(ch.item()) and o[1] == np.float32(cw.item())
