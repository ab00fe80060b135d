"""Matrix NMS parity: `solov2_jax.matrix_nms` vs mmdet's `mask_matrix_nms` on random masks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solov2_jax.matrix_nms import batched_matrix_nms, matrix_nms


def blob_masks(rng, n, h, w):
    """[n, h, w] bool: random ellipses, a third of them shifted copies of an earlier one
    (heavy overlaps), so that same-label decay actually happens."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        if i >= 3 and rng.random() < 0.33:
            j = rng.integers(0, i)
            dy, dx = rng.integers(-2, 3, size=2)
            masks[i] = np.roll(masks[j], (dy, dx), axis=(0, 1))
            masks[i, rng.integers(0, h), :] ^= True  # never an exact copy
            continue
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if not masks[i].any():
            masks[i, int(cy) % h, int(cx) % w] = True
    return masks


def mmdet_nms(masks, labels, scores, **kw):
    import torch
    from mmdet.models.layers import mask_matrix_nms

    s, lab, _, inds = mask_matrix_nms(
        torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(scores), **kw)
    return s.numpy(), lab.numpy(), inds.numpy()


def ours_padded(rng, masks, labels, scores, pass_area, **kw):
    """Runs ours on a copy padded with invalid entries at random positions; returns the
    valid outputs with indices mapped back to the unpadded input."""
    n = len(scores)
    total = n + 7
    pos = np.sort(rng.choice(total, n, replace=False))
    pm = np.zeros((total,) + masks.shape[1:], bool)
    pm[pos] = masks
    pm[np.setdiff1d(np.arange(total), pos), :3, :3] = True  # junk that must be ignored
    pl = rng.integers(0, 3, total).astype(np.int32)
    pl[pos] = labels
    ps = rng.random(total).astype(np.float32) + 1.0  # junk scores above every real one
    ps[pos] = scores
    valid = np.zeros(total, bool)
    valid[pos] = True
    area = pm.sum((1, 2)).astype(np.float32) if pass_area else None
    s, lab, inds, ok = jax.device_get(
        matrix_nms(jnp.asarray(pm), jnp.asarray(pl), jnp.asarray(ps), jnp.asarray(valid),
                   area, **kw))
    inv = np.full(total, -1)
    inv[pos] = np.arange(n)
    assert (np.diff(ok.astype(int)) <= 0).all(), "valid slots must come first"
    return s[ok], lab[ok], inv[inds[ok]], len(ok)


CASES = [
    dict(kernel=k, filter_thr=f, max_num=m, nms_pre=p, sigma=sg)
    for (k, sg), f, m, p in itertools.product(
        (("gaussian", 2.0), ("linear", 2.0)), (-1, 0.3), (5, 100), (-1, 25))
] + [
    dict(kernel="gaussian", filter_thr=0.05, max_num=10, nms_pre=500, sigma=0.5),
    dict(kernel="linear", filter_thr=0.5, max_num=-1, nms_pre=10, sigma=2.0),
    dict(kernel="gaussian", filter_thr=0.9, max_num=3, nms_pre=-1, sigma=4.0),
    dict(kernel="linear", filter_thr=0.99, max_num=20, nms_pre=-1, sigma=2.0),
    dict(kernel="gaussian", filter_thr=-1, max_num=-1, nms_pre=-1, sigma=1.0),
    dict(kernel="linear", filter_thr=-1, max_num=-1, nms_pre=-1, sigma=2.0),
]


@pytest.mark.parity
@pytest.mark.parametrize("case_id", range(len(CASES)))
def test_matrix_nms_matches_mmdet(mmdet, case_id):
    kw = CASES[case_id]
    rng = np.random.default_rng(100 + case_id)
    n = int(rng.integers(20, 40))
    masks = blob_masks(rng, n, 24, 32)
    labels = rng.integers(0, 3, n).astype(np.int64)
    scores = rng.uniform(0.05, 1.0, n).astype(np.float32)
    ref_s, ref_l, ref_i = mmdet_nms(masks, labels, scores, **kw)
    s, lab, inds, slots = ours_padded(rng, masks, labels, scores, case_id % 2 == 0, **kw)
    p = min(kw["nms_pre"], n + 7) if kw["nms_pre"] > 0 else n + 7
    assert slots == (kw["max_num"] if kw["max_num"] > 0 else p)
    np.testing.assert_array_equal(inds, ref_i)
    np.testing.assert_array_equal(lab, ref_l)
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)
    # Decay actually did something in these random cases.
    if kw["filter_thr"] <= 0 and kw["max_num"] >= 100:
        assert (s < scores[inds] - 1e-3).any()


def test_matrix_nms_ties_are_stable_and_vmappable():
    """Exactly equal scores keep input order (documented tie rule); vmap over a batch."""
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 6, 12, 8), bool)
    for b, i in itertools.product(range(2), range(6)):
        masks[b, i, 2 * i : 2 * i + 2, :] = True  # disjoint stripes: no decay at all
    scores = np.array([[0.5, 0.7, 0.5, 0.5, 0.7, 0.1]] * 2, np.float32)
    labels = rng.integers(0, 2, (2, 6)).astype(np.int32)
    valid = np.ones((2, 6), bool)
    valid[1, 1] = False
    s, lab, inds, ok = jax.device_get(
        batched_matrix_nms(masks, labels, scores, valid, max_num=8))
    np.testing.assert_array_equal(inds[0], [1, 4, 0, 2, 3, 5, -1, -1])
    np.testing.assert_array_equal(inds[1], [4, 0, 2, 3, 5, -1, -1, -1])
    np.testing.assert_array_equal(ok.sum(1), [6, 5])
    np.testing.assert_allclose(s[0, :6], scores[0, [1, 4, 0, 2, 3, 5]])
    assert (lab[~ok] == -1).all() and (s[~ok] == 0).all()


def test_zero_masks_give_empty_slots():
    """mmdet returns empty results for no masks; here every slot is empty."""
    scores, labels, inds, ok = matrix_nms(jnp.zeros((0, 8, 8), bool), jnp.zeros((0,), jnp.int32),
                                          jnp.zeros((0,), jnp.float32), max_num=5)
    assert scores.shape == (5,) and not np.asarray(ok).any()
    assert (np.asarray(labels) == -1).all() and (np.asarray(inds) == -1).all()


@pytest.mark.parametrize("arg", ["labels", "scores", "valid", "mask_area"])
def test_inconsistent_lengths_are_rejected_at_trace_time(arg):
    """JAX would clamp the out-of-range gather (wrong scores); mmdet raises, so do we."""
    n = 4
    args = {"masks": jnp.ones((n, 6, 6), bool), "labels": jnp.zeros((n,), jnp.int32),
            "scores": jnp.ones((n,)), "valid": jnp.ones((n,), bool),
            "mask_area": jnp.full((n,), 36.0)}
    args[arg] = args[arg][:n - 1]
    with pytest.raises(ValueError, match=f"{arg} has shape"):
        matrix_nms(**args)
