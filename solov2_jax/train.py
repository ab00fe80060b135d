"""Data-parallel SOLOv2 training (jax.pmap over local devices) with exact resume.

    python -m solov2_jax.train --config configs/tiny.py --workdir /tmp/tiny \\
        [--config.train.max_steps=100] [--eval] [--distributed]

Per step: model -> on-device targets -> focal + dice losses -> gradients w.r.t. the
trainable parameters only (stem + layer1 are never differentiated) -> pmean over devices
(mmdet's DDP averages gradients) -> mmdet's SGD recipe (`optim.py`). BatchNorm statistics
are frozen (norm_eval), so `batch_stats` never change.

Outputs under --workdir: config.json (the resolved config; a resumed run with another
config adds config_step_<step>.json), checkpoints/<step> (orbax:
step, params, batch_stats, opt_state), input_state/process_<i>/step_<step> (tf.data
iterator state), metrics.jsonl and TensorBoard event files (train/loss, ...,
eval/segm_mAP, ...: `tensorboard --logdir <workdir>`), final_variables (orbax
{'params', 'batch_stats'}, loadable with `convert.load_variables`). With --eval the
weights are evaluated every config.train.eval_every_epochs epochs and at the end.

Exact resume. The input stream is deterministic given the seed, but reconstructing it
by skipping N batches would re-decode every consumed image (hours at COCO scale), so the
tf.data iterator itself is checkpointed with `tf.train.Checkpoint(iterator=...)`. The
device prefetch pulls batches ahead of the step being trained, so the iterator state is
written when exactly `s` batches have been pulled, for each step `s` that will be saved
(multiples of checkpoint.every_steps and the last step), and kept only while orbax keeps
step `s`. The state holds tf.data's internal buffers (shuffle buffer of encoded records,
prefetched batches): tens of MB for the demo, up to ~1 GB per host for COCO.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from solov2_jax import backend, cli, models, optim, precision
from solov2_jax.cli import UserError
from solov2_jax.losses import loss_kwargs, solov2_loss
from solov2_jax.structures import DATA_AXIS as AXIS
from solov2_jax.structures import local_mesh
from solov2_jax.targets import batch_targets, target_kwargs

# Batch keys the step uses (image_id etc. stay on the host; int64 would not fit on device).
STEP_KEYS = ("image", "canvas", "gt_boxes", "gt_labels", "gt_masks", "gt_centers",
             "gt_valid")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimiser updates applied
    params: Any
    batch_stats: Any  # frozen BN statistics (never updated)
    opt_state: Any


def _check_same_shapes(what: str, got: dict, want: dict) -> None:
    from solov2_jax.convert import shape_mismatches

    expected = {k: np.shape(v) for k, v in traverse_util.flatten_dict(want).items()}
    bad = shape_mismatches(got, expected)
    if bad:
        raise ValueError(f"{what} does not match the model:\n  " + "\n  ".join(bad[:20]))


def initial_variables(config, model, rng: jax.Array) -> dict:
    """Random init, then config.train.pretrained (backbone) or init_checkpoint (all)."""
    from solov2_jax import convert

    variables = models.init_variables(model, rng)
    if config.train.pretrained:
        bb = convert.load_backbone_init(config.train.pretrained)
        for col in ("params", "batch_stats"):
            _check_same_shapes(f"{config.train.pretrained} [{col}]", bb[col],
                               variables[col]["backbone"])
            variables[col] = {**variables[col], "backbone": jax.tree.map(
                lambda x, ref: jnp.asarray(x, ref.dtype), bb[col], variables[col]["backbone"])}
    if config.train.init_checkpoint:
        full = convert.load_variables(config.train.init_checkpoint)
        _check_same_shapes(config.train.init_checkpoint, full, variables)
        variables = jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), full, variables)
    return variables


def create_train_state(config, rng: jax.Array, *, model, tx) -> TrainState:
    """Unreplicated initial TrainState (step 0)."""
    variables = initial_variables(config, model, rng)
    opt_state = tx.init(variables["params"])
    if precision.name(config) == "fp16":  # + jmp's dynamic loss scale (float32 leaves)
        opt_state = precision.init_loss_scaled(opt_state, config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=opt_state)


def train_step(state: TrainState, batch: dict, *, model, trainable, target_kw: dict,
               loss_kw: dict, tx, schedule,
               loss_scaling: int = 0) -> tuple[TrainState, dict]:
    """One SGD step on this device's [B, ...] batch (inside pmap, axis AXIS).

    batch: structures.TRAIN_KEYS subset STEP_KEYS, e.g. image [B, Hp, Wp, 3]. Returns the
    new state and device-averaged scalar metrics. The model may compute in bf16/fp16
    (its `dtype`); its outputs are cast to float32 before targets and losses. With
    `loss_scaling` = the scale's growth period > 0 (fp16) the optimiser state is
    `precision.init_loss_scaled`'s: the loss is
    scaled by jmp's dynamic loss scale, gradients are unscaled in float32, and a step whose
    gradients overflow on any device changes nothing but the scale (halved) and the
    skipped-step counter (`precision.scaled_update`).
    """
    train_p, frozen_p = optim.partition(state.params, trainable)
    loss_scale, tx_state = (precision.loss_scale_of(state.opt_state, loss_scaling)
                            if loss_scaling
                            else (None, state.opt_state))

    def loss_fn(tp):
        variables = {"params": optim.merge(tp, frozen_p), "batch_stats": state.batch_stats}
        out = precision.widen_floats(model.apply(variables, batch["image"], batch.get("canvas")))
        targets = batch_targets(batch["gt_boxes"], batch["gt_labels"], batch["gt_centers"],
                                batch["gt_valid"], batch.get("canvas"),
                                featmap_hw=out.mask_feats.shape[1:3], **target_kw)
        losses = solov2_loss(out.kernel_preds, out.cls_preds, out.mask_feats, targets,
                             batch["gt_masks"], batch.get("canvas"), **loss_kw)
        loss = losses["loss"] if loss_scale is None else loss_scale.scale(losses["loss"])
        return loss, losses

    grads, losses = jax.grad(loss_fn, has_aux=True)(train_p)
    if loss_scale is not None:
        grads = loss_scale.unscale(grads)  # float32 (the parameters' dtype)
    grads = jax.lax.pmean(grads, AXIS)
    # Frozen leaves get constant zeros (set_to_zero ignores them; XLA folds them away).
    full_grads = optim.merge(grads, jax.tree.map(jnp.zeros_like, frozen_p))
    updates, opt_state = tx.update(full_grads, tx_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # No positive cell anywhere: mmdet's kernel branch got no gradient (None), so torch's
    # SGD skipped it entirely (no weight decay, no momentum step). Do the same.
    no_pos = jax.lax.psum(losses["num_pos"], AXIS) == 0
    params = optim.keep_kernel_branch(no_pos, params, state.params)
    opt_state = optim.keep_kernel_branch(no_pos, opt_state, tx_state)
    grad_norm = optax.global_norm(grads)
    metrics = dict(losses, grad_norm=grad_norm, lr=schedule(state.step))
    if loss_scale is not None:
        # grads are pmean-ed, so every device takes the same decision.
        params, opt_state, extra = precision.scaled_update(
            state.opt_state, loss_scale, grads, (params, opt_state), (state.params, tx_state))
        metrics.update(extra)
        # An overflow that the loss scale handles is not divergence: such a skipped step
        # reports grad_norm 0 (fp16_overflow marks it); at the minimum scale (1) the
        # non-finite norm stays, for the divergence guard.
        metrics["grad_norm"] = jnp.where(
            (extra["fp16_overflow"] > 0) & (loss_scale.loss_scale > 1), 0.0, grad_norm)
    new_state = state.replace(step=state.step + 1, opt_state=opt_state, params=params)
    return new_state, jax.lax.pmean(metrics, AXIS)


def bind_train_step(config, model, tx, schedule, trainable):
    """`train_step(state, batch)` with the config's static arguments bound (not mapped:
    its collectives run over axis AXIS, so call it under pmap or vmap with that name)."""
    return functools.partial(
        train_step, model=model, trainable=trainable, tx=tx, schedule=schedule,
        target_kw={k: v for k, v in target_kwargs(config, (0, 0)).items()
                   if k != "featmap_hw"},
        loss_kw=loss_kwargs(config, AXIS), loss_scaling=precision.loss_scale_period(config))


def make_p_train_step(config, model, tx, schedule, trainable, devices=None):
    """(pmapped train_step donating the state, list of traced per-device image shapes);
    `devices` as jax.pmap's (default: every local device)."""
    traces = []
    step = bind_train_step(config, model, tx, schedule, trainable)
    if int(config.train.get("max_nonfinite_skips", 0)) > 0:  # off by default
        step = skip_nonfinite_updates(step)

    def traced(state, batch):
        traces.append(tuple(batch["image"].shape))  # runs once per compilation
        logging.info("compiling the train step for shape %s (per-device images; program "
                     "%d, one per input shape)", tuple(batch["image"].shape), len(traces))
        return step(state, batch)

    return jax.pmap(traced, axis_name=AXIS, donate_argnums=(0,), devices=devices), traces


def replicate(tree, mesh: jax.sharding.Mesh):
    """One copy per local device ([D, ...]), placed with the same NamedSharding the
    pmapped step returns; a different input sharding would trigger a second compile."""
    d = mesh.devices.size
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    return jax.device_put(jax.tree.map(lambda x: np.broadcast_to(x, (d, *np.shape(x))),
                                       tree), sharding)


def unreplicate(tree):
    """Host numpy copy of device 0's replica."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


class InputState:
    """Staged tf.data iterator checkpoints of this process, one per step to be saved.

    The state of step `s` is written when exactly `s` batches have been pulled (the
    device prefetch runs ahead of training), staged under
    <workdir>/input_state/process_<i>/step_<s>, and moved into the `input_state` item of
    checkpoint `s` when that step is saved (`checkpoint.TrainCheckpoints.save`).
    """

    def __init__(self, workdir: str, process_index: int):
        self.root = os.path.join(workdir, "input_state", f"process_{process_index}")

    def staged(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step}")

    def save(self, iterator, step: int) -> None:
        import tensorflow as tf

        shutil.rmtree(self.staged(step), ignore_errors=True)
        tf.train.Checkpoint(iterator=iterator).write(os.path.join(self.staged(step), "it"))

    @staticmethod
    def restore(iterator, directory: str) -> None:
        """Positions a fresh iterator as saved in `directory` (a checkpoint's item)."""
        import tensorflow as tf

        tf.train.Checkpoint(iterator=iterator).read(
            os.path.join(directory, "it")).assert_consumed()

    def prune(self, keep) -> None:
        """Removes the staged states of steps not in `keep`."""
        keep = {f"step_{s}" for s in keep}
        for name in os.listdir(self.root) if os.path.isdir(self.root) else []:
            if name not in keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def _feed(iterator, start: int, save_at, input_state: InputState):
    """Numpy STEP_KEYS batches; saves the iterator state before pulling batch `s` (i.e.
    after exactly s were pulled) for every s in save_at."""
    step = start
    while True:
        if step in save_at:
            input_state.save(iterator, step)
        batch = next(iterator)
        yield {k: batch[k].numpy() for k in STEP_KEYS}
        step += 1


def prepare_data(config, workdir: str):
    """(TFDS builder, split size) of config.data (or the demo data under workdir)."""
    from solov2_jax.data import prepare

    def build():
        _, builder, summary = prepare.dataset_from_config(config.data, workdir)
        return builder, summary

    # Process 0 builds first; the others then find it prepared (on a shared workdir) or
    # build their own copy, instead of racing on the same files.
    if jax.process_index() == 0:
        builder, summary = build()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("solov2 training data prepared")
    if jax.process_index() != 0:
        builder, summary = build()
    if jax.process_index() == 0:
        logging.info("%s", prepare.format_summary(summary, builder.builder_config.name))
    prepare.check_for_training(builder, summary, config.data, int(config.model.num_classes))
    return builder, builder.info.splits[config.data.train_split].num_examples


def restore_variables(workdir: str) -> dict:
    """{'params', 'batch_stats'} of the newest readable checkpoint in <workdir>/checkpoints
    (via `checkpoint.load_variables`, restoring only the `variables` item); creates
    nothing, so a mistyped --workdir is reported instead of becoming a new directory."""
    from solov2_jax import checkpoint

    workdir = os.path.abspath(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise checkpoint.CheckpointError(f"no training checkpoints in {workdir} (no "
                                         "checkpoints/ directory)")
    return checkpoint.load_variables(workdir)


def _log_metrics(writer, metrics_path: str, step: int, window: list,
                 images_per_s: float) -> None:
    """Window means of the step metrics (lr and fp16 state: last step) as train/<name> to
    the metric writers, and one metrics.jsonl row {"step", <name>: ...}."""
    from solov2_jax import checkpoint

    host = [{k: v[0] for k, v in m.items()} for m in window]
    avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    avg["lr"] = float(host[-1]["lr"])
    for k in ("loss_scale", "fp16_skipped_steps"):  # fp16: values at the last step
        if k in host[-1]:
            avg[k] = float(host[-1][k])
    avg["images_per_s"] = images_per_s
    writer.write_scalars(step, {f"train/{k}": v for k, v in avg.items()})
    overflow = sum(m["num_overflow"] for m in host)
    if overflow > 0:
        logging.warning("step %d: %d positive pairs dropped (raise loss.max_positives)",
                        step, overflow)
    # Strict JSON: a non-finite value is written as null, never as a bare NaN token.
    checkpoint.append_metrics(metrics_path, {"step": step, **avg})


def _log_eval(writer, metrics_path: str, step: int, metrics: dict) -> None:
    """Evaluation results as eval/<name> scalars and a metrics.jsonl row
    {"step", "eval": {...}}."""
    from solov2_jax import checkpoint

    writer.write_scalars(step, {f"eval/{k}": float(v) for k, v in metrics.items()
                                if isinstance(v, int | float | np.number)})
    checkpoint.append_metrics(metrics_path, {"step": step, "eval": metrics})


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm (training stopped, nothing non-finite saved)."""


def _nonfinite(host_metrics: dict) -> list[str]:
    """Metric names whose value (on device 0) is NaN or inf."""
    return [k for k, v in host_metrics.items()
            if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v[0])]


def skip_nonfinite_updates(step_fn):
    """Wraps a (state, batch) -> (state, metrics) step (inside pmap): when the loss or the
    gradient norm is not finite, the parameters and optimiser state stay as they were
    (the step counter still advances) and metrics['skipped'] is 1."""
    def step(state, batch):
        new, metrics = step_fn(state, batch)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                          opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
        return new, dict(metrics, skipped=1.0 - ok.astype(jnp.float32))

    return step


def build_training(config, num_images: int, global_batch: int):
    """(model, tx, schedule, trainable mask, steps_per_epoch, total_steps) of a config."""
    spe = optim.steps_per_epoch(num_images, global_batch)
    total = int(config.train.max_steps) if config.train.max_steps > 0 else \
        int(config.optim.epochs) * spe
    schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch=spe,
                                            global_batch=global_batch)
    model = models.build_model(config.model, dtype=precision.compute_dtype(config))
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))
    trainable = models.trainable_mask(shapes["params"], int(config.model.frozen_stages))
    tx = optim.build_optimizer(config.optim, schedule, trainable)
    return model, tx, schedule, trainable, spe, total


def train_and_evaluate(config, workdir: str, *, evaluator=None) -> dict:
    """Trains (resuming from <workdir>/checkpoints) and returns the final variables.

    evaluator(variables, step) -> {name: value} (built by the entry point; the trainer
    does not import the evaluation code) is called every `train.eval_every_epochs` epochs
    (0: never during training) and on the final variables; its numbers go to the metric
    writers as eval/<name> and to metrics.jsonl as {"step", "eval": {...}}.

    Reporting: <workdir>/config.json (the resolved config), TensorBoard event files and
    the log (clu's default metric writers: train/loss, train/lr, ..., eval/segm_mAP, ...),
    metrics.jsonl (the same train numbers, one row per train.log_every steps), and a
    progress line with images/s excluding compilation and an ETA (`reporting.Progress`).

    Divergence guard: the metrics of every step are checked for NaN/inf at each logging
    step and before each checkpoint save; a non-finite loss or gradient norm raises
    `TrainingDiverged` naming the first such step and the last finite checkpoint, before
    anything of that step is saved (with train.max_nonfinite_skips = N > 0, up to N such
    steps are skipped on device instead). Checkpoints, final_variables and metrics.jsonl
    therefore never hold NaN.
    """
    from clu import metric_writers

    from solov2_jax import checkpoint, reporting
    from solov2_jax import config as config_lib
    from solov2_jax.data import pipeline

    config_lib.check_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    mesh = local_mesh()
    global_batch = int(config.data.per_device_batch) * jax.device_count()
    builder, _ = prepare_data(config, workdir)
    num_images = pipeline.count_train_images(builder, config.data)
    model, tx, schedule, trainable, spe, total = build_training(config, num_images,
                                                                global_batch)
    logging.info("initialising the model variables (%s)", config.train.pretrained
                 or config.train.init_checkpoint or "random")
    state = create_train_state(config, jax.random.PRNGKey(int(config.train.seed)),
                               model=model, tx=tx)
    state = dict(vars(jax.tree.map(np.asarray, state)))  # orbax (de)serialises plain dicts

    ckpts = checkpoint.TrainCheckpoints(workdir, int(config.checkpoint.max_to_keep))
    every = int(config.checkpoint.every_steps)
    input_state = InputState(workdir, jax.process_index())
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def dataset():
        # A fresh dataset object each time: a second iterator of the same object would
        # reshuffle differently (its shuffle seed generator has advanced).
        return pipeline.train_dataset(
            builder, config.data, num_local_devices=jax.local_device_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            seed=int(config.data.seed))

    restored = ckpts.restore_latest(state)
    iterator, start = iter(dataset()), 0
    if restored is not None:
        start, state = restored.step, restored.state
        try:
            if restored.input_dir is None:
                raise FileNotFoundError("not saved with the checkpoint")
            input_state.restore(iterator, restored.input_dir)
        except Exception as e:  # noqa: BLE001 - any damage: replay instead
            logging.warning("input state of step %d unusable (%s): replaying the first %d "
                            "batches from the start of the input stream (exact: the same "
                            "batches an uninterrupted run sees, at the cost of decoding "
                            "them again)", start, checkpoint._one_line(e), start)
            iterator = iter(dataset())
            for _ in range(start):
                next(iterator)
        logging.info("resumed from step %d", start)
    eval_every = int(config.train.eval_every_epochs) * spe if evaluator is not None else 0
    if lead:
        logging.info("config: %s", reporting.write_config(config, workdir, start))
        dropped = checkpoint.truncate_metrics(metrics_path, start)
        if dropped:
            logging.info("metrics.jsonl: dropped %d rows after step %d (re-trained now)",
                         dropped, start)
        logging.info("%d train images, global batch %d, %d steps/epoch, training steps "
                     "%d -> %d%s", num_images, global_batch, spe, start, total,
                     f", evaluating every {eval_every} steps" if eval_every > 0 else "")
    save_at = {s for s in range(start + 1, total + 1) if s % every == 0 or s == total}
    batches = pipeline.prefetch_to_device(_feed(iterator, start, save_at, input_state), 2)
    p_step, traces = make_p_train_step(config, model, tx, schedule, trainable)
    rstate = replicate(TrainState(**state), mesh)
    max_skips = int(config.train.get("max_nonfinite_skips", 0))
    skipped = []  # steps skipped for non-finite values (only with max_skips > 0)
    # TensorBoard event files in the workdir (lead only) + the log (every process).
    writer = metric_writers.create_default_writer(workdir, just_logging=not lead)

    def check(entries, log_step):
        """Raises TrainingDiverged for the first non-finite step of entries [(step, m)]."""
        for s, m in entries:
            bad = _nonfinite(m)
            if bad and max_skips > 0 and float(m["skipped"][0]) > 0:
                skipped.append(s)
                logging.warning("step %d: non-finite %s; update skipped (%d of at most %d)",
                                s, "/".join(bad), len(skipped), max_skips)
                if len(skipped) <= max_skips:
                    continue
            elif not bad:
                continue
            saved = ckpts.steps()
            last = (f"the last finite checkpoint is step {saved[-1]} "
                    f"({ckpts.step_dir(saved[-1])})" if saved else "no checkpoint was saved")
            values = ", ".join(f"{k}={float(m[k][0])}" for k in ("loss", "grad_norm"))
            if skipped:
                values += f"; {len(skipped)} non-finite steps skipped before"
            raise TrainingDiverged(
                f"training diverged: non-finite {'/'.join(bad)} at step {s} ({values}; "
                f"checked at step {log_step}). "
                f"Stopped without saving anything from step {s} on; {last}. Lower "
                "optim.lr, or set train.max_nonfinite_skips to skip a few such steps.")

    def run_evaluator(step, variables):
        t = time.perf_counter()
        logging.info("evaluating step %d", step)
        metrics = evaluator(variables, step)
        if lead:
            _log_eval(writer, metrics_path, step, metrics)
        progress.excluded(time.perf_counter() - t)

    progress = reporting.Progress(start, total, global_batch)
    window, unchecked, step = [], [], start
    try:
        while step < total:
            try:
                batch = next(batches)
            except StopIteration:
                raise UserError(f"the input pipeline of split '{config.data.train_split}' "
                                "yields no batch: no image is left after filtering "
                                "(filter_empty_gt, min_size)") from None
            compiled, t = len(traces), time.perf_counter()
            rstate, metrics = p_step(rstate, batch)
            if len(traces) > compiled:  # this call traced and compiled a new shape
                progress.excluded(time.perf_counter() - t)
            step += 1
            window.append(metrics)
            unchecked.append((step, metrics))
            log_now = step % int(config.train.log_every) == 0 or step == total
            if log_now or step in save_at:
                # Waits for the steps (so images/s is honest) and checks every one of them
                # before anything below is saved.
                host = jax.device_get([m for _, m in unchecked])
                try:
                    check(zip([s for s, _ in unchecked], host, strict=True), step)
                except TrainingDiverged:
                    if lead:
                        _log_metrics(writer, metrics_path, step, jax.device_get(window),
                                     progress.report(step))
                    raise
                unchecked = []
            if log_now:
                window = jax.device_get(window)
                images_per_s = progress.report(step)
                if lead:
                    _log_metrics(writer, metrics_path, step, window, images_per_s)
                window = []
            if step in save_at:
                staged = input_state.staged(step)
                ckpts.save(step, dict(vars(unreplicate(rstate))),
                           staged if os.path.isdir(staged) else None)
                input_state.prune({s for s in save_at if s > step})
            if eval_every > 0 and step % eval_every == 0 and step < total:
                current = unreplicate(rstate)
                run_evaluator(step, {"params": current.params,
                                     "batch_stats": current.batch_stats})
        if lead and traces:
            logging.info("train step compiled %d times: %s", len(traces), traces)
        final = unreplicate(rstate)
    finally:
        ckpts.close()
        input_state.prune(set())  # staged states of steps that will not be saved now
        writer.flush()
    variables = {"params": final.params, "batch_stats": final.batch_stats}
    bad = checkpoint.first_nonfinite(variables)
    if bad:  # unreachable while the guard above holds; never overwrite a good model
        raise TrainingDiverged(f"final variables hold non-finite values ({bad}); "
                               "final_variables was not written")
    if lead:  # every process holds the same replicated variables; one writes them
        checkpoint.save_variables(os.path.join(workdir, "final_variables"), variables,
                                  force=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("solov2 final_variables written")
    if evaluator is not None:
        run_evaluator(step, variables)
    writer.close()
    return variables


def _define_flags(fv, argv):
    from absl import flags

    cli.define_config_flag(fv, argv)  # packaged name or path
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and demo data go here",
                        flag_values=fv)
    flags.DEFINE_bool("eval", False, "evaluate (solov2_jax.evaluate) every "
                      "config.train.eval_every_epochs epochs (0: never during training) and "
                      "the final weights", flag_values=fv)
    backend.add_flag(fv)
    backend.add_distributed_flags(fv)


def main(argv: list[str]) -> int:
    """CLI (callable in-process); returns the exit status. `--help` lists the flags; user
    errors print one `solov2-train: error: ...` line (`cli.absl_main`)."""
    return cli.absl_main("solov2-train", __doc__, _define_flags, _execute, argv)


def _execute(fv, inputs) -> int:
    from absl import flags

    from solov2_jax import reporting

    config = fv.config
    if config is None or not fv.workdir:
        raise flags.Error("--config and --workdir are required")
    reporting.setup()  # quiet TF/TFDS/orbax before TensorFlow is imported
    plan = backend.configure(backend.requested(fv, config))  # before JAX initialises
    backend.initialize_distributed(fv)
    backend.start(plan)  # start-up report: backend, devices, processes
    evaluator = None
    if fv.eval:
        # The entry point builds the evaluator; the trainer never imports evaluation code.
        from solov2_jax import evaluate

        workdir = os.path.abspath(fv.workdir)

        def evaluator(variables, step):
            return evaluate.evaluate(config, variables, workdir=workdir)

    train_and_evaluate(config, fv.workdir, evaluator=evaluator)
    return 0


def run() -> None:
    """Console-script entry point (`solov2-train`)."""
    cli.console_entry(main)


if __name__ == "__main__":
    run()
