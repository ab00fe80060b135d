"""build_model / init_variables / trainable_mask and output structure (tiny config)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from solov2_jax.models import build_model, init_variables, trainable_mask
from solov2_jax.structures import SOLOv2Output

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_cfg", CONFIGS / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def abstract_variables(model, hw=(64, 96)):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))


def test_output_structure_and_dtype():
    cfg = tiny_config()
    for dtype in (jnp.float32, jnp.bfloat16):
        model = build_model(cfg.model, dtype=dtype)
        variables = abstract_variables(model)
        out = jax.eval_shape(model.apply, variables,
                             jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32))
        assert isinstance(out, SOLOv2Output)
        assert [o.shape for o in out.backbone] == [
            (2, 16, 24, 64), (2, 8, 12, 128), (2, 4, 6, 256), (2, 2, 3, 512)]
        assert [o.shape for o in out.fpn] == [
            (2, 16, 24, 64), (2, 8, 12, 64), (2, 4, 6, 64), (2, 2, 3, 64), (2, 1, 2, 64)]
        assert out.mask_feats.shape == (2, 16, 24, cfg.model.mask_out_channels)
        grids = cfg.model.num_grids
        assert [k.shape for k in out.kernel_preds] == [(2, s, s, 32) for s in grids]
        assert [c.shape for c in out.cls_preds] == [(2, s, s, 4) for s in grids]
        leaves = jax.tree.leaves(out)
        assert all(x.dtype == dtype for x in leaves), {x.dtype for x in leaves}
        # Parameters stay float32 whatever the computation dtype.
        assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_trainable_mask_freezes_stem_and_layer1_only():
    model = build_model(tiny_config().model)
    params = abstract_variables(model)["params"]
    mask = traverse_util.flatten_dict(trainable_mask(params))
    assert mask.keys() == traverse_util.flatten_dict(params).keys()
    frozen = {k for k, v in mask.items() if not v}
    assert frozen == {k for k in mask if k[0] == "backbone"
                      and (k[1] in ("conv1", "bn1") or k[1].startswith("layer1_"))}
    # BN affine params of later stages train (mmdet norm_eval only freezes statistics).
    assert mask[("backbone", "layer2_0", "bn1", "scale")]
    assert mask[("mask_head", "conv_cls", "bias")]
    none_frozen = traverse_util.flatten_dict(trainable_mask(params, frozen_stages=-1))
    assert all(none_frozen.values())


def test_init_variables_collections():
    cfg = tiny_config()
    cfg.model.depth = 18
    model = build_model(cfg.model)
    variables = init_variables(model, jax.random.PRNGKey(0), (32, 32))
    assert set(variables) == {"params", "batch_stats"}
    stats = variables["batch_stats"]["backbone"]["bn1"]
    np.testing.assert_array_equal(np.asarray(stats["var"]), 1.0)
    bias = np.asarray(variables["params"]["mask_head"]["conv_cls"]["bias"])
    np.testing.assert_allclose(bias, -np.log(99.0), rtol=1e-6)
