"""solov2_jax.backend: platform selection in simulated environments (no hardware needed).

JAX initialises its backends once per process, so every case runs in a subprocess with a
controlled environment: a fake CoreX SDK tree (COREX_HOME) with a fake `ixsmi` script,
with and without a plugin file, plugin files that are not loadable PJRT plugins.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_corex(tmp_path, *, plugin: bytes | None = None):
    home = tmp_path / "corex"
    (home / "lib64").mkdir(parents=True)
    (home / "bin").mkdir()
    for lib in ("libcuda.so", "libcudart.so.10.2.89", "libixml.so"):  # no libixthunk.so
        (home / "lib64" / lib).write_bytes(b"")
    (home / "VERSION").write_text("3.1.0\n")
    ixsmi = home / "bin" / "ixsmi"
    ixsmi.write_text('#!/bin/sh\n'
                     'case "$*" in *query-gpu=index,name,memory.total*) ;; *) exit 2;; esac\n'
                     'echo "0, Iluvatar BI-V100, 32768 MiB"\n'
                     'echo "1, Iluvatar BI-V100, 32768 MiB"\n')
    ixsmi.chmod(0o755)
    if plugin is not None:
        (home / "lib64" / "pjrt_plugin_ixuca.so").write_bytes(plugin)
    return home


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "COREX_HOME", "SOLOV2_IXUCA_PJRT_PLUGIN",
                        "SOLOV2_DEBUG")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, env, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _train(tmp_path, env, *flags):
    workdir = tmp_path / "run"
    r = _run(["-m", "solov2_jax.train", "--config", "configs/tiny.py", "--workdir",
              str(workdir), *flags], env)
    return r, workdir


def _no_traceback(r):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_ixuca_without_plugin_stops_with_findings(tmp_path):
    home = _fake_corex(tmp_path)
    r, workdir = _train(tmp_path, _env(COREX_HOME=home), "--backend", "ixuca")
    assert r.returncode == 1, r.stderr[-3000:]
    _no_traceback(r)
    err = r.stderr
    assert "solov2-train: error: --backend ixuca: requested, but no PJRT plugin for IXUCA" \
        in err
    assert f"CoreX SDK: {home} (from COREX_HOME), version 3.1.0" in err
    assert "0, Iluvatar BI-V100, 32768 MiB; 1, Iluvatar BI-V100, 32768 MiB" in err
    assert "found libcuda.so, libcudart.so, libixml.so; missing libixthunk.so" in err
    assert f"searched {home}/lib64/pjrt_plugin_ixuca.so" in err
    assert "--backend cpu" in err and "SOLOV2_IXUCA_PJRT_PLUGIN" in err
    assert not workdir.exists()  # stopped before anything was done


def test_auto_with_corex_never_falls_back_to_cpu(tmp_path):
    """auto: CoreX present, no plugin -> the same error, via the config value."""
    home = _fake_corex(tmp_path)
    r, _ = _train(tmp_path, _env(COREX_HOME=home), "--config.train.backend=auto")
    assert r.returncode == 1, r.stderr[-3000:]
    _no_traceback(r)
    assert "--backend auto: Iluvatar CoreX detected, but no PJRT plugin" in r.stderr


def test_plugin_at_default_location_that_is_not_a_plugin(tmp_path):
    home = _fake_corex(tmp_path, plugin=b"not an ELF file")
    r, _ = _train(tmp_path, _env(COREX_HOME=home), "--config.train.backend=ixuca")
    assert r.returncode == 1, r.stderr[-3000:]
    _no_traceback(r)
    assert (f"error: --backend ixuca: {home}/lib64/pjrt_plugin_ixuca.so (from default "
            "location) is not a loadable PJRT plugin: ") in r.stderr


def test_plugin_env_naming_a_library_without_pjrt_api(tmp_path):
    """A real shared library that dlopen accepts but that has no GetPjrtApi."""
    import ctypes.util

    lib = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6",
                            "/lib64/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6")
                if os.path.exists(p)), ctypes.util.find_library("m"))
    if not lib or not os.path.isabs(lib):
        pytest.skip("no libm path found")
    home = _fake_corex(tmp_path)
    r, _ = _train(tmp_path, _env(COREX_HOME=home, SOLOV2_IXUCA_PJRT_PLUGIN=lib),
                  "--backend", "ixuca")
    assert r.returncode == 1, r.stderr[-3000:]
    _no_traceback(r)
    assert f"{lib} (from $SOLOV2_IXUCA_PJRT_PLUGIN) is not a loadable PJRT plugin" in r.stderr
    assert "GetPjrtApi" in r.stderr


def test_plugin_json_config_with_missing_library(tmp_path):
    home = _fake_corex(tmp_path)
    cfg = tmp_path / "ixuca.json"
    cfg.write_text(json.dumps({"library_path": str(tmp_path / "nowhere.so")}))
    code = ("import sys; from solov2_jax import backend\n"
            "try:\n    backend.configure('ixuca')\n"
            "except backend.BackendError as e:\n    print(e); sys.exit(3)\n")
    r = _run(["-c", code], _env(COREX_HOME=home, SOLOV2_IXUCA_PJRT_PLUGIN=cfg))
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"{cfg} (from $SOLOV2_IXUCA_PJRT_PLUGIN) is not a loadable PJRT plugin: no such " \
        f"file: {tmp_path / 'nowhere.so'}" in r.stdout


def test_cuda_requested_on_a_cpu_machine(tmp_path):
    from solov2_jax import backend

    if backend._cuda_plugin_installed():
        pytest.skip("JAX's CUDA plugin is installed here")
    r, _ = _train(tmp_path, _env(), "--backend", "cuda")
    assert r.returncode == 1, r.stderr[-3000:]
    _no_traceback(r)
    assert "solov2-train: error: --backend cuda: JAX's CUDA plugin is not installed" \
        in r.stderr


def test_auto_and_cpu_report(tmp_path):
    """No accelerator, no CoreX: auto picks the CPU and says why; the report names the
    backend, device kinds and counts. evaluate/predict take --backend too."""
    from solov2_jax import backend

    if backend._nvidia_gpu_visible():
        pytest.skip("an NVIDIA GPU is visible here")
    code = ("from absl import logging; logging.set_verbosity('info')\n"
            "from solov2_jax import backend\n"
            "import jax\n"
            "backend.start(backend.configure('auto'))\n"
            "print('platform', jax.default_backend(), jax.local_device_count())\n")
    r = _run(["-c", code], _env(COREX_HOME=tmp_path / "none"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "platform cpu 2" in r.stdout
    assert "backend: cpu (--backend auto: no NVIDIA GPU visible and no Iluvatar CoreX SDK" \
        in r.stderr
    assert "local devices: 2 x cpu:cpu; 2 global, process 0 of 1" in r.stderr

    home = _fake_corex(tmp_path)
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    r = _run(["-m", "solov2_jax.predict", "--config", "configs/tiny.py", "--weights",
              str(tmp_path), "--out", str(tmp_path / "out"), "--backend", "ixuca", str(img)],
             _env(COREX_HOME=home))
    assert r.returncode == 1 and "solov2-predict: error: --backend ixuca: requested, but " \
        "no PJRT plugin" in r.stderr, r.stderr[-3000:]
    r = _run(["-m", "solov2_jax.evaluate", "--config", "configs/tiny.py", "--weights",
              str(tmp_path), "--config.train.backend=ixuca"], _env(COREX_HOME=home))
    assert r.returncode == 1 and "solov2-evaluate: error: --backend ixuca: requested, " \
        "but no PJRT plugin" in r.stderr, r.stderr[-3000:]
