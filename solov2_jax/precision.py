"""Mixed precision: `train.precision = fp32 | bf16 | fp16`.

Parameters and optimiser state stay float32; the model computes its convolutions in the
compute dtype (`models.build_model(dtype=...)`, flax casts the float32 parameters per op),
GroupNorm/BatchNorm statistics are reduced in float32 (flax promotes them), and the
model's outputs are cast back to float32 before targets, losses and Matrix NMS.
"""

from __future__ import annotations

import jax
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


def at_least_float32(x: jax.Array) -> jax.Array:
    """x as float32 if it is a narrower float (bf16/fp16); float32/float64 unchanged.

    Targets and losses run in float32 whatever the convolutions' dtype; a float64 model
    (the float64 parity checks of the whole train step) keeps float64 all the way.
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def widen_floats(tree):
    """Floating leaves of `tree` (e.g. a SOLOv2Output) `at_least_float32`; others unchanged."""
    return jax.tree.map(
        lambda x: at_least_float32(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# fp16 optimiser state: {"tx": the optax state, "loss_scale": {"scale", "counter",
# "skipped"}}: plain float32/int32 arrays (not jmp's dataclass), so checkpoints stay plain
# pytrees; jmp.DynamicLossScale is rebuilt from them inside the step.


def init_loss_scaled(tx_state, config) -> dict:
    """fp16 optimiser state: the optax state plus jmp's dynamic loss scale (initial scale
    train.loss_scale_init) and the count of steps skipped for overflowing gradients."""
    return {"tx": tx_state, "loss_scale": {
        "scale": jnp.asarray(float(config.train.get("loss_scale_init", 512.0)), jnp.float32),
        "counter": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}}


def loss_scale_period(config) -> int:
    """0 unless fp16; then train.loss_scale_period (finite steps before doubling)."""
    return int(config.train.get("loss_scale_period", 2000)) if name(config) == "fp16" else 0


def loss_scale_of(opt_state: dict, period: int):
    """(jmp.DynamicLossScale, optax state) of an fp16 optimiser state."""
    import jmp

    ls = opt_state["loss_scale"]
    return jmp.DynamicLossScale(ls["scale"], ls["counter"], period=period), opt_state["tx"]


def scaled_update(opt_state: dict, loss_scale, grads, new, old):
    """fp16 step decision. new/old: (params, optax state) after/before the update.

    Gradients (already unscaled and device-averaged, so all devices agree) that are not
    all finite: keep `old`, halve the scale, count the skipped step; finite: take `new`,
    and after `period` finite steps in a row the scale doubles (jmp's
    DynamicLossScale.adjust). Returns (params, fp16 optimiser state, metrics).
    """
    import jmp

    finite = jmp.all_finite(grads)
    params, tx_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    adjusted = loss_scale.adjust(finite)
    skipped = opt_state["loss_scale"]["skipped"] + (~finite).astype(jnp.int32)
    state = {"tx": tx_state, "loss_scale": {
        "scale": adjusted.loss_scale.astype(jnp.float32),
        "counter": adjusted.counter.astype(jnp.int32), "skipped": skipped}}
    metrics = {"loss_scale": loss_scale.loss_scale.astype(jnp.float32),  # used this step
               "fp16_overflow": (~finite).astype(jnp.float32),
               "fp16_skipped_steps": skipped.astype(jnp.float32)}
    return params, state, metrics
