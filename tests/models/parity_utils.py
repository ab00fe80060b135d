"""Helpers for the model parity tests: randomised torch modules, errors, conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from solov2_jax import convert

TOL = 1e-4  # max |jax - torch| / max |torch|, float32


def randomise_(module, seed: int = 0) -> None:
    """Random conv weights and BN/GN affine params + running stats (as mmdet_ref does).

    Default inits make eval-mode BN ~identity and zero the last BN of each block, which
    would let a wrong mapping of those tensors pass unnoticed.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                n = m.weight.shape[0]
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * fan_in**-0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    module.eval()


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def rel_err(jax_nhwc, torch_nchw) -> float:
    """max |jax - torch| / max |torch| after moving torch to NHWC."""
    ref = np.transpose(torch_nchw.detach().cpu().numpy(), (0, 2, 3, 1))
    got = np.asarray(jax_nhwc)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def convert_module(module_def, inputs, state_dict, sections, sets) -> dict:
    """Converts a torch sub-module's state_dict with the real table for a Flax module."""
    from solov2_jax import conversion_table as ct

    shapes = jax.eval_shape(module_def.init, jax.random.PRNGKey(0), inputs)
    expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(shapes)).items()}
    table = ct.expand(sections, sets)
    return convert.convert_state_dict(state_dict, table, expected)


def random_image(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """[B, Hp, Wp, 3] normalised-looking image of size h x w, zero-padded to x32."""
    rng = np.random.default_rng(seed)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    img = np.zeros((batch, hp, wp, 3), np.float32)
    img[:, :h, :w] = rng.standard_normal((batch, h, w, 3)).astype(np.float32)
    return img


def as_jax(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x, jnp.float32)
