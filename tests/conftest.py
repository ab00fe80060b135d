"""Test-wide setup: 8 forced CPU devices (before JAX starts) and the mmdet fixture."""

import atexit
import os
import shutil
import tempfile

# Multi-device (pmap) tests run on CPU by splitting the host into 8 XLA devices. This has
# to happen before JAX initialises its backends, i.e. before any test module imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Entry points called in-process turn on the persistent XLA cache (cli.setup_compile_cache,
# default ~/.cache/solov2_jax/xla): tests keep theirs in a fresh temporary directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="solov2_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mmdet():
    """The real mmdetection 3.3.0 (imported, never copied), ready to build models.

    Returns the `tests.mmdet_ref` helper module. Skips only when the parity extra is not
    installed at all; CI installs it, and `.ci/run` fails if these tests are skipped.
    """
    from tests import mmdet_ref

    mmdet_ref.import_mmdet()
    return mmdet_ref


@pytest.fixture(scope="session")
def mmcv_ops(mmdet):
    """mmdet plus mmcv's compiled operators (DCNv2); skips (fails in CI) without them."""
    mmdet.require_mmcv_ops()
    return mmdet


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(root, TFDS builder): 16 train / 4 val images of the default (hard) demo preset in
    root/demo, prepared into root/tfds; one copy per test module (modules may damage it)."""
    from solov2_jax.data import coco_builder
    from solov2_jax.data.make_demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    make_demo(str(root / "demo"), num_train=16, num_val=4)
    builder, _ = coco_builder.prepare(str(root / "demo"), str(root / "tfds"), progress=False)
    return root, builder


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache private to the requesting test module (restored
    afterwards), for modules that run the same training programs many times."""
    import jax
    from jax._src import compilation_cache as cc

    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()
