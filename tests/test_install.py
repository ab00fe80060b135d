"""A non-editable install runs: wheel built from this tree, installed into a fresh virtual
environment, `solov2-train --config tiny` (a packaged config name) from outside the repo.

The new environment gets its dependencies from this interpreter's site-packages through
a `.pth` line (no download); the package itself is a real wheel build and install
(`pip install --no-deps --no-build-isolation`), and the test checks that the child
imports it from the new environment, not from the repo or the editable install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from solov2_jax.data.make_demo import make_demo

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict:
    """The child's environment: nothing pointing into the repo, caches under tmp."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR",
                        "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XDG_CACHE_HOME=str(tmp / "xdg"),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    return env


def _run(cmd, tmp: Path, timeout: int, cwd: Path):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(tmp), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv holding a wheel-installed solov2_jax; returns (python, bin dir, tmp)."""
    tmp = tmp_path_factory.mktemp("install")
    outside = tmp / "elsewhere"
    outside.mkdir()
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # Dependencies (and pip, setuptools for the build) from this interpreter. A path in a
    # .pth file is appended after the venv's own site-packages, and .pth files inside it
    # (the editable install's finder) are not executed.
    (site / "_solov2_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
          REPO], tmp, 600, cwd=outside)
    return python, root / "bin", tmp, outside, site


def test_wheel_install_is_not_the_repo_and_ships_every_module(venv):
    python, _, tmp, outside, site = venv
    out = _run([python, "-c", "import solov2_jax, solov2_jax.configs as c, sys; "
                "print(solov2_jax.__file__); print(c.__file__); print(sys.path)"],
               tmp, 120, cwd=outside).stdout.splitlines()
    assert Path(out[0]).is_relative_to(site) and Path(out[1]).is_relative_to(site), out
    assert not any(p.startswith(str(REPO)) and "site-packages" not in p
                   for p in eval(out[2])), out[2]  # noqa: S307 - our own repr of sys.path
    tracked = subprocess.run(["git", "ls-files", "solov2_jax", "configs"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    expected = {("solov2_jax/configs/" + p[len("configs/"):]) if p.startswith("configs/")
                else p for p in tracked if p.endswith(".py")}
    assert expected, tracked
    missing = sorted(p for p in expected if not (site / p).is_file())
    assert not missing, f"modules missing from the wheel (pyproject packages?): {missing}"


def test_installed_solov2_train_runs_a_packaged_config_and_reuses_compiles(venv):
    python, bindir, tmp, outside, _ = venv
    data = tmp / "coco"
    make_demo(str(data), num_train=8, num_val=4)
    cache = tmp / "xla"

    def train(workdir):
        t0 = time.perf_counter()
        # One training scale: one train-step program to compile (the demo images are
        # landscape), which keeps the cold run near a minute and a half on 2 cores.
        proc = _run([bindir / "solov2-train", "--config", "tiny", "--workdir", workdir,
                     "--config.train.max_steps=2", f"--config.data.coco_dir={data}",
                     f"--config.data.data_dir={tmp / 'tfds'}",
                     "--config.data.train_scales=((160, 128),)", "--compile_cache", cache],
                    tmp, 600, cwd=outside)
        return proc, time.perf_counter() - t0

    first, t_first = train(tmp / "run1")
    assert (tmp / "run1" / "final_variables").is_dir(), first.stderr[-3000:]
    entries = sorted(os.listdir(cache))
    assert entries
    # An identical second run compiles nothing: every program comes from the cache (a
    # miss would compile and write a new entry: every program is cached).
    second, t_second = train(tmp / "run2")
    assert sorted(os.listdir(cache)) == entries
    assert (tmp / "run2" / "final_variables").is_dir()
    print(f"solov2-train 2 steps, installed: {t_first:.1f}s cold, {t_second:.1f}s with the "
          f"compilation cache ({len(entries)} entries)")
