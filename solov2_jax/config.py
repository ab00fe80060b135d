"""Shared config defaults: one builder per mmdet SOLOv2 family, used by `configs/*.py`.

Every `configs/<mmdet name>.py` calls `solov2_config(...)` with the few values that differ
between variants, so the defaults below are the single place where mmdet 3.3.0's numbers
live. The sections mirror mmdet's config: `model`, `loss`, `test` (mmdet's `test_cfg`
names), `data`, `optim`, plus `train` / `checkpoint` for the JAX runner.

Jitted code never receives this ConfigDict: callers unpack plain Python values from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

# mmdet's ImageNet RGB statistics (data_preprocessor, bgr_to_rgb=True).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# Short sides used by mmdet's multi-scale (ms-3x) schedules.
MS_SHORT_SIDES = (800, 768, 736, 704, 672, 640)
LIGHT_MS_SHORT_SIDES = (512, 480, 448, 416, 384, 352)

# models.conv.CHOICES (kept here so that reading a config never imports JAX).
CONV_IMPLS = ("auto", "xla", "shifted", "shifted_dot1x1")
# ResNet output channels of C2..C5 for each depth.
RESNET_CHANNELS = {
    18: (64, 128, 256, 512),
    34: (64, 128, 256, 512),
    50: (256, 512, 1024, 2048),
    101: (256, 512, 1024, 2048),
}


def solov2_config(
    *,
    depth: int = 50,
    light: bool = False,
    epochs: int = 12,
    milestones: Sequence[int] = (8, 11),
    warmup_ratio: float = 0.001,
    train_scales: Sequence[tuple[int, int]] = ((1333, 800),),
    test_scale: tuple[int, int] = (1333, 800),
    num_classes: int = 80,
) -> ml_collections.ConfigDict:
    """Returns a full SOLOv2 config; `light=True` gives mmdet's `solov2-light` head."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.depth = depth
    # mmdet's ResNeXt when groups > 1 (x101-64x4d: groups=64, base_width=4).
    c.model.groups = 1
    c.model.base_width = 4
    # DCNv2 (mmcv ModulatedDeformConv2dPack): per backbone stage (mmdet stage_with_dcn), in
    # the kernel/cls stacked convs ('none' | 'all' | 'last': mmdet dcn_cfg +
    # dcn_apply_to_all_conv) and in every mask-feature conv (its conv_cfg).
    c.model.stage_with_dcn = (False, False, False, False)
    c.model.head_dcn = "none"
    c.model.mask_feature_dcn = False
    c.model.frozen_stages = 1
    c.model.backbone_channels = RESNET_CHANNELS[depth]
    c.model.fpn_channels = 256
    c.model.fpn_num_outs = 5
    c.model.num_classes = num_classes
    c.model.feat_channels = 256 if light else 512
    c.model.stacked_convs = 2 if light else 4
    c.model.strides = (8, 8, 16, 32, 32)
    c.model.scale_ranges = (
        ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
        if light
        else ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    )
    c.model.pos_scale = 0.2
    c.model.num_grids = (40, 36, 24, 16, 12)
    c.model.cls_down_index = 0
    c.model.gn_groups = 32
    c.model.mask_feature_channels = 128
    c.model.mask_out_channels = 128 if light else 256
    c.model.mask_stride = 4
    # Kernel size of the dynamic conv (mmdet: dynamic_conv_size=1 -> E = out_channels).
    c.model.dynamic_conv_size = 1
    # Convolution implementation (models/conv.py): 'auto' = the custom-VJP weight gradient
    # on the CPU backend, XLA's own convolutions elsewhere; or xla | shifted |
    # shifted_dot1x1. Numerics: forward bitwise equal, weight gradients to 1e-5.
    c.model.conv_impl = "auto"

    c.loss = ml_collections.ConfigDict()
    c.loss.dice_weight = 3.0
    c.loss.dice_eps = 1e-3
    c.loss.focal_gamma = 2.0
    c.loss.focal_alpha = 0.25
    c.loss.focal_weight = 1.0
    # 'per_device' reproduces mmdet (num_pos counted on each device, not all-reduced);
    # 'global' divides by the positive count summed over all devices (psum).
    c.loss.normalization = "per_device"
    # Fixed capacity of positive (cell, instance) pairs per image; overflow is counted.
    c.loss.max_positives = 512

    c.test = ml_collections.ConfigDict()
    c.test.nms_pre = 500
    c.test.score_thr = 0.1
    c.test.mask_thr = 0.5
    c.test.filter_thr = 0.05
    c.test.kernel = "gaussian"
    c.test.sigma = 2.0
    c.test.max_per_img = 100
    # Static cap on (cell, class) candidates before Matrix NMS; exact whenever the true
    # number of candidates above score_thr is <= this value.
    c.test.max_candidates = 1000

    c.data = ml_collections.ConfigDict()
    c.data.coco_dir = ""  # empty: use the generated demo dataset
    c.data.data_dir = ""  # TFDS data dir; empty: <workdir>/tfds
    c.data.dataset = "coco_instance_seg"
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.train_scales = tuple(tuple(s) for s in train_scales)
    c.data.test_scale = tuple(test_scale)
    c.data.mean = PIXEL_MEAN
    c.data.std = PIXEL_STD
    c.data.pad_size_divisor = 32
    c.data.flip_prob = 0.5
    c.data.per_device_batch = 2
    c.data.eval_per_device_batch = 1
    c.data.max_instances = 100
    c.data.filter_empty_gt = True
    c.data.min_size = 32
    c.data.shuffle_buffer = 1000
    c.data.seed = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.01  # for 16 images per step (8 devices x 2)
    c.optim.reference_batch = 16
    c.optim.scale_lr_by_batch = False
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 35.0
    c.optim.epochs = epochs
    c.optim.milestones = tuple(milestones)
    c.optim.gamma = 0.1
    c.optim.warmup_iters = 500
    c.optim.warmup_ratio = warmup_ratio

    c.train = ml_collections.ConfigDict()
    c.train.num_train_images = 118287  # COCO train2017; replaced by the dataset's size
    c.train.log_every = 50
    c.train.eval_every_epochs = 1
    c.train.seed = 42
    c.train.pretrained = ""  # backbone init from `solov2_jax.convert torchvision`
    c.train.init_checkpoint = ""  # full-model init from `solov2_jax.convert mmdet`
    c.train.max_steps = -1  # >0 stops early (smoke runs)
    # fp32 | bf16 | fp16: convolutions in that dtype; params, optimiser state, norm
    # statistics, losses and Matrix NMS in float32; fp16 with dynamic loss scaling
    # (train.precision also applies to evaluate/predict).
    c.train.precision = "fp32"
    # fp16: jmp.DynamicLossScale's initial scale; 512 is mmdet's fp16 configs' loss_scale
    # (2**15 overflowed within the first 10 steps of configs/tiny.py, skipping a step).
    c.train.loss_scale_init = 512.0
    c.train.loss_scale_period = 2000  # fp16: finite steps before the scale doubles
    c.train.backend = "auto"  # auto | cpu | cuda | ixuca (solov2_jax.backend; --backend)
    # 0: a non-finite loss/grad norm stops training (train.TrainingDiverged). N > 0: up to
    # N such steps are skipped (no update) before stopping.
    c.train.max_nonfinite_skips = 0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 3
    return c


def shrink_to_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The small model of configs/tiny.py and configs/demo.py (64-channel FPN and head,
    32-channel mask features, grids 12..4 for objects up to 512 px), in place."""
    c.model.feat_channels = 64
    c.model.mask_feature_channels = 32
    c.model.mask_out_channels = 32
    c.model.fpn_channels = 64
    c.model.gn_groups = 8
    c.model.num_grids = (12, 10, 8, 6, 4)
    c.model.scale_ranges = ((1, 24), (12, 48), (24, 96), (48, 192), (96, 512))
    c.loss.max_positives = 128
    c.test.max_candidates = 200
    c.test.nms_pre = 100
    c.test.max_per_img = 20
    return c


def light_ms3x_config(depth: int) -> ml_collections.ConfigDict:
    """mmdet `solov2-light_r{depth}_fpn_ms-3x_coco`."""
    return solov2_config(
        depth=depth,
        light=True,
        epochs=36,
        milestones=(27, 33),
        warmup_ratio=1.0 / 3,
        train_scales=tuple((768, s) for s in LIGHT_MS_SHORT_SIDES),
        test_scale=(768, 448),
    )


def ms3x_config(depth: int) -> ml_collections.ConfigDict:
    """mmdet `solov2_r{depth}_fpn_ms-3x_coco`."""
    return solov2_config(
        depth=depth,
        epochs=36,
        milestones=(27, 33),
        warmup_ratio=1.0 / 3,
        train_scales=tuple((1333, s) for s in MS_SHORT_SIDES),
    )


# mmdet's *-dcn backbones: dcn=dict(type='DCNv2', deformable_groups=1,
# fallback_on_stride=False), stage_with_dcn=(False, True, True, True).
DCN_STAGES = (False, True, True, True)


def dcn_ms3x_config(depth: int, groups: int = 1, base_width: int = 4
                    ) -> ml_collections.ConfigDict:
    """mmdet `solov2_r101-dcn_fpn_ms-3x_coco` / `solov2_x101-dcn_fpn_ms-3x_coco` (groups=64).

    DCNv2 in backbone stages 2-4, in every kernel/cls stacked conv and in every conv of the
    mask-feature branch (including its 1x1 conv_pred).
    """
    c = ms3x_config(depth)
    c.model.groups = groups
    c.model.base_width = base_width
    c.model.stage_with_dcn = DCN_STAGES
    c.model.head_dcn = "all"
    c.model.mask_feature_dcn = True
    return c


def light_dcn_ms3x_config(depth: int) -> ml_collections.ConfigDict:
    """mmdet `solov2-light_r{depth}-dcn_fpn_ms-3x_coco`.

    The light config with DCNv2 in backbone stages 2-4 and a head of 3 stacked convs
    (feat 256) whose last one is a DCNv2 (dcn_apply_to_all_conv=False), larger scale
    ranges; the mask-feature branch has no DCN.
    """
    c = light_ms3x_config(depth)
    c.model.stage_with_dcn = DCN_STAGES
    c.model.head_dcn = "last"
    c.model.feat_channels = 256
    c.model.stacked_convs = 3
    c.model.scale_ranges = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
    c.model.mask_out_channels = 128
    return c


def check_config(c) -> None:
    """Raises cli.UserError naming the first out-of-range value (before any expensive work).

    Checks the numbers whose bad values would otherwise surface later as a
    ZeroDivisionError, an empty input pipeline or a silently useless run.
    """
    import math

    from solov2_jax.cli import UserError

    def get(path):
        node = c
        for part in path.split("."):
            node = node[part]
        return node

    def need(path, ok, what):
        try:
            value = get(path)
        except (KeyError, AttributeError):
            return
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise UserError(f"config.{path} = {value!r}: must be {what}")

    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def finite(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    for path in ("data.per_device_batch", "data.eval_per_device_batch", "data.max_instances",
                 "data.shuffle_buffer", "data.pad_size_divisor", "checkpoint.every_steps",
                 "checkpoint.max_to_keep", "train.log_every", "optim.epochs",
                 "optim.reference_batch", "model.num_classes", "loss.max_positives",
                 "test.max_candidates", "test.max_per_img", "test.nms_pre"):
        need(path, positive_int, "a positive integer")
    need("optim.lr", lambda v: finite(v) and v > 0, "a finite number > 0")
    need("model.head_dcn", lambda v: v in ("none", "all", "last"), "'none', 'all' or 'last'")
    need("model.groups", positive_int, "a positive integer")
    need("model.conv_impl", lambda v: v in CONV_IMPLS, " | ".join(CONV_IMPLS))
    need("optim.momentum", lambda v: finite(v) and 0 <= v < 1, "in [0, 1)")
    need("optim.weight_decay", lambda v: finite(v) and v >= 0, "a finite number >= 0")
    need("optim.grad_clip_norm", lambda v: finite(v) and v > 0, "a finite number > 0")
    need("optim.warmup_iters", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    need("optim.warmup_ratio", lambda v: finite(v) and 0 < v <= 1, "in (0, 1]")
    need("optim.gamma", lambda v: finite(v) and v > 0, "a finite number > 0")
    need("data.flip_prob", lambda v: finite(v) and 0 <= v <= 1, "in [0, 1]")
    need("data.min_size", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    need("train.precision", lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16")
    need("train.backend", lambda v: v in ("auto", "cpu", "cuda", "ixuca"),
         "auto, cpu, cuda or ixuca")
    need("train.max_nonfinite_skips", lambda v: isinstance(v, int) and v >= 0,
         "an integer >= 0")
    need("data.train_scales", lambda v: len(v) > 0 and all(
        len(s) == 2 and all(positive_int(int(x)) and x == int(x) for x in s) for s in v),
        "a non-empty list of (long, short) positive integer pairs")
    need("data.test_scale", lambda v: len(v) == 2 and all(positive_int(int(x)) for x in v),
         "a (long, short) pair of positive integers")


def packaged_configs() -> dict[str, str]:
    """{name: file} of the configs shipped in the package (`configs/` as
    `solov2_jax.configs`, see pyproject's package-dir)."""
    import importlib
    import os

    folder = os.path.dirname(importlib.import_module("solov2_jax.configs").__file__)
    return {f[:-3]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(".py") and not f.startswith("_")}


def config_file(name_or_path: str) -> str:
    """The file a `--config` value means: an existing file as given, else the packaged
    config of that name (`tiny`, `tiny.py`). An ml_collections `:arg` suffix is kept.

    Raises cli.UserError naming the packaged configs when it is neither.
    """
    import os

    from solov2_jax.cli import UserError

    path, colon, arg = str(name_or_path).partition(":")
    if os.path.isfile(path):
        return name_or_path
    packaged = packaged_configs()
    name = path[:-3] if path.endswith(".py") else path
    if os.sep not in path and name in packaged:
        return packaged[name] + colon + arg
    raise UserError(f"config {path!r} is neither a file nor a packaged config "
                    f"(packaged: {', '.join(packaged)})")
