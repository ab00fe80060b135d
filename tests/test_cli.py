"""The command lines: every console script's --help, one flag style, packaged config names,
absl's standard flags and the persistent XLA compilation cache."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from solov2_jax import cli, config, predict, train

REPO = Path(__file__).resolve().parents[1]
# pyproject's [project.scripts], as installed (editable installs included).
SCRIPTS = {e.name: e.value
           for e in importlib.metadata.distribution("solov2-jax").entry_points
           if e.group == "console_scripts"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_helps_with_absl_flags(script, capsys, monkeypatch):
    """The very function pyproject installs, run as the console script would be."""
    module, func = SCRIPTS[script].split(":")
    entry = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        entry()
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    # Its own flags, absl's logging flags, --flagfile and the compilation cache.
    defined = {name.lstrip("-").replace("[no]", "")
               for line in out.splitlines() if line.startswith(("  --", "  -v,"))
               for name in line.split(":")[0].strip().split(",")}
    assert len(defined) > 8, out
    assert {"verbosity", "v", "logtostderr", "flagfile", "compile_cache"} <= defined, out


def test_packaged_config_names_and_paths_resolve_alike():
    names = config.packaged_configs()
    assert {"tiny", "solov2_r50_fpn_1x_coco"} <= set(names) and "__init__" not in names
    assert config.config_file("tiny") == config.config_file("tiny.py") == names["tiny"]
    path = str(REPO / "configs" / "tiny.py")
    assert config.config_file(path) == path  # an existing file is taken as it is
    by_name = predict.load_config("tiny", ["optim.lr=0.25", "data.max_instances=7"])
    by_path = predict.load_config(path, ["optim.lr=0.25", "data.max_instances=7"])
    assert by_name.to_dict() == by_path.to_dict()
    assert by_name.optim.lr == 0.25 and by_name.data.max_instances == 7
    assert predict.load_config("solov2_r50_fpn_1x_coco.py").model.depth == 50


def test_bad_config_name_is_one_line_listing_the_packaged_configs(tmp_path, capsys):
    assert train.main(["solov2-train", "--config", "tinyy", f"--workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("solov2-train: error: config 'tinyy' is neither a file nor a "
                          "packaged config (packaged: ")
    assert "solov2_r50_fpn_1x_coco" in err and ", tiny" in err
    with pytest.raises(cli.UserError, match="packaged: .*solov2_r50_fpn_1x_coco"):
        predict.load_config("configs/no_such.py")
    assert not os.listdir(tmp_path)


@pytest.fixture
def jax_cache_config():
    """Restores the process's compilation cache settings, which the CLIs set globally."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
             "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    yield jax.config
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


def test_absl_standard_flags_and_spellings_are_accepted(capsys, tmp_path, jax_cache_config):
    seen = {}

    def define(fv, argv):
        from absl import flags

        flags.DEFINE_bool("progress", True, "", flag_values=fv)
        flags.DEFINE_integer("max_images", None, "", flag_values=fv)

    def execute(fv, inputs):
        seen.update(progress=fv.progress, max_images=fv.max_images, inputs=inputs,
                    verbosity=fv.verbosity, cache=jax_cache_config.jax_compilation_cache_dir)
        return 0

    argv = ["prog", "--no-progress", "--max-images", "3", "a.jpg", "--verbosity=-1",
            f"--compile-cache={tmp_path / 'xla'}"]
    assert cli.absl_main("prog", "doc", define, execute, argv) == 0
    assert seen == dict(progress=False, max_images=3, inputs=["a.jpg"], verbosity=-1,
                        cache=str(tmp_path / "xla"))
    assert cli.setup_compile_cache("none") is None
    assert not jax_cache_config.jax_enable_compilation_cache
    assert cli.absl_main("prog", "doc", define, execute, ["prog", "--bogus=1"]) == 1
    assert "prog: error: Unknown command line flag 'bogus'" in capsys.readouterr().err


# One process per run: the persistent cache only matters to a new process.
_COMPILE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from solov2_jax import cli
    events = []
    jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
    directory = cli.setup_compile_cache(None)
    jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
    print(json.dumps({"dir": directory, "events": events}))
""")


def test_compile_cache_defaults_to_xdg_and_a_second_run_compiles_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu")
    cache = tmp_path / "xdg" / "solov2_jax" / "xla"

    def run():
        proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        import json

        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["dir"] == str(cache)
        files = sorted(p.name for p in cache.iterdir())
        return files, out["events"].count("/jax/compilation_cache/cache_misses"), \
            out["events"].count("/jax/compilation_cache/cache_hits")

    files1, misses1, hits1 = run()
    files2, misses2, hits2 = run()
    assert files1 and misses1 >= 1  # first run: compiled and written
    assert misses2 == 0 and hits2 == misses1 + hits1  # second: everything from the cache
    assert files2 == files1
    # JAX's own variable (set by a user or a test harness) is kept.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jaxenv")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and str(tmp_path / "jaxenv") in proc.stdout, proc.stderr
