"""SOLOv2 model (Flax linen) plus helpers to build, initialise and freeze it.

`build_model` reads the `config.model` section and passes plain Python values to the
module; modules never see a ConfigDict.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from solov2_jax.models import conv
from solov2_jax.models.fpn import FPN
from solov2_jax.models.resnet import ResNet
from solov2_jax.models.solov2 import SOLOv2
from solov2_jax.models.solov2_head import MaskFeatModule, SOLOV2Head

__all__ = [
    "FPN",
    "MaskFeatModule",
    "ResNet",
    "SOLOV2Head",
    "SOLOv2",
    "build_model",
    "init_variables",
    "is_frozen",
    "trainable_mask",
]


def build_model(model_cfg, dtype: Any = jnp.float32, precision: Any = None,
                conv_impl: str | None = None) -> SOLOv2:
    """`SOLOv2` from a `config.model` ConfigDict (or any mapping with the same keys).

    `dtype` is the computation dtype (params stay float32); `precision` goes to every
    conv (None = XLA default, `jax.lax.Precision.HIGHEST` for exact float32 on GPU).
    `conv_impl` picks the convolution implementation (`models.conv`): None takes the
    config's `conv_impl` if it has one, else 'auto', which is resolved here, against
    `jax.default_backend()` ('shifted' weight gradients on the CPU, XLA's elsewhere).
    """
    if conv_impl is None:
        conv_impl = str(model_cfg.get("conv_impl", "auto"))
    if isinstance(dtype, str):
        dtype = jnp.dtype(dtype)
    return SOLOv2(
        depth=int(model_cfg["depth"]),
        fpn_channels=int(model_cfg["fpn_channels"]),
        fpn_num_outs=int(model_cfg["fpn_num_outs"]),
        num_classes=int(model_cfg["num_classes"]),
        feat_channels=int(model_cfg["feat_channels"]),
        stacked_convs=int(model_cfg["stacked_convs"]),
        num_grids=tuple(int(s) for s in model_cfg["num_grids"]),
        gn_groups=int(model_cfg["gn_groups"]),
        mask_feature_channels=int(model_cfg["mask_feature_channels"]),
        mask_out_channels=int(model_cfg["mask_out_channels"]),
        dynamic_conv_size=int(model_cfg["dynamic_conv_size"]),
        # Architecture options newer than some saved configs: defaults = plain ResNet, no DCN.
        groups=int(model_cfg.get("groups", 1)),
        base_width=int(model_cfg.get("base_width", 4)),
        stage_with_dcn=tuple(bool(v) for v in model_cfg.get("stage_with_dcn", (False,) * 4)),
        head_dcn=str(model_cfg.get("head_dcn", "none")),
        mask_feature_dcn=bool(model_cfg.get("mask_feature_dcn", False)),
        dtype=dtype,
        precision=precision,
        conv_impl=conv.resolve(conv_impl),
    )


def init_variables(model: SOLOv2, rng: jax.Array, image_hw: tuple[int, int] = (64, 64)):
    """Initial {'params', 'batch_stats'} for `model`, traced on one [1, H, W, 3] image.

    Variable shapes do not depend on the image size; use a small multiple of 32.
    """
    h, w = image_hw
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    variables = jax.jit(model.init)(rng, images)
    return dict(variables)


def is_frozen(path: tuple[str, ...], frozen_stages: int = 1) -> bool:
    """Whether a parameter path (inside `params`) belongs to a frozen backbone stage.

    mmdet `frozen_stages=k`: stem (conv1, bn1) and layer1..layerk get no gradient. BN
    affine params of the other stages remain trainable (norm_eval only freezes stats).
    """
    if frozen_stages < 0 or len(path) < 2 or path[0] != "backbone":
        return False
    name = path[1]
    if name in ("conv1", "bn1"):
        return True
    return any(name.startswith(f"layer{i}_") for i in range(1, frozen_stages + 1))


def trainable_mask(params, frozen_stages: int = 1):
    """Pytree of bools matching `params`: False for frozen stem/stages, True elsewhere.

    Use with `optax.masked` / `optax.multi_transform` so frozen weights never change
    (not even through weight decay).
    """
    flat = traverse_util.flatten_dict(params)
    mask = {path: not is_frozen(path, frozen_stages) for path in flat}
    return traverse_util.unflatten_dict(mask)
