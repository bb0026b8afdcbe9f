"""`tritongpt verify`: is every backend of every op correct here, at a real model's shapes, and how fast?

    tritongpt verify                                    # gpt2, B=8, T=1024, bf16 on CUDA; + 16k-token attention
    tritongpt verify --preset gpt2-medium --batch-size 4 --seq-len 2048 --dtype fp16
    tritongpt verify --json verify.json                 # the rows as JSON too
    TRITON_INTERPRET=1 tritongpt verify                 # a CPU: the interpreter's correctness check at small shapes

One table; exit 1 on any correctness failure. For each op (`tritongpt kernels list`) and each
backend usable here, on the shapes the model calls the op at (each op's spec gives them; the
op's quick cases on a CPU): forward and backward
max relative error against the op's reference run in float64 (CPU) or fp32 (GPU), passing when
within the dtype's tolerance and, for fp16/bf16 on a GPU, at most 2x the error PyTorch's own
reference makes in the same dtype; a rerun that must be bitwise equal where the backend claims
determinism; the first call's time (compile and autotune included); the median forward+backward
time next to the `torch` backend and torch.compile of it. A backend that declares it cannot run
a shape (the project's TritonGPTError, raised for an unsupported shape or dtype) or runs out of
memory is reported as "cannot run", not failed; any other exception, forward or backward, from a
plugin or a built-in backend, is a failure with its message. On a CPU nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from tritongpt.bench.sweeps import default_dtype, pick_device
from tritongpt.bench.tables import aligned, device_name, fmt, log, versions
from tritongpt.errors import TritonGPTError, require
from tritongpt.files import atomic_write_bytes
from tritongpt.kernels import registry
from tritongpt.kernels.measure import Timer, check, describe_error
from tritongpt.kernels.spec import DTYPES, call, dtype_name, grads
from tritongpt.model.config import GPTConfig, check_preset

COLUMNS = ("op", "backend", "shape", "dtype", "status", "err_out", "err_grad", "torch_err", "deterministic",
           "first_call_s", "fwd_bwd_ms", "speedup", "note")
COMPILED = "torch.compile"  # torch.compile of the op's reference, timed beside the backends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2", help="model whose shapes are checked (default gpt2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's block size)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the header and rows here")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    parser.add_argument("--seed", type=int, default=0, help="seed of every input")


def run(args: argparse.Namespace) -> int:
    check_preset(args.preset)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    require(args.seq_len is None or args.seq_len >= 1, f"--seq-len must be >= 1, got {args.seq_len}")
    require(args.json is None or args.json.parent.is_dir(), f"--json: directory {args.json and args.json.parent} "
                                                            f"does not exist")
    config = GPTConfig.from_preset(args.preset)
    head, rows = verify(config, args.batch_size, args.seq_len, device, dtype, compile=args.compile, seed=args.seed,
                        log=log)
    print(format_table(head, rows))
    if args.json is not None:
        atomic_write_bytes(args.json, json.dumps({"header": head, "rows": rows}, indent=1).encode() + b"\n")
        print(f"wrote {args.json}")
    failed = [r for r in rows if r["status"] == "FAIL"]
    for r in failed:
        print(f"FAILED: {r['op']} backend {r['backend']} at {r['shape']} {r['dtype']}: {r['note']}")
    return 1 if failed else 0


def verify(config, batch: int, seq_len: int | None, device: torch.device, dtype: torch.dtype, *, compile: bool = True,
           seed: int = 0, log: Callable[[str], None] = lambda message: None,
           ops: list[str] | None = None) -> tuple[dict, list[dict]]:
    """(header, rows) for every usable backend of every op (or of `ops`) at `config`'s shapes."""
    timed = device.type == "cuda" and not registry.interpreting()
    timer = Timer(device, quick=True) if timed else None
    shape = config.shape(batch, seq_len)
    rows, skipped = [], []
    for op in ops or registry.ops():
        spec = registry.spec(op)
        if not timed or spec.model_cases is None:  # small shapes (a CPU), or an op the model does not call
            cases = spec.cases(not timed)[:1] if spec.model_cases is None else spec.cases(True)[:1]
        else:
            cases = spec.model_cases(shape)
        names = [n for n in registry.backends(op) if registry.usable(op, n, device)]
        skipped += [{"op": op, "backend": n, "reason": f"needs {registry.backend(op, n).needs}"}
                    for n in registry.backends(op) if n not in names]
        for case in cases:
            log(f"[verify] {op} {case.shape}")
            inputs = spec.make_inputs(case, dtype, device, torch.Generator(device=device).manual_seed(seed))
            reference = spec.oracle(inputs, torch.float64 if device.type == "cpu" else torch.float32)
            own = check(spec.reference, inputs, reference, dtype, device, timer=timer)  # PyTorch's own error
            baseline = own.errors if own.errors else None
            candidates = [(n, registry.backend(op, n).fn, registry.backend(op, n).deterministic) for n in names]
            if compile and timed:
                candidates.append((COMPILED, torch.compile(spec.reference, dynamic=False), False))
            for name, fn, deterministic in candidates:
                result = own if name == "torch" else check(fn, inputs, reference, dtype, device, baseline=baseline,
                                                           claims_determinism=deterministic, timer=timer)
                rows.append(_row(op, name, case.shape, dtype, result, status(result, fn, inputs), baseline, own.ms))
                log(f"  {name:<16} {rows[-1]['status']} {rows[-1]['note']}")
            del inputs, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return header(device, dtype, config, batch, seq_len, timed, skipped), rows


def declared_inability(exc: BaseException) -> bool:
    """Whether an exception says the backend cannot run these inputs, rather than that it is
    broken: the project's error for an unsupported shape or dtype, or out of memory."""
    return isinstance(exc, (TritonGPTError, torch.OutOfMemoryError))


def status(result, fn: Callable, inputs) -> str:
    """"ok", "FAIL", or "cannot run" (declared inability only). `check` keeps no exception, so one
    that raised is run again here (forward and backward) to see what it raises; a non-declared
    exception becomes the row's note."""
    if result.ran:
        return "ok" if result.ok else "FAIL"
    try:
        grads(call(fn, inputs), inputs)
    except Exception as exc:
        if declared_inability(exc):
            return "cannot run"
        result.why = describe_error(exc)
        return "FAIL"
    result.why = f"raised, then ran when called again: {result.why}"
    return "FAIL"


def _row(op: str, name: str, shape: str, dtype: torch.dtype, result, status: str, baseline: dict | None,
         torch_ms: float | None) -> dict:
    return {
        "op": op, "backend": name, "shape": shape, "dtype": dtype_name(dtype), "status": status,
        "err_out": result.errors.get("err_out"), "err_grad": result.errors.get("err_grad"),
        "torch_err": None if baseline is None or name == "torch" else max(baseline.values()),
        "deterministic": result.deterministic, "first_call_s": result.first_call_s, "fwd_bwd_ms": result.ms,
        "speedup": torch_ms / result.ms if torch_ms and result.ms else None, "note": result.why,
    }


def header(device: torch.device, dtype: torch.dtype, config, batch: int, seq_len: int | None, timed: bool,
           skipped: list[dict]) -> dict:
    return {
        "tool": "tritongpt verify", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), **versions(), "python": platform.python_version(), "dtype": dtype_name(dtype),
        "model": f"n_layer={config.n_layer} n_embd={config.n_embd} n_head={config.n_head} vocab={config.vocab_size}",
        "batch": batch, "seq_len": seq_len or config.block_size, "timed": timed,
        "interpreter": registry.interpreting(), "skipped": skipped,
    }


def format_table(head: dict, rows: list[dict]) -> str:
    lines = [f"tritongpt verify on {head['device']} | torch {head['torch']} | triton {head['triton']} | "
             f"{head['date']} | {head['dtype']} | {head['model']} B={head['batch']} T={head['seq_len']}"]
    if not head["timed"]:
        lines.append("no timing was taken (CPU" + (", Triton interpreter" if head["interpreter"] else "") +
                     "): correctness only, at small shapes")
    cols = [c for c in COLUMNS if c != "note"] + ["note"]
    lines += aligned([cols] + [[fmt(r[c]) for c in cols] for r in rows])
    for s in head["skipped"]:
        lines.append(f"not here: {s['op']} backend {s['backend']} ({s['reason']})")
    failed = sum(r["status"] == "FAIL" for r in rows)
    lines.append(f"{len(rows)} checks, {failed} failed" + ("" if failed else ": every backend is correct here"))
    return "\n".join(lines)

