"""DCNv2: the operator and the Flax module against mmcv 2.1.0's compiled operator.

`modulated_deform_conv` is compared with `mmcv.ops.modulated_deform_conv2d` (forward and
the gradients w.r.t. input, offset, mask, weight, bias) with offsets of several pixels,
so many taps sample between pixels, across the border and fully outside the image;
`DCNv2` is compared with `mmcv.ops.ModulatedDeformConv2dPack` (state_dict converted with
the conversion table's `dcn` leaves). The plain-conv identity needs no mmcv.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solov2_jax import conversion_table as ct
from solov2_jax.models.dcn import DCNv2, modulated_deform_conv
from tests.models.parity_utils import as_jax, convert_module


class Wrapped(nn.Module):
    """A DCNv2 as the child `conv` (as mmcv's ConvModule holds it)."""

    features: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x):
        return DCNv2(self.features, 3, strides=self.strides, groups=self.groups, use_bias=True,
                     precision=HI, name="conv")(x)


FWD_TOL = 1e-5  # max |jax - mmcv| / max |mmcv|
GRAD_TOL = 1e-4
HI = jax.lax.Precision.HIGHEST


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def test_zero_offset_unit_mask_is_a_plain_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 9, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    for stride in (1, 2):
        ho, wo = (7 - 1) // stride + 1, (9 - 1) // stride + 1
        out = modulated_deform_conv(
            as_jax(x), jnp.zeros((2, ho, wo, 18)), jnp.ones((2, ho, wo, 9)), as_jax(kernel),
            stride=stride, padding=1, groups=2, precision=HI)
        ref = jax.lax.conv_general_dilated(
            as_jax(x), as_jax(kernel), (stride, stride), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2, precision=HI)
        assert rel(out, ref) < 1e-6


def test_fresh_module_is_a_plain_conv_and_has_mmcv_names():
    """mmcv zero-initialises conv_offset: offsets 0 and mask sigmoid(0) = 0.5."""
    x = as_jax(np.random.default_rng(1).standard_normal((1, 8, 8, 4)))
    module = DCNv2(6, 3, strides=2, use_bias=False, precision=HI)
    variables = module.init(jax.random.PRNGKey(0), x)
    params = variables["params"]
    assert set(params) == {"kernel", "conv_offset"}
    assert params["kernel"].shape == (3, 3, 4, 6)
    assert params["conv_offset"]["kernel"].shape == (3, 3, 4, 27)
    bound = 1 / np.sqrt(4 * 9)  # mmcv's U(-1/sqrt(n), 1/sqrt(n))
    assert float(jnp.abs(params["kernel"]).max()) <= bound
    ref = jax.lax.conv_general_dilated(x, params["kernel"], (2, 2), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=HI)
    assert rel(module.apply(variables, x), 0.5 * ref) < 1e-6


# (name, B, H, W, Cin, Cout, kernel, stride, pad, dilation, groups, deform_groups, bias)
OP_CASES = [
    ("3x3", 2, 9, 11, 6, 5, 3, 1, 1, 1, 1, 1, True),
    ("stride2_groups", 1, 10, 7, 8, 6, 3, 2, 1, 1, 2, 1, False),
    ("deform_groups_dilation", 1, 8, 9, 4, 4, 3, 1, 2, 2, 1, 2, True),
    ("1x1", 2, 5, 6, 4, 3, 1, 1, 0, 1, 1, 1, True),
]


@pytest.mark.parity
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_operator_forward_and_gradients_match_mmcv(mmcv_ops, case):
    import torch
    from mmcv.ops import modulated_deform_conv2d

    _, b, h, w, cin, cout, k, s, p, d, g, dg, with_bias = case
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    rng = np.random.default_rng(sum(map(ord, case[0])))
    x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
    # Offsets of several pixels: taps land between pixels, across the border and outside.
    offset = (3.0 * rng.standard_normal((b, ho, wo, dg * k * k * 2))).astype(np.float32)
    mask = rng.uniform(0.1, 1.0, (b, ho, wo, dg * k * k)).astype(np.float32)
    weight = rng.standard_normal((cout, cin // g, k, k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    cot = rng.standard_normal((b, ho, wo, cout)).astype(np.float32)
    kernel = np.transpose(weight, (2, 3, 1, 0))

    # The offsets really leave the image for some taps (and stay inside for others).
    base = np.arange(ho)[:, None] * s - p + (np.arange(k) * d)[None, :]
    py = base[None, :, None, None, :, None] + offset.reshape(b, ho, wo, dg, k, k, 2)[..., 0]
    outside = (py <= -1) | (py >= h)
    assert 0.05 < outside.mean() < 0.6

    ts = [torch.from_numpy(a).requires_grad_() for a in
          (nchw(x).numpy(), nchw(offset).numpy(), nchw(mask).numpy(), weight)]
    tb = None if bias is None else torch.from_numpy(bias).requires_grad_()
    ref = modulated_deform_conv2d(*ts, tb, s, p, d, g, dg)
    ref.backward(nchw(cot))
    ref_grads = [nhwc(ts[0].grad), nhwc(ts[1].grad), nhwc(ts[2].grad),
                 np.transpose(ts[3].grad.numpy(), (2, 3, 1, 0))]
    if bias is not None:
        ref_grads.append(tb.grad.numpy())

    def f(x, offset, mask, kernel, *bias):
        return modulated_deform_conv(x, offset, mask, kernel, *bias, stride=s, padding=p,
                                     dilation=d, groups=g, deform_groups=dg, precision=HI)

    args = [as_jax(a) for a in (x, offset, mask, kernel)] + ([as_jax(bias)] if with_bias else [])
    out, vjp = jax.vjp(jax.jit(f), *args)
    grads = vjp(as_jax(cot))
    errors = {"forward": rel(out, nhwc(ref))}
    for name, got, want in zip(("input", "offset", "mask", "weight", "bias"), grads, ref_grads,
                               strict=False):
        errors[name] = rel(got, want)
    print(f"\n{case[0]}: " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert errors.pop("forward") <= FWD_TOL
    assert all(v <= GRAD_TOL for v in errors.values()), errors


@pytest.mark.parity
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 4)])
def test_module_matches_mmcv_pack(mmcv_ops, stride, groups):
    """DCNv2 vs ModulatedDeformConv2dPack: forward and gradients of input and every param."""
    import torch
    from mmcv.ops import ModulatedDeformConv2dPack

    torch.manual_seed(0)
    tm = ModulatedDeformConv2dPack(8, 12, 3, stride=stride, padding=1, groups=groups,
                                   deform_groups=1, bias=True)
    with torch.no_grad():  # offsets of a few pixels, masks away from 0 and 1
        tm.conv_offset.weight.normal_(0.0, 0.3)
        tm.conv_offset.bias.normal_(0.0, 1.0)
        tm.bias.normal_(0.0, 0.5)
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, 11, 9, 8)).astype(np.float32)
    tx = nchw(x).requires_grad_()
    ref = tm(tx)
    cot = rng.standard_normal(nhwc(ref).shape).astype(np.float32)
    ref.backward(nchw(cot))

    # The layer as a child `conv`, as mmcv's ConvModule holds it: `conv.weight`, `conv.bias`,
    # `conv.conv_offset.{weight,bias}` -> `conv/kernel`, `conv/bias`, `conv/conv_offset/...`.
    sd = {f"conv.{k}": v.detach().numpy() for k, v in tm.state_dict().items()}
    module = Wrapped(12, stride, groups)
    rules = (ct.Rule("conv", "conv", "conv_bias"),
             ct.Rule("conv/conv_offset", "conv.conv_offset", "conv_bias"))
    variables = convert_module(module, as_jax(x), sd, (("", "", rules),), {"one": [{}]})
    out, vjp = jax.vjp(jax.jit(module.apply), variables, as_jax(x))
    grad_vars, grad_x = vjp(as_jax(cot))
    gp = grad_vars["params"]["conv"]
    errors = {
        "forward": rel(out, nhwc(ref)),
        "input": rel(grad_x, nhwc(tx.grad)),
        "weight": rel(gp["kernel"], np.transpose(tm.weight.grad.numpy(), (2, 3, 1, 0))),
        "bias": rel(gp["bias"], tm.bias.grad.numpy()),
        "conv_offset.weight": rel(gp["conv_offset"]["kernel"],
                                  np.transpose(tm.conv_offset.weight.grad.numpy(), (2, 3, 1, 0))),
        "conv_offset.bias": rel(gp["conv_offset"]["bias"], tm.conv_offset.bias.grad.numpy()),
    }
    print(f"\nstride={stride} groups={groups}: "
          + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert errors.pop("forward") <= FWD_TOL
    assert all(v <= GRAD_TOL for v in errors.values()), errors


def test_initialisation_follows_mmdet():
    """mmdet's SOLOv2 head re-initialises every Conv2d with N(0, 0.01), which includes a
    DCN's conv_offset but not its own weight (mmcv's U(+-1/sqrt(Cin*k*k))); the backbone
    keeps conv_offset at zero (ResNet.init_weights)."""
    from solov2_jax.models.layers import ConvModule
    from solov2_jax.models.resnet import ResNet

    x = jnp.zeros((1, 8, 8, 64))
    params = ConvModule(32, 3, gn_groups=8, dcn=True).init(jax.random.PRNGKey(0), x)["params"]
    assert set(params["conv"]) == {"kernel", "conv_offset"}  # bias='auto': none before GN
    offset = np.asarray(params["conv"]["conv_offset"]["kernel"])
    assert 0.009 < offset.std() < 0.011
    kernel = np.asarray(params["conv"]["kernel"])
    bound = 1 / np.sqrt(64 * 9)
    assert np.abs(kernel).max() <= bound and kernel.std() > 0.8 * bound / np.sqrt(3)

    shapes = jax.eval_shape(ResNet(depth=50, stage_with_dcn=(False, True, True, True)).init,
                            jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3),
                                                                        jnp.float32))
    assert "conv_offset" not in shapes["params"]["layer1_0"]["conv2"]
    assert shapes["params"]["layer4_2"]["conv2"]["conv_offset"]["kernel"].shape == (
        3, 3, 512, 27)
    # The backbone's DCNs use the module default (zeros), also checked by
    # test_fresh_module_is_a_plain_conv_and_has_mmcv_names.
