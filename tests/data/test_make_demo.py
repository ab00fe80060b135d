"""Tests of the synthetic COCO-format demo generator (layout, variety, determinism)."""

import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from solov2_jax.data import make_demo as md


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = md.make_demo(str(out), seed=0)  # the defaults: 48 train, 16 val
    return out, summary


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_summary(demo):
    out, summary = demo
    assert summary["splits"]["train2017"]["images"] == 48
    assert summary["splits"]["val2017"]["images"] == 16
    for split, n in (("train2017", 48), ("val2017", 16)):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert len(coco.imgs) == n
        assert sorted(coco.cats) == [1, 3, 7, 9]
        for img in coco.imgs.values():
            data = cv2.imread(str(out / split / img["file_name"]))  # a real JPEG
            assert data.shape[:2] == (img["height"], img["width"])
            assert (out / split / img["file_name"]).read_bytes()[:2] == b"\xff\xd8"
    assert summary["splits"]["train2017"]["images_without_annotations"] > 0


def test_variety_of_annotations(demo):
    out, _ = demo
    data = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    anns, imgs = data["annotations"], data["images"]
    kinds = {"rle": 0, "uncompressed": 0, "polygon": 0, "multipart": 0}
    for a in anns:
        s = a["segmentation"]
        if isinstance(s, list):
            kinds["polygon"] += 1
            kinds["multipart"] += len(s) > 1
        elif isinstance(s["counts"], list):
            kinds["uncompressed"] += 1
            assert a["iscrowd"] == 1  # COCO stores crowds as uncompressed RLE
        else:
            kinds["rle"] += 1
            assert a["category_id"] == 9 or a["iscrowd"]  # rings (holes) as RLE
    assert all(v > 0 for v in kinds.values()), kinds
    assert {a["category_id"] for a in anns} == {1, 3, 7, 9}
    sides = [a["bbox"][2] * a["bbox"][3] / (i["height"] * i["width"]) for a in anns
             for i in imgs if i["id"] == a["image_id"]]
    assert min(sides) < 0.002 and max(sides) > 0.3  # tiny and large objects
    hw = np.array([(i["height"], i["width"]) for i in imgs])
    assert hw.min() >= 96 and hw.max() <= 256
    assert (hw[:, 0] > hw[:, 1]).any() and (hw[:, 0] < hw[:, 1]).any()
    assert all(a["bbox"][2] >= 1 and a["bbox"][3] >= 1 and a["area"] > 0 for a in anns)
    assert len({a["id"] for a in anns}) == len(anns)


def test_deterministic_by_seed(demo, tmp_path):
    out, _ = demo
    md.make_demo(str(tmp_path / "same"), seed=0)
    assert _files(tmp_path / "same") == _files(out)
    md.make_demo(str(tmp_path / "other"), seed=1, num_train=4, num_val=2)
    other = _files(tmp_path / "other")
    assert other["train2017/000000000001.jpg"] != _files(out)["train2017/000000000001.jpg"]
    # Image i depends only on (seed, split, i): a smaller split is a prefix of the full one.
    md.make_demo(str(tmp_path / "prefix"), seed=0, num_train=4, num_val=2)
    prefix = _files(tmp_path / "prefix")
    assert prefix["val2017/000000500002.jpg"] == _files(out)["val2017/000000500002.jpg"]


def test_cli(tmp_path, capsys):
    assert md.main(["solov2-make-demo", "--out", str(tmp_path / "d"), "--seed", "2",
                    "--num-train", "3", "--num_val", "2", "--preset", "easy"]) == 0
    assert "train2017: 3 images" in capsys.readouterr().out
    data = json.loads((tmp_path / "d" / "annotations" / "instances_val2017.json").read_text())
    assert data["info"]["preset"] == "easy" and len(data["images"]) == 2
    assert md.main(["solov2-make-demo", "--out", str(tmp_path / "e"), "--preset",
                    "medium"]) == 1
    assert "solov2-make-demo: error:" in capsys.readouterr().err
    assert md.main(["solov2-make-demo", "--num_train", "1"]) == 1
    assert "--out DIR is required" in capsys.readouterr().err
    assert md.main(["solov2-make-demo", "--help"]) == 0
    assert "--preset" in capsys.readouterr().out


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy")
    md.make_demo(str(out), seed=0, num_train=64, num_val=8, preset="easy")
    return out


def test_easy_preset_statistics(easy):
    data = json.loads((easy / "annotations" / "instances_train2017.json").read_text())
    anns, imgs = data["annotations"], data["images"]
    assert all((i["height"], i["width"]) == (128, 128) for i in imgs)
    per_image = np.bincount([a["image_id"] - 1 for a in anns], minlength=len(imgs))
    assert per_image.min() >= 1 and per_image.max() <= 3  # no empty images, no crowds
    assert per_image.mean() > 1.5
    assert not any(a["iscrowd"] for a in anns)
    counts = np.bincount([a["category_id"] for a in anns], minlength=10)[[1, 3, 7, 9]]
    assert counts.min() >= 0.15 * len(anns), counts  # all four classes, roughly balanced
    sides = np.array([np.sqrt(a["area"]) for a in anns])
    assert sides.min() >= 10 and sides.max() <= 64  # large for a 128 px image
    assert np.median(sides) > 25
    coco = COCO(str(easy / "annotations" / "instances_train2017.json"))
    for image_id, img in coco.imgs.items():
        masks = np.stack([coco.annToMask(a) for a in coco.imgToAnns[image_id]])
        # Separate: no two shapes touch (a dilated mask never meets another one).
        grown = np.stack([cv2.dilate(m, np.ones((5, 5), np.uint8)) for m in masks])
        assert (grown.astype(int).sum(0) <= 1).all(), img["file_name"]
        # Every pixel of a shape has the shape's hue; the background is plain grey-ish.
        bgr = cv2.imread(str(easy / "train2017" / img["file_name"])).astype(float)
        near = cv2.dilate(masks.max(0), np.ones((9, 9), np.uint8))  # JPEG ringing
        assert bgr[near == 0].std(0).max() < 8
        for a, m in zip(coco.imgToAnns[image_id], masks, strict=True):
            inner = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
            rgb = bgr[inner][:, ::-1].mean(0)
            want = np.asarray(md._EASY_COLORS[a["category_id"]], float)
            assert np.abs(rgb - want).max() <= 30, (img["file_name"], rgb, want)
    rings = [a for a in anns if a["category_id"] == 9]
    assert rings and all(isinstance(a["segmentation"]["counts"], str) for a in rings)


def test_easy_preset_deterministic_by_seed(easy, tmp_path):
    md.make_demo(str(tmp_path / "prefix"), seed=0, num_train=5, num_val=2, preset="easy")
    prefix, full = _files(tmp_path / "prefix"), _files(easy)
    assert prefix["train2017/000000000005.jpg"] == full["train2017/000000000005.jpg"]
    assert prefix["val2017/000000500002.jpg"] == full["val2017/000000500002.jpg"]
    md.make_demo(str(tmp_path / "other"), seed=1, num_train=5, num_val=2, preset="easy")
    other = _files(tmp_path / "other")
    assert other["train2017/000000000005.jpg"] != full["train2017/000000000005.jpg"]
    with pytest.raises(ValueError, match="unknown make_demo preset 'medium'"):
        md.make_demo(str(tmp_path / "bad"), preset="medium")
