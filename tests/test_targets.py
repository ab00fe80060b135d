"""On-device SOLOv2 targets equal mmdet 3.3.0 `SOLOV2Head._get_targets_single` exactly."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from solov2_jax import mask_ops
from solov2_jax.config import solov2_config
from solov2_jax.targets import area_bounds, batch_targets, cell_thresholds, target_kwargs

R50 = "solov2_r50_fpn_1x_coco"
LIGHT = "solov2-light_r18_fpn_ms-3x_coco"

# ---------------------------------------------------------------- scenes (shared helpers)


def draw(hp, wp, kind, cy, cx, ry, rx):
    """[hp, wp] uint8 ellipse / rectangle (or an empty mask)."""
    yy, xx = np.mgrid[:hp, :wp]
    if kind == "ellipse":
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    elif kind == "rect":
        m = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    else:
        m = np.zeros((hp, wp), bool)
    return m.astype(np.uint8)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.array([10, 10, 30, 30], np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def scaled_box(box, scale):
    """Box with the same centre whose sqrt(w*h) is `scale` (aspect kept): box > mask."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    f = scale / np.sqrt(w * h)
    return np.array([cx - f * w / 2, cy - f * h / 2, cx + f * w / 2, cy + f * h / 2], np.float32)


def make_scene(hp, wp, specs):
    """specs: (kind, cy, cx, ry, rx, label, box_scale or None) -> dict of full-res GT."""
    masks, boxes, labels = [], [], []
    for kind, cy, cx, ry, rx, label, box_scale in specs:
        m = draw(hp, wp, kind, cy, cx, ry, rx)
        b = tight_box(m)
        masks.append(m)
        boxes.append(b if box_scale is None else scaled_box(b, box_scale))
        labels.append(label)
    return dict(
        masks=np.stack(masks) if masks else np.zeros((0, hp, wp), np.uint8),
        boxes=np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
        labels=np.array(labels, np.int64),
    )


def random_scene(rng, hp, wp, n, num_classes=80, enlarge=0.0):
    specs = []
    for _ in range(n):
        kind = "ellipse" if rng.random() < 0.6 else "rect"
        ry, rx = rng.uniform(2, hp / 2), rng.uniform(2, wp / 2)
        cy, cx = rng.uniform(0, hp), rng.uniform(0, wp)
        box_scale = None
        if rng.random() < enlarge:
            box_scale = float(rng.uniform(1, 2400))
        specs.append((kind, cy, cx, ry, rx, int(rng.integers(num_classes)), box_scale))
    return make_scene(hp, wp, specs)


def host_inputs(scenes, n_max):
    """What the input pipeline ships: [B, N, ...] arrays padded to n_max instances."""
    b = len(scenes)
    hp, wp = scenes[0]["masks"].shape[1:]
    out = dict(
        gt_boxes=np.zeros((b, n_max, 4), np.float32),
        gt_labels=np.zeros((b, n_max), np.int32),
        gt_masks=np.zeros((b, n_max, hp // 4, wp // 4), np.uint8),
        gt_centers=np.zeros((b, n_max, 2), np.float32),
        gt_valid=np.zeros((b, n_max), bool),
    )
    for i, s in enumerate(scenes):
        n = len(s["labels"])
        out["gt_boxes"][i, :n] = s["boxes"]
        out["gt_labels"][i, :n] = s["labels"]
        if n:
            out["gt_masks"][i, :n] = mask_ops.downsample_x4(s["masks"])
            out["gt_centers"][i, :n] = mask_ops.center_of_mass(s["masks"])
            out["gt_valid"][i, :n] = s["masks"].any(axis=(1, 2))
    return out


def mmdet_instances(scene):
    import torch
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    hp, wp = scene["masks"].shape[1:]
    gt = InstanceData()
    gt.bboxes = torch.from_numpy(scene["boxes"])
    gt.labels = torch.from_numpy(scene["labels"])
    gt.masks = BitmapMasks(scene["masks"], hp, wp)
    return gt


@functools.cache
def _jit_targets(kwargs_items):
    return jax.jit(functools.partial(batch_targets, **dict(kwargs_items)))


def jax_targets(inputs, kwargs):
    fn = _jit_targets(tuple(sorted(kwargs.items())))
    t = fn(inputs["gt_boxes"], inputs["gt_labels"], inputs["gt_centers"], inputs["gt_valid"])
    return jax.tree_util.tree_map(np.asarray, t)


def build_head(mmdet, name):
    from mmdet.registry import MODELS

    cfg = mmdet.load_config(name)
    return MODELS.build(cfg.model.mask_head)


def kwargs_for(name, featmap_hw, max_positives=512):
    """Our config (the values mmdet's shipped configs use) -> targets kwargs."""
    config = solov2_config(light="light" in name)
    config.loss.max_positives = max_positives
    return target_kwargs(config, featmap_hw)


# ---------------------------------------------------------------- comparison


def assert_matches_mmdet(head, scene, inputs, ours, i, kwargs):
    """Image i of our batched targets == mmdet's targets of `scene`; returns #pairs."""
    hp, wp = scene["masks"].shape[1:]
    featmap = (hp // 4, wp // 4)
    assert head.scale_ranges == tuple(tuple(int(v) for v in r) for r in kwargs["scale_ranges"])
    assert list(head.num_grids) == list(kwargs["num_grids"])
    m_targets, m_labels, m_pos, m_index = head._get_targets_single(
        mmdet_instances(scene), featmap_sizes=featmap
    )
    np.testing.assert_array_equal(
        ours.labels[i], np.concatenate([x.numpy().reshape(-1) for x in m_labels])
    )
    np.testing.assert_array_equal(ours.pos_mask[i], np.concatenate([x.numpy() for x in m_pos]))
    assert ours.num_pos[i] == sum(int(x.sum()) for x in m_pos)

    offsets = np.cumsum([0] + [s * s for s in kwargs["num_grids"]])
    ref_cells = np.concatenate(
        [np.asarray(idx, np.int64) + off for idx, off in zip(m_index, offsets[:-1], strict=True)]
    ).astype(np.int64)
    ref_masks = np.concatenate([t.numpy() for t in m_targets])  # [total, h, w]
    total, cap = len(ref_cells), kwargs["max_positives"]
    kept = min(total, cap)
    valid = ours.pos_valid[i]
    assert valid.sum() == kept and valid[:kept].all()
    assert ours.num_overflow[i] == max(total - cap, 0)
    # Same pairs in the same (mmdet pos_index) order, hence per level the same multiset.
    np.testing.assert_array_equal(ours.pos_cells[i][:kept], ref_cells[:kept])
    gathered = inputs["gt_masks"][i][ours.pos_instances[i][:kept]]
    mismatched = int((gathered != ref_masks[:kept]).sum())
    assert mismatched == 0, f"{mismatched} mask-target pixels differ"
    return total


# ---------------------------------------------------------------- tests


def test_host_thresholds_equal_float32_division():
    """Step points reproduce trunc((c / L) / (1/S)) and sqrt bounds in float32 exactly."""
    rng = np.random.default_rng(0)
    for length, s in [(128, 40), (96, 36), (1344, 24), (800, 12), (224, 16)]:
        t = cell_thresholds(length, s)
        x = np.concatenate(
            [(rng.uniform(-0.1, 1.3, 20000) * length).astype(np.float32), t,
             np.nextafter(t, np.float32(-np.inf))]
        )
        ref = np.trunc((x / np.float32(length)) / np.float32(1.0 / s))
        np.testing.assert_array_equal((x[:, None] >= t).sum(1), np.clip(ref, 0, s))
    for lo, hi in [(1, 96), (48, 192), (384, 2048), (224, 896)]:
        a_lo, a_hi = area_bounds(lo, hi)
        a = np.concatenate(
            [(rng.random(20000) * hi * hi * 1.2).astype(np.float32),
             np.float32([a_lo, a_hi]), np.nextafter(np.float32([a_lo, a_hi]), np.float32(0))]
        )
        np.testing.assert_array_equal((a >= a_lo) & (a < a_hi),
                                      (np.sqrt(a) >= lo) & (np.sqrt(a) <= hi))


@pytest.mark.parity
def test_cells_equal_torch_floordiv(mmdet):
    import torch
    from mmdet.models.utils.misc import floordiv

    rng = np.random.default_rng(1)
    for length, s in [(128, 40), (96, 36), (1344, 24)]:
        x = (rng.uniform(0, 1, 50000) * length).astype(np.float32)  # c in [0, L)
        ref = floordiv(torch.from_numpy(x) / length, 1.0 / s, rounding_mode="trunc").numpy()
        np.testing.assert_array_equal((x[:, None] >= cell_thresholds(length, s)).sum(1), ref)


def r50_scenes():
    hp, wp = 128, 96
    # (kind, cy, cx, ry, rx, label, box sqrt(w*h) or None for the tight box)
    hand = make_scene(hp, wp, [
        ("ellipse", 30, 20, 6, 5, 3, None),      # small, level 0
        ("ellipse", 64, 48, 28, 24, 7, None),    # ~55: levels 0 and 1
        ("rect", 66, 50, 10, 12, 9, None),       # overlaps the previous one's cells
        ("ellipse", 64, 48, 60, 44, 11, None),   # ~104: levels 1 and 2, overlaps again
        ("rect", 100, 70, 12, 10, 1, 300.0),     # box >> mask: levels 2 and 3
        ("ellipse", 20, 80, 9, 9, 2, 500.0),     # levels 3 and 4
        ("rect", 90, 20, 8, 6, 4, 1000.0),       # level 4 only
        ("ellipse", 110, 40, 5, 5, 5, 2500.0),   # above every range
        ("rect", 10, 10, 3, 3, 6, 0.5),          # below every range (box < mask)
        ("empty", 0, 0, 0, 0, 8, None),          # empty mask: skipped by mmdet
        ("ellipse", 127, 95, 4, 4, 0, None),     # at the bottom-right corner
    ])
    rng = np.random.default_rng(3)
    crowded = random_scene(rng, hp, wp, 40, enlarge=0.3)
    empty = make_scene(hp, wp, [("empty", 0, 0, 0, 0, 1, None)])
    outside = make_scene(hp, wp, [
        ("ellipse", 60, 40, 20, 15, 2, 3000.0), ("rect", 30, 30, 5, 5, 3, 0.9),
    ])
    return [hand, crowded, empty, outside]


@pytest.mark.parity
def test_targets_r50_match_mmdet(mmdet):
    head = build_head(mmdet, R50)
    scenes = r50_scenes()
    inputs = host_inputs(scenes, n_max=48)
    kwargs = kwargs_for(R50, (32, 24), max_positives=1024)
    ours = jax_targets(inputs, kwargs)
    totals = [assert_matches_mmdet(head, s, inputs, ours, i, kwargs)
              for i, s in enumerate(scenes)]
    # The cases exercise what they claim to.
    assert totals[0] > 0 and totals[1] > 200 and totals[2] == 0 and totals[3] == 0
    levels = np.searchsorted(np.cumsum([s * s for s in kwargs["num_grids"]]),
                             ours.pos_cells[0][ours.pos_valid[0]], side="right")
    assert set(levels.tolist()) == {0, 1, 2, 3, 4}
    # A cell hit by two instances is listed twice.
    cells = ours.pos_cells[0][ours.pos_valid[0]]
    assert len(np.unique(cells)) < len(cells)


@pytest.mark.parity
def test_targets_overflow_keeps_first_pairs(mmdet):
    head = build_head(mmdet, R50)
    scenes = r50_scenes()[:2]
    inputs = host_inputs(scenes, n_max=48)
    kwargs = kwargs_for(R50, (32, 24), max_positives=64)
    ours = jax_targets(inputs, kwargs)
    totals = [assert_matches_mmdet(head, s, inputs, ours, i, kwargs)
              for i, s in enumerate(scenes)]
    assert ours.num_overflow[1] == totals[1] - 64 > 0


@pytest.mark.parity
def test_targets_light_tight_boxes_every_level(mmdet):
    """Light config on a 256x224 canvas: tight boxes alone reach all five ranges."""
    head = build_head(mmdet, LIGHT)
    hp, wp = 256, 224
    hand = make_scene(hp, wp, [
        ("ellipse", 128, 112, 126, 110, 5, None),  # ~234: levels 3 and 4
        ("rect", 100, 100, 60, 50, 6, None),       # ~110: levels 1 and 2
        ("ellipse", 200, 60, 20, 15, 7, None),     # ~35: levels 0 and 1
        ("rect", 40, 180, 6, 4, 8, None),          # level 0
        ("ellipse", 130, 110, 80, 70, 9, None),    # ~150: levels 2 and 3
    ])
    crowded = random_scene(np.random.default_rng(5), hp, wp, 30)
    scenes = [hand, crowded]
    inputs = host_inputs(scenes, n_max=32)
    kwargs = kwargs_for(LIGHT, (64, 56))
    ours = jax_targets(inputs, kwargs)
    for i, s in enumerate(scenes):
        assert_matches_mmdet(head, s, inputs, ours, i, kwargs)
    levels = np.searchsorted(np.cumsum([s * s for s in kwargs["num_grids"]]),
                             ours.pos_cells[0][ours.pos_valid[0]], side="right")
    assert set(levels.tolist()) == {0, 1, 2, 3, 4}


def test_canvas_targets_equal_targets_computed_on_the_canvas():
    """Per-image canvas inside a larger input == the same targets on an input that is the
    canvas (the thresholds come from the host table row of each canvas length)."""
    rng = np.random.default_rng(5)
    n, bucket = 6, (320, 480)
    canvases = np.array([[224, 320], [320, 480], [96, 448]], np.int32)
    boxes, centers = [], []
    for ch, cw in canvases:
        x0, y0 = rng.uniform(0, cw * 0.7, n), rng.uniform(0, ch * 0.7, n)
        w, h = rng.uniform(4, cw * 0.5, n), rng.uniform(4, ch * 0.5, n)
        boxes.append(np.stack([x0, y0, x0 + w, y0 + h], 1))
        centers.append(np.stack([y0 + h / 2, x0 + w / 2], 1))
    inputs = {"gt_boxes": np.asarray(boxes, np.float32),
              "gt_labels": rng.integers(0, 80, (3, n)).astype(np.int32),
              "gt_centers": np.asarray(centers, np.float32),
              "gt_valid": rng.random((3, n)) < 0.85}
    kw = kwargs_for(R50, (bucket[0] // 4, bucket[1] // 4))
    got = jax.tree_util.tree_map(np.asarray, jax.jit(functools.partial(batch_targets, **kw))(
        inputs["gt_boxes"], inputs["gt_labels"], inputs["gt_centers"], inputs["gt_valid"],
        canvases))
    for i, (ch, cw) in enumerate(canvases):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        want = jax_targets(one, kwargs_for(R50, (ch // 4, cw // 4)))
        for field in ("labels", "pos_mask", "pos_cells", "pos_instances", "pos_valid",
                      "num_pos"):
            np.testing.assert_array_equal(getattr(got, field)[i], getattr(want, field)[0],
                                          err_msg=f"image {i}: {field}")
    # A canvas smaller than the input moves cells: the test would see the old behaviour.
    plain = jax_targets(inputs, kw)
    assert (plain.labels[0] != got.labels[0]).any()
