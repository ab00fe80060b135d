"""Fault suite (issue 9): every way a run could silently go wrong, and what happens now.

Training runs use the tiny config on 8 forced CPU devices with 2-4 steps; everything
else checks data, checkpoints and command lines directly. Messages are asserted by
content.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from solov2_jax import checkpoint, cli, convert, train
from solov2_jax.data import coco_builder, prepare
from tests.data.test_coco_builder import CATS, _jpeg, _poly

ROOT = Path(__file__).resolve().parents[1]


# Persistent XLA cache (tests/conftest.py): every run below compiles the same two programs.
pytestmark = pytest.mark.usefixtures("module_compile_cache")


@pytest.fixture(scope="module")
def demo(demo):
    """The root of conftest's demo data (root/demo, root/tfds); this module needs no builder."""
    return demo[0]


def _argv(root, workdir, max_steps, *extra):
    return ["solov2-train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.coco_dir={root / 'demo'}", f"--config.data.data_dir={root / 'tfds'}",
            "--config.data.per_device_batch=1", "--config.data.train_scales=((160, 128),)",
            "--config.optim.warmup_iters=3", "--config.optim.epochs=100",
            "--config.optim.milestones=(90,)", "--config.optim.lr=0.01",
            "--config.train.log_every=2", "--config.checkpoint.every_steps=2",
            f"--config.train.max_steps={max_steps}", *extra]


def _train(root, workdir, max_steps, *extra, capsys=None):
    """(exit status, stderr) of an in-process training run."""
    if capsys is not None:
        capsys.readouterr()
    rc = train.main(_argv(root, workdir, max_steps, *extra))
    return rc, (capsys.readouterr().err if capsys is not None else "")


def _tree_bytes(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def _strict_rows(path):
    def no_constants(name):
        raise AssertionError(f"non-strict JSON token {name} in {path}")

    return [json.loads(line, parse_constant=no_constants) for line in open(path)]


def _assert_equal_states(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """A good, uninterrupted 4-step run (checkpoints 2 and 4, final_variables)."""
    base = tmp_path_factory.mktemp("runs")
    assert _train(demo, base / "straight4", 4)[0] == 0
    return base


# -- 1: divergence ---------------------------------------------------------------------


def test_divergence_on_a_fresh_run_stops_and_saves_nothing_nonfinite(demo, tmp_path, capsys):
    wd = tmp_path / "nan"
    rc, err = _train(demo, wd, 4, "--config.optim.lr=1e6", capsys=capsys)
    assert rc == 1, err
    assert "solov2-train: error: training diverged: non-finite" in err
    assert "Traceback" not in err
    first = int(err.split(" at step ")[1].split()[0])
    rows = _strict_rows(wd / "metrics.jsonl")  # strict JSON: NaN written as null
    assert any(r["loss"] is None or r["grad_norm"] is None for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] < first)
    assert not (wd / "final_variables").exists()
    saved = checkpoint.TrainCheckpoints(wd).steps()
    assert all(s < first for s in saved)
    for s in saved:  # whatever was saved before the divergence is finite
        assert checkpoint.first_nonfinite(
            checkpoint.restore_train_state(str(wd / "checkpoints" / str(s)))) is None
    last = f"the last finite checkpoint is step {saved[-1]}" if saved else \
        "no checkpoint was saved"
    assert last in err
    assert not os.listdir(wd / "input_state" / "process_0")  # no staged leftovers


def test_divergence_on_a_resumed_run_keeps_the_good_model(runs, demo, tmp_path, capsys):
    wd = tmp_path / "resumed"
    shutil.copytree(runs / "straight4", wd)
    before = {k: v for k, v in _tree_bytes(wd).items() if k != "metrics.jsonl"}
    rc, err = _train(demo, wd, 8, "--config.optim.lr=1e6", capsys=capsys)
    assert rc == 1 and "training diverged" in err, err
    after = _tree_bytes(wd)
    # Checkpoint 2 and final_variables: byte for byte what the good run wrote.
    assert {k: after.get(k) for k in before} == before
    for s in checkpoint.TrainCheckpoints(wd).steps():
        assert checkpoint.first_nonfinite(
            checkpoint.restore_train_state(str(wd / "checkpoints" / str(s)))) is None
    _strict_rows(wd / "metrics.jsonl")


def test_skip_nonfinite_updates_keeps_the_previous_state():
    state = train.TrainState(step=np.int32(3), params={"w": np.ones(2, np.float32)},
                             batch_stats={}, opt_state={"m": np.zeros(2, np.float32)})

    def step(s, batch):
        new = s.replace(step=s.step + 1, params={"w": s.params["w"] * batch},
                        opt_state={"m": s.opt_state["m"] + batch})
        return new, {"loss": batch * 1.0, "grad_norm": np.float32(1.0)}

    guarded = jax.jit(train.skip_nonfinite_updates(step))
    good, m = guarded(state, np.float32(2.0))
    np.testing.assert_array_equal(good.params["w"], [2, 2])
    assert float(m["skipped"]) == 0
    bad, m = guarded(state, np.float32(np.nan))
    np.testing.assert_array_equal(bad.params["w"], [1, 1])
    np.testing.assert_array_equal(bad.opt_state["m"], [0, 0])
    assert int(bad.step) == 4 and float(m["skipped"]) == 1


# -- 3 / 7 / 10: resume without input state, corrupt latest checkpoint, metrics rows ---


def test_resume_without_input_state_is_exact(runs, demo, tmp_path):
    wd = tmp_path / "replay"
    shutil.copytree(runs / "straight4", wd)
    shutil.rmtree(wd / "checkpoints" / "4")  # as if killed between steps 2 and 4
    shutil.rmtree(wd / "checkpoints" / "2" / "input_state" / "process_0")
    assert _train(demo, wd, 4)[0] == 0
    _assert_equal_states(checkpoint.restore_train_state(str(wd / "checkpoints" / "4")),
                         checkpoint.restore_train_state(str(runs / "straight4" / "checkpoints"
                                                            / "4")))
    rows = _strict_rows(wd / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(runs, demo, tmp_path,
                                                                  capsys, caplog):
    wd = tmp_path / "corrupt"
    shutil.copytree(runs / "straight4", wd)
    reference = checkpoint.restore_train_state(str(wd / "checkpoints" / "4"))
    for f in (wd / "checkpoints" / "4" / "variables").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated data files
    # Evaluation / prediction: one warning line, the previous step's variables.
    caplog.set_level("WARNING")
    variables = checkpoint.load_variables(str(wd))
    assert [r.getMessage().startswith("checkpoint step 4 is unreadable (ValueError: ")
            for r in caplog.records] == [True]
    caplog.clear()
    _assert_equal_states(variables["params"],
                         checkpoint.restore_train_state(str(wd / "checkpoints" / "2"))["params"])
    # Training: moves step 4 aside, resumes from 2 and re-trains 3-4 exactly.
    with open(wd / "metrics.jsonl") as f:
        assert [json.loads(r)["step"] for r in f] == [2, 4]
    rc, err = _train(demo, wd, 4, capsys=capsys)
    assert rc == 0, err
    assert "Traceback" not in err and "Event loop is closed" not in err
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith("checkpoint step 4 is unreadable (") and warned[0].endswith(
        "; falling back to step 2") and "moved to " in warned[0], warned
    assert os.listdir(wd / "checkpoints_corrupt")
    _assert_equal_states(checkpoint.restore_train_state(str(wd / "checkpoints" / "4")),
                         reference)
    # No duplicate rows: the re-trained step 4 replaced the old row.
    assert [r["step"] for r in _strict_rows(wd / "metrics.jsonl")] == [2, 4]


def test_evaluate_workdir_typo_creates_nothing(tmp_path, capsys):
    from solov2_jax import evaluate

    typo = tmp_path / "typo"
    rc = evaluate.main(["solov2-evaluate", f"--config={ROOT}/configs/tiny.py",
                        f"--workdir={typo}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("solov2-evaluate: error: ") and str(typo) in err
    assert len(err.splitlines()) == 1 and "not found" in err, err
    assert not typo.exists()
    # The training-side reader says what is missing, and creates nothing either.
    with pytest.raises(checkpoint.CheckpointError, match="no training checkpoints in"):
        train.restore_variables(str(typo))
    assert not typo.exists()


def test_save_variables_is_atomic_and_load_variables_reads_every_layout(tmp_path):
    v = {"params": {"w": np.arange(3.0)}, "batch_stats": {"m": np.ones(2)}}
    path = checkpoint.save_variables(str(tmp_path / "w"), v)
    assert checkpoint.is_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary left
    v2 = {"params": {"w": np.arange(3.0) + 1}, "batch_stats": {"m": np.ones(2)}}
    checkpoint.save_variables(path, v2, force=True)
    np.testing.assert_array_equal(convert.load_variables(path)["params"]["w"], [1, 2, 3])
    with pytest.raises(checkpoint.CheckpointError, match="exists; pass --force"):
        checkpoint.save_variables(path, v2)
    (tmp_path / "junk").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.load_variables(str(tmp_path / "junk"))
    nan = {"params": {"w": np.array([1.0, np.nan])}, "batch_stats": {}}
    assert checkpoint.first_nonfinite(nan) == "params/w"


# -- 10: config values and command-line errors ----------------------------------------


@pytest.mark.parametrize("override, message", [
    ("--config.checkpoint.every_steps=0", "config.checkpoint.every_steps = 0: must be a "
                                          "positive integer"),
    ("--config.data.per_device_batch=0", "config.data.per_device_batch = 0: must be a "
                                         "positive integer"),
    ("--config.optim.lr=-0.01", "config.optim.lr = -0.01: must be a finite number > 0"),
    ("--config.optim.lrr=1", "unknown config field in --config.optim.lrr"),
])
def test_bad_config_values_are_one_line_errors(demo, tmp_path, capsys, override, message):
    rc, err = _train(demo, tmp_path / "wd", 2, override, capsys=capsys)
    assert rc == 1
    assert err.strip() == f"solov2-train: error: {message}" or (
        err.startswith(f"solov2-train: error: {message}") and len(err.splitlines()) == 1), err


def test_missing_config_file_and_debug_flag(tmp_path, capsys, monkeypatch):
    argv = ["solov2-train", "--config=configs/nope.py", f"--workdir={tmp_path}"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "config 'configs/nope.py'" in err
    assert "neither a file nor a packaged config" in err and "tiny" in err
    with pytest.raises(cli.UserError):
        train.main([*argv, "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(cli.UserError):
        train.main(argv)


# -- 4 / 8: categories vs num_classes, empty splits ------------------------------------


def test_more_categories_than_classes_is_refused(demo, tmp_path, capsys):
    rc, err = _train(demo, tmp_path / "wd", 2, "--config.model.num_classes=3", capsys=capsys)
    assert rc == 1
    assert "has 4 categories (circle, rectangle, triangle, ring) but model.num_classes is 3" \
        in err
    assert not (tmp_path / "wd" / "checkpoints").exists()


def _coco(root, images, anns, stem="train2017"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / stem).mkdir(exist_ok=True)
    for im in images:
        _jpeg(root / stem / im["file_name"], im["height"], im["width"], im["id"])
    data = {"images": images, "annotations": anns, "categories": CATS}
    (root / "annotations" / f"instances_{stem}.json").write_text(json.dumps(data))


def test_train_split_without_instances_is_refused(tmp_path, capsys):
    coco = tmp_path / "coco"
    _coco(coco, [{"id": i, "file_name": f"{i}.jpg", "height": 40, "width": 40}
                 for i in (1, 2)], [])
    argv = ["solov2-train", f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data.coco_dir={coco}", "--config.model.num_classes=2"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "train split 'train' of dataset" in err and "has 2 images and 0 annotated " \
        "instances: nothing to train on" in err


def test_empty_images_list_names_the_file(tmp_path, capsys):
    coco = tmp_path / "coco"
    _coco(coco, [], [])
    with pytest.raises(SystemExit):
        prepare.main(["--coco-dir", str(coco), "--data-dir", str(tmp_path / "tfds")])
    err = capsys.readouterr().err
    assert "instances_train2017.json: the 'images' list is empty" in err
    assert "Traceback" not in err


# -- 2 / 10: annotations checked before pycocotools ------------------------------------


def _one_annotation(tmp_path, **fields):
    coco = tmp_path / "coco"
    ann = {"id": 7, "image_id": 1, "category_id": 5, "segmentation": [_poly(1, 1, 9, 9)],
           "bbox": [1, 1, 8, 8], "area": 64.0, "iscrowd": 0, **fields}
    _coco(coco, [{"id": 1, "file_name": "x.jpg", "height": 20, "width": 20}], [ann],
          stem="val2017")
    return coco


# Runs `prepare` under a 1 GiB address-space limit and reports its peak RSS (VmHWM of the
# child's own memory; ru_maxrss would include this big test process, inherited at fork).
_LIMITED_PREPARE = """
import atexit, resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
atexit.register(lambda: print([l for l in open('/proc/self/status')
                               if l.startswith('VmHWM')][0].split()[1], file=sys.stderr))
sys.argv = ['solov2-prepare', *sys.argv[1:]]
runpy.run_module('solov2_jax.data.prepare', run_name='__main__')
"""


def test_nan_polygon_fails_fast_and_small(tmp_path):
    """The acceptance item: a NaN coordinate (pycocotools would allocate ~18 GB)."""
    coco = _one_annotation(tmp_path, segmentation=[[1, 1, 9, 1, 9, float("nan"), 1, 9]])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LIMITED_PREPARE, "--coco-dir", str(coco),
                           "--data-dir", str(tmp_path / "tfds")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    seconds = time.perf_counter() - t0
    *lines, peak_kb = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1] == (f"solov2-prepare: error: {coco}/annotations/instances_val2017.json: "
                         "annotation 7: polygon coordinate nan is not finite"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 10, seconds
    assert int(peak_kb) < 1024 * 1024, peak_kb  # KiB: under 1 GiB (and limited to it)
    assert not (tmp_path / "tfds").exists()  # nothing written


@pytest.mark.parametrize("fields, message", [
    ({"segmentation": [[1, 1, 9, 1, 9, 1e12, 1, 9]]},
     "annotation 7: polygon y coordinate 1000000000000.0 is more than one image size"),
    ({"segmentation": [[1, 1, 9, 1, float("inf"), 9, 1, 9]]},
     "annotation 7: polygon coordinate inf is not finite"),
    ({"segmentation": [["1", "1", "9", "1", "9", "9"]]},
     "annotation 7: polygon coordinate '1' is not a number"),
    ({"bbox": [1, 1, float("nan"), 8]}, "annotation 7: bbox [1, 1, nan, 8] must be 4 finite"),
    ({"bbox": [1, 1, 8]}, "annotation 7: bbox [1, 1, 8] must be 4 finite numbers"),
    ({"segmentation": {"counts": "0000garbage", "size": [20, 20]}},
     "annotation 7: compressed RLE counts string is malformed"),
    ({"segmentation": {"counts": [10, 500], "size": [20, 20]}},
     "annotation 7: RLE runs cover 510 pixels, not height*width = 400"),
])
def test_bad_annotations_name_file_and_id(tmp_path, fields, message):
    coco = _one_annotation(tmp_path, **fields)
    with pytest.raises(ValueError, match="instances_val2017.json: ") as err:
        coco_builder.prepare(str(coco), str(tmp_path / "tfds"), progress=False)
    assert message in str(err.value)
    assert isinstance(err.value, cli.UserError)


def test_rle_string_decoder_matches_pycocotools():
    from pycocotools import mask as mask_utils

    from solov2_jax.data.coco_instance_seg.annotations import rle_string_counts

    m = np.zeros((23, 17), np.uint8)
    m[3:20, 2:9] = 1
    m[5:7, 4:6] = 0
    rle = mask_utils.encode(np.asfortranarray(m))
    counts = rle_string_counts(rle["counts"])
    assert sum(counts) == 23 * 17
    flat = m.flatten(order="F")
    assert counts[0] == np.argmax(flat) and len(counts) > 4


# -- 5: interrupted demo writes, bad JSON ------------------------------------------------


def test_interrupted_demo_is_regenerated(tmp_path, monkeypatch):
    from solov2_jax.data import make_demo as md

    calls = {"n": 0}
    real = md.atomic_write

    def dying(path, data):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # a kill mid-way
        real(path, data)

    monkeypatch.setattr(md, "atomic_write", dying)
    demo = tmp_path / prepare.DEMO_NAME
    with pytest.raises(KeyboardInterrupt):
        md.make_demo(str(demo), num_train=16, num_val=4)
    files = [p for p in demo.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_size > 0 for p in files)
    assert not any(p.name.startswith(".") for p in files)  # no temporaries left
    monkeypatch.setattr(md, "atomic_write", real)
    # An older interrupted run may have left a 0-byte JSON: regenerated, not fatal.
    (demo / "annotations").mkdir(exist_ok=True)
    (demo / "annotations" / "instances_val2017.json").write_bytes(b"")
    assert prepare.ensure_demo(str(tmp_path)) == str(demo)
    data = json.loads((demo / "annotations" / "instances_val2017.json").read_text())
    assert len(data["images"]) == 16


def test_invalid_json_names_the_file(tmp_path, capsys):
    coco = _one_annotation(tmp_path)
    path = coco / "annotations" / "instances_val2017.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(SystemExit):
        prepare.main(["--coco-dir", str(coco), "--data-dir", str(tmp_path / "tfds")])
    err = capsys.readouterr().err
    assert f"solov2-prepare: error: {path}: not valid JSON" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_stale_build_is_warned_about(tmp_path, capsys):
    coco = _one_annotation(tmp_path)
    argv = ["--coco-dir", str(coco), "--data-dir", str(tmp_path / "tfds"), "--no-progress"]
    prepare.main(argv)
    path = coco / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [2, 2, 7, 7]
    path.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.warns(UserWarning, match="is stale: instances_val2017.json changed"):
        _, summary = prepare.main(argv)
    assert summary["stale_annotations"] == ["instances_val2017.json"]
    assert "instances_val2017.json changed since this build was prepared" in \
        capsys.readouterr().out


# -- 6 / 10: convert --force and unreadable .pth files ----------------------------------


def test_convert_force_refuses_to_delete_a_non_checkpoint(tmp_path, capsys):
    user = tmp_path / "my_files"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    lone = tmp_path / "notes.txt"
    lone.write_text("also precious")
    for out in (user, lone):
        rc = convert.main(["torchvision", "--depth", "18", "--checkpoint",
                           str(tmp_path / "missing.pth"), "--out", str(out), "--force"])
        err = capsys.readouterr().err
        assert rc == 1 and f"refusing to overwrite {out} with --force: it is not a " \
            "checkpoint" in err and "nothing was deleted" in err
    assert (user / "thesis.tex").read_text() == "precious"
    assert lone.read_text() == "also precious"


def test_truncated_pth_gets_no_allow_pickle_advice(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "r.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3)}, pth)
    pth.write_bytes(pth.read_bytes()[:200])
    rc = convert.main(["torchvision", "--depth", "18", "--checkpoint", str(pth), "--out",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "not a complete PyTorch checkpoint" in err
    assert "--allow-pickle" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- 7: corrupt weights and a full disk are one line each ------------------------------


def test_corrupt_weights_are_one_line_for_evaluate(tmp_path, capsys):
    from solov2_jax import evaluate

    path = checkpoint.save_variables(str(tmp_path / "w"), {
        "params": {"w": np.arange(50_000.0)}, "batch_stats": {}})
    for f in Path(path).rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    rc = evaluate.main(["solov2-evaluate", f"--config={ROOT}/configs/tiny.py",
                        f"--weights={path}", f"--workdir={tmp_path / 'eval'}"])
    err = capsys.readouterr().err
    assert rc == 1 and f"solov2-evaluate: error: cannot read checkpoint {path}" in err, err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_full_disk_during_a_save_is_one_line(tmp_path, monkeypatch):
    import errno

    ckpts = checkpoint.TrainCheckpoints(str(tmp_path))

    class Full:
        def save(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(ckpts, "_manager", Full())
    state = {"step": np.int32(2), "params": {"w": np.ones(2)}, "batch_stats": {},
             "opt_state": {"m": np.ones(2)}}
    with pytest.raises(checkpoint.CheckpointError,
                       match="cannot write checkpoint step 2 to .*No space left on device"):
        ckpts.save(2, state, None)
    with pytest.raises(checkpoint.CheckpointError, match="params/w is not finite"):
        ckpts.save(4, {**state, "params": {"w": np.array([1.0, np.inf])}}, None)


def test_closed_event_loop_noise_is_dropped_and_other_unraisables_kept(capsys,
                                                                         monkeypatch):
    class Dying:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", cli._drop_closed_loop_noise)
    capsys.readouterr()
    Dying(RuntimeError("Event loop is closed"))  # collected at once: __del__ raises
    assert capsys.readouterr().err == ""
    Dying(ValueError("a real problem"))
    assert "a real problem" in capsys.readouterr().err


def test_orphaned_tensorstore_read_errors_are_not_logged():
    import logging

    def record(msg, exc):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None))

    read = ValueError('OUT_OF_RANGE: Error reading "a/0" in OCDBT database at local file')
    assert checkpoint._is_orphaned_read_error(
        record("Task exception was never retrieved\nfuture: <Task ...>", read))
    assert not checkpoint._is_orphaned_read_error(
        record("Task exception was never retrieved", ValueError("a bug elsewhere")))
    assert not checkpoint._is_orphaned_read_error(record("something else", read))
    assert any(isinstance(f, checkpoint._DropOrphanedReadErrors)
               for f in logging.getLogger("asyncio").filters)


@pytest.mark.parametrize("module", ["train", "evaluate", "predict", "export"])
def test_every_cli_has_help(module, capsys):
    """`--help` exits 0 and lists the flags (one CLI style: `cli.absl_main`)."""
    import importlib

    mod = importlib.import_module(f"solov2_jax.{module}")
    assert mod.main([f"solov2-{module}", "--help"]) == 0
    out = capsys.readouterr().out
    assert "flags:" in out and "--config" in out
