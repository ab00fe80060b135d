"""Helpers that drive the real mmdetection 3.3.0 for parity tests.

The parity environment installs the full mmcv 2.1.0 (with its compiled CPU operators,
`mmcv._ext`) from `../shared/wheels/` when that wheel exists, and mmcv-lite otherwise.
mmcv-lite has no `mmcv._ext`; SOLOv2 without DCN never calls a compiled op on CPU, but
`import mmdet.models` imports `mmcv.ops`, which loads `_ext` at import time. Only when the
real `_ext` is missing we register a stand-in whose every attribute raises, so an
accidental call fails loudly; the DCN tests ask for the real one (`require_mmcv_ops`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

import numpy as np
import pytest

CONFIG_DIR = None


class _MissingExt(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _fail(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not available (mmcv-lite)")

        return _fail


def import_mmdet():
    """Imports mmdet (and torch), or skips if the parity extra is absent.

    With SOLOV2_REQUIRE_MMDET=1 (set by `.ci/run`) a missing mmdet fails instead, so CI
    can never pass with the parity tests silently skipped.
    """
    global CONFIG_DIR
    if os.environ.get("SOLOV2_REQUIRE_MMDET") == "1":
        import mmdet  # noqa: F401  (ImportError fails the test)
        import torch  # noqa: F401
    pytest.importorskip("torch")
    pytest.importorskip("mmdet")
    if importlib.util.find_spec("mmcv._ext") is None and "mmcv._ext" not in sys.modules:
        sys.modules["mmcv._ext"] = _MissingExt("mmcv._ext")
    import mmdet
    import torch
    from mmdet.utils import register_all_modules

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # init_weights() logs one INFO block per parameter; keep test output readable.
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)
    register_all_modules()
    CONFIG_DIR = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "solov2")
    return mmdet


def has_real_mmcv_ops() -> bool:
    """Whether the compiled `mmcv._ext` (full mmcv, not mmcv-lite) is importable."""
    if isinstance(sys.modules.get("mmcv._ext"), _MissingExt):
        return False
    return importlib.util.find_spec("mmcv._ext") is not None


def require_mmcv_ops():
    """Skips (or, with SOLOV2_REQUIRE_MMDET=1, fails) unless mmcv's compiled ops exist.

    DCNv2 parity needs `mmcv.ops.ModulatedDeformConv2d`'s real CPU kernel; mmcv-lite only
    has the Python side. Install `../shared/wheels/mmcv-2.1.0-*.whl` (see the Makefile).
    """
    import_mmdet()
    if has_real_mmcv_ops():
        import mmcv._ext  # noqa: F401  (a broken build fails here, loudly)

        return
    message = ("mmcv's compiled operators (mmcv._ext) are missing: mmcv-lite is installed "
               "instead of the full mmcv wheel from ../shared/wheels")
    if os.environ.get("SOLOV2_REQUIRE_MMDET") == "1":
        pytest.fail(message)
    pytest.skip(message)


def load_config(name: str):
    """mmdet's shipped config `<name>.py` with the pretrained-backbone download removed."""
    from mmengine.config import Config

    cfg = Config.fromfile(os.path.join(CONFIG_DIR, f"{name}.py"))
    cfg.model.backbone.init_cfg = None
    return cfg


def build_model(name: str, seed: int = 0, test_cfg: dict | None = None,
                num_classes: int | None = None, init_weights: bool = True):
    """Builds mmdet's SOLOv2 `name` with random weights and randomised BN/GN statistics.

    ResNet's default init makes eval-mode BN ~identity and zeroes the last BN of each
    block, which would make a parity test prove little; every norm layer gets random
    affine parameters and running statistics instead. `init_weights=False` skips mmdet's
    init (slow for the 101-layer models), which `randomise_` overwrites anyway.
    """
    import torch
    from mmdet.registry import MODELS

    cfg = load_config(name)
    if test_cfg:
        cfg.model.test_cfg.update(test_cfg)
    if num_classes is not None:
        cfg.model.mask_head.num_classes = num_classes
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    if init_weights:
        model.init_weights()
    randomise_(model, seed + 1)  # also switches to eval mode
    return model, cfg


def randomise_(module, seed: int = 0) -> None:
    """Random conv weights and BN/GN affine params + running stats, in place; eval mode.

    Default inits make eval-mode BN ~identity and zero the last BN of each block, which
    would let a wrong mapping of those tensors pass unnoticed.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                n = m.weight.shape[0]
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            # mmcv's DCNv2 holds its own weight (not a Conv2d); its `conv_offset` child is a
            # Conv2d, so offsets become O(1) pixels and masks sigmoid(O(1)).
            if isinstance(m, torch.nn.Conv2d) or hasattr(m, "conv_offset"):
                # He-like scale keeps activations O(1) through deep stacks.
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * fan_in**-0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    module.eval()


def to_nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def to_nhwc(t) -> np.ndarray:
    return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))
