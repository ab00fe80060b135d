"""Command-line error handling shared by every entry point.

A user error (bad flag, missing or invalid file, config value out of range, diverged
training) is printed as `<prog>: error: <message>` on stderr and the exit status is 1,
without a traceback. `--debug` on the command line, or SOLOV2_DEBUG=1 in the environment,
lets the exception propagate with its full traceback instead. Anything that is not a user
error (a bug) always keeps its traceback.
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


def absl_main(prog: str, doc: str, define_flags, execute, argv) -> int:
    """The one CLI style of every entry point: absl flags on a private registry (callable
    in-process), `--help` with the module docstring, dashes or underscores in flag names,
    user errors as one `<prog>: error: ...` line (`guarded`).

    define_flags(fv, argv) registers the flags; execute(fv, inputs) -> exit status, with
    `inputs` the positional arguments left after the flags.
    """
    from absl import flags

    argv = [underscore_flag(a) for a in argv]
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(doc + "\nflags:\n" + fv.get_help())
        return 0

    def parse_and_execute(args):
        _, rest = _parse(fv, args)
        return execute(fv, list(rest[1:]))

    return guarded(prog, parse_and_execute, argv)


def console_entry(main) -> None:
    """Console-script wrapper: absl's app (logging, its own flags at their defaults);
    `main(argv)` parses the full argv itself."""
    from absl import app

    def defaults_only(argv):
        from absl import flags

        flags.FLAGS(argv[:1])
        return argv

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=defaults_only)
