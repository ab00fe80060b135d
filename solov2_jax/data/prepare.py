"""Command line: build the TFDS dataset of a local COCO-format directory and report skips.

    solov2-prepare --coco_dir /data/coco --data_dir /data/tfds [--name coco] [--noprogress]

(or `python -m solov2_jax.data.prepare`; absl flags like every solov2 CLI, so
`--coco-dir`, `--no-progress` are accepted as well).

Without `--coco-dir` the synthetic demo dataset (`solov2_jax.data.make_demo`) is written
to `<data-dir>/demo_coco` first and prepared under the name `demo_coco`. Preparing an
already prepared dataset only reports the summary stored at preparation time. What is
skipped versus what raises an error is tabulated in `solov2_jax.data.coco_builder`.
"""

from __future__ import annotations

import os
import sys

DEMO_NAME = "demo_coco"

# Why each skip reason happens, printed next to its count.
REASONS = {
    "missing_image_file": "image listed in the JSON but its file does not exist",
    "unreadable_image": "image file cannot be decoded (corrupt, truncated, unsupported)",
    "image_size_mismatch": "image file size differs from the JSON width/height",
    "annotations_of_skipped_images": "annotations dropped with their skipped image",
    "degenerate_box": "bbox w<1 or h<1 or area<=0 (mmdet drops these)",
    "box_outside_image": "bbox does not intersect the image (mmdet drops these)",
    "invalid_polygon": "no polygon part with >= 3 points (instance dropped)",
    "polygon_parts_dropped": "polygon parts with < 3 points removed (instance kept)",
}


def ensure_demo(data_dir: str) -> str:
    """The demo COCO directory under `data_dir`, generated on first use."""
    from solov2_jax.data.make_demo import make_demo

    coco_dir = os.path.join(data_dir, DEMO_NAME)
    # make_demo writes every file atomically and this JSON last, so a complete, parseable
    # val JSON means complete demo data; anything else (an older interrupted run) is
    # regenerated instead of failing every later run.
    if not _complete_demo(coco_dir):
        make_demo(coco_dir)
    return coco_dir


def _complete_demo(coco_dir: str) -> bool:
    import json

    for stem in ("train2017", "val2017"):
        path = os.path.join(coco_dir, "annotations", f"instances_{stem}.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        images = data.get("images") if isinstance(data, dict) else None
        if not images or not all(os.path.isfile(os.path.join(coco_dir, stem, im["file_name"]))
                                 for im in images):
            return False
    return True


def check_num_classes(categories: list, num_classes: int, where: str) -> None:
    """The dataset's categories must be exactly the model's classes: a label >= num_classes
    would silently be background, and labels the data lacks could not be evaluated."""
    from solov2_jax.cli import UserError

    if len(categories) != int(num_classes):
        names = ", ".join(str(c["name"]) for c in categories[:10])
        raise UserError(f"{where} has {len(categories)} categories ({names}"
                        f"{', ...' if len(categories) > 10 else ''}) but "
                        f"model.num_classes is {num_classes}; set "
                        f"--config.model.num_classes={len(categories)} or use matching data")


def check_for_training(builder, summary: dict, data_cfg, num_classes: int) -> None:
    """Before any training work: categories vs num_classes, and a train split that
    exists and holds annotated instances."""
    from solov2_jax.cli import UserError
    from solov2_jax.data import coco_builder

    where = f"dataset {builder.data_path}"
    check_num_classes(coco_builder.category_info(builder), num_classes, where)
    split = data_cfg.train_split
    if split not in builder.info.splits:
        raise UserError(f"{where} has no split '{split}' (splits: "
                        f"{sorted(builder.info.splits)}; not built: "
                        f"{summary.get('skipped_splits') or {}})")
    stats = (summary.get("splits") or {}).get(split) or {}
    images = builder.info.splits[split].num_examples
    if images == 0 or stats.get("instances", 1) == 0:
        raise UserError(f"train split '{split}' of {where} has {images} images and "
                        f"{stats.get('instances', 0)} annotated instances: nothing to train "
                        f"on (see the skip summary of `solov2-prepare`)")


def coco_dir_from_config(data_cfg, workdir: str) -> str:
    """config.data.coco_dir, or the demo data generated under <workdir>/data when empty."""
    return data_cfg.coco_dir or ensure_demo(os.path.join(workdir, "data"))


def dataset_from_config(data_cfg, workdir: str):
    """(coco_dir, builder, summary) of a config's `data` section.

    The COCO dir per `coco_dir_from_config`; the TFDS build goes to config.data.data_dir,
    or <workdir>/tfds. Training and evaluation share this rule, so an evaluation finds
    the data its training used.
    """
    from solov2_jax.data import coco_builder

    coco_dir = coco_dir_from_config(data_cfg, workdir)
    data_dir = data_cfg.data_dir or os.path.join(workdir, "tfds")
    builder, summary = coco_builder.prepare(coco_dir, data_dir, progress=False)
    return coco_dir, builder, summary


def format_summary(summary: dict, name: str = "") -> str:
    """Human-readable report of `coco_builder.prepare`'s summary."""
    state = "reused (already prepared)" if summary.get("already_prepared") else "prepared"
    lines = [f"{name or 'dataset'} {state} at {summary.get('data_path', '?')}"]
    for split, reason in sorted((summary.get("skipped_splits") or {}).items()):
        lines.append(f"  split {split}: NOT built: {reason}")
    for split, s in sorted((summary.get("splits") or {}).items()):
        lines.append(f"  split {split}: kept {s['images']} images, {s['instances']} "
                     f"instances ({s['crowd']} crowd)")
        if not s["images"] or not s["instances"]:
            lines.append("    WARNING: no images or no instances: unusable for training")
        skipped = s.get("skipped") or {}
        if not skipped:
            lines.append("    nothing skipped")
        for reason, entry in skipped.items():
            examples = ", ".join(str(e) for e in entry["examples"])
            lines.append(f"    {reason}: {entry['count']}  ({REASONS.get(reason, '')}); "
                         f"e.g. {examples}")
    for name in summary.get("stale_annotations") or ():
        lines.append(f"  WARNING: {name} changed since this build was prepared: the old "
                     "build is reused; delete it to rebuild")
    return "\n".join(lines)


PROG = "solov2-prepare"


def main(argv=None):
    """CLI on the arguments after the program name (default sys.argv[1:]); returns
    (builder, summary), or 0 for `--help`. A user error prints one `error:` line and
    raises SystemExit(1) (`--debug` or SOLOV2_DEBUG=1 shows the traceback)."""
    from solov2_jax import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    result = cli.absl_main(PROG, __doc__, _define_flags, _execute, [PROG, *argv])
    if result == 1:
        raise SystemExit(1)
    return result


def _define_flags(fv, argv):
    from absl import flags

    flags.DEFINE_string("coco_dir", "", "COCO-format dir (annotations/instances_<split>.json "
                        "+ <split>/); empty: generate and use the demo dataset",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir to write to", flag_values=fv)
    flags.DEFINE_string("name", None, "dataset (builder config) name; default: the coco "
                        "dir's basename", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)


def _execute(fv, inputs):
    from solov2_jax.cli import UserError

    if inputs:
        raise UserError(f"unexpected arguments: {' '.join(inputs)} (flags only)")
    if not fv.data_dir:
        raise UserError("--data_dir is required")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from solov2_jax.data.coco_builder import category_info, config_name, prepare

    coco_dir, name = fv.coco_dir, fv.name
    if not coco_dir:
        coco_dir, name = ensure_demo(fv.data_dir), name or DEMO_NAME
    builder, summary = prepare(coco_dir, fv.data_dir, name, progress=fv.progress)
    print(format_summary(summary, f"coco_instance_seg/{config_name(coco_dir, name)}"))
    cats = category_info(builder)
    print(f"  {len(cats)} categories: " +
          ", ".join(f"{c['label']}={c['name']}(id {c['id']})" for c in cats[:10]) +
          (", ..." if len(cats) > 10 else ""))
    return builder, summary


def run():
    """Console entry point (`solov2-prepare`)."""
    from solov2_jax import cli

    def entry(argv):
        main(argv[1:])  # a user error raises SystemExit(1)
        return 0

    cli.console_entry(entry)


if __name__ == "__main__":
    run()
