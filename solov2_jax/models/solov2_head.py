"""SOLOv2 head (forward only), matching mmdet 3.3.0 `SOLOV2Head` and `MaskFeatModule`.

Outputs are raw: per-level dynamic kernels and category logits on S x S grids, plus the
unified mask features at stride 4. Targets, losses and post-processing live elsewhere.
Submodule names mirror mmdet's (`kernel_convs_{i}/conv|gn`, `cls_convs_{i}`,
`conv_kernel`, `conv_cls`, `mask_feature_head/convs_all_levels_{i}/conv{j}`,
`mask_feature_head/conv_pred`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solov2_jax import ops
from solov2_jax.models import canvas
from solov2_jax.models.conv import conv_function
from solov2_jax.models.layers import ConvModule

Dtype = Any

# mmdet's head init: Normal(std=0.01) on every Conv2d, bias 0.
normal_init = nn.initializers.normal(0.01)
# `bias_prob=0.01` on conv_cls: sigmoid(bias) = 0.01 at initialisation.
CLS_PRIOR_PROB = 0.01
CLS_BIAS_INIT = -math.log((1 - CLS_PRIOR_PROB) / CLS_PRIOR_PROB)


def dcn_stacked_conv_indices(head_dcn: str, stacked_convs: int) -> list[int]:
    """Which kernel/cls stacked convs are DCNv2: mmdet `dcn_cfg` + `dcn_apply_to_all_conv`.

    head_dcn: 'none' (dcn_cfg=None), 'all' (dcn_apply_to_all_conv=True) or 'last' (False:
    only the last stacked conv, the light-DCN head).
    """
    if head_dcn not in ("none", "all", "last"):
        raise ValueError(f"head_dcn must be 'none', 'all' or 'last', got {head_dcn!r}")
    if head_dcn == "all":
        return list(range(stacked_convs))
    return [stacked_convs - 1] if head_dcn == "last" and stacked_convs > 0 else []


class LevelConvs(nn.Module):
    """One level of the mask-feature branch (mmdet's `nn.Sequential` of `conv{j}`)."""

    num_convs: int
    features: int
    upsample: bool
    gn_groups: int = 32
    dcn: bool = False  # DCNv2 convs (mmdet mask_feature_head conv_cfg=dict(type='DCNv2'))
    dtype: Dtype = jnp.float32
    precision: Any = None
    conv_impl: str = "xla"  # `models.conv` implementation, resolved

    @nn.compact
    def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
        """[B, H, W, Cin] -> [B, H * 2^n, W * 2^n, features] (n = num_convs if upsample).

        valid_hw [B, 2]: the canvas at the input resolution (None: all of it).
        """
        for j in range(self.num_convs):
            x = ConvModule(self.features, 3, gn_groups=self.gn_groups, dcn=self.dcn,
                           kernel_init=normal_init, dtype=self.dtype, precision=self.precision,
                           conv_impl=self.conv_impl, name=f"conv{j}")(x, valid_hw)
            if self.upsample:
                x = canvas.upsample2x(x, valid_hw).astype(self.dtype)
                valid_hw = None if valid_hw is None else 2 * valid_hw
        return x


class MaskFeatModule(nn.Module):
    """Mask-feature branch: fuses P2..P5 into one stride-4 map of `out_channels`."""

    feat_channels: int = 128
    out_channels: int = 256
    num_levels: int = 4  # mmdet start_level=0, end_level=3
    gn_groups: int = 32
    dcn: bool = False  # every conv (incl. the 1x1 conv_pred) a DCNv2, as mmdet's conv_cfg
    dtype: Dtype = jnp.float32
    precision: Any = None
    conv_impl: str = "xla"  # `models.conv` implementation, resolved

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], canvas_hw: jax.Array | None = None
                 ) -> jax.Array:
        """(P2..P5, ...) [B, H/s, W/s, F] -> [B, H/4, W/4, out_channels].

        canvas_hw [B, 2] (input pixels; None: the whole maps): the output is zero past it.
        """
        fused = None
        for i, x in enumerate(inputs[: self.num_levels]):
            valid = canvas.level(canvas_hw, 4 * 2**i)
            # The deepest level also sees coordinates (CoordConv), which lets masks depend
            # on absolute position.
            if i == self.num_levels - 1 and i > 0:
                x = canvas.with_coordinates(x, valid)
            # Level i: max(i, 1) conv+GN+ReLU; for i > 0 each is followed by a bilinear
            # x2 upsample, so every level lands at stride 4.
            x = LevelConvs(max(i, 1), self.feat_channels, upsample=i > 0,
                           gn_groups=self.gn_groups, dcn=self.dcn, dtype=self.dtype,
                           precision=self.precision, conv_impl=self.conv_impl,
                           name=f"convs_all_levels_{i}")(x, valid)
            fused = x if fused is None else fused + x
        valid = canvas.level(canvas_hw, 4)
        out = ConvModule(self.out_channels, 1, gn_groups=self.gn_groups, dcn=self.dcn,
                         kernel_init=normal_init, dtype=self.dtype,
                         precision=self.precision, conv_impl=self.conv_impl,
                         name="conv_pred")(fused, valid)
        return canvas.apply(out, valid)


class SOLOV2Head(nn.Module):
    """mmdet `SOLOV2Head.forward`: kernels and category logits per level + mask features."""

    num_classes: int = 80
    feat_channels: int = 512
    stacked_convs: int = 4
    num_grids: Sequence[int] = (40, 36, 24, 16, 12)
    gn_groups: int = 32
    mask_feature_channels: int = 128
    mask_out_channels: int = 256
    dynamic_conv_size: int = 1
    # DCNv2 in the kernel/cls stacked convs: 'none', 'all' or 'last' (mmdet dcn_cfg +
    # dcn_apply_to_all_conv), and in every mask-feature conv (its conv_cfg).
    head_dcn: str = "none"
    mask_feature_dcn: bool = False
    dtype: Dtype = jnp.float32
    precision: Any = None
    conv_impl: str = "xla"  # `models.conv` implementation, resolved (not for DCN)

    def setup(self):
        # Shared across levels, so built in setup() and called once per level.
        # setup() names list entries `<attr>_<i>`: kernel_convs_0, ... as in mmdet.
        dcn = dcn_stacked_conv_indices(self.head_dcn, self.stacked_convs)

        def conv_module(i):
            return ConvModule(self.feat_channels, 3, gn_groups=self.gn_groups,
                              dcn=i in dcn, kernel_init=normal_init, dtype=self.dtype,
                              precision=self.precision, conv_impl=self.conv_impl)

        self.kernel_convs = [conv_module(i) for i in range(self.stacked_convs)]
        self.cls_convs = [conv_module(i) for i in range(self.stacked_convs)]
        conv_fn = conv_function(self.conv_impl)
        kernel_out = self.mask_out_channels * self.dynamic_conv_size**2
        self.conv_kernel = nn.Conv(kernel_out, (3, 3), padding=((1, 1), (1, 1)),
                                   kernel_init=normal_init, dtype=self.dtype,
                                   precision=self.precision, conv_general_dilated=conv_fn)
        self.conv_cls = nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)),
                                kernel_init=normal_init,
                                bias_init=nn.initializers.constant(CLS_BIAS_INIT),
                                dtype=self.dtype, precision=self.precision,
                                conv_general_dilated=conv_fn)
        self.mask_feature_head = MaskFeatModule(
            feat_channels=self.mask_feature_channels, out_channels=self.mask_out_channels,
            gn_groups=self.gn_groups, dcn=self.mask_feature_dcn, dtype=self.dtype,
            precision=self.precision, conv_impl=self.conv_impl)

    @staticmethod
    def resize_feats(feats: Sequence[jax.Array], canvas_hw: jax.Array | None = None
                     ) -> list[tuple[jax.Array, jax.Array | None]]:
        """mmdet `resize_feats`: P2 bilinear x0.5, last level bilinear to the previous size.

        Returns (map, its canvas [B, 2] or None) per level. Sizes are even at P2 (canvases
        are multiples of 32), where torch's scale_factor=0.5 and our size-based resize use
        the same source coordinates and read only canvas pixels. P6 -> P5 depends on the
        canvas sizes (e.g. 13 -> 25 rows), hence per-image operators.
        """
        out = []
        for i, x in enumerate(feats):
            valid = canvas.level(canvas_hw, 4 * 2**i)
            if i == 0:
                h, w = x.shape[1:3]
                x = ops.interpolate_bilinear(x, (h // 2, w // 2))
                valid = canvas.level(canvas_hw, 8)
            elif i == len(feats) - 1:
                prev = canvas.level(canvas_hw, 4 * 2 ** (i - 1))
                x = canvas.resize(x, valid, feats[i - 1].shape[1:3], prev)
                valid = prev
            out.append((x, valid))
        return out

    def __call__(self, feats: Sequence[jax.Array], canvas_hw: jax.Array | None = None):
        """(P2..P6) [B, H/s, W/s, F] -> (kernel_preds, cls_preds, mask_feats).

        kernel_preds: L arrays [B, S_l, S_l, E]; cls_preds: L arrays [B, S_l, S_l, C];
        mask_feats: [B, H/4, W/4, E] (zero past the canvas). canvas_hw [B, 2] int32 in
        input pixels, None for the whole maps (`models.canvas`).
        """
        if len(feats) != len(self.num_grids):
            raise ValueError(f"expected {len(self.num_grids)} levels, got {len(feats)}")
        mask_feats = self.mask_feature_head(feats, canvas_hw)
        kernel_preds, cls_preds = [], []
        for (x, valid), grid in zip(self.resize_feats(feats, canvas_hw), self.num_grids,
                                    strict=True):
            # Coordinates are added at the level's own resolution and resized with the
            # features, as mmdet does (not generated directly at S x S); both span the
            # canvas only.
            x = canvas.resize(canvas.with_coordinates(x, valid), valid,
                              (grid, grid)).astype(self.dtype)
            kernel_feat, cate_feat = x, x[..., :-2]
            for conv in self.kernel_convs:
                kernel_feat = conv(kernel_feat)
            for conv in self.cls_convs:
                cate_feat = conv(cate_feat)
            kernel_preds.append(self.conv_kernel(kernel_feat))
            cls_preds.append(self.conv_cls(cate_feat))
        return tuple(kernel_preds), tuple(cls_preds), mask_feats
