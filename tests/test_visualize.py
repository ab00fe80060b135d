"""solov2_jax.visualize: tag placement keeps "name score" tags apart and inside the picture."""

from __future__ import annotations

import numpy as np
import pytest

from solov2_jax import visualize


def _pairwise_overlap(rects: np.ndarray) -> list[tuple[int, int]]:
    """Index pairs of xyxy rectangles (x2/y2 exclusive) [N, 4] that share a pixel."""
    return [(i, j) for i in range(len(rects)) for j in range(i + 1, len(rects))
            if min(rects[i, 2], rects[j, 2]) > max(rects[i, 0], rects[j, 0])
            and min(rects[i, 3], rects[j, 3]) > max(rects[i, 1], rects[j, 1])]


def _inside(rects: np.ndarray, hw: tuple[int, int]) -> bool:
    h, w = hw
    return bool(((rects[:, :2] >= 0) & (rects[:, 2:] <= [w, h])).all())


def test_identical_boxes_get_separate_tags():
    sizes = np.asarray([[30, 10]] * 6)
    boxes = np.asarray([[10, 30, 50, 60]] * 6, np.float32)
    scores = np.asarray([0.2, 0.9, 0.5, 0.7, 0.1, 0.3])
    rects = visualize.place_tags(sizes, boxes, (100, 100), scores)
    assert rects.shape == (6, 4)
    assert _pairwise_overlap(rects) == [], rects
    assert _inside(rects, (100, 100)), rects
    assert (rects[:, 2:] - rects[:, :2] == sizes).all()  # tags keep their size
    # Highest score first: above the top-left corner, then inside it, then below the
    # box, then the inside corner one tag height down.
    best = np.argsort(-scores, kind="stable")
    assert rects[best[0]].tolist() == [10, 20, 40, 30]
    assert rects[best[1]].tolist() == [10, 30, 40, 40]
    assert rects[best[2]].tolist() == [10, 60, 40, 70]
    assert rects[best[3]].tolist() == [10, 40, 40, 50]
    # Without scores (ground truth) the index order decides, and the result is the same
    # set of places.
    plain = visualize.place_tags(sizes, boxes, (100, 100))
    assert plain[0].tolist() == [10, 20, 40, 30]
    assert sorted(map(tuple, plain)) == sorted(map(tuple, rects))


def test_tags_stay_inside_at_the_borders_and_avoid_taken():
    hw = (60, 80)
    sizes = np.asarray([[40, 12]] * 4)
    # Boxes touching the top, right and bottom borders: candidates are moved inside.
    boxes = np.asarray([[0, 0, 20, 20], [70, 0, 80, 30], [60, 50, 80, 60], [0, 0, 20, 20]])
    title = np.asarray([[0, 0, 30, 14]])
    rects = visualize.place_tags(sizes, boxes, hw, taken=title)
    assert _inside(rects, hw), rects
    assert _pairwise_overlap(np.concatenate([title, rects])) == [], rects


def test_crowded_picture_falls_back_to_least_overlap():
    # A 20x25 picture holds two 20x10 tags (rows 0-9 and 15-24) with a 5-row gap: the
    # third tag cannot be free, and the least overlap any position has is 5 rows (100
    # pixels), not a whole tag (200).
    sizes = np.asarray([[20, 10]] * 3)
    boxes = np.asarray([[0, 0, 20, 20]] * 3)
    rects = visualize.place_tags(sizes, boxes, (25, 20))
    assert _inside(rects, (25, 20)), rects
    assert rects[:2, 1].tolist() == [0, 15]
    assert visualize._overlap(rects[2:], rects[:2])[0] == 100, rects
    np.testing.assert_array_equal(rects, visualize.place_tags(sizes, boxes, (25, 20)))


def test_place_tags_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 tag sizes but 1 boxes"):
        visualize.place_tags([[10, 5], [10, 5]], [[0, 0, 4, 4]], (20, 20))


def test_drawn_tags_are_all_visible():
    """Six instances with one box: every tag's own colour shows at its placed corner
    (none is painted over by another), and the picture is otherwise unchanged by tags."""
    h, w, n = 240, 320, 6
    img = np.full((h, w, 3), 200, np.uint8)
    masks = np.zeros((n, h, w), bool)
    masks[:, 80:180, 100:220] = True
    scores = np.linspace(0.9, 0.4, n)
    names = ["cat"]
    out = visualize.draw_instances(img, masks, [0] * n, scores, names, legend=False)
    scale, thick = visualize._text_scale(h, w)
    sizes = [visualize._tag_size(f"{i}: cat {scores[i]:.2f}", scale * 0.8, max(1, thick - 1))
             for i in range(n)]
    rects = visualize.place_tags(sizes, [[100, 80, 220, 180]] * n, (h, w), scores)
    assert _pairwise_overlap(rects) == []
    colors = visualize.palette(n)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        for y, x in ((y1, x1), (y2 - 1, x2 - 1), (y1, x2 - 1), (y2 - 1, x1)):
            np.testing.assert_array_equal(out[y, x], colors[i], err_msg=f"tag {i}")


def test_draw_zero_and_many_instances():
    img = np.full((64, 64, 3), 120, np.uint8)
    empty = visualize.draw_instances(img, np.zeros((0, 64, 64), bool), [], [], ["a"],
                                     title="nothing")
    assert empty.shape[0] == 64 and empty.shape[1] > 64
    rng = np.random.default_rng(0)
    n = 300
    masks = np.zeros((n, 64, 64), bool)
    for i, (y, x) in enumerate(rng.integers(0, 56, (n, 2))):
        masks[i, y:y + 8, x:x + 8] = True
    many = visualize.draw_instances(img, masks, rng.integers(0, 2, n), rng.random(n),
                                    ["a", "b"], min_side=128)
    assert many.shape[0] == 128 and many.shape[1] > 128
    scale, thick = visualize._text_scale(128, 128)
    boxes = np.asarray([[x, y, x + 8, y + 8] for y, x in rng.integers(0, 56, (n, 2))]) * 2
    rects = visualize.place_tags([visualize._tag_size("12: a 0.50", scale * 0.8, 1)] * n,
                                 boxes, (128, 128), rng.random(n))
    assert _inside(rects, (128, 128))
