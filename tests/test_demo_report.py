"""Tests of the demo report: the loss curve from metrics.jsonl and the overlays drawn
from a workdir's weights (random ones here: the pictures, not the model, are tested)."""

import json

import cv2
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import demo
from solov2_jax import checkpoint, convert, demo_report, models, visualize
from solov2_jax.cli import UserError
from solov2_jax.data.make_demo import make_demo

pytestmark = pytest.mark.usefixtures("module_compile_cache")


def _rows():
    rows = [{"step": s, "loss": 3.0 / s ** 0.3, "loss_cls": 1.0 / s ** 0.3,
             "loss_mask": 2.0 / s ** 0.3, "lr": 0.01, "images_per_s": 5.0}
            for s in (8, 16, 24, 32)]
    rows.insert(2, {"step": 16, "eval": {"segm_mAP": 0.2, "segm_mAP_50": 0.5}})
    rows.append({"step": 32, "eval": {"segm_mAP": 0.42, "segm_mAP_50": 0.71,
                                      "num_images": 2}})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny `make demo` workdir: metrics.jsonl, random final_variables, 2 validation
    images."""
    root = tmp_path_factory.mktemp("report")
    make_demo(str(root / "coco"), seed=3, num_train=1, num_val=2, preset="easy")
    config = demo.get_config()  # square images: one compiled program
    config.data.coco_dir = str(root / "coco")
    # Filled on the host from the traced shapes (compiling model.init takes minutes on a
    # loaded 2-core machine): He-scaled kernels, unit statistics, zero biases.
    rng, flat = np.random.default_rng(0), {}
    for path, shape in convert.variable_shapes(models.build_model(config.model)).items():
        if path[-1] in ("var", "scale", "mean", "bias"):
            flat[path] = np.full(shape, float(path[-1] in ("var", "scale")), np.float32)
        else:
            flat[path] = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(
                np.float32)
    variables = traverse_util.unflatten_dict(flat)
    checkpoint.save_variables(str(root / "final_variables"), variables)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return root, config


def test_read_metrics_nested_and_flat_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    flat = [{"step": 4, "train/loss": 2.0, "train/lr": 0.1},
            {"step": 4, "eval/segm_mAP": 0.5, "eval/segm_mAP_50": 0.8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows() + flat))
    series, evals = demo_report.read_metrics(str(path))
    assert [s for s, _ in series["loss"]] == [8, 16, 24, 32, 4]
    assert series["lr"][-1] == (4, 0.1)
    assert [(e["step"], e["segm_mAP"]) for e in evals] == [(16, 0.2), (32, 0.42), (4, 0.5)]
    assert evals[-1] == {"step": 4, "segm_mAP": 0.5, "segm_mAP_50": 0.8}
    path.write_text(json.dumps({"step": 1, "eval": {"segm_mAP": 0.1}}) + "\n")
    with pytest.raises(UserError, match="no training loss rows"):
        demo_report.read_metrics(str(path))
    with pytest.raises(UserError, match="no such file"):
        demo_report.read_metrics(str(tmp_path / "missing.jsonl"))


def test_report_writes_loss_curve_and_overlays(workdir):
    root, config = workdir
    report = demo_report.make_report(config, str(root), num_images=2, min_side=192,
                                      devices=jax.local_devices()[:1])
    assert report["eval"]["segm_mAP"] == 0.42 and report["eval"]["step"] == 32
    curve = cv2.imread(report["loss_curve"])
    assert curve is not None and curve.shape[:2] == (360, 640)
    assert (curve < 128).any() and (curve > 250).any()  # lines on a white figure
    assert [p.rsplit("/", 1)[1] for p in report["overlays"]] == [
        "000000500001.png", "000000500002.png"]
    for path in report["overlays"]:
        picture = cv2.imread(path)[..., ::-1]
        # Two panels (prediction | ground truth), each enlarged to a short side >= 192.
        assert picture.shape[0] >= 192 and picture.shape[1] >= 2 * 192
    # The ground-truth half is exactly what visualize.draw_instances draws.
    from pycocotools.coco import COCO

    coco = COCO(str(root / "coco" / "annotations" / "instances_val2017.json"))
    label_of = {c: k for k, c in enumerate(sorted(coco.cats))}
    image_id = 500001
    masks, labels = demo_report.ground_truth(coco, image_id, label_of)
    assert len(masks) > 0
    rgb = cv2.imread(str(root / "coco" / "val2017" / coco.imgs[image_id]["file_name"]))
    expected = visualize.draw_instances(rgb[..., ::-1], masks, labels, None,
                                        [coco.cats[c]["name"] for c in sorted(coco.cats)],
                                        min_side=192)
    picture = cv2.imread(report["overlays"][0])[..., ::-1]
    right = picture[:expected.shape[0], -expected.shape[1]:]
    # side_by_side titles the panel's top-left corner; the rest is pixel-identical.
    title_rows = 40
    np.testing.assert_array_equal(right[title_rows:], expected[title_rows:])


def test_cli(workdir, tmp_path, capsys):
    root, _ = workdir
    assert demo_report.main(["solov2-demo-report", "--workdir", str(tmp_path)]) == 1
    assert "--config and --workdir are required" in capsys.readouterr().err
    # A workdir that was never trained: one line naming the missing metrics file.
    assert demo_report.main(["solov2-demo-report", "--config", "configs/tiny.py",
                             "--workdir", str(tmp_path)]) == 1
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
