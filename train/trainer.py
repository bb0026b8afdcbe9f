"""The training loop: schedule, accumulation, autocast, eval, logging, checkpoints, DDP.

    tritongpt train                                    # tinyshakespeare, a preset sized for the device
    tritongpt train --data data/fineweb --preset gpt2 --out runs/gpt2 --compile
    tritongpt train --out runs/gpt2 --resume           # continue from the newest checkpoint
    torchrun --standalone --nproc_per_node=8 -m tritongpt.cli train --preset gpt2 --data DIR

One optimizer step = grad_accum micro-batches per rank, each (batch_size, block_size) tokens,
under autocast (bf16 on CUDA; fp16 with a GradScaler; fp32 off). AdamW from
model.configure_optimizer, linear warmup then cosine to min_lr, global-norm gradient clipping.
Under torchrun the model is wrapped in DistributedDataParallel and each rank reads its own part
of every batch (the loader's rank/world_size); rank 0 prints and writes OUT. SIGINT/SIGTERM
finish the current step, save a checkpoint and exit (a second signal acts as usual).

The guard (UpdateGuard): an update whose loss or gradient norm is not finite, or with
--skip-spikes whose loss spikes, is not applied. The decision is made on the device from values
all-reduced over the ranks (identical everywhere, so replicas never drift apart) and the step is
skipped there too (fused AdamW's found_inf, as the GradScaler does), so a step adds no host sync;
the host reads the guard's records at log and checkpoint steps. fp16 overflow skips stay the
GradScaler's and are not counted. After --max-skipped-steps skipped in a row the run stops with
one line and exit code 3 (DIVERGED_EXIT); no checkpoint ever holds a non-finite value.

OUT/metrics.jsonl gets one JSON object per log step (step, loss, lr, grad_norm, tokens_per_s,
mfu, tokens, backends; `skipped` when that step's update was), per other skipped step (step,
skipped: "nonfinite" or "spike", loss, grad_norm, loss_z), per evaluation (step, val_loss) and
per HellaSwag evaluation (step, hellaswag_acc, hellaswag_acc_norm); a non-finite value is
written as null. The same records feed the optional dashboards (train/dashboards.py). MFU is
model FLOPs per second per GPU over the GPU's dense tensor-core peak for the autocast dtype
(--peak-tflops, else the table in train/mfu.py); it is null on the CPU and on GPUs missing from
the table.

--init-from hf:DIR | ckpt:PATH starts from the weights of a Hugging Face GPT-2 or a checkpoint
(train/init_from.py), with a fresh optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write
from tritongpt.kernels import registry
from tritongpt.kernels.spec import DTYPES
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.progress import Progress
from tritongpt.train import checkpoint, distributed, init_from
from tritongpt.train.config import TrainConfig
from tritongpt.train.dashboards import Dashboards, check_available
from tritongpt.train.evaluate import evaluate, task_items
from tritongpt.train.mfu import peak_flops

DIVERGED_EXIT = 3  # exit code of a run stopped by --max-skipped-steps

# Why a step's update was skipped: the bits of StepRecord.flags.
LOSS_NONFINITE, GRAD_NONFINITE, LOSS_SPIKE, HALTED = 1, 2, 4, 8


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` -> bf16 on a CUDA GPU that supports it, else fp32 (fp16 needs CUDA)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise TritonGPTError(f"dtype fp16 needs a CUDA device (device is {device}); use bf16 or fp32")
    return name


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or cfg.max_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def doc_ids_from(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) document ids: each eot token starts a new document (shards put eot before each)."""
    return torch.cumsum((idx == eot_id).to(torch.int32), dim=1)


def configure(flags: dict[str, str] | None = None, toml_path: str | Path | None = None,
              env: Mapping[str, str] | None = None) -> TrainConfig:
    """The config of a run: resolved from defaults, preset, TOML, flags and `env` (the backend
    variables; the command line passes os.environ), or — with resume and a checkpoint in OUT —
    from the checkpoint's config with the TOML and flags on top."""
    from tritongpt.train import config

    out = config.peek("out", flags, toml_path)
    saved = checkpoint.newest_config(out) if config.peek("resume", flags, toml_path) else None
    if saved is None:
        return config.resolve(flags, toml_path, env=env)
    resumed = config.resolve(flags, toml_path, base=saved, env=env)
    return dataclasses.replace(resumed, out=out)  # where the checkpoint was found, even if the run directory moved


def resolve_backends(config: GPTConfig, device: torch.device, *, batch: int | None = None,
                     dtype: torch.dtype | None = None, log=print) -> GPTConfig:
    """`config` with each op's backend a registered name usable on `device`. Ops left on auto are
    measured on CUDA when `batch` and `dtype` are given (train/auto.py; under torchrun rank 0
    measures and every rank takes its choices); otherwise auto is the registry's."""
    auto_ops = [op for op in MODEL_OPS if (getattr(config, op) or config.backend or registry.AUTO) == registry.AUTO]
    measured: dict[str, str] = {}
    if auto_ops and batch and dtype is not None and device.type == "cuda" and not registry.interpreting():
        import torch.distributed as dist

        from tritongpt.data.assets import cache_dir
        from tritongpt.train.auto import CACHE_FILE, DecisionCache, choose_backends

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
                                          for op in MODEL_OPS})


def default_data(d: distributed.Dist) -> Path:
    """tinyshakespeare as shards in the data cache (prepared once, by rank 0)."""
    from tritongpt.data import assets, prepare

    out_dir = assets.cache_dir() / "tinyshakespeare"
    if d.is_main and not (out_dir / "meta.json").is_file():
        print(f"preparing tinyshakespeare shards in {out_dir}")
        prepare.prepare("tinyshakespeare", out_dir, force=True)
    distributed.barrier(d)
    return out_dir


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What the guard saw at one optimizer step (read back from the device by UpdateGuard.drain)."""
    step: int
    loss: float  # mean over the ranks
    grad_norm: float  # before clipping
    flags: int  # LOSS_NONFINITE | GRAD_NONFINITE | LOSS_SPIKE | HALTED; 0: the update was applied
    streak: int  # updates skipped in a row, this one included
    loss_z: float  # standard deviations above the spike window's mean (nan while the window fills)

    @property
    def skipped(self) -> str | None:
        """None when the update was applied, else "nonfinite" or "spike"."""
        if self.flags & (LOSS_NONFINITE | GRAD_NONFINITE):
            return "nonfinite"
        return "spike" if self.flags & LOSS_SPIKE else None

    def reason(self) -> str:
        """Why the update was skipped, e.g. "loss nan, grad norm nan" or "grad norm inf (loss 3.2100)"."""
        if self.skipped == "spike":
            return f"loss {self.loss:.4f} is {self.loss_z:.1f} std above the running mean"
        if not self.flags & LOSS_NONFINITE:
            return f"grad norm {self.grad_norm} (loss {self.loss:.4f})"
        return f"loss {self.loss}" + (f", grad norm {self.grad_norm}" if self.flags & GRAD_NONFINITE else "")


class UpdateGuard:
    """Decides on the device, with no host sync, whether each optimizer step's update is applied.

    Not when the loss or (with `count_grad`) the gradient norm is not finite; not when, with
    `spike_z`, the loss is more than spike_z standard deviations above the mean of the last
    `window` finite losses (llm.c's outlier detector: every finite loss joins the window, so it
    follows a real change of level); and, as a latch, never again once `max_skipped` were skipped
    in a row (the host stops the run when it reads that). Each step's values stay on the device
    until `drain` reads them in one transfer. Its inputs must be identical on every rank."""

    def __init__(self, device: torch.device, max_skipped: int, spike_z: float | None, window: int,
                 count_grad: bool = True) -> None:
        self.max_skipped, self.spike_z, self.count_grad = max_skipped, spike_z, count_grad
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.window = torch.zeros(window, dtype=torch.float64, device=device)  # the last finite losses, oldest first
        self.seen = torch.zeros((), dtype=torch.int64, device=device)  # finite losses pushed into the window
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, row) not yet drained

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A bool device tensor: skip this step's update. Records the step for `drain`."""
        loss, grad_norm = loss.double(), grad_norm.double()
        loss_bad = ~torch.isfinite(loss)
        flags = loss_bad * LOSS_NONFINITE + (self.streak >= self.max_skipped) * HALTED
        if self.count_grad:
            flags = flags + ~torch.isfinite(grad_norm) * GRAD_NONFINITE
        loss_z = torch.full_like(loss, math.nan)
        if self.spike_z is not None:
            full = self.seen >= self.window.numel()
            loss_z = torch.where(full, (loss - self.window.mean()) / self.window.std(correction=0), math.nan)
            flags = flags + (~loss_bad & (loss_z > self.spike_z)) * LOSS_SPIKE
            self.window = torch.where(loss_bad, self.window, torch.cat([self.window[1:], loss.view(1)]))
            self.seen = self.seen + ~loss_bad
        skip = flags != 0
        self.streak = torch.where(skip, self.streak + 1, 0)
        self.pending.append((step, torch.stack([loss, grad_norm, flags.double(), self.streak.double(), loss_z])))
        return skip

    def drain(self) -> list[StepRecord]:
        """The records of the steps checked since the last drain, oldest first (one device read)."""
        if not self.pending:
            return []
        rows = torch.stack([row for _, row in self.pending]).tolist()
        records = [StepRecord(step, loss, grad_norm, int(flags), int(streak), loss_z)
                   for (step, _), (loss, grad_norm, flags, streak, loss_z) in zip(self.pending, rows)]
        self.pending = []
        return records

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert not self.pending, "drain the guard before saving it"
        return {"streak": self.streak, "window": self.window, "seen": self.seen}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.streak.copy_(state["streak"])
        if state["window"].shape == self.window.shape:  # else --spike-window changed: the window fills afresh
            self.window.copy_(state["window"])
            self.seen.copy_(state["seen"])


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (a bool tensor). Optimizers that take the GradScaler's
    found_inf (fused AdamW, the trainer's on CUDA) decide on the device, with no host sync, and
    leave params and state (its step count too) untouched; the others decide on the host."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf, optimizer.grad_scale = skip.float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not skip.item():
        optimizer.step()


def train(cfg: TrainConfig) -> int:
    """Run training as configured; returns the exit code (0; 128 + signal after a signal;
    DIVERGED_EXIT after --max-skipped-steps updates in a row were skipped)."""
    d = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, d).fit()
    finally:
        distributed.cleanup()


class Trainer:
    def __init__(self, cfg: TrainConfig, d: distributed.Dist) -> None:
        from tritongpt.data.loader import ShardLoader
        from tritongpt.model.gpt import GPT

        self.cfg, self.d, self.device = cfg, d, d.device
        self.out = Path(cfg.out)
        newest = checkpoint.latest(self.out)
        if newest is not None and not cfg.resume:
            raise TritonGPTError(f"{self.out} already holds checkpoints ({newest.name}); pass --resume to continue "
                                 f"that run or choose another --out")
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        check_available(cfg.tensorboard, cfg.wandb)  # a missing dashboard extra fails before anything is written
        self.hellaswag = task_items("hellaswag", limit=cfg.hellaswag_limit) if cfg.eval_hellaswag_interval else []
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")

        # the config records the backend names each op resolved to; a bad one fails before any write
        model_config = resolve_backends(cfg.model, self.device, batch=cfg.batch_size, dtype=DTYPES[self.dtype],
                                        log=print if d.is_main else lambda line: None)
        data = str(Path(cfg.data).resolve() if cfg.data else default_data(d).resolve())
        self.cfg = cfg = dataclasses.replace(cfg, data=data, model=model_config)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(cfg.model).to(self.device)
        # One loader step per optimizer step: the global batch of world_size * grad_accum * batch_size
        # windows depends only on (seed, step); this rank's rows are cut into grad_accum micro-batches.
        # So world_size x grad_accum can be traded for one another without changing what is trained on.
        self.loader = ShardLoader(cfg.data, "train", cfg.grad_accum * cfg.batch_size, cfg.model.block_size,
                                  seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                                  vocab_size=cfg.model.real_vocab_size)
        self.val_loader = ShardLoader(cfg.data, "val", cfg.batch_size, cfg.model.block_size, seed=cfg.seed,
                                      rank=d.rank, world_size=d.world_size, sequential=True,
                                      vocab_size=cfg.model.real_vocab_size)
        self.val_start = self.val_loader.state_dict()  # every evaluation reads the same val batches
        meta = self.loader.meta or {}
        self.eot_id = meta.get("eot_id")
        self.tokenizer = meta.get("tokenizer", "gpt2")
        if cfg.doc_mask and self.eot_id is None:
            raise TritonGPTError(f"doc_mask needs the eot id of the data; {cfg.data} has no meta.json with eot_id")
        self.optimizer = self.model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                                        self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")
        # fp16 gradients that overflow are the GradScaler's to skip, not a sign of divergence
        self.guard = UpdateGuard(self.device, cfg.max_skipped_steps, cfg.skip_spikes, cfg.spike_window,
                                 count_grad=not self.scaler.is_enabled())
        self.step = 0
        self.newest_ckpt: Path | None = None  # the newest checkpoint known to be good
        if newest is not None:
            self._resume()
        elif cfg.init_from:
            init_from.load_weights(self.model, cfg.init_from)
            torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank
        else:
            torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank

        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # no buffer is trained or mutated (the sinusoidal table is a constant): skip the per-forward broadcast
            self.forward = DDP(self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               broadcast_buffers=False)
        self.peak = peak_flops(self.device, self.dtype, cfg.peak_tflops)
        self.dashboards: Dashboards | None = None
        self.flops_per_token = self.model.flops_per_token()
        self.backends = self.model.backend_names()
        self.progress = Progress(cfg.max_steps, label="step", enabled=d.is_main)
        self.stop_signal: int | None = None

    # --- the loop -------------------------------------------------------------------------

    def fit(self) -> int:
        cfg, d = self.cfg, self.d
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.json",
                         lambda fh: fh.write(json.dumps(cfg.to_dict(), indent=2).encode() + b"\n"))
            self._start_metrics()
            self.dashboards = Dashboards(self.out, cfg.tensorboard, cfg.wandb, cfg.to_dict())
            n = self.model.num_params()
            print(f"training {cfg.preset} model, {n / 1e6:.2f}M params, on {self.device} ({self.dtype}) x "
                  f"{d.world_size}; {cfg.tokens_per_step * d.world_size} tokens/step; backends "
                  + ", ".join(f"{op}={name}" for op, name in self.backends.items())
                  + (f"; resuming at step {self.step}" if self.step else ""))
            if cfg.resume and not self.step:
                print(f"--resume: no checkpoint in {self.out} yet, so starting at step 0")
        previous = self._install_signal_handlers()
        try:
            halted = self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.dashboards is not None:
                self.dashboards.close()
        if halted is not None:
            if d.is_main:
                self.progress.close()
                plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
                first = halted.step - halted.streak + 1
                print(f"stopped at step {halted.step}: {halted.streak} updates in a row skipped (steps {first}-"
                      f"{halted.step}; last: {halted.reason()}); newest good checkpoint: "
                      f"{self.newest_ckpt or 'none written'}", file=sys.stderr, flush=True)
            return DIVERGED_EXIT
        if self.stop_signal is not None:
            if d.is_main:
                self.progress.write(f"stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; "
                                    f"checkpoint saved in {self.out}")
            return 128 + self.stop_signal
        if d.is_main:
            self.progress.close()
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return 0

    def _loop(self) -> StepRecord | None:
        """Train to max_steps or a signal; the record of the step that stopped the run when
        max_skipped_steps updates in a row were skipped."""
        cfg = self.cfg
        tokens_per_step = cfg.tokens_per_step * self.d.world_size
        timer, steps_timed = time.perf_counter(), 0
        while self.step < cfg.max_steps:
            lr = self._advance()
            steps_timed += 1
            stop = distributed.any_rank(self.d, self.stop_signal is not None)
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM  # another rank was signalled
            last = self.step == cfg.max_steps
            log = self.step % cfg.log_interval == 0 or last or stop
            save = self.step % cfg.ckpt_interval == 0 or last or stop
            if log or save:  # the guard's records are read here only: no host sync in the steps between
                records = self.guard.drain()
                halted = self._report_skips(records, logged=self.step if log else None)
                if halted is not None:
                    return halted
            if log:
                elapsed = time.perf_counter() - timer
                tokens_per_s = tokens_per_step * steps_timed / elapsed
                per_gpu_flops = tokens_per_s / self.d.world_size * self.flops_per_token
                self._log(records[-1], lr=lr, tokens_per_s=tokens_per_s,
                          mfu=per_gpu_flops / self.peak if self.peak else None, tokens=self.step * tokens_per_step)
                timer, steps_timed = time.perf_counter(), 0
            else:
                self.progress.update(self.step)
            if self.step % cfg.eval_interval == 0 or last:
                self._evaluate(final=last)
                timer, steps_timed = time.perf_counter(), 0
            if self.hellaswag and (self.step % cfg.eval_hellaswag_interval == 0 or last):
                self._evaluate_hellaswag()
                timer, steps_timed = time.perf_counter(), 0
            if save:
                self._save()
                timer, steps_timed = time.perf_counter(), 0
            if stop:
                return None
        return None

    def _advance(self) -> float:
        """One optimizer step at the scheduled learning rate (returned); reads nothing back from
        the device."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._train_step()
        self.step += 1
        return lr

    def _train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches, its update applied unless the guard
        (or, for fp16, the GradScaler) skips it."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        xs, ys = self._batch(self.loader)
        for micro in range(cfg.grad_accum):
            rows = slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)
            x, y = xs[rows], ys[rows]
            # DDP all-reduces gradients only on the last micro-batch of the step
            sync = micro == cfg.grad_accum - 1 or not self.d.enabled
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                with self._autocast():
                    _, loss = self.forward(x, y, doc_ids=self._doc_ids(x))
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # the loss differs per rank and the gradients are all-reduced already: average both, so the
        # guard sees the same values on every rank (and the grad norm of a world of one unchanged)
        loss, grad_norm = distributed.mean(self.d, torch.stack([loss_sum / cfg.grad_accum, grad_norm.float()]))
        skip = self.guard.check(self.step + 1, loss, grad_norm)
        if self.scaler.is_enabled():  # unscale_ found the same overflow; its update() backs off the scale
            skip = skip | ~torch.isfinite(grad_norm)
        step_unless(self.optimizer, skip)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _batch(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = loader.next_batch()
        pin = self.device.type == "cuda"
        return (x.pin_memory().to(self.device, non_blocking=True) if pin else x,
                y.pin_memory().to(self.device, non_blocking=True) if pin else y)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32")

    def _doc_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        return doc_ids_from(x, self.eot_id) if self.cfg.doc_mask else None

    @torch.no_grad()
    def _evaluate(self, final: bool) -> None:
        """Mean val loss over eval_steps batches (the same batches every time) and a sample."""
        cfg = self.cfg
        self.model.eval()
        self.val_loader.load_state_dict(self.val_start)
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.eval_steps):
            x, y = self._batch(self.val_loader)
            with self._autocast():
                total += self.model(x, y, doc_ids=self._doc_ids(x))[1].float()
        val_loss = distributed.mean(self.d, total / cfg.eval_steps).item()
        if self.d.is_main:
            self._write_metrics(dict(step=self.step, val_loss=val_loss))
            self.progress.write(f"step {self.step}: val loss {val_loss:.4f}")
            if cfg.sample_tokens:
                self.progress.write(("final sample" if final else "sample") + ": "
                                    + self.sample(cfg.sample_tokens).replace("\n", "\n  "))
        self.model.train()

    def _evaluate_hellaswag(self) -> None:
        """HellaSwag accuracy (llm.c's scoring, train/evaluate.py): each rank scores every
        world_size-th item, the counts are summed."""
        from tritongpt.data.tokenizer import get_encoding

        mine = self.hellaswag[self.d.rank::self.d.world_size]
        with self._autocast():
            result = evaluate(self.model, get_encoding(self.tokenizer), mine, self.device) if mine else None
        counts = torch.tensor([0.0, 0.0, 0.0] if result is None else
                              [result["items"], result["acc"] * result["items"], result["acc_norm"] * result["items"]],
                              device=self.device, dtype=torch.float64)
        items, correct, correct_norm = (distributed.mean(self.d, counts) * self.d.world_size).tolist()
        if self.d.is_main:
            record = dict(step=self.step, hellaswag_acc=correct / items, hellaswag_acc_norm=correct_norm / items)
            self._write_metrics(record)
            self.progress.write(f"step {self.step}: hellaswag acc {record['hellaswag_acc']:.4f}, acc_norm "
                                f"{record['hellaswag_acc_norm']:.4f} ({items:.0f} items)")

    def sample(self, max_new_tokens: int) -> str:
        """A sample from the model, starting at the eot token, with a fixed seed (the training RNG
        is not touched)."""
        from tritongpt.data.tokenizer import get_encoding
        from tritongpt.train.sample import stream_text

        enc = get_encoding(self.tokenizer)
        start = self.eot_id if self.eot_id is not None else enc.eot_token
        idx = torch.tensor([[start]], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            text = "".join(stream_text(enc, self.model.generate_stream(
                idx, max_new_tokens, temperature=0.8, top_k=200, generator=generator)))
        self.model.train(was_training)
        return text

    # --- checkpoints ----------------------------------------------------------------------

    def _save(self) -> None:
        """Rank 0 writes the checkpoint; a failure (non-finite state, disk full, no permission)
        stops every rank with one error naming the file and the newest good checkpoint."""
        rngs = distributed.gather(self.d, checkpoint.rng_state())
        loaders = distributed.gather(self.d, self.loader.state_dict())
        error: TritonGPTError | None = None
        if self.d.is_main:
            state = dict(step=self.step, model=self.model.state_dict(), config=self.cfg.to_dict(),
                         optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), rng=rngs,
                         loader=loaders, tokenizer=self.tokenizer, world_size=self.d.world_size,
                         guard=self.guard.state_dict())
            try:
                checkpoint.save(self.out, state, keep=self.cfg.keep_ckpts)
            except TritonGPTError as exc:
                error = exc
        if distributed.any_rank(self.d, error is not None):  # also the barrier after the save
            newest = f"newest good checkpoint: {self.newest_ckpt or 'none written'}"
            raise TritonGPTError(f"{error}; {newest}" if error else
                                 f"rank 0 could not write the checkpoint of step {self.step}; {newest}") from error
        self.newest_ckpt = checkpoint.path_for(self.out, self.step)

    def _resume(self) -> None:
        """Restore the newest checkpoint in OUT that loads and is finite, warning about each newer
        one passed over."""
        path, ckpt, passed_over = checkpoint.newest_good(self.out, "cpu")
        if self.d.is_main:
            for problem in passed_over:
                print(f"warning: passing over {problem}; resuming from {path.name}", file=sys.stderr, flush=True)
        self._restore(ckpt, path)
        self.newest_ckpt = path

    def _restore(self, ckpt: dict[str, Any], source: Path) -> None:
        checkpoint.load_weights(self.model, ckpt["model"], source)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if "guard" in ckpt:  # checkpoints from before the guard start it afresh
            self.guard.load_state_dict(ckpt["guard"])
        self.step = ckpt["step"]
        self.loader.load_state_dict(ckpt["loader"][0])  # the loader state is the same on every rank
        if ckpt["world_size"] == self.d.world_size:
            checkpoint.set_rng_state(ckpt["rng"][self.d.rank])
            return
        # Another world size: the data order continues (it depends on seed and step only, so keep
        # world_size * grad_accum * batch_size), but each rank's random generators start afresh.
        torch.manual_seed(self.cfg.seed + self.d.rank + self.step)
        if self.d.is_main:
            print(f"note: {source} was saved by {ckpt['world_size']} processes, this run has {self.d.world_size}: "
                  f"same data order, fresh random generators (not bitwise the run that was saved)")

    # --- logging --------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        """A fresh metrics.jsonl, or on resume the old one cut back to the checkpoint's step."""
        path = self.out / "metrics.jsonl"
        kept = []
        if self.step and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
        atomic_write(path, lambda fh: fh.write("".join(line + "\n" for line in kept).encode()))

    def _write_metrics(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.dashboards is not None:
            self.dashboards.write(record)

    def _report_skips(self, records: list[StepRecord], logged: int | None) -> StepRecord | None:
        """Write each skipped step to metrics.jsonl (but step `logged`, whose log record says so)
        and the screen; the record at which max_skipped_steps were skipped in a row, if any."""
        for record in records:
            if record.skipped is None:
                continue
            halting = record.streak >= self.cfg.max_skipped_steps
            if self.d.is_main:
                if record.step != logged or halting:
                    self._write_metrics(dict(step=record.step, skipped=record.skipped, loss=_finite(record.loss),
                                             grad_norm=_finite(record.grad_norm), loss_z=_finite(record.loss_z)))
                self.progress.write(f"step {record.step}: update skipped, {record.reason()} "
                                    f"({record.streak} in a row)")
            if halting:
                return record
        return None

    def _log(self, last: StepRecord, lr: float, tokens_per_s: float, mfu: float | None, tokens: int) -> None:
        """The log record of step `last` (its loss, grad norm, and whether its update was skipped)."""
        if not self.d.is_main:
            return
        record = dict(step=last.step, loss=_finite(last.loss), lr=lr, grad_norm=_finite(last.grad_norm),
                      tokens_per_s=tokens_per_s, mfu=mfu, tokens=tokens, backends=self.backends)
        if last.skipped:
            record.update(skipped=last.skipped, loss_z=_finite(last.loss_z))
        self._write_metrics(record)
        mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        self.progress.update(self.step, f"loss {last.loss:.4f} | lr {record['lr']:.2e} | "
                                        f"grad {last.grad_norm:.2f} | {record['tokens_per_s']:,.0f} tok/s | "
                                        f"mfu {mfu}" + (" | skipped" if last.skipped else ""), log=True)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM set stop_signal (the loop saves and exits); the old handler comes back
        at once, so a second signal acts as it would have."""
        previous: dict[int, Any] = {}

        def on_signal(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, previous[signum])

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, on_signal)
            except ValueError:  # not the main thread: no handlers
                break
        return previous


def _finite(value: float) -> float | None:
    """`value` for metrics.jsonl: JSON has no NaN or infinity, so those become null."""
    return value if math.isfinite(value) else None


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """Train and val loss (and HellaSwag accuracy, when scored) against step from metrics.jsonl, as a
    PNG (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "skipped" not in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if train or val:  # a run stopped early may have logged no loss yet
        ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    hellaswag = [(r["step"], r["hellaswag_acc_norm"]) for r in records if "hellaswag_acc_norm" in r]
    if hellaswag:  # accuracy on its own axis, right
        acc = ax.twinx()
        acc.plot(*zip(*hellaswag), color="tab:green", marker="s", label="hellaswag acc_norm")
        acc.set_ylabel("hellaswag acc_norm")
        acc.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(png, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return png
