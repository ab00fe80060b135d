"""End-to-end parity with the real mmdetection 3.3.0 SOLOv2 (random weights).

mmdet builds the model from its shipped config, its state_dict goes through a `.pth`
file and `solov2_jax.convert` (the real conversion path), and both frameworks run on the
same padded, normalised images. Every exposed tensor is compared: C2..C5, P2..P6, mask
features, kernel and category predictions of each level.
"""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from flax import traverse_util

from solov2_jax import conversion_table as ct
from solov2_jax import convert
from solov2_jax.models import build_model, trainable_mask
from tests.models.parity_utils import TOL, as_jax, random_image, rel_err

pytestmark = pytest.mark.parity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (mmdet config name, batch, image h, w before padding). 70x100 pads to 96x128 (not a
# multiple of 32, not square); the r50 case is kept small because its head is heavy.
CASES = {
    "solov2-light_r18_fpn_ms-3x_coco": (2, 70, 100),
    "solov2_r50_fpn_1x_coco": (1, 64, 96),
}

_cache: dict = {}


def run_both(mmdet, name, tmp_path_factory):
    """(torch outputs, jax outputs, mmdet model) for one config; computed once."""
    if name in _cache:
        return _cache[name]
    import torch

    batch, h, w = CASES[name]
    model, _ = mmdet.build_model(name, seed=0)
    pth = tmp_path_factory.mktemp("ckpt") / f"{name}.pth"
    torch.save({"meta": {"note": "random weights"}, "state_dict": model.state_dict()}, pth)
    variables = convert.convert_mmdet_checkpoint(str(CONFIGS / f"{name}.py"), str(pth))

    image = random_image(batch, h, w, seed=1)
    with torch.no_grad():
        x = mmdet.to_nchw(image)
        ref = {"backbone": model.backbone(x), "fpn": model.extract_feat(x)}
        ref["kernel_preds"], ref["cls_preds"], ref["mask_feats"] = model.mask_head(ref["fpn"])

    cfg = convert.load_config(str(CONFIGS / f"{name}.py"))
    jmodel = build_model(cfg.model, precision=jax.lax.Precision.HIGHEST)
    out = jax.jit(jmodel.apply)(variables, as_jax(image))
    _cache[name] = (ref, out, model)
    return _cache[name]


@pytest.fixture(scope="module", autouse=True)
def _clear_cache():
    yield
    _cache.clear()


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_mmdet(mmdet, name, tmp_path_factory):
    ref, out, _ = run_both(mmdet, name, tmp_path_factory)
    errors = {}
    for group in ("backbone", "fpn", "kernel_preds", "cls_preds"):
        got, want = getattr(out, group), ref[group]
        assert len(got) == len(want), group
        for i, (g, t) in enumerate(zip(got, want, strict=True)):
            errors[f"{group}[{i}]"] = rel_err(g, t)
    errors["mask_feats"] = rel_err(out.mask_feats, ref["mask_feats"])
    print(f"\n{name}: " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative error above {TOL}: {bad}"


def test_trainable_mask_matches_mmdet_requires_grad(mmdet, tmp_path_factory):
    """Our frozen set equals mmdet's `requires_grad=False` set (frozen_stages=1)."""
    name = "solov2-light_r18_fpn_ms-3x_coco"
    _, _, model = run_both(mmdet, name, tmp_path_factory)
    cfg = convert.load_config(str(CONFIGS / f"{name}.py"))
    table = ct.solov2_table(cfg.model.depth, cfg.model.stacked_convs)
    # A params tree with the table's paths stands in for the model's (values unused).
    param_keys = {k: t.path for k, t in table.items() if t.collection == "params"}
    mask = traverse_util.flatten_dict(
        trainable_mask(traverse_util.unflatten_dict({p: 0 for p in param_keys.values()})))
    requires_grad = dict(model.named_parameters())
    assert param_keys.keys() == requires_grad.keys()
    for key, path in param_keys.items():
        assert mask[path] == requires_grad[key].requires_grad, key
    frozen = [k for k, p in param_keys.items() if not mask[p]]
    assert any(k.startswith("backbone.layer1.") for k in frozen)
    assert "backbone.conv1.weight" in frozen and "backbone.bn1.weight" in frozen
    assert not any(k.startswith(("backbone.layer2", "neck", "mask_head")) for k in frozen)
