"""SOLOv2 training losses (sigmoid focal + dice), matching mmdet 3.3.0 `loss_by_feat`.

loss_cls  = focal_weight * sum(focal(cls_logits, one_hot(labels))) / (num_pos + 1 + eps)
            over all cells of all levels and all C classes (background = all-zero row);
loss_mask = sum over positive (cell, instance) pairs of dice_weight * dice(sigmoid(<kernel
            at the cell, mask_feats>), instance's quarter-res mask) / num_pos,
            or 0 * sum(mask_feats) when num_pos == 0 (keeps a finite, zero gradient).

num_pos is the number of UNIQUE positive cells. `normalization`:
  'per_device' (mmdet): counted over the images on this device only (mmdet does not
      all-reduce it, so every GPU normalises by its own count);
  'global': the count is all-reduced over `axis_name` and each device divides by the
      device MEAN, like mmdet's `reduce_mean(num_pos)` in FCOS/ATSS, with the +1 of the
      focal denominator counted once for the whole batch:
          loss_mask_d = dice_sum_d / (psum(num_pos) / D)
          loss_cls_d  = focal_sum_d / ((psum(num_pos) + 1 + eps) / D)
      so the MEAN over devices of these losses (what a pmean of gradients optimises)
      equals mmdet's loss computed on the whole global batch on one device.

Mask logits are computed only for the fixed-capacity positive list: the P kernels are
gathered ([B, P, E]) and contracted with mask_feats ([B, h, w, E]) in one einsum; the
target of each pair is the instance's quarter-resolution mask gathered by index (never a
per-positive copy). Pairs dropped by overflow (see targets.py) are missing from the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from solov2_jax.models import canvas
from solov2_jax.precision import at_least_float32
from solov2_jax.targets import SOLOv2Targets

# mmdet's weight_reduce_loss adds float32 eps to avg_factor.
_F32_EPS = float(jnp.finfo(jnp.float32).eps)


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, *, gamma: float = 2.0, alpha: float = 0.25
) -> jax.Array:
    """Elementwise mmdet `py_sigmoid_focal_loss` (no reduction); same shapes, float32."""
    x = at_least_float32(logits)
    t = targets.astype(x.dtype)
    p = jax.nn.sigmoid(x)
    pt = (1 - p) * t + p * (1 - t)  # (1 - p_t) of the paper, as mmdet names it
    # integer_pow keeps gamma=2 exact and its gradient finite at pt == 0.
    mod = jax.lax.integer_pow(pt, int(gamma)) if float(gamma).is_integer() else pt**gamma
    weight = (alpha * t + (1 - alpha) * (1 - t)) * mod
    # torch binary_cross_entropy_with_logits: (1 - t) * x - log_sigmoid(x).
    bce = (1 - t) * x - jax.nn.log_sigmoid(x)
    return bce * weight


def dice_loss(
    mask_logits: jax.Array, mask_targets: jax.Array, *, eps: float = 1e-3,
    valid: jax.Array | None = None,
) -> jax.Array:
    """mmdet DiceLoss (use_sigmoid, naive_dice=False), unweighted, per mask.

    mask_logits [..., h, w], mask_targets [..., h, w] (any dtype, {0,1}) -> [...] float32:
    1 - 2 * sum(p * t) / ((sum(p^2) + eps) + (sum(t^2) + eps)). `valid` (broadcastable
    bool) restricts the sums to mmdet's canvas: pixels past it do not exist there.
    """
    p = jax.nn.sigmoid(at_least_float32(mask_logits))
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    t = mask_targets.astype(p.dtype)
    a = jnp.sum(p * t, axis=(-2, -1))
    b = jnp.sum(p * p, axis=(-2, -1)) + eps
    c = jnp.sum(t * t, axis=(-2, -1)) + eps
    return 1 - 2 * a / (b + c)


def positive_mask_logits(
    kernel_preds: Sequence[jax.Array], mask_feats: jax.Array, pos_cells: jax.Array
) -> jax.Array:
    """Dynamic 1x1 conv of the kernels at the positive cells.

    kernel_preds: L arrays [B, S_l, S_l, E]; mask_feats [B, h, w, E]; pos_cells [B, P]
    flat indices into the level-concatenated grid -> [B, P, h, w] float32 logits.
    """
    b, e = mask_feats.shape[0], mask_feats.shape[-1]
    flat = jnp.concatenate([k.reshape(b, -1, e) for k in kernel_preds], axis=1)  # [B, G, E]
    kernels = jnp.take_along_axis(flat, pos_cells[:, :, None], axis=1)  # [B, P, E]
    return jnp.einsum("bpe,bhwe->bphw", kernels, mask_feats)


def solov2_loss(
    kernel_preds: Sequence[jax.Array],
    cls_preds: Sequence[jax.Array],
    mask_feats: jax.Array,
    targets: SOLOv2Targets,
    gt_masks: jax.Array,
    canvas_hw: jax.Array | None = None,
    *,
    num_classes: int,
    dice_weight: float = 3.0,
    dice_eps: float = 1e-3,
    focal_gamma: float = 2.0,
    focal_alpha: float = 0.25,
    focal_weight: float = 1.0,
    normalization: str = "per_device",
    axis_name: str | None = None,
    mask_stride: int = 4,
) -> dict[str, jax.Array]:
    """SOLOv2 losses of the images on this device.

    kernel_preds: L arrays [B, S_l, S_l, E]; cls_preds: L arrays [B, S_l, S_l, C] logits;
    mask_feats [B, h, w, E]; targets: batched `SOLOv2Targets` (fields [B, ...]);
    gt_masks [B, N, h, w] uint8 quarter-resolution instance masks; canvas_hw [B, 2] int
    mmdet's padded input size per image (None: the whole h*4 x w*4), over which the
    dice sums run.
    Returns float32 scalars: loss (= loss_cls + loss_mask), loss_cls, loss_mask,
    num_pos (unique positive cells on this device), num_overflow (dropped pairs).
    """
    if normalization not in ("per_device", "global"):
        raise ValueError(f"unknown normalization {normalization!r}")
    if normalization == "global" and axis_name is None:
        raise ValueError("normalization='global' needs the pmap/shard_map axis_name")
    b = mask_feats.shape[0]

    num_pos = jnp.sum(targets.num_pos).astype(jnp.float32)
    if normalization == "global":
        num_dev = jax.lax.psum(1, axis_name)
        total = jax.lax.psum(num_pos, axis_name)
        mask_norm = total / num_dev
        cls_norm = (total + 1 + _F32_EPS) / num_dev
    else:
        total = num_pos
        mask_norm = num_pos
        cls_norm = num_pos + 1 + _F32_EPS

    # Mask branch: one logit map per positive pair, target gathered by instance index.
    logits = positive_mask_logits(kernel_preds, mask_feats, targets.pos_cells)
    pair_targets = jnp.take_along_axis(
        gt_masks, targets.pos_instances[:, :, None, None], axis=1
    )  # [B, P, h, w] uint8
    valid = None
    if canvas_hw is not None:
        valid = canvas.valid_mask(canvas.level(canvas_hw, mask_stride),
                                  mask_feats.shape[1:3])[:, None, :, :, 0]  # [B, 1, h, w]
    per_pair = dice_weight * dice_loss(logits, pair_targets, eps=dice_eps,
                                       valid=valid)  # [B, P]
    dice_sum = jnp.sum(jnp.where(targets.pos_valid, per_pair, 0.0))
    loss_mask = jnp.where(
        total > 0,
        dice_sum / jnp.where(total > 0, mask_norm, 1.0),
        0.0 * jnp.sum(at_least_float32(mask_feats)),
    )

    # Category branch: one-hot over C classes; label num_classes gives an all-zero row.
    flat_cls = jnp.concatenate(
        [c.reshape(b, -1, num_classes) for c in cls_preds], axis=1
    )  # [B, G, C]
    onehot = targets.labels[:, :, None] == jnp.arange(num_classes, dtype=jnp.int32)
    focal = sigmoid_focal_loss(flat_cls, onehot, gamma=focal_gamma, alpha=focal_alpha)
    loss_cls = focal_weight * jnp.sum(focal) / cls_norm

    return dict(
        loss=loss_cls + loss_mask,
        loss_cls=loss_cls,
        loss_mask=loss_mask,
        num_pos=num_pos,
        num_overflow=jnp.sum(targets.num_overflow).astype(jnp.float32),
    )


def loss_kwargs(config, axis_name: str | None = None) -> dict:
    """Plain keyword arguments of `solov2_loss` from a full config (outside jit)."""
    lc = config.loss
    return dict(
        num_classes=int(config.model.num_classes),
        dice_weight=float(lc.dice_weight),
        dice_eps=float(lc.dice_eps),
        focal_gamma=float(lc.focal_gamma),
        focal_alpha=float(lc.focal_alpha),
        focal_weight=float(lc.focal_weight),
        normalization=str(lc.normalization),
        axis_name=axis_name if lc.normalization == "global" else None,
        mask_stride=int(config.model.mask_stride),
    )
