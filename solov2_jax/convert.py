"""Convert PyTorch checkpoints (mmdet SOLOv2, torchvision ResNet) into Flax variables.

    solov2-convert mmdet --config configs/solov2_r50_fpn_1x_coco.py \\
        --checkpoint solov2_r50_fpn_1x_coco.pth --out /ckpt/solov2_r50_1x
    solov2-convert torchvision --depth 50 --checkpoint resnet50-0676ba61.pth \\
        --out /ckpt/resnet50_init

(or `python -m solov2_jax.convert ...`). The mapping is the declarative table of
`conversion_table.py`, applied strictly: every source key must be consumed (except
`*.num_batches_tracked` and torchvision's `fc.*`), every Flax leaf filled, and every shape
must equal the model's initial shape; otherwise a `ConversionError` names the missing,
unexpected and mis-shaped keys and the CLI exits with status 1. Nothing is downloaded.
Reading `.pth` files needs torch (`pip install 'solov2-jax[torch]'`), imported lazily.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from solov2_jax import conversion_table as ct
from solov2_jax.cli import UserError

# Image size used only to trace the model for its variable shapes (shape-independent).
_TRACE_HW = (64, 64)


class ConversionError(UserError, ValueError):
    """The checkpoint does not match the model (or cannot be read)."""


def load_config(path: str):
    """`get_config()` of a `configs/<name>.py` file."""
    spec = importlib.util.spec_from_file_location("_solov2_config", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ConversionError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_torch_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a `.pth` ({'state_dict': ...} as mmdet saves, or a bare state_dict) to numpy.

    Uses `torch.load(weights_only=True)`; `allow_pickle=True` permits arbitrary pickled
    objects (only for files you trust) when the checkpoint's metadata needs it.
    """
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            "reading .pth checkpoints needs PyTorch: pip install 'solov2-jax[torch]'") from e
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError variants
        # Only a refusal of the weights-only unpickler is helped by --allow-pickle; a
        # truncated or foreign file fails the same way either way.
        refused = "weights_only" in str(e) or "Weights only load failed" in str(e)
        if allow_pickle or not refused or _truncated_zip(path):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConversionError(f"cannot read {path}: not a complete PyTorch checkpoint "
                                  f"(truncated, corrupt or another format; "
                                  f"{type(e).__name__}: {first})") from e
        raise ConversionError(
            f"torch.load(weights_only=True) refused {path} ({type(e).__name__}: {e}). If "
            "you trust this file, retry with --allow-pickle (allow_pickle=True).") from e
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping):
        raise ConversionError(f"{path} holds a {type(ckpt).__name__}, not a state_dict")
    out = {}
    for key, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"state_dict entry {key!r} is a {type(value).__name__}")
        value = value.detach().cpu()
        # Keep float32 masters whatever the checkpoint's precision (fp16/bf16 saves).
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def _truncated_zip(path: str) -> bool:
    """True for a torch zip checkpoint whose end (central directory) is missing."""
    import zipfile

    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return is_zip and not zipfile.is_zipfile(path)


def variable_shapes(module, image_hw: tuple[int, int] = _TRACE_HW) -> dict:
    """Flattened {(collection, *path): shape} of `module.init` (traced, nothing computed)."""
    images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(shapes)).items()}


def shape_mismatches(variables: Mapping[str, Any], expected: Mapping[tuple, tuple]) -> list[str]:
    """Differences between a variables tree and `variable_shapes`-style expected shapes.

    One line per missing, unexpected and mis-shaped leaf (paths joined with '/'); empty
    when they match. Used wherever already-converted variables meet a model.
    """
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    problems = [f"missing {'/'.join(k)}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {'/'.join(k)}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"{'/'.join(k)}: weights {got[k]}, model {expected[k]}"
                 for k in sorted(expected.keys() & got.keys()) if got[k] != tuple(expected[k])]
    return problems


def convert_state_dict(state_dict: Mapping[str, np.ndarray], table: Mapping[str, ct.Target],
                       expected: Mapping[tuple, tuple], torchvision: bool = False) -> dict:
    """Applies `table` strictly; returns {'params': ..., 'batch_stats': ...} (numpy).

    `expected` is `variable_shapes(model)`. Raises `ConversionError` listing every
    missing, unexpected and mis-shaped key. With `torchvision`, the DCN offset
    predictors an ImageNet checkpoint lacks are zeros (`ct.zero_init_if_absent`).
    """
    targets = {(t.collection, *t.path): key for key, t in table.items()}
    # A model leaf with no rule (or a rule with no leaf) is a table/config mismatch.
    unmapped = sorted("/".join(p) for p in expected.keys() - targets.keys())
    stale = sorted("/".join(p) for p in targets.keys() - expected.keys())
    missing = sorted(k for k in table
                     if k not in state_dict and not ct.zero_init_if_absent(k, torchvision))
    unexpected = sorted(k for k in state_dict
                        if k not in table and not ct.is_ignored(k, torchvision))
    misshaped, flat = [], {}
    for key, target in table.items():
        path = (target.collection, *target.path)
        if key not in state_dict and path in expected and ct.zero_init_if_absent(
                key, torchvision):
            flat[path] = np.zeros(expected[path], np.float32)
        if key not in state_dict or path not in expected:
            continue
        value = np.asarray(target.transform(state_dict[key]), dtype=np.float32)
        if value.shape != expected[path]:
            misshaped.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} -> "
                             f"{value.shape}, model expects {expected[path]} at "
                             f"{'/'.join(path)}")
            continue
        flat[path] = value
    if missing or unexpected or misshaped or unmapped or stale:
        lines = ["checkpoint does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped),
                             ("model variables without a rule", unmapped),
                             ("rules without a model variable", stale)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def convert_mmdet(state_dict: Mapping[str, np.ndarray], config) -> dict:
    """mmdet SOLOv2 state_dict -> variables of `models.build_model(config.model)`."""
    from solov2_jax.models import build_model

    model = build_model(config.model)
    table = ct.solov2_table_for(model)
    return convert_state_dict(state_dict, table, variable_shapes(model))


def convert_torchvision(state_dict: Mapping[str, np.ndarray], depth: int, groups: int = 1,
                        base_width: int = 4, stage_with_dcn=(False, False, False, False)
                        ) -> dict:
    """torchvision ResNet state_dict -> variables of `models.ResNet(depth)` (the backbone).

    `groups`/`base_width` give a ResNeXt (same keys, grouped shapes); `stage_with_dcn`
    a DCN backbone, whose offset predictors (absent from ImageNet checkpoints) start at
    zero as in mmdet.
    """
    from solov2_jax.models import ResNet

    table = ct.torchvision_resnet_table(depth, stage_with_dcn)
    model = ResNet(depth=depth, groups=groups, base_width=base_width,
                   stage_with_dcn=tuple(stage_with_dcn))
    return convert_state_dict(state_dict, table, variable_shapes(model), torchvision=True)


def convert_mmdet_checkpoint(config, checkpoint: str, allow_pickle: bool = False) -> dict:
    """Reads an mmdet `.pth` and converts it; `config` is a ConfigDict or a config path."""
    if isinstance(config, str):
        config = load_config(config)
    return convert_mmdet(load_torch_state_dict(checkpoint, allow_pickle), config)


def convert_torchvision_checkpoint(depth: int, checkpoint: str,
                                   allow_pickle: bool = False, **arch) -> dict:
    """Reads a torchvision ResNet `.pth` and converts it to backbone variables.

    `arch`: `groups`, `base_width`, `stage_with_dcn` as in `convert_torchvision`.
    """
    return convert_torchvision(load_torch_state_dict(checkpoint, allow_pickle), depth, **arch)


def save_variables(path: str, variables: Mapping[str, Any], force: bool = False) -> str:
    """Writes a variables pytree as an orbax checkpoint at `path` (`checkpoint.save_variables`:
    atomic; with force it replaces only an existing checkpoint, never other files)."""
    from solov2_jax import checkpoint

    return checkpoint.save_variables(path, variables, force=force)


def load_variables(path: str) -> dict:
    """Model variables from any checkpoint this project writes (`checkpoint.load_variables`:
    converted weights, final_variables, a training step or workdir), as jax.Array."""
    from solov2_jax import checkpoint

    return checkpoint.load_variables(path)


def load_backbone_init(path: str) -> dict:
    """Backbone variables {'params', 'batch_stats'} from `solov2-convert torchvision`.

    Put them into a full model's variables at `['params']['backbone']` and
    `['batch_stats']['backbone']`.
    """
    variables = load_variables(path)
    if set(variables) != {"params", "batch_stats"} or "conv1" not in variables["params"]:
        raise ConversionError(f"{path} does not hold ResNet backbone variables "
                              f"(top-level keys: {sorted(variables)})")
    return variables


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solov2-convert",
        description="Convert PyTorch checkpoints into orbax checkpoints of Flax variables "
                    "({'params', 'batch_stats'}). Strict: any missing, unexpected or "
                    "mis-shaped key is listed and the exit status is 1. Never downloads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # full mmdetection 3.x SOLOv2 model ({'meta','state_dict'} or bare)\n"
               "  solov2-convert mmdet --config configs/solov2_r50_fpn_1x_coco.py \\\n"
               "      --checkpoint solov2_r50_fpn_1x_coco.pth --out ckpt/solov2_r50_1x\n"
               "  # ImageNet backbone initialisation from torchvision (fc.* dropped)\n"
               "  solov2-convert torchvision --depth 50 \\\n"
               "      --checkpoint resnet50-0676ba61.pth --out ckpt/resnet50_init\n")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{mmdet,torchvision}")
    mm = sub.add_parser(
        "mmdet", help="mmdetection SOLOv2 checkpoint -> full model variables",
        description="Convert an mmdetection 3.x SOLOv2 checkpoint into the variables of "
                    "the model described by --config. Example: solov2-convert mmdet "
                    "--config configs/solov2_r50_fpn_1x_coco.py --checkpoint "
                    "solov2_r50_fpn_1x_coco.pth --out ckpt/solov2_r50_1x")
    mm.add_argument("--config", required=True, help="configs/<name>.py of the matching model")
    tv = sub.add_parser(
        "torchvision", help="torchvision ResNet checkpoint -> backbone initialisation",
        description="Convert a torchvision ResNet state_dict (conv1.weight, bn1.*, "
                    "layer1.0.conv1.weight, ..., fc.*) into backbone variables, read by "
                    "`load_backbone_init`. Example: solov2-convert torchvision --depth 50 "
                    "--checkpoint resnet50-0676ba61.pth --out ckpt/resnet50_init")
    arch = tv.add_mutually_exclusive_group(required=True)
    arch.add_argument("--depth", type=int, choices=(18, 34, 50, 101))
    arch.add_argument("--config", help="configs/<name>.py whose backbone to initialise "
                      "(depth, ResNeXt groups, DCN stages: offset predictors start at 0)")
    for p in (mm, tv):
        p.add_argument("--checkpoint", required=True, help="input .pth file")
        p.add_argument("--out", required=True, help="output orbax checkpoint directory")
        p.add_argument("--force", action="store_true", help="overwrite an existing --out")
        p.add_argument("--debug", action="store_true", help="tracebacks for user errors")
        p.add_argument("--allow-pickle", action="store_true",
                       help="torch.load(weights_only=False); only for files you trust")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status (0 ok, 1 user error, printed as one `error:`
    message; `--debug` or SOLOV2_DEBUG=1 shows the traceback)."""
    from solov2_jax import cli

    return cli.guarded("solov2-convert", _main, argv)


def _main(argv: list[str] | None) -> int:
    from solov2_jax import checkpoint

    args = _parser().parse_args(argv)
    # Fail before the (slow) conversion rather than after it; never delete what is
    # not a checkpoint.
    if os.path.lexists(args.out) and not args.force:
        raise ConversionError(f"{args.out} exists; pass --force to overwrite")
    if os.path.lexists(args.out) and not checkpoint.is_checkpoint(args.out):
        raise ConversionError(f"refusing to overwrite {args.out} with --force: it is "
                              "not a checkpoint (no orbax files in it); nothing was "
                              "deleted")
    if args.mode == "mmdet":
        variables = convert_mmdet_checkpoint(args.config, args.checkpoint,
                                             args.allow_pickle)
    else:
        if args.config:
            m = load_config(args.config).model
            arch = dict(depth=int(m.depth), groups=int(m.get("groups", 1)),
                        base_width=int(m.get("base_width", 4)),
                        stage_with_dcn=tuple(m.get("stage_with_dcn", (False,) * 4)))
        else:
            arch = dict(depth=args.depth)
        variables = convert_torchvision_checkpoint(checkpoint=args.checkpoint,
                                                   allow_pickle=args.allow_pickle, **arch)
    out = save_variables(args.out, variables, force=args.force)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    print(f"wrote {out} ({n:,} parameters)")
    return 0


def run() -> None:
    """Console-script entry point (`solov2-convert`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
