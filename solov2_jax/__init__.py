"""solov2-jax: SOLOv2 instance segmentation in JAX/Flax, matched to mmdetection 3.3.0."""

__version__ = "0.1.0"
