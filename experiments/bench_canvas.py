"""Cost of mmdet's canvas semantics (`models.canvas`): train step and predict, with vs without.

"without" is the previous behaviour (the network runs on the whole static bucket,
`canvas_hw=None`); "with" computes each image on its own x32 canvas inside the same bucket
(masked conv inputs, canvas GroupNorm, per-image resize operators), which is what makes
results equal mmdet's. Same shapes, same random weights, same batch; the two variants are
alternated, warm-up (compilation) excluded and reported apart; median and min of --iters.
The number of compiled programs does not change: one per bucket shape either way.

  python experiments/bench_canvas.py [--config configs/solov2_r50_fpn_1x_coco.py]
      [--scale 768 512] [--batch 1] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, iters):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return compile_s, times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/solov2_r50_fpn_1x_coco.py")
    p.add_argument("--scale", type=int, nargs=2, default=(768, 512))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from solov2_jax import convert, models, train
    from solov2_jax.data import preprocess, transforms
    from solov2_jax.postprocess import postprocess_fn

    config = convert.load_config(args.config)
    scale = tuple(args.scale)
    bucket = transforms.bucket_shape(scale, landscape=True)
    # A 4:3 photo: resized to 512 x 683 -> canvas 512 x 704 inside the 512 x 768 bucket.
    img_hw = preprocess.rescale_size(480, 640, scale)
    canvas = preprocess.canvas_of(img_hw)
    b = args.batch
    rng = np.random.default_rng(0)
    image = np.zeros((b, *bucket, 3), np.float32)
    image[:, :img_hw[0], :img_hw[1]] = rng.normal(size=(b, *img_hw, 3))
    n = int(config.data.max_instances)
    batch = {
        "image": image,
        "canvas": np.tile(np.asarray(canvas, np.int32), (b, 1)),
        "gt_boxes": np.tile(np.asarray([[40.0, 30.0, 300.0, 260.0]], np.float32), (b, n, 1)),
        "gt_labels": np.zeros((b, n), np.int32),
        "gt_masks": np.zeros((b, n, bucket[0] // 4, bucket[1] // 4), np.uint8),
        "gt_centers": np.tile(np.asarray([[145.0, 170.0]], np.float32), (b, n, 1)),
        "gt_valid": np.arange(n)[None].repeat(b, 0) < 3,
    }
    batch["gt_masks"][:, :3, 8:60, 10:75] = 1

    model, tx, schedule, trainable, _, _ = train.build_training(config, 1000, b)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]))
    device = jax.devices()[:1]
    mesh = train.local_mesh(device)
    post = postprocess_fn(config.test, config.model, out_hw=(480, 640))

    def predict(variables, image, canvas_hw):
        out = model.apply(variables, image, canvas_hw)
        ori = jnp.tile(jnp.asarray([[480, 640]], jnp.int32), (image.shape[0], 1))
        img = jnp.tile(jnp.asarray([img_hw], jnp.int32), (image.shape[0], 1))
        return post(out.kernel_preds, out.cls_preds, out.mask_feats, img, ori, canvas_hw)

    rows = []
    for label, with_canvas in (("without canvas (bucket)", False), ("with canvas", True)):
        step_batch = dict(batch) if with_canvas else {k: v for k, v in batch.items()
                                                      if k != "canvas"}
        p_step, traces = train.make_p_train_step(config, model, tx, schedule, trainable,
                                                 devices=device)
        rstate = train.replicate(jax.tree.map(np.asarray, state), mesh)
        dev_batch = jax.tree.map(lambda x: x[None], step_batch)

        def run_step(p_step=p_step, rstate=rstate, dev_batch=dev_batch):
            # donate_argnums: keep feeding a fresh replica of the same state
            return p_step(jax.tree.map(jnp.copy, rstate), dev_batch)[1]["loss"]

        c_train, t_train = _timed(run_step, args.iters)
        canvas_arg = jnp.asarray(batch["canvas"]) if with_canvas else None
        jpred = jax.jit(lambda v, x, c=canvas_arg: predict(v, x, c))
        c_pred, t_pred = _timed(lambda j=jpred: j(variables, jnp.asarray(image)).scores,
                                args.iters)
        rows.append((label, c_train, np.median(t_train), min(t_train), c_pred,
                     np.median(t_pred), min(t_pred), len(traces)))

    print(f"# canvas cost: {args.config}, bucket {bucket}, image {img_hw} -> canvas "
          f"{canvas}, batch {b}, {args.iters} iters")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, load average {os.getloadavg()}")
    print("| variant | train compile s | train median s | train min s | predict compile s "
          "| predict median s | predict min s | train programs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.3f} | "
              f"{r[6]:.3f} | {r[7]} |")


if __name__ == "__main__":
    main()
