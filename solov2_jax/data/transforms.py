"""TF graph transforms from canonical COCO examples to SOLOv2 training/eval examples.

Reproduces mmdet 3.3.0's `Resize(keep_ratio=True)` / `RandomChoiceResize`, `RandomFlip`,
the data preprocessor's normalise + pad, and the per-instance mask reductions of
`solov2_jax.mask_ops`, inside tf.data. Image pixels come from `preprocess` (OpenCV, as
mmdet); masks are resized with exact TF twins of cv2's nearest rule.

Canonical example (from `coco_builder.read_split`): image uint8 [H, W, 3] RGB, image_id
int64 [], height/width int32 [], boxes float32 [N, 4] xyxy, labels int32 [N], is_crowd
bool [N], masks uint8 [N, H, W] {0, 1}.

Static shapes: an image resized with a (long, short) scale fits in (short, long) if it is
landscape (w >= h, mmdet's AspectRatioBatchSampler convention) and in (long, short)
otherwise; padding to that bound rounded up to `pad_size_divisor` gives exactly 2 bucket
shapes per scale (`bucket_shapes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from solov2_jax.data import preprocess


def _ceil_to(x: int, d: int) -> int:
    return -(-int(x) // d) * d


def bucket_shape(scale: Sequence[int], landscape: bool, divisor: int = 32) -> tuple[int, int]:
    """(Hp, Wp) padded bound of every image resized with `scale` = (long, short)."""
    long_side, short_side = max(scale), min(scale)
    h, w = (short_side, long_side) if landscape else (long_side, short_side)
    return _ceil_to(h, divisor), _ceil_to(w, divisor)


def bucket_shapes(scales: Sequence[Sequence[int]], divisor: int = 32) -> list[tuple[int, int]]:
    """The finite set of padded (Hp, Wp); index = 2 * scale_index + (0 landscape, 1 portrait)."""
    return [bucket_shape(s, land, divisor) for s in scales for land in (True, False)]


def rescale_size(h, w, scale):
    """mmcv.rescale_size for a (long, short) bound, in float64 like Python.

    h, w: int scalars; scale: [2] int (either order). Returns (new_h, new_w) int32 and the
    float64 scale factor min(long/max(h, w), short/min(h, w)); new = int(x * sf + 0.5).
    """
    h = tf.cast(h, tf.float64)
    w = tf.cast(w, tf.float64)
    scale = tf.cast(scale, tf.float64)
    sf = tf.minimum(
        tf.reduce_max(scale) / tf.maximum(h, w), tf.reduce_min(scale) / tf.minimum(h, w)
    )
    new_h = tf.cast(tf.floor(h * sf + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(w * sf + 0.5), tf.int32)
    return new_h, new_w, sf


def nearest_indices(in_size, out_size):
    """cv2 INTER_NEAREST source index per output pixel: min(floor(x / (out/in)), in - 1).

    OpenCV inverts the double ratio out/in (not in/out); doing the same keeps ties exact.
    Returns int32 [out_size].
    """
    inv = 1.0 / (tf.cast(out_size, tf.float64) / tf.cast(in_size, tf.float64))
    x = tf.range(out_size, dtype=tf.float64)
    idx = tf.cast(tf.floor(x * inv), tf.int32)
    return tf.minimum(idx, tf.cast(in_size, tf.int32) - 1)


def resize_image(image, new_h, new_w, flip, mean, std, pad_h, pad_w):
    """uint8 [H, W, 3] RGB -> float32 [pad_h, pad_w, 3]: resized, flipped, normalised, padded.

    mmdet's order and arithmetic: cv2 INTER_LINEAR on uint8 (`preprocess.resize`, run
    through `tf.numpy_function`: OpenCV's fixed-point rounding is part of the pixels), then
    the flip, then (x - mean) / std in float32. Padding (bottom/right) is 0 after
    normalisation, as mmdet's data preprocessor pads.
    """
    x = tf.numpy_function(lambda im, h, w: preprocess.resize(im, (h, w)),
                          [image, new_h, new_w], tf.uint8, stateful=False)
    x = tf.reshape(x, tf.stack([new_h, new_w, 3]))
    x = tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)
    x = (tf.cast(x, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(
        std, tf.float32)
    x = tf.pad(x, [[0, pad_h - new_h], [0, pad_w - new_w], [0, 0]])
    if isinstance(pad_h, int) and isinstance(pad_w, int):
        x = tf.ensure_shape(x, [pad_h, pad_w, 3])
    return x


def batch_canvas(img_shape, divisor: int = 32):
    """mmdet's padded size of a batch: its largest img_shape [..., B, 2] rounded up to
    `divisor`, broadcast back to [..., B, 2] (every image of the batch shares it)."""
    top = tf.reduce_max(img_shape, axis=-2, keepdims=True)
    return tf.broadcast_to((top + divisor - 1) // divisor * divisor, tf.shape(img_shape))


def resize_masks_nearest(masks, new_h, new_w):
    """[N, H, W] -> [N, new_h, new_w], exactly cv2.resize(INTER_NEAREST) per mask."""
    rows = nearest_indices(tf.shape(masks)[1], new_h)
    cols = nearest_indices(tf.shape(masks)[2], new_w)
    return tf.gather(tf.gather(masks, rows, axis=1), cols, axis=2)


def downsample_x4(masks):
    """TF twin of `mask_ops.downsample_x4`: [..., H, W] {0,1} -> [..., H/4, W/4] uint8."""
    m = tf.cast(masks, tf.int32)
    count = (
        m[..., 1::4, 1::4] + m[..., 1::4, 2::4] + m[..., 2::4, 1::4] + m[..., 2::4, 2::4]
    )
    return tf.cast(count >= 2, tf.uint8)


def _center_from_sums(row_sums, col_sums):
    """mmdet's centre of mass from int64 row sums [N, H] and column sums [N, W]."""
    count = tf.reduce_sum(row_sums, axis=-1)
    sum_h = tf.reduce_sum(row_sums * tf.range(tf.shape(row_sums)[-1], dtype=tf.int64), -1)
    sum_w = tf.reduce_sum(col_sums * tf.range(tf.shape(col_sums)[-1], dtype=tf.int64), -1)
    norm = tf.maximum(tf.cast(count, tf.float32), 1e-6)
    return tf.stack([tf.cast(sum_h, tf.float32) / norm, tf.cast(sum_w, tf.float32) / norm], -1)


def center_of_mass(masks):
    """TF twin of `mask_ops.center_of_mass`: [N, H, W] {0,1} -> [N, 2] float32 (h, w)."""
    m = tf.cast(masks, tf.int64)
    return _center_from_sums(tf.reduce_sum(m, axis=-1), tf.reduce_sum(m, axis=-2))


def mask_targets(masks, new_h, new_w, flip, pad_h: int, pad_w: int):
    """Quarter-res targets and centres of the resized, flipped, padded masks.

    Equal to `downsample_x4` / `center_of_mass` of the [N, pad_h, pad_w] full-resolution
    mask, without materialising it: the x4 reduction only reads pixels at rows/cols = 1, 2
    (mod 4), and the row/column sums of a nearest-resized mask are sums of the source mask
    weighted by how many output pixels pick each source row/column (exact in float32:
    every partial sum is an integer < 2**24).

    masks: uint8 [N, H, W]; new_h/new_w: int32 []; flip: bool []; pad_h/pad_w: ints or
    int32 [] tensors, multiples of 4 (the bucket can be picked in-graph).
    Returns gt_masks uint8 [N, pad_h/4, pad_w/4], centers float32 [N, 2], nonempty bool [N].
    """
    h, w = tf.shape(masks)[1], tf.shape(masks)[2]
    rows = nearest_indices(h, new_h)  # [new_h] source row of each output row
    cols = nearest_indices(w, new_w)
    cols = tf.cond(flip, lambda: tf.reverse(cols, [0]), lambda: cols)

    # x4 downsample: output rows 4i+1, 4i+2 (and cols likewise) of the padded canvas.
    # Positions outside the resized image read an appended zero row/column. Each gather
    # runs on the leading (row) axis, where TF copies whole rows; the 2 samples of a
    # block are summed right after each gather, halving the data the next step touches.
    # (Strided slicing is ~20x slower than gathering in TF, hence two gathers per axis.)
    def sample(idx, size, src_size, pad, offset):
        pos = tf.range(pad // 4) * 4 + offset
        src = tf.gather(idx, tf.minimum(pos, size - 1))
        return tf.where(pos < size, src, src_size)

    def gather_pairs(x, idx, size, src_size, pad):  # [N, A, B] -> [N, pad / 4, B]
        return (tf.gather(x, sample(idx, size, src_size, pad, 1), axis=1)
                + tf.gather(x, sample(idx, size, src_size, pad, 2), axis=1))

    m = tf.pad(masks, [[0, 0], [0, 1], [0, 1]])
    half = gather_pairs(m, rows, new_h, h, pad_h)  # [N, pad_h/4, W + 1]
    count = gather_pairs(tf.transpose(half, [0, 2, 1]), cols, new_w, w, pad_w)
    gt_masks = tf.cast(tf.transpose(count, [0, 2, 1]) >= 2, tf.uint8)

    # Centre of mass via row/column sums of the resized mask (padding adds zeros only).
    mf = tf.cast(masks, tf.float32)
    col_mult = tf.math.bincount(cols, minlength=w, maxlength=w, dtype=tf.float32)
    row_mult = tf.math.bincount(rows, minlength=h, maxlength=h, dtype=tf.float32)
    src_row_sums = tf.linalg.matvec(mf, col_mult)  # [N, H]
    src_col_sums = tf.linalg.matvec(mf, row_mult, transpose_a=True)  # [N, W]
    row_sums = tf.cast(tf.gather(src_row_sums, rows, axis=1), tf.int64)  # [N, new_h]
    col_sums = tf.cast(tf.gather(src_col_sums, cols, axis=1), tf.int64)  # [N, new_w]
    centers = _center_from_sums(row_sums, col_sums)
    nonempty = tf.reduce_sum(row_sums, axis=-1) > 0
    return gt_masks, centers, nonempty


def random_flip(seed, flip_prob: float):
    """Stateless Bernoulli(flip_prob) from a [2] int seed."""
    return tf.random.stateless_uniform([], seed=seed) < flip_prob


def _resize_boxes(boxes, h, w, new_h, new_w, flip):
    """mmdet: boxes * float32(new/old) per axis, clip to the image, then horizontal flip."""
    sx = tf.cast(tf.cast(new_w, tf.float64) / tf.cast(w, tf.float64), tf.float32)
    sy = tf.cast(tf.cast(new_h, tf.float64) / tf.cast(h, tf.float64), tf.float32)
    b = boxes * tf.stack([sx, sy, sx, sy])
    fw, fh = tf.cast(new_w, tf.float32), tf.cast(new_h, tf.float32)
    b = tf.clip_by_value(b, 0.0, tf.stack([fw, fh, fw, fh]))
    flipped = tf.stack([fw - b[:, 2], b[:, 1], fw - b[:, 0], b[:, 3]], axis=1)
    return tf.cond(flip, lambda: flipped, lambda: b)


def _pad_instances(x, order, max_instances: int, fill=0):
    """Gathers instances in `order`, then pads/truncates axis 0 to max_instances."""
    x = tf.gather(x, order)[:max_instances]
    pad = max_instances - tf.shape(x)[0]
    paddings = [[0, pad]] + [[0, 0]] * (len(x.shape) - 1)
    return tf.pad(x, paddings, constant_values=fill)


def train_transform(ex, scale, flip, pad_shape, *, mean, std, max_instances: int,
                    return_meta: bool = False):
    """Canonical example -> one training example of `structures.TRAIN_KEYS`.

    scale: [2] int (long, short); flip: bool []; pad_shape: (Hp, Wp) of the bucket (ints or
    int32 [] tensors).
    Instances: non-crowd instances with a non-empty resized mask (gt_valid) come first in
    their original order (mmdet's order, which decides grid-cell overwrites), then the
    rest; the list is truncated/padded to max_instances. `num_truncated` counts valid
    instances that did not fit. return_meta adds scale_factor, flip and the resized
    flipped full-resolution masks (debug/tests only: [N, h, w], original instance order)
    with their ann_ids [N].
    """
    pad_h, pad_w = pad_shape
    h, w = ex["height"], ex["width"]
    new_h, new_w, sf = rescale_size(h, w, scale)
    masks = ex["masks"]
    gt_masks, centers, nonempty = mask_targets(masks, new_h, new_w, flip, pad_h, pad_w)
    valid = nonempty & tf.logical_not(ex["is_crowd"])
    # Stable partition: valid instances first, original order within each group.
    order = tf.argsort(tf.cast(tf.logical_not(valid), tf.int32), stable=True)
    num_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
    boxes = _resize_boxes(ex["boxes"], h, w, new_h, new_w, flip)
    out = {
        "image": resize_image(ex["image"], new_h, new_w, flip, mean, std, pad_h, pad_w),
        "img_shape": tf.stack([new_h, new_w]),
        "ori_shape": tf.stack([tf.cast(h, tf.int32), tf.cast(w, tf.int32)]),
        "image_id": tf.cast(ex["image_id"], tf.int64),
        "gt_boxes": _pad_instances(boxes, order, max_instances),
        "gt_labels": _pad_instances(tf.cast(ex["labels"], tf.int32), order, max_instances),
        "gt_masks": _pad_instances(gt_masks, order, max_instances),
        "gt_centers": _pad_instances(centers, order, max_instances),
        "gt_valid": _pad_instances(valid, order, max_instances, fill=False),
        "num_truncated": tf.maximum(num_valid - max_instances, 0),
    }
    if return_meta:
        full = resize_masks_nearest(masks, new_h, new_w)
        out["meta_masks"] = tf.cond(flip, lambda: tf.reverse(full, [2]), lambda: full)
        out["meta_scale_factor"] = sf
        out["meta_flip"] = flip
        out["meta_ann_ids"] = ex["ann_ids"]
    return out
