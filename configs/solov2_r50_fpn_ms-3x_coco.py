"""mmdet `solov2_r50_fpn_ms-3x_coco` (mask AP 37.5): R50, multi-scale train, 36 epochs."""

from solov2_jax.config import ms3x_config


def get_config():
    return ms3x_config(50)
