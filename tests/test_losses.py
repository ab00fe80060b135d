"""SOLOv2 losses equal mmdet 3.3.0 `SOLOV2Head.loss_by_feat` (values and gradients)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from solov2_jax.config import solov2_config
from solov2_jax.losses import loss_kwargs, solov2_loss
from solov2_jax.targets import SOLOv2Targets
from tests.test_targets import (
    LIGHT,
    R50,
    build_head,
    host_inputs,
    jax_targets,
    kwargs_for,
    make_scene,
    mmdet_instances,
    r50_scenes,
    random_scene,
)

E = 8  # kernel / mask-feature channels: small keeps the tests cheap


def random_preds(seed, b, num_grids, featmap, c=80):
    rng = np.random.default_rng(seed)
    kernels = [rng.normal(0, 0.4, (b, s, s, E)).astype(np.float32) for s in num_grids]
    cls = [rng.normal(-2.0, 1.5, (b, s, s, c)).astype(np.float32) for s in num_grids]
    feats = rng.normal(0, 1, (b, *featmap, E)).astype(np.float32)
    return kernels, cls, feats


def mmdet_loss_and_grads(head, scenes, preds):
    """mmdet's loss_by_feat on NCHW copies; returns (loss_mask, loss_cls, grads NHWC)."""
    import torch

    kernels, cls, feats = preds
    to_t = lambda x: torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
    tk, tc, tf = [to_t(k) for k in kernels], [to_t(c) for c in cls], to_t(feats)
    out = head.loss_by_feat(tk, tc, tf, [mmdet_instances(s) for s in scenes],
                            [dict() for _ in scenes])
    (out["loss_mask"] + out["loss_cls"]).backward()
    # Unused inputs (no positives: the kernels) get no .grad in torch, i.e. zero.
    back = lambda t: np.transpose(
        np.zeros(t.shape, np.float32) if t.grad is None else t.grad.numpy(), (0, 2, 3, 1))
    grads = ([back(t) for t in tk], [back(t) for t in tc], back(tf))
    return out["loss_mask"].item(), out["loss_cls"].item(), grads


@functools.cache
def _jit_loss_and_grad(kw_items):
    kw = dict(kw_items)

    def total(kernels, cls, feats, targets, gt_masks):
        out = solov2_loss(kernels, cls, feats, targets, gt_masks, **kw)
        return out["loss"], out

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))


def jax_loss_and_grads(preds, targets, gt_masks, **kw):
    kernels, cls, feats = preds
    fn = _jit_loss_and_grad(tuple(sorted(kw.items())))
    (_, out), grads = fn(tuple(kernels), tuple(cls), feats, targets, gt_masks)
    return jax.tree_util.tree_map(np.asarray, (out, grads))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def assert_grads_close(ours, ref):
    for o, r in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True):
        assert np.isfinite(o).all()
        scale = max(np.abs(r).max(), 1e-12)
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-5 * scale)


def run_parity(mmdet, name, scenes, featmap, seed, n_max):
    head = build_head(mmdet, name)
    kw_t = kwargs_for(name, featmap)
    inputs = host_inputs(scenes, n_max)
    targets = jax_targets(inputs, kw_t)
    preds = random_preds(seed, len(scenes), kw_t["num_grids"], featmap)
    ref_mask, ref_cls, ref_grads = mmdet_loss_and_grads(head, scenes, preds)
    out, grads = jax_loss_and_grads(preds, targets, inputs["gt_masks"],
                                    **loss_kwargs(solov2_config(light="light" in name)))
    assert rel(float(out["loss_mask"]), ref_mask) < 1e-5, (float(out["loss_mask"]), ref_mask)
    assert rel(float(out["loss_cls"]), ref_cls) < 1e-5, (float(out["loss_cls"]), ref_cls)
    assert out["num_overflow"] == 0
    assert_grads_close(grads, ref_grads)
    return out, grads


@pytest.mark.parity
def test_loss_r50_matches_mmdet(mmdet):
    out, _ = run_parity(mmdet, R50, r50_scenes()[:2], (32, 24), seed=0, n_max=48)
    assert out["num_pos"] > 100 and float(out["loss_mask"]) > 0


@pytest.mark.parity
def test_loss_without_positives_matches_mmdet_with_finite_grads(mmdet):
    """An image without instances and one whose instances are outside every range."""
    empty, outside = r50_scenes()[2:]
    for scenes in ([empty], [outside]):
        out, grads = run_parity(mmdet, R50, scenes, (32, 24), seed=1, n_max=48)
        assert out["num_pos"] == 0 and float(out["loss_mask"]) == 0.0
        assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
        assert not np.any(grads[2])  # mask_feats get an exactly-zero gradient


@pytest.mark.parity
def test_loss_light_matches_mmdet(mmdet):
    hp, wp = 256, 224
    hand = make_scene(hp, wp, [
        ("ellipse", 128, 112, 126, 110, 5, None),
        ("rect", 100, 100, 60, 50, 6, None),
        ("ellipse", 200, 60, 20, 15, 7, 700.0),
        ("rect", 40, 180, 6, 4, 8, None),
    ])
    crowded = random_scene(np.random.default_rng(7), hp, wp, 12, enlarge=0.3)
    run_parity(mmdet, LIGHT, [hand, crowded], (64, 56), seed=2, n_max=16)


@pytest.mark.parity
def test_global_normalization_under_pmap(mmdet):
    """Mean over devices of the 'global' losses == mmdet on the whole batch on one device."""
    d = min(4, jax.local_device_count())
    if d < 2:
        pytest.skip("needs >= 2 devices (conftest forces 8 CPU devices)")
    rng = np.random.default_rng(11)
    scenes = (r50_scenes()[:3] + [random_scene(rng, 128, 96, 6)])[:d]
    head = build_head(mmdet, R50)
    kw_t = kwargs_for(R50, (32, 24))
    inputs = host_inputs(scenes, 48)
    targets = jax_targets(inputs, kw_t)
    preds = random_preds(3, d, kw_t["num_grids"], (32, 24))
    ref_mask, ref_cls, _ = mmdet_loss_and_grads(head, scenes, preds)

    kw = dict(loss_kwargs(solov2_config()), normalization="global", axis_name="dev")
    split = lambda x: np.asarray(x).reshape(d, 1, *np.shape(x)[1:])
    kernels, cls, feats = jax.tree_util.tree_map(split, preds)
    t_split = jax.tree_util.tree_map(split, targets)
    assert isinstance(t_split, SOLOv2Targets)

    def per_device(kernels, cls, feats, targets, gt_masks):
        out = solov2_loss(kernels, cls, feats, targets, gt_masks, **kw)
        # What a pmean of the per-device losses (and hence of gradients) optimises.
        return out, jax.tree_util.tree_map(lambda v: jax.lax.pmean(v, "dev"), out)

    out, mean = jax.pmap(per_device, axis_name="dev")(
        tuple(kernels), tuple(cls), feats, t_split, split(inputs["gt_masks"]))
    np.testing.assert_array_equal(np.asarray(out["num_pos"]), np.asarray(targets.num_pos))
    assert rel(float(mean["loss_mask"][0]), ref_mask) < 1e-5, (mean["loss_mask"], ref_mask)
    assert rel(float(mean["loss_cls"][0]), ref_cls) < 1e-5, (mean["loss_cls"], ref_cls)
    # Devices normalise by the same global count, not their own (image 2 has none).
    if d > 2:
        assert float(out["loss_mask"][2]) == 0.0 and float(out["loss_cls"][2]) > 0
