"""Configs: every variant loads, overrides work, and hyper-parameters equal mmdet's own."""

import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMDET_VARIANTS = [
    "solov2_r50_fpn_1x_coco",
    "solov2_r50_fpn_ms-3x_coco",
    "solov2_r101_fpn_ms-3x_coco",
    "solov2-light_r18_fpn_ms-3x_coco",
    "solov2-light_r34_fpn_ms-3x_coco",
    "solov2-light_r50_fpn_ms-3x_coco",
    "solov2_r101-dcn_fpn_ms-3x_coco",
    "solov2_x101-dcn_fpn_ms-3x_coco",
    "solov2-light_r50-dcn_fpn_ms-3x_coco",
]


def load(name, *overrides):
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', name + '.py')}", *overrides]
    fv = flags.FlagValues()
    # config_flags discovers `--config.a.b=` overrides from argv when the flag is defined.
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_every_config_file_loads():
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs/*.py"))
                   if not os.path.basename(p).startswith("_"))  # not __init__.py
    assert set(MMDET_VARIANTS) | {"tiny"} <= set(names)
    for name in names:
        cfg = load(name)
        assert set(cfg.keys()) >= {"model", "loss", "test", "data", "optim", "train"}


def test_command_line_overrides():
    cfg = load("solov2_r50_fpn_1x_coco", "--config.optim.lr=0.02", "--config.test.score_thr=0.3")
    assert cfg.optim.lr == 0.02 and cfg.test.score_thr == 0.3
    # A typo in an override must fail loudly, naming the field.
    with pytest.raises(AttributeError, match="no_such_field"):
        load("solov2_r50_fpn_1x_coco", "--config.optim.no_such_field=1")


def _scheduler(mm, typ):
    return next(s for s in mm.param_scheduler if s["type"] == typ)


@pytest.mark.parity
@pytest.mark.parametrize("name", MMDET_VARIANTS)
def test_hyperparameters_equal_mmdet(mmdet, name):
    mm = mmdet.load_config(name)
    cfg = load(name)
    head = mm.model.mask_head
    m = cfg.model
    bb = mm.model.backbone
    assert m.depth == bb.depth
    # ResNeXt (groups, base_width) and DCNv2 placement.
    assert bb.type == ("ResNeXt" if m.groups > 1 else "ResNet")
    if bb.type == "ResNeXt":
        assert (m.groups, m.base_width) == (bb.groups, bb.base_width)
    dcn = bb.get("dcn")
    if dcn is None:
        assert not any(m.stage_with_dcn)
    else:
        assert dict(dcn) == {"type": "DCNv2", "deformable_groups": 1,
                             "fallback_on_stride": False}
        assert list(m.stage_with_dcn) == list(bb.stage_with_dcn)
    head_dcn = mm.model.mask_head.get("dcn_cfg")
    if head_dcn is None:
        assert m.head_dcn == "none"
    else:
        assert dict(head_dcn) == {"type": "DCNv2"}
        assert m.head_dcn == ("all" if mm.model.mask_head.dcn_apply_to_all_conv else "last")
    mf_conv = mm.model.mask_head.mask_feature_head.get("conv_cfg")
    assert m.mask_feature_dcn == (mf_conv is not None)
    assert mf_conv is None or dict(mf_conv) == {"type": "DCNv2"}
    assert m.frozen_stages == mm.model.backbone.frozen_stages
    assert list(m.backbone_channels) == list(mm.model.neck.in_channels)
    assert m.fpn_channels == mm.model.neck.out_channels == head.in_channels
    assert m.fpn_num_outs == mm.model.neck.num_outs
    assert m.num_classes == head.num_classes
    assert m.feat_channels == head.feat_channels
    assert m.stacked_convs == head.stacked_convs
    assert list(m.strides) == list(head.strides)
    assert [list(r) for r in m.scale_ranges] == [list(r) for r in head.scale_ranges]
    assert m.pos_scale == head.pos_scale
    assert list(m.num_grids) == list(head.num_grids)
    assert m.cls_down_index == head.cls_down_index
    assert m.gn_groups == head.mask_feature_head.norm_cfg.num_groups
    mf = head.mask_feature_head
    assert (m.mask_feature_channels, m.mask_out_channels, m.mask_stride) == (
        mf.feat_channels, mf.out_channels, mf.mask_stride)
    assert mf.start_level == 0 and mf.end_level == 3

    assert cfg.loss.dice_weight == head.loss_mask.loss_weight
    assert cfg.loss.focal_gamma == head.loss_cls.gamma
    assert cfg.loss.focal_alpha == head.loss_cls.alpha
    assert cfg.loss.focal_weight == head.loss_cls.loss_weight
    for k, v in mm.model.test_cfg.items():
        assert cfg.test[k] == v, k

    dp = mm.model.data_preprocessor
    assert list(cfg.data.mean) == list(dp.mean) and list(cfg.data.std) == list(dp.std)
    assert cfg.data.pad_size_divisor == dp.pad_size_divisor
    resize = mm.train_pipeline[2]
    scales = resize.get("scales") or [resize["scale"]]
    assert [tuple(s) for s in cfg.data.train_scales] == [tuple(s) for s in scales]
    test_resize = next(t for t in mm.test_pipeline if t["type"] == "Resize")
    assert sorted(cfg.data.test_scale) == sorted(test_resize["scale"])
    flip = next(t for t in mm.train_pipeline if t["type"] == "RandomFlip")
    assert cfg.data.flip_prob == flip["prob"]
    fc = mm.train_dataloader.dataset.filter_cfg
    assert (cfg.data.filter_empty_gt, cfg.data.min_size) == (fc.filter_empty_gt, fc.min_size)
    assert cfg.data.per_device_batch * 8 == mm.auto_scale_lr.base_batch_size

    opt = mm.optim_wrapper.optimizer
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        opt.lr, opt.momentum, opt.weight_decay)
    assert cfg.optim.grad_clip_norm == mm.optim_wrapper.clip_grad.max_norm
    assert cfg.optim.epochs == mm.train_cfg.max_epochs
    warm = _scheduler(mm, "LinearLR")
    assert cfg.optim.warmup_iters == warm["end"]
    assert cfg.optim.warmup_ratio == pytest.approx(warm["start_factor"])
    steps = _scheduler(mm, "MultiStepLR")
    assert list(cfg.optim.milestones) == list(steps["milestones"])
    assert cfg.optim.gamma == steps["gamma"]
