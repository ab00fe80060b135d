"""solov2-jax vs mmdetection 3.3.0 in one run: train step and predict, images/s.

Each side runs in its own worker process (`--_worker`), pinned to the same cores
(`os.sched_setaffinity`, before torch/JAX start) with the same thread count (torch's
intra-op threads; XLA:CPU sizes its pool from the pinned cores, and a single core also
turns `--xla_cpu_multi_thread_eigen` off). Workers hold their model and batch; the parent
asks each for one iteration in turn (order reversed every round), so slow drifts of the
machine hit both sides alike. Warm-up calls are excluded (the first call, which for ours
includes XLA's compilation, is reported apart).

Same weights and batches: the mmdet worker builds `tests.mmdet_ref.build_model` (random
weights, perturbed norms, mmdet's class-prior bias so predictions are a realistic few
hundred candidates) and saves its state_dict; our workers convert it
(`convert.convert_mmdet`). The batch is synthetic (random BGR image noise, ellipse
instances) written once to an .npz that both sides read: mmdet gets the uint8 images and
full-resolution masks through its own `data_preprocessor`, ours the normalised image and
the host-side mask reductions (`mask_ops`) our tf.data pipeline ships. The fingerprint
(hash of the .npz arrays) and the first-step losses / predicted scores of every side are
printed so a mismatch is visible. Timed: mmdet `model.train_step` (preprocessor, loss,
backward, SGD) and `model.test_step` (forward + post-processing to masks at the original
size); ours the pmapped `train.train_step` and `predict.Program` (masks unpacked on the
host). Our host-side mask reductions (done by tf.data in parallel to training) are not
timed.

Sides: `mmdet`, `ours`, and ours variants `ours+conv=xla|shifted|shifted_dot1x1` (the conv
implementation, `models.conv`) and `+ynn` (XLA:CPU's YNNPACK convolution fusion off,
`backend.cpu_xla_flags`); a variant-only run compares ours against ours (converted mmdet
weights still need torch + mmdet installed).

  python experiments/bench_vs_mmdet.py --quick                  # 4 CPU cases, < 10 min
  python experiments/bench_vs_mmdet.py --cases r50:train:1 --sides ours+conv=xla,ours
  python experiments/bench_vs_mmdet.py --device gpu             # 1333x800, b 2/8, fp32/bf16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# model key -> (our config, mmdet config name, CPU input (H, W) = the canvas).
MODELS = {
    "r50": ("configs/solov2_r50_fpn_1x_coco.py", "solov2_r50_fpn_1x_coco", (512, 768)),
    "r18": ("configs/solov2-light_r18_fpn_ms-3x_coco.py",
            "solov2-light_r18_fpn_ms-3x_coco", (448, 672)),
}
GPU_HW = (800, 1344)  # mmdet's 1333 x 800 scale, padded to x32
CPU_CASES = ["r50:train:1", "r50:train:2", "r50:predict:1", "r50:predict:2",
             "r18:train:1", "r18:train:4", "r18:predict:1", "r18:predict:4"]
QUICK_CASES = ["r50:train:1", "r50:predict:1", "r18:train:1", "r18:predict:4"]
GPU_CASES = [f"{m}:{mode}:{b}:{p}" for m in ("r50", "r18") for mode in ("train", "predict")
             for b in (2, 8) for p in ("fp32", "bf16")]
NUM_INSTANCES = 6
# models.conv.CHOICES (not imported: the parent process stays free of JAX).
CONV_CHOICES = ("auto", "xla", "shifted", "shifted_dot1x1")
MSG = "@@bench "  # prefix of worker protocol lines on stdout (libraries print too)


# ---------------------------------------------------------------------------------------
# the shared batch


def make_batch(path: str, batch: int, hw: tuple[int, int], seed: int = 0) -> str:
    """Writes images (uint8 BGR [B, H, W, 3]), masks (uint8 [B, N, H, W]), boxes (float32
    xyxy [B, N, 4]) and labels (int64 [B, N]) to `path`; returns their sha256."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = hw
    # Smooth-ish noise: a coarse random field upsampled, so features are not pure noise.
    coarse = rng.integers(0, 256, (batch, h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)[:, :h, :w]
    images = np.clip(images.astype(np.int16) + rng.integers(-20, 21, images.shape), 0, 255)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((batch, NUM_INSTANCES, h, w), np.uint8)
    for b in range(batch):
        for n in range(NUM_INSTANCES):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
            masks[b, n] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    boxes = np.zeros((batch, NUM_INSTANCES, 4), np.float32)
    for b in range(batch):
        for n in range(NUM_INSTANCES):
            ys, xs = np.nonzero(masks[b, n])
            boxes[b, n] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    arrays = dict(images=images.astype(np.uint8), masks=masks, boxes=boxes,
                  labels=rng.integers(0, 80, (batch, NUM_INSTANCES)).astype(np.int64))
    np.savez(path, **arrays)
    return fingerprint(arrays)


def fingerprint(arrays) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(arrays[k].tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# workers (one side each, in their own process)


class MmdetSide:
    def __init__(self, a):
        import copy

        import numpy as np
        import torch

        from tests import mmdet_ref

        self.a, self.copy, self.torch = a, copy, torch
        mmdet_ref.import_mmdet()  # sets torch's threads to the core count: reset below
        torch.set_num_threads(a.threads)
        self.cuda = a.device == "gpu"
        model, cfg = mmdet_ref.build_model(a.mmdet_name, seed=0, init_weights=False)
        with torch.no_grad():  # mmdet's own prior (sigmoid 0.01), not a random bias
            model.mask_head.conv_cls.bias.fill_(-float(np.log((1 - 0.01) / 0.01)))
        if a.weights_out:
            np.savez(a.weights_out, **{k: v.detach().numpy()
                                       for k, v in model.state_dict().items()})
        self.model = model.cuda() if self.cuda else model
        arrays = dict(np.load(a.batch))
        self.fingerprint = fingerprint(arrays)
        self.data = self._data(arrays, train=a.mode == "train")
        if a.mode == "train":
            from mmengine.optim import build_optim_wrapper

            ow = copy.deepcopy(cfg.optim_wrapper)
            if a.precision == "bf16":
                ow.update(type="AmpOptimWrapper", dtype="bfloat16")
            self.wrapper = build_optim_wrapper(self.model, ow)
            self.model.train()
        else:
            self.model.eval()
        self.next = copy.deepcopy(self.data)

    def _data(self, arrays, train: bool):
        from mmdet.structures import DetDataSample
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData

        torch = self.torch
        h, w = arrays["images"].shape[1:3]
        inputs, samples = [], []
        for i, img in enumerate(arrays["images"]):
            inputs.append(torch.from_numpy(img.transpose(2, 0, 1).copy()))
            s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                            pad_shape=(h, w), scale_factor=(1.0, 1.0),
                                            flip=False, img_id=i))
            if train:
                gt = InstanceData()
                gt.bboxes = torch.from_numpy(arrays["boxes"][i])
                gt.labels = torch.from_numpy(arrays["labels"][i])
                gt.masks = BitmapMasks(arrays["masks"][i], h, w)
                s.gt_instances = gt
            samples.append(s)
        return {"inputs": inputs, "data_samples": samples}

    def run(self) -> dict:
        torch = self.torch
        data, self.next = self.next, None
        if self.a.mode == "train":
            log = self.model.train_step(data, self.wrapper)
            out = {k: float(v) for k, v in log.items() if k in ("loss_cls", "loss_mask")}
        else:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                 enabled=self.a.precision == "bf16"
                                                 and self.cuda):
                res = self.model.test_step(data)
            scores = sorted((float(s) for r in res for s in r.pred_instances.scores),
                            reverse=True)
            out = {"num_dets": len(scores), "top_scores": [round(s, 5) for s in scores[:3]]}
        if self.cuda:
            torch.cuda.synchronize()
        return out

    def prepare(self):  # a fresh copy for the next call (mmdet edits data in place)
        self.next = self.copy.deepcopy(self.data)

    def peak_device_bytes(self):
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None


class OursSide:
    def __init__(self, a):
        import jax
        import numpy as np

        from solov2_jax import convert, models, predict, train
        from solov2_jax.data import preprocess
        from solov2_jax.mask_ops import center_of_mass, downsample_x4

        self.a, self.np, self.jax = a, np, jax
        config = convert.load_config(str(REPO / a.config))
        with config.unlocked():
            config.model.conv_impl = a.conv
        config.train.precision = a.precision
        arrays = dict(np.load(a.batch))
        self.fingerprint = fingerprint(arrays)
        b, h, w = arrays["images"].shape[:3]
        image = np.stack([preprocess.normalise(im, config.data.mean, config.data.std)
                          for im in arrays["images"]])
        hw = np.tile(np.asarray([[h, w]], np.int32), (b, 1))
        variables = convert.convert_mmdet(dict(np.load(a.weights)), config)
        self.device = jax.local_devices()[:1]
        if a.mode == "train":
            n_max = int(config.data.max_instances)
            n = arrays["masks"].shape[1]
            pad = lambda x, dtype: np.pad(  # noqa: E731
                x, [(0, 0), (0, n_max - n)] + [(0, 0)] * (x.ndim - 2)).astype(dtype)
            self.batch = {
                "image": image[None], "canvas": hw[None],
                "gt_boxes": pad(arrays["boxes"], np.float32)[None],
                "gt_labels": pad(arrays["labels"], np.int32)[None],
                "gt_masks": pad(np.stack([downsample_x4(m) for m in arrays["masks"]]),
                                np.uint8)[None],
                "gt_centers": pad(np.stack([center_of_mass(m) for m in arrays["masks"]]),
                                  np.float32)[None],
                "gt_valid": pad(np.ones((b, n), bool), bool)[None]}
            model, tx, schedule, trainable, _, _ = train.build_training(config, 1000, b)
            self.conv_impl = model.conv_impl
            self.step, _ = train.make_p_train_step(config, model, tx, schedule, trainable,
                                                   devices=self.device)
            state = train.TrainState(step=np.zeros((), np.int32),
                                     params=variables["params"],
                                     batch_stats=variables["batch_stats"],
                                     opt_state=tx.init(variables["params"]))
            self.state = train.replicate(state, train.local_mesh(self.device))
        else:
            self.conv_impl = models.build_model(config.model).conv_impl
            self.program = predict.program(config, self.device)
            self.variables = self.program.replicate(variables)
            self.batch = {"image": image[None], "img_shape": hw[None], "ori_shape": hw[None],
                          "canvas": hw[None]}
            self.out_hw = (h, w)

    def run(self) -> dict:
        np, jax = self.np, self.jax
        if self.a.mode == "train":
            self.state, metrics = self.step(self.state, self.batch)
            m = jax.device_get(metrics)
            jax.block_until_ready(self.state)
            return {k: float(m[k][0]) for k in ("loss_cls", "loss_mask")}
        out = jax.device_get(self.program(self.variables, self.batch, self.out_hw))
        np.unpackbits(out["masks"], axis=-1)  # the masks as mmdet returns them (bool)
        scores = sorted(out["scores"][out["valid"]].tolist(), reverse=True)
        return {"num_dets": len(scores), "top_scores": [round(s, 5) for s in scores[:3]]}

    def prepare(self):
        pass

    def peak_device_bytes(self):
        if self.a.device != "gpu":
            return None
        return int(self.device[0].memory_stats().get("peak_bytes_in_use", 0))


def _send(obj) -> None:
    print(MSG + json.dumps(obj), flush=True)


def worker(a) -> None:
    if a.cores:
        os.sched_setaffinity(0, [int(c) for c in a.cores.split(",")])
    if a.side == "ours":
        flags = [os.environ.get("XLA_FLAGS", "")]
        if a.device == "cpu" and a.threads == 1:
            flags.append("--xla_cpu_multi_thread_eigen=false")
        if a.ynn:
            from solov2_jax import backend

            flags += backend.cpu_xla_flags(ynn_convolutions=False)
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)
        os.environ["JAX_PLATFORMS"] = "cuda" if a.device == "gpu" else "cpu"
    t0 = time.perf_counter()
    side = (MmdetSide if a.side == "mmdet" else OursSide)(a)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = side.run()  # ours: compilation + one step
    first_s = time.perf_counter() - t0
    side.prepare()
    _send({"ready": True, "setup_s": setup_s, "first_s": first_s, "first": first,
           "fingerprint": side.fingerprint,
           "conv_impl": getattr(side, "conv_impl", None)})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            out = side.run()
            dt = time.perf_counter() - t0
            side.prepare()
            _send({"t": dt, "out": out})
        elif cmd == "stats":
            _send({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "peak_device_mib": (lambda b: None if b is None else b / 2**20)(
                       side.peak_device_bytes())})
        else:
            return


# ---------------------------------------------------------------------------------------
# parent


class Worker:
    """A running worker process; `call` sends one command and waits for its reply."""

    def __init__(self, args: list[str], log_path: str):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, __file__, "--_worker", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=REPO)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MSG):
                return json.loads(line[len(MSG):])
        self.log.flush()
        tail = Path(self.log_path).read_text()[-3000:]
        raise RuntimeError(f"worker exited (rc {self.proc.wait()}); its log "
                           f"{self.log_path} ends:\n{tail}")

    def call(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        self.log.close()


def parse_side(spec: str) -> dict:
    """'mmdet' | 'ours[+conv=IMPL][+ynn]' -> worker options."""
    name, *opts = spec.split("+")
    if name not in ("mmdet", "ours") or (name == "mmdet" and opts):
        raise SystemExit(f"bench_vs_mmdet.py: bad side {spec!r} (mmdet | ours[+conv=...]"
                         "[+ynn])")
    out = {"side": name, "conv": "auto", "ynn": False}
    for o in opts:
        if o == "ynn":
            out["ynn"] = True
        elif o.startswith("conv=") and o[5:] in CONV_CHOICES:
            out["conv"] = o[5:]
        else:
            raise SystemExit(f"bench_vs_mmdet.py: bad option {o!r} in side {spec!r}")
    return out


def parse_case(spec: str, device: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in MODELS or \
            parts[1] not in ("train", "predict") or not parts[2].isdigit() or \
            (len(parts) == 4 and parts[3] not in ("fp32", "bf16")):
        raise SystemExit(f"bench_vs_mmdet.py: bad case {spec!r} (MODEL:train|predict:BATCH"
                         f"[:fp32|bf16], MODEL in {', '.join(MODELS)})")
    precision = parts[3] if len(parts) == 4 else "fp32"
    if device == "cpu" and precision != "fp32":
        raise SystemExit(f"bench_vs_mmdet.py: case {spec!r}: bf16 is for --device gpu")
    config, mmdet_name, hw = MODELS[parts[0]]
    return dict(name=spec, model=parts[0], mode=parts[1], batch=int(parts[2]),
                precision=precision, config=config, mmdet_name=mmdet_name,
                hw=GPU_HW if device == "gpu" else hw)


def run_case(case, sides, a, tmp, log) -> list[dict]:
    import numpy as np

    batch_path = os.path.join(tmp, f"batch_{case['batch']}_{case['hw'][0]}.npz")
    fp = make_batch(batch_path, case["batch"], case["hw"])
    weights = os.path.join(tmp, f"weights_{case['model']}.npz")
    common = ["--mode", case["mode"], "--batch", batch_path, "--weights", weights,
              "--config", case["config"], "--mmdet-name", case["mmdet_name"],
              "--precision", case["precision"], "--device", a.device,
              "--threads", str(a.threads), "--cores", a.cores]
    # The mmdet worker is started first: it writes the weights the others convert.
    order = sorted(range(len(sides)), key=lambda i: sides[i]["side"] != "mmdet")
    if not any(s["side"] == "mmdet" for s in sides) and not os.path.exists(weights):
        order = [-1] + order  # a weights-only mmdet worker, closed right away
    workers, ready = {}, {}
    try:
        for i in order:
            s = {"side": "mmdet", "conv": "auto", "ynn": False} if i < 0 else sides[i]
            extra = ["--side", s["side"], "--conv", s["conv"]] + (["--ynn"] if s["ynn"]
                                                                 else [])
            if s["side"] == "mmdet" and not os.path.exists(weights):
                extra += ["--weights-out", weights]
            w = Worker(common + extra, os.path.join(tmp, f"worker_{i + 1}.log"))
            r = w.read()
            if i < 0:
                w.close()
                continue
            workers[i], ready[i] = w, r
            log(f"  {sides[i]['label']}: setup {r['setup_s']:.1f} s, first call "
                f"{r['first_s']:.1f} s, first result {r['first']}"
                + (f", conv_impl {r['conv_impl']}" if r["conv_impl"] else ""))
            if r["fingerprint"] != fp:
                raise RuntimeError(f"batch fingerprint mismatch: {r['fingerprint']} != {fp}")
        load_before = os.getloadavg()[0]
        times = {i: [] for i in workers}
        for _ in range(a.warmup):
            for i in workers:
                workers[i].call("run")
        for it in range(a.iters):
            for i in (list(workers) if it % 2 == 0 else list(workers)[::-1]):
                times[i].append(workers[i].call("run")["t"])
            log(f"  round {it + 1}/{a.iters}: " + ", ".join(
                f"{sides[i]['label']} {times[i][-1]:.2f} s" for i in workers)
                + f" (load {os.getloadavg()[0]:.1f})")
        load_after = os.getloadavg()[0]
        rows = []
        for i, w in workers.items():
            stats = w.call("stats")
            t = np.asarray(times[i])
            rows.append(dict(case=case["name"], side=sides[i]["label"],
                             median_s=float(np.median(t)), min_s=float(t.min()),
                             images_per_s=case["batch"] / float(np.median(t)),
                             first_s=ready[i]["first_s"], first=ready[i]["first"],
                             load=(load_before, load_after), fingerprint=fp, **stats))
        return rows
    finally:
        for w in workers.values():
            w.close()


def load_warning(threads: int) -> str | None:
    """A warning when other processes would take CPU from the pinned cores."""
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        return (f"WARNING: load average {load1:.2f} before the run (1 min); other processes "
                f"compete for the {threads} pinned core(s): absolute times are inflated "
                "and ratios noisy (alternation only evens out slow drifts)")
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"CPU cases {', '.join(QUICK_CASES)} (< 10 min on 2 quiet cores)")
    p.add_argument("--cases", default=None,
                   help="comma-separated MODEL:train|predict:BATCH[:fp32|bf16]")
    p.add_argument("--sides", default="mmdet,ours",
                   help="comma-separated: mmdet, ours, ours+conv=xla|shifted|shifted_dot1x1, "
                        "+ynn")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per side (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per side (default: all cores of this process)")
    p.add_argument("--cores", default=None,
                   help="comma-separated core ids to pin both sides to (default: the first "
                        "--threads cores this process may use)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--side", "--mode", "--batch", "--weights", "--config", "--mmdet-name",
                 "--precision", "--conv", "--weights-out"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ynn", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        a.threads = int(a.threads)
        return worker(a)

    if a.iters < 5:
        p.error("--iters must be >= 5 (median and min of at least 5)")
    allowed = sorted(os.sched_getaffinity(0))
    a.threads = a.threads or len(allowed)
    if a.cores is None:
        a.cores = ",".join(str(c) for c in allowed[:a.threads])
    cores = [int(c) for c in a.cores.split(",")]
    if len(cores) != a.threads or not set(cores) <= set(allowed):
        p.error(f"--cores {a.cores} must name --threads={a.threads} of the usable cores "
                f"{allowed}")
    if a.quick and (a.cases or a.device == "gpu"):
        p.error("--quick is the CPU case list; not with --cases or --device gpu")
    names = (a.cases.split(",") if a.cases else
             QUICK_CASES if a.quick else GPU_CASES if a.device == "gpu" else CPU_CASES)
    cases = [parse_case(n, a.device) for n in names]
    sides = [dict(parse_side(s), label=s) for s in a.sides.split(",")]
    if len({s["label"] for s in sides}) != len(sides):
        p.error("--sides: each side once")
    if a.device == "gpu":
        import importlib.util

        if importlib.util.find_spec("jax_cuda12_plugin") is None and \
                importlib.util.find_spec("jax_plugins") is None:
            raise SystemExit("bench_vs_mmdet.py: --device gpu needs JAX's CUDA plugin "
                             "(pip install -U 'jax[cuda12]') and a CUDA build of torch")

    def log(msg):
        print(msg, flush=True)

    log(f"# bench_vs_mmdet: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, pinned to {a.cores}, {a.threads} thread(s) per side, "
        f"device {a.device}, {a.iters} iters (+{a.warmup} warm-up), load "
        f"{tuple(round(v, 2) for v in os.getloadavg())}")
    warn = load_warning(a.threads)
    if warn:
        log(warn)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_mmdet_") as tmp:
        for case in cases:
            log(f"case {case['name']} ({case['hw'][0]}x{case['hw'][1]}):")
            rows += run_case(case, sides, a, tmp, log)
            warn = load_warning(a.threads)
            if warn:
                log(warn)
    ref = sides[0]["label"] if all(s["side"] == "ours" for s in sides) else "mmdet"
    log(f"\n| case | side | median s | min s | images/s | vs {ref} | first call s | "
        "peak RSS MiB | peak device MiB | load before/after | first result |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["case"] == r["case"] and x["side"] == ref)
        dev = "-" if r["peak_device_mib"] is None else f"{r['peak_device_mib']:.0f}"
        log(f"| {r['case']} | {r['side']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
            f"{r['images_per_s']:.3f} | {r['images_per_s'] / base['images_per_s']:.2f}x | "
            f"{r['first_s']:.1f} | {r['peak_rss_mib']:.0f} | {dev} | "
            f"{r['load'][0]:.2f}/{r['load'][1]:.2f} | {r['first']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
