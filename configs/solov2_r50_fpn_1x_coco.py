"""mmdet `solov2_r50_fpn_1x_coco` (mask AP 34.8): R50, single scale 1333x800, 12 epochs."""

from solov2_jax.config import solov2_config


def get_config():
    return solov2_config(depth=50)
