"""COCO mask-AP evaluation of SOLOv2 variables, computed as mmdet 3.3.0's CocoMetric does.

    python -m solov2_jax.evaluate --config configs/tiny.py --weights DIR [--split val]
    python -m solov2_jax.evaluate --config configs/tiny.py --workdir DIR [--max-images N]

`--weights` is an orbax directory from `python -m solov2_jax.convert mmdet`; `--workdir`
alone evaluates the latest checkpoint of a training run (`train.restore_variables`). Any
config value can be overridden (`--config.test.score_thr=0.05`).

Flow: tf.data eval batches [D, B, ...] -> one pmap program (model + `postprocess`,
axis "batch") -> host: per valid image, COCO RLE per detection -> pycocotools
COCOeval(iouType='segm') against the split's original annotation JSON, with mmdet's
settings (catIds in label order, maxDets (100, 300, 1000), so AP uses 1000 detections;
results carry no bbox, so instance areas come from the masks). mmdet rounds each metric to
3 decimals; we return full precision.

Compiles: the output canvas `out_hw` is static. It is fixed per orientation (landscape
w >= h / portrait, the same grouping as the input buckets) as the largest original size
of that orientation in the annotation JSON, rounded up to a multiple of 32. Hence at most
2 programs per (model, test) config for the whole process: the pmap function is cached
across `evaluate` calls, so evaluating every epoch does not recompile. Every host
evaluates the whole split on its local devices (no cross-host gather; untested on
several hosts).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from solov2_jax.cli import UserError
from solov2_jax.models import build_model
from solov2_jax.postprocess import encode_rle, postprocess_fn
from solov2_jax.structures import DATA_AXIS as AXIS
from solov2_jax.structures import local_mesh

METRIC_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # COCOeval.stats[:6]
MAX_DETS = (100, 300, 1000)  # mmdet CocoMetric.proposal_nums
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


class EvaluateError(UserError, RuntimeError):
    """A user-facing problem (missing files, weights not matching the config)."""


class Predictor:
    """pmapped model + post-processing for one (model, test) config.

    `__call__(variables, batch, out_hw)`: variables replicated (see `replicate`), batch
    arrays [D, B, ...] -> `Detections` with masks bit-packed along width,
    [D, B, K, Ho, ceil(Wo / 8)] uint8 (8x less device->host traffic), and scores/labels/
    valid [D, B, K]. `num_traces` counts compilations (one per distinct input shape/out_hw).
    """

    def __init__(self, model_cfg, test_cfg):
        self.model_cfg, self.test_cfg = model_cfg, test_cfg
        self.model = build_model(model_cfg)
        self.num_traces = 0
        self._pmap = jax.pmap(self._forward, axis_name=AXIS, in_axes=(None, 0, 0, 0),
                              static_broadcasted_argnums=(4,))

    def _forward(self, variables, image, img_shape, ori_shape, out_hw):
        self.num_traces += 1  # runs only while tracing
        out = self.model.apply(variables, image)
        dets = postprocess_fn(self.test_cfg, self.model_cfg, out_hw)(
            out.kernel_preds, out.cls_preds, out.mask_feats, img_shape, ori_shape)
        return dets.replace(masks=jnp.packbits(dets.masks, axis=-1))

    def __call__(self, variables, batch, out_hw):
        mesh = local_mesh()
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
        args = [jax.device_put(batch[k], shard) for k in ("image", "img_shape", "ori_shape")]
        return self._pmap(variables, *args, tuple(int(v) for v in out_hw))


@functools.lru_cache(maxsize=8)
def _cached_predictor(model_json: str, test_json: str) -> Predictor:
    import ml_collections

    return Predictor(ml_collections.ConfigDict(json.loads(model_json)),
                     ml_collections.ConfigDict(json.loads(test_json)))


def predictor(config) -> Predictor:
    """The process-wide `Predictor` of `config.model` + `config.test` (compiled once)."""
    return _cached_predictor(config.model.to_json(sort_keys=True),
                             config.test.to_json(sort_keys=True))


def replicate(variables):
    """Puts a variables pytree on every local device with a replicated NamedSharding.

    The mesh axis is the pmap axis; with plain (single-device) arrays pmap would compile
    a second program for the same shapes.
    """
    mesh = local_mesh()
    return jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


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


def _to_instances(dets, ori_shape, valid, out_w: int) -> list[list[dict]]:
    """Host: packed `Detections` [D, B, ...] -> per valid image, list of instances.

    Same format as `postprocess.detections_to_instances(rle=True)`, unpacking only the
    occupied slots.
    """
    packed, scores, labels, ok = (np.asarray(x).reshape(-1, *np.shape(x)[2:]) for x in
                                  (dets.masks, dets.scores, dets.labels, dets.valid))
    ori_shape, valid = ori_shape.reshape(-1, 2), valid.reshape(-1)
    out = []
    for i in np.flatnonzero(valid):
        h, w = (int(v) for v in ori_shape[i])
        insts = []
        for k in np.flatnonzero(ok[i]):
            m = np.unpackbits(packed[i, k], axis=-1, count=out_w)[:h, :w]
            insts.append({"mask": encode_rle(m), "label": int(labels[i, k]),
                          "score": float(scores[i, k])})
        out.append(insts)
    return out


def predict_batches(pred: Predictor, variables, batches, canvases, max_images=None):
    """Yields (image_ids [n] int64, instances per image) for the valid images of each batch.

    batches: numpy dicts of `structures.EVAL_KEYS`, [D, B, ...], one orientation each.
    The next batch is dispatched before the previous one is converted on the host, so
    device compute overlaps with RLE encoding.
    """
    variables = replicate(variables)
    remaining = np.inf if max_images is None else int(max_images)
    pending = None
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
        dets = pred(variables, batch, hw)
        if pending is not None:
            yield _convert(*pending)
        pending = (dets, batch, valid, hw[1])
    if pending is not None:
        yield _convert(*pending)


def _convert(dets, batch, valid, out_w):
    ids = np.asarray(batch["image_id"]).reshape(-1)[valid.reshape(-1)]
    return ids, _to_instances(dets, np.asarray(batch["ori_shape"]), valid, out_w)


def coco_results(instances, image_ids, label_to_cat) -> list[dict]:
    """Per-image instances ({'mask': RLE, 'label', 'score'}) -> COCO result dicts.

    label_to_cat[label] = original COCO category id. No 'bbox' key, as in mmdet's segm
    evaluation (pycocotools then takes areas from the masks).
    """
    out = []
    for image_id, insts in zip(image_ids, instances, strict=True):
        for inst in insts:
            counts = inst["mask"]["counts"]
            # JSON-safe: pycocotools gives bytes counts and numpy uint32 sizes.
            rle = {"size": [int(v) for v in inst["mask"]["size"]],
                   "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
            out.append({"image_id": int(image_id),
                        "category_id": int(label_to_cat[int(inst["label"])]),
                        "segmentation": rle, "score": float(inst["score"])})
    return out


def coco_metrics(gt, results, image_ids, cat_ids) -> dict[str, float]:
    """COCOeval('segm') with mmdet CocoMetric's settings; {'segm_mAP', ...} unrounded.

    gt: pycocotools COCO; image_ids / cat_ids: what is evaluated (cat_ids in label order).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if results:
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place
        else:  # loadRes cannot take an empty list; no detections is a valid AP of 0
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                          "categories": list(gt.dataset["categories"])}
            dt.createIndex()
        ev = COCOeval(gt, dt, "segm")
        ev.params.catIds = list(cat_ids)
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.params.maxDets = list(MAX_DETS)
        ev.params.iouThrs = IOU_THRS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logging.info("COCOeval segm:\n%s", log.getvalue())
    return {f"segm_{n}": float(v) for n, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}


@functools.lru_cache(maxsize=2)
def _load_gt(path: str, mtime: float):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def annotation_file(coco_dir: str, split: str) -> str:
    """<coco_dir>/annotations/instances_<stem>.json of a TFDS split name."""
    from solov2_jax.data import coco_builder

    try:
        stems = coco_builder.discover_splits(coco_dir)
    except FileNotFoundError as e:
        raise EvaluateError(str(e)) from e
    if split not in stems:
        raise EvaluateError(f"no annotation file for split '{split}' in {coco_dir}/annotations "
                            f"(found splits: {sorted(stems)})")
    return os.path.join(coco_dir, "annotations", f"instances_{stems[split]}.json")


def evaluate(config, variables, *, workdir: str, split: str | None = None,
             max_images: int | None = None) -> dict:
    """Mask AP of `variables` ({'params', 'batch_stats'}, unreplicated) on a split.

    Returns {'segm_mAP', 'segm_mAP_50', 'segm_mAP_75', 'segm_mAP_s', 'segm_mAP_m',
    'segm_mAP_l', 'num_images', 'num_detections'}; writes <workdir>/eval_<split>.json
    (metrics + timing) and <workdir>/results_<split>.segm.json (COCO results).
    """
    from solov2_jax.data import coco_builder, pipeline, prepare

    split = split or config.data.eval_split
    # The annotation file first: a wrong split fails before any dataset is built.
    ann_file = annotation_file(prepare.coco_dir_from_config(config.data, workdir), split)
    _, builder, _ = prepare.dataset_from_config(config.data, workdir)
    if split not in builder.info.splits:
        raise EvaluateError(f"split '{split}' was not built in {builder.data_path}")
    gt = _load_gt(os.path.abspath(ann_file), os.path.getmtime(ann_file))
    cats = sorted(coco_builder.category_info(builder), key=lambda c: c["label"])
    prepare.check_num_classes(cats, int(config.model.num_classes), f"dataset {builder.data_path}")
    label_to_cat = [c["id"] for c in cats]

    t0 = time.perf_counter()
    ds = pipeline.eval_dataset(builder, config.data, num_local_devices=jax.local_device_count(),
                               process_index=0, process_count=1, split=split)
    pred = predictor(config)
    image_ids, instances = [], []
    for ids, insts in predict_batches(pred, variables, pipeline.as_numpy_batches(ds),
                                      canvas_sizes(gt.dataset["images"]), max_images):
        image_ids.extend(int(i) for i in ids)
        instances.extend(insts)
    seconds = time.perf_counter() - t0
    if len(set(image_ids)) != len(image_ids):
        raise RuntimeError("an image was evaluated twice (eval pipeline bug)")
    results = coco_results(instances, image_ids, label_to_cat)
    metrics = coco_metrics(gt, results, image_ids, label_to_cat)
    metrics.update(num_images=len(image_ids), num_detections=len(results))

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"results_{split}.segm.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
        json.dump({**metrics, "split": split, "annotation_file": os.path.abspath(ann_file),
                   "predict_seconds": seconds, "compiled_programs": pred.num_traces}, f, indent=1)
    logging.info("eval %s: %d images in %.1fs (%.1f img/s incl. compile), %s", split,
                 len(image_ids), seconds, len(image_ids) / max(seconds, 1e-9), metrics)
    return metrics


def check_variables(config, variables, source: str, config_name: str) -> None:
    """Raises EvaluateError naming `source` and `config_name` if shapes do not match."""
    from solov2_jax.convert import shape_mismatches, variable_shapes

    problems = shape_mismatches(variables, variable_shapes(build_model(config.model)))
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise EvaluateError(f"weights at {source} do not match the model of {config_name} "
                            f"({len(problems)} problems):\n  " + "\n  ".join(problems[:10]) + more)


def _define_flags(fv, argv):
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py", flag_values=fv,
                                    sys_argv=argv)
    flags.DEFINE_string("weights", None, "orbax dir from `solov2_jax.convert mmdet`",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "training workdir (latest checkpoint is evaluated "
                        "unless --weights); outputs and demo data go here", flag_values=fv)
    flags.DEFINE_string("split", None, "TFDS split; default config.data.eval_split",
                        flag_values=fv)
    flags.DEFINE_integer("max_images", None, "evaluate only this many images", flag_values=fv)


def _execute(fv) -> dict:
    from ml_collections import config_flags

    if fv.config is None:
        raise EvaluateError("--config is required")
    if not fv.weights and not fv.workdir:
        raise EvaluateError("give --weights DIR and/or --workdir DIR")
    config, name = fv.config, config_flags.get_config_filename(fv["config"])
    if fv.weights:
        from solov2_jax.convert import load_variables

        source = os.path.abspath(fv.weights)
        if not os.path.isdir(source):
            raise EvaluateError(f"weights directory not found: {source}")
        variables = load_variables(source)
        workdir = fv.workdir or source.rstrip(os.sep) + "_eval"
    else:
        try:  # lazy: train imports this module
            from solov2_jax.train import restore_variables
        except ImportError as e:
            raise EvaluateError(f"cannot restore a training checkpoint: {e}") from e
        source = workdir = os.path.abspath(fv.workdir)
        variables = restore_variables(workdir)
    check_variables(config, variables, source, name)
    metrics = evaluate(config, variables, workdir=workdir, split=fv.split,
                       max_images=fv.max_images)
    print(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str]) -> int:
    """CLI on its own flag registry (callable in-process); returns the exit status."""
    from absl import flags

    # absl spells flags with underscores; accept the documented `--max-images` too.
    argv = [a.replace("--max-images", "--max_images", 1) if a.startswith("--max-images")
            else a for a in argv]
    fv = flags.FlagValues()
    _define_flags(fv, argv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(__doc__ + "\nflags:\n" + fv.get_help())
        return 0
    from solov2_jax import cli

    def parse_and_execute(args):
        cli.parse_flags(fv, args)
        _execute(fv)
        return 0

    # User errors: one `solov2-evaluate: error: ...` line (--debug shows the traceback).
    return cli.guarded("solov2-evaluate", parse_and_execute, argv)


def run() -> None:
    """Console-script entry point (`solov2-evaluate`)."""
    from absl import app

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_nothing)


def _parse_nothing(argv):
    from absl import flags

    flags.FLAGS(argv[:1])  # absl's own flags stay at defaults; ours parse in main()
    return argv


if __name__ == "__main__":
    run()
