"""ResNet backbone: block layout, shapes, table coverage, and parity with mmdet's ResNet."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from solov2_jax import conversion_table as ct
from solov2_jax import convert
from solov2_jax.models import ResNet
from solov2_jax.models.resnet import block_layout, resnet_out_channels
from tests.models.parity_utils import TOL, as_jax, convert_module, randomise_, rel_err


def test_block_layout_matches_mmdet_downsample_rule():
    # Bottleneck: layer1 needs a projection (64 -> 256); BasicBlock does not (64 -> 64).
    assert [len(s) for s in block_layout(101)] == [3, 4, 23, 3]
    assert [s[0] for s in block_layout(50)] == [(1, True), (2, True), (2, True), (2, True)]
    assert [s[0] for s in block_layout(18)] == [(1, False), (2, True), (2, True), (2, True)]
    assert all(not ds for stage in block_layout(34) for _, ds in stage[1:])


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_shapes_and_table_cover_every_variable(depth):
    shapes = convert.variable_shapes(ResNet(depth=depth), (64, 96))
    table = ct.torchvision_resnet_table(depth)
    targets = {(t.collection, *t.path) for t in table.values()}
    assert targets == set(shapes), "conversion table and model variables differ"
    out = jax.eval_shape(ResNet(depth=depth).apply,
                         traverse_util.unflatten_dict(
                             {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}),
                         jax.ShapeDtypeStruct((2, 64, 96, 3), np.float32))
    expect = [(2, 64 // s, 96 // s, c) for s, c in zip((4, 8, 16, 32),
                                                      resnet_out_channels(depth), strict=True)]
    assert [tuple(o.shape) for o in out] == expect


def test_resnet34_matches_mmdet_on_odd_size(mmdet):
    """Odd input size exercises torch's symmetric padding on every stride-2 layer."""
    import torch
    from mmdet.registry import MODELS

    torch.manual_seed(0)
    tm = MODELS.build(dict(type="ResNet", depth=34, out_indices=(0, 1, 2, 3),
                           frozen_stages=1, style="pytorch"))
    randomise_(tm, seed=3)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    image = np.random.default_rng(0).standard_normal((1, 45, 67, 3)).astype(np.float32)
    module = ResNet(depth=34, precision=jax.lax.Precision.HIGHEST)
    variables = convert_module(module, as_jax(image), sd, (("", "", ct.BACKBONE_RULES),),
                               ct.index_sets(34))
    out = jax.jit(module.apply)(variables, as_jax(image))
    with torch.no_grad():
        ref = tm(mmdet.to_nchw(image))
    for o, r in zip(out, ref, strict=True):
        assert rel_err(o, r) <= TOL
