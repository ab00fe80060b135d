"""What a run shows on the console: one set-up for every entry point, and training progress.

`setup()` is called by train / evaluate (and may be by predict / export) before
TensorFlow is imported. It silences, at the source, what TensorFlow, TFDS and orbax
print for their own developers:

- TF's C++ INFO/WARNING lines (`TF_CPP_MIN_LOG_LEVEL=2`, errors stay) and oneDNN
  (`TF_ENABLE_ONEDNN_OPTS=0`: TF only runs the input pipeline here, whose batches are
  bit-identical without it; with it TF prints a notice at import and a uint8 fallback
  *error* at the first resize). Both only as defaults: a value in the environment wins.
- TensorFlow sees no GPU (`tf.config.set_visible_devices([], "GPU")`): it must not take
  accelerator memory from JAX.
- INFO records of tensorflow, tensorflow_datasets, orbax and jax (one line per dataset
  construction, per file written, per checkpoint saved, per cache reset: "Sharding
  callback duration", "Constructing tf.data.Dataset", ...) and their deprecation warnings
  (about their own internals, nothing a user can act on) are dropped by a filter on
  absl's log handler. Their other warnings and all errors stay, and everything
  (including `--verbosity=1` debug lines) of this package and of clu's metric log stays.
- TFDS progress bars are off (`tfds.disable_progress_bar`); prints that libraries make
  unconditionally (TFDS' "Downloading and preparing dataset", pycocotools' "creating
  index...") are captured with `captured_stdout` and logged at debug level.

`Progress` turns the step counter into "step 40/960 (4.2%), 11.3 img/s, ETA 3m10s", with
the time of compilations and evaluations excluded from the rate.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging as logging_std
import os
import time

from absl import logging

# Environment defaults that must be in place before TensorFlow is imported.
TF_ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
# Packages whose INFO lines and deprecation warnings are not shown.
QUIET_PACKAGES = ("tensorflow", "tensorflow_datasets", "orbax", "jax")


def _package_dirs(names) -> tuple[str, ...]:
    """Source directories (with a trailing separator) of the installed packages `names`,
    found without importing them."""
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for d in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.realpath(d), ""))
    return tuple(dirs)


class QuietLibraries(logging_std.Filter):
    """Drops records from QUIET_PACKAGES below WARNING, and their deprecation warnings."""

    def __init__(self):
        super().__init__()
        self._dirs = _package_dirs(QUIET_PACKAGES)

    def filter(self, record) -> bool:
        path = os.path.realpath(record.pathname) if record.pathname else ""
        if not (record.name == "tensorflow" or path.startswith(self._dirs)):
            return True
        if record.levelno >= logging_std.ERROR:
            return True
        return (record.levelno >= logging_std.WARNING
                and "deprecat" not in str(record.msg).lower())


_FILTER = QuietLibraries()


def setup(*, tensorflow: bool = True) -> None:
    """Console set-up of an entry point; idempotent. Call it before TensorFlow is
    imported (TF reads its log level once); with tensorflow=True TF is imported here,
    hidden from GPUs and its progress bars turned off."""
    for key, value in TF_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # On absl's handler (every record that reaches the console, child loggers such as
    # jax._src.* included) and on the loggers TF and TFDS log to directly (for handlers
    # other than absl's, e.g. when absl's app is not running).
    for target in (logging.get_absl_handler(), logging_std.getLogger("absl"),
                   logging_std.getLogger("tensorflow")):
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
    if tensorflow:
        import tensorflow as tf
        import tensorflow_datasets as tfds

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices; nothing to take back
            pass
        tfds.disable_progress_bar()


@contextlib.contextmanager
def captured_stdout(what: str):
    """Runs the block with sys.stdout captured; what it printed is logged at debug level
    (shown with --verbosity=1). For libraries that print unconditionally."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        if buffer.getvalue().strip():
            logging.debug("%s printed:\n%s", what, buffer.getvalue().rstrip())


def format_seconds(seconds: float) -> str:
    """12s, 5m41s, 2h05m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Rate and ETA of training steps, with compile and evaluation time excluded.

    The loop calls `excluded(seconds)` for time that is not training throughput (a
    step call that compiled, an evaluation) and `report(step)` after it waited for
    the steps of the window; `report` logs "step s/total (p%), x img/s, ETA t" and
    returns the window's images/s. The ETA is the remaining steps at the rate of the
    last window (future compiles and evaluations not included).
    """

    def __init__(self, start: int, total: int, images_per_step: int):
        self.start, self.total, self.images_per_step = start, total, images_per_step
        self._t0, self._step0, self._excluded = time.perf_counter(), start, 0.0
        self.excluded_total = 0.0

    def excluded(self, seconds: float) -> None:
        self._excluded += seconds
        self.excluded_total += seconds

    def report(self, step: int) -> float:
        now = time.perf_counter()
        seconds = max(now - self._t0 - self._excluded, 1e-9)
        steps = step - self._step0
        images_per_s = steps * self.images_per_step / seconds
        eta = (self.total - step) * seconds / max(steps, 1)
        note = (f", {format_seconds(self.excluded_total)} compiling/evaluating so far"
                if self.excluded_total >= 1 else "")
        logging.info("step %d/%d (%.1f%%), %.3g img/s, ETA %s%s", step, self.total,
                     100.0 * step / max(self.total, 1), images_per_s,
                     format_seconds(eta), note)
        self._t0, self._step0, self._excluded = now, step, 0.0
        return images_per_s


def write_config(config, workdir: str, step: int = 0) -> str:
    """Writes the resolved config as <workdir>/config.json (atomically) and returns its
    path. Nothing is overwritten: a run resumed at `step` with a config that differs
    from config.json (the first run's) writes config_step_<step>.json, with a warning;
    with the same config nothing is written."""
    from solov2_jax.checkpoint import atomic_write

    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
        path = os.path.join(workdir, f"config_step_{step}.json")
        logging.warning("the config differs from %s/config.json (the first run's); this "
                        "run's (from step %d) is written to %s", workdir, step, path)
    atomic_write(path, text)
    return path
