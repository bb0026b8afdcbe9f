"""The training step spread over N processes: the `ddp xN` and `fsdp xN` rows of `bench step`.

    tritongpt bench step --ranks 2                            # GPT-2 124M over 2 GPUs, B=16 (8 rows a rank)
    tritongpt bench step --quick --device cpu --ranks 2       # the tiny preset, 2 CPU processes (gloo)
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tritongpt.bench.step_parallel \
        '{"mode": "fsdp", "preset": "tiny", "batch_size": 2, "seq_len": 32, "device": "cpu", "dtype": "float32",
          "steps": 2, "warmup": 1, "seed": 0, "doc_mask": false, "out": "/tmp/fsdp.json"}'   # one mode by hand

Each row trains the baseline combination (step.BASELINE: eager, SDPA attention, torch for the
rest) from the same seed on the same global batch as the other rows of `bench step`, its rows
split evenly over the ranks, under DistributedDataParallel (`ddp`: train/parallel.replicate) or
FSDP2 (`fsdp`: train/parallel.shard, before the optimizer is built, as the trainer does). One
torchrun per mode, nccl on GPUs (one per rank) and gloo on the CPU. Every rank averages the same
share of rows and the gradients are averaged over the ranks, so the loss after the same step
(the ranks' mean) is the baseline's up to rounding and is compared with it like every row's.

ms/step: the median over the timed steps of the slowest rank's time; tokens/s counts the whole
batch; peak memory is the largest rank's (CUDA: the allocator's peak; CPU: the rank process's
peak resident memory); the note gives the most parameter + optimizer-state bytes a rank holds
(train/parallel.local_bytes: FSDP's shards are about 1/N of DDP's full copy). On a CPU the N
processes share the cores (each gets the bench's threads / N unless OMP_NUM_THREADS says
otherwise), so the times are CPU times of processes competing for them.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from tritongpt.bench import step
from tritongpt.bench.tables import blank_row
from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write_bytes
from tritongpt.kernels.measure import describe_error
from tritongpt.kernels.spec import dtype_name
from tritongpt.model.config import GPTConfig
from tritongpt.train import distributed, parallel

MODES = ("ddp", "fsdp")
MODULE = "tritongpt.bench.step_parallel"  # what torchrun runs on every rank (this file's `main`)
FAILED = "bench step rank failed: "  # starts the line a failing rank prints last on stderr
LAUNCH_TIMEOUT = 3600  # seconds one torchrun may take before its process group is killed


def check_ranks(ranks: int, batch_size: int, device: torch.device) -> None:
    """Raise TritonGPTError unless `ranks` processes can split the batch on `device`."""
    if ranks < 2:
        raise TritonGPTError(f"--ranks must be >= 2 (leave it out for no parallel rows), got {ranks}")
    if batch_size % ranks:
        raise TritonGPTError(f"--batch-size {batch_size} does not split into {ranks} equal shares of rows "
                             f"(--ranks {ranks}): use a multiple of {ranks}")
    if device.type == "cuda" and torch.cuda.device_count() < ranks:
        raise TritonGPTError(f"--ranks {ranks} needs {ranks} GPUs (one per rank); "
                             f"this machine has {torch.cuda.device_count()}")


def parallel_rows(ranks: int, *, preset: str, batch_size: int, seq_len: int, device: torch.device,
                  dtype: torch.dtype, steps: int, warmup: int, seed: int, doc_mask: bool = False,
                  log: Callable[[str], None] = lambda message: None, deadline: float | None = None) -> list[dict]:
    """The `ddp xN` and `fsdp xN` rows (N = `ranks`) of step.run_step's settings, one torchrun
    each; a mode that fails, or is not started by `deadline` (time.monotonic()), gets a row saying so."""
    check_ranks(ranks, batch_size, device)
    cpu = torch.device("cpu")
    shape = step._shape(preset, step._block_and_batch(preset, batch_size, seq_len, seed, cpu, doc_mask)[1])
    rows = []
    for mode in MODES:
        row = blank_row(op="step", provider=f"{mode} x{ranks}", mode="train", series=preset, shape=shape,
                        size=seq_len, dtype=dtype_name(dtype), backends=_baseline(preset).label)
        log(f"[step] {row['provider']}: {step.BASELINE} under {mode} over {ranks} processes (torchrun)")
        if deadline is not None and time.monotonic() > deadline:
            row["note"] = "not run: out of time budget"
        else:
            args = _args(mode, preset=preset, batch_size=batch_size, seq_len=seq_len, device=device, dtype=dtype,
                         steps=steps, warmup=warmup, seed=seed, doc_mask=doc_mask)
            row.update(_launch(args, ranks, device))
        if row["ms"]:
            log(f"  {row['ms']:.2f} ms/step, loss {row['loss']:.4f}, peak {row['peak_mem_mb']:.0f} MiB; {row['note']}")
        else:
            log(f"  {row['note']}")
        rows.append(row)
    return rows


def _baseline(preset: str) -> step.Combo:
    """step.BASELINE's combination for the preset's ops."""
    return next(c for c in step.combos(GPTConfig.from_preset(preset).ops, compile=False) if c.name == step.BASELINE)


def _args(mode: str, *, device: torch.device, dtype: torch.dtype, **settings) -> dict:
    """The JSON-able keyword arguments of `_worker` (but `out`, the result file's path)."""
    return dict(mode=mode, device=device.type, dtype=dtype_name(dtype), **settings)


def _launch(args: dict, ranks: int, device: torch.device) -> dict:
    """Run one mode under torchrun; the row's values from rank 0's result, or a note on failure."""
    env = dict(os.environ)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in env:  # the bench's threads shared out over the ranks
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // ranks))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                "-m", MODULE, json.dumps({**args, "out": str(out)})]
        code, stderr = _run_group(argv, env)
        if code != 0 or not out.exists():
            return {"note": f"failed: {_failure(code, stderr)}"}
        result = json.loads(out.read_text())
    return _row_values(result, ranks, args["batch_size"] * args["seq_len"], device)


def _run_group(argv: list[str], env: dict[str, str]) -> tuple[int | str, str]:
    """(exit code, or "timeout" after LAUNCH_TIMEOUT, stderr) of `argv` in a session of its own,
    killed with everything it started (torchrun's ranks) when it runs too long."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the ranks can be killed with it
    try:
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank (they share its process group)
        return "timeout", proc.communicate()[1]
    return proc.returncode, stderr


def _failure(code: int | str, stderr: str) -> str:
    """One line on why a torchrun failed: the error a rank reported, else how torchrun ended."""
    reported = [line.split(FAILED, 1)[1] for line in stderr.splitlines() if FAILED in line]
    if reported:
        return reported[0]
    if code == "timeout":
        return f"torchrun killed after {LAUNCH_TIMEOUT} s"
    return f"torchrun exited with code {code}" + (" without a result" if code == 0 else "")


def _row_values(result: dict, ranks: int, tokens: int, device: torch.device) -> dict:
    """A row's ms, tokens_per_s, peak_mem_mb, loss, backends and note from rank 0's result."""
    notes = [f"{ranks} ranks ({result['backend']}); per rank: params+optimizer "
             f"{result['local_bytes'] / 2**20:.1f} MiB"]
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = result["threads"]
        notes.append(f"CPU times of {ranks} processes ({threads} thread{'s' * (threads != 1)} each) "
                     f"sharing {cores} cores")
    return dict(ms=result["ms"], tokens_per_s=tokens / (result["ms"] * 1e-3), peak_mem_mb=result["peak_mem_mb"],
                loss=result["loss"], backends=result["backends"], note="; ".join(notes))


# ----------------------------------------------------------------------------------------------
# On every rank (under torchrun)


def main(argv: list[str]) -> None:
    """One rank: `_worker` with the JSON keyword arguments in argv[0]. A failure prints its
    traceback and then one FAILED line (the parent's note); the exit skips interpreter shutdown
    (distributed.end_worker says why)."""
    code = 0
    try:
        _worker(**json.loads(argv[0]))
    except Exception as exc:  # any failure: the parent turns the FAILED line into the row's note
        traceback.print_exc()
        print(FAILED + describe_error(exc), file=sys.stderr, flush=True)
        code = 1
    finally:
        distributed.cleanup()
    distributed.end_worker(code)


def _worker(*, mode: str, preset: str, batch_size: int, seq_len: int, device: str, dtype: str, steps: int,
            warmup: int, seed: int, doc_mask: bool, out: str) -> None:
    """Train the baseline on this rank's rows under `mode`; rank 0 writes the ranks' result to `out`."""
    d = distributed.setup(device)
    compute = getattr(torch, dtype)  # "float32" -> torch.float32
    block, batch = step._block_and_batch(preset, batch_size, seq_len, seed, d.device, doc_mask)  # the global batch
    share = batch_size // d.world_size
    mine = tuple(None if t is None else t[d.rank * share:(d.rank + 1) * share] for t in batch)  # this rank's rows
    model = step._model(preset, block, dict(_baseline(preset).backends), d.device, seed)
    forward = _spread(mode, model, d, compute)
    optimizer = step._optimizer(model, preset, d.device)  # after shard: it holds this rank's shards under FSDP
    autocast = step._autocast(d.device, compute)

    def settled(seconds: list[float]) -> bool:  # every rank warms up alike (each step is a collective)
        return not distributed.any_rank(d, not step.steady(seconds))

    times, losses = step._timed_steps(lambda: step._train_step(forward, optimizer, mine, autocast), d.device,
                                      steps, warmup, settled)
    loss = distributed.mean(d, losses[warmup + steps - 1]).item()  # the global batch's loss at the rows' step
    peak = torch.cuda.max_memory_allocated(d.device) / 2**20 if d.device.type == "cuda" else step.peak_rss_mb()
    ranks = distributed.gather(d, dict(times=times, peak=peak, local_bytes=parallel.local_bytes(model, optimizer)))
    if d.is_main:
        slowest = [max(at_step) for at_step in zip(*(r["times"] for r in ranks))]  # a step ends with its slowest rank
        result = dict(ms=statistics.median(slowest) * 1e3, loss=loss, peak_mem_mb=max(r["peak"] for r in ranks),
                      local_bytes=max(r["local_bytes"] for r in ranks), backend=torch.distributed.get_backend(),
                      threads=torch.get_num_threads(),
                      backends=" ".join(f"{op}={n}" for op, n in model.backend_names().items()))
        atomic_write_bytes(Path(out), json.dumps(result).encode())  # a temporary file, then renamed


def _spread(mode: str, model: torch.nn.Module, d: distributed.Dist, dtype: torch.dtype) -> torch.nn.Module:
    """What the step calls: `model` under DDP, or `model` sharded in place by FSDP2 (its gathered
    parameters in `dtype`, or their own fp32 for float32)."""
    if mode == "ddp":
        return parallel.replicate(model, d)
    if mode == "fsdp":
        return parallel.shard(model, d, param_dtype=None if dtype == torch.float32 else dtype)
    raise TritonGPTError(f"unknown parallel mode {mode!r}: one of {', '.join(MODES)}")


if __name__ == "__main__":
    main(sys.argv[1:])
