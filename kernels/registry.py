"""The registry: ops (name -> OpSpec) and their backends (op -> {backend name -> callable}).

This is the only place that maps backend names to code. A module resolves its op once, at
construction, and stores the callable; `forward` never branches on a backend string. The
registry takes explicit choices only: environment variables (`TRITONGPT_ATTENTION`, ...) are
read by the command line and turned into choices there (`env_choices`).

An op's backend is, highest first: the op's own choice (`attention="sdpa"`), the global choice
(`backend="torch"`), then `auto`: `triton` when the op has it and Triton can run (CUDA, or
TRITON_INTERPRET=1), else `torch`. An unknown or unusable name is an error listing the choices;
there is no silent fallback.

Backends come from the built-in modules (`BUILTIN_MODULES`, imported on first use) and from
installed packages: a distribution that declares an entry point in the group
`tritongpt.backends` names a function that receives this module and calls `register_op` /
`register`. A plugin that fails is one warning naming it; the rest of the registry works.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tritongpt.errors import TritonGPTError, require

if TYPE_CHECKING:
    from tritongpt.kernels.spec import OpSpec

AUTO = "auto"
GLOBAL = "backend"  # the choice for every op: --backend, TRITONGPT_BACKEND, GPTConfig.backend
PLUGIN_GROUP = "tritongpt.backends"
NEEDS = ("any", "triton", "cuda")
# Imported on first use, specs first: `kernels/` is a namespace package (no __init__.py, so it
# never shadows another `kernels` when Python runs from the repository root), so nothing else
# imports the kernel files.
BUILTIN_MODULES = ("tritongpt.kernels.attention_spec", "tritongpt.kernels.layer_norm_spec",
                   "tritongpt.kernels.mlp_spec", "tritongpt.kernels.linear_cross_entropy_spec",
                   "tritongpt.kernels.attention", "tritongpt.kernels.layer_norm", "tritongpt.kernels.mlp",
                   "tritongpt.kernels.linear_cross_entropy")


@dataclass(frozen=True)
class Backend:
    fn: Callable  # the op's implementation, with the signature of the op's reference
    needs: str  # "any" device; "triton": CUDA or TRITON_INTERPRET=1; "cuda": CUDA tensors only
    deterministic: bool  # claims bitwise-equal results when rerun on the same inputs (checked by verify)


_OPS: dict[str, OpSpec] = {}
_BACKENDS: dict[str, dict[str, Backend]] = {}
_loaded = False


def load() -> None:
    """Import the built-in op and kernel modules, then the plugins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so modules registering while they are imported do not come back here
    for name in BUILTIN_MODULES:
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
    require(spec.name.isidentifier() and spec.name not in (AUTO, GLOBAL),
            f"op name {spec.name!r} must be a Python identifier other than {AUTO!r} and {GLOBAL!r}")
    require(spec.name not in _OPS, f"op {spec.name!r} is already registered")
    _OPS[spec.name] = spec
    _BACKENDS[spec.name] = {}
    register(spec.name, "torch", spec.reference)


def register(op: str, name: str, fn: Callable, *, needs: str = "any", deterministic: bool = False) -> Callable:
    """Add backend `name` of `op`; returns `fn`."""
    require(op in _BACKENDS, f"cannot register backend {name!r}: unknown op {op!r}; ops: {', '.join(sorted(_OPS))}")
    require(callable(fn), f"backend {name!r} of op {op!r} is not callable: {fn!r}")
    require(needs in NEEDS, f"backend {name!r} of op {op!r}: needs must be one of {NEEDS}, got {needs!r}")
    require(name and name != AUTO, f"backend name {name!r} of op {op!r} is reserved or empty")
    _BACKENDS[op][name] = Backend(fn, needs, deterministic)
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


def usable(op: str, name: str, device: torch.device | str | None = None) -> bool:
    """Whether backend `name` of `op` can run for tensors on `device` (None: the default accelerator)."""
    needs = backend(op, name).needs
    if needs == "triton":
        return triton_usable(device)
    if needs == "cuda":
        return torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return True


def choices(op: str, device: torch.device | str | None = None) -> list[str]:
    """Backend names of `op` usable on `device`, plus `auto`."""
    return [n for n in backends(op) if usable(op, n, device)] + [AUTO]


def choose(op: str, choice: str | None = None, default: str | None = None,
           device: torch.device | str | None = None) -> str:
    """The backend name for `op`: `choice`, else `default` (the global choice), else auto."""
    _check_op(op)
    source, value = (op, choice) if choice else (GLOBAL, default) if default else ("default", AUTO)
    if value == AUTO:
        return "triton" if "triton" in _BACKENDS[op] and triton_usable(device) else "torch"
    if value not in _BACKENDS[op]:
        raise TritonGPTError(f"unknown {op} backend {value!r} (from {source}); "
                             f"choices: {', '.join(choices(op, device))}")
    if not usable(op, value, device):
        where = "CUDA" if _BACKENDS[op][value].needs == "cuda" else "a CUDA device or TRITON_INTERPRET=1"
        raise TritonGPTError(f"{op} backend {value!r} (from {source}) needs {where}; "
                             f"choices here: {', '.join(choices(op, device))}")
    return value


def resolve(op: str, choice: str | None = None, default: str | None = None,
            device: torch.device | str | None = None) -> Callable:
    """The callable implementing `op` (see `choose` for how the backend is picked)."""
    name = choose(op, choice, default, device)  # loads the registry first
    return _BACKENDS[op][name].fn


def env_var(name: str) -> str:
    """The environment variable of an op (or of `backend`): TRITONGPT_LAYER_NORM, TRITONGPT_BACKEND."""
    return f"TRITONGPT_{name.upper()}"


def env_choices(environ: Mapping[str, str]) -> dict[str, str]:
    """{op or "backend": name} from the TRITONGPT_<OP> / TRITONGPT_BACKEND variables set in
    `environ`. The command line calls this with os.environ; library code never reads it."""
    return {name: environ[env_var(name)] for name in (*ops(), GLOBAL) if environ.get(env_var(name))}


def _check_op(op: str) -> None:
    load()
    if op not in _OPS:
        raise TritonGPTError(f"unknown op {op!r}; ops: {', '.join(sorted(_OPS))}")
