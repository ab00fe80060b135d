"""ImageNet ResNe(X)t weights -> a DCN / ResNeXt backbone (`solov2-convert torchvision
--config`), as mmdet initialises its -dcn / x101 models before training."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from solov2_jax import convert
from solov2_jax.models import ResNet, build_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.parity


def imagenet_checkpoint(backbone, path):
    """The backbone's weights as an ImageNet checkpoint: no DCN offsets, plus `fc.*`."""
    import torch

    sd = {k: v for k, v in backbone.state_dict().items() if ".conv_offset." not in k}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save(sd, path)
    return str(path)


def test_imagenet_resnet50_initialises_the_dcn_backbone_like_mmdet(mmcv_ops, tmp_path):
    import torch
    from mmdet.registry import MODELS

    from tests.models.parity_utils import TOL, as_jax, randomise_, rel_err

    name = "solov2-light_r50-dcn_fpn_ms-3x_coco"
    config = str(REPO / "configs" / f"{name}.py")
    torch.manual_seed(0)
    tm = MODELS.build(mmcv_ops.load_config(name).model.backbone)
    randomise_(tm, seed=7)
    pth = imagenet_checkpoint(tm, tmp_path / "resnet50.pth")
    # mmdet loads such a checkpoint into its DCN backbone (strict=False): the offset
    # predictors keep their zero init.
    with torch.no_grad():
        for m in tm.modules():
            if hasattr(m, "conv_offset"):
                m.conv_offset.weight.zero_()
                m.conv_offset.bias.zero_()

    out = tmp_path / "init"
    assert convert.main(["torchvision", "--config", config, "--checkpoint", pth,
                         "--out", str(out)]) == 0
    variables = convert.load_backbone_init(str(out))
    offset = variables["params"]["layer2_0"]["conv2"]["conv_offset"]
    assert not np.any(np.asarray(offset["kernel"])) and not np.any(np.asarray(offset["bias"]))
    # Exactly the backbone of the full model, so train.pretrained accepts it.
    full = convert.variable_shapes(build_model(convert.load_config(config).model))
    backbone = {(c, *p[1:]): s for (c, *p), s in full.items() if p[0] == "backbone"}
    got = {k: tuple(np.shape(v))
           for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    assert got == backbone

    image = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype(np.float32)
    module = ResNet(depth=50, stage_with_dcn=(False, True, True, True),
                    precision=jax.lax.Precision.HIGHEST)
    feats = jax.jit(module.apply)(variables, as_jax(image))
    with torch.no_grad():
        ref = tm(mmcv_ops.to_nchw(image))
    errors = [rel_err(f, r) for f, r in zip(feats, ref, strict=True)]
    assert max(errors) <= TOL, errors


def test_imagenet_resnext101_converts_for_the_x101_config(mmcv_ops, tmp_path):
    """ResNeXt-101 64x4d keys and grouped shapes (mmdet's `ResNeXt`), strictly."""
    from mmdet.registry import MODELS

    name = "solov2_x101-dcn_fpn_ms-3x_coco"
    cfg = mmcv_ops.load_config(name).model.backbone
    cfg.pop("dcn")  # the ImageNet model: plain ResNeXt-101 64x4d
    cfg.pop("stage_with_dcn")
    tm = MODELS.build(cfg)
    pth = imagenet_checkpoint(tm, tmp_path / "resnext101_64x4d.pth")
    variables = convert.convert_torchvision_checkpoint(
        checkpoint=pth, depth=101, groups=64, base_width=4,
        stage_with_dcn=(False, True, True, True))
    conv2 = variables["params"]["layer3_5"]["conv2"]
    np.testing.assert_array_equal(
        conv2["kernel"],
        tm.state_dict()["layer3.5.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    assert conv2["kernel"].shape == (3, 3, 16, 1024)  # width 1024 in 64 groups of 16
    assert not np.any(conv2["conv_offset"]["kernel"])
    # Without the DCN stages the same file converts to the plain ResNeXt, and a ResNet
    # (ungrouped) reading of it fails naming the grouped convs.
    convert.convert_torchvision_checkpoint(checkpoint=pth, depth=101, groups=64)
    with pytest.raises(convert.ConversionError, match="layer1.0.conv2.weight"):
        convert.convert_torchvision_checkpoint(checkpoint=pth, depth=101)
