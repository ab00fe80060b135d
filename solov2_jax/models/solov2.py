"""SOLOv2 network: ResNet backbone -> FPN neck -> SOLOv2 head (raw outputs only).

Submodule names are mmdet's top-level names (`backbone`, `neck`, `mask_head`), so a
parameter path reads like the mmdet state_dict key it comes from, e.g.
`params['mask_head']['kernel_convs_0']['conv']['kernel']` <- `mask_head.kernel_convs.0.conv.weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solov2_jax.models.fpn import FPN
from solov2_jax.models.resnet import ResNet
from solov2_jax.models.solov2_head import SOLOV2Head
from solov2_jax.structures import SOLOv2Output

Dtype = Any


class SOLOv2(nn.Module):
    """mmdet `SOLOv2` up to the head outputs: `extract_feat` + `mask_head.forward`."""

    depth: int = 50
    # ResNeXt when groups > 1 (mmdet `ResNeXt(groups, base_width)`); DCNv2 placement as in
    # mmdet's *-dcn configs (see `ResNet` and `SOLOV2Head`).
    groups: int = 1
    base_width: int = 4
    stage_with_dcn: Sequence[bool] = (False, False, False, False)
    head_dcn: str = "none"
    mask_feature_dcn: bool = False
    fpn_channels: int = 256
    fpn_num_outs: int = 5
    num_classes: int = 80
    feat_channels: int = 512
    stacked_convs: int = 4
    num_grids: Sequence[int] = (40, 36, 24, 16, 12)
    gn_groups: int = 32
    mask_feature_channels: int = 128
    mask_out_channels: int = 256
    dynamic_conv_size: int = 1
    dtype: Dtype = jnp.float32
    # None: XLA's default (TF32 on recent GPUs); jax.lax.Precision.HIGHEST for parity.
    precision: Any = None
    # Convolution implementation (`models.conv`), resolved: 'xla', 'shifted' or 'im2col'.
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array, canvas_hw: jax.Array | None = None
                 ) -> SOLOv2Output:
        """[B, Hp, Wp, 3] normalised, zero-padded RGB (Hp, Wp multiples of 32) -> outputs.

        canvas_hw [B, 2] int32: mmdet's padded input size of each image (its batch's
        largest image rounded up to 32, <= (Hp, Wp)); every output is what mmdet computes
        on that canvas, zero past it (`models.canvas`). None: the canvas is the input.
        BatchNorm is always in inference mode, so there is no `train` flag: the same call
        serves training (grads through params) and evaluation.
        """
        backbone = ResNet(depth=self.depth, groups=self.groups, base_width=self.base_width,
                          stage_with_dcn=tuple(self.stage_with_dcn), dtype=self.dtype,
                          precision=self.precision, conv_impl=self.conv_impl,
                          name="backbone")(images, canvas_hw)
        fpn = FPN(out_channels=self.fpn_channels, num_outs=self.fpn_num_outs,
                  dtype=self.dtype, precision=self.precision, conv_impl=self.conv_impl,
                  name="neck")(backbone, canvas_hw)
        kernel_preds, cls_preds, mask_feats = SOLOV2Head(
            num_classes=self.num_classes,
            feat_channels=self.feat_channels,
            stacked_convs=self.stacked_convs,
            num_grids=tuple(self.num_grids),
            gn_groups=self.gn_groups,
            mask_feature_channels=self.mask_feature_channels,
            mask_out_channels=self.mask_out_channels,
            dynamic_conv_size=self.dynamic_conv_size,
            head_dcn=self.head_dcn,
            mask_feature_dcn=self.mask_feature_dcn,
            dtype=self.dtype,
            precision=self.precision,
            conv_impl=self.conv_impl,
            name="mask_head",
        )(fpn, canvas_hw)
        return SOLOv2Output(
            backbone=tuple(backbone),
            fpn=tuple(fpn),
            mask_feats=mask_feats,
            kernel_preds=kernel_preds,
            cls_preds=cls_preds,
        )
