"""solov2_jax.convert: strict mmdet / torchvision conversion, orbax round trip, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from solov2_jax import convert
from solov2_jax.models import ResNet

REPO = Path(__file__).resolve().parents[1]
NAME = "solov2-light_r18_fpn_ms-3x_coco"
CONFIG = str(REPO / "configs" / f"{NAME}.py")


@pytest.fixture(scope="module")
def mmdet_state_dict(mmdet):
    """state_dict (torch tensors) of mmdet's light-R18 SOLOv2 with random weights."""
    model, _ = mmdet.build_model(NAME, seed=0)
    return dict(model.state_dict())


def save_pth(path, state_dict, wrap=True):
    import torch

    torch.save({"meta": {}, "state_dict": state_dict} if wrap else state_dict, path)
    return str(path)


def test_mmdet_cli_round_trip(mmdet_state_dict, tmp_path, capsys):
    # A bare state_dict (no 'meta'/'state_dict' wrapper) is accepted too.
    pth = save_pth(tmp_path / "bare.pth", mmdet_state_dict, wrap=False)
    out = tmp_path / "ckpt"
    assert convert.main(["mmdet", "--config", CONFIG, "--checkpoint", pth,
                         "--out", str(out)]) == 0
    restored = convert.load_variables(str(out))
    direct = convert.convert_mmdet_checkpoint(CONFIG, pth)
    assert jax.tree.structure(restored) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    w = mmdet_state_dict["mask_head.kernel_convs.0.conv.weight"].numpy()
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["mask_head"]["kernel_convs_0"]["conv"]["kernel"]),
        w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        np.asarray(restored["batch_stats"]["backbone"]["layer2_0"]["downsample_1"]["var"]),
        mmdet_state_dict["backbone.layer2.0.downsample.1.running_var"].numpy())
    # Refuses to overwrite without --force.
    capsys.readouterr()
    assert convert.main(["mmdet", "--config", CONFIG, "--checkpoint", pth,
                         "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err


def corrupt(state_dict, kind):
    import torch

    sd = dict(state_dict)
    if kind == "missing":
        key = "mask_head.cls_convs.1.gn.bias"
        del sd[key]
    elif kind == "unexpected":
        key = "mask_head.conv_extra.weight"
        sd[key] = torch.zeros(3)
    else:
        key = "neck.fpn_convs.2.conv.weight"
        sd[key] = torch.zeros(256, 256, 1, 1)
    return sd, key


@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshaped"])
def test_mismatch_is_an_error_naming_the_key(mmdet_state_dict, tmp_path, capsys, kind):
    sd, key = corrupt(mmdet_state_dict, kind)
    pth = save_pth(tmp_path / "bad.pth", sd)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert_mmdet_checkpoint(CONFIG, pth)
    title = {"missing": "missing keys (1)", "unexpected": "unexpected keys (1)",
             "misshaped": "mis-shaped keys (1)"}[kind]
    assert title in str(err.value) and key in str(err.value)
    out = tmp_path / "ckpt"
    capsys.readouterr()
    assert convert.main(["mmdet", "--config", CONFIG, "--checkpoint", pth,
                         "--out", str(out)]) == 1
    assert key in capsys.readouterr().err
    assert not out.exists()


def test_wrong_config_is_an_error(mmdet_state_dict, tmp_path):
    pth = save_pth(tmp_path / "r18.pth", mmdet_state_dict)
    with pytest.raises(convert.ConversionError, match="mask_head.conv_cls.weight"):
        convert.convert_mmdet_checkpoint(str(REPO / "configs" / "tiny.py"), pth)


def test_torchvision_resnet18_matches_mmdet_backbone(mmdet, tmp_path, capsys):
    import torch
    from mmdet.registry import MODELS

    from tests.models.parity_utils import as_jax, randomise_, rel_err

    torch.manual_seed(0)
    tm = MODELS.build(dict(type="ResNet", depth=18, out_indices=(0, 1, 2, 3),
                           style="pytorch"))
    randomise_(tm, seed=11)
    # torchvision's keys are mmdet's ResNet keys plus the ImageNet classifier.
    sd = dict(tm.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    pth = save_pth(tmp_path / "resnet18.pth", sd, wrap=False)
    out = tmp_path / "r18_init"
    assert convert.main(["torchvision", "--depth", "18", "--checkpoint", pth,
                         "--out", str(out)]) == 0
    variables = convert.load_backbone_init(str(out))
    image = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype(np.float32)
    feats = jax.jit(ResNet(depth=18, precision=jax.lax.Precision.HIGHEST).apply)(
        variables, as_jax(image))
    with torch.no_grad():
        ref = tm(mmdet.to_nchw(image))
    for f, r in zip(feats, ref, strict=True):
        assert rel_err(f, r) <= 1e-4

    # Strict as well: a missing BN statistic and a wrong depth are named errors.
    del sd["layer4.1.bn2.running_var"]
    bad = save_pth(tmp_path / "bad.pth", sd, wrap=False)
    capsys.readouterr()
    assert convert.main(["torchvision", "--depth", "18", "--checkpoint", bad,
                         "--out", str(tmp_path / "x")]) == 1
    assert "layer4.1.bn2.running_var" in capsys.readouterr().err
    with pytest.raises(convert.ConversionError, match="layer3.2.conv1.weight"):
        convert.convert_torchvision_checkpoint(34, pth)


def test_missing_checkpoint_file(tmp_path, capsys):
    assert convert.main(["mmdet", "--config", CONFIG, "--checkpoint",
                         str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err


def test_help_documents_both_modes(capsys):
    assert convert.main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("mmdet", "torchvision", "--config", "--depth", "examples"):
        assert word in text
    for mode in ("mmdet", "torchvision"):
        assert convert.main([mode, "--help"]) == 0
        assert "--checkpoint" in capsys.readouterr().out
    # The module entry point works as `python -m solov2_jax.convert`.
    proc = subprocess.run([sys.executable, "-m", "solov2_jax.convert", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "torchvision" in proc.stdout


def test_modes_and_required_flags_are_one_line_errors(tmp_path, capsys):
    pth, out = str(tmp_path / "x.pth"), str(tmp_path / "out")
    cases = [([], "give one MODE"), (["resnet", "--checkpoint", pth, "--out", out],
                                     "give one MODE, mmdet or torchvision (got: resnet)"),
             (["mmdet", "--out", out], "--checkpoint is required"),
             (["mmdet", "--checkpoint", pth, "--out", out], "mmdet: --config is required"),
             (["torchvision", "--checkpoint", pth, "--out", out],
              "give exactly one of --depth and --config"),
             (["torchvision", "--depth=19", "--checkpoint", pth, "--out", out],
              "--depth 19: must be one of (18, 34, 50, 101)"),
             (["mmdet", "--config", "no_such_config", "--checkpoint", pth, "--out", out],
              "'no_such_config' is neither a file nor a packaged config (packaged: ")]
    for argv, message in cases:
        assert convert.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("solov2-convert: error: ") and message in err, (argv, err)
        assert len(err.splitlines()) == 1, err


def test_shape_mismatches_names_every_difference():
    expected = {("params", "a", "kernel"): (3, 3), ("params", "b", "bias"): (4,)}
    assert convert.shape_mismatches(
        {"params": {"a": {"kernel": np.zeros((3, 3))}, "b": {"bias": np.zeros(4)}}},
        expected) == []
    got = {"params": {"a": {"kernel": np.zeros((3, 2))}, "c": {"bias": np.zeros(4)}}}
    assert convert.shape_mismatches(got, expected) == [
        "missing params/b/bias", "unexpected params/c/bias",
        "params/a/kernel: weights (3, 2), model (3, 3)"]
