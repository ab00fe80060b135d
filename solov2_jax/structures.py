"""Small data structures passed between stages: model outputs, targets, detections.

Shapes are channels-last. `B` = images per device, `N` = max instances per image,
`L` = number of pyramid levels (5), `S_l` = grid size of level l, `E` = kernel channels,
`C` = number of classes, `Hp, Wp` = padded input size (multiple of 32).

Batches from the input pipeline are plain dicts of arrays (what tf.data yields); the keys
are listed in `TRAIN_KEYS` / `EVAL_KEYS` and documented here once:

  image      [B, Hp, Wp, 3] float32  RGB, normalised with mmdet's mean/std, zero padded
  img_shape  [B, 2] int32            (h, w) after resize, before padding
  ori_shape  [B, 2] int32            (h, w) of the original image
  image_id   [B] int64               COCO image id
  canvas     [B, 2] int32            mmdet's padded input size (h, w), a multiple of 32:
                                     training, the device batch's largest img_shape;
                                     evaluation, the image's own (mmdet tests at batch 1).
                                     The model treats `image` past it as absent.
  valid      [B] bool                False for padding images in the last eval batch
  gt_boxes   [B, N, 4] float32       xyxy in resized-image pixels (after flip)
  gt_labels  [B, N] int32            contiguous labels in [0, C)
  gt_masks   [B, N, Hp/4, Wp/4] uint8  mask targets: `mask_ops.downsample_x4` of the padded
                                     full-resolution mask (== mmcv.imrescale(mask, 1/4))
  gt_centers [B, N, 2] float32       (center_h, center_w): mmdet `center_of_mass` of the
                                     padded full-resolution mask (`mask_ops.center_of_mass`)
  gt_valid   [B, N] bool             a real, non-crowd instance with a non-empty mask
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np

TRAIN_KEYS = (
    "image", "img_shape", "ori_shape", "image_id", "canvas",
    "gt_boxes", "gt_labels", "gt_masks", "gt_centers", "gt_valid",
)
EVAL_KEYS = ("image", "img_shape", "ori_shape", "image_id", "canvas", "valid")

# The data-parallel axis: pmap's axis_name and the mesh axis that batches and replicated
# state are placed on. They must agree, or pmap compiles a second program.
DATA_AXIS = "batch"


def local_mesh(devices=None) -> jax.sharding.Mesh:
    """1-D mesh over this process's devices (default: all local ones), axis DATA_AXIS."""
    devices = jax.local_devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))


@flax.struct.dataclass
class SOLOv2Output:
    """Raw predictions of `models.SOLOv2` for a batch (nothing post-processed).

    backbone:     (C2, C3, C4, C5), each [B, Hp/s, Wp/s, C_s] for s = 4, 8, 16, 32
    fpn:          (P2, P3, P4, P5, P6), each [B, Hp/s, Wp/s, F] for s = 4 .. 64
    mask_feats:   [B, Hp/4, Wp/4, E]  unified mask features
    kernel_preds: L arrays [B, S_l, S_l, E]  dynamic kernels per grid cell
    cls_preds:    L arrays [B, S_l, S_l, C]  category logits (pre-sigmoid)
    """

    backbone: tuple[jax.Array, ...]
    fpn: tuple[jax.Array, ...]
    mask_feats: jax.Array
    kernel_preds: tuple[jax.Array, ...]
    cls_preds: tuple[jax.Array, ...]


@flax.struct.dataclass
class Detections:
    """Post-processed detections with a fixed number of slots `K` (= max_per_img).

    masks:  [B, K, Ho, Wo] bool   masks at the (padded) original-image canvas; the image
                                  occupies [:ori_h, :ori_w]
    scores: [B, K] float32        0 in empty slots
    labels: [B, K] int32          -1 in empty slots
    valid:  [B, K] bool           slot holds a detection
    """

    masks: jax.Array
    scores: jax.Array
    labels: jax.Array
    valid: jax.Array
