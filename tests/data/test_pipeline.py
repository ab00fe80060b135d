"""End-to-end tf.data pipelines on a small COCO dir built with the real TFDS builder."""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from solov2_jax import mask_ops
from solov2_jax.data import coco_builder, pipeline
from solov2_jax.data import transforms as T
from solov2_jax.structures import EVAL_KEYS, TRAIN_KEYS

CATS = ("circle", "square", "blob")

# (h, w, kind): both orientations, a square, a 24-px image (dropped: min_size 32), one
# without annotations (dropped: filter_empty_gt), one with only a crowd and one with only a
# degenerate box (both kept by mmdet, with no targets).
TRAIN_SPECS = [(96, 128, "n"), (128, 96, "n"), (80, 160, "n"), (150, 100, "n"),
               (64, 64, "n"), (24, 40, "n"), (100, 120, "empty"), (90, 140, "crowd"),
               (110, 100, "degenerate"), (120, 90, "n"), (70, 110, "n")]
VAL_SPECS = [(96, 128, "n"), (128, 96, "empty"), (100, 150, "n"), (140, 90, "n"),
             (64, 100, "n")]


def _uncompressed_rle(mask):
    """COCO crowd format: column-major run lengths starting with a run of zeros."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def write_coco(root, stem, specs, seed):
    """Writes `root/stem/*.jpg` + `root/annotations/instances_<stem>.json`."""
    rng = np.random.default_rng(seed)
    (root / stem).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i, (h, w, kind) in enumerate(specs):
        iid = 1000 * (seed + 1) + i
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)
        cv2.imwrite(str(root / stem / f"{iid}.jpg"), img)
        images.append({"id": iid, "file_name": f"{iid}.jpg", "height": h, "width": w})
        n = {"empty": 0, "crowd": 1, "degenerate": 1}.get(kind, int(rng.integers(1, 5)))
        for j in range(n):
            crowd = kind == "crowd" or j == 3
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(4, h / 3), rng.uniform(4, w / 3)
            t = np.sort(rng.uniform(0, 2 * np.pi, 9))
            poly = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel().tolist()
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            x, y, bw, bh = mask_utils.toBbox(rle).tolist()
            if kind == "degenerate":
                bw = 0.5  # mmdet (and the builder) drop boxes with w < 1
            segm = _uncompressed_rle(mask_utils.decode(rle)) if crowd else [poly]
            anns.append({"id": len(anns) + 1 + 10000 * seed, "image_id": iid, "iscrowd":
                         int(crowd), "category_id": int(rng.integers(1, 4)),
                         "bbox": [x, y, bw, bh], "area": float(mask_utils.area(rle)),
                         "segmentation": segm})
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(CATS)]
    with open(root / "annotations" / f"instances_{stem}.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def _cfg(**overrides):
    from configs import tiny

    d = tiny.get_config().data
    d.min_size = 32  # exercise mmdet's size filter (image 4 of the fixture is 24 px)
    d.per_device_batch = 1
    d.eval_per_device_batch = 1
    d.shuffle_buffer = 8
    for k, v in overrides.items():
        setattr(d, k, v)
    return d


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root / "coco", "train2017", TRAIN_SPECS, seed=0)
    write_coco(root / "coco", "val2017", VAL_SPECS, seed=1)
    builder, _ = coco_builder.prepare(str(root / "coco"), str(root / "tfds"), progress=False)
    return root / "coco", builder


def _take(ds, n):
    return list(pipeline.as_numpy_batches(ds.take(n)))


def _mmdet_train_ids(mmdet, coco_dir, min_size):
    from mmdet.datasets import CocoDataset

    ds = CocoDataset(ann_file=str(coco_dir / "annotations/instances_train2017.json"),
                     data_prefix=dict(img=str(coco_dir / "train2017")), pipeline=[],
                     metainfo=dict(classes=CATS),
                     filter_cfg=dict(filter_empty_gt=True, min_size=min_size))
    ds.full_init()
    return {int(ds.get_data_info(i)["img_id"]) for i in range(len(ds))}


def test_masks_sizes_and_filter_match_references(coco, mmdet):
    """(a) masks vs annToMask + cv2 nearest + flip; (b) sizes vs mmdet; mmdet's filter."""
    from mmdet.datasets.transforms import Resize

    coco_dir, builder = coco
    cfg = _cfg()
    api = COCO(str(coco_dir / "annotations/instances_train2017.json"))
    expected_ids = _mmdet_train_ids(mmdet, coco_dir, cfg.min_size)
    ds = pipeline.train_dataset(builder, cfg, num_local_devices=1, seed=3, return_meta=True)
    seen, flips, scales = set(), set(), set()
    for b in _take(ds, 3 * len(expected_ids)):
        b = {k: v[0, 0] for k, v in b.items()}
        iid = int(b["image_id"])
        seen.add(iid)
        info = api.imgs[iid]
        nh, nw = (int(v) for v in b["img_shape"])
        scale = cfg.train_scales[int(b["bucket"]) // 2]
        scales.add(scale)
        flips.add(bool(b["meta_flip"]))
        ref = Resize(scale=scale, keep_ratio=True)(
            {"img": np.zeros((info["height"], info["width"], 3), np.uint8)})
        assert (nh, nw) == ref["img_shape"]
        assert b["image"].shape[:2] == T.bucket_shape(scale, info["width"] >= info["height"])
        for aid, mask in zip(b["meta_ann_ids"], b["meta_masks"], strict=True):
            want = cv2.resize(api.annToMask(api.anns[int(aid)]), (nw, nh),
                              interpolation=cv2.INTER_NEAREST)
            if b["meta_flip"]:
                want = want[:, ::-1]
            inter = np.logical_and(mask, want).sum()
            union = np.logical_or(mask, want).sum()
            assert union == 0 or inter / union >= 0.98, (iid, aid)
        # Targets are the exact reductions of the padded full-resolution masks.
        keep = [not api.anns[int(a)]["iscrowd"] and m.any()
                for a, m in zip(b["meta_ann_ids"], b["meta_masks"], strict=True)]
        full = np.zeros((len(keep),) + b["image"].shape[:2], np.uint8)
        full[:, :nh, :nw] = b["meta_masks"]
        n = int(sum(keep))
        assert b["gt_valid"].sum() == n
        np.testing.assert_array_equal(b["gt_masks"][:n], mask_ops.downsample_x4(full)[keep])
        np.testing.assert_array_equal(b["gt_centers"][:n], mask_ops.center_of_mass(full)[keep])
    assert seen == expected_ids  # every kept image drawn; crowd-only image kept like mmdet
    assert flips == {False, True} and len(scales) == 2


def test_pmap_on_8_devices_and_buckets(coco):
    """(c) a train batch feeds a pmapped function on 8 CPU devices; (g) bucket shapes."""
    _, builder = coco
    cfg = _cfg()
    assert jax.local_device_count() == 8
    ds = pipeline.train_dataset(builder, cfg, num_local_devices=8, seed=0)
    allowed = set(T.bucket_shapes(cfg.train_scales))
    step = jax.pmap(lambda b: (jnp.sum(b["image"]), jnp.sum(b["gt_masks"] * b["gt_valid"][
        ..., None, None]), jnp.sum(b["gt_centers"])))
    it = pipeline.prefetch_to_device(pipeline.as_numpy_batches(ds.take(3)), size=2)
    for batch in it:
        assert set(batch) == set(TRAIN_KEYS)
        hp, wp = batch["image"].shape[2:4]
        assert batch["image"].shape[:2] == (8, 1) and (hp, wp) in allowed
        assert batch["gt_masks"].shape == (8, 1, cfg.max_instances, hp // 4, wp // 4)
        assert batch["gt_masks"].dtype == np.uint8 and batch["gt_valid"].dtype == bool
        out = step(batch)
        assert out[0].shape == (8,) and np.isfinite(np.asarray(out[0])).all()


def test_deterministic_given_seed(coco):
    """(e) same seed -> identical batches; another seed -> a different stream."""
    _, builder = coco
    cfg = _cfg(per_device_batch=2)

    def first(seed):
        return _take(pipeline.train_dataset(builder, cfg, num_local_devices=2, seed=seed), 4)

    a, b, c = first(5), first(5), first(6)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["image_id"], y["image_id"]) or
               x["image"].shape != y["image"].shape or
               not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))


def test_eval_keeps_every_image_and_pads(coco):
    """(f) each val image exactly once with valid=True; last batches padded valid=False."""
    coco_dir, builder = coco
    cfg = _cfg()
    with open(coco_dir / "annotations/instances_val2017.json") as f:
        ids = sorted(im["id"] for im in json.load(f)["images"])
    batches = _take(pipeline.eval_dataset(builder, cfg, num_local_devices=4), 100)
    allowed = set(T.bucket_shapes([cfg.test_scale]))
    got, n_invalid = [], 0
    for b in batches:
        assert set(b) == set(EVAL_KEYS) and b["valid"].shape == (4, 1)
        assert b["image"].shape[2:4] in allowed
        got += list(b["image_id"][b["valid"]])
        n_invalid += int((~b["valid"]).sum())
    assert sorted(got) == ids
    assert n_invalid > 0 and (len(ids) + n_invalid) % 4 == 0


def test_multi_host_slices_agree(coco):
    """Two simulated hosts: same bucket per step, disjoint halves of each global batch."""
    _, builder = coco
    cfg = _cfg()
    hosts = [_take(pipeline.train_dataset(builder, cfg, num_local_devices=2, process_index=p,
                                          process_count=2, seed=1), 4) for p in range(2)]
    single = _take(pipeline.train_dataset(builder, cfg, num_local_devices=4, seed=1), 4)
    for h0, h1, one in zip(*hosts, single, strict=True):
        assert h0["image"].shape == h1["image"].shape == (2,) + one["image"].shape[1:]
        ids = np.concatenate([h0["image_id"].ravel(), h1["image_id"].ravel()])
        np.testing.assert_array_equal(ids, one["image_id"].ravel())


def test_demo_dataset_with_tiny_config(tmp_path):
    """The demo data + configs/tiny.py as the trainer uses them: 8 devices, train and eval."""
    from configs import tiny
    from solov2_jax.data.make_demo import make_demo

    make_demo(str(tmp_path / "demo"), num_train=12, num_val=5)
    builder, _ = coco_builder.prepare(str(tmp_path / "demo"), str(tmp_path / "tfds"),
                                      progress=False)
    cfg = tiny.get_config().data
    allowed = set(T.bucket_shapes(cfg.train_scales))
    for b in _take(pipeline.train_dataset(builder, cfg, num_local_devices=8), 2):
        assert b["image"].shape[:2] == (8, cfg.per_device_batch)
        assert b["image"].shape[2:4] in allowed and b["gt_valid"].any()
        assert b["gt_labels"].max() < 4
    ev = _take(pipeline.eval_dataset(builder, cfg, num_local_devices=8), 10)
    assert sum(int(b["valid"].sum()) for b in ev) == 5


def test_canvas_and_epoch_size_as_mmdet(coco, mmdet):
    """`canvas` = the device batch's largest img_shape rounded up to 32 (mmdet's
    pad_size_divisor per batch); the epoch counts the images mmdet's filter keeps."""
    coco_dir, builder = coco
    cfg = _cfg(per_device_batch=2)
    assert pipeline.count_train_images(builder, cfg) == len(
        _mmdet_train_ids(mmdet, coco_dir, cfg.min_size))
    assert pipeline.count_train_images(builder, cfg) < builder.info.splits["train"].num_examples
    for b in _take(pipeline.train_dataset(builder, cfg, num_local_devices=2, seed=0), 3):
        top = -(-b["img_shape"].max(axis=1, keepdims=True) // 32) * 32  # [D, 1, 2]
        np.testing.assert_array_equal(b["canvas"], np.broadcast_to(top, b["canvas"].shape))
        assert (b["canvas"] <= np.asarray(b["image"].shape[2:4])).all()
