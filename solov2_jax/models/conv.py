"""Convolution implementations selected per backend (`build_model(conv_impl=...)`).

Every conv of the model is a Flax `nn.Conv` (parameter names unchanged); the choice here
only swaps the function it calls for `lax.conv_general_dilated`:

- "xla": `lax.conv_general_dilated` and its autodiff, as XLA emits them (GPU, TPU).
- "shifted": same forward, same input gradient, but the weight gradient is computed as
  k*k matrix products, one per kernel tap: dW[i, j] = X_ij^T dY, where X_ij [N, Cin] is
  the (padded, strided, dilated) input shifted by tap (i, j) and dY [N, Cout] the output
  cotangent, N = B*OH*OW. XLA:CPU runs its weight-gradient convolutions at ~37 GFLOP/s
  (~25 for a 3x3 at P2, 9-13 for 1x1) against ~140-160 for the forward and
  input-gradient convolutions; the same FLOPs as plain dots run at matmul speed.
- "shifted_dot1x1": as "shifted", and every 1x1 conv (forward and autodiff) is a plain
  matrix product. Its forward sums over Cin in the matmul kernel's order, an ulp away
  from the conv kernel's on some shapes, so it is opt-in until it pays on a quiet machine
  (no gain measured on the loaded 2-core one; see experiments/bench_vs_mmdet.py).

Measured and dropped: the weight gradient as one im2col matmul (the k*k shifted inputs
concatenated into [N, k*k*Cin]): 1.3x slower than "shifted" on FPN P2's 3x3 weight
gradient, no better on the whole r50 step; XLA:CPU's YNNPACK convolution fusion off
(`backend.cpu_xla_flags`): no gain on top of "shifted".

"auto" (the default of `build_model`) resolves to "shifted" on the CPU backend and "xla"
everywhere else, at build time (`resolve`). Grouped, input-dilated or non-NHWC/HWIO convs
always take the XLA path. With "shifted" the forward values and input gradients are
XLA's own (bitwise equal to "xla"); only the weight gradient's summation order differs
(within 1e-5 of each tensor's largest value, tests/models/test_conv_vjp.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from solov2_jax.config import CONV_IMPLS as CHOICES

IMPLS = CHOICES[1:]  # CHOICES = config.CONV_IMPLS: ("auto", *IMPLS)


def resolve(conv_impl: str = "auto", backend: str | None = None) -> str:
    """'auto' -> 'shifted' on the CPU backend (`jax.default_backend()` unless `backend`
    is given), else 'xla'; an explicit implementation is returned as it is."""
    if conv_impl not in CHOICES:
        raise ValueError(f"conv_impl must be one of {', '.join(CHOICES)}, not {conv_impl!r}")
    if conv_impl != "auto":
        return conv_impl
    backend = jax.default_backend() if backend is None else backend
    return "shifted" if backend == "cpu" else "xla"


def _nhwc_hwio(ndim: int):
    return lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, ("NHWC", "HWIO", "NHWC"))


def _weight_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides,
                 padding, rhs_dilation, precision, dtype) -> jax.Array:
    """dL/dW [KH, KW, Cin, Cout] of y = conv(x, W) from x [B, H, W, Cin] and
    dy [B, OH, OW, Cout], accumulated in at least float32 (float64 under x64), returned
    in `dtype`.

    Tap (i, j) reads rows i*dh + sh*o of the padded input. Split into sh*sw phases
    (x[:, r::sh, c::sw], together one copy of the input), every tap is a unit-stride
    window of one phase, so a `lax.scan` over the taps takes each with a dynamic slice and
    multiplies it at once: one [N, Cin] tap is alive at a time. Unrolled, XLA:CPU kept
    the k*k taps of many convs alive together (r18 train step: 1.1 GiB of temporaries
    instead of XLA's 0.45).
    """
    kh, kw, cin, cout = kernel_shape
    b, oh, ow, _ = dy.shape
    (sh, sw), (dh, dw) = strides, rhs_dilation
    # Built from x alone, the phases could be computed right after the forward pass and
    # held until the backward pass reaches this conv; tied to dy they wait for it.
    x, dy = lax.optimization_barrier((x, dy))
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    hp, wp = xp.shape[1:3]
    xp = jnp.pad(xp, ((0, 0), (0, -hp % sh), (0, -wp % sw), (0, 0)))
    phases = jnp.stack([xp[:, r::sh, c::sw] for r in range(sh) for c in range(sw)])
    taps = np.asarray([((i * dh % sh) * sw + j * dw % sw, i * dh // sh, j * dw // sw)
                       for i in range(kh) for j in range(kw)], np.int32)
    dy2 = dy.reshape(b * oh * ow, cout)
    # Contract over N on both sides (X^T dY) without materialising a transpose.
    tn = (((0,), (0,)), ((), ()))
    acc = jnp.promote_types(jnp.result_type(x, dy), jnp.float32)

    def tap_grad(_, t):
        z = jnp.zeros((), t.dtype)  # one index dtype (x64 would make a bare 0 int64)
        tap = lax.dynamic_slice(phases, (t[0], z, t[1], t[2], z), (1, b, oh, ow, cin))
        return None, lax.dot_general(tap.reshape(b * oh * ow, cin), dy2, tn,
                                     precision=precision,
                                     preferred_element_type=acc)

    if len(taps) == 1:
        grad = tap_grad(None, jnp.asarray(taps[0]))[1][None]
    else:
        grad = lax.scan(tap_grad, None, jnp.asarray(taps))[1]
    return grad.reshape(kh, kw, cin, cout).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, kernel: jax.Array, spec: tuple) -> jax.Array:
    strides, padding, rhs_dilation, dn, precision = spec
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=dn, precision=precision)


def _conv_fwd(x, kernel, spec):
    return _conv(x, kernel, spec), (x, kernel)


def _conv_bwd(spec, res, dy):
    x, kernel = res
    strides, padding, rhs_dilation, dn, precision = spec
    # The input gradient is XLA's own transpose of the forward conv (the same HLO the
    # plain autodiff path emits), so it is bitwise equal to "xla".
    (dx,) = jax.linear_transpose(
        lambda x_: lax.conv_general_dilated(x_, kernel, strides, padding,
                                            rhs_dilation=rhs_dilation,
                                            dimension_numbers=dn, precision=precision),
        x)(dy)
    dk = _weight_grad(x, dy, kernel.shape, strides, padding, rhs_dilation, precision,
                      kernel.dtype)
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None,
                          feature_group_count=1, batch_group_count=1, precision=None,
                          preferred_element_type=None, *, dot1x1: bool):
    """`lax.conv_general_dilated`'s signature (as `nn.Conv` calls it); the weight
    gradient by matrix products where the conv is a plain 2-D NHWC/HWIO one."""
    nd = lhs.ndim
    dn = dimension_numbers
    if isinstance(dn, tuple) and not isinstance(dn, lax.ConvDimensionNumbers):
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
    plain = (nd == 4 and dn == _nhwc_hwio(nd) and feature_group_count == 1
             and batch_group_count == 1 and preferred_element_type is None
             and not isinstance(padding, str)
             and all(d == 1 for d in (lhs_dilation or (1, 1))))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if dot1x1 and rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
        return _dot1x1(lhs, rhs, strides, precision)
    spec = (strides, padding, tuple(int(d) for d in (rhs_dilation or (1, 1))), dn,
            precision)
    return _conv(lhs, rhs, spec)


def _dot1x1(x: jax.Array, kernel: jax.Array, strides, precision) -> jax.Array:
    """A 1x1 conv as a matrix product (strided input subsampled first); its autodiff is
    dots too: dX = dY W^T (scattered back for stride 2), dW = X^T dY."""
    sh, sw = strides
    if (sh, sw) != (1, 1):
        b, h, w, c = x.shape
        x = lax.slice(x, (0, 0, 0, 0), (b, h, w, c), (1, sh, sw, 1))
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())), precision=precision)


# One function object per implementation: Flax modules compare their fields, and a stable
# object keeps module definitions (and jit caches) equal across builds.
_FUNCTIONS: dict[str, Callable | None] = {
    "xla": None,  # nn.Conv's default, lax.conv_general_dilated
    "shifted": functools.partial(_conv_general_dilated, dot1x1=False),
    "shifted_dot1x1": functools.partial(_conv_general_dilated, dot1x1=True),
}


def conv_function(conv_impl: str) -> Callable | None:
    """The `conv_general_dilated` argument of `nn.Conv` for a resolved implementation
    (None: Flax's default, `lax.conv_general_dilated`)."""
    if conv_impl not in _FUNCTIONS:
        raise ValueError(f"conv_impl must be resolved to one of {', '.join(IMPLS)} "
                         f"(models.conv.resolve), not {conv_impl!r}")
    return _FUNCTIONS[conv_impl]
