"""mmdet `solov2_r101_fpn_ms-3x_coco` (mask AP 39.1): R101, multi-scale train, 36 epochs."""

from solov2_jax.config import ms3x_config


def get_config():
    return ms3x_config(101)
