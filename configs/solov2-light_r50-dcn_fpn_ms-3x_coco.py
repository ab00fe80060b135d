"""mmdet `solov2-light_r50-dcn_fpn_ms-3x_coco`: light head (3 convs, last DCNv2), R50-DCN."""

from solov2_jax.config import light_dcn_ms3x_config


def get_config():
    return light_dcn_ms3x_config(50)
