"""`make demo`: a small SOLOv2 that learns the easy synthetic shapes from scratch on a CPU.

The tiny model (configs/tiny.py: light R18 head, 64-channel FPN, GroupNorm head) on the
`easy` preset of `solov2_jax.data.make_demo` (128 x 128 images, 1-3 large separate shapes;
the Makefile's `demo` target generates it and sets data.coco_dir). One train scale and
square images: a single compiled train program and a single eval program.
"""

from solov2_jax.config import shrink_to_tiny, solov2_config


def get_config():
    c = solov2_config(
        depth=18,
        light=True,
        # 640 steps of 4 images (256 train images, 10 epochs); lr 0.01 with 50 warm-up
        # steps, x0.1 for the last 2 epochs (the drop is worth ~+0.15 mask AP here).
        epochs=10,
        milestones=(8,),
        warmup_ratio=0.1,
        train_scales=((128, 128),),
        test_scale=(128, 128),
        num_classes=4,
    )
    c.model.frozen_stages = -1  # no pretrained backbone: train every stage
    shrink_to_tiny(c)
    c.data.per_device_batch = 4
    c.data.max_instances = 4
    c.data.min_size = 4
    c.data.shuffle_buffer = 256
    c.optim.lr = 0.01
    c.optim.warmup_iters = 50
    c.optim.reference_batch = 4
    c.train.log_every = 32
    # One evaluation half-way (step 320; the final one is `--eval`): the mask AP rises
    # visibly, for the cost of one compile shared with the final evaluation.
    c.train.eval_every_epochs = 5
    c.checkpoint.every_steps = 1000
    return c
