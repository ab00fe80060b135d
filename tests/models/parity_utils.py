"""Helpers for the model parity tests: randomised torch modules, errors, conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from solov2_jax import convert
from tests.mmdet_ref import randomise_  # noqa: F401  (re-exported for the model tests)

TOL = 1e-4  # max |jax - torch| / max |torch|, float32


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
