"""mmdet's SOLOv2 optimiser recipe as optax: torch-exact clipping, SGD and mmengine LR schedule.

mmdet 3.3.0 trains with `OptimWrapper(SGD(lr, momentum=0.9, weight_decay=1e-4),
clip_grad=dict(max_norm=35, norm_type=2))` and two chained mmengine schedulers:
`LinearLR(start_factor=warmup_ratio, by_epoch=False, begin=0, end=warmup_iters)` and
`MultiStepLR(milestones, gamma, by_epoch=True)`. One optimiser step does

    g  <- g * min(1, max_norm / (||g||_2 + 1e-6))      clip_grad_norm_ (trainable grads)
    d  <- g + wd * p                                    torch SGD, weight decay on ALL
    buf <- momentum * buf + d   (buf = d at step 0)     trainable params (BN/GN affine,
    p  <- p - lr(i) * buf                               biases), dampening 0, no nesterov

Frozen parameters (stem + layer1, `requires_grad=False` in mmdet) get no update, no weight
decay and do not enter the clip norm: `build_optimizer` routes them to `set_to_zero`.

Steps per epoch: mmdet's `DefaultSampler(round_up=True)` + `AspectRatioBatchSampler`
give ceil(ceil(N / world) / per_gpu) = ceil(N / global_batch) batches for the usual
sizes; we use `ceil(num_images / global_batch)` with N = the images that survive the
training filter (`filter_empty_gt`, `min_size`; COCO train2017: 117266 of 118287), as
mmdet's dataset length is counted after filtering.

A step whose batch has no positive cell leaves the kernel branch untouched
(`keep_kernel_branch`), as torch's SGD skips parameters without a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    """Iterations of one epoch: ceil(num_images / global_batch) (mmdet's sampler)."""
    return max(1, math.ceil(int(num_images) / int(global_batch)))


def base_learning_rate(optim_cfg, global_batch: int) -> float:
    """config.optim.lr, linearly scaled by global_batch / reference_batch if asked.

    mmdet's `auto_scale_lr` (disabled by default) does the same with base_batch_size=16.
    """
    lr = float(optim_cfg.lr)
    if optim_cfg.get("scale_lr_by_batch", False):
        lr *= global_batch / float(optim_cfg.reference_batch)
    return lr


def lr_factor(step, *, warmup_iters: int, warmup_ratio: float,
              milestone_steps: tuple[int, ...], gamma: float):
    """Multiplier of the base lr at 0-indexed iteration `step` (jnp or Python int).

    mmengine's LinearLR(begin=0, end=W) is stepped after every iteration; its chainable
    update telescopes to r + (1 - r) * min(i, W - 1) / (W - 1) at iteration i (total_iters
    = end - begin - 1, so the factor reaches exactly 1 at i = W - 1, not W). MultiStepLR
    (by epoch, stepped after each epoch) multiplies by gamma once per milestone epoch m,
    i.e. from iteration m * steps_per_epoch on. Both act on the same param-group lr in
    place, so the factors multiply.
    """
    step = jnp.asarray(step, jnp.float32)
    if warmup_iters > 1:
        t = jnp.minimum(step, warmup_iters - 1) / (warmup_iters - 1)
        warm = warmup_ratio + (1.0 - warmup_ratio) * t
    elif warmup_iters == 1:  # total_iters = 0: only iteration 0 is scaled
        warm = jnp.where(step < 1, warmup_ratio, 1.0)
    else:
        warm = jnp.ones_like(step)
    passed = sum((step >= m).astype(jnp.float32) for m in milestone_steps)
    return warm * jnp.power(jnp.float32(gamma), passed)


def learning_rate_schedule(optim_cfg, *, steps_per_epoch: int,
                           global_batch: int) -> Callable[[Any], jax.Array]:
    """optax schedule: iteration (0-indexed count of updates) -> learning rate."""
    base = base_learning_rate(optim_cfg, global_batch)
    kw = dict(warmup_iters=int(optim_cfg.warmup_iters),
              warmup_ratio=float(optim_cfg.warmup_ratio),
              milestone_steps=tuple(int(m) * steps_per_epoch for m in optim_cfg.milestones),
              gamma=float(optim_cfg.gamma))
    return lambda step: base * lr_factor(step, **kw)


class ClipState(NamedTuple):
    """clip_grad_norm_ keeps no state."""


def clip_grad_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_(max_norm, norm_type=2) on the whole update tree.

    Unlike `optax.clip_by_global_norm` (g * max_norm / ||g|| only when ||g|| > max_norm),
    torch always scales by min(1, max_norm / (||g|| + 1e-6)).
    """
    def init_fn(params):
        del params
        return ClipState()

    def update_fn(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def build_optimizer(optim_cfg, schedule, trainable: Any) -> optax.GradientTransformation:
    """mmdet's SGD recipe for a full params tree; `trainable` is a matching bool tree.

    Chain order matters and is torch's: clip (grads only), then add wd * p, then
    momentum trace (buf = m * buf + d, zero-initialised so buf_0 = d as in torch), then
    -lr(count) with count = number of updates applied so far.
    """
    sgd = optax.chain(
        clip_grad_norm_torch(float(optim_cfg.grad_clip_norm)),
        optax.add_decayed_weights(float(optim_cfg.weight_decay)),
        optax.trace(decay=float(optim_cfg.momentum), nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable)
    return optax.multi_transform({"trainable": sgd, "frozen": optax.set_to_zero()}, labels)


# mmdet's `mask_head.kernel_convs.*` and `mask_head.conv_kernel.*`: the only parameters
# that the loss reaches through the positive cells alone.
KERNEL_BRANCH = ("kernel_convs_", "conv_kernel")


def is_kernel_branch(path) -> bool:
    """Whether a pytree key path (params or optimiser state) is in the kernel branch."""
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return "mask_head" in names and any(n.startswith(KERNEL_BRANCH) for n in names)


def keep_kernel_branch(skip, new, old):
    """`new` with its kernel-branch leaves replaced by `old`'s where `skip` is true.

    Applied to params and to the optimiser state (momentum), this is torch SGD's handling
    of a parameter whose `.grad` is None. Step counters and every other leaf come from
    `new`; the two trees must have the same structure.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, n, o: jnp.where(skip, o, n) if is_kernel_branch(path) else n, new, old)


def partition(params: dict, trainable: dict) -> tuple[dict, dict]:
    """Splits a nested params dict into (trainable, frozen) nested dicts by the mask."""
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trainable)
    train = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`."""
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)
