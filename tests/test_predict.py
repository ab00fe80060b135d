"""solov2_jax.predict: Predictor == evaluate, the predict CLI on real photographs with
converted mmdet weights, tight boxes as mmdet's mask2bbox, one-line errors for bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from solov2_jax import convert, predict, visualize
from solov2_jax import evaluate as ev
from tests.test_convert import save_pth
from tests.test_evaluate import _config, demo, variables  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
LIGHT = "solov2-light_r18_fpn_ms-3x_coco"
LIGHT_CONFIG = str(REPO / "configs" / f"{LIGHT}.py")
# A reduced test scale and caps keep the light-R18 run small on CPU; a low score_thr gives
# the random model tens of detections.
LIGHT_OVERRIDES = ["data.test_scale=(320, 192)", "test.max_per_img=30",
                   "test.nms_pre=200", "test.max_candidates=400", "test.score_thr=0.3"]


def test_mask_boxes_are_tight_boxes_as_mmdet():
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 23, 31), bool)
    masks[0, 3:9, 4:30] = True
    masks[1, 22, 0] = True  # one pixel in a corner
    masks[2] = rng.random((23, 31)) > 0.97
    masks[4] = True
    # masks[3] is empty: zeros, as mmdet's mask2bbox
    want = np.array([[4, 3, 30, 9], [0, 22, 1, 23], [0, 0, 0, 0], [0, 0, 0, 0],
                     [0, 0, 31, 23]], np.float32)
    ys, xs = np.nonzero(masks[2])
    want[2] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_array_equal(predict.mask_boxes(masks, xp=np), want)
    np.testing.assert_array_equal(np.asarray(predict.mask_boxes(masks)), want)


@pytest.mark.parity
def test_mask_boxes_match_mmdet_mask2bbox(mmdet):
    import torch
    from mmdet.structures.mask import mask2bbox

    masks = np.random.default_rng(1).random((16, 40, 50)) > 0.995
    masks[3] = False
    np.testing.assert_array_equal(predict.mask_boxes(masks, xp=np),
                                  mask2bbox(torch.from_numpy(masks)).numpy())


def test_predictor_matches_evaluate(demo, variables, tmp_path):  # noqa: F811
    """The same detections from image files as `evaluate` on the same images in a COCO
    directory: labels, scores within 1e-6, masks identical."""
    config = _config(demo)
    ev.evaluate(config, variables, workdir=str(tmp_path))
    results = json.loads((tmp_path / "results_val.segm.json").read_text())
    gt = COCO(demo["ann_file"])
    predictor = predict.Predictor(config, variables)
    ids = sorted(gt.getImgIds())
    files = [os.path.join(demo["coco_dir"], "val2017", gt.loadImgs(i)[0]["file_name"])
             for i in ids]
    preds = predictor(files)
    assert predictor.num_compiled <= 4  # 2 orientations x (evaluate's + our out_hw)
    worst, total = 0.0, 0
    for iid, p in zip(ids, preds, strict=True):
        theirs = [r for r in results if r["image_id"] == iid]
        assert len(p) == len(theirs) > 0
        assert p.category_ids == [r["category_id"] for r in theirs]
        scores = np.array([r["score"] for r in theirs])
        worst = max(worst, float(np.abs(p.scores - scores).max()))
        for m, r in zip(p.masks, theirs, strict=True):
            np.testing.assert_array_equal(m, mask_util.decode(r["segmentation"]).astype(bool))
        total += len(p)
        np.testing.assert_array_equal(p.boxes, predict.mask_boxes(p.masks, xp=np))
    assert worst <= 1e-6, worst
    assert total > 20


def test_predictor_takes_arrays_rgb_and_bgr(demo, variables):  # noqa: F811
    config = _config(demo)
    predictor = predict.Predictor(config, variables)
    path = sorted(Path(demo["coco_dir"], "val2017").glob("*.jpg"))[0]
    from solov2_jax.data import preprocess

    bgr = preprocess.read(path)
    by_path, by_rgb, by_bgr = (predictor([path])[0], predictor([bgr[..., ::-1].copy()])[0],
                               predictor([bgr], bgr=True)[0])
    for other in (by_rgb, by_bgr):
        np.testing.assert_array_equal(other.masks, by_path.masks)
        np.testing.assert_array_equal(other.scores, by_path.scores)
        assert other.class_names == by_path.class_names
    assert set(by_path.class_names) <= {"circle", "rectangle", "triangle", "ring"}
    with pytest.raises(preprocess.ImageError, match="uint8"):
        predictor([bgr.astype(np.float32)])


@pytest.fixture(scope="module")
def light_weights(mmdet, tmp_path_factory):
    """mmdet's light-R18 SOLOv2 (random weights, perturbed norms) as a .pth, converted
    with `solov2_jax.convert mmdet` (the CLI)."""
    model, _ = mmdet.build_model(LIGHT, seed=0)
    root = tmp_path_factory.mktemp("light")
    pth = save_pth(root / "light.pth", dict(model.state_dict()))
    out = root / "weights"
    assert convert.main(["mmdet", "--config", LIGHT_CONFIG, "--checkpoint", pth,
                         "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photographs shipped by scikit-image, plus a portrait one and a broken file."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    src = Path(skdata.__file__).parent
    for name in ("rocket.jpg", "coffee.png", "chelsea.png"):
        shutil.copy(src / name, root / name)
    visualize.save_png(root / "astronaut_portrait.png", skdata.astronaut()[:, 96:416])
    return root


def _argv(weights, out, *inputs, extra=()):
    return ["solov2-predict", f"--config={LIGHT_CONFIG}", f"--weights={weights}",
            f"--out={out}", "--noprogress",
            *(f"--config.{o}" for o in LIGHT_OVERRIDES), *extra, *map(str, inputs)]


def test_predict_cli_on_real_photographs(light_weights, photos, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    status = predict.main(_argv(light_weights, out, photos, broken / "notes.jpg"))
    captured = capsys.readouterr()
    assert status == 1  # one image failed; the others were written
    assert "notes.jpg" in captured.err and "Traceback" not in captured.err
    names = ["astronaut_portrait", "chelsea", "coffee", "rocket"]
    assert sorted(p.stem for p in out.glob("*.png")) == names
    assert "notes" not in {p.stem for p in out.glob("*")}

    # The Python API on the same files with the same config and weights.
    predictor = predict.Predictor.from_checkpoint(LIGHT_CONFIG, light_weights,
                                                  overrides=LIGHT_OVERRIDES)
    preds = predictor([photos / f for f in ("astronaut_portrait.png", "chelsea.png",
                                            "coffee.png", "rocket.jpg")])
    results = json.loads((out / "results.json").read_text())
    total = 0
    for name, p in zip(names, preds, strict=True):
        doc = json.loads((out / f"{name}.json").read_text())
        assert (doc["height"], doc["width"]) == p.masks.shape[1:] or len(p) == 0
        insts = doc["instances"]
        assert len(insts) == len(p) > 0
        rles = [i["segmentation"] for i in insts]
        np.testing.assert_array_equal(mask_util.decode(rles).transpose(2, 0, 1).astype(bool),
                                      p.masks)
        np.testing.assert_array_equal([i["bbox"] for i in insts], p.boxes)
        np.testing.assert_array_equal(p.boxes, predict.mask_boxes(p.masks, xp=np))
        assert [i["score"] for i in insts] == [float(s) for s in p.scores]
        assert [i["category_name"] for i in insts] == p.class_names
        assert all(n in predict.COCO_CLASSES for n in p.class_names)
        mine = [r for r in results if r["image_id"] == name]
        assert [r["bbox"] for r in mine] == [[x1, y1, x2 - x1, y2 - y1]
                                             for x1, y1, x2, y2 in p.boxes.tolist()]
        picture = visualize.cv2.imread(str(out / f"{name}.png"))
        assert picture.shape[0] == p.masks.shape[1] and picture.shape[1] > p.masks.shape[2]
        total += len(p)
    assert len(results) == total
    # Landscape and portrait: 2 programs, shared by the CLI and the API (same config).
    assert predictor.num_compiled == 2


def _one_error_line(err: str, *needles: str):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("solov2-predict: error:") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_inputs_give_one_line(light_weights, tmp_path, capsys, variables):  # noqa: F811
    out = tmp_path / "out"
    missing = tmp_path / "nope.jpg"
    assert predict.main(_argv(light_weights, out, missing)) == 1
    _one_error_line(capsys.readouterr().err, str(missing), "no such file")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main(_argv(light_weights, out, empty)) == 1
    _one_error_line(capsys.readouterr().err, str(empty), "no images")

    assert predict.main(_argv(light_weights, out, tmp_path / "*.png")) == 1
    _one_error_line(capsys.readouterr().err, "*.png", "no file matches")

    text = tmp_path / "text.jpg"
    text.write_text("hello")
    assert predict.main(_argv(light_weights, out, text)) == 1
    err = capsys.readouterr().err
    assert err.count("not a readable image") == 2  # when it happens, and in the summary
    assert str(text) in err and "Traceback" not in err

    # Weights of another config (the tiny model's) for the light-R18 config.
    wrong = convert.save_variables(str(tmp_path / "tiny_weights"), variables)
    photo = Path(pytest.importorskip("skimage.data").__file__).parent / "rocket.jpg"
    assert predict.main(_argv(wrong, out, photo)) == 1
    _one_error_line(capsys.readouterr().err, wrong, f"{LIGHT}.py", "do not match")

    assert predict.main(_argv(tmp_path / "no_weights", out, photo)) == 1
    _one_error_line(capsys.readouterr().err, str(tmp_path / "no_weights"), "not found")


def test_overlay_draws_every_instance():
    img = np.full((60, 80, 3), 200, np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 5:30, 5:40] = True
    masks[1, 35:55, 50:75] = True
    out = visualize.draw_instances(img, masks, [0, 1], [0.9, 0.5], ["cat", "dog"])
    assert out.shape[0] == 60 and out.shape[1] > 80  # legend panel on the right
    colors = visualize.palette(2)
    for k in range(2):  # mask interiors are blended towards their own colour
        inner = masks[k].copy()  # 2 px inside the outline; tags may cover part of it
        for axis, shift in ((0, 2), (0, -2), (1, 2), (1, -2)):
            inner &= np.roll(masks[k], shift, axis=axis)
        want = np.round(0.5 * 200 + 0.5 * colors[k].astype(float))
        blended = np.abs(out[:60, :80].astype(float) - want).max(-1) <= 1
        assert (blended & inner).sum() >= 0.4 * inner.sum(), (k, (blended & inner).sum())
        assert not (blended & ~masks[k]).any()  # and nothing outside it
    assert (out[58, 2] == 200).all()  # background untouched
    empty = visualize.draw_instances(img, np.zeros((0, 60, 80), bool), [], [], ["cat"])
    assert empty.shape[0] == 60
    both = visualize.side_by_side([out, empty], ["pred", "gt"])
    assert both.shape[1] == out.shape[1] + empty.shape[1] + 8
