"""The one checkpoint module: layout, atomic writes, and the loader every entry point uses.

Layout of a training run (orbax `CheckpointManager`, one directory per saved step):

    <workdir>/checkpoints/<step>/variables/     {'params', 'batch_stats'}   (StandardSave)
    <workdir>/checkpoints/<step>/opt_state/     {'step', 'opt_state'}       (StandardSave)
    <workdir>/checkpoints/<step>/input_state/process_<i>/   tf.data iterator checkpoint
    <workdir>/final_variables/                  {'params', 'batch_stats'}   (a bare pytree)

Converted weights (`solov2-convert`) are bare pytrees like `final_variables`. Evaluation
and prediction restore only the `variables` item; only training reads the other two.

`load_variables(path)` is the single loader of model variables: it accepts converted
weights, `final_variables`, one step directory, or a training workdir (its newest readable
step). A step that cannot be read (corrupt, truncated, partially deleted) is reported in
one line and the previous step is used instead; training moves such a step aside to
`<workdir>/checkpoints_corrupt/` so it is never overwritten and never rotated in.

Atomic writes: orbax writes each step to a temporary name and renames it when complete;
`save_variables` and `atomic_write_*` do the same for everything else the project writes
(a kill leaves either the old file or the new one, never a truncated one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as logging_std
import math
import os
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from solov2_jax.cli import UserError

VARIABLES, OPT_STATE, INPUT_STATE = "variables", "opt_state", "input_state"
ITEMS = (VARIABLES, OPT_STATE, INPUT_STATE)
_LEGACY_ITEM = "default"  # pre-item layout: one {'step', 'params', 'batch_stats', 'opt_state'}
_CORRUPT_DIR = "checkpoints_corrupt"
# Files orbax writes into a checkpoint it created (any one identifies a checkpoint).
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint",
                  "_sharding", "commit_success.txt")


def _is_orphaned_read_error(record) -> bool:
    """asyncio's 'Task/Future exception was never retrieved' for a tensorstore read of a
    damaged checkpoint: orbax gives up on the first failed array and leaves the others'
    futures unawaited; each is logged at garbage collection with a long traceback that
    buries the one-line report. Only those records are dropped."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None and record.args and isinstance(record.args, dict):
        exc = record.args.get("exception")
    return ("exception was never retrieved" in str(record.msg) and exc is not None
            and ("tensorstore_spec" in str(exc) or "OCDBT database" in str(exc)))


class _DropOrphanedReadErrors(logging_std.Filter):
    def filter(self, record) -> bool:
        return not _is_orphaned_read_error(record)


if not any(isinstance(f, _DropOrphanedReadErrors)
           for f in logging_std.getLogger("asyncio").filters):
    logging_std.getLogger("asyncio").addFilter(_DropOrphanedReadErrors())


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or would overwrite something that is not one."""


# ---------------------------------------------------------------------------------------
# atomic writes and strict JSON


def _tmp_name(path: str, tag: str = "tmp") -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.{tag}-{os.getpid()}-{time.monotonic_ns()}")


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` via a temporary file in the same directory + rename."""
    tmp = _tmp_name(path)
    mode = "wb" if isinstance(data, bytes | bytearray) else "w"
    try:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def json_safe(obj):
    """Non-finite floats -> None and numpy scalars/arrays -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """json.dumps that never emits NaN/Infinity tokens (they become null)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str, obj, **kwargs) -> None:
    atomic_write(path, dumps_strict(obj, **kwargs))


# ---------------------------------------------------------------------------------------
# finiteness


def first_nonfinite(tree) -> str | None:
    """'/'-joined path of the first leaf with a NaN/inf (None when all are finite)."""
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return None


# ---------------------------------------------------------------------------------------
# what is a checkpoint


def is_checkpoint(path: str) -> bool:
    """True for a directory this project (orbax) wrote: converted weights, final variables,
    one step, or a training workdir. Used to refuse overwriting anything else."""
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    if names & set(_ORBAX_MARKERS):
        return True
    if VARIABLES in names and is_checkpoint(os.path.join(path, VARIABLES)):
        return True
    return "checkpoints" in names and bool(_step_dirs(os.path.join(path, "checkpoints")))


def _step_dirs(directory: str) -> list[int]:
    """Steps of the finalised step directories (orbax names them by the bare integer)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------
# bare variables (converted weights, final_variables)


def _restore_pytree(path: str, target=None):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), target)


def save_variables(path: str, variables, *, force: bool = False) -> str:
    """Writes a variables pytree as an orbax checkpoint at `path` (made absolute).

    Atomic: written under a temporary name, then renamed into place. With force, an
    existing `path` is replaced only if it is a checkpoint (see `is_checkpoint`); a user
    directory or file is never deleted.
    """
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)  # orbax rejects relative paths
    if os.path.lexists(path):
        if not force:
            raise CheckpointError(f"{path} exists; pass --force to overwrite")
        if not is_checkpoint(path):
            raise CheckpointError(f"refusing to overwrite {path}: it exists and is not a "
                                  "checkpoint (no orbax files in it); remove it yourself or "
                                  "choose another path")
    variables = jax.tree.map(np.asarray, dict(variables))
    tmp = _tmp_name(path, "partial")
    # Host arrays written by this process alone: in a multi-process run orbax would
    # otherwise wait at a barrier keyed by this (per-process) temporary name for the
    # other processes, forever. Multi-host callers save from one process only.
    solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=solo) as ckptr:
            ckptr.save(tmp, variables)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {path}: {_one_line(e)}") from e
    old = None
    if os.path.lexists(path):
        old = _tmp_name(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _variables_of(tree: dict, path: str) -> dict:
    tree = dict(tree)
    if not {"params", "batch_stats"} <= set(tree):
        raise CheckpointError(f"{path} does not hold model variables (top-level keys: "
                              f"{sorted(tree)}; expected 'params' and 'batch_stats')")
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def _read_step_variables(step_dir: str) -> dict:
    if os.path.isdir(os.path.join(step_dir, VARIABLES)):
        return _variables_of(_restore_pytree(os.path.join(step_dir, VARIABLES)), step_dir)
    return _variables_of(_restore_pytree(os.path.join(step_dir, _LEGACY_ITEM)), step_dir)


def load_variables(path: str, *, as_jax: bool = True) -> dict:
    """{'params', 'batch_stats'} from converted weights, final_variables, a step directory
    or a training workdir (newest readable step). Raises CheckpointError in one line."""
    import jax
    import jax.numpy as jnp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path} (not a directory)")
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(
            os.path.join(path, _CORRUPT_DIR)):
        variables = TrainCheckpoints(path).restore_variables()
    else:
        try:
            if os.path.isdir(os.path.join(path, VARIABLES)) or os.path.isdir(
                    os.path.join(path, _LEGACY_ITEM)):
                variables = _read_step_variables(path)
            else:
                if not is_checkpoint(path):
                    raise CheckpointError(f"{path} is not a checkpoint (no orbax files, no "
                                          "checkpoints/ directory)")
                variables = _restore_pytree(path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(e)}") from e
        variables = dict(variables)
    return jax.tree.map(jnp.asarray, variables) if as_jax else variables


# ---------------------------------------------------------------------------------------
# training checkpoints


def _input_handler_types():
    """(handler class, save args, restore args) for the per-process tf.data state item."""
    global _INPUT_TYPES
    if _INPUT_TYPES is not None:
        return _INPUT_TYPES
    import jax
    import orbax.checkpoint as ocp

    class InputStateHandler(ocp.CheckpointHandler):
        """Moves this process's staged tf.data checkpoint into the item directory."""

        def save(self, directory, args):
            dst = os.path.join(os.fspath(directory), f"process_{jax.process_index()}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if args.source and os.path.isdir(args.source):
                shutil.move(args.source, dst)
            else:
                os.makedirs(dst, exist_ok=True)  # no state: an empty marker directory

        def restore(self, directory, args=None):
            return os.path.join(os.fspath(directory), f"process_{jax.process_index()}")

        def metadata(self, directory):
            return None

        def finalize(self, directory):
            pass

        def close(self):
            pass

    @ocp.args.register_with_handler(InputStateHandler, for_save=True)
    @dataclasses.dataclass
    class InputStateSave(ocp.args.CheckpointArgs):
        source: str = ""

    @ocp.args.register_with_handler(InputStateHandler, for_restore=True)
    @dataclasses.dataclass
    class InputStateRestore(ocp.args.CheckpointArgs):
        pass

    _INPUT_TYPES = (InputStateHandler, InputStateSave, InputStateRestore)
    return _INPUT_TYPES


_INPUT_TYPES = None


@dataclasses.dataclass
class Restored:
    step: int
    state: dict  # {'step', 'params', 'batch_stats', 'opt_state'}
    input_dir: str | None  # this process's tf.data checkpoint directory, if saved


class TrainCheckpoints:
    """The `checkpoints/` directory of a training workdir (see the module docstring)."""

    def __init__(self, workdir: str, max_to_keep: int | None = None):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.max_to_keep = max_to_keep
        self._manager = None

    def steps(self) -> list[int]:
        return _step_dirs(self.directory)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -- reading ------------------------------------------------------------------------

    def _newest_readable(self, read, *, quarantine: bool):
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures = []
        for step in reversed(steps):
            try:
                return step, read(step)
            except Exception as e:  # noqa: BLE001 - any damage means: try the previous one
                import jax

                where = self.step_dir(step)
                quarantine = quarantine and jax.process_index() == 0  # one mover per run
                if quarantine:
                    where = self._quarantine(step)
                older = [s for s in steps if s < step]
                logging.warning("checkpoint step %d is unreadable (%s)%s; %s", step,
                                _one_line(e), f", moved to {where}" if quarantine else "",
                                f"falling back to step {older[-1]}" if older else
                                "no older checkpoint")
                failures.append(f"step {step}: {_one_line(e)}")
        raise CheckpointError(f"no readable checkpoint in {self.directory} ("
                              + "; ".join(failures) + ")")

    def _quarantine(self, step: int) -> str:
        dst = os.path.join(self.workdir, _CORRUPT_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(self.step_dir(step), dst)
        return dst

    def restore_variables(self) -> dict:
        """{'params', 'batch_stats'} of the newest readable step (numpy)."""
        _, variables = self._newest_readable(
            lambda s: _read_step_variables(self.step_dir(s)), quarantine=False)
        return variables

    def restore_latest(self, template: dict) -> Restored | None:
        """Newest readable training state shaped like `template` ({'step', 'params',
        'batch_stats', 'opt_state'}), or None without checkpoints. Unreadable steps are
        moved aside (one warning line each)."""
        if not self.steps():
            return None

        def read(step):
            d = self.step_dir(step)
            if os.path.isdir(os.path.join(d, _LEGACY_ITEM)):
                state = dict(_restore_pytree(os.path.join(d, _LEGACY_ITEM), template))
                return Restored(step, state, None)
            variables = _restore_pytree(os.path.join(d, VARIABLES), {
                "params": template["params"], "batch_stats": template["batch_stats"]})
            opt = _restore_pytree(os.path.join(d, OPT_STATE), {
                "step": template["step"], "opt_state": template["opt_state"]})
            if int(opt["step"]) != step:
                raise CheckpointError(f"holds step {int(opt['step'])}, not {step}")
            bad = first_nonfinite(variables) or first_nonfinite(opt)
            if bad:
                raise CheckpointError(f"non-finite values in {bad}")
            import jax

            inp = os.path.join(d, INPUT_STATE, f"process_{jax.process_index()}")
            return Restored(step, {**variables, **opt},
                            inp if os.path.isdir(inp) and os.listdir(inp) else None)

        try:
            return self._newest_readable(read, quarantine=True)[1]
        except CheckpointError as e:
            if not self.steps():  # every step was unreadable and moved aside
                logging.warning("%s: training starts from step 0", e)
                return None
            raise

    # -- writing ------------------------------------------------------------------------

    def _mngr(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            handler, _, _ = _input_handler_types()
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
            self._manager = ocp.CheckpointManager(
                self.directory, options=opts, item_names=ITEMS,
                item_handlers={INPUT_STATE: handler()})
        return self._manager

    def save(self, step: int, state: dict, input_source: str | None) -> None:
        """Saves {'step', 'params', 'batch_stats', 'opt_state'} (host numpy) as step
        `step`, moving the staged tf.data state `input_source` into it. Refuses (and
        writes nothing) if any value is not finite."""
        import orbax.checkpoint as ocp

        bad = first_nonfinite(state)
        if bad:
            raise CheckpointError(f"refusing to save step {step}: {bad} is not finite")
        _, input_save, _ = _input_handler_types()
        args = ocp.args.Composite(**{
            VARIABLES: ocp.args.StandardSave({"params": state["params"],
                                              "batch_stats": state["batch_stats"]}),
            OPT_STATE: ocp.args.StandardSave({"step": state["step"],
                                              "opt_state": state["opt_state"]}),
            INPUT_STATE: input_save(input_source or ""),
        })
        try:
            self._mngr().save(step, args=args, force=True)
            self._mngr().wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"cannot write checkpoint step {step} to {self.directory}: "
                                  f"{_one_line(e)}") from e

    def close(self) -> None:
        if self._manager is not None:
            with contextlib.suppress(Exception):
                self._manager.close()
            self._manager = None


def restore_train_state(step_dir: str) -> dict:
    """{'step', 'params', 'batch_stats', 'opt_state'} of one step directory (no template:
    nested dicts/lists), for inspection and tests."""
    if os.path.isdir(os.path.join(step_dir, _LEGACY_ITEM)):
        return dict(_restore_pytree(os.path.join(step_dir, _LEGACY_ITEM)))
    return {**dict(_restore_pytree(os.path.join(step_dir, VARIABLES))),
            **dict(_restore_pytree(os.path.join(step_dir, OPT_STATE)))}


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a kill mid-write) is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def truncate_metrics(path: str, last_step: int) -> int:
    """Keeps the rows of steps <= last_step (atomically); returns how many were dropped.
    A resumed run re-trains the steps after its checkpoint and logs them again."""
    if not os.path.exists(path):
        return 0
    rows = read_metrics(path)
    keep = [r for r in rows if isinstance(r, dict) and int(r.get("step", 0)) <= last_step]
    with open(path) as f:
        total = sum(1 for _ in f)
    if total != len(keep):
        atomic_write(path, "".join(dumps_strict(r) + "\n" for r in keep))
    return total - len(keep)


def append_metrics(path: str, row: dict) -> None:
    """Appends one strict-JSON row (NaN/inf written as null)."""
    with open(path, "a") as f:
        f.write(dumps_strict(row) + "\n")


def any_nonfinite(values: dict[str, Any]) -> list[str]:
    """Names of scalar metrics that are NaN or inf."""
    return [k for k, v in values.items()
            if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v).all()]
