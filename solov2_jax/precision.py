"""Mixed precision: `train.precision = fp32 | bf16 | fp16`.

Parameters and optimiser state stay float32; the model computes its convolutions in the
compute dtype (`models.build_model(dtype=...)`, flax casts the float32 parameters per op),
GroupNorm/BatchNorm statistics are reduced in float32 (flax promotes them), and the
model's outputs are cast back to float32 before targets, losses and Matrix NMS.
"""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def name(config) -> str:
    """config.train.precision ('fp32' when the config has none)."""
    p = str(config.train.get("precision", "fp32"))
    if p not in DTYPES:
        from solov2_jax.cli import UserError

        raise UserError(f"config.train.precision = {p!r}: must be fp32, bf16 or fp16")
    return p


def compute_dtype(config):
    """The convolutions' dtype of config.train.precision."""
    return DTYPES[name(config)]
