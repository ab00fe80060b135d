"""mmdet `solov2_x101-dcn_fpn_ms-3x_coco` (mask AP 42.4): ResNeXt-101 64x4d with DCNv2."""

from solov2_jax.config import dcn_ms3x_config


def get_config():
    return dcn_ms3x_config(101, groups=64, base_width=4)
