"""Tiny SOLOv2 for tests and the demo: light R18 head on 128-px images, 4 demo classes.

Same code paths as the real configs, with shapes small enough for a 2-core CPU.
"""

from solov2_jax.config import shrink_to_tiny, solov2_config


def get_config():
    c = solov2_config(
        depth=18,
        light=True,
        # 960 steps at global batch 2 on one CPU device (~3 min): enough for the mask loss
        # to fall visibly on the demo data. lr 0.01 at this batch collapses the masks
        # (dice stays ~0.93); 0.005 learns.
        epochs=40,
        milestones=(34,),
        warmup_ratio=0.1,
        train_scales=((160, 128), (160, 96)),
        test_scale=(160, 128),
        num_classes=4,
    )
    shrink_to_tiny(c)
    c.data.per_device_batch = 2
    c.data.max_instances = 16
    c.data.min_size = 4
    c.data.shuffle_buffer = 64
    c.optim.lr = 0.005
    c.optim.warmup_iters = 20
    c.optim.reference_batch = 2
    c.train.log_every = 40
    c.checkpoint.every_steps = 200
    return c
