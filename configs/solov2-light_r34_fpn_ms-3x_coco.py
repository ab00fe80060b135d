"""mmdet `solov2-light_r34_fpn_ms-3x_coco`: light head, R34, 768x(352..512) train, 768x448 test."""

from solov2_jax.config import light_ms3x_config


def get_config():
    return light_ms3x_config(34)
