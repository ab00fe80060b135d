"""COCO mask-AP evaluation of SOLOv2 variables, computed as mmdet 3.3.0's CocoMetric does.

    python -m solov2_jax.evaluate --config configs/tiny.py --weights DIR [--split val]
    python -m solov2_jax.evaluate --config configs/tiny.py --workdir DIR [--max-images N]

`--weights` is an orbax directory from `python -m solov2_jax.convert mmdet`; `--workdir`
alone evaluates the latest readable checkpoint of a training run (both through
`checkpoint.load_variables`). Any config value can be overridden
(`--config.test.score_thr=0.05`). `--bbox` adds COCO box AP of the masks' tight boxes
(`bbox_mAP`, ...); `--classwise` adds mmdet's per-class AP table (printed, and written to
eval_<split>.json under 'classwise').

Flow: tf.data eval batches [D, B, ...] -> `predict.Predictor` (the one inference path:
pmapped model + `postprocess` + tight boxes, axis "batch") -> host: per valid image, COCO
RLE per detection -> pycocotools COCOeval(iouType='segm') against the split's original
annotation JSON, with mmdet's settings (catIds in label order, maxDets (100, 300, 1000),
so AP uses 1000 detections; segm results carry no bbox, so instance areas come from the
masks, as mmdet's CocoMetric pops 'bbox' before segm evaluation). mmdet rounds each
metric to 3 decimals; we return full precision.

Compiles: the output canvas `out_hw` is static. It is fixed per orientation (landscape
w >= h / portrait, the same grouping as the input buckets) as the largest original size
of that orientation in the annotation JSON, rounded up to a multiple of 32. Hence at most
2 programs per (model, test) config for the whole process: the pmap function is cached
across `evaluate` calls, so evaluating every epoch does not recompile. Every host
evaluates the whole split on its local devices (no cross-host gather; untested on
several hosts).
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
from absl import logging

from solov2_jax.cli import UserError
from solov2_jax.predict import Predictor, canvas_sizes, predict_batches

METRIC_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # COCOeval.stats[:6]
MAX_DETS = (100, 300, 1000)  # mmdet CocoMetric.proposal_nums
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


class EvaluateError(UserError, RuntimeError):
    """A user-facing problem (missing files, weights not matching the config)."""


def coco_results(instances, image_ids, label_to_cat, iou_type: str = "segm") -> list[dict]:
    """Per-image instances ({'mask': RLE, 'bbox': xyxy, 'label', 'score'}) -> COCO results.

    label_to_cat[label] = original COCO category id. 'segm' results carry no 'bbox' key,
    as in mmdet's segm evaluation (pycocotools then takes areas from the masks); 'bbox'
    results carry the tight box as xywh (mmdet's `xyxy2xywh`) and no mask.
    """
    out = []
    for image_id, insts in zip(image_ids, instances, strict=True):
        for inst in insts:
            res = {"image_id": int(image_id),
                   "category_id": int(label_to_cat[int(inst["label"])]),
                   "score": float(inst["score"])}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in inst["bbox"])
                res["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                counts = inst["mask"]["counts"]
                # JSON-safe: pycocotools gives bytes counts and numpy uint32 sizes.
                res["segmentation"] = {
                    "size": [int(v) for v in inst["mask"]["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
            out.append(res)
    return out


def _classwise(ev, gt, cat_ids) -> list[dict]:
    """mmdet CocoMetric(classwise=True)'s per-category AP (from detectron2), unrounded:
    precision over IoU 0.5:0.95 / 0.5 / 0.75 and area all/s/m/l at the last maxDets;
    NaN (null in JSON) for a category without ground truth."""
    precisions = ev.eval["precision"]  # [iou, recall, cls, area, max dets]
    rows = []
    for idx, cat_id in enumerate(cat_ids):
        def ap(p):
            p = p[p > -1]
            return float(np.mean(p)) if p.size else float("nan")

        rows.append({"category": gt.loadCats(cat_id)[0]["name"],
                     "mAP": ap(precisions[:, :, idx, 0, -1]),
                     "mAP_50": ap(precisions[0, :, idx, 0, -1]),
                     "mAP_75": ap(precisions[5, :, idx, 0, -1]),
                     "mAP_s": ap(precisions[:, :, idx, 1, -1]),
                     "mAP_m": ap(precisions[:, :, idx, 2, -1]),
                     "mAP_l": ap(precisions[:, :, idx, 3, -1])})
    return rows


def classwise_table(rows: list[dict], title: str = "") -> str:
    """mmdet's classwise table as text (values rounded to 3 decimals like mmdet)."""
    head = ("category", "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
    body = [[str(r["category"])] + [f"{round(r[k], 3)}" for k in head[1:]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in body]
    return (title + "\n" if title else "") + "\n".join(lines)


def coco_metrics(gt, results, image_ids, cat_ids, iou_type: str = "segm",
                 classwise: bool = False) -> dict:
    """COCOeval(iou_type) with mmdet CocoMetric's settings; {'<iou_type>_mAP', ...}
    unrounded, plus '<iou_type>_classwise' (per-category rows) with classwise=True.

    gt: pycocotools COCO; image_ids / cat_ids: what is evaluated (cat_ids in label order);
    iou_type 'segm' (results with 'segmentation') or 'bbox' (results with xywh 'bbox').
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from solov2_jax.reporting import captured_stdout

    with captured_stdout("pycocotools") as log:
        if results:
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place
        else:  # loadRes cannot take an empty list; no detections is a valid AP of 0
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                          "categories": list(gt.dataset["categories"])}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.params.catIds = list(cat_ids)
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.params.maxDets = list(MAX_DETS)
        ev.params.iouThrs = IOU_THRS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # The summary table only, without pycocotools' "Running per image evaluation..." lines.
    table = [line for line in log.getvalue().splitlines() if line.lstrip().startswith("Average")]
    logging.info("COCOeval %s, %d images:\n%s", iou_type, len(ev.params.imgIds),
                 "\n".join(table))
    out = {f"{iou_type}_{n}": float(v) for n, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}
    if classwise:
        out[f"{iou_type}_classwise"] = _classwise(ev, gt, cat_ids)
    return out


@functools.lru_cache(maxsize=2)
def _load_gt(path: str, mtime: float):
    from pycocotools.coco import COCO

    from solov2_jax.reporting import captured_stdout

    with captured_stdout("pycocotools"):  # "loading annotations into memory..."
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


def gather_across_processes(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process ([obj] with one).

    `obj` is JSON-serialisable; it travels as padded uint8 arrays through
    `multihost_utils.process_allgather`, so no shared filesystem is needed.
    """
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(
        np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(every[p, :n].tobytes()) for p, n in enumerate(sizes)]


def evaluate(config, variables, *, workdir: str, split: str | None = None,
             max_images: int | None = None, bbox: bool = False,
             classwise: bool = False) -> dict:
    """Mask AP of `variables` ({'params', 'batch_stats'}, unreplicated) on a split.

    Returns {'segm_mAP', 'segm_mAP_50', 'segm_mAP_75', 'segm_mAP_s', 'segm_mAP_m',
    'segm_mAP_l', 'num_images', 'num_detections'}; with bbox=True also 'bbox_mAP', ...
    (COCO box AP of the masks' tight boxes); with classwise=True also
    '<segm|bbox>_classwise' (mmdet's per-category rows, printed as a table). Writes
    <workdir>/eval_<split>.json (metrics + timing) and <workdir>/results_<split>.segm.json
    (+ .bbox.json) (COCO results).
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
    # Several processes: each predicts its slice of every global batch (as training reads
    # its input), and all of them gather every process's COCO results; then each computes
    # the same metrics and process 0 writes the files.
    count, lead = jax.process_count(), jax.process_index() == 0
    ds = pipeline.eval_dataset(builder, config.data, num_local_devices=jax.local_device_count(),
                               process_index=jax.process_index(), process_count=count,
                               split=split)
    pred = Predictor(config, variables)
    image_ids, instances = [], []
    for ids, insts in predict_batches(pred, pipeline.as_numpy_batches(ds),
                                      canvas_sizes(gt.dataset["images"]),
                                      None if max_images is None else -(-max_images // count)):
        image_ids.extend(int(i) for i in ids)
        instances.extend(insts)
    results = coco_results(instances, image_ids, label_to_cat)
    box_results = coco_results(instances, image_ids, label_to_cat, "bbox") if bbox else []
    parts = gather_across_processes([image_ids, results, box_results])
    seconds = time.perf_counter() - t0
    image_ids = sorted(i for p in parts for i in p[0])
    if len(set(image_ids)) != len(image_ids):
        raise RuntimeError("an image was evaluated twice (eval pipeline bug)")
    # By image (stable: each image's detections keep their order), whatever the process
    # count: the same files, and COCOeval's score ties break the same way.
    results = sorted((r for p in parts for r in p[1]), key=lambda r: r["image_id"])
    box_results = sorted((r for p in parts for r in p[2]), key=lambda r: r["image_id"])
    metrics = coco_metrics(gt, results, image_ids, label_to_cat, classwise=classwise)
    if bbox:
        metrics.update(coco_metrics(gt, box_results, image_ids, label_to_cat, "bbox",
                                    classwise=classwise))
    tables = {k: metrics.pop(k) for k in [k for k in metrics if k.endswith("_classwise")]}
    for k, rows in tables.items():
        if lead:
            print(classwise_table(rows, f"{split} {k} (per-class AP)"))
    metrics.update(num_images=len(image_ids), num_detections=len(results))
    if not lead:
        return metrics

    os.makedirs(workdir, exist_ok=True)
    from solov2_jax.checkpoint import atomic_write_json  # temp name + rename, strict JSON

    atomic_write_json(os.path.join(workdir, f"results_{split}.segm.json"), results)
    if bbox:
        atomic_write_json(os.path.join(workdir, f"results_{split}.bbox.json"), box_results)
    extra = {"classwise": {k.rsplit("_", 1)[0]: v for k, v in tables.items()}} if tables else {}
    atomic_write_json(os.path.join(workdir, f"eval_{split}.json"),
                      {**metrics, **extra, "split": split,
                       "annotation_file": os.path.abspath(ann_file),
                       "predict_seconds": seconds, "compiled_programs": pred.num_compiled},
                      indent=1)
    logging.info("eval %s: %d images in %.1fs (%.1f img/s incl. compile), %s", split,
                 len(image_ids), seconds, len(image_ids) / max(seconds, 1e-9), metrics)
    return metrics


def _define_flags(fv, argv):
    from absl import flags

    from solov2_jax import cli

    cli.define_config_flag(fv, argv)  # packaged name or path
    flags.DEFINE_string("weights", None, "orbax dir from `solov2_jax.convert mmdet`",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "training workdir (latest checkpoint is evaluated "
                        "unless --weights); outputs and demo data go here", flag_values=fv)
    flags.DEFINE_string("split", None, "TFDS split; default config.data.eval_split",
                        flag_values=fv)
    flags.DEFINE_integer("max_images", None, "evaluate only this many images", flag_values=fv)
    flags.DEFINE_bool("bbox", False, "also COCO box AP of the masks' tight boxes",
                      flag_values=fv)
    flags.DEFINE_bool("classwise", False, "also mmdet's per-class AP table", flag_values=fv)
    from solov2_jax import backend

    backend.add_flag(fv)  # --backend {auto,cpu,cuda,ixuca}
    backend.add_distributed_flags(fv)  # each process evaluates its share of the split


def _execute(fv) -> dict:
    from ml_collections import config_flags

    if fv.config is None:
        raise EvaluateError("--config is required")
    from solov2_jax.config import check_config

    check_config(fv.config)
    from solov2_jax import backend, reporting

    reporting.setup()  # quiet TF/TFDS/orbax before TensorFlow is imported

    plan = backend.configure(backend.requested(fv, fv.config))  # before JAX initialises
    backend.initialize_distributed(fv)
    backend.start(plan)
    if not fv.weights and not fv.workdir:
        raise EvaluateError("give --weights DIR and/or --workdir DIR")
    config, name = fv.config, config_flags.get_config_filename(fv["config"])
    from solov2_jax.predict import load_weights

    source = os.path.abspath(fv.weights or fv.workdir)
    variables = load_weights(config, source, name)  # converted weights or a training run
    workdir = fv.workdir or source.rstrip(os.sep) + "_eval"
    metrics = evaluate(config, variables, workdir=workdir, split=fv.split,
                       max_images=fv.max_images, bbox=fv.bbox, classwise=fv.classwise)
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str]) -> int:
    """CLI (callable in-process); returns the exit status. `--max-images` and
    `--max_images` both work; user errors are one line (`cli.absl_main`)."""
    from solov2_jax import cli

    def execute(fv, inputs):
        _execute(fv)
        return 0

    return cli.absl_main("solov2-evaluate", __doc__, _define_flags, execute, argv)


def run() -> None:
    """Console-script entry point (`solov2-evaluate`)."""
    from solov2_jax import cli

    cli.console_entry(main)


if __name__ == "__main__":
    run()
