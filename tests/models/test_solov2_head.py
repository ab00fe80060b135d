"""SOLOv2 head: parity with mmdet's SOLOV2Head (small widths), init values, names."""

from __future__ import annotations

import math

import jax
import numpy as np

from solov2_jax import conversion_table as ct
from solov2_jax.models import SOLOV2Head
from tests.models.parity_utils import TOL, as_jax, convert_module, randomise_, rel_err

GRIDS = (10, 8, 6, 4, 3)


def small_head(**kw):
    return SOLOV2Head(num_classes=3, feat_channels=32, stacked_convs=2, num_grids=GRIDS,
                      gn_groups=8, mask_feature_channels=16, mask_out_channels=24, **kw)


def test_head_matches_mmdet(mmdet):
    import torch
    from mmdet.registry import MODELS

    gn = dict(type="GN", num_groups=8, requires_grad=True)
    torch.manual_seed(0)
    tm = MODELS.build(dict(
        type="SOLOV2Head", num_classes=3, in_channels=16, feat_channels=32, stacked_convs=2,
        strides=[8, 8, 16, 32, 32], num_grids=list(GRIDS), norm_cfg=gn,
        mask_feature_head=dict(feat_channels=16, start_level=0, end_level=3,
                               out_channels=24, mask_stride=4, norm_cfg=gn)))
    randomise_(tm, seed=7)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    # FPN levels of a 64 x 96 padded image (P6 = stride-2 subsampling of P5).
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2, h, w, 16)).astype(np.float32) for h, w in sizes]
    module = small_head(precision=jax.lax.Precision.HIGHEST)
    inputs = [as_jax(f) for f in feats]
    variables = convert_module(module, inputs, sd, (("", "", ct.HEAD_RULES),),
                               ct.index_sets(18, stacked_convs=2))
    kernels, cls, mask_feats = jax.jit(module.apply)(variables, inputs)
    with torch.no_grad():
        ref_k, ref_c, ref_m = tm([mmdet.to_nchw(f) for f in feats])
    assert mask_feats.shape == (2, 16, 24, 24)
    assert rel_err(mask_feats, ref_m) <= TOL
    for s, k, c, rk, rc in zip(GRIDS, kernels, cls, ref_k, ref_c, strict=True):
        assert k.shape == (2, s, s, 24) and c.shape == (2, s, s, 3)
        assert rel_err(k, rk) <= TOL
        assert rel_err(c, rc) <= TOL


def test_head_names_and_shapes():
    feats = [jax.ShapeDtypeStruct((1, h, w, 16), np.float32)
             for h, w in [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]]
    params = jax.eval_shape(small_head().init, jax.random.PRNGKey(0), feats)["params"]
    assert set(params) == {"kernel_convs_0", "kernel_convs_1", "cls_convs_0", "cls_convs_1",
                           "conv_kernel", "conv_cls", "mask_feature_head"}
    assert params["kernel_convs_0"]["conv"]["kernel"].shape == (3, 3, 18, 32)  # +2 coords
    assert params["cls_convs_0"]["conv"]["kernel"].shape == (3, 3, 16, 32)
    assert "bias" not in params["kernel_convs_0"]["conv"]  # GN follows: no conv bias
    assert params["conv_kernel"]["kernel"].shape == (3, 3, 32, 24)
    mf = params["mask_feature_head"]
    assert set(mf) == {f"convs_all_levels_{i}" for i in range(4)} | {"conv_pred"}
    assert set(mf["convs_all_levels_3"]) == {"conv0", "conv1", "conv2"}
    assert mf["convs_all_levels_3"]["conv0"]["conv"]["kernel"].shape == (3, 3, 18, 16)
    assert mf["conv_pred"]["conv"]["kernel"].shape == (1, 1, 16, 24)


def test_head_init_values():
    # Initialise only the category branch tail (setup() creates params lazily), which
    # avoids compiling the whole head just to look at initial values.
    def cls_tail(head, x):
        return head.conv_cls(head.cls_convs[1](x))

    x = np.zeros((1, 3, 3, 32), np.float32)
    params = small_head().init(jax.random.PRNGKey(0), x, method=cls_tail)["params"]
    bias = np.asarray(params["conv_cls"]["bias"])
    np.testing.assert_allclose(bias, -math.log(99.0), rtol=1e-6)  # sigmoid(b) = 0.01
    kernel = np.asarray(params["cls_convs_1"]["conv"]["kernel"])
    assert 0.005 < float(kernel.std()) < 0.02  # mmdet Normal(std=0.01)
    np.testing.assert_array_equal(np.asarray(params["cls_convs_1"]["gn"]["scale"]), 1.0)
