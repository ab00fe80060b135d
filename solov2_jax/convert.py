"""Convert PyTorch checkpoints (mmdet SOLOv2, torchvision ResNet) into Flax variables.

    solov2-convert MODE --checkpoint FILE.pth --out DIR [--config NAME|PATH | --depth N]

MODE mmdet: a full mmdetection 3.x SOLOv2 checkpoint ({'meta', 'state_dict'} or a bare
state_dict) -> the variables of the model of --config. MODE torchvision: a torchvision
ResNet state_dict -> backbone initialisation variables (`load_backbone_init`) of
--depth, or of --config's backbone (ResNeXt groups, DCN stages whose offset predictors
start at zero; torchvision's fc.* is dropped).

examples:
    solov2-convert mmdet --config solov2_r50_fpn_1x_coco \\
        --checkpoint solov2_r50_fpn_1x_coco.pth --out ckpt/solov2_r50_1x
    solov2-convert torchvision --depth 50 --checkpoint resnet50-0676ba61.pth \\
        --out ckpt/resnet50_init

(or `python -m solov2_jax.convert ...`). The mapping is the declarative table of
`conversion_table.py`, applied strictly: every source key must be consumed (except
`*.num_batches_tracked` and torchvision's `fc.*`), every Flax leaf filled, and every shape
must equal the model's initial shape; otherwise a `ConversionError` names the missing,
unexpected and mis-shaped keys and the CLI exits with status 1. Nothing is downloaded.
Reading `.pth` files needs torch (`pip install 'solov2-jax[torch]'`), imported lazily.
"""

from __future__ import annotations

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


def load_config(name_or_path: str, overrides=()):
    """A config (packaged name or `configs/<name>.py` file) with `a.b=value` overrides,
    resolved as every CLI's `--config` (`predict.load_config`)."""
    from solov2_jax.predict import load_config as load

    return load(name_or_path, overrides)


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


PROG = "solov2-convert"
MODES = ("mmdet", "torchvision")
RESNET_DEPTHS = (18, 34, 50, 101)


def _define_flags(fv, argv):
    from absl import flags

    from solov2_jax import cli

    cli.define_config_flag(fv, argv)  # mmdet: the model; torchvision: its backbone
    flags.DEFINE_integer("depth", None, "torchvision: ResNet depth "
                         f"({', '.join(map(str, RESNET_DEPTHS))}), instead of --config",
                         flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "input .pth file", flag_values=fv)
    flags.DEFINE_string("out", None, "output orbax checkpoint directory", flag_values=fv)
    flags.DEFINE_bool("force", False, "overwrite an existing --out checkpoint",
                      flag_values=fv)
    flags.DEFINE_bool("allow_pickle", False, "torch.load(weights_only=False); only for "
                      "files you trust", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    """CLI (callable in-process) on the arguments after the program name (default
    sys.argv[1:]); returns the exit status (0 ok, 1 user error, printed as one `error:`
    line; `--debug` or SOLOV2_DEBUG=1 shows the traceback)."""
    from solov2_jax import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.absl_main(PROG, __doc__, _define_flags, _execute, [PROG, *argv])


def _execute(fv, inputs: list[str]) -> int:
    from solov2_jax import checkpoint

    if len(inputs) != 1 or inputs[0] not in MODES:
        raise UserError(f"give one MODE, mmdet or torchvision (got: {' '.join(inputs)})")
    mode = inputs[0]
    for flag in ("checkpoint", "out"):
        if not fv[flag].value:
            raise UserError(f"--{flag} is required")
    if mode == "mmdet" and fv.config is None:
        raise UserError("mmdet: --config is required")
    if mode == "torchvision" and (fv.depth is None) == (fv.config is None):
        raise UserError("torchvision: give exactly one of --depth and --config")
    if fv.depth is not None and fv.depth not in RESNET_DEPTHS:
        raise UserError(f"--depth {fv.depth}: must be one of {RESNET_DEPTHS}")
    # Fail before the (slow) conversion rather than after it; never delete what is
    # not a checkpoint.
    if os.path.lexists(fv.out) and not fv.force:
        raise ConversionError(f"{fv.out} exists; pass --force to overwrite")
    if os.path.lexists(fv.out) and not checkpoint.is_checkpoint(fv.out):
        raise ConversionError(f"refusing to overwrite {fv.out} with --force: it is "
                              "not a checkpoint (no orbax files in it); nothing was "
                              "deleted")
    if mode == "mmdet":
        variables = convert_mmdet_checkpoint(fv.config, fv.checkpoint, fv.allow_pickle)
    else:
        if fv.config is not None:
            m = fv.config.model
            arch = dict(depth=int(m.depth), groups=int(m.get("groups", 1)),
                        base_width=int(m.get("base_width", 4)),
                        stage_with_dcn=tuple(m.get("stage_with_dcn", (False,) * 4)))
        else:
            arch = dict(depth=fv.depth)
        variables = convert_torchvision_checkpoint(checkpoint=fv.checkpoint,
                                                   allow_pickle=fv.allow_pickle, **arch)
    out = save_variables(fv.out, variables, force=fv.force)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    print(f"wrote {out} ({n:,} parameters)")
    return 0


def run() -> None:
    """Console-script entry point (`solov2-convert`)."""
    from solov2_jax import cli

    cli.console_entry(lambda argv: main(argv[1:]))


if __name__ == "__main__":
    run()
