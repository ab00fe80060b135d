"""Run a SOLOv2 model on images: the one inference path of evaluate, predict and export.

    python -m solov2_jax.predict --config C --weights W INPUT... --out DIR
    python -m solov2_jax.predict --config C --workdir RUN photos/ 'more/*.jpg' --out DIR

INPUT: image files, directories (their images, not recursive) or globs. For every image
it writes <DIR>/<name>.png (an overlay: each instance's mask in its own colour with its
outline, class name and score, and a legend) and <DIR>/<name>.json (every instance: COCO
RLE mask, bbox xyxy, score, category id and name); and <DIR>/results.json, the COCO
results file of the whole run (segmentation + bbox xywh; `image_id` is the output name,
`file_name` the input's, as the images have no COCO ids). An image that cannot be read is
reported in one line, the run goes on, and the failures are listed at the end (exit 1).
Test thresholds are overridable (`--score-thr`, `--mask-thr`, or any
`--config.test.<name>=`).

Python API:

    from solov2_jax.predict import Predictor
    predictor = Predictor.from_checkpoint("configs/solov2_r50_fpn_1x_coco.py", "weights/r50")
    for p in predictor(["a.jpg", rgb_uint8_array]):
        p.masks, p.boxes, p.labels, p.scores, p.class_names

Preprocessing is `data.preprocess.eval_example`, the function the evaluation tf.data
pipeline calls (mmdet's cv2 decode, keep-ratio uint8 resize, normalisation, padding into
a static input bucket, the image's own x32 canvas). The device program is `infer`: model
+ post-processing + tight boxes of the masks (mmdet's `mask2bbox`: xyxy, x2 = last column
+ 1, an empty mask gives zeros).

Compiled programs (see DESIGN.md): one per (input bucket, output canvas). There are two
input buckets (landscape w >= h and portrait), and the output canvas `out_hw` (where
masks are pasted at the original size) is static, per orientation: it only grows, to the
next step of `OUT_SIDES` that holds the largest original image seen so far. So a set of
photos from one camera compiles 2 programs (1 if all share an orientation), any set at
most 2 x (number of steps crossed); evaluation fixes `out_hw` from the annotation file up
front (2 programs for the whole run, reused by every later evaluation in the process).
The batch dimension is always devices x `data.eval_per_device_batch` (short batches are
padded with invalid copies), so it never causes a compile.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solov2_jax.cli import UserError
from solov2_jax.data import preprocess
from solov2_jax.models import build_model
from solov2_jax.postprocess import encode_rle, postprocess_fn
from solov2_jax.structures import DATA_AXIS as AXIS
from solov2_jax.structures import local_mesh

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Steps of the static output canvas (one side); beyond the last, multiples of 1024.
OUT_SIDES = (256, 384, 512, 640, 768, 1024, 1344, 1536, 2048, 3072, 4096)

# mmdet CocoDataset.METAINFO['classes'] and the COCO category ids in the same order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)


class PredictError(UserError):
    """A user-facing problem: no images, unreadable weights, weights of another config."""


# ---------------------------------------------------------------------------------------
# the device program


def mask_boxes(masks, xp=jnp):
    """Tight boxes of binary masks [..., H, W] -> [..., 4] float32 xyxy (mmdet mask2bbox).

    x1, y1 = first set column/row; x2, y2 = last set column/row + 1; an empty mask gives
    (0, 0, 0, 0). `xp` is jax.numpy (in-graph) or numpy (host).
    """
    masks = xp.asarray(masks).astype(bool)
    h, w = masks.shape[-2:]
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)
    y1, x1 = xp.argmax(rows, axis=-1), xp.argmax(cols, axis=-1)
    y2, x2 = h - xp.argmax(rows[..., ::-1], axis=-1), w - xp.argmax(cols[..., ::-1], axis=-1)
    boxes = xp.stack([x1, y1, x2, y2], axis=-1).astype(xp.float32)
    return xp.where(rows.any(axis=-1)[..., None], boxes, xp.zeros((), xp.float32))


def infer_fn(model_cfg, test_cfg, out_hw: Sequence[int], precision: str = "fp32"):
    """`infer(variables, image, img_shape, ori_shape, canvas) -> dict` for one device.

    Inputs are one device batch (`structures.EVAL_KEYS` shapes, [B, ...]). Returns masks
    [B, K, Ho, Wo] bool (image at [:ori_h, :ori_w]), boxes [B, K, 4] float32 xyxy, scores
    [B, K] float32, labels [B, K] int32 (-1 empty) and valid [B, K] bool, in mmdet's
    order. The same function is pmapped by `Program` and serialised by `export`.
    """
    from solov2_jax import precision as precision_lib

    # train.precision: convolutions in bf16/fp16, post-processing (Matrix NMS) in float32
    model = build_model(model_cfg, dtype=precision_lib.DTYPES[precision])
    post = postprocess_fn(test_cfg, model_cfg, tuple(int(v) for v in out_hw))

    def infer(variables, image, img_shape, ori_shape, canvas):
        out = precision_lib.widen_floats(model.apply(variables, image, canvas))
        dets = post(out.kernel_preds, out.cls_preds, out.mask_feats, img_shape, ori_shape,
                    canvas)
        return {"masks": dets.masks, "boxes": mask_boxes(dets.masks), "scores": dets.scores,
                "labels": dets.labels, "valid": dets.valid}

    return infer


class Program:
    """The pmapped `infer` of one (model, test) config on a fixed set of devices.

    `__call__(variables, batch, out_hw)`: variables replicated (`replicate`), batch numpy
    arrays [D, B, ...] -> the dict of `infer_fn` with masks bit-packed along width,
    [D, B, K, Ho, ceil(Wo / 8)] uint8 (8x less device->host traffic). pmap caches one
    executable per (input shape, out_hw); `num_traces` counts them.
    """

    def __init__(self, model_cfg, test_cfg, devices: Sequence[jax.Device],
                 precision: str = "fp32"):
        self.model_cfg, self.test_cfg, self.precision = model_cfg, test_cfg, precision
        self.devices = tuple(devices)
        self.mesh = local_mesh(self.devices)
        self.num_traces = 0
        self._pmap = jax.pmap(self._forward, axis_name=AXIS, in_axes=(None, 0, 0, 0, 0),
                              static_broadcasted_argnums=(5,), devices=self.devices)

    def _forward(self, variables, image, img_shape, ori_shape, canvas, out_hw):
        self.num_traces += 1  # runs only while tracing
        out = infer_fn(self.model_cfg, self.test_cfg, out_hw, self.precision)(
            variables, image, img_shape, ori_shape, canvas)
        return {**out, "masks": jnp.packbits(out["masks"], axis=-1)}

    def replicate(self, variables):
        """Variables on every device of the program (a replicated NamedSharding on the
        pmap axis's mesh; plain single-device arrays would compile a second program)."""
        return jax.device_put(
            variables, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def __call__(self, variables, batch, out_hw):
        shard = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(AXIS))
        args = [jax.device_put(np.asarray(batch[k]), shard)
                for k in ("image", "img_shape", "ori_shape", "canvas")]
        return self._pmap(variables, *args, tuple(int(v) for v in out_hw))


@functools.lru_cache(maxsize=8)
def _cached_program(model_json: str, test_json: str, device_ids: tuple[int, ...],
                    precision: str = "fp32") -> Program:
    import ml_collections

    by_id = {d.id: d for d in jax.local_devices()}
    return Program(ml_collections.ConfigDict(json.loads(model_json)),
                   ml_collections.ConfigDict(json.loads(test_json)),
                   [by_id[i] for i in device_ids], precision)


def program(config, devices: Sequence[jax.Device] | None = None) -> Program:
    """The process-wide `Program` of `config.model` + `config.test` on `devices` (default:
    all local devices); compiled programs are reused by every Predictor and evaluation."""
    devices = jax.local_devices() if devices is None else list(devices)
    return _cached_program(config.model.to_json(sort_keys=True),
                           config.test.to_json(sort_keys=True), tuple(d.id for d in devices),
                           str(config.train.get("precision", "fp32")) if "train" in config
                           else "fp32")


# ---------------------------------------------------------------------------------------
# classes, weights


def class_info(config) -> list[dict]:
    """[{'id': category id, 'name': str}] in label order for `config`'s classes.

    From the annotation files of `config.data.coco_dir` when set (ids sorted, as the
    dataset builder assigns labels); else COCO's 80 classes when num_classes is 80; else
    the generated demo dataset's classes when their number matches; else class_<label>.
    """
    num = int(config.model.num_classes)
    coco_dir = config.data.get("coco_dir", "")
    if coco_dir and os.path.isdir(os.path.join(coco_dir, "annotations")):
        from solov2_jax.data import coco_builder

        try:
            cats = coco_builder.read_categories(coco_dir)
        except (OSError, ValueError):
            cats = []
        if len(cats) == num:
            return [{"id": int(i), "name": str(n)} for i, n in cats]
    if num == len(COCO_CLASSES):
        return [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES,
                                                      strict=True)]
    if not coco_dir:
        from solov2_jax.data.make_demo import CATEGORIES

        if len(CATEGORIES) == num:
            return [{"id": int(c["id"]), "name": str(c["name"])} for c in CATEGORIES]
    return [{"id": k + 1, "name": f"class_{k}"} for k in range(num)]


def check_variables(config, variables, source: str, config_name: str) -> None:
    """Raises PredictError naming `source` and `config_name` if shapes do not match."""
    from solov2_jax.convert import shape_mismatches, variable_shapes

    problems = shape_mismatches(variables, variable_shapes(build_model(config.model)))
    if problems:
        more = f"; ... and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise PredictError(f"weights at {source} do not match the model of {config_name} "
                           f"({len(problems)} problems: " + "; ".join(problems[:3]) + more
                           + ")")


def load_weights(config, path: str, config_name: str = "the config") -> dict:
    """Variables from converted weights, final_variables, a step or a training workdir
    (`checkpoint.load_variables`), checked against `config`'s model."""
    from solov2_jax import checkpoint

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise PredictError(f"weights not found: {path}")
    variables = checkpoint.load_variables(path)
    check_variables(config, variables, path, config_name)
    return variables


def load_config(path: str, overrides: Sequence[str] = ()):
    """A config file (`configs/<name>.py`) with `a.b=value` overrides, as the CLIs do."""
    from absl import flags

    from solov2_jax import cli

    fv = flags.FlagValues()
    argv = ["predict", f"--config={path}", *(f"--config.{o}" for o in overrides)]
    cli.define_config_flag(fv, argv)  # packaged name or path, as the CLIs
    return cli.parse_flags(fv, argv)


# ---------------------------------------------------------------------------------------
# host side


@dataclasses.dataclass
class Prediction:
    """Detections of one image, in mmdet's order (score-sorted by Matrix NMS).

    masks [N, H, W] bool at the original size; boxes [N, 4] float32 xyxy (tight boxes of
    the masks); labels [N] int; scores [N] float32; class_names / category_ids [N].
    """

    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    class_names: list[str]
    category_ids: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def above(self, score_thr: float) -> Prediction:
        """The detections scoring >= score_thr (what overlays draw: Matrix NMS decays
        duplicates instead of removing them)."""
        keep = np.asarray(self.scores) >= score_thr
        return dataclasses.replace(
            self, masks=self.masks[keep], boxes=self.boxes[keep], labels=self.labels[keep],
            scores=self.scores[keep],
            class_names=[n for n, k in zip(self.class_names, keep, strict=True) if k],
            category_ids=[c for c, k in zip(self.category_ids, keep, strict=True) if k])

    def instances(self) -> list[dict]:
        """JSON-safe instances: COCO RLE mask, bbox xyxy, score, category id/name, label."""
        return [{"category_id": int(c), "category_name": n, "label": int(lab),
                 "score": float(s), "bbox": [float(v) for v in b],
                 "segmentation": encode_rle(m)}
                for m, b, lab, s, n, c in zip(self.masks, self.boxes, self.labels,
                                              self.scores, self.class_names,
                                              self.category_ids, strict=True)]


def output_side(n: int) -> int:
    """The smallest step of OUT_SIDES >= n (multiples of 1024 beyond)."""
    for s in OUT_SIDES:
        if n <= s:
            return s
    return -(-int(n) // 1024) * 1024


def canvas_sizes(images) -> dict[bool, tuple[int, int]]:
    """{portrait: (Ho, Wo)}: max original size per orientation, rounded up to 32.

    images: COCO image dicts with 'height' and 'width' (portrait means width < height).
    """
    out = {}
    for portrait in (False, True):
        hw = [(im["height"], im["width"]) for im in images
              if (im["width"] < im["height"]) == portrait] or [(1, 1)]
        out[portrait] = tuple(int(-(-max(s) // 32) * 32) for s in zip(*hw, strict=True))
    return out


def _unpack(out: dict, ori_shape: np.ndarray, valid: np.ndarray, out_w: int) -> list[dict]:
    """Host: a packed program output [D, B, ...] -> per valid image, numpy detections."""
    flat = {k: np.asarray(v).reshape(-1, *np.shape(v)[2:]) for k, v in out.items()}
    ori_shape, valid = np.asarray(ori_shape).reshape(-1, 2), np.asarray(valid).reshape(-1)
    result = []
    for i in np.flatnonzero(valid):
        h, w = (int(v) for v in ori_shape[i])
        ks = np.flatnonzero(flat["valid"][i])
        masks = np.unpackbits(flat["masks"][i, ks], axis=-1, count=out_w)[:, :h, :w]
        result.append({"masks": masks.astype(bool), "boxes": flat["boxes"][i, ks],
                       "labels": flat["labels"][i, ks].astype(np.int64),
                       "scores": flat["scores"][i, ks]})
    return result


def predict_batches(predictor: Predictor, batches: Iterable[dict], canvases: dict,
                    max_images: int | None = None, *, rle: bool = True):
    """Yields (image_ids [n] int64, instances per image) for the valid images of each batch.

    batches: numpy dicts of `structures.EVAL_KEYS`, [D, B, ...], one orientation each (the
    evaluation pipeline). canvases: {portrait: out_hw}, grown (once) if an image exceeds
    it. Instances are {'mask': COCO RLE (or bool array), 'bbox': xyxy, 'label', 'score'}.
    The next batch is dispatched before the previous one is converted on the host, so
    device compute overlaps with RLE encoding.
    """
    remaining = np.inf if max_images is None else int(max_images)
    pending = None

    def convert(out, batch, valid, out_w):
        ids = np.asarray(batch["image_id"]).reshape(-1)[valid.reshape(-1)]
        images = []
        for d in _unpack(out, batch["ori_shape"], valid, out_w):
            images.append([{"mask": encode_rle(m) if rle else m, "bbox": b.tolist(),
                            "label": int(lab), "score": float(s)}
                           for m, b, lab, s in zip(d["masks"], d["boxes"], d["labels"],
                                                   d["scores"], strict=True)])
        return ids, images

    for batch in batches:
        if remaining <= 0:
            break
        valid = np.asarray(batch["valid"], bool).copy()
        flat = valid.reshape(-1)
        flat[np.cumsum(flat) > remaining] = False  # truncate to max_images
        remaining -= int(flat.sum())
        ori = np.asarray(batch["ori_shape"]).reshape(-1, 2)
        portrait = bool(ori[0, 1] < ori[0, 0])  # a batch holds one orientation
        hw = canvases[portrait]
        if (ori > np.asarray(hw)).any():  # annotation JSON sizes disagree: grow, once
            need = -(-ori.max(0) // 32) * 32
            hw = canvases[portrait] = (max(hw[0], int(need[0])), max(hw[1], int(need[1])))
        out = predictor.run_batch(batch, hw)
        if pending is not None:
            yield convert(*pending)
        pending = (out, batch, valid, hw[1])
    if pending is not None:
        yield convert(*pending)


def _as_bgr(image, bgr: bool, name: str) -> np.ndarray:
    """A numpy image (HWC uint8 RGB, or BGR with bgr=True; HW grey) -> BGR uint8."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise preprocess.ImageError(f"{name}: expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise preprocess.ImageError(f"{name}: expected an [H, W, 3] image, got shape "
                                    f"{arr.shape}")
    arr = arr[..., :3]
    return np.ascontiguousarray(arr if bgr else arr[..., ::-1])


def load_images(images, bgr: bool = False) -> list[tuple[str, np.ndarray]]:
    """File paths and/or numpy images (HWC uint8, RGB unless bgr=True) -> [(name, BGR
    uint8)], as mmdet decodes files; a single path or array is one image. Raises
    `preprocess.ImageError` naming the first one that cannot be used."""
    if isinstance(images, str | os.PathLike | np.ndarray):
        images = [images]
    out = []
    for k, im in enumerate(images):
        if isinstance(im, str | os.PathLike):
            out.append((os.fspath(im), preprocess.read(im)))
        else:
            out.append((f"<image {k}>", _as_bgr(im, bgr, f"<image {k}>")))
    return out


class Predictor:
    """Images in, detections out: host preprocessing, the compiled program, host results.

    Predictor(config, variables): `config` a full ConfigDict (`model`, `test`, `data`),
    `variables` {'params', 'batch_stats'}. `devices` (default: all local devices) run
    data parallel, each on `per_device_batch` (default `data.eval_per_device_batch`)
    images per call. `out_hw`
    {portrait: (Ho, Wo)} fixes the output canvas per orientation (an image larger than it
    is an ImageError); by default it grows with the images (see the module docstring).
    """

    def __init__(self, config, variables, *, devices: Sequence[jax.Device] | None = None,
                 out_hw: dict | None = None, per_device_batch: int | None = None):
        self.config = config
        self.program = program(config, devices)
        self.variables = self.program.replicate(variables)
        data = config.data
        self.scale = tuple(int(v) for v in data.test_scale)
        self.divisor = int(data.pad_size_divisor)
        self.mean, self.std = tuple(data.mean), tuple(data.std)
        from solov2_jax.data.transforms import bucket_shapes

        self.input_shapes = bucket_shapes([self.scale], self.divisor)  # [landscape, portrait]
        self.per_device = int(per_device_batch or data.eval_per_device_batch)
        self.batch_size = self.per_device * len(self.program.devices)
        self.classes = class_info(config)
        self.fixed_out_hw = out_hw is not None
        self.out_hw: dict[bool, tuple[int, int] | None] = {
            p: (tuple(int(v) for v in out_hw[p]) if out_hw else None) for p in (False, True)}

    @classmethod
    def from_checkpoint(cls, config, weights: str, *, overrides: Sequence[str] = (),
                        devices=None) -> Predictor:
        """From a config (ConfigDict, or a config file path with `a.b=v` overrides) and a
        weights directory (converted weights, final_variables or a training workdir)."""
        name = "the config"
        if isinstance(config, str | os.PathLike):
            name = os.fspath(config)
            config = load_config(name, overrides)
        return cls(config, load_weights(config, weights, name), devices=devices)

    @property
    def num_compiled(self) -> int:
        return self.program.num_traces

    def preprocess(self, img_bgr: np.ndarray) -> dict:
        """One BGR uint8 image -> `preprocess.eval_example` in its orientation's bucket."""
        portrait = img_bgr.shape[1] < img_bgr.shape[0]
        return preprocess.eval_example(
            img_bgr, scale=self.scale, mean=self.mean, std=self.std,
            input_hw=self.input_shapes[int(portrait)], divisor=self.divisor)

    def run_batch(self, batch: dict, out_hw: Sequence[int]) -> dict:
        """The compiled program on one [D, B, ...] batch (device arrays, masks packed)."""
        return self.program(self.variables, batch, out_hw)

    def _grow_out_hw(self, portrait: bool, ori: np.ndarray) -> tuple[int, int]:
        cur = self.out_hw[portrait]
        if self.fixed_out_hw:
            big = ori[(ori > np.asarray(cur)).any(axis=1)]
            if len(big):
                raise preprocess.ImageError(
                    f"an image of {big[0][0]}x{big[0][1]} is larger than the fixed output "
                    f"canvas {cur[0]}x{cur[1]}")
            return cur
        need = tuple(output_side(int(v)) for v in ori.max(0))
        if cur is None or need[0] > cur[0] or need[1] > cur[1]:
            cur = need if cur is None else (max(cur[0], need[0]), max(cur[1], need[1]))
            self.out_hw[portrait] = cur
        return cur

    def predict_examples(self, examples: Sequence[dict]) -> list[dict]:
        """Preprocessed examples (one orientation each batch is built from) -> numpy
        detections {'masks', 'boxes', 'labels', 'scores'} per example, in order."""
        results: list[dict | None] = [None] * len(examples)
        groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(ex["image"].shape, []).append(i)
        d = len(self.program.devices)
        for shape, idx in groups.items():
            portrait = shape[1] < shape[0]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                rows = [examples[i] for i in chunk]
                rows += [rows[0]] * (self.batch_size - len(rows))
                batch = {k: np.stack([r[k] for r in rows]).reshape(
                    d, self.per_device, *np.shape(rows[0][k]))
                    for k in ("image", "img_shape", "ori_shape", "canvas")}
                valid = (np.arange(self.batch_size) < len(chunk)).reshape(d, self.per_device)
                hw = self._grow_out_hw(portrait, batch["ori_shape"].reshape(-1, 2))
                out = self.run_batch(batch, hw)
                for i, det in zip(chunk, _unpack(out, batch["ori_shape"], valid, hw[1]),
                                  strict=True):
                    results[i] = det
        return results

    def predict(self, images: Sequence, *, bgr: bool = False) -> list[Prediction]:
        """Images (file paths, or numpy HWC uint8, RGB unless bgr=True) -> Predictions.

        Raises `preprocess.ImageError` naming the first image that cannot be used.
        """
        loaded = load_images(images, bgr)
        examples = [self.preprocess(img) for _, img in loaded]
        sources = [src for src, _ in loaded]
        return [self.to_prediction(det, src) for det, src in
                zip(self.predict_examples(examples), sources, strict=True)]

    __call__ = predict

    def to_prediction(self, det: dict, source: str = "") -> Prediction:
        names = [self.classes[int(lab)]["name"] for lab in det["labels"]]
        ids = [self.classes[int(lab)]["id"] for lab in det["labels"]]
        return Prediction(masks=det["masks"], boxes=np.asarray(det["boxes"], np.float32),
                          labels=det["labels"], scores=np.asarray(det["scores"], np.float32),
                          class_names=names, category_ids=ids, source=source)


# ---------------------------------------------------------------------------------------
# CLI


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, directories (their image files, sorted) and globs -> image paths, in order.

    A missing path, a glob that matches nothing and a directory without images are
    PredictErrors naming it. Explicit files are kept whatever their extension.
    """
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if n.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(item, n)))
            if not found:
                raise PredictError(f"{item}: directory has no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not found:
                raise PredictError(f"{item}: no file matches")
            paths += found
        else:
            raise PredictError(f"{item}: no such file or directory")
    seen, out = set(), []
    for p in paths:
        if os.path.abspath(p) not in seen:
            seen.add(os.path.abspath(p))
            out.append(p)
    return out


def _output_names(paths: Sequence[str]) -> list[str]:
    """Unique output stems: the file's stem, made unique with its parent's name/a counter."""
    names, used = [], set()
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        name, k = stem, 1
        while name in used:
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def run_predict(predictor: Predictor, inputs: Sequence[str], out_dir: str, *,
                progress: bool = True, min_side: int = 0, draw_thr: float = 0.0) -> dict:
    """Writes overlays, per-image JSONs and results.json; returns a summary dict with
    'images', 'instances', 'failed' [(path, message)], 'seconds', 'compiled_programs'.
    Overlays draw the instances scoring >= draw_thr; the JSONs hold every instance."""
    from tqdm import tqdm

    from solov2_jax import visualize
    from solov2_jax.checkpoint import atomic_write, dumps_strict

    paths = expand_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    names = _output_names(paths)
    failed: list[tuple[str, str]] = []
    coco, n_inst, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr)
    step = predictor.batch_size
    for start in range(0, len(paths), step):
        chunk = list(range(start, min(start + step, len(paths))))
        ok, images, examples = [], [], []
        for i in chunk:
            try:
                img = preprocess.read(paths[i])
            except preprocess.ImageError as e:
                failed.append((paths[i], str(e)))
                bar.write(f"solov2-predict: error: {e}", file=sys.stderr)
                continue
            ok.append(i)
            images.append(img)
            examples.append(predictor.preprocess(img))
        dets = predictor.predict_examples(examples) if examples else []
        for i, img, det in zip(ok, images, dets, strict=True):
            pred = predictor.to_prediction(det, paths[i])
            insts = pred.instances()
            n_inst += len(insts)
            h, w = img.shape[:2]
            atomic_write(os.path.join(out_dir, f"{names[i]}.json"), dumps_strict(
                {"file": os.path.abspath(paths[i]), "height": h, "width": w,
                 "instances": insts}, indent=1))
            drawn = pred.above(draw_thr)
            overlay = visualize.draw_instances(
                img[..., ::-1], drawn.masks, drawn.labels, drawn.scores,
                [c["name"] for c in predictor.classes], boxes=drawn.boxes, min_side=min_side)
            visualize.save_png(os.path.join(out_dir, f"{names[i]}.png"), overlay)
            for inst in insts:
                x1, y1, x2, y2 = inst["bbox"]
                coco.append({"image_id": names[i], "file_name": os.path.basename(paths[i]),
                             "category_id": inst["category_id"],
                             "segmentation": inst["segmentation"],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": inst["score"]})
        bar.update(len(chunk))
    bar.close()
    atomic_write(os.path.join(out_dir, "results.json"), dumps_strict(coco))
    return {"images": len(paths) - len(failed), "instances": n_inst, "failed": failed,
            "seconds": time.perf_counter() - t0,
            "compiled_programs": predictor.num_compiled}


def _define_flags(fv, argv):
    from absl import flags

    from solov2_jax import cli

    cli.define_config_flag(fv, argv)  # packaged name or path
    flags.DEFINE_string("weights", None, "converted weights (solov2-convert mmdet), "
                        "final_variables or a checkpoint step directory", flag_values=fv)
    flags.DEFINE_string("workdir", None, "training workdir: its newest readable "
                        "checkpoint is used (when --weights is not given)", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_float("score_thr", None, "overrides config.test.score_thr", flag_values=fv)
    flags.DEFINE_float("mask_thr", None, "overrides config.test.mask_thr", flag_values=fv)
    flags.DEFINE_integer("max_per_img", None, "overrides config.test.max_per_img",
                         flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_float("draw_thr", 0.3, "overlays draw instances scoring at least this "
                       "(after Matrix NMS; the JSONs and results.json keep every instance)",
                       flag_values=fv)
    flags.DEFINE_integer("min_side", 0, "overlays of images with a shorter side are "
                         "enlarged (pixels repeated) to at least this", flag_values=fv)
    from solov2_jax import backend

    backend.add_flag(fv)  # --backend {auto,cpu,cuda,ixuca}


def _execute(fv, inputs: list[str]) -> dict:
    from ml_collections import config_flags

    if fv.config is None:
        raise PredictError("--config is required")
    if not (fv.weights or fv.workdir):
        raise PredictError("give --weights DIR or --workdir DIR")
    if not fv.out:
        raise PredictError("--out DIR is required")
    if not inputs:
        raise PredictError("no INPUT given (image files, directories or globs)")
    config, name = fv.config, config_flags.get_config_filename(fv["config"])
    for flag in ("score_thr", "mask_thr", "max_per_img"):
        if fv[flag].value is not None:
            config.test[flag] = fv[flag].value
    expand_inputs(inputs)  # a missing input fails before the weights are loaded
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # no orbax/TF INFO lines between results
    from solov2_jax import backend

    backend.start(backend.configure(backend.requested(fv, config)))
    variables = load_weights(config, fv.weights or fv.workdir, name)
    predictor = Predictor(config, variables)
    summary = run_predict(predictor, inputs, fv.out, progress=fv.progress,
                          min_side=fv.min_side, draw_thr=fv.draw_thr)
    print(f"solov2-predict: {summary['images']} images, {summary['instances']} instances "
          f"in {summary['seconds']:.1f}s ({summary['compiled_programs']} compiled programs) "
          f"-> {os.path.abspath(fv.out)}")
    if summary["failed"]:
        print(f"solov2-predict: {len(summary['failed'])} images failed:", file=sys.stderr)
        for path, msg in summary["failed"]:
            print(f"  {path}: {msg}", file=sys.stderr)
    return summary


def main(argv: list[str]) -> int:
    """CLI (callable in-process); returns the exit status (1 if an image failed)."""
    from solov2_jax import cli

    def execute(fv, inputs):
        return 1 if _execute(fv, inputs)["failed"] else 0

    return cli.absl_main("solov2-predict", __doc__, _define_flags, execute, argv)


def run() -> None:
    """Console-script entry point (`solov2-predict`)."""
    from solov2_jax import cli

    cli.console_entry(main)


if __name__ == "__main__":
    run()
