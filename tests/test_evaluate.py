"""COCO evaluation: metric parity with mmdet's CocoMetric, end to end on 8 devices, CLI."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from solov2_jax import convert, predict
from solov2_jax import evaluate as ev
from solov2_jax.data import coco_builder
from solov2_jax.data.make_demo import make_demo
from solov2_jax.models import build_model

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
# A random tiny model scores ~0.01 (focal prior); low thresholds give it detections.
LOW_THR = {"score_thr": 0.005, "filter_thr": 0.0}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_demo")
    coco_dir = str(root / "coco")
    make_demo(coco_dir, num_train=4, num_val=6)
    builder, _ = coco_builder.prepare(coco_dir, str(root / "tfds"), progress=False)
    ann_file = ev.annotation_file(coco_dir, "val")
    return {"root": root, "coco_dir": coco_dir, "data_dir": str(root / "tfds"),
            "ann_file": ann_file, "cats": coco_builder.category_info(builder)}


def _config(demo):
    from configs import tiny

    c = tiny.get_config()
    c.data.coco_dir, c.data.data_dir = demo["coco_dir"], demo["data_dir"]
    c.test.update(LOW_THR)
    return c


@pytest.fixture(scope="module")
def variables(demo):
    """Random variables of the tiny model, filled on the host from the traced shapes.

    Compiling `model.init` takes ~20 s on 2 cores; real initialisation is tested in
    tests/models. He-scaled kernels, unit BN/GN statistics, and the focal-prior class bias.
    """
    rng = np.random.default_rng(0)
    flat = {}
    for path, shape in convert.variable_shapes(build_model(_config(demo).model)).items():
        if path[-1] in ("var", "scale"):
            flat[path] = np.ones(shape, np.float32)
        elif path[-1] in ("mean", "bias"):
            flat[path] = np.full(shape, -4.6 if "conv_cls" in path else 0.0, np.float32)
        else:
            std = np.sqrt(2.0 / np.prod(shape[:-1]))
            flat[path] = rng.normal(0.0, std, shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def _gt_instances(gt, cats, rng=None):
    """Per image: instances from the non-crowd GT masks; with rng, perturbed predictions.

    Perturbations: masks shifted by a few pixels or eroded, some instances dropped, some
    relabelled, random scores, and false positives (shifted copies), so AP is strictly
    between 0 and 1.
    """
    cat_to_label = {c["id"]: c["label"] for c in cats}
    image_ids = sorted(gt.getImgIds())
    out = []
    for iid in image_ids:
        insts = []
        for a in gt.loadAnns(gt.getAnnIds(imgIds=[iid])):
            if a["iscrowd"]:
                continue
            m, label, score = gt.annToMask(a), cat_to_label[a["category_id"]], 1.0
            if rng is not None:
                if rng.random() < 0.15:
                    continue
                if rng.random() < 0.15:
                    label = int(rng.integers(0, len(cats)))
                m = np.roll(m, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
                # float32 values, as mmdet's score tensors hold.
                score = float(np.float32(rng.uniform(0.05, 1.0)))
                if rng.random() < 0.3:
                    fp = np.roll(m, tuple(rng.integers(-12, 13, 2)), axis=(0, 1))
                    fp_score = float(np.float32(rng.random()))
                    insts.append({"mask": fp, "label": label, "score": fp_score})
            insts.append({"mask": m.astype(bool), "label": label, "score": score})
        out.append(insts)
    return image_ids, out


def _rle(insts):
    out = []
    for i in insts:
        r = mask_util.encode(np.asfortranarray(i["mask"].astype(np.uint8)))
        out.append({**i, "mask": {"size": r["size"], "counts": r["counts"].decode()}})
    return out


def _ours(gt, cats, image_ids, instances):
    label_to_cat = [c["id"] for c in sorted(cats, key=lambda c: c["label"])]
    results = ev.coco_results([_rle(i) for i in instances], image_ids, label_to_cat)
    return ev.coco_metrics(gt, results, image_ids, label_to_cat), results


@pytest.mark.parity
def test_metric_parity_with_mmdet_coco_metric(demo, mmdet, monkeypatch):
    import torch
    from mmdet.evaluation.metrics import coco_metric

    gt = COCO(demo["ann_file"])
    image_ids, instances = _gt_instances(gt, demo["cats"], np.random.default_rng(0))
    ours, results = _ours(gt, demo["cats"], image_ids, instances)

    # mmdet rounds to 3 decimals; record its COCOeval to compare unrounded stats too.
    seen = []

    class Recording(coco_metric.COCOeval):
        def summarize(self):
            super().summarize()
            seen.append(self.stats.copy())

    monkeypatch.setattr(coco_metric, "COCOeval", Recording)
    metric = coco_metric.CocoMetric(ann_file=demo["ann_file"], metric="segm")
    metric.dataset_meta = {"classes": [c["name"] for c in demo["cats"]]}
    for iid, insts in zip(image_ids, instances, strict=True):
        img = gt.loadImgs(iid)[0]
        n, hw = len(insts), (img["height"], img["width"])
        masks = np.stack([i["mask"] for i in insts]) if n else np.zeros((0, *hw), bool)
        sample = {"img_id": iid, "ori_shape": hw, "pred_instances": {
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor([i["label"] for i in insts], dtype=torch.int64),
            "scores": torch.tensor([i["score"] for i in insts], dtype=torch.float32),
            "bboxes": torch.zeros((n, 4))}}
        metric.process({}, [sample])
    theirs = metric.compute_metrics(metric.results)

    assert 0.1 < ours["segm_mAP"] < 0.9, ours
    assert len(seen) == 1
    # mmdet passes scores through float32 tensors; ours are the same float32 values.
    diffs = [abs(ours[f"segm_{n}"] - float(s)) for n, s in
             zip(ev.METRIC_NAMES, seen[0][:6], strict=True)]
    assert max(diffs) <= 1e-9, (ours, seen[0][:6])
    for name in ev.METRIC_NAMES:
        assert theirs[f"segm_{name}"] == float(f"{round(ours[f'segm_{name}'], 3)}")
    assert {r["category_id"] for r in results} <= {c["id"] for c in demo["cats"]}


def test_perfect_detections_give_ap_one(demo):
    gt = COCO(demo["ann_file"])
    image_ids, instances = _gt_instances(gt, demo["cats"])
    metrics, _ = _ours(gt, demo["cats"], image_ids, instances)
    for name in ("segm_mAP", "segm_mAP_50", "segm_mAP_75"):
        assert metrics[name] == pytest.approx(1.0), metrics


def test_no_detections_give_zero(demo):
    gt = COCO(demo["ann_file"])
    metrics = ev.coco_metrics(gt, [], sorted(gt.getImgIds()), [1, 3, 7, 9])
    assert metrics["segm_mAP"] == 0.0


def test_evaluate_end_to_end(demo, variables, tmp_path):
    assert jax.local_device_count() == 8
    config = _config(demo)
    prog = predict.program(config)
    traces = prog.num_traces  # other modules of this process may have compiled it already
    metrics = ev.evaluate(config, variables, workdir=str(tmp_path))
    gt = COCO(demo["ann_file"])
    assert set(metrics) == {f"segm_{n}" for n in ev.METRIC_NAMES} | {"num_images",
                                                                    "num_detections"}
    assert metrics["num_images"] == len(gt.getImgIds()) == 6  # padding (10 slots) dropped
    assert metrics["num_detections"] > 0
    results = json.loads((tmp_path / "results_val.segm.json").read_text())
    assert len(results) == metrics["num_detections"]
    assert {r["category_id"] for r in results} <= {1, 3, 7, 9}  # original, not labels
    assert {r["image_id"] for r in results} <= set(gt.getImgIds())
    gt.loadRes(results)  # valid COCO results (sizes match the images)
    written = json.loads((tmp_path / "eval_val.json").read_text())
    assert written["segm_mAP"] == metrics["segm_mAP"]
    # One program per orientation (the demo split has both), cached across calls.
    assert prog.num_traces - traces == (2 if traces == 0 else 0)
    traces = prog.num_traces
    again = ev.evaluate(config, variables, workdir=str(tmp_path), max_images=3, bbox=True,
                        classwise=True)
    assert again["num_images"] == 3 and prog.num_traces == traces
    # Box AP of the masks' tight boxes, beside segm AP; per-class tables in the JSON.
    assert {f"bbox_{n}" for n in ev.METRIC_NAMES} <= set(again)
    boxes = json.loads((tmp_path / "results_val.bbox.json").read_text())
    segms = json.loads((tmp_path / "results_val.segm.json").read_text())
    assert len(boxes) == len(segms) == again["num_detections"] > 0
    for b, s in zip(boxes, segms, strict=True):
        assert (b["image_id"], b["category_id"], b["score"]) == (
            s["image_id"], s["category_id"], s["score"])
        assert "bbox" not in s and "segmentation" not in b
        # xywh of the mask's tight box (pycocotools' toBbox gives the same xywh)
        np.testing.assert_array_equal(b["bbox"], mask_util.toBbox(s["segmentation"]))
    written = json.loads((tmp_path / "eval_val.json").read_text())
    assert set(written["classwise"]) == {"segm", "bbox"}
    assert [r["category"] for r in written["classwise"]["segm"]] == [
        c["name"] for c in sorted(demo["cats"], key=lambda c: c["label"])]


def test_cli_weights(demo, variables, tmp_path, capsys):
    weights = convert.save_variables(str(tmp_path / "w"), variables)
    overrides = [f"--config.data.coco_dir={demo['coco_dir']}",
                 f"--config.data.data_dir={demo['data_dir']}",
                 *(f"--config.test.{k}={v}" for k, v in LOW_THR.items())]
    out = tmp_path / "out"
    argv = ["solov2-evaluate", f"--config={TINY}", f"--weights={weights}",
            f"--workdir={out}", "--max-images=2", *overrides]
    assert ev.main(argv) == 0
    assert json.loads((out / "eval_val.json").read_text())["num_images"] == 2

    bad = dict(variables)
    bad["params"] = jax.tree.map(lambda x: x, dict(bad["params"]))
    head = dict(bad["params"]["mask_head"])
    name = sorted(head)[0]
    head[name] = jax.tree.map(lambda x: np.zeros((*x.shape[:-1], x.shape[-1] + 1)),
                              head[name])
    bad["params"]["mask_head"] = head
    wrong = convert.save_variables(str(tmp_path / "wrong"), bad)
    capsys.readouterr()
    assert ev.main([*argv[:2], f"--weights={wrong}", *argv[3:]]) == 1
    err = capsys.readouterr().err
    assert wrong in err and "tiny.py" in err and "mask_head" in err
    assert ev.main([*argv[:2], f"--weights={tmp_path / 'nope'}", *argv[3:]]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.parity
def test_bbox_and_classwise_parity_with_mmdet_coco_metric(demo, mmdet):
    """Box AP of the masks' tight boxes and the per-class table, as mmdet's CocoMetric
    (metric=['bbox', 'segm'], classwise=True) computes them from mmdet's mask2bbox."""
    import torch
    from mmdet.evaluation.metrics import coco_metric
    from mmdet.structures.mask import mask2bbox

    gt = COCO(demo["ann_file"])
    image_ids, instances = _gt_instances(gt, demo["cats"], np.random.default_rng(1))
    label_to_cat = [c["id"] for c in sorted(demo["cats"], key=lambda c: c["label"])]
    metric = coco_metric.CocoMetric(ann_file=demo["ann_file"], metric=["bbox", "segm"],
                                    classwise=True)
    metric.dataset_meta = {"classes": [c["name"] for c in demo["cats"]]}
    for iid, insts in zip(image_ids, instances, strict=True):
        img = gt.loadImgs(iid)[0]
        n, hw = len(insts), (img["height"], img["width"])
        masks = np.stack([i["mask"] for i in insts]) if n else np.zeros((0, *hw), bool)
        theirs_boxes = mask2bbox(torch.from_numpy(masks)).numpy()
        ours_boxes = predict.mask_boxes(masks, xp=np)
        np.testing.assert_array_equal(ours_boxes, theirs_boxes)
        for inst, box in zip(insts, ours_boxes, strict=True):
            inst["bbox"] = box.tolist()
        metric.process({}, [{"img_id": iid, "ori_shape": hw, "pred_instances": {
            "masks": torch.from_numpy(masks), "bboxes": torch.from_numpy(theirs_boxes),
            "labels": torch.tensor([i["label"] for i in insts], dtype=torch.int64),
            "scores": torch.tensor([i["score"] for i in insts], dtype=torch.float32)}}])
    theirs = metric.compute_metrics(metric.results)

    rle = [_rle(i) for i in instances]
    ours = ev.coco_metrics(gt, ev.coco_results(rle, image_ids, label_to_cat), image_ids,
                           label_to_cat, classwise=True)
    ours.update(ev.coco_metrics(gt, ev.coco_results(rle, image_ids, label_to_cat, "bbox"),
                                image_ids, label_to_cat, "bbox", classwise=True))
    assert 0.1 < ours["bbox_mAP"] < 0.95, ours
    for kind in ("bbox", "segm"):
        for name in ev.METRIC_NAMES:
            assert theirs[f"{kind}_{name}"] == round(ours[f"{kind}_{name}"], 3), (kind, name)
    # mmdet keeps one '<name>_precision' per class: the last metric's (segm).
    rows = ours["segm_classwise"]
    assert [r["category"] for r in rows] == [gt.loadCats(c)[0]["name"] for c in label_to_cat]
    for r in rows:
        assert theirs[f"{r['category']}_precision"] == round(r["mAP"], 3), r
    print(ev.classwise_table(rows, "segm"))
