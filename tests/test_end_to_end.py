"""End to end against mmdetection 3.3.0's own loops, on the same COCO-format JPEG files.

Evaluation: mmdet's test loop (its dataloader, test pipeline, batch 1, `test_step`,
CocoMetric) vs `solov2_jax.evaluate` (tf.data + one static-shape program), on images of
varied sizes and both orientations whose resized sizes are mostly not multiples of 32,
with converted random weights (perturbed norms) and thresholds low enough for tens of
detections per image. Training: mmdet's train pipeline + `model.loss` / `train_step` vs
our pipeline + `train.train_step` on the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from solov2_jax import conversion_table as ct
from solov2_jax import convert, train
from solov2_jax import evaluate as ev
from solov2_jax.data import coco_builder, pipeline
from solov2_jax.data.make_demo import CATEGORIES, make_demo
from solov2_jax.models import build_model
from solov2_jax.postprocess import encode_rle
from tests import mmdet_loops

pytestmark = pytest.mark.parity

REPO = Path(__file__).resolve().parents[1]
CLASSES = [c["name"] for c in CATEGORIES]
# (mmdet config, test scale (long, short), thresholds): small scales keep CPU time low;
# the two scales give different buckets, and most images get a canvas smaller than it.
CASES = {
    "solov2-light_r18_fpn_ms-3x_coco": ((320, 192), dict(score_thr=0.03, filter_thr=0.02)),
    "solov2_r50_fpn_1x_coco": ((400, 256), dict(score_thr=0.03, filter_thr=0.02)),
}
MAX_CANDIDATES = 1500


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Demo JPEGs (96-256 px, both orientations) + two small training splits of the same
    2 landscape images, whose batch canvas (192 x 288) is narrower than the bucket
    (192 x 320): 'pair' with their instances, 'empty' with every annotation made crowd,
    so that no positive cell exists."""
    root = tmp_path_factory.mktemp("e2e")
    coco_dir = root / "coco"
    make_demo(str(coco_dir), seed=7, num_train=12, num_val=10)
    train_json = json.loads((coco_dir / "annotations" / "instances_train2017.json").read_text())
    by_image = {}
    for a in train_json["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    landscape = [im for im in train_json["images"] if im["width"] >= im["height"]]
    with_insts = [im for im in landscape
                  if sum(not a["iscrowd"] for a in by_image.get(im["id"], [])) >= 2]
    assert len(with_insts) >= 2
    for stem, images, crowd in (("pair", with_insts[:2], False), ("empty", with_insts[:2], True)):
        (coco_dir / stem).mkdir()
        anns = []
        for im in images:
            shutil.copy(coco_dir / "train2017" / im["file_name"], coco_dir / stem)
            anns += [dict(a, iscrowd=1) if crowd else a for a in by_image[im["id"]]]
        (coco_dir / "annotations" / f"instances_{stem}.json").write_text(json.dumps(
            {"images": images, "annotations": anns,
             "categories": train_json["categories"]}))
    builder, _ = coco_builder.prepare(str(coco_dir), str(root / "tfds"), progress=False)
    return {"root": root, "coco_dir": str(coco_dir), "data_dir": str(root / "tfds"),
            "builder": builder}


def _our_config(name, coco, scale, thr):
    config = convert.load_config(str(REPO / "configs" / f"{name}.py"))
    config.model.num_classes = len(CLASSES)
    config.data.coco_dir, config.data.data_dir = coco["coco_dir"], coco["data_dir"]
    config.data.test_scale = scale
    config.data.train_scales = (scale,)
    config.data.flip_prob = 0.0
    config.data.per_device_batch = 2
    config.data.eval_per_device_batch = 1
    config.test.update(thr, max_candidates=MAX_CANDIDATES)
    config.optim.warmup_iters = 0  # mmdet's bare train_step runs at the base lr
    return config


def _mmdet_and_ours(mmdet, name, coco, seed=0, cls_prior=False):
    """mmdet's model (random weights, perturbed norms) and ours converted from it.

    cls_prior: mmdet's own class-bias init (sigmoid = 0.01), so that an image without
    positives gives a background loss of realistic size instead of ~6000 (random biases
    over every cell and class, normalised by 1), whose gradients clipping would crush.
    """
    import torch

    scale, thr = CASES[name]
    model, cfg = mmdet.build_model(name, seed=seed, test_cfg=thr, num_classes=len(CLASSES))
    if cls_prior:
        with torch.no_grad():
            model.mask_head.conv_cls.bias.fill_(-np.log((1 - 0.01) / 0.01))
    config = _our_config(name, coco, scale, thr)
    variables = convert.convert_mmdet(mmdet_loops.as_numpy_state_dict(model), config)
    return model, cfg, config, variables


def _decode(results, label_of):
    out = {}
    for r in results:
        out.setdefault(r["image_id"], []).append(
            {"mask": mask_util.decode(r["segmentation"]).astype(bool),
             "label": label_of[r["category_id"]], "score": r["score"]})
    return out


def _results(dets, label_to_cat):
    return [{"image_id": iid, "category_id": label_to_cat[d["label"]], "score": d["score"],
             "segmentation": encode_rle(d["mask"])}
            for iid, ds in dets.items() for d in ds]


def _as_ground_truth(gt: COCO, results) -> COCO:
    """A COCO ground truth made of one side's detections (for cross AP)."""
    anns = []
    for k, r in enumerate(results, 1):
        area = float(mask_util.area(r["segmentation"]))
        anns.append({"id": k, "image_id": r["image_id"], "category_id": r["category_id"],
                     "segmentation": r["segmentation"], "area": area, "iscrowd": 0,
                     "bbox": list(mask_util.toBbox(r["segmentation"]))})
    out = COCO()
    out.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                   "annotations": anns}
    out.createIndex()
    return out


def _matched_fraction(ref, got) -> float:
    """Share of `ref` detections with an unused `got` detection of the same label, mask
    IoU >= 0.99 and |score difference| <= 1e-3 (greedy, in ref's order)."""
    total = matched = 0
    for iid, ds in ref.items():
        free = list(got.get(iid, []))
        for d in ds:
            total += 1
            for k, o in enumerate(free):
                if o["label"] != d["label"] or abs(o["score"] - d["score"]) > 1e-3:
                    continue
                inter = np.logical_and(o["mask"], d["mask"]).sum()
                union = np.logical_or(o["mask"], d["mask"]).sum()
                if union == 0 or inter / union >= 0.99:
                    matched += 1
                    free.pop(k)
                    break
    return matched / max(total, 1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_evaluation_equals_mmdet_test_loop(mmdet, coco, name, tmp_path):
    scale, _ = CASES[name]
    model, cfg, config, variables = _mmdet_and_ours(mmdet, name, coco)
    ann_file = ev.annotation_file(coco["coco_dir"], "val")
    theirs, their_metrics = mmdet_loops.test_loop(model, cfg, coco["coco_dir"], "val2017",
                                                  CLASSES, scale, ann_file)
    ours_metrics = ev.evaluate(config, variables, workdir=str(tmp_path))
    gt = COCO(ann_file)
    cats = [c["id"] for c in gt.dataset["categories"]]
    ours = _decode(json.loads((tmp_path / "results_val.segm.json").read_text()),
                   {c: i for i, c in enumerate(cats)})

    n_theirs = sum(len(d) for d in theirs.values())
    assert n_theirs >= 10 * len(theirs), f"only {n_theirs} mmdet detections"
    matched = _matched_fraction(theirs, ours), _matched_fraction(ours, theirs)
    print(f"{name}: {n_theirs} mmdet detections on {len(theirs)} images, "
          f"{sum(len(d) for d in ours.values())} ours; matched {matched}")
    assert min(matched) >= 0.99, matched

    their_results, our_results = _results(theirs, cats), _results(ours, cats)
    ids = sorted(gt.getImgIds())
    for ref, other in ((their_results, our_results), (our_results, their_results)):
        xap = ev.coco_metrics(_as_ground_truth(gt, ref), other, ids, cats)["segm_mAP"]
        print(f"{name}: xAP {xap:.4f}")
        assert xap >= 0.99, xap
    # Both sides' AP against the real ground truth (same COCOeval settings, unrounded).
    their_ap = ev.coco_metrics(gt, their_results, ids, cats)
    print(f"{name}: segm_mAP mmdet {their_ap['segm_mAP']:.6f} ours "
          f"{ours_metrics['segm_mAP']:.6f}")
    assert abs(their_ap["segm_mAP"] - ours_metrics["segm_mAP"]) <= 1e-3
    # ... and that COCOeval is mmdet's own CocoMetric (which rounds to 3 decimals).
    assert abs(their_metrics["coco/segm_mAP"] - round(their_ap["segm_mAP"], 3)) < 1e-9


def _our_step(config, variables, builder, split, dtype=np.float32):
    """One train.train_step on 1 device on the first batch of our pipeline for `split`;
    dtype float64 (under jax.enable_x64) runs the model, the step and its state in it."""
    model, tx, schedule, trainable, _, _ = train.build_training(config, 2, 2)
    if dtype != np.float32:
        model = build_model(config.model, dtype=dtype)
        variables = jax.tree.map(lambda x: np.asarray(x, dtype), variables)
    device = jax.devices()[:1]
    p_step, _ = train.make_p_train_step(config, model, tx, schedule, trainable,
                                        devices=device)
    state = train.TrainState(step=np.zeros((), np.int32), params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]))
    ds = pipeline.train_dataset(builder, config.data, num_local_devices=1, split=split)
    batch = next(pipeline.as_numpy_batches(ds))
    batch["image"] = batch["image"].astype(dtype)
    rstate = train.replicate(jax.tree.map(np.asarray, state), train.local_mesh(device))
    new, metrics = p_step(rstate, {k: batch[k] for k in train.STEP_KEYS})
    return train.unreplicate(new), {k: float(v[0]) for k, v in metrics.items()}


NAME_TRAIN = "solov2-light_r18_fpn_ms-3x_coco"


# float32 bounds. Against a float64 run of mmdet's own model on these batches (max error
# relative to each tensor's max) mmdet's float32 gradients are off by up to 6e-6, ours by
# up to 1.5e-3 — all of it in light-r18's layer3.1 conv1/bn1 (and, diluted, below): one
# pre-ReLU activation there is -9.7e-7 in float64 with the tensor's max at 9.1 (1.1e-7 of
# it, below float32's resolution at that scale), so its sign, and whether its gradient
# passes the ReLU, is a coin toss for any float32 program (ours flips it; mmdet's did not;
# another XLA fusion of our program does not either). Everywhere else ours is <= 3e-4.
# That the update itself is mmdet's is proven in float64 below, to 1e-6.
BUFFER_RTOL, PARAM_RTOL = 2e-3, 3e-5


def _assert_step_equal(config, variables, new, their_params, their_bufs,
                       param_rtol=PARAM_RTOL, buffer_rtol=BUFFER_RTOL):
    """Every parameter and momentum buffer after the step vs mmdet's; parameters that got
    no gradient in mmdet (frozen stages, or the kernel branch without positives) must be
    bitwise unchanged here with no momentum, as torch's SGD leaves them. Returns the
    names of those untouched parameters."""
    table = ct.solov2_table_for(build_model(config.model))
    flat_params = traverse_util.flatten_dict(new.params)
    flat_old = traverse_util.flatten_dict(variables["params"])
    flat_trace = traverse_util.flatten_dict(optax.tree_utils.tree_get(new.opt_state, "trace"))
    untouched = []
    for key, p in their_params.items():
        target = table[key]
        ours_p, ref = flat_params[target.path], target.transform(p)
        assert np.abs(ours_p - ref).max() <= param_rtol * max(np.abs(ref).max(), 1e-12), key
        buf, mu = their_bufs[key], flat_trace.get(target.path)
        if buf is None:
            np.testing.assert_array_equal(ours_p, flat_old[target.path], err_msg=key)
            if mu is not None and not isinstance(mu, optax.MaskedNode):
                assert not np.asarray(mu).any(), key
            untouched.append(key)
        else:
            ref_buf = target.transform(buf)
            assert np.abs(mu - ref_buf).max() <= buffer_rtol * max(np.abs(ref_buf).max(),
                                                                  1e-12), key
    return untouched


def test_training_step_equals_mmdet(mmdet, coco):
    """mmdet's train pipeline + loss + one SGD step vs ours, on a batch with positives."""
    scale, _ = CASES[NAME_TRAIN]
    model, cfg, config, variables = _mmdet_and_ours(mmdet, NAME_TRAIN, coco, seed=3,
                                                    cls_prior=True)
    data = mmdet_loops.train_batch(cfg, coco["coco_dir"], "pair", CLASSES, scale)
    theirs = mmdet_loops.losses(model, data)
    their_params, their_bufs = mmdet_loops.sgd_step(model, cfg, data)
    new, ours = _our_step(config, variables, coco["builder"], "pair")
    assert ours["num_pos"] > 0 and theirs["loss_mask"] > 0
    for key in ("loss_cls", "loss_mask"):
        assert abs(ours[key] - theirs[key]) <= 1e-4 * abs(theirs[key]), (key, ours, theirs)
    untouched = _assert_step_equal(config, variables, new, their_params, their_bufs)
    assert untouched and all(k.startswith(("backbone.conv1", "backbone.bn1",
                                           "backbone.layer1.")) for k in untouched)


def test_sgd_step_without_positives_equals_mmdet(mmdet, coco):
    """One SGD step on a batch without positive cells: parameters and momentum buffers
    as mmdet's; the kernel branch (no gradient in mmdet) and frozen stages bitwise
    unchanged with no momentum, as torch's SGD leaves parameters whose grad is None."""
    scale, _ = CASES[NAME_TRAIN]
    model, cfg, config, variables = _mmdet_and_ours(mmdet, NAME_TRAIN, coco, seed=4,
                                                    cls_prior=True)
    data = mmdet_loops.train_batch(cfg, coco["coco_dir"], "empty", CLASSES, scale)
    their_params, their_bufs = mmdet_loops.sgd_step(model, cfg, data)
    new, metrics = _our_step(config, variables, coco["builder"], "empty")
    assert metrics["num_pos"] == 0
    untouched = _assert_step_equal(config, variables, new, their_params, their_bufs)
    assert any("kernel_convs" in k for k in untouched)
    assert any("conv_kernel" in k for k in untouched)


@pytest.mark.parametrize("split,seed", [("pair", 3), ("empty", 4)])
def test_training_step_equals_mmdet_in_float64(mmdet, coco, split, seed):
    """The two steps above with both sides in float64 (mmdet's model .double(), ours with
    a float64 model, state and step): every parameter and momentum buffer within 1e-6 of
    mmdet's, relative to the tensor's max, with and without positive cells (measured:
    gradients <= 4e-7, losses <= 4e-9), and the untouched parameters bitwise unchanged.
    The update is mmdet's; what remains in float32 is float32 (see the bounds above)."""
    scale, _ = CASES[NAME_TRAIN]
    model, cfg, config, variables = _mmdet_and_ours(mmdet, NAME_TRAIN, coco, seed=seed,
                                                    cls_prior=True)
    model.double()
    data = mmdet_loops.train_batch(cfg, coco["coco_dir"], split, CLASSES, scale)
    theirs = mmdet_loops.losses(model, data)
    their_params, their_bufs = mmdet_loops.sgd_step(model, cfg, data)
    assert next(iter(their_params.values())).dtype == np.float64
    with jax.enable_x64(True):
        new, ours = _our_step(config, variables, coco["builder"], split, np.float64)
        new = jax.tree.map(np.asarray, new)
    assert new.params["backbone"]["layer3_1"]["conv1"]["kernel"].dtype == np.float64
    assert (ours["num_pos"] > 0) == (split == "pair")
    for key in ("loss_cls", "loss_mask"):
        assert abs(ours[key] - theirs[key]) <= 1e-7 * max(abs(theirs[key]), 1e-12), \
            (key, ours, theirs)
    untouched = _assert_step_equal(config, variables, new, their_params, their_bufs,
                                   param_rtol=1e-6, buffer_rtol=1e-6)
    if split == "empty":
        assert any("kernel_convs" in k for k in untouched)
