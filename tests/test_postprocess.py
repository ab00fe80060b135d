"""Post-processing parity: `solov2_jax.postprocess` vs mmdet's `SOLOV2Head.predict_by_feat`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solov2_jax import config as config_lib
from solov2_jax import postprocess as pp
from solov2_jax.ops import interpolate_bilinear

REAL_GRIDS = (40, 36, 24, 16, 12)
SMALL_GRIDS = (12, 10, 8, 6, 4)
STRIDES = (8, 8, 16, 32, 32)


def head_outputs(seed, batch, grids, num_classes, e, feat_hw, plant=8):
    """Random NHWC head outputs with a few planted high-score (cell, class) pairs per level
    (everything else far below score_thr) and smooth mask features, so that the masks are
    blobs with sharp edges rather than noise."""
    rng = np.random.default_rng(seed)
    cls_preds, kernel_preds = [], []
    for s in grids:
        logits = rng.normal(-8.0, 0.5, (batch, s, s, num_classes)).astype(np.float32)
        for b in range(batch):
            cells = rng.choice(s * s, plant, replace=False)
            classes = rng.integers(0, num_classes, plant)
            logits[b].reshape(-1, num_classes)[cells, classes] = rng.uniform(-1.5, 3.0, plant)
        cls_preds.append(logits)
        kernel_preds.append(rng.normal(0, 1, (batch, s, s, e)).astype(np.float32))
    hf, wf = feat_hw
    coarse = rng.normal(0, 1, (batch, hf // 4, wf // 4, e)).astype(np.float32)
    feats = np.asarray(interpolate_bilinear(jnp.asarray(coarse), (hf, wf)))
    feats = feats + 0.05 * rng.normal(0, 1, feats.shape).astype(np.float32)
    # Channel 0 is a constant 1, so kernel channel 0 is a bias: negative biases give small
    # masks, some at or below the level stride (dropped by the area filter).
    feats[..., 0] = 1.0
    for k in kernel_preds:
        k[..., 0] = rng.uniform(-2.5, 0.5, k.shape[:-1]) * feats[..., 1:].std() * e**0.5
    return kernel_preds, cls_preds, feats


def build_head(mmdet, grids, num_classes, e, test_cfg):
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    cfg = mmdet.load_config("solov2_r50_fpn_1x_coco")
    head_cfg = cfg.model.mask_head
    # Only the post-processing attributes matter; small convs keep construction cheap.
    head_cfg.update(num_classes=num_classes, num_grids=list(grids), in_channels=32,
                    feat_channels=32, stacked_convs=1, test_cfg=ConfigDict(test_cfg))
    head_cfg.mask_feature_head.update(feat_channels=32, out_channels=e)
    head = MODELS.build(head_cfg)
    head.eval()
    return head


def run_mmdet(head, kernel_preds, cls_preds, feats, img_shape, ori_shape):
    import torch

    from tests.mmdet_ref import to_nchw

    hp, wp = feats.shape[1] * 4, feats.shape[2] * 4
    metas = [dict(img_shape=tuple(map(int, i)), ori_shape=tuple(map(int, o)),
                  pad_shape=(hp, wp)) for i, o in zip(img_shape, ori_shape, strict=True)]
    with torch.no_grad():
        res = head.predict_by_feat([to_nchw(k) for k in kernel_preds],
                                   [to_nchw(c) for c in cls_preds], to_nchw(feats), metas)
    return [dict(masks=r.masks.numpy(), scores=r.scores.numpy(), labels=r.labels.numpy())
            for r in res]


def compare(dets, ref, ori_shape):
    """Asserts equal labels / order, scores within 1e-5, mask IoU >= 0.99; returns stats."""
    ours = pp.detections_to_instances(dets, ori_shape)
    max_ds, min_iou, n_total = 0.0, 1.0, 0
    for img, (mine, theirs) in enumerate(zip(ours, ref, strict=True)):
        assert len(mine) == len(theirs["scores"]), f"image {img}"
        n_total += len(mine)
        np.testing.assert_array_equal([d["label"] for d in mine], theirs["labels"])
        s = np.array([d["score"] for d in mine], np.float32)
        np.testing.assert_allclose(s, theirs["scores"], rtol=0, atol=1e-5)
        max_ds = max(max_ds, float(np.abs(s - theirs["scores"]).max(initial=0)))
        for d, m in zip(mine, theirs["masks"], strict=True):
            assert d["mask"].shape == m.shape
            union = (d["mask"] | m).sum()
            iou = (d["mask"] & m).sum() / union if union else 1.0
            min_iou = min(min_iou, float(iou))
    assert min_iou >= 0.99
    return max_ds, min_iou, n_total


CASES = {
    # Non-square, batch 2, img_shape < padded shape, ori_shape != img_shape (one smaller,
    # one larger), candidate cap below the score count but above the true candidate count.
    "small_nonsquare": dict(
        grids=SMALL_GRIDS, classes=4, e=32, feat_hw=(16, 24), img=[(60, 90), (64, 72)],
        ori=[(45, 67), (100, 113)], out_hw=(104, 120),
        cfg=dict(kernel="gaussian", max_candidates=48, max_per_img=100, filter_thr=0.3)),
    "small_square_linear": dict(
        grids=SMALL_GRIDS, classes=4, e=32, feat_hw=(16, 16), img=[(50, 64)],
        ori=[(80, 102)], out_hw=(80, 102),
        cfg=dict(kernel="linear", max_candidates=1000, max_per_img=10)),
    # The real solov2_r50_fpn_1x_coco head layout (80 classes, grids, strides, E=256).
    "real_r50_1x": dict(
        grids=REAL_GRIDS, classes=80, e=256, feat_hw=(24, 32), img=[(90, 120)],
        ori=[(60, 80)], out_hw=(64, 80),
        cfg=dict(kernel="gaussian", max_candidates=1000, max_per_img=100)),
}


def config_for(case):
    c = config_lib.solov2_config(num_classes=case["classes"])
    c.model.num_grids = case["grids"]
    c.test.update(case["cfg"])
    return c


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_postprocess_matches_mmdet(mmdet, name):
    case = CASES[name]
    c = config_for(case)
    mm_test = {k: c.test[k] for k in ("nms_pre", "score_thr", "mask_thr", "filter_thr",
                                      "kernel", "sigma", "max_per_img")}
    head = build_head(mmdet, case["grids"], case["classes"], case["e"], mm_test)
    assert tuple(head.strides) == tuple(c.model.strides) == STRIDES
    kp, cp, feats = head_outputs(len(name), len(case["img"]), case["grids"], case["classes"],
                                 case["e"], case["feat_hw"])
    img, ori = np.array(case["img"], np.int32), np.array(case["ori"], np.int32)
    dets = pp.postprocess_fn(c.test, c.model, case["out_hw"])(kp, cp, feats, img, ori)
    assert dets.masks.shape == (len(img), c.test.max_per_img) + case["out_hw"]
    ref = run_mmdet(head, kp, cp, feats, img, ori)
    max_ds, min_iou, n = compare(dets, ref, ori)
    assert n >= 2 * len(img), "test inputs should produce several detections per image"
    print(f"{name}: {n} detections, max |score diff| {max_ds:.2e}, min mask IoU {min_iou:.5f}")


def test_compiles_once_and_no_host_callbacks():
    case = CASES["small_nonsquare"]
    c = config_for(case)
    fn = pp.postprocess_fn(c.test, c.model, case["out_hw"])
    img, ori = np.array(case["img"], np.int32), np.array(case["ori"], np.int32)
    outs = []
    for seed in (1, 2):
        kp, cp, feats = head_outputs(seed, 2, case["grids"], case["classes"], case["e"],
                                     case["feat_hw"])
        outs.append(fn(kp, cp, feats, img, ori[::-1] if seed == 2 else ori))
    assert fn._cache_size() == 1
    assert not np.array_equal(outs[0].scores, outs[1].scores)
    jaxpr = str(jax.make_jaxpr(fn)(kp, cp, feats, img, ori))
    assert "callback" not in jaxpr
    # RLE output decodes back to the same mask.
    from pycocotools import mask as mask_util

    insts = pp.detections_to_instances(outs[0], ori, rle=True)
    plain = pp.detections_to_instances(outs[0], ori)
    r, m = insts[1][0]["mask"], plain[1][0]["mask"]
    assert r["size"] == [int(ori[1][0]), int(ori[1][1])]
    np.testing.assert_array_equal(mask_util.decode({**r, "counts": r["counts"].encode()}), m)
