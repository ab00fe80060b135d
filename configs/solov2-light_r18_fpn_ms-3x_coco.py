"""mmdet `solov2-light_r18_fpn_ms-3x_coco`: light head, R18, 768x(352..512) train, 768x448 test."""

from solov2_jax.config import light_ms3x_config


def get_config():
    return light_ms3x_config(18)
