"""mmdet `solov2_r101-dcn_fpn_ms-3x_coco` (mask AP 41.2): R101 with DCNv2, DCN head."""

from solov2_jax.config import dcn_ms3x_config


def get_config():
    return dcn_ms3x_config(101)
