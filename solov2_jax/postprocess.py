"""SOLOv2 inference post-processing: mmdet's `SOLOV2Head.predict_by_feat` as one jit program.

mmdet (`mmdet/models/dense_heads/solov2_head.py`) loops over images and works with
variable-length tensors. Here every step has a static shape, so a whole batch runs in one
compiled program that is traced once per input shape:

1. sigmoid; point-NMS: a score survives only where it equals the 2x2 max-pool (stride 1,
   padding 1, last row/col cropped), i.e. the max over itself and its up/left neighbours.
2. candidates = (cell, class) pairs with score > score_thr, **capped at a static
   K = max_candidates by top-k**. The cap is the one departure from mmdet: the result is
   identical to mmdet's whenever the true number of candidates is <= K (the default
   K = 1000 is rarely exceeded by a trained model at score_thr = 0.1). Kept candidates are
   re-ordered by flat index (cell-major, class-minor, as mmdet's `nonzero()`), so the
   stable sorts of Matrix NMS break score ties the same way for every K.
3. mask probs = sigmoid(mask_feats . kernel) (the 1x1 dynamic conv), binary = prob >
   mask_thr, area = sum(binary); candidates with area <= their level's stride are dropped.
4. score *= maskness = sum(prob * binary) / area; Matrix NMS (`matrix_nms.matrix_nms`).
5. for the <= max_per_img survivors: bilinear x4 to the canvas, crop to img_shape,
   bilinear to ori_shape, > mask_thr. The three resamplings are composed into one
   operator per axis (`ops.bilinear_weights` with traced sizes): out = Wy @ M @ Wx^T on a
   static canvas `out_hw` that must be >= every ori_shape of the batch. Composing changes
   float rounding only, so a pixel within ~1e-6 of mask_thr can flip vs. mmdet.

All statics are plain Python values; there are no host callbacks inside the program.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solov2_jax import structures
from solov2_jax.matrix_nms import matrix_nms
from solov2_jax.models import canvas
from solov2_jax.ops import bilinear_weights

_HP = jax.lax.Precision.HIGHEST
_STATICS = (
    "out_hw", "num_classes", "strides", "num_grids", "mask_stride", "nms_pre", "score_thr",
    "mask_thr", "filter_thr", "kernel", "sigma", "max_per_img", "max_candidates",
)


def point_nms(scores: jax.Array) -> jax.Array:
    """mmdet's point NMS on [B, S, S, C] probabilities: zero where not the 2x2 local max.

    `max_pool2d(x, 2, stride=1, padding=1)[:, :, :-1, :-1]` at (i, j) is the max over
    rows i-1..i and columns j-1..j (padding is -inf), so only up/left neighbours count.
    """
    pad = jnp.pad(scores, ((0, 0), (1, 0), (1, 0), (0, 0)), constant_values=-jnp.inf)
    local_max = jnp.maximum(
        jnp.maximum(pad[:, :-1, :-1], pad[:, :-1, 1:]), jnp.maximum(pad[:, 1:, :-1], pad[:, 1:, 1:])
    )
    return jnp.where(local_max == scores, scores, 0.0)


def _single(kernels, scores, strides, feats, img_hw, ori_hw, canvas_hw, *, out_hw, num_classes,
            mask_stride, nms_pre, score_thr, mask_thr, filter_thr, kernel, sigma,
            max_per_img, max_candidates):
    """One image: kernels [P, E], scores [P, C], strides [P], feats [Hf, Wf, E];
    img_hw, ori_hw, canvas_hw: [2] int32."""
    c = num_classes
    flat = scores.reshape(-1)
    k = min(max_candidates, flat.shape[0])
    above = flat > score_thr
    top_vals, top_idx = jax.lax.top_k(jnp.where(above, flat, -1.0), k)
    cand_ok = top_vals > score_thr
    # Back to mmdet's nonzero() order (flat index ascending), padding last.
    key = jnp.where(cand_ok, top_idx, flat.shape[0])
    reorder = jnp.argsort(key, stable=True)
    idx, cand_ok = top_idx[reorder], cand_ok[reorder]
    cell, labels = idx // c, idx % c
    cand_scores = flat[idx]

    # 1x1 dynamic conv: [Hf, Wf, E] x [K, E] -> [K, Hf, Wf].
    probs = jax.nn.sigmoid(jnp.einsum("hwe,ke->khw", feats, kernels[cell], precision=_HP))
    # mmdet's masks span the canvas (feats past it are padding): areas, maskness and
    # Matrix NMS IoUs count canvas pixels only.
    hf, wf = feats.shape[:2]
    feat_hw = canvas_hw // mask_stride
    inside = canvas.valid_mask(feat_hw[None], (hf, wf))[0, :, :, 0]
    binary = (probs > mask_thr) & inside
    area = binary.sum(axis=(1, 2)).astype(jnp.float32)
    keep = cand_ok & (area > strides[cell])
    maskness = jnp.where(binary, probs, 0.0).sum(axis=(1, 2)) / jnp.maximum(area, 1.0)
    cand_scores = cand_scores * maskness

    nms_scores, nms_labels, inds, det_ok = matrix_nms(
        binary, labels, cand_scores, keep, area, nms_pre=nms_pre, max_num=max_per_img,
        kernel=kernel, sigma=sigma, filter_thr=filter_thr,
    )
    kept = probs[jnp.maximum(inds, 0)]  # [M, Hf, Wf]

    # x4 to the canvas, crop to img_shape, resize to ori_shape; composed per axis.
    hp, wp = hf * mask_stride, wf * mask_stride
    ho, wo = out_hw
    wy = jnp.matmul(bilinear_weights(ho, hp, img_hw[0], ori_hw[0]),
                    bilinear_weights(hp, hf, feat_hw[0], canvas_hw[0]), precision=_HP)
    wx = jnp.matmul(bilinear_weights(wo, wp, img_hw[1], ori_hw[1]),
                    bilinear_weights(wp, wf, feat_hw[1], canvas_hw[1]), precision=_HP)
    up = jnp.einsum("oh,mhw,pw->mop", wy, kept, wx, precision=_HP)
    masks = (up > mask_thr) & det_ok[:, None, None]
    return masks, nms_scores, nms_labels, det_ok


@functools.partial(jax.jit, static_argnames=_STATICS)
def postprocess(
    kernel_preds: Sequence[jax.Array],
    cls_preds: Sequence[jax.Array],
    mask_feats: jax.Array,
    img_shape: jax.Array,
    ori_shape: jax.Array,
    canvas_hw: jax.Array | None = None,
    *,
    out_hw: tuple[int, int],
    num_classes: int,
    strides: tuple[int, ...],
    num_grids: tuple[int, ...],
    mask_stride: int = 4,
    nms_pre: int = 500,
    score_thr: float = 0.1,
    mask_thr: float = 0.5,
    filter_thr: float = 0.05,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    max_per_img: int = 100,
    max_candidates: int = 1000,
) -> structures.Detections:
    """mmdet's `predict_by_feat` for a batch, static shapes throughout.

    Args:
      kernel_preds: L arrays [B, S_l, S_l, E] dynamic kernels.
      cls_preds:    L arrays [B, S_l, S_l, C] class logits (pre-sigmoid).
      mask_feats:   [B, Hp/4, Wp/4, E] unified mask features.
      img_shape:    [B, 2] int (h, w) of the resized image inside the padded input.
      ori_shape:    [B, 2] int (h, w) of the original image; each <= out_hw.
      canvas_hw:    [B, 2] int (h, w) of mmdet's padded input (`models.canvas`), a
                    multiple of mask_stride; None: the whole input (Hp, Wp).
      out_hw:       static (Ho, Wo) output canvas.
      the rest:     mmdet's model / test_cfg values (static Python scalars and tuples).

    Returns:
      `structures.Detections` with masks [B, max_per_img, Ho, Wo] (image at
      [:ori_h, :ori_w]), scores, labels and valid [B, max_per_img], in mmdet's order.
    """
    if len(kernel_preds) != len(cls_preds) or len(cls_preds) != len(num_grids):
        raise ValueError("kernel_preds, cls_preds and num_grids need one entry per level")
    for lvl, (cls, s) in enumerate(zip(cls_preds, num_grids, strict=True)):
        if cls.shape[1:] != (s, s, num_classes):
            raise ValueError(f"level {lvl}: cls_preds {cls.shape} != [B, {s}, {s}, {num_classes}]")
    b = mask_feats.shape[0]
    e = kernel_preds[0].shape[-1]
    scores = jnp.concatenate(
        [point_nms(jax.nn.sigmoid(x.astype(jnp.float32))).reshape(b, -1, num_classes)
         for x in cls_preds], axis=1)
    kernels = jnp.concatenate(
        [x.astype(jnp.float32).reshape(b, -1, e) for x in kernel_preds], axis=1)
    # Per-cell level stride, a compile-time constant.
    cell_strides = jnp.asarray(
        np.repeat(np.asarray(strides, np.float32), np.asarray(num_grids) ** 2))
    single = functools.partial(
        _single, out_hw=tuple(out_hw), num_classes=num_classes, mask_stride=mask_stride,
        nms_pre=nms_pre, score_thr=score_thr, mask_thr=mask_thr, filter_thr=filter_thr,
        kernel=kernel, sigma=sigma, max_per_img=max_per_img, max_candidates=max_candidates)
    if canvas_hw is None:
        canvas_hw = jnp.broadcast_to(
            jnp.asarray(mask_feats.shape[1:3], jnp.int32) * mask_stride, (b, 2))
    masks, det_scores, labels, valid = jax.vmap(single, in_axes=(0, 0, None, 0, 0, 0, 0))(
        kernels, scores, cell_strides, mask_feats.astype(jnp.float32),
        jnp.asarray(img_shape, jnp.int32), jnp.asarray(ori_shape, jnp.int32),
        jnp.asarray(canvas_hw, jnp.int32))
    return structures.Detections(masks=masks, scores=det_scores, labels=labels, valid=valid)


def postprocess_fn(test_cfg, model_cfg, out_hw: tuple[int, int]):
    """Binds a config's `test` and `model` sections; returns a jitted
    `f(kernel_preds, cls_preds, mask_feats, img_shape, ori_shape, canvas_hw) -> Detections`."""
    statics = dict(
        out_hw=tuple(int(v) for v in out_hw),
        num_classes=int(model_cfg.num_classes),
        strides=tuple(int(v) for v in model_cfg.strides),
        num_grids=tuple(int(v) for v in model_cfg.num_grids),
        mask_stride=int(model_cfg.mask_stride),
        nms_pre=int(test_cfg.nms_pre),
        score_thr=float(test_cfg.score_thr),
        mask_thr=float(test_cfg.mask_thr),
        filter_thr=float(test_cfg.filter_thr),
        kernel=str(test_cfg.kernel),
        sigma=float(test_cfg.sigma),
        max_per_img=int(test_cfg.max_per_img),
        max_candidates=int(test_cfg.max_candidates),
    )
    return jax.jit(functools.partial(postprocess, **statics))


def encode_rle(mask: np.ndarray) -> dict:
    """[h, w] binary mask -> COCO RLE with `counts` as str (JSON-serialisable)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def detections_to_instances(dets: structures.Detections, ori_shape, *, rle: bool = False):
    """Host side: per image, a list of {'mask', 'label', 'score'} for the valid slots.

    `mask` is a bool array [ori_h, ori_w], or with `rle=True` a COCO RLE dict (pycocotools,
    `counts` decoded to str so the result is JSON-serialisable). Order = mmdet's order.
    """
    masks = np.asarray(dets.masks)
    scores = np.asarray(dets.scores)
    labels = np.asarray(dets.labels)
    valid = np.asarray(dets.valid)
    ori_shape = np.asarray(ori_shape)
    out = []
    for i in range(masks.shape[0]):
        h, w = int(ori_shape[i][0]), int(ori_shape[i][1])
        insts = []
        for k in np.flatnonzero(valid[i]):
            m = masks[i, k, :h, :w]
            insts.append({"mask": encode_rle(m) if rle else m, "label": int(labels[i, k]),
                          "score": float(scores[i, k])})
        out.append(insts)
    return out
