"""Static-shape, jit-compiled Matrix NMS equal to mmdet 3.3.0's `mask_matrix_nms`.

mmdet (`mmdet/models/layers/matrix_nms.py`) works on a variable number of masks and
returns a variable number of survivors. Here the input is padded to a fixed `N` with a
validity mask and the output has a fixed number of slots `M` with its own validity mask,
so the function jit-compiles once per shape and `jax.vmap`s over a batch of images.

Step by step, with `P = min(nms_pre, N)` (or `N` without nms_pre):

1. Sort by score, descending; keep the first `P` (mmdet: `torch.sort` + `[:nms_pre]`).
   Invalid entries get score -inf so they sort after every real mask, and take no part
   in any later step (their IoUs are forced to 0, see 3).
2. Intersections by one matmul of the flattened binary masks, [P, HW] @ [HW, P]; with 0/1
   inputs and float32 accumulation the counts are exact integers (< 2**24 pixels).
3. IoU = inter / (area_j + area_i - inter), upper triangle (i < j), same-label pairs only
   -- the same float32 operations in the same order as mmdet. Pairs involving padding
   are set to 0 (padding masks would give 0/0 = NaN).
4. compensate_i = max_k IoU[k, i]; decay_j = min_i f(IoU[i, j]) / f(compensate_i) with
   f(x) = exp(-sigma x^2) (gaussian) or 1 - x (linear), i.e. mmdet's column-wise min over
   the full P x P matrix. Padding rows contribute f(0)/f(0) = 1, which never lowers the
   min because the first (highest-scoring) row already gives a value <= 1.
5. score *= decay; if filter_thr > 0, drop scores < filter_thr; sort again descending;
   keep the first `max_num`.

Ties: `torch.sort(descending=True)` is *not* stable on CPU (verified for torch 2.13: equal
scores come back in an implementation-defined order), so mmdet's order among exactly equal
scores is arbitrary. We break ties deterministically by position (a stable sort: the
earlier input index first). Outputs therefore equal mmdet's whenever no two compared
scores are exactly equal -- always the case in practice for float scores, and in the
tests. Scores can differ from mmdet's by ~1 ulp because XLA's and torch's `exp` differ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KERNELS = ("gaussian", "linear")


def _sort_desc(scores: jax.Array) -> jax.Array:
    """Permutation sorting `scores` [N] descending; ties keep input order (stable)."""
    n = scores.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    # Two sort keys (-score, index) make the order total and deterministic on every backend.
    _, _, perm = jax.lax.sort((-scores, idx, idx), num_keys=2)
    return perm


def _pad_to(x: jax.Array, size: int, fill) -> jax.Array:
    """Pads (or leaves) the leading axis of `x` to `size` with `fill`."""
    if x.shape[0] >= size:
        return x[:size]
    pad = jnp.full((size - x.shape[0],) + x.shape[1:], fill, x.dtype)
    return jnp.concatenate([x, pad], axis=0)


@functools.partial(
    jax.jit, static_argnames=("nms_pre", "max_num", "kernel", "sigma", "filter_thr")
)
def matrix_nms(
    masks: jax.Array,
    labels: jax.Array,
    scores: jax.Array,
    valid: jax.Array | None = None,
    mask_area: jax.Array | None = None,
    *,
    nms_pre: int = -1,
    max_num: int = -1,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    filter_thr: float = -1.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Matrix NMS over padded masks; mmdet's `mask_matrix_nms` with static shapes.

    Args:
      masks:     [N, H, W] bool (or 0/1 numbers) binary masks.
      labels:    [N] int class labels.
      scores:    [N] float scores.
      valid:     [N] bool, False for padding entries (default: all valid).
      mask_area: [N] float areas (default: `masks.sum((1, 2))`), as mmdet's `mask_area`.
      nms_pre, max_num, kernel, sigma, filter_thr: as in mmdet (<= 0 disables the first two
        and the filter). Static.

    Returns:
      (scores [M] float32, labels [M] int32, keep_inds [M] int32, valid [M] bool) where
      `M = max_num` if max_num > 0 else `min(nms_pre, N)` (or N). Slots are in mmdet's
      output order; `keep_inds` index the input. Empty slots: score 0, label -1, index -1.
    """
    if kernel not in KERNELS:
        raise NotImplementedError(f"{kernel} kernel is not supported in matrix nms!")
    n = masks.shape[0]
    for name, x in (("labels", labels), ("scores", scores), ("valid", valid),
                    ("mask_area", mask_area)):
        # JAX would clamp out-of-range gathers silently (wrong scores); mmdet raises.
        if x is not None and tuple(x.shape) != (n,):
            raise ValueError(f"matrix_nms: {name} has shape {tuple(x.shape)}, expected ({n},) "
                             f"for {n} masks")
    if n == 0:  # mmdet returns empty results; here: max_num empty slots
        m = max(max_num, 0)
        return (jnp.zeros((m,), jnp.float32), jnp.full((m,), -1, jnp.int32),
                jnp.full((m,), -1, jnp.int32), jnp.zeros((m,), bool))
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    flat = masks.reshape(n, -1).astype(jnp.float32)
    if mask_area is None:
        mask_area = flat.sum(axis=1)
    mask_area = mask_area.astype(jnp.float32)
    scores = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)

    # 1. sort, keep top nms_pre (padding sorts last, so it is the first to be cut).
    p = min(nms_pre, n) if nms_pre > 0 else n
    order = _sort_desc(scores)[:p]
    s = scores[order]
    ok = valid[order]
    flat = flat[order]
    area = mask_area[order]
    lab = labels.astype(jnp.int32)[order]

    # 2.-3. IoU of every ordered pair, upper triangle, same label, real masks only.
    inter = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    # mmdet: expanded_area + expanded_area.T - inter, i.e. area[j] + area[i] - inter[i, j].
    union = area[None, :] + area[:, None] - inter
    pair_ok = ok[:, None] & ok[None, :]
    iou = jnp.where(pair_ok, inter / jnp.where(pair_ok, union, 1.0), 0.0)
    upper = jnp.triu(jnp.ones((p, p), bool), k=1)
    same = lab[:, None] == lab[None, :]
    decay_iou = jnp.where(upper & same, iou, 0.0)

    # 4. compensation (per row i) and column-wise min of the decay ratios.
    comp = decay_iou.max(axis=0)[:, None]
    if kernel == "gaussian":
        ratio = jnp.exp(-1.0 * sigma * decay_iou**2) / jnp.exp(-1.0 * sigma * comp**2)
    else:
        ratio = (1.0 - decay_iou) / (1.0 - comp)
    decay = ratio.min(axis=0)

    # 5. decay, filter, re-sort, keep top max_num.
    s = s * decay
    if filter_thr > 0:
        ok = ok & (s >= filter_thr)
    s = jnp.where(ok, s, -jnp.inf)
    order2 = _sort_desc(s)
    m = max_num if max_num > 0 else p
    order2 = _pad_to(order2, m, 0)
    in_range = jnp.arange(m) < p
    out_ok = in_range & ok[order2]
    out_scores = jnp.where(out_ok, s[order2], 0.0)
    out_labels = jnp.where(out_ok, lab[order2], -1)
    out_inds = jnp.where(out_ok, order[order2], -1)
    return out_scores, out_labels, out_inds.astype(jnp.int32), out_ok


def batched_matrix_nms(
    masks: jax.Array,
    labels: jax.Array,
    scores: jax.Array,
    valid: jax.Array | None = None,
    mask_area: jax.Array | None = None,
    **static,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`matrix_nms` over a batch: masks [B, N, H, W], labels/scores/valid/mask_area [B, N].

    Keyword arguments are `matrix_nms`'s statics; every output gains a leading [B] axis.
    One image's result never depends on another's (the batch is a plain `jax.vmap`).
    """
    b, n = masks.shape[:2]
    valid = jnp.ones((b, n), bool) if valid is None else valid
    if mask_area is None:
        mask_area = masks.reshape(b, n, -1).astype(jnp.float32).sum(axis=-1)
    fn = functools.partial(matrix_nms, **static)
    return jax.vmap(fn)(masks, labels, scores, valid, mask_area)
