"""The registry: ops (name -> OpSpec) and their backends (op -> {backend name -> callable}).

This is the only place that maps backend names to code. A module resolves its op once, at
construction, and stores the callable; `forward` never branches on a backend string. The
registry takes explicit choices only: environment variables (`TRITONGPT_ATTENTION`, ...) are
read by the command line and turned into choices there (`env_choices`).

An op's backend is, highest first: the op's own choice (`attention="sdpa"`), the global choice
(`backend="torch"`), then `auto`: `triton` when the op has it and Triton can run (CUDA, or
TRITON_INTERPRET=1), else `torch`. An unknown or unusable name is an error listing the choices;
there is no silent fallback.

Backends come from the kernels folder and from installed packages, imported on first use. In
the folder an op is its files, which no list names (`op_modules`): `<op>_spec.py`, its contract,
registers the op; `<op>_backends.py` (its other backends) and `<op>.py` (its Triton kernels),
where they exist, register backends. Any other module there (`<op>_configs.py`, `checks.py`, ...)
is a helper that these import. A distribution that declares an entry point in the group
`tritongpt.backends` names a function that receives this module and calls `register_op` /
`register`. A plugin that fails is one warning naming it; the rest of the registry works.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tritongpt.errors import TritonGPTError, require

if TYPE_CHECKING:
    from tritongpt.kernels.spec import OpSpec

AUTO = "auto"
EVERY_OP = "backend"  # the choice for every op: --backend, TRITONGPT_BACKEND, GPTConfig.backend
PLUGIN_GROUP = "tritongpt.backends"
# Where a backend runs: "any" device; "triton": CUDA or TRITON_INTERPRET=1; "cuda": CUDA tensors only;
# "cuda-backward": forward on any device, gradients on CUDA only (PyTorch's FlexAttention on a CPU).
NEEDS = ("any", "triton", "cuda", "cuda-backward")
# The built-in ops' folder and package, imported by `load`: `kernels/` is a namespace package (no
# __init__.py, so it never shadows another `kernels` when Python runs from the repository root),
# so nothing else imports the kernel files.
KERNELS_DIR = Path(__file__).resolve().parent
KERNELS_PACKAGE = __name__.rpartition(".")[0]
SPEC_SUFFIX, BACKENDS_SUFFIX = "_spec", "_backends"


@dataclass(frozen=True)
class Backend:
    fn: Callable  # the op's implementation, with the signature of the op's reference
    needs: str  # one of NEEDS
    deterministic: bool  # claims bitwise-equal results when rerun on the same inputs (checked by verify)
    requires: str | None = None  # the importable package it calls (e.g. "flash_attn"); None: nothing extra
    # (*args, **kwargs) of one call -> a callable with the op's signature that skips the backend's
    # per-input setup on those inputs (FlexAttention's block mask): benchmarks time it beside the backend
    prepared: Callable | None = None


_OPS: dict[str, OpSpec] = {}
_BACKENDS: dict[str, dict[str, Backend]] = {}
_loaded = False


def op_modules(directory: Path, package: str) -> list[str]:
    """The modules of the ops in `directory` (the folder of `package`), in import order: every
    `<op>_spec` by op name, then each op's `<op>_backends` and `<op>` where they exist. Only a
    spec names an op: `<op>_configs`, `<op>_backends` without a spec and other helpers are not ops."""
    names = {module.name for module in pkgutil.iter_modules([str(directory)])}
    ops = sorted(name.removesuffix(SPEC_SUFFIX) for name in names if name.endswith(SPEC_SUFFIX))
    modules = [op + SPEC_SUFFIX for op in ops] + [name for op in ops for name in (op + BACKENDS_SUFFIX, op)
                                                  if name in names]
    return [f"{package}.{name}" for name in modules]


def load() -> None:
    """Import the built-in op modules (`op_modules` of the kernels folder), then the plugins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so modules registering while they are imported do not come back here
    for name in op_modules(KERNELS_DIR, KERNELS_PACKAGE):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                raise
            # no Triton on this platform (it is a Linux-only dependency): the ops keep their other backends
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()(importlib.import_module(__name__))
        except Exception as exc:  # a broken plugin must not take the built-in backends down
            package = entry.dist.name if entry.dist is not None else entry.value
            warnings.warn(f"tritongpt: backend plugin {entry.name!r} from package {package!r} failed and is "
                          f"ignored: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


def register_op(spec: OpSpec) -> None:
    """Add an op; its reference becomes backend `torch`."""
    require(spec.name.isidentifier() and spec.name not in (AUTO, EVERY_OP),
            f"op name {spec.name!r} must be a Python identifier other than {AUTO!r} and {EVERY_OP!r}")
    require(spec.name not in _OPS, f"op {spec.name!r} is already registered")
    _OPS[spec.name] = spec
    _BACKENDS[spec.name] = {}
    register(spec.name, "torch", spec.reference)


def register(op: str, name: str, fn: Callable, *, needs: str = "any", deterministic: bool = False,
             requires: str | None = None, prepared: Callable | None = None) -> Callable:
    """Add backend `name` of `op`; returns `fn`. A backend that calls an optional package names it
    in `requires` and is registered whether or not it is installed, so every list of backends is
    the same everywhere; it is usable only where the package is."""
    require(op in _BACKENDS, f"cannot register backend {name!r}: unknown op {op!r}; ops: {', '.join(sorted(_OPS))}")
    require(callable(fn), f"backend {name!r} of op {op!r} is not callable: {fn!r}")
    require(needs in NEEDS, f"backend {name!r} of op {op!r}: needs must be one of {NEEDS}, got {needs!r}")
    require(name and name != AUTO, f"backend name {name!r} of op {op!r} is reserved or empty")
    _BACKENDS[op][name] = Backend(fn, needs, deterministic, requires, prepared)
    return fn


def ops() -> list[str]:
    """The registered op names, sorted."""
    load()
    return sorted(_OPS)


def spec(op: str) -> OpSpec:
    _check_op(op)
    return _OPS[op]


def backends(op: str) -> list[str]:
    """Registered backend names of `op`, sorted."""
    _check_op(op)
    return sorted(_BACKENDS[op])


def backend(op: str, name: str) -> Backend:
    """The registered backend `name` of `op` (a TritonGPTError listing the choices if there is none)."""
    _check_op(op)
    require(name in _BACKENDS[op], f"unknown {op} backend {name!r}; choices: {', '.join(backends(op))}")
    return _BACKENDS[op][name]


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1, which
    Triton itself reads)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str | None = None) -> bool:
    """Whether Triton kernels can run for tensors on `device` (None: the default accelerator)."""
    if interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


@functools.cache
def installed(package: str) -> bool:
    """Whether the top-level package `package` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def unusable_reason(op: str, name: str, device: torch.device | str | None = None, backward: bool = True) -> str | None:
    """Why backend `name` of `op` cannot run for tensors on `device` (None: the default accelerator),
    with gradients unless `backward` is False; None when it can."""
    entry = backend(op, name)
    if entry.requires is not None and not installed(entry.requires):
        return f"needs the {entry.requires} package (pip install {entry.requires.replace('_', '-')})"
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if entry.needs == "triton" and not triton_usable(device):
        return "needs a CUDA device or TRITON_INTERPRET=1"
    if entry.needs == "cuda" and not on_cuda:
        return "needs CUDA"
    if entry.needs == "cuda-backward" and backward and not on_cuda:
        return "has no backward here (its gradients need CUDA)"
    return None


WHERE = {"any": "any device", "triton": "CUDA, or a CPU under TRITON_INTERPRET=1", "cuda": "CUDA",
         "cuda-backward": "forward on any device, backward on CUDA"}  # NEEDS in words, for docs


def where(op: str, name: str) -> str:
    """Where backend `name` of `op` runs, in words, on any machine (docs; `unusable_reason` says
    why not on this one)."""
    entry = backend(op, name)
    package = f"; needs `pip install {entry.requires.replace('_', '-')}`" if entry.requires else ""
    return WHERE[entry.needs] + package


def usable(op: str, name: str, device: torch.device | str | None = None, backward: bool = True) -> bool:
    """Whether backend `name` of `op` can run for tensors on `device` (None: the default
    accelerator), forward and backward (forward only with backward=False)."""
    return unusable_reason(op, name, device, backward) is None


def choices(op: str, device: torch.device | str | None = None, backward: bool = True) -> list[str]:
    """Backend names of `op` usable on `device`, plus `auto`."""
    return [n for n in backends(op) if usable(op, n, device, backward)] + [AUTO]


def choose(op: str, choice: str | None = None, default: str | None = None,
           device: torch.device | str | None = None, backward: bool = True) -> str:
    """The backend name for `op`: `choice`, else `default` (the global choice), else auto; one
    that cannot run on `device` (with gradients unless backward=False) is an error saying why."""
    _check_op(op)
    source, value = (op, choice) if choice else (EVERY_OP, default) if default else ("default", AUTO)
    if value == AUTO:
        return "triton" if "triton" in _BACKENDS[op] and triton_usable(device) else "torch"
    if value not in _BACKENDS[op]:
        raise TritonGPTError(f"unknown {op} backend {value!r} (from {source}); "
                             f"choices: {', '.join(choices(op, device, backward))}")
    reason = unusable_reason(op, value, device, backward)
    if reason is not None:
        raise TritonGPTError(f"{op} backend {value!r} (from {source}) {reason}; "
                             f"choices here: {', '.join(choices(op, device, backward))}")
    return value


def resolve(op: str, choice: str | None = None, default: str | None = None,
            device: torch.device | str | None = None, backward: bool = True) -> Callable:
    """The callable implementing `op` (see `choose` for how the backend is picked)."""
    name = choose(op, choice, default, device, backward)  # loads the registry first
    return _BACKENDS[op][name].fn


def env_var(name: str) -> str:
    """The environment variable of an op (or of `backend`): TRITONGPT_LAYER_NORM, TRITONGPT_BACKEND."""
    return f"TRITONGPT_{name.upper()}"


def env_choices(environ: Mapping[str, str]) -> dict[str, str]:
    """{op or "backend": name} from the TRITONGPT_<OP> / TRITONGPT_BACKEND variables set in
    `environ`. The command line calls this with os.environ; library code never reads it."""
    return {name: environ[env_var(name)] for name in (*ops(), EVERY_OP) if environ.get(env_var(name))}


def _check_op(op: str) -> None:
    load()
    if op not in _OPS:
        raise TritonGPTError(f"unknown op {op!r}; ops: {', '.join(sorted(_OPS))}")
