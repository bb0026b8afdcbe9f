"""Training-step benchmark: one GPT training step (forward, backward, AdamW) for combinations
of backends, each from the same seed on the same batch.

    tritongpt bench step                                   # GPT-2 124M, B=16, T=1024, bf16 autocast
    tritongpt bench step --preset gpt2-medium --batch-size 8 --seq-len 1024
    tritongpt bench step --quick                           # the tiny preset, CPU-sized
    tritongpt bench step --doc-mask --seq-len 8192         # packed documents: attention within each

Combinations: torch eager + SDPA (the baseline), torch.compile + SDPA, and for every other
backend name registered for the ops (e.g. `triton`): all ops on it, all ops on it compiled, and
each op alone on it (the others at the baseline). Each row gives ms/step, tokens/s, MFU
(model.flops_per_token against the matmul ceiling measured in the same run), peak memory and
the loss after the same number of steps; losses that disagree with the baseline's are flagged.
With --doc-mask every row of the batch is packed documents (doc ids drawn as in the attention
spec's packed cases, median min(DOC_MEDIAN, T / 4) tokens) and attention stays inside each one:
the `sdpa` rows then pass a dense (T, T) mask, `flex` a block mask built every step, `triton`
and `flash_attn` skip the tiles outside the documents.
For a GPT-2-form preset (without --doc-mask) two more rows train the same model (the same weights,
exported with save_hf) as a Hugging Face GPT2LMHeadModel on the same batch with the same
optimizer: `hf` as transformers runs it (SDPA attention), `hf+patch` after `tritongpt.patch(model)`
(auto backends); their losses are compared with the baseline's like every row's.
Peak memory: on CUDA the allocator's peak over the run; on a CPU the peak resident memory of a
fresh process that takes RSS_STEPS training steps of the combination (eager ones), so each
backend, the loss's `linear_cross_entropy=chunked` included, is measured alone.
With --ranks N two more rows, `ddp xN` and `fsdp xN`, train the baseline on the same batch split
over N processes under torchrun (bench/step_parallel.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tritongpt.bench.sweeps import INTERPRETER_NOTE, free_memory
from tritongpt.bench.tables import blank_row, join_notes
from tritongpt.kernels import registry
from tritongpt.kernels.attention_spec import DOC_MEDIAN, packed_doc_ids
from tritongpt.kernels.measure import describe_error, sync
from tritongpt.kernels.spec import dtype_name
from tritongpt.model.config import GPTConfig, check_preset
from tritongpt.model.gpt import GPT
from tritongpt.model.hf import save_hf
from tritongpt.train import config as train_config

BASELINE = "eager+sdpa"
LOSS_FLAG = "LOSS DISAGREES"
# Relative loss difference from the baseline allowed after the same steps, by compute dtype.
LOSS_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Combo:
    name: str
    backends: tuple[tuple[str, str], ...]  # (op, backend name) for every op
    compiled: bool

    @property
    def label(self) -> str:
        return " ".join(f"{op}={name}" for op, name in self.backends)


def combos(ops: tuple[str, ...], compile: bool = True) -> list[Combo]:
    """The combinations of a model calling `ops` (its config's `ops`): the eager and compiled
    baseline (SDPA attention, torch for the rest), then for each other registered backend name:
    all ops on it (eager, compiled) and each op alone on it."""
    base = {op: "torch" for op in ops}
    if "sdpa" in registry.backends("attention"):
        base["attention"] = "sdpa"
    found = [Combo(BASELINE, tuple(base.items()), False)]
    if compile:
        found.append(Combo("compile+sdpa", tuple(base.items()), True))
    # every other backend name, but not SDPA pinned to one of its kernels (the kernel sweeps show those)
    names = sorted({n for op in ops for n in registry.backends(op) if n != "torch" and not n.startswith("sdpa")})
    for name in names:
        ops_with = [op for op in ops if name in registry.backends(op)]
        if len(ops_with) == len(ops):
            every = tuple((op, name) for op in ops)
            found.append(Combo(name, every, False))
            if compile:
                found.append(Combo(f"{name}+compile", every, True))
        for op in ops_with:
            found.append(Combo(f"{op}={name}", tuple({**base, op: name}.items()), False))
    return found


def run_step(*, preset: str, batch_size: int, seq_len: int, device: torch.device, dtype: torch.dtype,
             steps: int, warmup: int, ceiling: dict, compile: bool = True, seed: int = 0,
             log: Callable[[str], None] = lambda message: None, deadline: float | None = None,
             doc_mask: bool = False, more_rows: Callable[[], list[dict]] | None = None) -> list[dict]:
    """One row per combination (see `combos`). Every combination starts from the same seed and
    trains on the same batch (packed documents with `doc_mask`): at least `warmup` steps, more
    until the step time is steady (no compile or autotune left in it), then `steps` timed steps.
    `loss` is the loss of step warmup + steps, the same step for every combination. Combinations
    not started by `deadline` (time.monotonic()) get a row saying so. The rows `more_rows()` gives
    (--ranks: step_parallel's, which imports this module) come last, compared like every row."""
    check_preset(preset)
    block, batch = _block_and_batch(preset, batch_size, seq_len, seed, device, doc_mask)
    rows = []
    todo = combos(GPTConfig.from_preset(preset).ops, compile)
    for i, combo in enumerate(todo):
        log(f"[step {i + 1}/{len(todo)}] {combo.name}: {combo.label}")
        if deadline is not None and time.monotonic() > deadline:
            rows.append(blank_row(op="step", provider=combo.name, mode="train", series=preset, size=seq_len,
                                  shape=_shape(preset, batch), dtype=dtype_name(dtype),
                                  backends=combo.label, note="not run: out of time budget"))
            continue
        rows.append(_run_combo(combo, preset=preset, block=block, batch=batch, device=device, dtype=dtype,
                               steps=steps, warmup=warmup, ceiling=ceiling, seed=seed, log=log))
        if combo.compiled:
            torch._dynamo.reset()
        free_memory(device)
    if not doc_mask and GPTConfig.from_preset(preset).ffn == "gelu":  # a GPT-2 transformers has
        rows += [_hf_row(provider, preset=preset, block=block, batch=batch, device=device, dtype=dtype, steps=steps,
                         warmup=warmup, seed=seed, log=log) for provider in (HF_PLAIN, HF_PATCHED)]
    if more_rows is not None:
        rows += more_rows()
    _compare(rows, loss_tolerance(dtype, device))
    return rows


def _block_and_batch(preset: str, batch_size: int, seq_len: int, seed: int, device: torch.device,
                     doc_mask: bool = False) -> tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(block_size, (inputs, next-token targets, doc ids)): the model's positions and the one
    batch, (B, T) each; doc ids of packed documents with `doc_mask`, else None."""
    config = GPTConfig.from_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, config.real_vocab_size, (batch_size, seq_len + 1), generator=gen)  # (B, T + 1)
    median = max(1, min(DOC_MEDIAN, seq_len // 4))
    docs = packed_doc_ids(batch_size, seq_len, median, seed).to(device) if doc_mask else None
    return max(seq_len, config.block_size), (seq[:, :-1].to(device), seq[:, 1:].to(device), docs)


def _shape(preset: str, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> str:
    b, t = batch[0].shape
    return f"{preset} B={b} T={t}" + (" packed docs" if batch[2] is not None else "")


def loss_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative loss difference allowed: LOSS_TOL, or 1e-4 for fp32 on the CPU (no tf32 dots)."""
    return 1e-4 if dtype == torch.float32 and device.type == "cpu" else LOSS_TOL[dtype]


def _run_combo(combo: Combo, *, preset: str, block: int, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
               device: torch.device, dtype: torch.dtype, steps: int, warmup: int, ceiling: dict, seed: int,
               log: Callable[[str], None]) -> dict:
    b, t = batch[0].shape
    row = blank_row(op="step", provider=combo.name, mode="train", series=preset, shape=_shape(preset, batch),
                    size=t, dtype=dtype_name(dtype), backends=combo.label)
    uses_triton = any(registry.backend(op, name).needs == "triton" for op, name in combo.backends)
    interpreted = uses_triton and registry.interpreting()  # correctness only, never timed
    unusable = [f"{op}={name}" for op, name in combo.backends if not registry.usable(op, name, device)]
    skip = (f"{', '.join(unusable)} cannot run on {device.type}" if unusable
            else "skipped: torch.compile around interpreted Triton kernels" if interpreted and combo.compiled
            else "")
    if skip:
        row["note"] = skip
        log(f"  {skip}")
        return row
    row["note"] = INTERPRETER_NOTE if interpreted else ""
    try:
        model, optimizer = _model_and_optimizer(preset, block, dict(combo.backends), device, seed)
        row["backends"] = " ".join(f"{op}={n}" for op, n in model.backend_names().items())
        forward = torch.compile(model) if combo.compiled else model
        autocast = _autocast(device, dtype)

        times, losses = _timed_steps(lambda: _train_step(forward, optimizer, batch, autocast), device, steps, warmup)
        row["loss"] = losses[warmup + steps - 1].item()  # the same step in every combination
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if not interpreted:  # torch-only combinations are timed on the CPU too (CPU times)
            ms = statistics.median(times) * 1e3
            tokens_per_s = b * t / (ms * 1e-3)
            tflops = model.flops_per_token(t) * tokens_per_s / 1e12
            row.update(ms=ms, tokens_per_s=tokens_per_s, tflops=tflops,
                       pct_peak=100 * tflops / ceiling["matmul_tflops"])
            log(f"  {ms:.2f} ms/step, {tokens_per_s:.0f} tokens/s, loss {row['loss']:.4f}")
        else:
            log(f"  {row['note']}: loss {row['loss']:.4f}")
        if device.type == "cpu" and not interpreted and not combo.compiled:
            row["peak_mem_mb"] = fresh_process_peak_rss_mb(combo, preset, b, t, dtype, seed, batch[2] is not None)
            log(f"  peak resident memory {row['peak_mem_mb']:.0f} MiB (a fresh process)")
    except Exception as exc:  # unsupported combination, out of memory: a row that says so
        row["note"] = describe_error(exc)
        log(f"  failed: {row['note']}")
    return row


def _timed_steps(train_step: Callable[[], torch.Tensor], device: torch.device, steps: int, warmup: int,
                 settled: Callable[[list[float]], bool] | None = None) -> tuple[list[float], list[torch.Tensor]]:
    """(seconds of the `steps` timed steps, the loss of every step): at least `warmup` steps, more
    until `settled(warm-up seconds)` (default `steady`), then the timed ones; the CUDA peak-memory
    counter starts here."""
    settled = settled or steady
    def timed_step() -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        loss = train_step()
        sync(device)
        return time.perf_counter() - start, loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, warm = [], []
    while len(warm) < warmup or (not settled(warm) and len(warm) < MAX_WARMUP):
        seconds, loss = timed_step()
        warm.append(seconds)
        losses.append(loss)
    times = []
    for _ in range(steps):
        seconds, loss = timed_step()
        times.append(seconds)
        losses.append(loss)
    return times, losses


HF_PLAIN, HF_PATCHED = "hf", "hf+patch"  # the providers of the Hugging Face rows


def _hf_row(provider: str, *, preset: str, block: int, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
            device: torch.device, dtype: torch.dtype, steps: int, warmup: int, seed: int,
            log: Callable[[str], None]) -> dict:
    """The combinations' model (the same weights from `seed`) as a transformers GPT2LMHeadModel
    training on the batch with the same optimizer: as transformers runs it (HF_PLAIN), or after
    tritongpt.patch with auto backends (HF_PATCHED)."""
    import transformers  # lazy: an optional dependency (the `hf` extra), needed by these rows only

    from tritongpt.model import patch  # lazy: it imports transformers
    b, t = batch[0].shape
    log(f"[step] {provider}: transformers GPT2LMHeadModel" + (" + tritongpt.patch" * (provider == HF_PATCHED)))
    row = blank_row(op="step", provider=provider, mode="train", series=preset, shape=_shape(preset, batch),
                    size=t, dtype=dtype_name(dtype), backends="transformers (sdpa)")
    try:
        ours, _ = _model_and_optimizer(preset, block, {}, device, seed)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(ours, Path(tmp) / "model")
            model = transformers.GPT2LMHeadModel.from_pretrained(Path(tmp) / "model", attn_implementation="sdpa")
        model.to(device).train()
        interpreted = False
        if provider == HF_PATCHED:
            chosen = patch.patch(model)
            row["backends"] = " ".join(f"{op}={n}" for op, n in chosen.items())
            interpreted = registry.interpreting() and any(registry.backend(op, n).needs == "triton"
                                                          for op, n in chosen.items())
        row["note"] = INTERPRETER_NOTE if interpreted else ""
        run = train_defaults(preset)
        # GPT's parameter groups (weight decay on >= 2-dim parameters); it reads only .parameters()
        optimizer = GPT.configure_optimizer(model, run.weight_decay, run.lr, (run.beta1, run.beta2), device.type)

        def forward(inputs: torch.Tensor, targets: torch.Tensor, _docs) -> tuple[None, torch.Tensor]:
            return None, model(inputs, labels=targets, shift_labels=targets.contiguous(), use_cache=False).loss

        autocast = _autocast(device, dtype)
        times, losses = _timed_steps(lambda: _train_step(forward, optimizer, batch, autocast), device, steps, warmup)
        row["loss"] = losses[warmup + steps - 1].item()
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if not interpreted:  # CPU times on a CPU
            ms = statistics.median(times) * 1e3
            row.update(ms=ms, tokens_per_s=b * t / (ms * 1e-3))
        speed = f"{row['ms']:.2f} ms/step" if row["ms"] else row["note"]
        log(f"  {speed}, loss {row['loss']:.4f}")
    except Exception as exc:  # out of memory, an unsupported shape: a row that says so
        row["note"] = describe_error(exc)
        log(f"  failed: {row['note']}")
    free_memory(device)
    return row


def _model_and_optimizer(preset: str, block: int, backends: dict[str, str], device: torch.device, seed: int
                         ) -> tuple[GPT, torch.optim.Optimizer]:
    """The combination's model (`_model`) and its optimizer (`_optimizer`)."""
    model = _model(preset, block, backends, device, seed)
    return model, _optimizer(model, preset, device)


def _model(preset: str, block: int, backends: dict[str, str], device: torch.device, seed: int) -> GPT:
    """The combination's model, from `seed` and without dropout."""
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, block_size=block, dropout=0.0, **backends)).to(device)


def _optimizer(model: GPT, preset: str, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `tritongpt train --preset PRESET` would give `model` (under FSDP: its shards)."""
    run = train_defaults(preset)
    return model.configure_optimizer(run.weight_decay, run.lr, (run.beta1, run.beta2), device.type)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` for fp16/bf16; nothing for float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def _train_step(forward: Callable, optimizer: torch.optim.Optimizer,
                batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """One training step (forward under `autocast`, backward, optimizer step); the loss, detached."""
    with autocast:
        _, loss = forward(*batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


RSS_STEPS = 2  # steps of the fresh process measured on a CPU: the second has the optimizer's state too
# The fresh process: RSS_STEPS steps of one combination, then its peak resident memory (MiB) on stdout.
_RSS_CHILD = ("import json, sys\nfrom tritongpt.bench import step\n"
              "print(step.step_peak_rss_mb(**json.loads(sys.argv[1])))")


def fresh_process_peak_rss_mb(combo: Combo, preset: str, batch_size: int, seq_len: int, dtype: torch.dtype,
                              seed: int, doc_mask: bool = False) -> float:
    """Peak resident memory (MiB) of a new Python process that builds the combination's model and
    takes RSS_STEPS training steps on the CPU: one process per backend, so nothing an earlier
    combination allocated (and the allocator kept) counts."""
    args = dict(preset=preset, backends=dict(combo.backends), batch_size=batch_size, seq_len=seq_len,
                dtype=dtype_name(dtype), seed=seed, doc_mask=doc_mask)
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory process failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(done.stdout.strip().splitlines()[-1])


def step_peak_rss_mb(*, preset: str, backends: dict[str, str], batch_size: int, seq_len: int, dtype: str,
                     seed: int, doc_mask: bool = False) -> float:
    """In the fresh process: RSS_STEPS CPU training steps with `backends`, then `peak_rss_mb`."""
    cpu = torch.device("cpu")
    block, batch = _block_and_batch(preset, batch_size, seq_len, seed, cpu, doc_mask)
    model, optimizer = _model_and_optimizer(preset, block, backends, cpu, seed)
    autocast = _autocast(cpu, getattr(torch, dtype))
    for _ in range(RSS_STEPS):
        _train_step(model, optimizer, batch, autocast)
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource  # lazy: Unix only, and only processes measuring themselves read it

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


MAX_WARMUP = 20  # warm-up steps at most while waiting for a steady step time
STEADY = 0.1  # steady: the last two warm-up steps within 10% of each other


def steady(seconds: list[float]) -> bool:
    """The step time has settled: nothing compiles or autotunes in the last two steps."""
    return len(seconds) >= 2 and abs(seconds[-1] - seconds[-2]) <= STEADY * min(seconds[-2:])


def train_defaults(preset: str):
    """The TrainConfig `tritongpt train --preset PRESET` would use: its optimizer settings."""
    return train_config.resolve({"preset": preset})


def _compare(rows: list[dict], tol: float) -> None:
    """Speedups over the baseline, and a flag on losses further than `tol` (relative) from its."""
    base = next((r for r in rows if r["provider"] == BASELINE), None)
    if base is None or base["loss"] is None:
        return
    for row in rows:
        if base["ms"] and row["ms"]:
            row["speedup"] = base["ms"] / row["ms"]
        if row["loss"] is None:
            continue
        diff = abs(row["loss"] - base["loss"]) / abs(base["loss"])
        if not math.isfinite(row["loss"]) or diff > tol:
            flag = f"{LOSS_FLAG} with {BASELINE} ({row['loss']:.5g} vs {base['loss']:.5g})"
            row["note"] = join_notes(row["note"], flag)
            if not math.isfinite(row["loss"]):
                row["loss"] = None
