"""Feature Pyramid Network, matching mmdet 3.3.0 `FPN` as SOLOv2 configures it.

`start_level=0`, `add_extra_convs=False`, no norm, no activation: lateral 1x1 convs and
3x3 output convs (both with bias), a nearest-neighbour top-down pathway, and extra levels
from stride-2 max pooling (kernel 1) of the last output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solov2_jax import ops
from solov2_jax.models import canvas
from solov2_jax.models.layers import ConvModule

Dtype = Any

# mmdet's FPN init_cfg: Xavier(uniform, gain 1) on every Conv2d, bias 0.
xavier_uniform = nn.initializers.xavier_uniform()


class FPN(nn.Module):
    """mmdet `FPN(out_channels, num_outs)`: (C2..C5) -> (P2..P{num_outs+1})."""

    out_channels: int = 256
    num_outs: int = 5
    dtype: Dtype = jnp.float32
    precision: Any = None
    conv_impl: str = "xla"  # `models.conv` implementation, resolved

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], canvas_hw: jax.Array | None = None
                 ) -> tuple[jax.Array, ...]:
        """(C2..C5) [B, H/s, W/s, C_s] -> num_outs maps [B, H/s, W/s, out_channels].

        canvas_hw [B, 2] int32 (input pixels; None: the whole maps): outputs are computed
        as if each map ended at the canvas and are zero past it.
        """
        strides = [4 * 2**i for i in range(len(inputs))]
        num_ins = len(inputs)
        if self.num_outs < num_ins:
            raise ValueError(f"num_outs={self.num_outs} < number of inputs {num_ins}")

        def conv(kernel, name):
            return ConvModule(self.out_channels, kernel, gn_groups=None, activation=False,
                              kernel_init=xavier_uniform, dtype=self.dtype,
                              precision=self.precision, conv_impl=self.conv_impl,
                              name=name)

        laterals = [conv(1, f"lateral_convs_{i}")(x) for i, x in enumerate(inputs)]
        # Top-down: upsample to the exact size of the lower level (torch 'nearest'), which
        # also handles odd sizes where 2x would not fit.
        for i in range(num_ins - 1, 0, -1):
            size = laterals[i - 1].shape[1:3]
            laterals[i - 1] = laterals[i - 1] + ops.interpolate_nearest(laterals[i], size)
        # The 3x3 output convs zero their inputs past the canvas; their outputs (biased)
        # are zeroed there too, so every later stage starts from clean maps.
        valid = [canvas.level(canvas_hw, s) for s in strides]
        outs = [canvas.apply(conv(3, f"fpn_convs_{i}")(lat, valid[i]), valid[i])
                for i, lat in enumerate(laterals)]
        # Extra levels: F.max_pool2d(x, kernel_size=1, stride=2) is plain subsampling.
        for _ in range(self.num_outs - num_ins):
            outs.append(outs[-1][:, ::2, ::2, :])
        return tuple(outs)
