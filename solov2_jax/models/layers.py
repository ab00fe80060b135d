"""mmcv's `ConvModule` (conv -> optional GroupNorm -> optional ReLU) with torch padding.

Submodules are named `conv` and `gn` like mmcv's, so a checkpoint key
`<prefix>.conv.weight` / `<prefix>.gn.weight` maps to `<prefix>/conv/kernel` /
`<prefix>/gn/scale`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solov2_jax.models import canvas
from solov2_jax.models.conv import conv_function
from solov2_jax.models.dcn import DCNv2

Dtype = Any
Initializer = Any

# torch's GroupNorm default.
GN_EPS = 1e-5


class ConvModule(nn.Module):
    """mmcv `ConvModule`: k x k conv (stride 1, padding k // 2), GN and ReLU optional.

    As in mmcv (`bias='auto'`), the conv has a bias only when no norm layer follows.
    `dcn=True` makes the conv mmcv's `DCNv2` (`conv_cfg=dict(type='DCNv2')`), still named
    `conv`; `kernel_init` then initialises its offset predictor (mmdet's head init hits
    every Conv2d) and the DCN kernel keeps mmcv's own init.
    """

    features: int
    kernel_size: int = 3
    gn_groups: int | None = None  # None: no GroupNorm
    activation: bool = True
    dcn: bool = False
    kernel_init: Initializer = nn.initializers.normal(0.01)
    dtype: Dtype = jnp.float32
    precision: Any = None
    conv_impl: str = "xla"  # a resolved `models.conv` implementation (not DCN's)

    @nn.compact
    def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
        """[B, H, W, Cin] -> [B, H, W, features].

        valid_hw [B, 2]: the canvas at this resolution (`models.canvas`); the input is
        zeroed outside it (a k > 1 conv must see zero padding there) and GroupNorm
        statistics cover it alone. The output outside the canvas is left as computed.
        """
        p = self.kernel_size // 2
        mask = None if valid_hw is None else canvas.valid_mask(valid_hw, x.shape[1:3])
        # A deformable conv samples anywhere (also a 1x1 one): its input is always masked.
        if mask is not None and (self.kernel_size > 1 or self.dcn):
            x = jnp.where(mask, x, jnp.zeros((), x.dtype))
        if self.dcn:
            x = DCNv2(self.features, self.kernel_size, padding=p,
                      use_bias=self.gn_groups is None, offset_kernel_init=self.kernel_init,
                      dtype=self.dtype, precision=self.precision, name="conv")(x)
        else:
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                padding=((p, p), (p, p)),
                use_bias=self.gn_groups is None,
                kernel_init=self.kernel_init,
                dtype=self.dtype,
                precision=self.precision,
                conv_general_dilated=conv_function(self.conv_impl),
                name="conv",
            )(x)
        if self.gn_groups is not None:
            # Two-pass variance (as torch) instead of E[x^2] - E[x]^2, which loses digits.
            gn_mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
            x = nn.GroupNorm(num_groups=self.gn_groups, epsilon=GN_EPS, dtype=self.dtype,
                             use_fast_variance=False, name="gn")(x, mask=gn_mask)
        if self.activation:
            x = nn.relu(x)
        return x
