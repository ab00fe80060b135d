"""The packaged configs, `solov2_jax.configs` once installed: one `<name>.py` with
`get_config()` per model. Every CLI's `--config` takes such a name (`tiny`,
`solov2_r50_fpn_1x_coco`, with or without `.py`) or the path of any config file."""
