"""Optimiser recipe vs torch SGD + clip_grad_norm_ + mmengine's LinearLR / MultiStepLR."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solov2_jax import optim

torch = pytest.importorskip("torch")
lr_sched = pytest.importorskip("mmengine.optim.scheduler.lr_scheduler")


def _optim_cfg(**kw):
    c = ml_collections.ConfigDict(dict(
        lr=0.01, reference_batch=16, scale_lr_by_batch=False, momentum=0.9,
        weight_decay=1e-4, grad_clip_norm=35.0, epochs=4, milestones=(2, 3), gamma=0.1,
        warmup_iters=5, warmup_ratio=0.1))
    c.update(kw)
    return c


def _mmengine_lrs(cfg, spe, num_iters, params=None):
    """(lrs seen by each iteration, torch optimizer) as mmdet's runner drives them.

    LinearLR is stepped after every iteration, MultiStepLR (by_epoch) after every epoch,
    exactly like mmengine's ParamSchedulerHook.
    """
    params = params or [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    warm = lr_sched.LinearLR(opt, start_factor=cfg.warmup_ratio, by_epoch=False, begin=0,
                             end=cfg.warmup_iters)
    multi = lr_sched.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma,
                                 begin=0, end=cfg.epochs, by_epoch=True)

    def lrs():
        for i in range(num_iters):
            yield opt.param_groups[0]["lr"]
            warm.step()
            if (i + 1) % spe == 0:
                multi.step()

    return lrs, opt


def test_lr_schedule_matches_mmengine_over_warmup_and_milestones():
    cfg = _optim_cfg(warmup_iters=500, warmup_ratio=0.001, epochs=12, milestones=(8, 11))
    spe = 70  # warm-up spans 7 epochs; milestones at iterations 560 and 770
    n = 12 * spe
    lrs, opt = _mmengine_lrs(cfg, spe, n)
    expected = []
    for lr in lrs():
        expected.append(lr)
        opt.step()
    sched = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, global_batch=16)
    got = np.asarray(jax.vmap(sched)(jnp.arange(n)))
    np.testing.assert_allclose(got, np.array(expected), rtol=2e-6, atol=0)
    assert got[0] == pytest.approx(1e-5) and got[499] == pytest.approx(0.01, rel=1e-6)
    assert got[8 * spe] == pytest.approx(1e-3, rel=1e-6)


def test_lr_scaling_and_steps_per_epoch():
    cfg = _optim_cfg(scale_lr_by_batch=True, reference_batch=16)
    assert optim.base_learning_rate(cfg, 32) == pytest.approx(0.02)
    assert optim.base_learning_rate(_optim_cfg(), 32) == pytest.approx(0.01)
    assert optim.steps_per_epoch(117266, 16) == 7330
    assert optim.steps_per_epoch(16, 16) == 1 and optim.steps_per_epoch(17, 16) == 2


def test_sgd_recipe_matches_torch():
    """Params through 12 iterations (warm-up + 2 milestones, clipped and unclipped steps)."""
    cfg = _optim_cfg()
    spe, n = 3, 12
    rng = np.random.default_rng(0)
    shapes = {"backbone": {"conv1": {"kernel": (3, 3, 2, 4)},  # frozen
                           "layer2_0": {"conv1": {"kernel": (3, 3, 4, 4)},
                                        "bn1": {"scale": (4,), "bias": (4,)}}},
              "mask_head": {"conv_cls": {"kernel": (3, 3, 4, 5), "bias": (5,)}}}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    trainable = jax.tree.map(lambda _: True, params)
    trainable["backbone"]["conv1"]["kernel"] = False

    flat_p, treedef = jax.tree.flatten(params)
    flat_t = treedef.flatten_up_to(trainable)
    tparams = [torch.nn.Parameter(torch.tensor(p), requires_grad=t)
               for p, t in zip(flat_p, flat_t, strict=True)]
    lrs, opt = _mmengine_lrs(cfg, spe, n, tparams)

    sched = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, global_batch=16)
    tx = optim.build_optimizer(cfg, sched, trainable)
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)
    update = jax.jit(tx.update)
    clipped, worst = 0, 0.0
    for i, lr in enumerate(lrs()):
        scale = 40.0 if i % 2 else 0.5  # alternate norms far above / below max_norm 35
        grads = [rng.normal(size=p.shape).astype(np.float32) * scale for p in flat_p]
        for tp, g in zip(tparams, grads, strict=True):
            tp.grad = torch.tensor(g) if tp.requires_grad else None
        norm = torch.nn.utils.clip_grad_norm_([p for p in tparams if p.requires_grad], 35.0)
        clipped += float(norm) > 35.0
        opt.step()
        assert float(sched(i)) == pytest.approx(lr, rel=2e-6)
        jgrads = jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads])
        updates, state = update(jgrads, state, jparams)
        jparams = jax.tree.map(lambda p, u: p + u, jparams, updates)
        for tp, jp in zip(tparams, jax.tree.leaves(jparams), strict=True):
            worst = max(worst, float(np.abs(np.asarray(jp) - tp.detach().numpy()).max()))
            np.testing.assert_allclose(np.asarray(jp), tp.detach().numpy(), atol=1e-6,
                                       rtol=0, err_msg=f"iteration {i}")
    assert clipped >= n // 2 - 1
    print(f"max |params - torch| over {n} iterations: {worst:.2e}")
    # The frozen leaf never moved (no update, no weight decay).
    np.testing.assert_array_equal(np.asarray(jparams["backbone"]["conv1"]["kernel"]),
                                  params["backbone"]["conv1"]["kernel"])


def test_partition_merge_roundtrip():
    params = {"a": {"x": 1, "y": 2}, "b": {"z": 3}}
    mask = {"a": {"x": True, "y": False}, "b": {"z": False}}
    tr, fr = optim.partition(params, mask)
    assert tr == {"a": {"x": 1}} and fr == {"a": {"y": 2}, "b": {"z": 3}}
    assert optim.merge(tr, fr) == params
