"""How fast could we be? FLOPs of each side, the machine's measured peak, the best ratio.

The speed targets of issue 12 (>= 1.5x mmdet's images/s on the same CPU) assume the work
can be done faster. This script bounds what any implementation doing our arithmetic can
reach on this machine, from three measurements:

- peak: the fastest matrix multiply / 3x3 convolution XLA:CPU runs here (GFLOP/s, the
  best of a few large float32 shapes, all cores) -- the arithmetic ceiling of our code;
- FLOPs per call: ours from XLA's cost analysis of the compiled train step / predict
  program, mmdet's from `torch.utils.flop_counter.FlopCounterMode` over one
  `model.train_step` / `model.test_step` (each counter counts its own way, so the smaller
  of the two is used for the bound: the bound is then optimistic for us);
- mmdet's time per call (median of `--iters` after a warm-up, same threads).

best ratio = mmdet s / (FLOPs / peak): our images/s over mmdet's if every FLOP of the
step ran at the peak rate, with no memory traffic, layout change or idle core. Each side
runs in its own process (`--_side`), pinned to the same cores, like bench_vs_mmdet.py.

  python experiments/roofline.py                       # the bench's 4 quick cases
  python experiments/roofline.py --cases r50:train:1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import bench_vs_mmdet as bench  # noqa: E402  (same models, batches and weights)

MSG = "@@roofline "


def _best_time(fn, *args, n: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def measure_peak() -> dict:
    """GFLOP/s of the fastest float32 dot and 3x3 convolution shapes XLA:CPU runs here."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    key = jax.random.PRNGKey(0)
    dots = {}
    for m, k, n in ((2048, 2048, 2048), (1600, 4608, 512), (24576, 2304, 256)):
        a = jax.random.normal(key, (m, k))
        b = jax.random.normal(key, (k, n))
        dots[f"dot {m}x{k}x{n}"] = 2 * m * k * n / _best_time(jax.jit(jnp.dot), a, b) / 1e9
    conv = jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for h, w, c in ((40, 40, 512), (128, 192, 256)):
        x = jax.random.normal(key, (1, h, w, c))
        k = jax.random.normal(key, (3, 3, c, c)) * 0.02
        dots[f"conv3x3 {h}x{w}x{c}"] = 2 * h * w * c * c * 9 / _best_time(conv, x, k) / 1e9
    return {"peak_gflops": max(dots.values()), "shapes": {k: round(v, 1)
                                                          for k, v in dots.items()}}


def ours_flops(a) -> float:
    """XLA's FLOP count of our compiled train step / predict program for the case."""
    import jax
    import numpy as np

    side = bench.OursSide(a)
    if a.mode == "train":
        compiled = side.step.lower(side.state, side.batch).compile()
    else:
        from solov2_jax import predict

        b = side.batch
        fn = predict.infer_fn(side.program.model_cfg, side.program.test_cfg, side.out_hw,
                              side.program.precision)
        v = jax.tree.map(np.asarray, jax.device_get(side.variables))
        compiled = jax.jit(fn).lower(v, b["image"][0], b["img_shape"][0], b["ori_shape"][0],
                                     b["canvas"][0]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 1e9


def mmdet_flops_and_time(a) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    side = bench.MmdetSide(a)
    side.run()  # warm-up
    times = []
    for _ in range(a.iters):
        side.prepare()
        t = time.perf_counter()
        side.run()
        times.append(time.perf_counter() - t)
    side.prepare()
    counter = FlopCounterMode(display=False)
    with counter:
        side.run()
    return counter.get_total_flops() / 1e9, sorted(times)[len(times) // 2]


def side_main(a) -> None:
    if a.cores:
        os.sched_setaffinity(0, {int(c) for c in a.cores.split(",")})
    os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU bound, also on a machine with a GPU
    if a._side == "peak":
        out = measure_peak()
    elif a._side == "ours":
        out = {"gflop": ours_flops(a)}
    else:
        gflop, seconds = mmdet_flops_and_time(a)
        out = {"gflop": gflop, "seconds": seconds}
    print(MSG + json.dumps(out), flush=True)


def _run_side(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(MSG):
            return json.loads(line[len(MSG):])
    raise RuntimeError(f"roofline side {args[:2]} failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(bench.QUICK_CASES),
                   help="MODEL:train|predict:BATCH, comma-separated (bench_vs_mmdet's)")
    p.add_argument("--iters", type=int, default=5, help="timed mmdet calls per case")
    p.add_argument("--cores", default=None, help="cores to pin both sides to (default all)")
    p.add_argument("--_side", default=None, help=argparse.SUPPRESS)
    for name in ("--mode", "--batch", "--weights", "--config", "--mmdet-name"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cores = a.cores or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    if a._side:
        a.threads, a.device, a.precision, a.conv, a.ynn = len(cores.split(",")), "cpu", \
            "fp32", "auto", False
        a.weights_out = (a.weights if a.weights and not os.path.exists(a.weights)
                         else None)
        return side_main(a)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min); cores {cores}")
    warning = bench.load_warning(len(cores.split(",")))
    if warning:
        print(warning)
    peak = _run_side(["--_side", "peak", "--cores", cores])
    print(f"peak: {peak['peak_gflops']:.0f} GFLOP/s ({peak['shapes']})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.cases.split(","):
            case = bench.parse_case(spec, "cpu")
            batch = os.path.join(tmp, f"batch_{case['batch']}_{case['hw'][0]}.npz")
            bench.make_batch(batch, case["batch"], case["hw"])
            common = ["--mode", case["mode"], "--batch", batch, "--config", case["config"],
                      "--mmdet-name", case["mmdet_name"], "--cores", cores,
                      "--weights", os.path.join(tmp, f"weights_{case['model']}.npz"),
                      "--iters", str(a.iters)]
            mm = _run_side(["--_side", "mmdet", *common])  # writes the weights first
            ours = _run_side(["--_side", "ours", *common])
            flops = min(mm["gflop"], ours["gflop"])
            floor = flops / peak["peak_gflops"]
            rows.append((spec, mm["gflop"], ours["gflop"], mm["seconds"],
                         mm["gflop"] / mm["seconds"], floor, mm["seconds"] / floor))
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| case | mmdet GFLOP (torch count) | ours GFLOP (XLA count) | mmdet s | mmdet "
          "GFLOP/s | ours at peak s (min count) | best possible ours/mmdet |")
    print("|---|---|---|---|---|---|---|")
    for spec, fm, fo, tm, rate, floor, best in rows:
        print(f"| {spec} | {fm:.0f} | {fo:.0f} | {tm:.3f} | {rate:.0f} | {floor:.3f} | "
              f"{best:.2f}x |")


if __name__ == "__main__":
    main()
