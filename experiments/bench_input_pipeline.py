"""Throughput (images/s) of the training input pipeline on COCO-like synthetic data.

Generates 640x480 / 480x640 JPEGs with ~7 polygon instances each into a temporary COCO
dir, builds it with `coco_builder`, then times `pipeline.train_dataset` at mmdet's
(1333, 800) scale with the pmap layout [8 devices, 2 per device] (host only, no device
transfer), once restricted to one core (tf.data private thread pool of 1, intra-op 1) and
once with all cores. Prints a markdown table and optionally writes it with --out.

  python experiments/bench_input_pipeline.py [--out table.md]   (record results in RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Runnable as a plain script from a checkout (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# mmdet's reported R50-1x SOLOv2 training throughput on Iluvatar BI-V100 x8.
REQUIRED_IMAGES_PER_S = 21.26


def write_coco(root: Path, num_images: int, instances: int, seed: int = 0) -> None:
    """COCO-format train2017 split of natural-looking JPEGs with polygon instances."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(num_images):
        h, w = (480, 640) if i % 4 else (640, 480)  # 3/4 landscape like COCO
        img = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h),
                         interpolation=cv2.INTER_CUBIC)
        for _ in range(instances):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                       int(rng.integers(10, 120)), c, -1)
        cv2.imwrite(str(root / "train2017" / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
        for _ in range(int(rng.integers(instances - 2, instances + 3))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(8, h / 4), rng.uniform(8, w / 4)
            t = np.sort(rng.uniform(0, 2 * np.pi, 16))
            poly = np.stack([np.clip(cx + rx * np.cos(t), 0, w - 1),
                             np.clip(cy + ry * np.sin(t), 0, h - 1)], 1).ravel().tolist()
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": mask_utils.toBbox(rle).tolist(),
                         "area": float(mask_utils.area(rle)), "segmentation": [poly]})
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": 1, "name": "thing"}]}, f)


def measure(ds, warmup: int, batches: int, images_per_batch: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process)."""
    it = ds.as_numpy_iterator()
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    n = batches * images_per_batch
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--instances", type=int, default=7)
    p.add_argument("--batches", type=int, default=6, help="timed batches of 16 images")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import tensorflow as tf

    from solov2_jax.config import solov2_config
    from solov2_jax.data import coco_builder, pipeline

    data = solov2_config(train_scales=((1333, 800),)).data  # batch 2/device, 100 instances
    data.shuffle_buffer = 64
    devices, per_dev = 8, data.per_device_batch

    with tempfile.TemporaryDirectory() as tmp:
        write_coco(Path(tmp) / "coco", args.images, args.instances)
        builder, _ = coco_builder.prepare(f"{tmp}/coco", f"{tmp}/tfds", progress=False)
        rows = []
        for label, threads in (("1 core", 1), (f"all cores ({os.cpu_count()})", None)):
            ds = pipeline.train_dataset(builder, data, num_local_devices=devices, seed=0)
            if threads:
                opts = tf.data.Options()
                opts.threading.private_threadpool_size = threads
                opts.threading.max_intra_op_parallelism = 1
                ds = ds.with_options(opts)
            rate, cpu_rate = measure(ds, 2, args.batches, devices * per_dev)
            rows.append((label, rate, cpu_rate))
            print(f"{label}: {rate:.1f} images/s, {cpu_rate:.1f} images/CPU-s", flush=True)
        load = os.getloadavg()[0]

    table = [
        "| train input pipeline, 1333x800, batch [8, 2] | images/s (wall) "
        "| images per CPU-second |",
        "|---|---|---|",
        *[f"| {label} | {rate:.1f} | {cpu:.1f} |" for label, rate, cpu in rows],
        f"| needed: mmdet R50-1x on Iluvatar BI-V100 x8 | {REQUIRED_IMAGES_PER_S} | |",
    ]
    text = "\n".join([
        "# Input pipeline throughput",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        "(shared with other jobs while measured), TensorFlow "
        f"{tf.__version__}. Data: {args.images} synthetic COCO-like JPEGs (640x480 and "
        f"480x640, ~{args.instances} polygon instances each) built with `coco_builder`; "
        "`pipeline.train_dataset` at scale (1333, 800) with random flip, normalise, pad to "
        "the (800, 1344)/(1344, 800) buckets, quarter-res mask targets and centres; "
        "batches laid out [8 devices, 2 per device] on the host (no device transfer). "
        "Images per CPU-second (process CPU time, all threads) is the per-core rate and is "
        "insensitive to other jobs on the machine; wall-clock rates are lower bounds "
        f"(1-minute load average during the run: {load:.1f} on {os.cpu_count()} cores).",
        "",
        *table,
        "",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
