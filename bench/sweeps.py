"""Kernel benchmarks: forward, backward and forward+backward of every registered backend of
every op (attention, layer_norm, mlp, and any op added later: each op's spec gives its sweep,
inputs, work and reference), next to torch.compile of the op's `torch` reference.

    tritongpt bench attention                 # the full sweep on the GPU, bf16
    tritongpt bench layer_norm --dtype fp16
    tritongpt bench all --quick --out /tmp/bench   # tiny shapes: CPU / CI

Every row carries the median time, TFLOP/s or GB/s and its percent of the ceiling measured in
the same run, the speedup over the `torch` reference, the max relative error of the output and
of the input gradients against a float32/float64 reference computed from the same inputs, and
the peak memory the call allocates. A provider that cannot run a case gives a row with a note.
Triton kernels under the interpreter (TRITON_INTERPRET=1, or no GPU) are checked for
correctness on a tiny case and never timed.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tritongpt.bench.tables import blank_row, join_notes
from tritongpt.errors import require
from tritongpt.kernels import registry
from tritongpt.kernels.measure import Timer, describe_error, errors, peak_mb, runner
from tritongpt.kernels.spec import MODES, Case, Inputs, OpSpec, call, dtype_name, grads, tolerance

BASELINE = "torch"  # speedups are relative to this backend
COMPILE = "torch.compile"  # the peer that compiles the `torch` backend of the op
INTERPRETER_NOTE = "interpreter: correctness only"
FLAG = "ERROR ABOVE TOLERANCE"
MAX_COPIES = 8  # input sets rotated through while timing, so L2 holds none of them


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_device(name: str | None) -> torch.device:
    """The device a --device choice names (None: `default_device`); an error when it names CUDA
    and there is none."""
    require(name != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    return torch.device(name) if name else default_device()


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what training uses), fp32 on the CPU (the interpreter's bf16 dots are wrong)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def reference_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 on the CPU and for fp32 inputs, else float32 (fp16/bf16 on a GPU)."""
    return torch.float64 if device.type == "cpu" or dtype == torch.float32 else torch.float32


def row_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The dtype's tolerance; fp32 on a GPU allows tf32 dots."""
    return tolerance(dtype, tf32=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Providers: registered backends plus torch.compile of the reference


@dataclass
class Provider:
    name: str
    # (the case's first input set) -> the op callable for that case; None: cannot run
    make: Callable[[Inputs], Callable] | None
    timed: bool = True  # False: correctness only (Triton interpreter)
    note: str = ""  # why it cannot run, or what its rows mean
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # held while it runs
    backward: bool = True  # False: forward only here (fwd rows; the others say why not)


def _fixed(fn: Callable) -> Callable[[Inputs], Callable]:
    return lambda inputs: fn


def _compiled(fn: Callable) -> Callable[[Inputs], Callable]:
    """A fresh torch.compile per case, static shapes: dynamo's cache is reset first so no case
    hits the recompile limit and falls back to eager unnoticed."""
    def make(inputs: Inputs) -> Callable:
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
    return make


def _prepared(prepare: Callable) -> Callable[[Inputs], Callable]:
    """A backend's `prepared` variant: what it builds from the masks (e.g. Flex's block mask) is
    built once per case, outside the timed calls. Every input set of a case has the same masks."""
    return lambda inputs: call(prepare, inputs)


def _keep_saved_buffers() -> contextlib.AbstractContextManager:
    """Compiled backward graphs that may run again (retain_graph=True), so `bwd` can be timed on
    its own: AOTAutograd's donated buffers would free the saved tensors after the first run."""
    import torch._functorch.config as config  # lazy: torch internals, only for compiled providers
    return config.patch(donated_buffer=False) if hasattr(config, "donated_buffer") else contextlib.nullcontext()


def providers(op: str, device: torch.device, compile: bool = True) -> tuple[list[Provider], list[dict]]:
    """Everything that can compute `op` here, and what was left out (with the reason)."""
    found, skipped = [], []
    for name in registry.backends(op):
        backend = registry.backend(op, name)
        needs = backend.needs
        if needs == "triton" and registry.interpreting():
            found.append(Provider(name, _fixed(registry.resolve(op, name)), timed=False, note=INTERPRETER_NOTE))
        elif registry.usable(op, name, device, backward=False):
            forward_only = not registry.usable(op, name, device)
            fn = registry.resolve(op, name, device=device, backward=False)
            note = f"forward only on {device.type}" if forward_only else ""
            found.append(Provider(name, _fixed(fn), note=note, backward=not forward_only))
            if backend.prepared is not None:
                found.append(Provider(f"{name} (prepared)", _prepared(backend.prepared),
                                      note=join_notes(note, "mask built outside the timed calls"),
                                      backward=not forward_only))
        elif needs == "cuda":
            skipped.append({"op": op, "provider": name, "reason": "needs CUDA"})
        else:
            found.append(Provider(name, None, note="needs a CUDA device (or TRITON_INTERPRET=1)"))
    if compile:
        found.append(Provider(COMPILE, _compiled(registry.resolve(op, BASELINE)), scope=_keep_saved_buffers))
    else:
        skipped.append({"op": op, "provider": COMPILE, "reason": "--no-compile"})
    return found, skipped


# ----------------------------------------------------------------------------------------------
# The device's ceilings and the input sets


def ceilings(device: torch.device, dtype: torch.dtype, timer: Timer) -> dict:
    """What this device reaches on the simplest kernels, measured now with the same timer: GB/s
    of a large device-to-device copy (read + write) and TFLOP/s of a large matmul in `dtype`."""
    cuda = device.type == "cuda"
    copy_bytes = (256 << 20 if timer.quick else 1 << 30) if cuda else (16 << 20 if timer.quick else 256 << 20)
    n = (4096 if timer.quick else 8192) if cuda else (512 if timer.quick else 1024)
    copy_ms = _time_binary(timer, torch.Tensor.copy_, torch.empty(copy_bytes // 4, device=device),
                           torch.rand(copy_bytes // 4, device=device))
    matmul_ms = _time_binary(timer, torch.matmul, *(torch.randn(n, n, device=device).to(dtype) for _ in range(2)))
    free_memory(device)
    return {"copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9, "copy_bytes": copy_bytes,
            "matmul_tflops": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e12,
            "matmul": f"{n}x{n} @ {n}x{n} {dtype_name(dtype)}"}


def _time_binary(timer: Timer, fn: Callable, a: torch.Tensor, b: torch.Tensor) -> float:
    """Milliseconds of fn(a, b); the tensors are freed when this returns."""
    return timer(lambda: fn(a, b))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def input_sets(spec: OpSpec, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[Inputs]:
    """Random input sets of `case` to rotate through while timing: on CUDA enough that together
    they overflow L2 four times (at most MAX_COPIES), one on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    first = spec.make_inputs(case, dtype, device, gen)
    copies = 1
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        copies = max(1, min(MAX_COPIES, math.ceil(4 * l2 / first.nbytes)))
    return [first] + [spec.make_inputs(case, dtype, device, gen) for _ in range(copies - 1)]


# ----------------------------------------------------------------------------------------------
# Running the sweep


def run_op(op: str, *, device: torch.device, dtype: torch.dtype, quick: bool, timer: Timer,
           ceiling: dict, compile: bool = True, seed: int = 0,
           log: Callable[[str], None] = lambda message: None) -> tuple[list[dict], list[dict]]:
    """Rows for every (case, provider, mode) of `op`, and the peers skipped here. Providers that
    are only checked for correctness (the interpreter) run on the tiny case alone."""
    found, skipped = providers(op, device, compile)
    for s in skipped:
        log(f"[{op}] skipping {s['provider']}: {s['reason']}")
    spec = registry.spec(op)
    cases = spec.cases(quick)
    tiny = spec.cases(True)[0]
    if any(not p.timed for p in found) and tiny not in cases:
        cases.insert(0, tiny)
    rows = []
    for i, case in enumerate(cases):
        log(f"[{op} {i + 1}/{len(cases)}] {case.shape}")
        here = [p for p in found if p.timed or case == tiny]
        rows += run_case(spec, case, here, device=device, dtype=dtype, timer=timer, ceiling=ceiling,
                         seed=seed + i, log=log)
    return rows, skipped


def run_case(spec: OpSpec, case: Case, found: list[Provider], *, device: torch.device, dtype: torch.dtype,
             timer: Timer, ceiling: dict, seed: int = 0,
             log: Callable[[str], None] = lambda message: None) -> list[dict]:
    """Rows of one case: every provider on the same inputs, errors against one reference."""
    sets = input_sets(spec, case, dtype, device, seed)
    try:
        ref = spec.oracle(sets[0], reference_dtype(dtype, device))
    except Exception as exc:  # e.g. out of memory: the rows keep their times, errors say why not
        ref = describe_error(exc)
        log(f"  reference failed: {ref}")
    free_memory(device)
    rows: list[dict] = []
    for p in found:
        with p.scope():
            rows += _measure(spec, case, p, sets, ref, device=device, dtype=dtype, timer=timer, ceiling=ceiling,
                             log=log)
        free_memory(device)
    _compare(rows, row_tolerance(dtype, device))
    return rows


def _measure(spec: OpSpec, case: Case, p: Provider, sets: list[Inputs], ref: tuple | str, *,
             device: torch.device, dtype: torch.dtype, timer: Timer, ceiling: dict,
             log: Callable[[str], None]) -> list[dict]:
    tiles = spec.tiles(case) if spec.tiles is not None else None
    rows = {mode: blank_row(op=case.op, provider=p.name, mode=mode, series=case.series, shape=case.shape,
                            size=case.size, dtype=dtype_name(dtype), tiles=tiles, note=p.note)
            for mode in MODES}
    if p.make is None:
        log(f"  {p.name:<16} {p.note}")
        return list(rows.values())
    try:
        fn = p.make(sets[0])
        if p.backward:
            out = call(fn, sets[0])
            gradients = grads(out, sets[0])
            errs = {} if isinstance(ref, str) else errors(out, gradients, ref)
        else:
            with torch.no_grad():
                out, gradients = call(fn, sets[0]), ()
            errs = {} if isinstance(ref, str) else {"err_out": errors(out, (), ref)["err_out"]}
        del out, gradients
    except Exception as exc:
        note = describe_error(exc)
        log(f"  {p.name:<16} cannot run: {note}")
        for row in rows.values():
            row["note"] = join_notes(p.note, note)
        return list(rows.values())
    for row in rows.values():
        row.update(errs)
        row["note"] = join_notes(row["note"], f"no errors: reference failed ({ref})" if isinstance(ref, str) else "")
    if not p.timed:
        log(f"  {p.name:<16} {p.note}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        return list(rows.values())
    for mode, row in rows.items():
        if not p.backward and mode != "fwd":
            row["note"] = join_notes(row["note"], "no backward here")
            continue
        try:
            with contextlib.nullcontext() if p.backward else torch.no_grad():
                ms = timer(runner(mode, fn, sets))
                peak = peak_mb(runner(mode, fn, sets[:1]), device)
        except Exception as exc:
            row["note"] = join_notes(row["note"], describe_error(exc))
            log(f"  {p.name:<16} {mode:<8} failed: {row['note']}")
            free_memory(device)
            continue
        unit, amount = spec.work(case, mode, dtype)
        rate = amount / (ms * 1e-3) / (1e12 if unit == "tflops" else 1e9)
        top = ceiling["matmul_tflops" if unit == "tflops" else "copy_gbps"]
        row.update({"ms": ms, unit: rate, "pct_peak": 100 * rate / top, "peak_mem_mb": peak})
        log(f"  {p.name:<16} {mode:<8} {ms:10.4f} ms  {rate:8.2f} {'TFLOP/s' if unit == 'tflops' else 'GB/s'}")
    return list(rows.values())


def _compare(rows: list[dict], tol: float) -> None:
    """Speedups over BASELINE, and a flag on rows whose error exceeds max(tol, 2x BASELINE's own
    error). Non-finite errors are flagged and become None (JSON has no inf)."""
    base = {r["mode"]: r for r in rows if r["provider"] == BASELINE}
    limits = {}
    for key in ("err_out", "err_grad"):
        own = [r[key] for r in base.values() if r[key] is not None and math.isfinite(r[key])]
        limits[key] = max(tol, 2 * max(own)) if own else tol
    for row in rows:
        ref = base.get(row["mode"])
        if ref is not None and ref["ms"] and row["ms"]:
            row["speedup"] = ref["ms"] / row["ms"]
        for key, limit in limits.items():
            err = row[key]
            if err is not None and not err <= limit:  # also catches NaN
                row["note"] = join_notes(row["note"], f"{FLAG} ({key} {err:.2e} > {limit:.1e})")
                row[key] = err if math.isfinite(err) else None
