"""End-to-end parity of the three DCN configs with the real mmdetection 3.3.0 + mmcv ops.

`solov2-light_r50-dcn`, `solov2_r101-dcn` and `solov2_x101-dcn` (ResNeXt-101 64x4d) are
built by mmdet from its shipped configs with random weights (every DCNv2 weight and
offset predictor randomised, so offsets are O(1) pixels), saved as `.pth`, converted by
`solov2_jax.convert` (strict) and run on the same non-square image. Every exposed output
is compared: C2..C5, P2..P6, kernel and category predictions per level, mask features.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from solov2_jax import convert
from solov2_jax.models import build_model
from tests.models.parity_utils import TOL, as_jax, random_image, rel_err

pytestmark = pytest.mark.parity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (batch, image h, w before padding): 70 x 100 pads to 96 x 128, 40 x 70 to 64 x 96.
CASES = {
    "solov2-light_r50-dcn_fpn_ms-3x_coco": (2, 70, 100),
    "solov2_r101-dcn_fpn_ms-3x_coco": (1, 40, 70),
    "solov2_x101-dcn_fpn_ms-3x_coco": (1, 40, 70),
}


def outputs_errors(out, ref) -> dict[str, float]:
    errors = {}
    for group in ("backbone", "fpn", "kernel_preds", "cls_preds"):
        got, want = getattr(out, group), ref[group]
        assert len(got) == len(want), group
        for i, (g, t) in enumerate(zip(got, want, strict=True)):
            errors[f"{group}[{i}]"] = rel_err(g, t)
    errors["mask_feats"] = rel_err(out.mask_feats, ref["mask_feats"])
    return errors


@pytest.fixture(scope="module")
def light_dcn(mmcv_ops, tmp_path_factory):
    """(mmdet model, converted variables, image, mmdet outputs) of the light R50-DCN."""
    return run_mmdet(mmcv_ops, "solov2-light_r50-dcn_fpn_ms-3x_coco", tmp_path_factory)


def run_mmdet(mmdet, name, tmp_path_factory):
    import torch

    batch, h, w = CASES[name]
    # Every parameter and BN statistic is randomised, so mmdet's (slow) init is skipped.
    model, _ = mmdet.build_model(name, seed=0, init_weights=False)
    pth = tmp_path_factory.mktemp("ckpt") / f"{name}.pth"
    torch.save({"meta": {"note": "random weights"}, "state_dict": model.state_dict()}, pth)
    # The real conversion path: strict about every key and shape (raises otherwise).
    variables = convert.convert_mmdet_checkpoint(str(CONFIGS / f"{name}.py"), str(pth))
    pth.unlink()
    image = random_image(batch, h, w, seed=1)
    with torch.no_grad():
        x = mmdet.to_nchw(image)
        ref = {"backbone": model.backbone(x), "fpn": model.extract_feat(x)}
        ref["kernel_preds"], ref["cls_preds"], ref["mask_feats"] = model.mask_head(ref["fpn"])
    return model, variables, image, ref


def jax_model(name):
    cfg = convert.load_config(str(CONFIGS / f"{name}.py"))
    return build_model(cfg.model, precision=jax.lax.Precision.HIGHEST)


def check(name, out, ref):
    errors = outputs_errors(out, ref)
    print(f"\n{name}: max {max(errors.values()):.1e}; "
          + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative error above {TOL}: {bad}"


def test_light_r50_dcn_matches_mmdet(light_dcn):
    name = "solov2-light_r50-dcn_fpn_ms-3x_coco"
    model, variables, image, ref = light_dcn
    # DCN sits where the config puts it: the last of 3 stacked head convs, stages 2-4.
    assert hasattr(model.mask_head.kernel_convs[2].conv, "conv_offset")
    assert not hasattr(model.mask_head.kernel_convs[1].conv, "conv_offset")
    assert "conv_offset" in variables["params"]["mask_head"]["cls_convs_2"]["conv"]
    assert "conv_offset" in variables["params"]["backbone"]["layer2_0"]["conv2"]
    assert "conv_offset" not in variables["params"]["backbone"]["layer1_0"]["conv2"]
    out = jax.jit(jax_model(name).apply)(variables, as_jax(image))
    check(name, out, ref)


def test_light_r50_dcn_on_a_canvas_inside_a_larger_input(light_dcn):
    """Padded into a larger static input with canvas_hw = mmdet's canvas, DCN samples
    read zeros past the canvas exactly as mmcv reads zeros past the image."""
    name = "solov2-light_r50-dcn_fpn_ms-3x_coco"
    _, variables, image, ref = light_dcn
    b, hp, wp, _ = image.shape
    big = np.zeros((b, hp + 64, wp + 32, 3), np.float32)
    big[:, :hp, :wp] = image
    canvas_hw = np.tile(np.array([[hp, wp]], np.int32), (b, 1))
    out = jax.jit(jax_model(name).apply)(variables, as_jax(big), canvas_hw)

    def crop(x, stride):
        return x[:, : -(-hp // stride), : -(-wp // stride)]

    out = out.replace(
        backbone=tuple(crop(x, 4 * 2**i) for i, x in enumerate(out.backbone)),
        fpn=tuple(crop(x, 4 * 2**i) for i, x in enumerate(out.fpn)),
        mask_feats=crop(out.mask_feats, 4))
    check(name + " (canvas)", out, ref)


@pytest.mark.parametrize("name", ["solov2_r101-dcn_fpn_ms-3x_coco",
                                  "solov2_x101-dcn_fpn_ms-3x_coco"])
def test_dcn_configs_match_mmdet(mmcv_ops, name, tmp_path_factory):
    model, variables, image, ref = run_mmdet(mmcv_ops, name, tmp_path_factory)
    # DCN in every head conv and mask-feature conv (also the 1x1 conv_pred).
    assert hasattr(model.mask_head.mask_feature_head.conv_pred.conv, "conv_offset")
    assert "conv_offset" in variables["params"]["mask_head"]["mask_feature_head"][
        "conv_pred"]["conv"]
    del model
    out = jax.jit(jax_model(name).apply)(variables, as_jax(image))
    check(name, out, ref)


def test_dcn_checkpoint_conversion_is_strict(light_dcn):
    """A missing offset predictor, or a DCN checkpoint under the non-DCN config, fails
    naming the keys (the table has a rule exactly where the config puts DCN)."""
    model = light_dcn[0]
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = convert.load_config(str(CONFIGS / "solov2-light_r50-dcn_fpn_ms-3x_coco.py"))
    key = "mask_head.cls_convs.2.conv.conv_offset.bias"
    with pytest.raises(convert.ConversionError, match="missing keys \\(1\\)") as err:
        convert.convert_mmdet({k: v for k, v in sd.items() if k != key}, cfg)
    assert key in str(err.value)
    # The same weights under the plain light-R50 config: every conv_offset is unexpected
    # (and the head's stacked-conv count / scale differ too).
    plain = convert.load_config(str(CONFIGS / "solov2-light_r50_fpn_ms-3x_coco.py"))
    with pytest.raises(convert.ConversionError, match="unexpected keys") as err:
        convert.convert_mmdet(sd, plain)
    assert "backbone.layer2.0.conv2.conv_offset.weight" in str(err.value)


def test_small_dcn_head_matches_mmdet_also_on_a_canvas(mmcv_ops):
    """SOLOV2Head with DCN in every stacked conv and every mask-feature conv (incl. the
    1x1 conv_pred), small widths; then the same maps inside larger ones whose outside is
    random (not zero): DCN inputs must be masked to the canvas, also before a 1x1 DCN."""
    import torch
    from mmdet.registry import MODELS

    from solov2_jax import conversion_table as ct
    from solov2_jax.models import SOLOV2Head
    from tests.models.parity_utils import convert_module, randomise_

    grids = (10, 8, 6, 4, 3)
    gn = dict(type="GN", num_groups=8, requires_grad=True)
    torch.manual_seed(0)
    tm = MODELS.build(dict(
        type="SOLOV2Head", num_classes=3, in_channels=16, feat_channels=32, stacked_convs=2,
        strides=[8, 8, 16, 32, 32], num_grids=list(grids), norm_cfg=gn,
        dcn_cfg=dict(type="DCNv2"), dcn_apply_to_all_conv=True,
        mask_feature_head=dict(feat_channels=16, start_level=0, end_level=3, out_channels=24,
                               mask_stride=4, norm_cfg=gn, conv_cfg=dict(type="DCNv2"))))
    randomise_(tm, seed=7)
    assert hasattr(tm.mask_feature_head.conv_pred.conv, "conv_offset")
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    # FPN levels of a 64 x 96 canvas, and of a 128 x 160 input holding it.
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    big_sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2, h, w, 16)).astype(np.float32) for h, w in sizes]
    big = [rng.standard_normal((2, h, w, 16)).astype(np.float32) for h, w in big_sizes]
    for b, f in zip(big, feats, strict=True):
        b[:, : f.shape[1], : f.shape[2]] = f
    module = SOLOV2Head(num_classes=3, feat_channels=32, stacked_convs=2, num_grids=grids,
                        gn_groups=8, mask_feature_channels=16, mask_out_channels=24,
                        head_dcn="all", mask_feature_dcn=True,
                        precision=jax.lax.Precision.HIGHEST)
    variables = convert_module(module, [as_jax(f) for f in feats], sd,
                               (("", "", ct.HEAD_RULES),),
                               ct.index_sets(18, stacked_convs=2, head_dcn="all",
                                             mask_feature_dcn=True))
    with torch.no_grad():
        ref_k, ref_c, ref_m = tm([mmcv_ops.to_nchw(f) for f in feats])
    apply = jax.jit(module.apply)
    canvas_hw = np.array([[64, 96], [64, 96]], np.int32)
    for label, out in (("plain", apply(variables, [as_jax(f) for f in feats])),
                       ("canvas", apply(variables, [as_jax(f) for f in big], canvas_hw))):
        kernels, cls, mask_feats = out
        errors = {"mask_feats": rel_err(mask_feats[:, :16, :24], ref_m)}
        for i, (k, c, rk, rc) in enumerate(zip(kernels, cls, ref_k, ref_c, strict=True)):
            errors[f"kernel[{i}]"], errors[f"cls[{i}]"] = rel_err(k, rk), rel_err(c, rc)
        assert max(errors.values()) <= TOL, (label, errors)
