"""Backend selection for every entry point: `--backend {auto,cpu,cuda,ixuca}`.

    plan = backend.configure(name)   # before JAX initialises: jax_platforms, plugins
    jax.distributed.initialize()     # (multi-host runs only)
    backend.start(plan)              # initialises JAX, checks, logs the start-up report

`configure` decides the platform and sets `jax_platforms` (and registers a PJRT plugin
for `ixuca`) without touching a device; `start` initialises the backend, turns any
failure into a one-line `BackendError` and logs a report (backend, device kinds and
counts, the IXUCA findings when relevant). Nothing ever falls back to the CPU silently:
a requested accelerator that is missing is an error that lists the options.

IXUCA / CoreX (Iluvatar BI-V100). The SDK is CUDA-compatible at the runtime-API level
(CUDA 10.2) but has no nvcc/PTX path, so JAX's CUDA plugins (CUDA >= 12, PTX) cannot drive
it. JAX reaches other hardware through PJRT plugins: a shared library exporting
`GetPjrtApi`. We detect the SDK (`COREX_HOME`, else /usr/local/corex; `ixsmi`; its
libraries), look for a plugin (the file named by $SOLOV2_IXUCA_PJRT_PLUGIN, else the
DEFAULT_PLUGIN_NAMES under PLUGIN_DIRS), register it with
`jax._src.xla_bridge.register_plugin('ixuca', library_path=...)` — the same call JAX makes
for `PJRT_NAMES_AND_LIBRARY_PATHS` entries and `jax_plugins` packages — and select it. A
`jax_plugins` package that already registered an `ixuca`/`iluvatar` platform is used as
it is. Without a plugin, `ixuca` stops with BackendError listing what was found.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess

from absl import logging

from solov2_jax.cli import UserError

CHOICES = ("auto", "cpu", "cuda", "ixuca")
PLUGIN_ENV = "SOLOV2_IXUCA_PJRT_PLUGIN"
COREX_DEFAULT = "/usr/local/corex"
# File names looked for in PLUGIN_DIRS (no public vendor plugin is known; these are the
# names this project documents for one).
DEFAULT_PLUGIN_NAMES = ("pjrt_plugin_ixuca.so", "libpjrt_ixuca.so")
COREX_LIBS = ("libcuda.so", "libcudart.so", "libixml.so", "libixthunk.so")
PLATFORM_NAMES = ("ixuca", "iluvatar", "corex")  # names a vendor plugin might register


class BackendError(UserError):
    """The requested backend cannot be used (one message: found / missing / options)."""


def plugin_dirs(corex_home: str) -> list[str]:
    """Default plugin locations, in search order."""
    return [os.path.join(corex_home, "lib64"), os.path.join(corex_home, "lib"),
            os.path.expanduser("~/.local/lib/solov2_jax")]


@dataclasses.dataclass
class CorexInfo:
    """What was found of an Iluvatar CoreX (IXUCA) installation."""

    home: str | None = None  # the SDK directory, if it exists
    home_source: str = ""  # "COREX_HOME" or "default"
    version: str | None = None
    ixsmi: str | None = None  # path of ixsmi
    devices: list[str] = dataclasses.field(default_factory=list)  # ixsmi csv rows
    ixsmi_error: str | None = None
    libs: dict[str, str | None] = dataclasses.field(default_factory=dict)
    plugin: str | None = None  # plugin library (or .json config) to register
    plugin_source: str = ""
    plugin_searched: list[str] = dataclasses.field(default_factory=list)
    entry_points: list[str] = dataclasses.field(default_factory=list)

    @property
    def detected(self) -> bool:
        return self.home is not None or bool(self.devices)

    def lines(self) -> list[str]:
        """Human-readable findings, one per line."""
        out = []
        if self.home:
            out.append(f"CoreX SDK: {self.home} (from {self.home_source}), version "
                       f"{self.version or 'unknown (no version file)'}")
        else:
            out.append(f"CoreX SDK: not found (COREX_HOME unset or missing, no "
                       f"{COREX_DEFAULT})")
        if self.ixsmi:
            dev = "; ".join(self.devices) if self.devices else "none listed"
            out.append(f"ixsmi: {self.ixsmi}: devices: {dev}"
                       + (f" ({self.ixsmi_error})" if self.ixsmi_error else ""))
        else:
            out.append("ixsmi: not found")
        if self.home:
            have = [n for n, p in self.libs.items() if p]
            miss = [n for n, p in self.libs.items() if not p]
            out.append(f"libraries: found {', '.join(have) or 'none'}"
                       + (f"; missing {', '.join(miss)}" if miss else ""))
        if self.plugin:
            out.append(f"PJRT plugin: {self.plugin} (from {self.plugin_source})")
        else:
            out.append("PJRT plugin: none ($" + PLUGIN_ENV + " unset; searched "
                       + ", ".join(self.plugin_searched) + ")")
        return out


def _run_ixsmi(exe: str, query: str) -> list[str]:
    out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return [" ".join(r.split()) for r in out.splitlines() if r.strip()]


def detect_corex(environ=None) -> CorexInfo:
    """Looks for the CoreX SDK, ixsmi, its libraries and an IXUCA PJRT plugin."""
    env = os.environ if environ is None else environ
    info = CorexInfo()
    home = env.get("COREX_HOME")
    if home and os.path.isdir(home):
        info.home, info.home_source = os.path.abspath(home), "COREX_HOME"
    elif os.path.isdir(COREX_DEFAULT):
        info.home, info.home_source = COREX_DEFAULT, "default"
    search_home = info.home or COREX_DEFAULT
    if info.home:
        for name in ("VERSION", "version", "version.txt"):
            p = os.path.join(info.home, name)
            if os.path.isfile(p):
                with open(p, errors="replace") as f:
                    info.version = (f.read().strip().splitlines() or [None])[0]
                break
        for lib in COREX_LIBS:
            hits = sorted(glob.glob(os.path.join(info.home, "lib64", lib + "*")))
            info.libs[lib] = hits[0] if hits else None
    candidates = ([os.path.join(info.home, "bin", "ixsmi")] if info.home else []) + \
        [shutil.which("ixsmi", path=env.get("PATH"))]
    info.ixsmi = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if info.ixsmi:
        try:
            info.devices = _run_ixsmi(info.ixsmi, "index,name,memory.total")
        except (OSError, subprocess.SubprocessError) as e:
            info.ixsmi_error = f"ixsmi failed: {' '.join(str(e).split())[:200]}"
    if env.get(PLUGIN_ENV):
        info.plugin, info.plugin_source = env[PLUGIN_ENV], f"${PLUGIN_ENV}"
    else:
        for d in plugin_dirs(search_home):
            for n in DEFAULT_PLUGIN_NAMES:
                p = os.path.join(d, n)
                info.plugin_searched.append(p)
                if info.plugin is None and os.path.isfile(p):
                    info.plugin, info.plugin_source = p, "default location"
    try:
        from importlib.metadata import entry_points

        info.entry_points = [f"{e.name} ({e.value})" for e in
                             entry_points(group="jax_plugins")
                             if any(n in e.name.lower() for n in PLATFORM_NAMES)]
    except Exception:  # noqa: BLE001 - metadata problems only hide this hint
        pass
    return info


def _cuda_plugin_installed() -> bool:
    import importlib.util

    for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
              "jax_plugins.xla_cuda13"):
        try:
            if importlib.util.find_spec(m) is not None:
                return True
        except ImportError:  # parent package (jax_plugins) absent
            pass
    return False


def _nvidia_gpu_visible() -> bool:
    try:
        from jax._src import hardware_utils

        return bool(hardware_utils.has_visible_nvidia_gpu())
    except Exception:  # noqa: BLE001
        return bool(glob.glob("/dev/nvidia[0-9]*"))


@dataclasses.dataclass
class Plan:
    requested: str
    platform: str  # the jax_platforms value set ("cpu", "cuda", "ixuca", or "" = as-is)
    reason: str
    corex: CorexInfo | None = None


def _options(info: CorexInfo) -> str:
    dirs = ", ".join(plugin_dirs(info.home or COREX_DEFAULT)[:2])
    return ("Options: (1) run on the CPU with --backend cpu (or --config.train.backend=cpu); "
            f"(2) install a vendor PJRT plugin for IXUCA and name it with {PLUGIN_ENV}="
            f"/path/to/plugin.so (or a .json with library_path); (3) put it at "
            f"{'/'.join(DEFAULT_PLUGIN_NAMES)} in {dirs}. JAX's CUDA plugin cannot drive a "
            "BI-V100 (it needs a CUDA >= 12 runtime and PTX; CoreX provides CUDA 10.2 "
            "runtime APIs and no PTX).")


def _ixuca_plan(requested: str, info: CorexInfo, why: str) -> Plan:
    found = "\n  ".join(info.lines())
    if info.entry_points:  # a jax_plugins package: JAX registers it itself
        return Plan(requested, "", f"{why}; jax_plugins entry point "
                    f"{', '.join(info.entry_points)}", info)
    if not info.plugin:
        raise BackendError(
            f"--backend {requested}: {why}, but no PJRT plugin for IXUCA is available, "
            f"so JAX cannot use the device (refusing to fall back to the CPU).\n  Found:\n  "
            f"{found}\n  Missing: a PJRT plugin library exporting GetPjrtApi.\n  "
            + _options(info))
    path = info.plugin
    options = None
    try:
        if path.endswith(".json"):  # JAX's PJRT_NAMES_AND_LIBRARY_PATHS json convention
            with open(path) as f:
                cfg = json.load(f)
            path, options = cfg["library_path"], cfg.get("create_options")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        from jax._src import xla_bridge

        xla_bridge.register_plugin("ixuca", priority=500, library_path=path,
                                   options=options)
    except Exception as e:  # noqa: BLE001 - dlopen/GetPjrtApi/json errors
        raise BackendError(
            f"--backend {requested}: {info.plugin} (from {info.plugin_source}) is not a "
            f"loadable PJRT plugin: {' '.join(str(e).split())[:400]}\n  Found:\n  {found}\n"
            "  " + _options(info)) from None
    return Plan(requested, "ixuca", f"{why}; PJRT plugin {path}", info)


def configure(requested: str = "auto") -> Plan:
    """Chooses and configures the platform before JAX initialises (sets jax_platforms,
    registers the IXUCA plugin). Raises BackendError when the choice is impossible."""
    import jax
    from jax._src import xla_bridge

    if requested not in CHOICES:
        raise BackendError(f"--backend must be one of {', '.join(CHOICES)}, not "
                           f"{requested!r}")
    if xla_bridge.backends_are_initialized():
        current = jax.default_backend()
        want = {"cpu": "cpu", "cuda": "gpu", "ixuca": "ixuca"}.get(requested)
        if want is not None and current != want:
            raise BackendError(f"--backend {requested}: JAX is already initialised in this "
                               f"process on '{current}'; start a new process")
        return Plan(requested, "", f"JAX already initialised in this process ({current})")
    env_platforms = os.environ.get("JAX_PLATFORMS", "")
    if requested == "auto":
        if env_platforms:
            return Plan(requested, "", f"JAX_PLATFORMS={env_platforms} set in the environment")
        if _nvidia_gpu_visible():
            if not _cuda_plugin_installed():
                raise BackendError(
                    "--backend auto: an NVIDIA GPU is visible but JAX's CUDA plugin is not "
                    "installed (pip install -U 'jax[cuda12]'); refusing to fall back to the "
                    "CPU. Use --backend cpu to train on the CPU anyway.")
            plan = Plan(requested, "cuda", "an NVIDIA GPU is visible and jax's CUDA plugin "
                        "is installed")
        else:
            info = detect_corex()
            if info.detected:
                plan = _ixuca_plan(requested, info, "Iluvatar CoreX detected")
            else:
                plan = Plan(requested, "cpu", "no NVIDIA GPU visible and no Iluvatar CoreX "
                            f"SDK ($COREX_HOME, {COREX_DEFAULT}) or ixsmi found")
    elif requested == "cpu":
        plan = Plan(requested, "cpu", "requested")
    elif requested == "cuda":
        if not _cuda_plugin_installed():
            gpu = "an NVIDIA GPU is visible" if _nvidia_gpu_visible() else \
                "no NVIDIA GPU is visible either"
            raise BackendError(
                f"--backend cuda: JAX's CUDA plugin is not installed and {gpu}. Install it "
                "with pip install -U 'jax[cuda12]' on a machine with an NVIDIA GPU, or use "
                "--backend cpu. For an Iluvatar BI-V100 use --backend ixuca.")
        plan = Plan(requested, "cuda", "requested")
    else:
        plan = _ixuca_plan(requested, detect_corex(), "requested")
    if plan.platform:
        jax.config.update("jax_platforms", plan.platform)
    return plan


def start(plan: Plan) -> list:
    """Initialises JAX's backend of `plan` (errors become BackendError) and logs the
    start-up report; returns the local devices."""
    import jax

    try:
        devices = jax.local_devices()
    except Exception as e:  # noqa: BLE001 - plugin/driver failures at client creation
        extra = ""
        if plan.corex is not None:
            extra = "\n  Found:\n  " + "\n  ".join(plan.corex.lines()) + "\n  " + \
                _options(plan.corex)
        raise BackendError(f"--backend {plan.requested}: cannot initialise JAX platform "
                           f"'{plan.platform or jax.config.jax_platforms}': "
                           f"{' '.join(str(e).split())[:500]}{extra}") from None
    for line in report_lines(plan, devices):
        logging.info("%s", line)
    return devices


def report_lines(plan: Plan, devices) -> list[str]:
    import collections

    import jax

    kinds = collections.Counter(f"{d.platform}:{d.device_kind}" for d in devices)
    lines = [f"backend: {jax.default_backend()} (--backend {plan.requested}: {plan.reason}); "
             f"local devices: " + ", ".join(f"{n} x {k}" for k, n in kinds.items())
             + f"; {jax.device_count()} global, process {jax.process_index()} of "
             f"{jax.process_count()}"]
    if plan.corex is not None:
        lines += ["IXUCA: " + line for line in plan.corex.lines()]
    return lines


def add_flag(fv) -> None:
    """Defines --backend on an absl FlagValues (default: the config's train.backend)."""
    from absl import flags

    flags.DEFINE_enum("backend", None, list(CHOICES),
                      "auto | cpu | cuda | ixuca (default: config train.backend, else auto)",
                      flag_values=fv)


def add_distributed_flags(fv) -> None:
    """--distributed, --coordinator, --num_processes, --process_id (multi-host runs)."""
    from absl import flags

    flags.DEFINE_bool("distributed", False, "multi-host: jax.distributed.initialize()",
                      flag_values=fv)
    flags.DEFINE_string("coordinator", None, "with --distributed: host:port of process 0's "
                        "coordinator (default: detected from the cluster environment)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "with --distributed: this process's index",
                         flag_values=fv)


def initialize_distributed(fv) -> None:
    """jax.distributed.initialize() with the flags of `add_distributed_flags`, when
    --distributed is set (after `configure`, before `start`)."""
    if fv.distributed:
        import jax

        jax.distributed.initialize(coordinator_address=fv.coordinator,
                                   num_processes=fv.num_processes, process_id=fv.process_id)


def requested(fv, config) -> str:
    """--backend if given, else config.train.backend, else 'auto'."""
    if getattr(fv, "backend", None):
        return fv.backend
    try:
        return str(config.train.get("backend", "auto") or "auto")
    except AttributeError:
        return "auto"


# XLA:CPU lowers convolutions to YNNPACK fusions by default in this jaxlib; for SOLOv2's
# training step (weight gradients in particular) its own kernels were faster in a probe.
YNN_CONV_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def cpu_xla_flags(ynn_convolutions: bool = True) -> list[str]:
    """XLA_FLAGS entries for XLA:CPU: [] by default; with `ynn_convolutions=False` the
    flag that keeps individual convolutions out of YNNPACK fusions. XLA reads XLA_FLAGS
    once, when JAX initialises its backends, so set them before that (a new process)."""
    return [] if ynn_convolutions else [YNN_CONV_OFF]
