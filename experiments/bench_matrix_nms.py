"""Benchmarks our jitted Matrix NMS against mmdet's `mask_matrix_nms` on the same masks.

Inputs: 500 random blob masks (ellipses, a third of them perturbed copies of earlier ones,
like the duplicates SOLOv2 produces for neighbouring grid cells) of 200 x 336 -- the mask
feature size of an 800 x 1344 padded input -- random labels among 80 classes, random scores.
Settings as in `predict_by_feat` (nms_pre=500, max_num=100, filter_thr=0.05, sigma=2,
areas passed in). Ours is timed warm (compiled first) with `block_until_ready`; both
report the median of `--runs` calls, the two called alternately. Prints a markdown table
and checks that both agree.

    python experiments/bench_matrix_nms.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def blob_masks(rng, n, h, w):
    """[n, h, w] bool blobs; ~1/3 are shifted, slightly grown copies of an earlier blob."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    masks = np.zeros((n, h, w), bool)
    params = []
    for i in range(n):
        if i > 0 and rng.random() < 0.33:
            cy, cx, ry, rx = params[rng.integers(0, i)]
            cy, cx = cy + rng.normal(0, 4), cx + rng.normal(0, 4)
            ry, rx = ry * rng.uniform(0.9, 1.2), rx * rng.uniform(0.9, 1.2)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(4, h / 3), rng.uniform(4, w / 3)
        params.append((cy, cx, ry, rx))
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return masks


def median_ms(fns, runs):
    """Median ms of each of `fns`, called alternately so that load from other processes on
    the shared machine hits all of them alike."""
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(ts)) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from solov2_jax.matrix_nms import matrix_nms
    from tests import mmdet_ref

    mmdet_ref.import_mmdet()
    from mmdet.models.layers import mask_matrix_nms

    rng = np.random.default_rng(0)
    masks = blob_masks(rng, args.n, 200, 336)
    labels = rng.integers(0, 80, args.n)
    scores = rng.uniform(0.05, 1.0, args.n).astype(np.float32)
    area = masks.sum((1, 2)).astype(np.float32)
    kw = dict(nms_pre=500, max_num=100, filter_thr=0.05, sigma=2.0)

    t_masks, t_labels = torch.from_numpy(masks), torch.from_numpy(labels)
    t_scores, t_area = torch.from_numpy(scores), torch.from_numpy(area)
    j_masks, j_labels = jnp.asarray(masks), jnp.asarray(labels, jnp.int32)
    j_scores, j_area = jnp.asarray(scores), jnp.asarray(area)
    j_valid = jnp.ones(args.n, bool)

    rows = []
    for kernel in ("gaussian", "linear"):
        def ref_call(kernel=kernel):
            return mask_matrix_nms(t_masks, t_labels, t_scores, mask_area=t_area,
                                   kernel=kernel, **kw)

        def our_call(kernel=kernel):
            out = matrix_nms(j_masks, j_labels, j_scores, j_valid, j_area, kernel=kernel, **kw)
            return jax.block_until_ready(out)

        r_s, r_l, _, r_i = ref_call()
        o_s, o_l, o_i, o_ok = jax.device_get(our_call())  # also compiles
        assert o_ok.sum() == len(r_i), (o_ok.sum(), len(r_i))
        assert (o_i[o_ok] == r_i.numpy()).all() and (o_l[o_ok] == r_l.numpy()).all()
        max_diff = float(np.abs(o_s[o_ok] - r_s.numpy()).max())
        assert max_diff < 1e-6, max_diff
        t_ref, t_our = median_ms((ref_call, our_call), args.runs)
        rows.append((kernel, t_ref, t_our, len(r_i), max_diff))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"inputs: {args.n} masks of 200x336, 80 labels, nms_pre=500, max_num=100, "
          f"filter_thr=0.05; median of {args.runs} runs\n")
    print("| implementation | kernel | median ms | speedup vs mmdet | kept | max score diff |")
    print("|---|---|---|---|---|---|")
    for kernel, t_ref, t_our, kept, diff in rows:
        print(f"| mmdet `mask_matrix_nms` (torch CPU) | {kernel} | {t_ref:.1f} | 1.00x | "
              f"{kept} | - |")
        print(f"| solov2_jax `matrix_nms` (jit, XLA CPU) | {kernel} | {t_our:.1f} | "
              f"{t_ref / t_our:.2f}x | {kept} | {diff:.1e} |")
    print("\nagreement: identical kept indices and labels for both kernels")


if __name__ == "__main__":
    main()
