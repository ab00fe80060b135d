"""Command-line error handling shared by every entry point.

A user error (bad flag, missing or invalid file, config value out of range, diverged
training) is printed as `<prog>: error: <message>` on stderr and the exit status is 1,
without a traceback. `--debug` on the command line, or SOLOV2_DEBUG=1 in the environment,
lets the exception propagate with its full traceback instead. Anything that is not a user
error (a bug) always keeps its traceback.

Every entry point goes through `absl_main`: absl flags (the one flag style, because
ml_collections' `--config.a.b=value` overrides are absl flags), `--help`, absl's logging
flags (`--verbosity`, `--logtostderr`, ...), `--config` as a packaged config name or a
path (`define_config_flag`) and the persistent XLA compilation cache (`--compile_cache`).
"""

from __future__ import annotations

import os
import re
import sys

DEBUG_ENV = "SOLOV2_DEBUG"
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """A problem the user can fix: bad input data, config, flags or files."""


def debug_requested(argv) -> bool:
    """True with `--debug` in argv or a non-empty, non-'0' SOLOV2_DEBUG."""
    return DEBUG_FLAG in (argv or ()) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug(argv):
    """argv without `--debug` (None stays None: argparse then reads sys.argv)."""
    if argv is None:
        argv = sys.argv[1:]
    return [a for a in argv if a != DEBUG_FLAG]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types reported as one line (missing files, flag errors, UserError)."""
    types: list[type[BaseException]] = [UserError, FileNotFoundError, NotADirectoryError,
                                        IsADirectoryError, PermissionError]
    try:
        from absl import flags

        types.append(flags.Error)
    except ImportError:  # pragma: no cover - absl is a dependency
        pass
    return tuple(types)


def report(prog: str, error: BaseException) -> int:
    """Prints `<prog>: error: <message>` on stderr; returns 1."""
    message = str(error).strip() or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def _drop_closed_loop_noise(unraisable):
    """sys.unraisablehook without orbax/tensorstore's late 'Event loop is closed' callbacks.

    After a failed restore (a corrupt checkpoint), futures complete on an asyncio loop that
    orbax already closed; Python prints each as an 'Exception ignored' traceback, dozens
    of lines that bury the real one-line error. Every other unraisable is printed.
    """
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)  # installed only in place of the default hook


def guarded(prog: str, fn, argv):
    """Runs fn(argv without --debug); user errors become one line and status 1."""
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _drop_closed_loop_noise
    debug = debug_requested(argv if argv is not None else sys.argv[1:])
    try:
        return fn(strip_debug(argv) if argv is not None else None)
    except user_errors() as e:
        if debug:
            raise
        return report(prog, e)


def parse_flags(fv, argv, config_flag: str = "config"):
    """fv(argv), then the loaded `--<config_flag>` (None if not given)."""
    return _parse(fv, argv, config_flag)[0]


def _parse(fv, argv, config_flag: str = "config"):
    """(loaded `--<config_flag>` or None, argv left after the flags) of fv(argv).

    ml_collections reports a missing or broken config file only when the config is first
    used (an `_ErrorConfig` raising OSError) and an unknown `--config.a.b=v` override as
    a bare AttributeError / KeyError; both become one-line UserErrors here.
    """
    try:
        rest = fv(argv)
        config = getattr(fv, config_flag, None)
        if config is not None and type(config).__name__ == "_ErrorConfig":
            config.lock()  # any use raises the stored load error
    except OSError as e:
        raise UserError(f"cannot load --{config_flag}: {' '.join(str(e).split())}") from None
    except (AttributeError, KeyError) as e:
        detail = " ".join(re.sub(r"\\n|[\\'\"]", " ", str(e)).split())
        overrides = [a.split("=")[0] for a in argv if a.startswith(f"--{config_flag}.")]
        field = detail.split()[0] if detail else ""
        overrides = [o for o in overrides if o.rsplit(".", 1)[-1] == field] or overrides
        raise UserError(f"unknown config field in {' '.join(overrides) or 'an override'}: "
                        f"{detail}") from None
    return config, rest


def underscore_flag(arg: str) -> str:
    """`--score-thr=...` -> `--score_thr=...` (absl spells flags with underscores)."""
    if arg.startswith("--") and not arg.startswith("--config"):
        head, sep, tail = arg[2:].partition("=")
        return "--" + head.replace("-", "_") + sep + tail
    return arg


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def absl_main(prog: str, doc: str, define_flags, execute, argv) -> int:
    """The one CLI style of every entry point: absl flags on a private registry (callable
    in-process), `--help` with the module docstring, dashes or underscores in flag names
    (`--no-progress` for a boolean `progress` too), absl's logging flags, the persistent
    compilation cache (`--compile_cache`, set up before `execute`), user errors as one
    `<prog>: error: ...` line (`guarded`).

    define_flags(fv, argv) registers the flags; execute(fv, inputs) -> exit status, with
    `inputs` the positional arguments left after the flags.
    """
    from absl import flags

    from solov2_jax import reporting

    reporting.setup(tensorflow=False)  # the console filter, before anything logs
    argv = [underscore_flag(a) for a in argv]
    fv = flags.FlagValues()
    define_flags(fv, argv)
    _define_common_flags(fv)
    argv = [_negated_bool(fv, a) for a in argv]
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(doc + "\nflags:\n" + fv.get_help())
        return 0

    def parse_and_execute(args):
        _, rest = _parse(fv, args)
        setup_compile_cache(fv.compile_cache)
        return execute(fv, list(rest[1:]))

    return guarded(prog, parse_and_execute, argv)


def _define_common_flags(fv) -> None:
    """absl's logging flags (the very Flag objects absl.logging reads) and --compile_cache."""
    from absl import flags
    from absl import logging as absl_logging  # noqa: F401 - defines its flags on import

    for flag in flags.FLAGS.get_flags_for_module("absl.logging"):
        if flag.name not in fv:
            fv[flag.name] = flag
            fv.register_flag_by_module("absl.logging", flag)
    flags.DEFINE_string(
        "compile_cache", None, "persistent XLA compilation cache directory ('none': off); "
        f"default $JAX_COMPILATION_CACHE_DIR, else {default_compile_cache()}",
        flag_values=fv)


def _negated_bool(fv, arg: str) -> str:
    """`--no_progress` -> `--noprogress` for a boolean flag `progress` (absl's spelling)."""
    name = arg[5:] if arg.startswith("--no_") else ""
    if name and arg[2:] not in fv and name in fv and fv[name].boolean:
        return "--no" + name
    return arg


def define_config_flag(fv, argv, name: str = "config"):
    """`--<name>`: a packaged config name (`tiny`, `solov2_r50_fpn_1x_coco`, with or
    without `.py`) or a config file path, with `--<name>.a.b=value` overrides taken from
    argv (ml_collections). The value is resolved by `config.config_file`."""
    from ml_collections import config_flags

    from solov2_jax.config import packaged_configs

    holder = config_flags.DEFINE_config_file(
        name, None, "packaged config name or path of a configs/<name>.py file; override "
        f"fields with --{name}.a.b=value. Packaged: {', '.join(packaged_configs())}",
        flag_values=fv, sys_argv=argv)
    fv[name].parser = _resolving_parser(fv[name].parser)
    return holder


def _resolving_parser(inner):
    """ml_collections' config file parser, given `config.config_file(value)`."""
    from absl import flags

    class ResolvingParser(flags.ArgumentParser):
        def parse(self, argument):
            from solov2_jax.config import config_file

            return inner.parse(config_file(argument))

        def flag_type(self):
            return inner.flag_type()

    return ResolvingParser()


def default_compile_cache() -> str:
    """$XDG_CACHE_HOME/solov2_jax/xla, else ~/.cache/solov2_jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "solov2_jax", "xla")


def setup_compile_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None: off).

    `directory` None keeps a directory the process already has (JAX reads
    $JAX_COMPILATION_CACHE_DIR at import; tests set one) and otherwise uses
    `default_compile_cache()`; 'none' (or '') turns the cache off. Every program is
    cached, however quick to compile: the small ones add up to most of a short run.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if directory is None:
        directory = jax.config.jax_compilation_cache_dir or default_compile_cache()
    if directory.strip().lower() in ("", "none"):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"--compile_cache {directory}: cannot create it ({e.strerror})") from e
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # the cache object binds its directory once
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def console_entry(main) -> None:
    """Console-script wrapper: absl's app (logging, its own flags at their defaults);
    `main(argv)` parses the full argv itself."""
    from absl import app

    def defaults_only(argv):
        from absl import flags

        flags.FLAGS(argv[:1])
        return argv

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=defaults_only)
