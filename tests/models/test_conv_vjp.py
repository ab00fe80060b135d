"""models.conv: the matrix-product weight gradient vs XLA's own convolution autodiff.

The forward values and input gradients must be bitwise equal (same lax conv, same
transpose). The weight gradient is the same sum in another order (k*k dots over
N = B*OH*OW instead of XLA's convolution kernel), so it is compared to 1e-5 of each
tensor's largest magnitude: a float32 sum of N terms reordered differs by ~N*eps*|terms|
at worst, measured at 1-6e-6 on these shapes; a wrong tap, stride or padding gives O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from solov2_jax.models import build_model, conv, init_variables
from solov2_jax.models.layers import ConvModule
from tests.models.test_model_api import tiny_config

WGRAD_RTOL = 1e-5
IMPLS = ("shifted", "shifted_dot1x1")


def _close(got, ref, rtol=WGRAD_RTOL):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_array_less(np.abs(got - ref).max(),
                                 rtol * max(np.abs(ref).max(), 1e-30) + 1e-30)


def _grads(impl, x, w, strides, padding, dilation, groups=1):
    fn = conv.conv_function(impl) or lax.conv_general_dilated
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    # Every output element gets its own cotangent, as in a real loss.
    probe = jax.random.normal(jax.random.PRNGKey(9), (1,))

    def loss(x, w):
        y = fn(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn,
               feature_group_count=groups)
        return jnp.sum(jnp.sin(y + probe)), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return y, dx, dw


# (kernel, stride, dilation, padding): every conv shape of the model (1x1, 3x3, the 7x7
# stem, stride 2) plus dilation and asymmetric / zero padding the model does not use.
CASES = [
    (1, 1, 1, ((0, 0), (0, 0))),
    (1, 2, 1, ((0, 0), (0, 0))),
    (3, 1, 1, ((1, 1), (1, 1))),
    (3, 2, 1, ((1, 1), (1, 1))),
    (7, 2, 1, ((3, 3), (3, 3))),
    (3, 1, 2, ((2, 2), (2, 2))),
    (3, 2, 1, ((0, 2), (1, 0))),
    (3, 1, 1, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,s,d,pad", CASES)
def test_matches_xla_conv(impl, k, s, d, pad):
    # Odd sizes: the last stride-2 row/column is not read, which a wrong slice end would.
    kx, kw = jax.random.split(jax.random.PRNGKey(k * 10 + s))
    x = jax.random.normal(kx, (2, 13, 11, 6))
    w = jax.random.normal(kw, (k, k, 6, 5)) * 0.3
    ref = _grads("xla", x, w, (s, s), pad, (d, d))
    got = _grads(impl, x, w, (s, s), pad, (d, d))
    if k == 1 and impl == "shifted_dot1x1":
        # A 1x1 conv as a plain dot: the same products, summed over Cin in the matmul
        # kernel's order instead of the conv kernel's (equal on the model's shapes, an
        # ulp apart on some others).
        _close(got[0], ref[0], rtol=1e-6)
        _close(got[1], ref[1], rtol=1e-6)
    else:
        np.testing.assert_array_equal(got[0], ref[0])  # forward
        np.testing.assert_array_equal(got[1], ref[1])  # input gradient
    _close(got[2], ref[2])  # weight gradient


def test_grouped_conv_takes_the_xla_path():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 8))
    ref = _grads("xla", x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), groups=4)
    got = _grads("shifted", x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), groups=4)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bf16_weight_gradient_keeps_the_kernel_dtype():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 4)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4)) * 0.3).astype(jnp.bfloat16)
    ref = _grads("xla", x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))
    got = _grads("shifted", x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert got[2].dtype == jnp.bfloat16
    # float32 accumulation here vs XLA's: bf16 rounding (8 bits) of the same sum.
    _close(got[2].astype(jnp.float32), ref[2].astype(jnp.float32), rtol=2e-2)


def test_float64_weight_gradient_stays_float64():
    """Under x64 (the float64 parity test of the training step) nothing is rounded to
    float32 on the way."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4), jnp.float64)
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5), jnp.float64)
        ref = _grads("xla", x, w, (2, 2), ((1, 1), (1, 1)), (1, 1))
        got = _grads("shifted", x, w, (2, 2), ((1, 1), (1, 1)), (1, 1))
        assert got[2].dtype == jnp.float64
        _close(got[2], ref[2], rtol=1e-13)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_module_with_canvas_mask(kernel):
    """ConvModule + GroupNorm with a canvas (masked input, masked GN statistics)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16, 8))
    valid = jnp.asarray([[12, 16], [7, 9]], jnp.int32)

    def run(impl):
        m = ConvModule(16, kernel, gn_groups=4, conv_impl=impl)
        v = m.init(jax.random.PRNGKey(1), x, valid)

        def loss(params, x):
            y = m.apply({"params": params}, x, valid)
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            v["params"], x)

    (_, y_ref), (gp_ref, gx_ref) = run("xla")
    for impl in IMPLS:
        (_, y), (gp, gx) = run(impl)
        _close(gp["conv"]["kernel"], gp_ref["conv"]["kernel"])
        if impl == "shifted_dot1x1" and kernel == 1:  # an ulp-level forward difference,
            for a, b in ((y, y_ref), (gx, gx_ref), (gp["gn"]["scale"],  # through GN
                                                    gp_ref["gn"]["scale"])):
                _close(a, b)
        else:
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(gx, gx_ref)
            np.testing.assert_array_equal(gp["gn"]["scale"], gp_ref["gn"]["scale"])


def test_resolve_by_backend_and_config():
    assert conv.resolve("auto", backend="cpu") == "shifted"
    assert conv.resolve("auto", backend="gpu") == "xla"
    assert conv.resolve("shifted", backend="gpu") == "shifted"
    with pytest.raises(ValueError, match="conv_impl"):
        conv.resolve("fast")
    with pytest.raises(ValueError, match="resolved"):
        conv.conv_function("auto")
    cfg = tiny_config()
    assert build_model(cfg.model).conv_impl == conv.resolve("auto")
    assert build_model(cfg.model, conv_impl="xla").conv_impl == "xla"
    cfg.model.conv_impl = "shifted_dot1x1"
    assert build_model(cfg.model).conv_impl == "shifted_dot1x1"


def test_whole_model_gradients_match_xla():
    """configs/tiny.py with a canvas: outputs and every parameter gradient."""
    cfg = tiny_config()
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 96, 3))
    canvas_hw = jnp.asarray([[64, 96], [64, 64]], jnp.int32)
    images = images * (jnp.arange(96) < canvas_hw[:, 1, None])[:, None, :, None]
    variables = init_variables(build_model(cfg.model, conv_impl="xla"),
                               jax.random.PRNGKey(1))

    def run(impl):
        model = build_model(cfg.model, conv_impl=impl)

        def loss(params):
            out = model.apply({**variables, "params": params}, images, canvas_hw)
            leaves = jax.tree.leaves(out)
            return sum(jnp.mean(jnp.sin(v)) for v in leaves), leaves

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (loss_ref, out_ref), g_ref = run("xla")
    (loss, out), g = run("shifted")
    np.testing.assert_array_equal(loss, loss_ref)
    for a, b in zip(out, out_ref, strict=True):
        np.testing.assert_array_equal(a, b)
    flat, flat_ref = jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)
    assert len(flat) == len(flat_ref)
    for (path, a), b in zip(flat, flat_ref, strict=True):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']") and "offset" not in name:
            _close(a, b)
        else:  # biases, norms: no weight gradient of ours involved
            np.testing.assert_array_equal(a, b, err_msg=name)
