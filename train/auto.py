"""The measured `auto` on CUDA: before a model is built, each op left on `auto` gets the fastest
of its usable backends that is also correct, at that model's shapes and dtype.

    tritongpt train --preset gpt2                  # prints e.g. "attention: triton 1.42 ms, sdpa 1.61 ms -> triton"

For every op the model calls (GPTConfig.ops) whose choice is `auto` (no flag, variable or config
key names a backend for it): each backend usable on the device runs forward + backward on the
op's model-shaped inputs (its spec's first model case), is checked against the op's reference
(the rule of `tritongpt verify`: the dtype's tolerance and at most 2x PyTorch's own error) and
timed; the fastest correct one wins. A backend that raises or is wrong is skipped with its
reason, never fatal. Decisions are cached on disk (CACHE_FILE in the user cache), keyed by
device name, torch and triton versions, op, shapes and dtype; a corrupt or stale entry is
ignored and measured again. On a CPU `auto` stays the registry's (no timing); under torchrun
rank 0 measures and every rank takes its choices. `resolve_backends` gives every op of a model
config a backend name this way: the names go into the run's config like explicit choices, so
checkpoints, metrics and `--resume` reuse them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tritongpt.data.assets import cache_dir
from tritongpt.files import atomic_write_bytes
from tritongpt.kernels import registry
from tritongpt.kernels.measure import Timer, check
from tritongpt.kernels.spec import ModelShape, dtype_name
from tritongpt.model.config import GPTConfig

CACHE_FILE = "auto_backends.json"


def resolve_backends(config: GPTConfig, device: torch.device, *, batch: int | None = None,
                     dtype: torch.dtype | None = None, log: Callable[[str], None] = print) -> GPTConfig:
    """`config` with the backend of each op it calls (config.ops) a registered name usable on
    `device`; the fields of the ops it does not call are left as they are. Ops left on auto are
    measured on CUDA when `batch` and `dtype` are given (under torchrun rank 0 measures and every
    rank takes its choices); otherwise auto is the registry's."""
    auto_ops = [op for op in config.ops if (getattr(config, op) or config.backend or registry.AUTO) == registry.AUTO]
    measured: dict[str, str] = {}
    if auto_ops and batch and dtype is not None and device.type == "cuda" and not registry.interpreting():
        shared = dist.is_available() and dist.is_initialized()
        if not shared or dist.get_rank() == 0:
            measured = choose_backends(auto_ops, config.shape(batch), device, dtype,
                                       DecisionCache(cache_dir() / CACHE_FILE), log)
        if shared:
            box = [measured]
            dist.broadcast_object_list(box, src=0)
            measured = box[0]
    return dataclasses.replace(config, **{op: measured.get(op) or registry.choose(op, getattr(config, op),
                                                                                  config.backend, device)
                                          for op in config.ops})


@dataclass(frozen=True)
class Timing:
    """One backend measured on one op's model-shaped inputs."""
    backend: str
    ms: float | None  # median forward + backward; None when it did not run or was not timed
    ok: bool  # correct by the verify rule
    why: str = ""  # why it is not a candidate

    def describe(self) -> str:
        return f"{self.backend} {self.ms:.3g} ms" if self.ok and self.ms is not None else f"{self.backend} ({self.why})"


def fastest(timings: list[Timing]) -> Timing | None:
    """The fastest correct, timed backend (ties: the first name in order); None if there is none."""
    usable = [t for t in timings if t.ok and t.ms is not None]
    return min(usable, key=lambda t: (t.ms, t.backend)) if usable else None


def measure(op: str, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> list[Timing]:
    """Every backend of `op` usable on `device`, checked and timed on the op's first model case."""
    spec = registry.spec(op)
    case = spec.model_cases(shape)[0]
    inputs = spec.make_inputs(case, dtype, device, torch.Generator(device=device).manual_seed(0))
    reference = spec.oracle(inputs, torch.float32)
    timer = Timer(device, quick=True)
    baseline = check(spec.reference, inputs, reference, dtype, device).errors or None
    timings = []
    for name in registry.backends(op):
        if not registry.usable(op, name, device):
            continue
        backend = registry.backend(op, name)
        result = check(backend.fn, inputs, reference, dtype, device, baseline=None if name == "torch" else baseline,
                       claims_determinism=backend.deterministic, timer=timer)
        timings.append(Timing(name, result.ms, result.ok, result.why))
    return timings


class DecisionCache:
    """{key: {"backend": name, "times": {backend: ms or None}}} in one JSON file, written
    atomically; an unreadable file or a malformed entry reads as absent."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, op: str) -> str | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
            return None
        name = entry["backend"]
        return name if name in registry.backends(op) else None  # stale: that backend is gone

    def put(self, key: str, name: str, timings: list[Timing]) -> None:
        data = self._read()
        data[key] = {"backend": name, "times": {t.backend: t.ms for t in timings}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")


def cache_key(op: str, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> str:
    import triton
    return "|".join([torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                     f"torch {torch.__version__}", f"triton {triton.__version__}", op,
                     " ".join(c.shape for c in registry.spec(op).model_cases(shape)[:1]), dtype_name(dtype)])


def choose_backends(ops: list[str], shape: ModelShape, device: torch.device, dtype: torch.dtype, cache: DecisionCache,
                    log: Callable[[str], None] = print,
                    measure_op: Callable[..., list[Timing]] = measure) -> dict[str, str]:
    """{op: fastest correct backend} for `ops`, from the cache or measured (then cached). An op
    with no correct, timed backend falls back to `torch`, said in the log."""
    chosen = {}
    for op in ops:
        key = cache_key(op, shape, device, dtype)
        cached = cache.get(key, op)
        if cached is not None:
            chosen[op] = cached
            log(f"{op}: {cached} (measured earlier on this device; cache {cache.path})")
            continue
        timings = measure_op(op, shape, device, dtype)
        best = fastest(timings)
        chosen[op] = best.backend if best else "torch"
        log(f"{op}: " + ", ".join(t.describe() for t in timings) + f" -> {chosen[op]}"
            + ("" if best else " (no backend was both correct and timed)"))
        if best is not None:
            cache.put(key, best.backend, timings)
    return chosen
