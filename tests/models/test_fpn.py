"""FPN: parity with mmdet's FPN, including odd level sizes (nearest to exact size)."""

from __future__ import annotations

import jax
import numpy as np

from solov2_jax import conversion_table as ct
from solov2_jax.models import FPN
from tests.models.parity_utils import TOL, as_jax, convert_module, randomise_, rel_err


def test_fpn_matches_mmdet(mmdet):
    import torch
    from mmdet.registry import MODELS

    in_channels = [8, 16, 24, 32]
    torch.manual_seed(0)
    tm = MODELS.build(dict(type="FPN", in_channels=in_channels, out_channels=16,
                           start_level=0, num_outs=5))
    randomise_(tm, seed=5)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    # Sizes of a 75 x 105 image through ResNet: odd at several levels, so the top-down
    # path must upsample to the lower level's exact size, not by 2.
    sizes = [(19, 27), (10, 14), (5, 7), (3, 4)]
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2, h, w, c)).astype(np.float32)
             for (h, w), c in zip(sizes, in_channels, strict=True)]
    module = FPN(out_channels=16, num_outs=5, precision=jax.lax.Precision.HIGHEST)
    inputs = [as_jax(f) for f in feats]
    variables = convert_module(module, inputs, sd, (("", "", ct.NECK_RULES),),
                               ct.index_sets(18))
    out = module.apply(variables, inputs)
    with torch.no_grad():
        ref = tm([mmdet.to_nchw(f) for f in feats])
    assert len(out) == len(ref) == 5
    assert out[4].shape == (2, 2, 2, 16)  # max_pool(k=1, s=2) of a 3 x 4 map
    for o, r in zip(out, ref, strict=True):
        assert rel_err(o, r) <= TOL


def test_fpn_init_xavier_and_zero_bias():
    module = FPN(out_channels=8, num_outs=5)
    feats = [np.zeros((1, 8 // 2**i, 8 // 2**i, 4 * 2**i), np.float32) for i in range(4)]
    params = module.init(jax.random.PRNGKey(0), feats)["params"]
    assert set(params) == {f"{n}_{i}" for n in ("lateral_convs", "fpn_convs") for i in range(4)}
    assert np.all(np.asarray(params["fpn_convs_0"]["conv"]["bias"]) == 0)
    k = np.asarray(params["fpn_convs_0"]["conv"]["kernel"])
    limit = np.sqrt(6.0 / (9 * 8 + 9 * 8))  # xavier uniform, fans include receptive field
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.5 * limit
