"""ops.py resizes equal torch F.interpolate; coordinate channels equal mmdet's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solov2_jax import ops

SIZES = [
    ((10, 13), (40, 40)),  # upsample to a grid
    ((100, 60), (36, 36)),  # downsample to a grid
    ((8, 8), (16, 16)),  # exact x2
    ((24, 32), (12, 16)),  # exact x0.5 (P2 -> stride 8)
    ((7, 9), (3, 5)),
]


@pytest.mark.parity
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_resizes_equal_torch(mmdet, in_hw, out_hw):
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref_bi = F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)
    ref_nn = F.interpolate(t, size=out_hw, mode="nearest")
    ours_bi = np.asarray(ops.interpolate_bilinear(jnp.asarray(x), out_hw))
    ours_nn = np.asarray(ops.interpolate_nearest(jnp.asarray(x), out_hw))
    np.testing.assert_allclose(ours_bi, ref_bi.permute(0, 2, 3, 1).numpy(), atol=5e-6)
    np.testing.assert_array_equal(ours_nn, ref_nn.permute(0, 2, 3, 1).numpy())


@pytest.mark.parity
def test_traced_crop_and_resize_equal_torch(mmdet):
    """Crop to a traced valid size, then resize onto a traced output size in a canvas."""
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(1).standard_normal((20, 28)).astype(np.float32)

    @jax.jit
    def crop_resize(x, vh, vw, oh, ow):
        wy = ops.bilinear_weights(50, 20, valid_in=vh, valid_out=oh)
        wx = ops.bilinear_weights(60, 28, valid_in=vw, valid_out=ow)
        return wy @ x @ wx.T

    for vh, vw, oh, ow in [(17, 25, 41, 59), (20, 28, 50, 60), (9, 28, 13, 7)]:
        ours = np.asarray(crop_resize(x, vh, vw, oh, ow))
        ref = F.interpolate(torch.from_numpy(x[:vh, :vw])[None, None], size=(oh, ow),
                            mode="bilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(ours[:oh, :ow], ref, atol=5e-6)
        assert not ours[oh:].any() and not ours[:, ow:].any()


@pytest.mark.parity
def test_coordinate_channels_equal_mmdet(mmdet):
    from mmdet.models.utils import generate_coordinate

    ref = generate_coordinate((2, 5, 6, 7), "cpu").permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ops.coordinate_channels(2, 6, 7)), ref, atol=1e-7)
