"""ResNet-18/34/50/101 backbone, pytorch style, matching mmdet 3.3.0 `ResNet` (and
`ResNeXt`, and DCNv2 bottlenecks as in mmdet's `dcn=` / `stage_with_dcn=`).

Layout follows the Flax ImageNet example; submodule names mirror mmdet's state_dict
(`conv1`, `bn1`, `layer{s}_{b}/conv{c}`, `layer{s}_{b}/bn{c}`, `layer{s}_0/downsample_0|1`)
so checkpoint conversion is a name table. Activations are NHWC, kernels HWIO.

BatchNorm always runs in inference mode (mmdet `norm_eval=True`): it normalises with the
running statistics held in the `batch_stats` collection and never updates them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solov2_jax.models import canvas
from solov2_jax.models.conv import conv_function
from solov2_jax.models.dcn import DCNv2

ModuleDef = Any
Dtype = Any

# torch's BatchNorm2d default.
BN_EPS = 1e-5

# mmdet `ResNet.arch_settings`: block type and number of blocks per stage.
ARCH_SETTINGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}

# torch's `kaiming_normal_(mode='fan_out', nonlinearity='relu')`, mmdet's ResNet conv init.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding `kernel // 2` as torch uses; 'SAME' would pad (0, 1) at stride 2."""
    p = kernel // 2
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs (stride on the first), identity shortcut."""

    planes: int
    stride: int
    has_downsample: bool
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, valid_out: jax.Array) -> jax.Array:
        """[B, H, W, Cin] (zero outside the canvas) -> [B, H/stride, W/stride, planes].

        valid_out [B, 2]: the canvas at the output resolution; the output is zero outside.
        """
        identity = x
        y = self.conv(self.planes, (3, 3), (self.stride, self.stride), torch_padding(3),
                      name="conv1")(x)
        y = canvas.apply(nn.relu(self.norm(name="bn1")(y)), valid_out)
        y = self.conv(self.planes, (3, 3), (1, 1), torch_padding(3), name="conv2")(y)
        # Zero-init of the last BN scale makes each block start as identity (mmdet
        # zero_init_residual=True); converted checkpoints overwrite it.
        y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(y)
        if self.has_downsample:
            identity = self.conv(self.planes, (1, 1), (self.stride, self.stride),
                                 ((0, 0), (0, 0)), name="downsample_0")(x)
            identity = self.norm(name="downsample_1")(identity)
        return canvas.apply(nn.relu(y + identity), valid_out)


class Bottleneck(nn.Module):
    """ResNet-50/101 block: 1x1 -> 3x3 (stride here, pytorch style) -> 1x1 (x4 channels).

    With `groups > 1` it is mmdet's ResNeXt block: the 3x3 conv is grouped and the inner
    width is `floor(planes * base_width / 64) * groups`. With `dcn` (a `DCNv2` partial)
    the 3x3 conv is mmcv's modulated deformable conv (mmdet `dcn=dict(type='DCNv2')`).
    """

    planes: int
    stride: int
    has_downsample: bool
    conv: ModuleDef
    norm: ModuleDef
    groups: int = 1
    base_width: int = 4
    dcn: ModuleDef | None = None

    @nn.compact
    def __call__(self, x: jax.Array, valid_out: jax.Array) -> jax.Array:
        """[B, H, W, Cin] (zero outside the canvas) -> [B, H/stride, W/stride, 4 * planes].

        valid_out [B, 2]: the canvas at the output resolution; the output is zero outside.
        """
        identity = x
        width = self.planes if self.groups == 1 else (
            self.planes * self.base_width // 64 * self.groups)
        y = self.conv(width, (1, 1), (1, 1), ((0, 0), (0, 0)), name="conv1")(x)
        # The 3x3 conv must see zeros past the canvas; a stride-2 one reads only inside,
        # but a deformable one samples anywhere, so its input (at the block's input
        # resolution) is always masked.
        y = nn.relu(self.norm(name="bn1")(y))
        if self.dcn is not None:
            y = canvas.apply(y, None if valid_out is None else valid_out * self.stride)
        elif self.stride == 1:
            y = canvas.apply(y, valid_out)
        # style='pytorch': the stride sits on the 3x3 conv, not on the first 1x1.
        if self.dcn is not None:
            y = self.dcn(width, 3, strides=self.stride, padding=1, groups=self.groups,
                         name="conv2")(y)
        else:
            y = self.conv(width, (3, 3), (self.stride, self.stride), torch_padding(3),
                          feature_group_count=self.groups, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.planes * 4, (1, 1), (1, 1), ((0, 0), (0, 0)), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(y)
        if self.has_downsample:
            identity = self.conv(self.planes * 4, (1, 1), (self.stride, self.stride),
                                 ((0, 0), (0, 0)), name="downsample_0")(x)
            identity = self.norm(name="downsample_1")(identity)
        return canvas.apply(nn.relu(y + identity), valid_out)


def block_layout(depth: int) -> list[list[tuple[int, bool]]]:
    """Per stage, per block: (stride, has_downsample), exactly as mmdet builds them.

    A block has a downsample shortcut when its stride is not 1 or its input width differs
    from its output width (only the first block of a stage can).
    """
    kind, stage_blocks = ARCH_SETTINGS[depth]
    expansion = EXPANSION[kind]
    inplanes = 64
    layout = []
    for stage, num_blocks in enumerate(stage_blocks):
        planes = 64 * 2**stage
        stride = 1 if stage == 0 else 2
        blocks = [(stride, stride != 1 or inplanes != planes * expansion)]
        blocks += [(1, False)] * (num_blocks - 1)
        inplanes = planes * expansion
        layout.append(blocks)
    return layout


class ResNet(nn.Module):
    """mmdet `ResNet(style='pytorch', out_indices=(0,1,2,3))` returning C2..C5.

    `groups > 1` gives mmdet's `ResNeXt(groups, base_width)` (e.g. 64x4d); a True in
    `stage_with_dcn` makes the 3x3 conv of every bottleneck of that stage a `DCNv2`
    (mmdet `dcn=dict(type='DCNv2', deformable_groups=1, fallback_on_stride=False)`).
    """

    depth: int = 50
    groups: int = 1
    base_width: int = 4
    stage_with_dcn: Sequence[bool] = (False, False, False, False)
    dtype: Dtype = jnp.float32
    precision: Any = None
    conv_impl: str = "xla"  # `models.conv` implementation, resolved (not for DCN)

    @nn.compact
    def __call__(self, x: jax.Array, canvas_hw: jax.Array | None = None
                 ) -> tuple[jax.Array, ...]:
        """[B, H, W, 3] -> (C2, C3, C4, C5), each [B, H/s, W/s, C_s] for s = 4, 8, 16, 32.

        canvas_hw [B, 2] int32 (multiples of 32; None: the whole input): each image is
        computed as if the input ended there (`models.canvas`); outputs are zero past it.
        The input itself must already be zero outside the canvas (it is padding).
        """
        if self.depth not in ARCH_SETTINGS:
            raise ValueError(f"unsupported ResNet depth {self.depth}; "
                             f"choose from {sorted(ARCH_SETTINGS)}")
        kind, _ = ARCH_SETTINGS[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        if kind == "basic" and (self.groups != 1 or any(self.stage_with_dcn)):
            raise ValueError("BasicBlock (ResNet-18/34) supports neither groups nor DCN "
                             "(as in mmdet)")
        if len(self.stage_with_dcn) != 4:
            raise ValueError(f"stage_with_dcn needs 4 entries, got {self.stage_with_dcn}")
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                 precision=self.precision, kernel_init=kaiming_fan_out,
                                 conv_general_dilated=conv_function(self.conv_impl))
        # Inference-mode BN only (norm_eval=True); stats live in `batch_stats`.
        norm = functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9,
                                 epsilon=BN_EPS, dtype=self.dtype)

        x = x.astype(self.dtype)
        x = conv(64, (7, 7), (2, 2), torch_padding(7), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        # torch MaxPool2d(3, 2, padding=1) pads with -inf; padded explicitly (the same
        # values as max_pool's own padding) because jax2onnx's ONNX export of
        # max_pool takes no explicit padding pairs.
        # Inside the canvas, the stride-2 stem conv and pool read only canvas pixels.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2))
        x = canvas.apply(x, canvas.level(canvas_hw, 4))

        outs = []
        for stage, blocks in enumerate(block_layout(self.depth)):
            planes = 64 * 2**stage
            valid = canvas.level(canvas_hw, 4 * 2**stage)
            extra = {}
            if kind == "bottleneck":
                dcn = (functools.partial(DCNv2, use_bias=False, dtype=self.dtype,
                                         precision=self.precision)
                       if self.stage_with_dcn[stage] else None)
                extra = dict(groups=self.groups, base_width=self.base_width, dcn=dcn)
            for b, (stride, has_downsample) in enumerate(blocks):
                x = block_cls(planes=planes, stride=stride, has_downsample=has_downsample,
                              conv=conv, norm=norm, name=f"layer{stage + 1}_{b}",
                              **extra)(x, valid)
            outs.append(x)
        return tuple(outs)


def resnet_out_channels(depth: int) -> Sequence[int]:
    """Channels of C2..C5 for a ResNet depth."""
    kind, _ = ARCH_SETTINGS[depth]
    return tuple(64 * 2**s * EXPANSION[kind] for s in range(4))
