"""On-device SOLOv2 grid assignment, reproducing mmdet 3.3.0 `_get_targets_single` exactly.

Why on device (inside the jitted train step) and from compact host summaries:
  (a) the host ships, per instance, the quarter-resolution mask (`mask_ops.downsample_x4`)
      and its full-resolution centre of mass (`mask_ops.center_of_mass`); shipping the
      padded full-resolution masks (N x 1344 x 800 per image) instead would cost 16x the
      transfer and device memory;
  (b) the assignment itself is a few hundred scalar ops per instance, which XLA handles
      easily next to the network;
  (c) mmdet materialises one mask copy per positive cell, a variable-size structure; here
      the positives are a fixed-capacity list of (cell, instance) pairs and the dice loss
      (`losses.py`) gathers the instance's quarter-resolution mask by index instead.

Exactness. mmdet computes a cell as `trunc((c / L) / (1 / S))` in float32 (a python float
with a float32 tensor stays float32) and the scale as `sqrt(w * h)` in float32. XLA rewrites
division by a constant into a multiplication by its reciprocal (and TPUs divide
approximately), which moves a few cell boundaries. Both maps are monotone in their input,
so each is a step function whose step points are computed once on the host in numpy
float32 (IEEE, identical to torch); on device they become exact comparisons:
`cell(c) = #{k : c >= t_k}`, `lo <= sqrt(a) <= hi  <=>  a_lo <= a < a_hi`. The sqrt is
IEEE (correctly rounded, as numpy and CUDA `sqrtf`); torch's CPU sqrt can be 1 ulp off, so
a box whose sqrt(w*h) lies within 1 ulp of a range bound may differ from mmdet on CPU.

Positive list order (`pos_*`, capacity P = max_positives): mmdet's `pos_index` order, i.e.
level, then instance index, then the cells of the instance's region in row-major order; a
cell covered by two instances appears twice (once per instance). Unused slots have
`pos_valid=False`, cell 0 and instance 0. On overflow the first P pairs in that order are
kept and `num_overflow` counts the dropped ones (the dropped pairs are missing from the
dice loss; labels, `pos_mask` and `num_pos` stay exact).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SOLOv2Targets:
    """Targets of one image (or a batch: every field gets a leading [B]).

    G = sum_l S_l^2 (levels concatenated, each row-major over its S_l x S_l grid).
    labels:        [G] int32  class of each cell; num_classes = background
    pos_mask:      [G] bool   cell is positive (unique cells)
    pos_cells:     [P] int32  flat cell index in [0, G) of each positive pair
    pos_instances: [P] int32  ground-truth index in [0, N) of each pair
    pos_valid:     [P] bool   slot holds a pair
    num_pos:       []  int32  number of unique positive cells (= pos_mask.sum())
    num_overflow:  []  int32  pairs that did not fit in P
    """

    labels: jax.Array
    pos_mask: jax.Array
    pos_cells: jax.Array
    pos_instances: jax.Array
    pos_valid: jax.Array
    num_pos: jax.Array
    num_overflow: jax.Array


def _first_f32_where(pred: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    """Smallest float32 x >= 0 with pred(x)[k] true, for k < n (pred monotone in x).

    Binary search over the bit patterns of non-negative float32 (ordered like uint32),
    vectorised over k; returns +inf where pred never holds below inf.
    """
    lo = np.zeros(n, np.uint32)  # pred is false below lo, true at hi
    hi = np.full(n, 0x7F800000, np.uint32)  # +inf
    while np.any(lo < hi):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        ok = pred(mid.view(np.float32))
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid + 1, lo)
    return lo.view(np.float32)


@functools.cache
def cell_thresholds(length: int, num_grid: int) -> np.ndarray:
    """[S] float32 t_k (k = 1..S): torch `trunc((c / length) / (1. / S)) >= k <=> c >= t_k`."""
    ks = np.arange(1, num_grid + 1, dtype=np.float32)
    inv = np.float32(1.0 / num_grid)

    def pred(x):
        with np.errstate(over="ignore"):
            return np.trunc((x / np.float32(length)) / inv) >= ks

    return _first_f32_where(pred, num_grid)


@functools.cache
def area_bounds(lower: float, upper: float) -> tuple[float, float]:
    """(a_lo, a_hi): float32 `lower <= sqrt(a) <= upper  <=>  a_lo <= a < a_hi` (a >= 0)."""
    lo = np.float32(lower)
    hi_next = np.nextafter(np.float32(upper), np.float32(np.inf))
    bounds = np.array([lo, hi_next], np.float32)
    t = _first_f32_where(lambda a: np.sqrt(a) >= bounds, 2)
    return float(t[0]), float(t[1])


@functools.cache
def cell_threshold_table(num_lengths: int, unit: int, num_grid: int) -> np.ndarray:
    """[num_lengths, S] float32: row k - 1 is `cell_thresholds((k * unit), S)`.

    The canvas length is traced (one per image), so every canvas length the static input
    allows (multiples of the mask stride) gets its thresholds, searched all at once.
    """
    lengths = np.arange(1, num_lengths + 1, dtype=np.float32)[:, None] * np.float32(unit)
    ks = np.arange(1, num_grid + 1, dtype=np.float32)[None, :]
    inv = np.float32(1.0 / num_grid)
    lengths, ks = (np.broadcast_to(a, (num_lengths, num_grid)).reshape(-1) for a in (lengths, ks))

    def pred(x):
        with np.errstate(over="ignore"):
            return np.trunc((x / lengths) / inv) >= ks

    return _first_f32_where(pred, lengths.size).reshape(num_lengths, num_grid)


def _cell(coord: jax.Array, thresholds) -> jax.Array:
    """[N] float32 -> [N] int32 cell index (0 for negative coords; capped at S)."""
    return jnp.sum(coord[:, None] >= jnp.asarray(thresholds)[None, :], axis=1, dtype=jnp.int32)


def solov2_targets(
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_centers: jax.Array,
    gt_valid: jax.Array,
    canvas_hw: jax.Array | None = None,
    *,
    featmap_hw: tuple[int, int],
    num_classes: int,
    scale_ranges: Sequence[tuple[float, float]],
    num_grids: Sequence[int],
    pos_scale: float = 0.2,
    mask_stride: int = 4,
    max_positives: int = 512,
) -> SOLOv2Targets:
    """Grid targets of ONE image (vmap for a batch; see `batch_targets`).

    gt_boxes [N, 4] float32 xyxy, gt_labels [N] int, gt_centers [N, 2] float32
    (center_h, center_w), gt_valid [N] bool (N >= 1, padded); featmap_hw = mask-feature
    (h, w) = padded input size / mask_stride; canvas_hw [2] int32: mmdet's padded input
    (a multiple of mask_stride, <= featmap_hw * mask_stride), whose size mmdet divides
    into the S x S grid (`models.canvas`); None: featmap_hw * mask_stride.
    """
    boxes = gt_boxes.astype(jnp.float32)
    n = boxes.shape[0]
    up_h, up_w = featmap_hw[0] * mask_stride, featmap_hw[1] * mask_stride
    if canvas_hw is not None:  # row of the threshold table for this canvas length
        units = jnp.asarray(canvas_hw, jnp.int32) // mask_stride - 1
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = box_w * box_h
    # Same float32 op order as mmdet: (0.5 * w) * pos_scale.
    pos_w = 0.5 * box_w * jnp.float32(pos_scale)
    pos_h = 0.5 * box_h * jnp.float32(pos_scale)
    ch, cw = gt_centers[:, 0].astype(jnp.float32), gt_centers[:, 1].astype(jnp.float32)
    inst = jnp.arange(n, dtype=jnp.int32)

    labels_l, pos_mask_l, cells_l, insts_l, ok_l = [], [], [], [], []
    offset = 0
    for (lower, upper), s in zip(scale_ranges, num_grids, strict=True):
        a_lo, a_hi = area_bounds(float(lower), float(upper))
        in_level = gt_valid & (area >= a_lo) & (area < a_hi)
        if canvas_hw is None:
            th, tw = cell_thresholds(up_h, s), cell_thresholds(up_w, s)
        else:
            th = jnp.asarray(cell_threshold_table(featmap_hw[0], mask_stride, s))[units[0]]
            tw = jnp.asarray(cell_threshold_table(featmap_hw[1], mask_stride, s))[units[1]]
        coord_h, coord_w = _cell(ch, th), _cell(cw, tw)
        top = jnp.maximum(_cell(ch - pos_h, th), coord_h - 1)
        down = jnp.minimum(jnp.minimum(s - 1, _cell(ch + pos_h, th)), coord_h + 1)
        left = jnp.maximum(_cell(cw - pos_w, tw), coord_w - 1)
        right = jnp.minimum(jnp.minimum(s - 1, _cell(cw + pos_w, tw)), coord_w + 1)

        # Labels: mmdet writes instances in index order, so a cell keeps the label of the
        # highest-index instance covering it.
        grid = jnp.arange(s, dtype=jnp.int32)
        rows = (grid[None, :] >= top[:, None]) & (grid[None, :] <= down[:, None])  # [N, S]
        cols = (grid[None, :] >= left[:, None]) & (grid[None, :] <= right[:, None])
        cover = in_level[:, None, None] & rows[:, :, None] & cols[:, None, :]  # [N, S, S]
        last = jnp.max(jnp.where(cover, inst[:, None, None], -1), axis=0)  # [S, S]
        lab = jnp.where(last >= 0, gt_labels.astype(jnp.int32)[jnp.maximum(last, 0)],
                        num_classes)
        labels_l.append(lab.reshape(-1))
        pos_mask_l.append((last >= 0).reshape(-1))

        # Pairs: up to 3x3 cells per instance, enumerated (instance, row, col) = mmdet order.
        d = jnp.arange(3, dtype=jnp.int32)
        r = top[:, None, None] + d[None, :, None]  # [N, 3, 1]
        c = left[:, None, None] + d[None, None, :]  # [N, 1, 3]
        ok = in_level[:, None, None] & (r <= down[:, None, None]) & (c <= right[:, None, None])
        cells_l.append((offset + r * s + c).reshape(-1))
        insts_l.append(jnp.broadcast_to(inst[:, None, None], ok.shape).reshape(-1))
        ok_l.append(ok.reshape(-1))
        offset += s * s

    labels = jnp.concatenate(labels_l)
    pos_mask = jnp.concatenate(pos_mask_l)
    ok = jnp.concatenate(ok_l)
    # Stable compaction of the valid candidates into the first slots (order preserved).
    rank = jnp.cumsum(ok.astype(jnp.int32)) - 1
    dest = jnp.where(ok & (rank < max_positives), rank, max_positives)  # P = dropped
    pos_cells = jnp.zeros(max_positives, jnp.int32).at[dest].set(
        jnp.concatenate(cells_l), mode="drop")
    pos_instances = jnp.zeros(max_positives, jnp.int32).at[dest].set(
        jnp.concatenate(insts_l), mode="drop")
    pos_valid = jnp.zeros(max_positives, bool).at[dest].set(True, mode="drop")
    total = jnp.sum(ok, dtype=jnp.int32)
    return SOLOv2Targets(
        labels=labels,
        pos_mask=pos_mask,
        pos_cells=pos_cells,
        pos_instances=pos_instances,
        pos_valid=pos_valid,
        num_pos=jnp.sum(pos_mask, dtype=jnp.int32),
        num_overflow=jnp.maximum(total - max_positives, 0),
    )


def batch_targets(
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_centers: jax.Array,
    gt_valid: jax.Array,
    canvas_hw: jax.Array | None = None,
    **kwargs,
) -> SOLOv2Targets:
    """`solov2_targets` over a batch: inputs [B, N, ...] (canvas_hw [B, 2]) -> every
    target field [B, ...]."""
    fn = functools.partial(solov2_targets, **kwargs)
    if canvas_hw is None:
        return jax.vmap(fn)(gt_boxes, gt_labels, gt_centers, gt_valid)
    return jax.vmap(fn)(gt_boxes, gt_labels, gt_centers, gt_valid, canvas_hw)


def target_kwargs(config, featmap_hw: tuple[int, int]) -> dict:
    """Plain keyword arguments of `solov2_targets` from a full config (outside jit)."""
    m = config.model
    return dict(
        featmap_hw=(int(featmap_hw[0]), int(featmap_hw[1])),
        num_classes=int(m.num_classes),
        scale_ranges=tuple((float(lo), float(hi)) for lo, hi in m.scale_ranges),
        num_grids=tuple(int(s) for s in m.num_grids),
        pos_scale=float(m.pos_scale),
        mask_stride=int(m.mask_stride),
        max_positives=int(config.loss.max_positives),
    )
