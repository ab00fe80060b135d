"""mmdet's padded canvas inside a larger static input: masks, edges, coordinates, resizes.

mmdet pads each batch to its largest image rounded up to 32 (the *canvas*) and runs the
network on exactly that tensor. SOLOv2's output depends on the canvas, not only on the
image: the S x S grids, the coordinate channels and GroupNorm statistics span it, and
every convolution sees zeros past its border. Under static shapes we pad into a larger
bucket instead and make every stage behave as if the bucket ended at the canvas:

* every input of a spatial (k > 1) convolution is zero outside the canvas, as zero
  padding would be (`apply`); 1x1 convolutions are pointwise and need nothing;
* GroupNorm statistics are taken over the canvas only (`layers.ConvModule`);
* a bilinear x2 upsample clamps at the canvas edge as torch clamps at the tensor edge
  (`replicate_edge` before a static-size upsample);
* coordinate channels are torch's `linspace(-1, 1, n)` over the canvas (`coordinates`);
* resizes whose ratio depends on the tensor size (P6 -> P5, level -> S x S grid) read the
  canvas region only, with per-image operators (`resize`).

`valid_hw` arguments are [B, 2] int32: the number of canvas rows and columns at the
tensor's own resolution (`level(canvas_hw, stride)`); everything else is [B, H, W, C].
A `valid_hw` of None means "the whole tensor": every function then reduces to the plain
operation, bit for bit (the path the component parity tests exercise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from solov2_jax import ops


def level(canvas_hw: jax.Array | None, stride: int) -> jax.Array | None:
    """Canvas size at a feature stride: ceil(canvas / stride) (exact for stride <= 32)."""
    return None if canvas_hw is None else -(-jnp.asarray(canvas_hw, jnp.int32) // stride)


def valid_mask(valid_hw: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """[B, H, W, 1] bool: inside the canvas."""
    rows = jnp.arange(hw[0])[None, :] < valid_hw[:, :1]  # [B, H]
    cols = jnp.arange(hw[1])[None, :] < valid_hw[:, 1:]  # [B, W]
    return (rows[:, :, None] & cols[:, None, :])[..., None]


def apply(x: jax.Array, valid_hw: jax.Array | None) -> jax.Array:
    """Zeros `x` outside the canvas."""
    if valid_hw is None:
        return x
    return jnp.where(valid_mask(valid_hw, x.shape[1:3]), x, jnp.zeros((), x.dtype))


def replicate_edge(x: jax.Array, valid_hw: jax.Array) -> jax.Array:
    """Copies the last canvas row/column into the first row/column past it.

    A bilinear x2 upsample (align_corners=False) reads at most one sample past any
    output's source position, so after this a static-size upsample equals torch's
    edge-clamped upsample of the canvas alone on the whole upsampled canvas.
    """
    h, w = x.shape[1:3]
    prev_row = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
    x = jnp.where((jnp.arange(h)[None, :] == valid_hw[:, :1])[:, :, None, None], prev_row, x)
    prev_col = jnp.concatenate([x[:, :, :1], x[:, :, :-1]], axis=2)
    return jnp.where((jnp.arange(w)[None, :] == valid_hw[:, 1:])[:, None, :, None], prev_col, x)


def upsample2x(x: jax.Array, valid_hw: jax.Array | None) -> jax.Array:
    """torch `interpolate(scale_factor=2, bilinear)` of each image's canvas region."""
    h, w = x.shape[1:3]
    if valid_hw is not None:
        x = replicate_edge(x, valid_hw)
    return ops.interpolate_bilinear(x, (2 * h, 2 * w))


def _linspace(n: jax.Array, size: int, dtype) -> jax.Array:
    """torch.linspace(-1, 1, n) on the first n of `size` slots (traced n >= 1)."""
    return jnp.asarray(ops.linspace_table(size))[jnp.clip(n, 1, size) - 1].astype(dtype)


def coordinates(valid_hw: jax.Array, hw: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """mmdet `generate_coordinate` over each canvas: [B, H, W, 2] channels (x, y)."""
    xs = jax.vmap(lambda n: _linspace(n, hw[1], dtype))(valid_hw[:, 1])  # [B, W]
    ys = jax.vmap(lambda n: _linspace(n, hw[0], dtype))(valid_hw[:, 0])  # [B, H]
    b = valid_hw.shape[0]
    xx = jnp.broadcast_to(xs[:, None, :], (b, *hw))
    yy = jnp.broadcast_to(ys[:, :, None], (b, *hw))
    return jnp.stack([xx, yy], axis=-1)


def with_coordinates(x: jax.Array, valid_hw: jax.Array | None) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C + 2], appending the canvas's (x, y) coordinates."""
    b, h, w, _ = x.shape
    coord = (ops.coordinate_channels(b, h, w, x.dtype) if valid_hw is None
             else coordinates(valid_hw, (h, w), x.dtype))
    return jnp.concatenate([x, coord], axis=-1)


def resize(x: jax.Array, valid_in: jax.Array | None, size: tuple[int, int],
           valid_out: jax.Array | None = None) -> jax.Array:
    """torch bilinear resize of each image's [valid_in] region to [valid_out] (default: all
    of `size`), as per-image interpolation operators; rows/cols past valid_out are 0."""
    if valid_in is None and valid_out is None:
        return ops.interpolate_bilinear(x, size)
    out_h, out_w = size
    in_h, in_w = x.shape[1:3]
    if valid_in is None:
        valid_in = jnp.broadcast_to(jnp.asarray((in_h, in_w), jnp.int32), valid_out.shape)
    if valid_out is None:
        valid_out = jnp.broadcast_to(jnp.asarray(size, jnp.int32), valid_in.shape)
    weights = jax.vmap(ops.bilinear_weights, in_axes=(None, None, 0, 0))
    wy = weights(out_h, in_h, valid_in[:, 0], valid_out[:, 0])  # [B, out_h, in_h]
    wx = weights(out_w, in_w, valid_in[:, 1], valid_out[:, 1])  # [B, out_w, in_w]
    hp = jax.lax.Precision.HIGHEST
    y = jnp.einsum("boh,bhwc->bowc", wy, x, precision=hp)
    return jnp.einsum("bpw,bowc->bopc", wx, y, precision=hp).astype(x.dtype)
