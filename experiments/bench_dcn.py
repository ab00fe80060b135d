"""Benchmarks our DCNv2 against mmcv's compiled CPU op and a plain 3x3 conv, same shapes.

For each layer shape: `solov2_jax.models.dcn.modulated_deform_conv` (jit, XLA), mmcv 2.1.0
`modulated_deform_conv2d` (its im2col + addmm CPU kernel; needs the full mmcv wheel), and
a plain 3x3 convolution of the same shape in JAX (`lax.conv_general_dilated`) and torch
(`F.conv2d`), each forward and forward+backward (gradients w.r.t. every input: image,
offset, mask, weight). Offsets are N(0, 3^2) pixels, masks U(0, 1). JAX is timed warm
(compiled first) with `block_until_ready`; every implementation reports the median of
`--runs` calls, all called alternately so that load from other processes hits them alike.
`--variants` adds the alternative JAX formulations that DESIGN.md compares.

    python experiments/bench_dcn.py [--runs 5] [--variants]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (name, B, H, W, Cin, Cout, groups): a stride-8 DCN of the R50/R101 backbone (stage 2
# at a ~512 x 512 input), a head conv at a 40 x 40 grid, ResNeXt-101 64x4d's grouped one.
SHAPES = [
    ("backbone stage 2, 2x64x64, 128->128", 2, 64, 64, 128, 128, 1),
    ("head, 2x40x40, 256->256", 2, 40, 40, 256, 256, 1),
    ("x101 stage 2, 1x64x64, 512->512, groups 64", 1, 64, 64, 512, 512, 64),
]


def median_ms(fns, runs):
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(ts)) for ts in times]


def packed_gather_columns(x, offset, mask, kh, kw):
    """Alternative: one gather of the four neighbours packed side by side ([.., 4C] rows)."""
    import jax.numpy as jnp

    b, h, w, c = x.shape
    ho, wo = offset.shape[1:3]
    kk = kh * kw
    off = offset.reshape(b, ho, wo, kk, 2)
    ti, tj = jnp.repeat(jnp.arange(kh), kw), jnp.tile(jnp.arange(kw), kh)
    py = (jnp.arange(ho)[:, None, None] - 1 + ti)[None] + off[..., 0]
    px = (jnp.arange(wo)[None, :, None] - 1 + tj)[None] + off[..., 1]
    y0, x0 = jnp.floor(py), jnp.floor(px)
    ly, lx = py - y0, px - x0
    m = mask * ((py > -1) & (py < h) & (px > -1) & (px < w))
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    packed = jnp.concatenate([xp[:, :-1, :-1], xp[:, :-1, 1:], xp[:, 1:, :-1], xp[:, 1:, 1:]],
                             axis=-1).reshape(-1, 4 * c)
    r = jnp.clip(y0, -1, h - 1).astype(jnp.int32) + 1
    s = jnp.clip(x0, -1, w - 1).astype(jnp.int32) + 1
    idx = (jnp.arange(b)[:, None, None, None] * (h + 1) + r) * (w + 1) + s
    v = packed.at[idx].get(mode="promise_in_bounds")
    ws = ((1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx)
    return sum((ws[q] * m)[..., None] * v[..., q * c:(q + 1) * c] for q in range(4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", action="store_true",
                    help="also time the alternative formulations (groups=1 shapes only)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from mmcv.ops import modulated_deform_conv2d

    from solov2_jax.models.dcn import deform_columns, modulated_deform_conv

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; median of {args.runs}\n")
    print("| layer | implementation | forward ms | fwd+bwd ms | fwd / 3x3 conv (same impl.) "
          "| fwd+bwd / 3x3 conv |")
    print("|---|---|---|---|---|---|")
    for name, b, h, w, cin, cout, g in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
        offset = (3.0 * rng.standard_normal((b, h, w, 18))).astype(np.float32)
        mask = rng.uniform(0, 1, (b, h, w, 9)).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, cin // g, cout)) * (9 * cin / g) ** -0.5
                  ).astype(np.float32)
        jargs = [jnp.asarray(a) for a in (x, offset, mask, kernel)]

        def ours(x, offset, mask, kernel, g=g):
            return modulated_deform_conv(x, offset, mask, kernel, stride=1, padding=1,
                                         groups=g)

        def conv(x, kernel, g=g):
            return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                feature_group_count=g)

        def loss(f):
            def half_sq(*xs):
                return jnp.sum(f(*xs) ** 2) / 2

            return half_sq

        def timed_jax(f, fargs):
            fwd = jax.jit(f)
            bwd = jax.jit(jax.grad(loss(f), argnums=tuple(range(len(fargs)))))
            jax.block_until_ready(fwd(*fargs))
            jax.block_until_ready(bwd(*fargs))
            return (lambda: jax.block_until_ready(fwd(*fargs)),
                    lambda: jax.block_until_ready(bwd(*fargs)))

        impls = {"solov2_jax DCNv2 (jit)": timed_jax(ours, jargs),
                 "JAX 3x3 conv (jit)": timed_jax(conv, [jargs[0], jargs[3]])}
        if args.variants and g == 1:
            def packed(x, offset, mask, kernel):
                cols = packed_gather_columns(x, offset, mask, 3, 3)
                return cols.reshape(*cols.shape[:3], -1) @ kernel.reshape(-1, kernel.shape[-1])

            def per_tap(x, offset, mask, kernel):
                cols = deform_columns(x, offset, mask, (3, 3), 1, 1)
                k = kernel.reshape(9, *kernel.shape[2:])
                return sum(cols[..., t, :] @ k[t] for t in range(9))

            impls["variant: one gather of packed neighbours"] = timed_jax(packed, jargs)
            impls["variant: four gathers, 9 per-tap matmuls"] = timed_jax(per_tap, jargs)

        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        toff = torch.from_numpy(np.ascontiguousarray(offset.transpose(0, 3, 1, 2)))
        tmask = torch.from_numpy(np.ascontiguousarray(mask.transpose(0, 3, 1, 2)))
        tw = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))

        def torch_pair(f, targs):
            def fwd():
                with torch.no_grad():
                    f(*targs)

            def bwd():
                leaves = [t.detach().requires_grad_() for t in targs]
                (f(*leaves).square().sum() / 2).backward()

            return fwd, bwd

        def mmcv_dcn(x, o, m, w, g=g):
            return modulated_deform_conv2d(x, o, m, w, None, 1, 1, 1, g, 1)

        def torch_conv(x, w, g=g):
            return torch.nn.functional.conv2d(x, w, padding=1, groups=g)

        impls["mmcv modulated_deform_conv2d (CPU op)"] = torch_pair(mmcv_dcn,
                                                                   [tx, toff, tmask, tw])
        impls["torch 3x3 conv2d"] = torch_pair(torch_conv, [tx, tw])

        # Agreement of the two DCNs on this input (forward).
        with torch.no_grad():
            ref = modulated_deform_conv2d(tx, toff, tmask, tw, None, 1, 1, 1, g, 1)
        err = float(np.abs(np.asarray(ours(*jargs)) - ref.numpy().transpose(0, 2, 3, 1)).max()
                    / ref.abs().max())

        fns = [fn for pair in impls.values() for fn in pair]
        ms = median_ms(fns, args.runs)
        res = {k: (ms[2 * i], ms[2 * i + 1]) for i, k in enumerate(impls)}
        base = {"jax": res["JAX 3x3 conv (jit)"], "torch": res["torch 3x3 conv2d"]}
        for k, (f, fb) in res.items():
            ref_f, ref_fb = base["torch" if ("mmcv" in k or "torch" in k) else "jax"]
            print(f"| {name} | {k} | {f:.1f} | {fb:.1f} | {f / ref_f:.2f}x | "
                  f"{fb / ref_fb:.2f}x |")
        mm, us = res["mmcv modulated_deform_conv2d (CPU op)"], res["solov2_jax DCNv2 (jit)"]
        print(f"| {name} | ours vs mmcv | {mm[0] / us[0]:.2f}x faster | "
              f"{mm[1] / us[1]:.2f}x faster | max rel. diff {err:.1e} | |", flush=True)


if __name__ == "__main__":
    main()
