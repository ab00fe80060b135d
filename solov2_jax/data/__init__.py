"""Input data: the local-COCO TFDS builder, demo data generator and tf.data pipelines.

The builder's read API is re-exported lazily so `import solov2_jax.data` does not load
TensorFlow. `prepare` is not re-exported: that name is the `data.prepare` CLI module, so
use `solov2_jax.data.coco_builder.prepare` for the function.
"""

_BUILDER_API = ("get_builder", "decode_example", "read_split", "category_info")

__all__ = list(_BUILDER_API)


def __getattr__(name):
    if name in _BUILDER_API:
        from solov2_jax.data import coco_builder

        return getattr(coco_builder, name)
    raise AttributeError(f"module 'solov2_jax.data' has no attribute {name!r}")
