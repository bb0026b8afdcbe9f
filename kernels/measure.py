"""Timing and checking one backend of an op on given inputs: what `tritongpt bench`, `tritongpt
verify` and the measured `auto` (train/auto.py) share.

    timer = Timer(torch.device("cuda"))
    ms = timer(runner("fwd+bwd", fn, [inputs]))              # median ms of forward + backward
    result = check(spec, fn, inputs, reference=spec.oracle(inputs, torch.float32), baseline_errors=...)

`errors_ok` is the one correctness rule: relative error within the dtype's tolerance and, for
fp16/bf16 on a GPU, at most 2x the error PyTorch's own reference makes in the same dtype
(flash-attention's rule). NaN never passes.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tritongpt.kernels.spec import Inputs, call, describe_mismatch, first, grads, rel_err, tolerance

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Timer:
    """Median milliseconds of a no-argument callable: triton.testing.do_bench on CUDA (which
    also flushes L2 between calls), a time.perf_counter loop on the CPU."""
    device: torch.device
    quick: bool = False

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "triton.testing.do_bench median; L2 flushed and inputs rotated across copies"
        return "CPU TIMES: wall-clock median of time.perf_counter loops on the CPU, not GPU speed"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench  # lazy: triton times CUDA only; the CPU timer needs none
            warmup, rep = (5, 20) if self.quick else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        budget_s = 0.05 if self.quick else 0.5
        fn()  # warm-up: first-call allocations and lazy initialization
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at the peak of one call of `fn`, above what was allocated before it (the
    inputs); None on the CPU, which has no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def runner(mode: str, fn: Callable, sets: list[Inputs]) -> Callable[[], object]:
    """A no-argument callable running `mode` ("fwd", "bwd" or "fwd+bwd") once, on the next input
    set in turn. Gradients come from torch.autograd.grad (nothing accumulates into .grad); `bwd`
    reuses graphs built here."""
    turn = itertools.cycle(range(len(sets)))
    if mode == "fwd":
        return lambda: call(fn, sets[next(turn)])
    if mode == "bwd":
        outs = [call(fn, s) for s in sets]

        def backward() -> object:
            i = next(turn)
            return grads(outs[i], sets[i], retain_graph=True)
        return backward

    def forward_backward() -> object:
        s = sets[next(turn)]
        return grads(call(fn, s), s)
    return forward_backward


def errors(out: object, gradients: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, list[torch.Tensor]]
           ) -> dict[str, float]:
    """{"err_out", "err_grad"}: relative errors of the primary output and of the worst input gradient."""
    ref_out, ref_grads = reference
    return {"err_out": rel_err(first(out), ref_out),
            "err_grad": max((rel_err(g, r) for g, r in zip(gradients, ref_grads)), default=0.0)}


def worst_mismatch(out: object, gradients: tuple[torch.Tensor, ...],
                   reference: tuple[torch.Tensor, list[torch.Tensor]], limit: float) -> str:
    """Which tensor (the output or input gradient i) is furthest from `reference`, and its
    describe_mismatch at relative `limit`."""
    pairs = [("output", first(out), reference[0])] + [
        (f"grad {i}", g, r) for i, (g, r) in enumerate(zip(gradients, reference[1]))]
    name, actual, expected = max(pairs, key=lambda p: rel_err(p[1], p[2]))
    return f"{name}: {describe_mismatch(actual, expected, limit)}"


def limit_for(dtype: torch.dtype, device: torch.device) -> float:
    """The relative-error tolerance of `dtype` here (fp32 matmuls may run as tf32 on a GPU)."""
    return tolerance(dtype, tf32=device.type == "cuda")


def errors_ok(errs: dict[str, float], dtype: torch.dtype, device: torch.device,
              baseline: dict[str, float] | None = None) -> tuple[bool, str]:
    """(passes, why not): each error within the dtype's tolerance (tf32 for fp32 on a GPU) and, for
    fp16/bf16 on a GPU, at most 2x `baseline` (PyTorch's own error in the same dtype)."""
    limit = limit_for(dtype, device)
    for key, err in errs.items():
        if not err <= limit:  # also NaN
            return False, f"{key} {err:.2e} > tolerance {limit:.0e}"
        if baseline is not None and dtype in LOW_PRECISION and device.type == "cuda" and not err <= 2 * baseline[key]:
            return False, f"{key} {err:.2e} > 2x PyTorch's own {baseline[key]:.2e}"
    return True, ""


@dataclass
class Check:
    """One backend on one input set: errors, determinism, speed."""
    ran: bool = False  # the forward and backward ran (False: it raised; `why` says what)
    errors: dict[str, float] = field(default_factory=dict)
    ok: bool = False  # ran, errors pass `errors_ok`, and a claimed determinism held
    why: str = ""  # what failed, or why it could not run or be timed
    deterministic: bool | None = None  # rerun bitwise equal; None: not checked (not claimed)
    first_call_s: float | None = None  # the first call's forward + backward (compile, autotune), seconds
    ms: float | None = None  # median fwd+bwd milliseconds; None: not timed


def check(fn: Callable, inputs: Inputs, reference: tuple[torch.Tensor, list[torch.Tensor]], dtype: torch.dtype,
          device: torch.device, *, baseline: dict[str, float] | None = None, claims_determinism: bool = False,
          timer: Timer | None = None) -> Check:
    """Run fn on inputs (forward + backward): errors against `reference` by `errors_ok`, a bitwise
    rerun if it claims determinism, and the median fwd+bwd time if a timer is given and it is
    correct. Exceptions (an unsupported shape, out of memory, a broken plugin) become `why`."""
    result = Check()
    try:
        sync(device)
        start = time.perf_counter()
        out = call(fn, inputs)
        gradients = grads(out, inputs)
        sync(device)
        result.first_call_s = time.perf_counter() - start
    except Exception as exc:
        result.why = describe_error(exc)
        return result
    result.ran = True
    result.errors = errors(out, gradients, reference)
    result.ok, result.why = errors_ok(result.errors, dtype, device, baseline)
    if not result.ok:
        result.why += f" ({worst_mismatch(out, gradients, reference, limit_for(dtype, device))})"
    try:
        if claims_determinism:
            again = call(fn, inputs)
            result.deterministic = torch.equal(first(again), first(out)) and all(
                torch.equal(a, b) for a, b in zip(grads(again, inputs), gradients))
            if not result.deterministic:
                rerun = worst_mismatch(again, grads(again, inputs), (first(out), list(gradients)), 0.0)
                result.ok, result.why = False, result.why or f"claims determinism, but a rerun differs ({rerun})"
        del out, gradients
        if timer is not None and result.ok:
            result.ms = timer(runner("fwd+bwd", fn, [inputs]))
    except Exception as exc:  # correct, but the rerun or the timing could not run (e.g. out of memory)
        result.why = result.why or f"not timed: {describe_error(exc)}"
    return result


def describe_error(exc: BaseException) -> str:
    """One short line for a note: the exception type and the first line of its message, at most
    200 characters."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:200]
