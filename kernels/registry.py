"""The backend registry: op name -> {backend name -> callable}.

This is the only place that knows backend names. A module resolves its op once, at
construction, and stores the callable; `forward` never branches on a backend string.

Selection for an op, highest first:
  1. the explicit choice (a CLI flag such as `--norm triton`, or a config field),
  2. the op's environment variable (`TRITONGPT_ATTENTION`, `TRITONGPT_NORM`, `TRITONGPT_MLP`),
  3. the global choice (`--backend`), then `TRITONGPT_BACKEND`,
  4. `auto`: `triton` when CUDA is available or TRITON_INTERPRET=1, else `torch`.

Each op's functions share one signature (see `kernels/reference.py`, the `torch` backend of
every op), so any backend can stand in for any other.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from tritongpt.errors import TritonGPTError

# op name -> the name of its per-op flag / config field / environment variable suffix
OP_FLAGS = {"attention": "attention", "layer_norm": "norm", "mlp": "mlp"}
AUTO = "auto"
GLOBAL_ENV = "TRITONGPT_BACKEND"


@dataclass(frozen=True)
class Backend:
    fn: Callable  # the op's implementation, with the op's shared signature
    needs_triton: bool  # runs only on CUDA tensors, or anywhere under TRITON_INTERPRET=1


_TABLE: dict[str, dict[str, Backend]] = {op: {} for op in OP_FLAGS}
# Modules that register the built-in backends when imported. The registry imports them on first
# use: `kernels/` is a namespace package (no __init__.py, so it never shadows another `kernels`
# package when Python runs from the repository root), so nothing else would.
BUILTIN_MODULES = ("tritongpt.kernels.reference", "tritongpt.kernels.layer_norm",
                   "tritongpt.kernels.attention", "tritongpt.kernels.mlp")
_loaded = False


def load_builtins() -> None:
    """Import the modules that register the built-in backends (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def register(op: str, name: str, fn: Callable, *, needs_triton: bool = False) -> Callable:
    """Add backend `name` for `op`; returns `fn`."""
    _check_op(op)
    _TABLE[op][name] = Backend(fn, needs_triton)
    return fn


def env_var(op: str) -> str:
    """The environment variable that picks `op`'s backend, e.g. TRITONGPT_NORM."""
    return f"TRITONGPT_{OP_FLAGS[op].upper()}"


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str | None = None) -> bool:
    """Whether Triton kernels can run for tensors on `device` (None: the default accelerator)."""
    if interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def backends(op: str) -> list[str]:
    """Registered backend names of `op`, sorted."""
    _check_op(op)
    return sorted(_TABLE[op])


def needs_triton(op: str, name: str) -> bool:
    """Whether backend `name` of `op` runs Triton kernels (CUDA or TRITON_INTERPRET=1 only)."""
    _check_op(op)
    return _TABLE[op][name].needs_triton


def choices(op: str, device: torch.device | str | None = None) -> list[str]:
    """Backend names of `op` usable on `device`, plus `auto`."""
    _check_op(op)
    usable = [n for n, b in sorted(_TABLE[op].items()) if not b.needs_triton or triton_usable(device)]
    return usable + [AUTO]


def choose(op: str, choice: str | None = None, default: str | None = None,
           device: torch.device | str | None = None) -> str:
    """The backend name for `op` after the precedence chain (module docstring), `auto` resolved."""
    _check_op(op)
    for source, value in (
        (f"--{OP_FLAGS[op]}", choice),
        (env_var(op), os.environ.get(env_var(op))),
        ("--backend", default),
        (GLOBAL_ENV, os.environ.get(GLOBAL_ENV)),
    ):
        if value:
            break
    else:
        source, value = "default", AUTO
    if value == AUTO:
        return "triton" if "triton" in _TABLE[op] and triton_usable(device) else "torch"
    if value not in _TABLE[op]:
        raise TritonGPTError(
            f"unknown {op} backend {value!r} (from {source}); choices: {', '.join(choices(op, device))}")
    if _TABLE[op][value].needs_triton and not triton_usable(device):
        raise TritonGPTError(
            f"{op} backend {value!r} (from {source}) needs a CUDA device or TRITON_INTERPRET=1; "
            f"choices here: {', '.join(choices(op, device))}")
    return value


def resolve(op: str, choice: str | None = None, default: str | None = None,
            device: torch.device | str | None = None) -> Callable:
    """The callable implementing `op` (see `choose` for how the backend is picked)."""
    return _TABLE[op][choose(op, choice, default, device)].fn


def _check_op(op: str) -> None:
    load_builtins()
    if op not in _TABLE:
        raise TritonGPTError(f"unknown op {op!r}; ops: {', '.join(_TABLE)}")
