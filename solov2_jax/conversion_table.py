"""Declarative PyTorch -> Flax name table for SOLOv2 (mmdet) and ResNet (torchvision).

The table is a list of module rules `(flax module pattern, torch module pattern, kind,
index set)`. A rule is expanded over its index set (which depends on the config: ResNet
depth, FPN levels, stacked convs ...) and each module `kind` expands into leaves
`(collection, flax leaf, torch leaf, transform)`. The result is an explicit one-to-one
map `torch key -> (collection, flax path, transform)` that `convert.py` applies strictly.

Torch module names are mmdet's; the Flax name is the same with '.' inside a name
component turned into '_' (`layer1.0` -> `layer1_0`) and '/' between modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import numpy as np

from solov2_jax.models.resnet import block_layout
from solov2_jax.models.solov2_head import dcn_stacked_conv_indices

# Source keys that have no Flax counterpart and are dropped on purpose.
IGNORED_SUFFIXES = (".num_batches_tracked",)  # BN step counter; inference BN never uses it
TORCHVISION_IGNORED = (re.compile(r"^fc\.(weight|bias)$"),)  # ImageNet classifier
# ImageNet ResNe(X)t checkpoints have no DCN offset predictors; as in mmdet (ResNet's
# init_weights zeroes `conv2.conv_offset`, and loading the ImageNet weights leaves them),
# they start at zero when a DCN backbone is initialised from such a checkpoint.
TORCHVISION_ZERO_INIT = (re.compile(r"^layer\d+\.\d+\.conv2\.conv_offset\.(weight|bias)$"),)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O] (HWIO)."""
    return np.transpose(w, (2, 3, 1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return w


# Leaves of each module kind: (collection, flax leaf, torch leaf, transform).
LEAVES: dict[str, tuple[tuple[str, str, str, Callable], ...]] = {
    "conv": (("params", "kernel", "weight", conv_kernel),),
    "conv_bias": (
        ("params", "kernel", "weight", conv_kernel),
        ("params", "bias", "bias", identity),
    ),
    "bn": (
        ("params", "scale", "weight", identity),
        ("params", "bias", "bias", identity),
        ("batch_stats", "mean", "running_mean", identity),
        ("batch_stats", "var", "running_var", identity),
    ),
    "gn": (
        ("params", "scale", "weight", identity),
        ("params", "bias", "bias", identity),
    ),
}


class Rule(NamedTuple):
    flax: str  # module path pattern, '/'-separated, `{name}` placeholders
    torch: str  # module key pattern, '.'-separated, same placeholders
    kind: str  # key of LEAVES
    over: str = "one"  # index set the placeholders range over


BACKBONE_RULES = (
    Rule("conv1", "conv1", "conv"),
    Rule("bn1", "bn1", "bn"),
    Rule("layer{s}_{b}/conv{c}", "layer{s}.{b}.conv{c}", "conv", "block_convs"),
    Rule("layer{s}_{b}/bn{c}", "layer{s}.{b}.bn{c}", "bn", "block_convs"),
    Rule("layer{s}_{b}/downsample_0", "layer{s}.{b}.downsample.0", "conv", "downsample_blocks"),
    Rule("layer{s}_{b}/downsample_1", "layer{s}.{b}.downsample.1", "bn", "downsample_blocks"),
    # DCNv2 (mmcv ModulatedDeformConv2dPack): its own `weight` is matched by the conv rule
    # above; the offset/mask predictor is a child conv with a bias.
    Rule("layer{s}_{b}/conv2/conv_offset", "layer{s}.{b}.conv2.conv_offset", "conv_bias",
         "dcn_blocks"),
)

NECK_RULES = (
    Rule("lateral_convs_{i}/conv", "lateral_convs.{i}.conv", "conv_bias", "fpn_inputs"),
    Rule("fpn_convs_{i}/conv", "fpn_convs.{i}.conv", "conv_bias", "fpn_inputs"),
)

HEAD_RULES = (
    Rule("kernel_convs_{i}/conv", "kernel_convs.{i}.conv", "conv", "stacked_convs"),
    Rule("kernel_convs_{i}/gn", "kernel_convs.{i}.gn", "gn", "stacked_convs"),
    Rule("cls_convs_{i}/conv", "cls_convs.{i}.conv", "conv", "stacked_convs"),
    Rule("cls_convs_{i}/gn", "cls_convs.{i}.gn", "gn", "stacked_convs"),
    Rule("conv_kernel", "conv_kernel", "conv_bias"),
    Rule("conv_cls", "conv_cls", "conv_bias"),
    Rule("mask_feature_head/convs_all_levels_{l}/conv{j}/conv",
         "mask_feature_head.convs_all_levels.{l}.conv{j}.conv", "conv", "mask_level_convs"),
    Rule("mask_feature_head/convs_all_levels_{l}/conv{j}/gn",
         "mask_feature_head.convs_all_levels.{l}.conv{j}.gn", "gn", "mask_level_convs"),
    Rule("mask_feature_head/conv_pred/conv", "mask_feature_head.conv_pred.conv", "conv"),
    Rule("mask_feature_head/conv_pred/gn", "mask_feature_head.conv_pred.gn", "gn"),
    # ConvModules whose conv is a DCNv2 (mmdet dcn_cfg / mask_feature_head conv_cfg).
    Rule("kernel_convs_{i}/conv/conv_offset", "kernel_convs.{i}.conv.conv_offset", "conv_bias",
         "dcn_stacked_convs"),
    Rule("cls_convs_{i}/conv/conv_offset", "cls_convs.{i}.conv.conv_offset", "conv_bias",
         "dcn_stacked_convs"),
    Rule("mask_feature_head/convs_all_levels_{l}/conv{j}/conv/conv_offset",
         "mask_feature_head.convs_all_levels.{l}.conv{j}.conv.conv_offset", "conv_bias",
         "dcn_mask_level_convs"),
    Rule("mask_feature_head/conv_pred/conv/conv_offset",
         "mask_feature_head.conv_pred.conv.conv_offset", "conv_bias", "dcn_mask_pred"),
)

# (flax top-level module, torch key prefix, rules) of a full mmdet SOLOv2 checkpoint.
SOLOV2_SECTIONS = (
    ("backbone", "backbone.", BACKBONE_RULES),
    ("neck", "neck.", NECK_RULES),
    ("mask_head", "mask_head.", HEAD_RULES),
)


def index_sets(depth: int, stacked_convs: int = 0, num_fpn_inputs: int = 4,
               num_mask_levels: int = 4, stage_with_dcn=(False, False, False, False),
               head_dcn: str = "none", mask_feature_dcn: bool = False
               ) -> dict[str, list[dict[str, int]]]:
    """Placeholder bindings for every index set, for one architecture."""
    convs_per_block = 2 if depth in (18, 34) else 3
    layout = block_layout(depth)
    blocks = [(s + 1, b, ds) for s, stage in enumerate(layout)
              for b, (_, ds) in enumerate(stage)]
    mask_level_convs = [{"l": lv, "j": j} for lv in range(num_mask_levels)
                        for j in range(max(lv, 1))]
    return {
        "dcn_blocks": [{"s": s, "b": b} for s, b, _ in blocks if stage_with_dcn[s - 1]],
        "dcn_stacked_convs": [{"i": i} for i in dcn_stacked_conv_indices(head_dcn,
                                                                           stacked_convs)],
        "dcn_mask_level_convs": mask_level_convs if mask_feature_dcn else [],
        "dcn_mask_pred": [{}] if mask_feature_dcn else [],
        "one": [{}],
        "block_convs": [{"s": s, "b": b, "c": c} for s, b, _ in blocks
                        for c in range(1, convs_per_block + 1)],
        "downsample_blocks": [{"s": s, "b": b} for s, b, ds in blocks if ds],
        "fpn_inputs": [{"i": i} for i in range(num_fpn_inputs)],
        "stacked_convs": [{"i": i} for i in range(stacked_convs)],
        "mask_level_convs": mask_level_convs,
    }


class Target(NamedTuple):
    collection: str  # 'params' or 'batch_stats'
    path: tuple[str, ...]  # inside the collection
    transform: Callable[[np.ndarray], np.ndarray]


def expand(sections: Iterable[tuple[str, str, Iterable[Rule]]],
           sets: Mapping[str, list[dict[str, int]]]) -> dict[str, Target]:
    """Expands rules into the explicit map `torch key -> Target`."""
    table: dict[str, Target] = {}
    for flax_prefix, torch_prefix, rules in sections:
        for rule in rules:
            for binding in sets[rule.over]:
                flax_module = tuple(p for p in flax_prefix.split("/") if p)
                flax_module += tuple(rule.flax.format(**binding).split("/"))
                torch_module = torch_prefix + rule.torch.format(**binding)
                for collection, flax_leaf, torch_leaf, fn in LEAVES[rule.kind]:
                    key = f"{torch_module}.{torch_leaf}"
                    if key in table:
                        raise AssertionError(f"conversion table maps {key} twice")
                    table[key] = Target(collection, flax_module + (flax_leaf,), fn)
    return table


def solov2_table(depth: int, stacked_convs: int, stage_with_dcn=(False, False, False, False),
                 head_dcn: str = "none", mask_feature_dcn: bool = False) -> dict[str, Target]:
    """Full mmdet SOLOv2 checkpoint -> {'params', 'batch_stats'} of `models.SOLOv2`.

    ResNeXt needs no extra rule (same keys as ResNet, grouped shapes); DCNv2 convs add
    their `conv_offset` children where the config puts DCN.
    """
    return expand(SOLOV2_SECTIONS, index_sets(
        depth, stacked_convs, stage_with_dcn=tuple(stage_with_dcn), head_dcn=head_dcn,
        mask_feature_dcn=mask_feature_dcn))


def solov2_table_for(model) -> dict[str, Target]:
    """`solov2_table` for a `models.SOLOv2` module (reads its architecture fields)."""
    return solov2_table(model.depth, model.stacked_convs, model.stage_with_dcn,
                        model.head_dcn, model.mask_feature_dcn)


def torchvision_resnet_table(depth: int, stage_with_dcn=(False, False, False, False)
                             ) -> dict[str, Target]:
    """torchvision ResNet state_dict -> {'params', 'batch_stats'} of `models.ResNet`.

    ResNeXt checkpoints use the same keys; with DCN stages the table also has the
    `conv_offset` leaves, which such checkpoints lack (`zero_init_if_absent`).
    """
    return expand((("", "", BACKBONE_RULES),),
                  index_sets(depth, stage_with_dcn=tuple(stage_with_dcn)))


def zero_init_if_absent(key: str, torchvision: bool = False) -> bool:
    """Table keys an ImageNet checkpoint may lack, filled with zeros (`TORCHVISION_ZERO_INIT`)."""
    return torchvision and any(p.match(key) for p in TORCHVISION_ZERO_INIT)


def is_ignored(key: str, torchvision: bool = False) -> bool:
    """Source keys that are dropped by design (documented in `IGNORED_SUFFIXES` etc.)."""
    if key.endswith(IGNORED_SUFFIXES):
        return True
    return torchvision and any(p.match(key) for p in TORCHVISION_IGNORED)
