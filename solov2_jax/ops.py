"""Resampling with PyTorch's exact semantics (`F.interpolate`), channels-last.

mmdet resizes with `align_corners=False` bilinear (no antialiasing, also when shrinking)
and `nearest` = `floor(dst * in / out)`. `jax.image.resize` antialiases when shrinking and
rounds differently for nearest, so we build the 1-D interpolation operators ourselves and
apply them as two small matmuls. The operators may depend on traced sizes (`valid_in`,
`out_len`), which lets post-processing crop and resize each image of a batch to its own
size inside one static-shape program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_weights(out_size: int, in_size: int, valid_in=None, valid_out=None) -> jax.Array:
    """[out_size, in_size] operator of torch bilinear resize (align_corners=False).

    Resizes the first `valid_in` input samples onto the first `valid_out` output samples
    (defaults: all). Rows >= valid_out are zero. `valid_in`/`valid_out` may be traced.
    """
    valid_in = in_size if valid_in is None else valid_in
    valid_out = out_size if valid_out is None else valid_out
    vin = jnp.asarray(valid_in, jnp.float32)
    vout = jnp.asarray(valid_out, jnp.float32)
    # torch: scale = in / out; src = max(scale * (dst + 0.5) - 0.5, 0)
    scale = vin / vout
    dst = jnp.arange(out_size, dtype=jnp.float32)
    src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    last = jnp.asarray(valid_in, jnp.int32) - 1
    i0 = jnp.minimum(i0, last)
    i1 = jnp.minimum(i0 + 1, last)
    l1 = src - i0.astype(jnp.float32)
    l0 = 1.0 - l1
    cols = jnp.arange(in_size, dtype=jnp.int32)
    w = l0[:, None] * (cols[None, :] == i0[:, None]) + l1[:, None] * (cols[None, :] == i1[:, None])
    row_ok = jnp.arange(out_size) < jnp.asarray(valid_out, jnp.int32)
    return jnp.where(row_ok[:, None], w, 0.0).astype(jnp.float32)


def interpolate_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(x, size, mode='bilinear', align_corners=False)` on [B, H, W, C]."""
    h, w = x.shape[1:3]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    wy = bilinear_weights(out_h, h)
    wx = bilinear_weights(out_w, w)
    hp = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", wy, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", wx, y, precision=hp)


def interpolate_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(x, size, mode='nearest')` on [B, H, W, C]: src = floor(dst*in/out)."""
    h, w = x.shape[1:3]
    out_h, out_w = size
    # torch computes the scale in float32 and floors the product.
    iy = np.minimum(
        np.floor(np.arange(out_h, dtype=np.float32) * np.float32(h / out_h)).astype(np.int64), h - 1
    )
    ix = np.minimum(
        np.floor(np.arange(out_w, dtype=np.float32) * np.float32(w / out_w)).astype(np.int64), w - 1
    )
    return x[:, iy][:, :, ix]


@functools.cache
def linspace_table(size: int) -> np.ndarray:
    """[size, size] float32: row n - 1 holds torch.linspace(-1, 1, n) in its first n slots.

    torch fills the first half as start + step * i and the second as end - step * (n-1-i),
    each with one rounding (a fused multiply-add: float64 here is exact for these
    products); the canvas size is traced, so every length gets its row.
    """
    out = np.zeros((size, size), np.float32)
    out[0, 0] = -1.0  # torch.linspace(-1, 1, 1) == [-1]
    for n in range(2, size + 1):
        step = np.float64(np.float32(2.0 / (n - 1)))
        i = np.arange(n, dtype=np.float64)
        out[n - 1, :n] = np.where(i < n // 2, -1.0 + step * i, 1.0 - step * (n - 1 - i))
    return out


def coordinate_channels(batch: int, h: int, w: int, dtype=jnp.float32) -> jax.Array:
    """mmdet `generate_coordinate` in NHWC: [B, h, w, 2] with channels (x, y) in [-1, 1]."""
    x = jnp.asarray(linspace_table(w)[w - 1], dtype)
    y = jnp.asarray(linspace_table(h)[h - 1], dtype)
    yy, xx = jnp.meshgrid(y, x, indexing="ij")
    coord = jnp.stack([xx, yy], axis=-1)
    return jnp.broadcast_to(coord[None], (batch, h, w, 2))
