"""mmdetection 3.3.0's own loops on a COCO-format directory, for end-to-end parity tests.

Nothing here reimplements mmdet: the dataloaders come from `Runner.build_dataloader` with
the config's dataset, pipelines, sampler and collate; inference is `model.test_step`,
metrics are `CocoMetric`, training is `model.loss` / `model.train_step` with an
OptimWrapper built by mmengine from the config's `optim_wrapper`. Only the data location,
the class names, the resize scale and (for training) the flip probability are set.
"""

from __future__ import annotations

import copy

import numpy as np


def _dataset_cfg(dataset, coco_dir: str, stem: str, classes, scale):
    dataset.data_root = coco_dir
    dataset.ann_file = f"annotations/instances_{stem}.json"
    dataset.data_prefix = dict(img=f"{stem}/")
    dataset.metainfo = dict(classes=tuple(classes))
    for t in dataset.pipeline:
        if t["type"] in ("Resize", "RandomChoiceResize"):
            t.clear()
            t.update(type="Resize", scale=tuple(scale), keep_ratio=True)
        if t["type"] == "RandomFlip":
            t["prob"] = 0.0
    return dataset


def dataloader(cfg, which: str, coco_dir: str, stem: str, classes, scale, **overrides):
    """`Runner.build_dataloader(cfg.<which>_dataloader)` on `coco_dir/<stem>`."""
    from mmengine.runner import Runner

    dl = copy.deepcopy(cfg[f"{which}_dataloader"])
    _dataset_cfg(dl.dataset, coco_dir, stem, classes, scale)
    dl.num_workers, dl.persistent_workers = 0, False
    dl.update(overrides)
    return Runner.build_dataloader(dl, seed=0)


def test_loop(model, cfg, coco_dir: str, stem: str, classes, scale, ann_file: str):
    """mmdet's test loop + CocoMetric('segm').

    Returns ({image_id: [{'mask' bool [H, W], 'label', 'score'}]}, metrics), metrics with
    mmdet's keys ('segm_mAP', ...), from its own COCOeval run.
    """
    import torch
    from mmdet.evaluation import CocoMetric

    loader = dataloader(cfg, "test", coco_dir, stem, classes, scale)
    metric = CocoMetric(ann_file=ann_file, metric="segm")
    metric.dataset_meta = loader.dataset.metainfo
    dets = {}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            outputs = model.test_step(batch)
            samples = [o.to_dict() for o in outputs]
            metric.process(batch, samples)
            for o in outputs:
                p = o.pred_instances
                dets[int(o.img_id)] = [
                    {"mask": m, "label": int(lab), "score": float(s)}
                    for m, lab, s in zip(p.masks.numpy().astype(bool), p.labels.numpy(),
                                         p.scores.numpy(), strict=True)]
    metrics = metric.evaluate(len(loader.dataset))
    return dets, metrics


def train_batch(cfg, coco_dir: str, stem: str, classes, scale, batch_size: int = 2):
    """The first batch of mmdet's train dataloader (flip off, fixed scale, no shuffle)."""
    loader = dataloader(cfg, "train", coco_dir, stem, classes, scale, batch_size=batch_size,
                        sampler=dict(type="DefaultSampler", shuffle=False))
    return next(iter(loader))


def losses(model, data) -> dict[str, float]:
    """`model.loss` after the data preprocessor in training mode (as `train_step` does)."""
    import torch

    with torch.no_grad():
        data = model.data_preprocessor(copy.deepcopy(data), training=True)
        out = model.loss(data["inputs"], data["data_samples"])
    return {k: float(v) for k, v in out.items()}


def sgd_step(model, cfg, data):
    """One `model.train_step` with mmengine's OptimWrapper from the config (no schedulers:
    the base lr). Returns ({param name: array}, {param name: momentum buffer or None})."""
    from mmengine.optim import build_optim_wrapper

    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    model.train()
    model.train_step(copy.deepcopy(data), wrapper)
    params, buffers = {}, {}
    for name, p in model.named_parameters():
        params[name] = p.detach().numpy().copy()
        state = wrapper.optimizer.state.get(p, {})
        buf = state.get("momentum_buffer")
        buffers[name] = None if buf is None else buf.numpy().copy()
    return params, buffers


def as_numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
