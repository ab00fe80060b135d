"""The demo's pictures: a loss curve of a training run and overlays of validation images.

    python -m solov2_jax.demo_report --config configs/demo.py --workdir workdir/demo \
        [--config.data.coco_dir=...] [--num_images 6]

writes into <workdir>/report/:
  loss_curve.png     training losses (total, mask, class) against the step, from
                     <workdir>/metrics.jsonl, with every evaluation's mask AP and AP50
                     (periodic and final) on the right axis.
  overlays/<id>.png  for the first `num_images` validation images: the model's masks
                     scoring >= `score_thr` (through `predict.Predictor`, the one
                     inference path) beside the
                     ground truth, both drawn by `visualize.draw_instances`, exactly as
                     `solov2-predict` draws its overlays.

The validation images and annotations come from the config's COCO directory (the demo
data generated under <workdir>/data when `data.coco_dir` is empty, as training does).
"""

from __future__ import annotations

import json
import os

import numpy as np

from solov2_jax.cli import UserError

LOSS_KEYS = ("loss", "loss_mask", "loss_cls")


def _value(row: dict, key: str, prefix: str):
    """row[key], or row['<prefix>/<key>'] (clu's flat namespace), or None."""
    for k in (key, f"{prefix}/{key}"):
        if isinstance(row.get(k), int | float):
            return float(row[k])
    return None


def read_metrics(path: str) -> tuple[dict[str, list[tuple[int, float]]], list[dict]]:
    """(train series {name: [(step, value)]} incl. 'lr', evaluations [{'step', metric:
    value}] in file order) of a metrics.jsonl; both the nested ({'eval': {...}}) and the
    flat ('eval/...') rows are read."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (train first: solov2-train --workdir ...)")
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in (*LOSS_KEYS, "lr")}
    evals: list[dict] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n}: not a JSON line") from None
            step = int(row.get("step", 0))
            ev = dict(row["eval"]) if isinstance(row.get("eval"), dict) else {}
            ev.update({k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval/")})
            if ev:
                evals.append({"step": step, **ev})
            for key in series:
                v = _value(row, key, "train")
                if v is not None and np.isfinite(v):
                    series[key].append((step, v))
    if not series["loss"]:
        raise UserError(f"{path}: no training loss rows")
    return series, evals


def plot_loss_curve(series: dict, evals: list[dict], out_path: str, title: str = "") -> str:
    """Losses (log scale) against the step and, on the right axis, the evaluations' mask
    AP (segm_mAP, segm_mAP_50), as a PNG at out_path; returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for key, style in zip(LOSS_KEYS, ("-", "--", ":"), strict=True):
        if series.get(key):
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, style, label=f"train {key}", linewidth=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    points = [e for e in evals if isinstance(e.get("segm_mAP"), int | float)]
    if points:
        ap_ax = ax.twinx()
        for key, marker, color, name in (("segm_mAP", "o", "tab:red", "val mask AP"),
                                         ("segm_mAP_50", "s", "tab:purple", "val mask AP50")):
            xy = [(e["step"], e[key]) for e in points if isinstance(e.get(key), int | float)]
            if xy:
                ap_ax.plot(*zip(*xy, strict=True), marker=marker, color=color,
                           linewidth=1.0, label=name)
        ap_ax.set_ylim(0, 1)
        ap_ax.set_ylabel("validation mask AP")
        more_h, more_l = ap_ax.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.set_title(title or "training loss", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def eval_title(last_eval: dict) -> str:
    if "segm_mAP" not in last_eval:
        return "training loss (not evaluated)"
    return (f"step {last_eval.get('step', '?')}: mask AP {last_eval['segm_mAP']:.3f}, AP50 "
            f"{last_eval.get('segm_mAP_50', float('nan')):.3f} on "
            f"{last_eval.get('num_images', '?')} val images")


def ground_truth(coco, image_id: int, label_of: dict) -> tuple[np.ndarray, np.ndarray]:
    """(masks [N, H, W] bool, labels [N]) of an image's non-crowd annotations."""
    info = coco.imgs[image_id]
    anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
    h, w = int(info["height"]), int(info["width"])
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns]) if anns else \
        np.zeros((0, h, w), bool)
    return masks, np.asarray([label_of[a["category_id"]] for a in anns], np.int64)


def write_overlays(predictor, ann_file: str, out_dir: str, *, num_images: int,
                   min_side: int = 256, score_thr: float = 0.3) -> list[str]:
    """Predictions scoring >= score_thr beside the ground truth, for the first num_images
    images (by id) of a COCO annotation file (images in <coco_dir>/<stem>/); returns the
    PNG paths."""
    from pycocotools.coco import COCO

    from solov2_jax import visualize
    from solov2_jax.data import preprocess
    from solov2_jax.reporting import captured_stdout

    if not os.path.isfile(ann_file):
        raise UserError(f"{ann_file}: no such file")
    with captured_stdout("pycocotools"):  # "loading annotations into memory..."
        coco = COCO(ann_file)
    image_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ann_file))),
                             os.path.basename(ann_file)[len("instances_"):-len(".json")])
    names = [c["name"] for c in predictor.classes]
    label_of = {c["id"]: k for k, c in enumerate(predictor.classes)}
    ids = sorted(coco.imgs)[:num_images]
    paths = [os.path.join(image_dir, coco.imgs[i]["file_name"]) for i in ids]
    preds = predictor.predict(paths) if paths else []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for image_id, path, pred in zip(ids, paths, preds, strict=True):
        rgb = preprocess.read(path)[..., ::-1]
        gt_masks, gt_labels = ground_truth(coco, image_id, label_of)
        drawn = pred.above(score_thr)
        left = visualize.draw_instances(rgb, drawn.masks, drawn.labels, drawn.scores, names,
                                        boxes=drawn.boxes, min_side=min_side)
        right = visualize.draw_instances(rgb, gt_masks, gt_labels, None, names,
                                         min_side=min_side)
        picture = visualize.side_by_side(
            [left, right], [f"prediction (score >= {score_thr:g})", "ground truth"])
        written.append(visualize.save_png(os.path.join(out_dir, f"{image_id:012d}.png"),
                                          picture))
    return written


def make_report(config, workdir: str, *, num_images: int = 6, min_side: int = 256,
                score_thr: float = 0.3, devices=None) -> dict:
    """Writes <workdir>/report/loss_curve.png and overlays/*.png (see the module
    docstring) with the workdir's newest weights (final_variables or the newest
    checkpoint) on `devices` (default: all local);
    returns {'loss_curve': path, 'overlays': [paths], 'eval': {...}}."""
    from solov2_jax import evaluate
    from solov2_jax.data import prepare
    from solov2_jax.predict import Predictor, load_weights

    workdir = os.path.abspath(workdir)
    out = os.path.join(workdir, "report")
    series, evals = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    last_eval = evals[-1] if evals else {}
    curve = plot_loss_curve(series, evals, os.path.join(out, "loss_curve.png"),
                            eval_title(last_eval))
    coco_dir = prepare.coco_dir_from_config(config.data, workdir)
    ann_file = evaluate.annotation_file(coco_dir, config.data.eval_split)
    final = os.path.join(workdir, "final_variables")  # the end of training, when written
    weights = load_weights(config, final if os.path.isdir(final) else workdir)
    predictor = Predictor(config, weights, devices=devices)
    overlays = write_overlays(predictor, ann_file, os.path.join(out, "overlays"),
                              num_images=num_images, min_side=min_side, score_thr=score_thr)
    return {"loss_curve": curve, "overlays": overlays, "eval": last_eval}


def _define_flags(fv, argv):
    from absl import flags

    from solov2_jax import cli

    cli.define_config_flag(fv, argv)  # packaged name or path (the training's config)
    flags.DEFINE_string("workdir", None, "the training workdir (metrics.jsonl, "
                        "checkpoints); the report goes to <workdir>/report", flag_values=fv)
    flags.DEFINE_integer("num_images", 6, "validation images drawn", flag_values=fv)
    flags.DEFINE_float("score_thr", 0.3, "predictions drawn: those scoring at least this",
                       flag_values=fv)
    flags.DEFINE_integer("min_side", 256, "overlays of smaller images are enlarged "
                         "(pixels repeated) to at least this", flag_values=fv)
    from solov2_jax import backend

    backend.add_flag(fv)  # --backend {auto,cpu,cuda,ixuca}


def _execute(fv, inputs) -> int:
    if fv.config is None or not fv.workdir:
        raise UserError("--config and --workdir are required")
    if inputs:
        raise UserError(f"unexpected arguments: {' '.join(inputs)}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # no orbax/TF INFO lines
    from solov2_jax import backend

    backend.start(backend.configure(backend.requested(fv, fv.config)))
    report = make_report(fv.config, fv.workdir, num_images=fv.num_images,
                         min_side=fv.min_side, score_thr=fv.score_thr)
    ev = report["eval"]
    if "segm_mAP" in ev:
        print(f"demo: mask AP {ev['segm_mAP']:.3f}, AP50 {ev.get('segm_mAP_50', 0):.3f} "
              f"on {ev.get('num_images', '?')} validation images")
    print(f"demo: loss curve {report['loss_curve']}")
    print(f"demo: {len(report['overlays'])} overlays (prediction | ground truth) in "
          f"{os.path.dirname(report['overlays'][0]) if report['overlays'] else '-'}")
    return 0


def main(argv: list[str]) -> int:
    """CLI (callable in-process; argv[0] is the program name); returns the exit status."""
    from solov2_jax import cli

    return cli.absl_main("solov2-demo-report", __doc__, _define_flags, _execute, argv)


if __name__ == "__main__":
    from solov2_jax import cli

    cli.console_entry(main)
