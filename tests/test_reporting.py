"""Console set-up and progress reporting (solov2_jax/reporting.py), without training.

The end-to-end check (a training run's console, TensorBoard events, config.json) is
tests/test_train.py::test_cli_reports_progress_tensorboard_and_a_quiet_console.
"""

import json
import logging as logging_std
import os
import re
import subprocess
import sys

import pytest
from absl import logging

from solov2_jax import reporting


def _record(path: str, level: int, msg: str, name: str = "absl") -> logging_std.LogRecord:
    return logging_std.LogRecord(name, level, path, 1, msg, None, None)


def test_filter_drops_library_info_and_deprecations_keeps_the_rest():
    import tensorflow_datasets

    tfds_file = os.path.join(os.path.dirname(tensorflow_datasets.__file__), "core", "x.py")
    ours = os.path.join(os.path.dirname(reporting.__file__), "train.py")
    f = reporting.QuietLibraries()
    assert not f.filter(_record(tfds_file, logging_std.INFO, "Constructing tf.data.Dataset"))
    assert not f.filter(_record(tfds_file, logging_std.WARNING, "`x.dtype` is deprecated"))
    assert f.filter(_record(tfds_file, logging_std.WARNING, "split 'val' is empty"))
    assert f.filter(_record(tfds_file, logging_std.ERROR, "deprecated but failed"))
    # TF's python logger: by logger name, wherever the file is.
    assert not f.filter(_record("/any/functional_saver.py", logging_std.INFO,
                                "Sharding callback duration", name="tensorflow"))
    # Ours, at any level, and other libraries' INFO (clu's metric log) stay.
    assert f.filter(_record(ours, logging_std.DEBUG, "step 4/8"))
    assert f.filter(_record("/site-packages/clu/metric_writers/logging_writer.py",
                            logging_std.INFO, "[4] train/loss=1"))


def test_progress_excludes_compile_time_and_gives_an_eta(monkeypatch):
    clock = iter([100.0, 160.0, 170.0])  # start; 60 s later (50 s compiling); 10 s later
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    lines = []
    monkeypatch.setattr(reporting.logging, "info", lambda fmt, *a: lines.append(fmt % a))
    p = reporting.Progress(start=0, total=100, images_per_step=8)
    p.excluded(50.0)
    assert p.report(10) == pytest.approx(10 * 8 / 10.0)  # 10 steps in 60 - 50 s
    assert lines[-1] == "step 10/100 (10.0%), 8 img/s, ETA 1m30s, 50s compiling/evaluating " \
        "so far"
    assert p.report(30) == pytest.approx(20 * 8 / 10.0)  # next window: nothing excluded
    assert re.match(r"step 30/100 \(30\.0%\), 16 img/s, ETA 35s", lines[-1])


def test_format_seconds():
    assert [reporting.format_seconds(s) for s in (0, 59.4, 61, 3599, 3600 * 2 + 300)] == [
        "0s", "59s", "1m01s", "59m59s", "2h05m"]


def test_captured_stdout_goes_to_the_debug_log(monkeypatch):
    logged = []
    monkeypatch.setattr(reporting.logging, "debug", lambda fmt, *a: logged.append(fmt % a))
    with reporting.captured_stdout("pycocotools"):
        print("creating index...")
    assert logged == ["pycocotools printed:\ncreating index..."]


def test_write_config_round_trips(tmp_path):
    from ml_collections import ConfigDict

    from configs import tiny

    config = tiny.get_config()
    path = reporting.write_config(config, str(tmp_path))
    loaded = json.load(open(path))
    assert loaded == json.loads(config.to_json_best_effort())
    again = ConfigDict(loaded)
    assert again.optim.lr == config.optim.lr
    assert [list(s) for s in config.data.train_scales] == again.data.train_scales

    # A resume with the same config writes nothing; with another, a second file.
    assert reporting.write_config(config, str(tmp_path), 40) == path
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    config.optim.lr = 0.5
    other = reporting.write_config(config, str(tmp_path), 40)
    assert other == str(tmp_path / "config_step_40.json")
    assert json.load(open(other))["optim"]["lr"] == 0.5
    assert json.load(open(path)) == loaded  # the first run's config is kept


def test_setup_silences_tensorflow_at_import():
    """A fresh process: setup() before TensorFlow is imported leaves stderr empty of TF's
    C++ notices (oneDNN) and hides GPUs from TF; the env defaults yield to the user's."""
    code = ("import os; from solov2_jax import reporting; reporting.setup();"
            "import tensorflow as tf; tf.constant(1) + 1;"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], tf.config.get_visible_devices('GPU'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["2", "[]"]
    assert "oneDNN" not in out.stderr and "absl::InitializeLog" not in out.stderr, out.stderr
    env["TF_CPP_MIN_LOG_LEVEL"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split()[0] == "1"


def test_setup_is_idempotent():
    reporting.setup(tensorflow=False)
    reporting.setup(tensorflow=False)
    assert logging.get_absl_handler().filters.count(reporting._FILTER) == 1
