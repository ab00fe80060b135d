"""Tests of the local-COCO TFDS builder: demo data, hand-made edge cases, read API."""

import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from solov2_jax.data import coco_builder as cb
from solov2_jax.data.make_demo import make_demo

# -- hand-made tiny COCO: every edge case of the error-vs-skip table -------------------

CATS = [{"id": 5, "name": "cat_a"}, {"id": 2, "name": "cat_b"}]  # unsorted on purpose


def _jpeg(path, h, w, seed):
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)


def _poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_tiny_coco(root):
    """Writes `root/{annotations,mini}`; returns the JSON dict (split stem 'mini')."""
    (root / "annotations").mkdir(parents=True)
    (root / "mini").mkdir()
    _jpeg(root / "mini" / "a.jpg", 30, 40, 0)
    _jpeg(root / "mini" / "b.jpg", 48, 32, 1)
    _jpeg(root / "mini" / "wrong_size.jpg", 20, 20, 2)
    good = (root / "mini" / "a.jpg").read_bytes()
    (root / "mini" / "corrupt.jpg").write_bytes(good[: len(good) // 2])  # truncated
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 30, "width": 40},
        {"id": 2, "file_name": "b.jpg", "height": 48, "width": 32},  # no annotations
        {"id": 3, "file_name": "missing.jpg", "height": 30, "width": 40},
        {"id": 4, "file_name": "corrupt.jpg", "height": 30, "width": 40},
        {"id": 5, "file_name": "wrong_size.jpg", "height": 30, "width": 40},
    ]
    m = np.zeros((30, 40), np.uint8)
    m[5:20, 10:30] = 1
    m[9:14, 15:22] = 0  # a hole: only RLE can store it
    rle = mask_utils.encode(np.asfortranarray(m))
    crowd = np.zeros((30, 40), np.uint8)
    crowd[20:28, 2:12] = 1
    flat = crowd.flatten(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
    a = lambda i, img, cat, segm, bbox, area, crowd=0: {  # noqa: E731
        "id": i, "image_id": img, "category_id": cat, "segmentation": segm, "bbox": bbox,
        "area": area, "iscrowd": crowd}
    anns = [
        a(101, 1, 5, [_poly(1, 1, 8, 8), [20, 20, 26, 20, 23, 27]], [1, 1, 25, 26], 70.0),
        a(102, 1, 2, {"counts": rle["counts"].decode(), "size": [30, 40]},
          [10, 5, 20, 15], float(m.sum())),
        a(103, 1, 5, {"counts": runs.tolist(), "size": [30, 40]}, [2, 20, 10, 8], 80.0, 1),
        a(104, 1, 2, _poly(5, 5, 5, 8), [5, 5, 0, 3], 0.0),  # zero-area box
        a(105, 1, 2, [[1, 1, 6, 6]], [1, 1, 5, 5], 25.0),  # 2-point polygon
        a(106, 1, 2, [_poly(30, 2, 38, 10), [1, 2, 3]], [30, 2, 8, 8], 64.0),  # bad part
        a(107, 1, 5, _poly(50, 50, 60, 60), [50, 50, 10, 10], 100.0),  # outside
        a(108, 3, 5, _poly(1, 1, 8, 8), [1, 1, 7, 7], 49.0),  # its image file is missing
    ]
    data = {"images": images, "annotations": anns, "categories": CATS}
    (root / "annotations" / "instances_mini.json").write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    data = write_tiny_coco(root)
    builder, summary = cb.prepare(str(root), str(root / "tfds"), progress=False)
    return root, data, builder, summary


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "demo_coco"
    make_demo(str(root), seed=0, num_train=12, num_val=6)
    builder, summary = cb.prepare(str(root), str(root.parent / "tfds"), progress=False)
    return root, builder, summary


def _examples(builder, split, **kw):
    return list(cb.read_split(builder, split, **kw).as_numpy_iterator())


def _check_against_coco(examples, coco, ann_ids_expected=None):
    """Every decoded instance equals pycocotools' own view of its annotation."""
    for ex in examples:
        img = coco.imgs[int(ex["image_id"])]
        assert ex["image"].shape == (img["height"], img["width"], 3)
        assert ex["masks"].shape == (len(ex["ann_ids"]), img["height"], img["width"])
        assert ex["file_name"].decode() == img["file_name"]
        for k, aid in enumerate(ex["ann_ids"]):
            ann = coco.anns[int(aid)]
            np.testing.assert_array_equal(ex["masks"][k], coco.annToMask(ann))
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(ex["boxes"][k], [x, y, x + w, y + h])
            assert ex["is_crowd"][k] == bool(ann["iscrowd"])
            assert ex["area"][k] == np.float32(ann["area"])
            sorted_ids = sorted(coco.cats)
            assert ex["labels"][k] == sorted_ids.index(ann["category_id"])


def test_tiny_summary_counts_each_skip(tiny):
    _, _, builder, summary = tiny
    assert list(builder.info.splits) == ["mini"]  # raw stem: not a *2017 name
    s = summary["splits"]["mini"]
    skipped = {k: (v["count"], v["examples"]) for k, v in s["skipped"].items()}
    assert skipped == {
        "missing_image_file": (1, ["missing.jpg"]),
        "unreadable_image": (1, ["corrupt.jpg"]),
        "image_size_mismatch": (1, ["wrong_size.jpg"]),
        "annotations_of_skipped_images": (1, ["missing.jpg"]),
        "degenerate_box": (1, [104]),
        "invalid_polygon": (1, [105]),
        "polygon_parts_dropped": (1, [106]),
        "box_outside_image": (1, [107]),
    }
    assert (s["images"], s["instances"], s["crowd"]) == (2, 4, 1)
    assert summary["already_prepared"] is False


def test_tiny_decoded_examples(tiny):
    root, data, builder, _ = tiny
    exs = {int(e["image_id"]): e for e in _examples(builder, "mini")}
    assert sorted(exs) == [1, 2]
    a, b = exs[1], exs[2]
    assert list(a["ann_ids"]) == [101, 102, 103, 106]
    assert list(a["labels"]) == [1, 0, 1, 0]  # ids sorted: 2 -> 0, 5 -> 1
    assert list(a["is_crowd"]) == [False, False, True, False]
    assert (a["height"], a["width"]) == (30, 40)
    assert a["image"].dtype == np.uint8 and a["masks"].dtype == np.uint8
    assert set(np.unique(a["masks"])) <= {0, 1}
    coco = COCO(str(root / "annotations" / "instances_mini.json"))
    # 106's 3-value part is dropped (as mmdet does); compare with its valid part only.
    coco.anns[106] = dict(coco.anns[106], segmentation=[_poly(30, 2, 38, 10)])
    _check_against_coco([a], coco)
    assert a["masks"][0, 2, 2] == 1 and a["masks"][0, 22, 23] == 1  # both parts
    assert a["masks"][1, 10, 16] == 0 and a["masks"][1, 6, 12] == 1  # RLE hole kept
    # The image without annotations: N=0, masks still [0, H, W].
    assert b["masks"].shape == (0, 48, 32) and b["boxes"].shape == (0, 4)
    assert b["labels"].shape == (0,) and b["image"].shape == (48, 32, 3)


def test_tiny_image_bytes_untouched(tiny):
    root, _, builder, _ = tiny
    raw = {int(e["image_id"]): e for e in _examples(builder, "mini", decode=False)}
    for iid, fname in ((1, "a.jpg"), (2, "b.jpg")):
        assert raw[iid]["image"] == (root / "mini" / fname).read_bytes()
    # JSON annotation count before skips (for mmdet's filter_empty_gt).
    assert raw[1]["num_annotations"] == 7 and raw[2]["num_annotations"] == 0
    assert raw[1]["objects"]["mask"][0][:8] == b"\x89PNG\r\n\x1a\n"


def test_category_info_and_reuse_without_coco_dir(tiny):
    root, _, builder, _ = tiny
    expected = [{"id": 2, "name": "cat_b", "label": 0}, {"id": 5, "name": "cat_a", "label": 1}]
    assert cb.category_info(builder) == expected
    # Once prepared, data_dir + name suffice (no JSON parsing); the summary is kept.
    again = cb.get_builder(None, str(root / "tfds"), name=cb.config_name(str(root)))
    assert cb.category_info(again) == expected
    _, summary = cb.prepare(str(root), str(root / "tfds"), progress=False)
    assert summary["already_prepared"] is True
    assert summary["splits"]["mini"]["skipped"]["invalid_polygon"]["count"] == 1


@pytest.mark.parametrize("field, value, message", [
    ("image_id", 99, "annotation 7 refers to unknown image id 99"),
    ("category_id", 4, "annotation 7 refers to unknown category id 4"),
    ("segmentation", {"counts": "abc", "size": [5, 5]}, "annotation 7: RLE size"),
])
def test_inconsistent_annotations_raise_naming_the_id(tmp_path, field, value, message):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    _jpeg(tmp_path / "val2017" / "x.jpg", 20, 20, 0)
    ann = {"id": 7, "image_id": 1, "category_id": 5, "segmentation": [_poly(1, 1, 9, 9)],
           "bbox": [1, 1, 8, 8], "area": 64.0, "iscrowd": 0, field: value}
    data = {"images": [{"id": 1, "file_name": "x.jpg", "height": 20, "width": 20}],
            "annotations": [ann], "categories": CATS}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        cb.prepare(str(tmp_path), str(tmp_path / "tfds"), progress=False)


def test_split_names_and_config_names():
    assert cb.split_name("train2017") == "train" and cb.split_name("val2017") == "val"
    assert cb.split_name("minival") == "minival"
    assert cb.config_name("/data/My-COCO 2017/") == "my_coco_2017"
    assert cb.config_name("/x/coco", "custom") == "custom"
    with pytest.raises(ValueError):
        cb.config_name("/x/coco", "Bad-Name")


def test_demo_dataset_matches_pycocotools(demo):
    root, builder, summary = demo
    assert set(builder.info.splits) == {"train", "val"}
    assert builder.info.splits["train"].num_examples == 12
    assert all(not s["skipped"] for s in summary["splits"].values())
    assert [c["id"] for c in cb.category_info(builder)] == [1, 3, 7, 9]
    for split, stem in (("train", "train2017"), ("val", "val2017")):
        coco = COCO(os.fspath(root / "annotations" / f"instances_{stem}.json"))
        exs = _examples(builder, split)
        assert sorted(int(e["image_id"]) for e in exs) == sorted(coco.imgs)
        assert sum(len(e["ann_ids"]) for e in exs) == len(coco.anns)
        _check_against_coco(exs, coco)


def test_read_split_slices_and_shuffling(demo):
    _, builder, _ = demo
    ids = lambda split, **kw: [int(e["image_id"]) for e in  # noqa: E731
                               cb.read_split(builder, split, decode=False, **kw)]
    first, second = ids("train[:50%]"), ids("train[50%:]")
    assert len(first) == 6 and sorted(first + second) == sorted(ids("train"))
    assert ids("train", shuffle_files=True, seed=3) == ids("train", shuffle_files=True, seed=3)


def test_split_without_image_dir_is_skipped(tmp_path):
    """COCO's annotation zip has train and val JSONs; users may have only val images."""
    write_tiny_coco(tmp_path)
    ann = tmp_path / "annotations"
    (ann / "instances_mini.json").rename(ann / "instances_val2017.json")
    (ann / "instances_train2017.json").write_text((ann / "instances_val2017.json").read_text())
    (tmp_path / "mini").rename(tmp_path / "val2017")
    builder, summary = cb.prepare(str(tmp_path), str(tmp_path / "tfds"), progress=False)
    assert list(builder.info.splits) == ["val"]
    assert summary["skipped_splits"] == {"train": "image dir train2017/ missing"}
    with pytest.warns(UserWarning, match="was prepared from"):
        cb.get_builder(str(tmp_path / "elsewhere"), str(tmp_path / "tfds"),
                       name=cb.config_name(str(tmp_path)))
