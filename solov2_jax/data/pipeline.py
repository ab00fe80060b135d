"""tf.data train/eval pipelines producing `structures` batches shaped for pmap.

Batches are dicts of arrays with a leading [num_local_devices, per_device_batch] layout.

Static shapes: every image is padded to the bucket of (scale, orientation)
(`transforms.bucket_shapes`), so training compiles at most 2 programs per train scale
(1333x800 -> (800, 1344) landscape, (1344, 800) portrait; mmdet's ms-3x list of 6
scales -> 12) and evaluation at most 2.

One global step = one bucket, on every host. Like mmdet's AspectRatioBatchSampler, images
are grouped by orientation into *global* batches; each host then keeps its own slice
of each global batch. The grouping only reads the image's stored height/width, before
any decoding, and the scale of a step is a stateless function of (seed, step), so all
hosts agree on every step's shape without communicating. The price with several hosts:
each host parses every record (but decodes only its own images). mmdet draws the scale
per image and pads to the batch maximum; drawing it per step is the static-shape
equivalent (each image still sees each scale with equal probability).

Determinism: files are read in stored order, the shuffle has a fixed seed, every map
is deterministic, and the random flip/scale are stateless functions of (seed, element
or step index), so a given seed always yields the same batches.
"""

from __future__ import annotations

import collections
import itertools

import jax
import tensorflow as tf

from solov2_jax.data import coco_builder, preprocess
from solov2_jax.data import transforms as T
from solov2_jax.structures import DATA_AXIS, local_mesh

_SALT_FLIP, _SALT_SCALE = 1, 2


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    return opts


def _stateless_seed(seed: int, salt: int, index):
    return tf.random.experimental.stateless_fold_in(
        tf.constant([seed, salt], tf.int64), tf.cast(index, tf.int64))


def _to_device_layout(batch, num_devices: int, per_device: int):
    """[D * B, ...] -> [D, B, ...] for every array of a batch dict."""
    def split(x):
        return tf.reshape(x, tf.concat([[num_devices, per_device], tf.shape(x)[1:]], 0))

    return {k: split(v) for k, v in batch.items()}


def _keep_for_training(min_size: int, filter_empty_gt: bool):
    """mmdet CocoDataset.filter_data on a raw example.

    mmdet keeps an image if it has any annotation of a known category, crowd and
    degenerate ones included (pycocotools' catToImgs counts every annotation), and
    min(w, h) >= min_size. `num_annotations` is that count, stored before the builder
    skipped anything, so an image whose only annotation is degenerate is kept (with no
    targets) exactly as in mmdet.
    """
    def keep(ex):
        ok = tf.minimum(ex["height"], ex["width"]) >= min_size
        if filter_empty_gt:
            ok &= ex["num_annotations"] > 0
        return ok

    return keep


def _grouped_slices(ds, key_fn, global_batch: int, local_batch: int, process_index: int,
                    pad_last: bool = False):
    """Groups (..., ex) elements by key into global batches; yields this host's slice.

    With pad_last, a final partial group is filled with copies of its first element
    flagged invalid (the element's last component, a bool, is set False).
    """
    def reduce(key, window):
        if pad_last:
            filler = window.take(1).map(lambda *e: (*e[:-1], False)).repeat()
            window = window.concatenate(filler).take(global_batch)
        return window.skip(process_index * local_batch).take(local_batch)

    return ds.group_by_window(key_fn, reduce, window_size=global_batch)


def train_dataset(builder, data_cfg, *, num_local_devices: int, process_index: int = 0,
                  process_count: int = 1, seed: int | None = None, split: str | None = None,
                  extra_keys: bool = False, return_meta: bool = False) -> tf.data.Dataset:
    """Infinite training batches: dicts of `structures.TRAIN_KEYS` as [D, B, ...].

    D = num_local_devices, B = data_cfg.per_device_batch. extra_keys adds `num_truncated`
    [D, B] int32 (valid instances beyond max_instances) and `bucket` [D, B] int32 (index
    into `transforms.bucket_shapes(train_scales)`); return_meta adds the transform's
    debug keys (needs B * D == 1 for the ragged full-resolution masks).
    """
    scales = [tuple(int(v) for v in s) for s in data_cfg.train_scales]
    shapes = tf.constant(T.bucket_shapes(scales, data_cfg.pad_size_divisor), tf.int32)
    scales_t = tf.constant(scales, tf.int32)
    seed = int(data_cfg.seed if seed is None else seed)
    flip_prob = float(data_cfg.flip_prob)
    mean, std = tuple(data_cfg.mean), tuple(data_cfg.std)
    max_instances = int(data_cfg.max_instances)
    per_device = int(data_cfg.per_device_batch)
    local_batch = per_device * num_local_devices
    global_batch = local_batch * process_count

    ds = coco_builder.read_split(builder, split or data_cfg.train_split, decode=False)
    ds = ds.filter(_keep_for_training(int(data_cfg.min_size), bool(data_cfg.filter_empty_gt)))
    ds = ds.shuffle(int(data_cfg.shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()  # k: index of the draw, identical on every host
    ds = _grouped_slices(
        ds, lambda k, ex: tf.cast(ex["width"] < ex["height"], tf.int64),
        global_batch, local_batch, process_index)

    def transform(j, k_ex):
        k, raw = k_ex
        ex = coco_builder.decode_example(raw)
        step = j // local_batch  # this host's stream is step-aligned by construction
        scale_idx = tf.random.stateless_uniform(
            [], _stateless_seed(seed, _SALT_SCALE, step), maxval=len(scales), dtype=tf.int32)
        portrait = tf.cast(ex["width"] < ex["height"], tf.int32)
        bucket = 2 * scale_idx + portrait
        flip = T.random_flip(_stateless_seed(seed, _SALT_FLIP, k), flip_prob)
        out = T.train_transform(
            ex, scales_t[scale_idx], flip, (shapes[bucket][0], shapes[bucket][1]), mean=mean,
            std=std, max_instances=max_instances, return_meta=return_meta)
        if extra_keys or return_meta:
            out["bucket"] = bucket
        else:
            del out["num_truncated"]
        return out

    def with_canvas(b):  # mmdet pads each GPU's batch to its largest image, x32
        b = _to_device_layout(b, num_local_devices, per_device)
        b["canvas"] = T.batch_canvas(b["img_shape"], int(data_cfg.pad_size_divisor))
        return b

    ds = ds.enumerate().map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(with_canvas)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def count_train_images(builder, data_cfg, split: str | None = None) -> int:
    """Images of the split that training uses (after mmdet's filter), as mmdet's dataset
    length: what steps per epoch, and so the epoch milestones, are counted from."""
    ds = coco_builder.read_split(builder, split or data_cfg.train_split, decode=False)
    ds = ds.filter(_keep_for_training(int(data_cfg.min_size), bool(data_cfg.filter_empty_gt)))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def eval_dataset(builder, data_cfg, *, num_local_devices: int, process_index: int = 0,
                 process_count: int = 1, split: str | None = None) -> tf.data.Dataset:
    """Finite eval batches of `structures.EVAL_KEYS` as [D, B, ...] (B = eval_per_device_batch).

    Every image appears exactly once with valid=True, in stored order within each
    orientation; images are grouped by orientation (2 static shapes), and each
    orientation's last global batch is completed with valid=False copies, so every host
    yields the same number of equally shaped batches.
    """
    scale = tuple(int(v) for v in data_cfg.test_scale)
    divisor = int(data_cfg.pad_size_divisor)
    shapes = T.bucket_shapes([scale], divisor)
    mean, std = tuple(data_cfg.mean), tuple(data_cfg.std)
    per_device = int(data_cfg.eval_per_device_batch)
    local_batch = per_device * num_local_devices
    global_batch = local_batch * process_count

    ds = coco_builder.read_split(builder, split or data_cfg.eval_split, decode=False)
    ds = ds.map(lambda raw: (raw, True))
    ds = _grouped_slices(ds, lambda raw, v: tf.cast(raw["width"] < raw["height"], tf.int64),
                         global_batch, local_batch, process_index, pad_last=True)

    def host(data, portrait):  # the Predictor's preprocessing, verbatim
        ex = preprocess.eval_example(preprocess.decode(data), scale=scale, mean=mean, std=std,
                                     input_hw=shapes[int(portrait)], divisor=divisor)
        return ex["image"], ex["img_shape"], ex["ori_shape"], ex["canvas"]

    def transform(raw, valid):
        portrait = raw["width"] < raw["height"]
        image, img_shape, ori_shape, canvas = tf.numpy_function(
            host, [raw["image"], portrait], [tf.float32, tf.int32, tf.int32, tf.int32],
            stateful=False)
        pad = tf.gather(tf.constant(shapes, tf.int32), tf.cast(portrait, tf.int32))
        return {"image": tf.reshape(image, tf.concat([pad, [3]], 0)),
                "img_shape": tf.ensure_shape(img_shape, [2]),
                "ori_shape": tf.ensure_shape(ori_shape, [2]),
                "canvas": tf.ensure_shape(canvas, [2]),
                "image_id": tf.cast(raw["image_id"], tf.int64), "valid": valid}

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(lambda b: _to_device_layout(b, num_local_devices, per_device))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def as_numpy_batches(ds):
    """Iterator of numpy dict batches (tfds.as_numpy without the import)."""
    yield from ds.as_numpy_iterator()


def prefetch_to_device(iterator, size: int = 2, devices=None):
    """Puts each [D, ...] batch onto the D local devices, `size` batches ahead.

    Arrays are sharded along axis 0 (what jax.pmap expects) without the host-side copy
    flax.jax_utils.prefetch_to_device makes.
    """
    mesh = local_mesh(devices)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    queue = collections.deque()

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
