"""Modulated deformable convolution (DCNv2), matching mmcv 2.1.0's `ModulatedDeformConv2dPack`.

`modulated_deform_conv` is the operator (mmcv's `modulated_deform_conv2d`), `DCNv2` the
Flax module (mmcv registers the pack as `DCNv2`): a plain conv `conv_offset` predicts,
per output position and kernel tap, an offset (dy, dx) and a modulation mask; the main
kernel then convolves the input sampled bilinearly at the shifted taps.

Semantics (mmcv's CPU/CUDA `modulated_deformable_im2col`):

- tap (i, j) of output (ho, wo) samples at `h = ho * stride - pad + i * dil + dy`,
  `w = wo * stride - pad + j * dil + dx`;
- a sample outside `-1 < h < H`, `-1 < w < W` is 0; inside, bilinear interpolation where
  each of the four corners contributes only if it lies inside the image (corners outside
  read 0);
- the sampled value is multiplied by the mask, then `out = sum(kernel * sampled) + bias`.

Formulation (see DESIGN.md): the input is zero-padded by one pixel and flattened to rows
of channels; per (position, tap) four row gathers fetch the bilinear corners (corners
outside the image land on the zero border, which is exactly mmcv's "a corner contributes
only if inside"), their weighted sum (bilinear x mask x in-range) gives im2col columns
`[B, Ho, Wo, k*k*C]`, and one matmul (batched over conv groups) applies the kernel.
Everything is static-shape and differentiable by JAX's autodiff; the gradients equal
mmcv's hand-written backward (its `col2im` / `col2im_coord` are the derivatives of the
same piecewise-bilinear function).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Any


def mmcv_dcn_kernel_init(in_channels: int) -> Initializer:
    """mmcv `ModulatedDeformConv2d.init_weights`: U(-1/sqrt(n), 1/sqrt(n)), n = Cin * k * k.

    mmcv's n counts all `in_channels`, also for a grouped conv (kernel shape HWIO).
    """

    def init(key, shape, dtype=jnp.float32):
        kh, kw = shape[:2]
        stdv = 1.0 / math.sqrt(in_channels * kh * kw)
        return jax.random.uniform(key, shape, dtype, -stdv, stdv)

    return init


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def deform_columns(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel_size: tuple[int, int],
                   stride: int = 1, padding: int = 0, dilation: int = 1,
                   deform_groups: int = 1) -> jax.Array:
    """mmcv's modulated im2col: [B, H, W, C] -> columns [B, Ho, Wo, kh * kw, C].

    offset: [B, Ho, Wo, deform_groups * kh * kw * 2] in mmcv's channel order (per
    deformable group, per tap t = i * kw + j: dy, dx); mask: [B, Ho, Wo, deform_groups *
    kh * kw]. Column `[..., t, c]` is the bilinear sample of channel c at tap t, times the
    tap's mask (the channels of deformable group g use the offsets and mask of group g).
    """
    b, h, w, c = x.shape
    kh, kw = kernel_size
    kk = kh * kw
    dg = deform_groups
    if c % dg:
        raise ValueError(f"{c} channels are not divisible by {dg} deformable groups")
    cg = c // dg
    ho = _out_size(h, kh, stride, padding, dilation)
    wo = _out_size(w, kw, stride, padding, dilation)
    if offset.shape != (b, ho, wo, dg * kk * 2):
        raise ValueError(f"offset shape {offset.shape}, expected {(b, ho, wo, dg * kk * 2)}")
    if mask.shape != (b, ho, wo, dg * kk):
        raise ValueError(f"mask shape {mask.shape}, expected {(b, ho, wo, dg * kk)}")

    # Sampling positions [B, Ho, Wo, kk, dg] in float32 (coordinates never in low precision),
    # tap-major so that the gathered columns need no transpose.
    off = offset.astype(jnp.float32).reshape(b, ho, wo, dg, kk, 2).transpose(0, 1, 2, 4, 3, 5)
    tap_i = jnp.repeat(jnp.arange(kh) * dilation, kw)  # [kk]
    tap_j = jnp.tile(jnp.arange(kw) * dilation, kh)
    base_h = (jnp.arange(ho) * stride - padding)[:, None, None] + tap_i  # [Ho, 1, kk]
    base_w = (jnp.arange(wo) * stride - padding)[None, :, None] + tap_j  # [1, Wo, kk]
    # Flattened to [B, Ho, Wo, kk * dg]: 4-D gather indices (5-D ones made XLA CPU's
    # scatter-add in the backward pass 2.5x slower).
    py = (base_h[..., None].astype(jnp.float32) + off[..., 0]).reshape(b, ho, wo, kk * dg)
    px = (base_w[..., None].astype(jnp.float32) + off[..., 1]).reshape(b, ho, wo, kk * dg)

    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    # The tap's mask, zero for a sample outside the image (its index is clamped to any
    # valid pixel below).
    m = mask.astype(jnp.float32).reshape(b, ho, wo, dg, kk).transpose(0, 1, 2, 4, 3)
    m = (m.reshape(b, ho, wo, kk * dg) * inside).astype(x.dtype)

    # Rows of the zero-padded input, one per (pixel, deformable group). A top-left corner
    # y0 in [-1, H-1] is padded row y0 + 1, and its lower/right neighbours exist; samples
    # with y0 outside that range are outside the image (mask 0). Corners outside the image
    # land on the zero border: mmcv's "a corner contributes only if it is inside".
    rows = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, cg)
    r = jnp.clip(y0, -1, h - 1).astype(jnp.int32) + 1
    s = jnp.clip(x0, -1, w - 1).astype(jnp.int32) + 1
    top_left = ((jnp.arange(b)[:, None, None, None] * (h + 2) + r) * (w + 2) + s) * dg \
        + jnp.tile(jnp.arange(dg), kk)  # [B, Ho, Wo, kk * dg]
    cols = None
    for dy, dx, weight in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        # One row gather per corner, fused by XLA into the weighted sum (measured faster
        # on CPU than one gather of packed neighbours; see DESIGN.md).
        corner = rows.at[top_left + (dy * (w + 2) + dx) * dg].get(mode="promise_in_bounds")
        term = (weight.astype(x.dtype) * m)[..., None] * corner
        cols = term if cols is None else cols + term
    # [B, Ho, Wo, kk * dg, cg] -> [B, Ho, Wo, kk, C] (channel c = g * cg + i).
    return cols.reshape(b, ho, wo, kk, c)


def modulated_deform_conv(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array,
                          bias: jax.Array | None = None, *, stride: int = 1, padding: int = 0,
                          dilation: int = 1, groups: int = 1, deform_groups: int = 1,
                          precision: Any = None) -> jax.Array:
    """mmcv `modulated_deform_conv2d`, channels-last.

    x: [B, H, W, C]; offset / mask as in `deform_columns`; kernel: HWIO
    [kh, kw, C / groups, Cout] (torch weight [Cout, C / groups, kh, kw] transposed);
    bias: [Cout] or None. Returns [B, Ho, Wo, Cout].
    """
    kh, kw, cin_g, cout = kernel.shape
    c = x.shape[-1]
    if cin_g * groups != c or cout % groups:
        raise ValueError(f"kernel {kernel.shape} does not fit {c} channels in {groups} groups")
    cols = deform_columns(x, offset, mask, (kh, kw), stride, padding, dilation, deform_groups)
    b, ho, wo = cols.shape[:3]
    # One matmul over (tap, channel) per group: [B*Ho*Wo, kk*C/G] @ [kk*C/G, Cout/G].
    kk, n = kh * kw, b * ho * wo
    kernel = kernel.astype(cols.dtype)
    if groups == 1:
        out = jnp.dot(cols.reshape(n, kk * c), kernel.reshape(kk * c, cout),
                      precision=precision)
    else:
        # Group-major operands for one batched matmul: [G, N, kk*C/G] @ [G, kk*C/G, Cout/G].
        cols = cols.reshape(n, kk, groups, cin_g).transpose(2, 0, 1, 3)
        k = kernel.reshape(kk, cin_g, groups, cout // groups).transpose(2, 0, 1, 3)
        out = jnp.matmul(cols.reshape(groups, n, kk * cin_g),
                         k.reshape(groups, kk * cin_g, cout // groups), precision=precision)
        out = out.transpose(1, 0, 2)
    out = out.reshape(b, ho, wo, cout)
    if bias is not None:
        out = out + bias.astype(out.dtype)
    return out


class DCNv2(nn.Module):
    """mmcv `ModulatedDeformConv2dPack` (registered as `DCNv2`), NHWC.

    Parameters mirror mmcv's state_dict: `kernel` (<- `weight`), `bias` (<- `bias`, only
    with `use_bias`) and the offset/mask predictor `conv_offset` (<- `conv_offset.weight`,
    `conv_offset.bias`), a plain conv with the same kernel size, stride, padding and
    dilation and `deform_groups * 3 * k * k` outputs, zero-initialised as in mmcv (so a
    fresh DCNv2 is a plain conv with the kernel halved: offsets 0, masks sigmoid(0)).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | None = None  # None: kernel_size // 2 * dilation
    dilation: int = 1
    groups: int = 1
    deform_groups: int = 1
    use_bias: bool = True
    kernel_init: Initializer | None = None  # None: mmcv's uniform init
    bias_init: Initializer = nn.initializers.zeros
    # mmcv zero-initialises conv_offset; mmdet's SOLOv2 head init (Normal(0.01) on every
    # Conv2d) re-initialises it there.
    offset_kernel_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, Ho, Wo, features]."""
        k = self.kernel_size
        pad = self.kernel_size // 2 * self.dilation if self.padding is None else self.padding
        c = x.shape[-1]
        if c % self.groups or self.features % self.groups:
            raise ValueError(f"channels {c} -> {self.features} not divisible by "
                             f"groups={self.groups}")
        kernel_init = self.kernel_init or mmcv_dcn_kernel_init(c)
        kernel = self.param("kernel", kernel_init, (k, k, c // self.groups, self.features))
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        kk = k * k
        out = nn.Conv(self.deform_groups * 3 * kk, (k, k), (self.strides, self.strides),
                      padding=((pad, pad), (pad, pad)),
                      kernel_dilation=(self.dilation, self.dilation),
                      kernel_init=self.offset_kernel_init, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, precision=self.precision, name="conv_offset")(x)
        # mmcv: o1, o2, m = chunk(out, 3, dim=1); offset = cat(o1, o2); mask = sigmoid(m).
        # The concatenated offset channels are then read as (dy, dx) pairs per tap.
        n = self.deform_groups * kk
        offset = out[..., : 2 * n]
        mask = jax.nn.sigmoid(out[..., 2 * n:].astype(jnp.float32))
        x = x.astype(self.dtype)
        return modulated_deform_conv(
            x, offset, mask, kernel.astype(self.dtype),
            None if bias is None else bias.astype(self.dtype), stride=self.strides,
            padding=pad, dilation=self.dilation, groups=self.groups,
            deform_groups=self.deform_groups, precision=self.precision)
