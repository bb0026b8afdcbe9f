"""The training loop: schedule, accumulation, autocast, eval, logging, checkpoints, DDP/FSDP.

    tritongpt train                                    # tinyshakespeare, a preset sized for the device
    tritongpt train --data data/fineweb --preset gpt2 --out runs/gpt2 --compile
    tritongpt train --out runs/gpt2 --resume           # continue from the newest checkpoint
    torchrun --standalone --nproc_per_node=8 -m tritongpt.cli train --preset gpt2 --data DIR

One optimizer step = grad_accum micro-batches per rank, each (batch_size, block_size) tokens,
under autocast (bf16 on CUDA; fp16 with a GradScaler; fp32 off). AdamW, or Muon with AdamW
(train/optim.py), linear warmup then cosine to min_lr, global-norm gradient clipping;
the update is applied unless the guard (train/guard.py) skips it. Under torchrun the model is
wrapped in DistributedDataParallel, or with --parallel fsdp sharded by FSDP2 (train/parallel.py),
and each rank reads its own part of every batch (the loader's rank/world_size); rank 0 prints and
writes OUT (metrics: train/metrics.py; checkpoints, under FSDP each rank's shards:
train/checkpoint_manager.py); under FSDP the sample printed at evaluations comes from a full copy
gathered onto rank 0 alone. SIGINT/SIGTERM finish the current step, save a checkpoint and exit
(a second signal acts as usual: train/signals.py). A run starts from a checkpoint in OUT
(--resume), from --init-from weights (train/init_from.py), or afresh.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from tritongpt.data import assets, prepare
from tritongpt.data.loader import ShardLoader, doc_ids_from
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write
from tritongpt.kernels.measure import sync
from tritongpt.kernels.spec import DTYPES
from tritongpt.model.gpt import GPT
from tritongpt.progress import Progress
from tritongpt.train import checkpoint, distributed, init_from, optim, parallel, signals
from tritongpt.train.auto import resolve_backends
from tritongpt.train.checkpoint_manager import CheckpointManager
from tritongpt.train.config import TrainConfig, resolve_dtype
from tritongpt.train.evaluate import evaluate, task_items
from tritongpt.train.guard import DIVERGED_EXIT, StepRecord, UpdateGuard, step_unless
from tritongpt.train.metrics import METRICS_FILE, MetricsLog, check_available, log_record, plot_losses, skip_record
from tritongpt.train.mfu import peak_flops
from tritongpt.train.sample import stream_text


def default_data(d: distributed.Dist) -> Path:
    """tinyshakespeare as shards in the data cache (prepared once, by rank 0)."""
    out_dir = assets.cache_dir() / "tinyshakespeare"
    if d.is_main and not (out_dir / "meta.json").is_file():
        print(f"preparing tinyshakespeare shards in {out_dir}")
        prepare.prepare("tinyshakespeare", out_dir, force=True)
    distributed.barrier(d)
    return out_dir


def train(cfg: TrainConfig) -> int:
    """Run training as configured; returns the exit code (0; 128 + signal after a signal;
    DIVERGED_EXIT after --max-skipped-steps updates in a row were skipped)."""
    d = distributed.setup(cfg.device, group_of_one=cfg.parallel == "fsdp")
    try:
        return Trainer(cfg, d).fit()
    finally:
        distributed.cleanup()


class Trainer:
    def __init__(self, cfg: TrainConfig, d: distributed.Dist) -> None:
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
        if newest is None and cfg.init_from:
            init_from.copy_source_weights(self.model, cfg.init_from)
        self.mode = parallel.mode_of(cfg.parallel, d)  # "ddp", "fsdp" or None
        if self.mode == "fsdp":  # before the optimizer, which then holds each rank's shards
            parallel.shard(self.model, d, param_dtype=None if self.dtype == "fp32" else DTYPES[self.dtype],
                           reshard_after_forward=cfg.reshard_after_forward, cpu_offload=cfg.cpu_offload,
                           dp_shard=cfg.dp_shard)
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
        self.optimizer = optim.build(self.model, cfg.optimizer, self.device.type, lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                     muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
                                     muon_weight_decay=cfg.muon_weight_decay)
        # under FSDP each rank sees only its gradient shards: ShardedGradScaler agrees on overflow over all ranks
        scaler = ShardedGradScaler if self.mode == "fsdp" else torch.amp.GradScaler
        self.scaler = scaler(self.device.type, enabled=self.dtype == "fp16")
        # fp16 gradients that overflow are the GradScaler's to skip, not a sign of divergence
        self.guard = UpdateGuard(self.device, cfg.max_skipped_steps, cfg.skip_spikes, cfg.spike_window,
                                 count_grad=not self.scaler.is_enabled())
        self.step = 0
        self.checkpoints = CheckpointManager(self.out, d, self.mode, self.model, self.optimizer,
                                             keep=cfg.keep_ckpts, async_save=cfg.async_ckpt)
        if newest is not None:
            self._resume()
        else:
            torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank

        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if self.mode == "ddp":
            self.forward = parallel.replicate(self.forward, d)
        self.peak = peak_flops(self.device, self.dtype, cfg.peak_tflops)
        self.metrics: MetricsLog | None = None  # rank 0's, from fit()
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
            self.metrics = MetricsLog(self.out, self.step, cfg.tensorboard, cfg.wandb, cfg.to_dict())
            n = self.model.num_params()
            print(f"training {cfg.preset} model, {n / 1e6:.2f}M params, on {self.device} ({self.dtype}) x "
                  f"{d.world_size}; {cfg.tokens_per_step * d.world_size} tokens/step; backends "
                  + ", ".join(f"{op}={name}" for op, name in self.backends.items())
                  + (f"; resuming at step {self.step}" if self.step else ""))
            if cfg.resume and not self.step:
                print(f"--resume: no checkpoint in {self.out} yet, so starting at step 0")
        previous = signals.install(self._on_signal)
        try:
            halted = self._loop()
            self.checkpoints.finish_pending()
        finally:
            signals.restore(previous)
            if self.metrics is not None:
                self.metrics.close()
        if halted is None and self.stop_signal is not None:
            if d.is_main:
                self.progress.write(f"stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; "
                                    f"checkpoint saved in {self.out}")
            return 128 + self.stop_signal
        if d.is_main:
            self.progress.close()
            plot_losses(self.out / METRICS_FILE, self.out / "loss.png")
            if halted is not None:
                first = halted.step - halted.streak + 1
                print(f"stopped at step {halted.step}: {halted.streak} updates in a row skipped (steps {first}-"
                      f"{halted.step}; last: {halted.reason()}); newest good checkpoint: "
                      f"{self.checkpoints.newest or 'none written'}", file=sys.stderr, flush=True)
        return 0 if halted is None else DIVERGED_EXIT

    def _loop(self) -> StepRecord | None:
        """Train to max_steps or a signal; the record of the step that stopped the run when
        max_skipped_steps updates in a row were skipped."""
        cfg = self.cfg
        tokens_per_step = cfg.tokens_per_step * self.d.world_size
        timer, steps_timed = time.perf_counter(), 0
        start, aside_s = timer, 0.0  # aside_s: seconds in evaluations and checkpoints, not training
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
            evaluate = self.step % cfg.eval_interval == 0 or last
            hellaswag = bool(self.hellaswag) and (self.step % cfg.eval_hellaswag_interval == 0 or last)
            if evaluate or hellaswag or save:
                sync(self.device)  # the steps queued so far count as training time
                paused = time.perf_counter()
                if evaluate:
                    self._evaluate(final=last, train_s=paused - start - aside_s)
                if hellaswag:
                    self._evaluate_hellaswag()
                if save:
                    self._save()
                timer, steps_timed = time.perf_counter(), 0
                aside_s += timer - paused
            if stop:
                return None
        return None

    def _advance(self) -> float:
        """One optimizer step at the scheduled learning rate (returned); reads nothing back from
        the device."""
        lr = optim.lr_at(self.step, self.cfg.lr, self.cfg.min_lr, self.cfg.warmup_steps,
                          self.cfg.decay_steps or self.cfg.max_steps)
        optim.set_lr(self.optimizer, lr)
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
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) only on the last micro-batch of the step
            with parallel.gradient_sync(self.mode, self.model, self.forward, sync=micro == cfg.grad_accum - 1):
                with self._autocast():
                    _, loss = self.forward(x, y, doc_ids=self._doc_ids(x))
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = parallel.clip_grad_norm(self.model.parameters(), max_norm)  # the global norm, also under FSDP
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
    def _evaluate(self, final: bool, train_s: float) -> None:
        """Mean val loss over eval_steps batches (the same batches every time) and a sample; the
        record has `train_s`, this process's seconds of training so far (evaluations and
        checkpoints left out: what `tritongpt bench converge` reports)."""
        cfg = self.cfg
        self.model.eval()
        self.val_loader.load_state_dict(self.val_start)
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.eval_steps):
            x, y = self._batch(self.val_loader)
            with self._autocast():
                total += self.model(x, y, doc_ids=self._doc_ids(x))[1].float()
        val_loss = distributed.mean(self.d, total / cfg.eval_steps).item()
        # every rank joins an FSDP gather
        sampler = parallel.whole_model(self.model, self.mode, self.d) if cfg.sample_tokens else None
        if self.d.is_main:
            self.metrics.write(dict(step=self.step, val_loss=val_loss, train_s=train_s))
            self.progress.write(f"step {self.step}: val loss {val_loss:.4f}")
            if cfg.sample_tokens:
                self.progress.write(("final sample" if final else "sample") + ": "
                                    + self.sample(cfg.sample_tokens, sampler).replace("\n", "\n  "))
        self.model.train()

    def _evaluate_hellaswag(self) -> None:
        """HellaSwag accuracy (llm.c's scoring, train/evaluate.py): each rank scores every
        world_size-th item, the counts are summed."""
        model = parallel.whole_model(self.model, self.mode, self.d)
        # FSDP: rank 0 scores every item on its gathered copy (ranks never run unequal numbers of forwards)
        mine = (self.hellaswag if self.d.is_main else []) if self.mode == "fsdp" else \
            self.hellaswag[self.d.rank::self.d.world_size]
        with self._autocast():
            result = evaluate(model, get_encoding(self.tokenizer), mine, self.device) if mine else None
        counts = torch.tensor([0.0, 0.0, 0.0] if result is None else
                              [result["items"], result["acc"] * result["items"], result["acc_norm"] * result["items"]],
                              device=self.device, dtype=torch.float64)
        items, correct, correct_norm = (distributed.mean(self.d, counts) * self.d.world_size).tolist()
        if self.d.is_main:
            record = dict(step=self.step, hellaswag_acc=correct / items, hellaswag_acc_norm=correct_norm / items)
            self.metrics.write(record)
            self.progress.write(f"step {self.step}: hellaswag acc {record['hellaswag_acc']:.4f}, acc_norm "
                                f"{record['hellaswag_acc_norm']:.4f} ({items:.0f} items)")

    def sample(self, max_new_tokens: int, model: GPT | None = None) -> str:
        """A sample from `model` (default: the trained one, not under FSDP), starting at the eot
        token, with a fixed seed (the training RNG is not touched)."""
        model = model or self.model
        enc = get_encoding(self.tokenizer)
        start = self.eot_id if self.eot_id is not None else enc.eot_token
        idx = torch.tensor([[start]], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        was_training = model.training
        model.eval()
        with self._autocast():
            text = "".join(stream_text(enc, model.generate_stream(
                idx, max_new_tokens, temperature=0.8, top_k=200, generator=generator)))
        model.train(was_training)
        return text

    # --- checkpoints ----------------------------------------------------------------------

    def _save(self) -> None:
        """The checkpoint of this step (train/checkpoint_manager.py)."""
        rngs = distributed.gather(self.d, checkpoint.rng_state())
        loaders = distributed.gather(self.d, self.loader.state_dict())
        train_state = dict(step=self.step, config=self.cfg.to_dict(), scaler=self.scaler.state_dict(), rng=rngs,
                           loader=loaders, tokenizer=self.tokenizer, world_size=self.d.world_size,
                           guard=self.guard.state_dict())
        self.checkpoints.save(self.step, train_state)

    def _resume(self) -> None:
        """Restore the newest checkpoint in OUT that loads and is finite, warning about each newer
        one passed over."""
        path, ckpt, passed_over = self.checkpoints.load_newest()
        if self.d.is_main:
            for problem in passed_over:
                print(f"warning: passing over {problem}; resuming from {path.name}", file=sys.stderr, flush=True)
        self._restore(ckpt, path)

    def _restore(self, ckpt: dict[str, Any], source: Path) -> None:
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

    def _on_signal(self, signum: int) -> None:
        self.stop_signal = signum

    # --- logging --------------------------------------------------------------------------

    def _report_skips(self, records: list[StepRecord], logged: int | None) -> StepRecord | None:
        """Write each skipped step to metrics.jsonl (but step `logged`, whose log record says so)
        and the screen; the record at which max_skipped_steps were skipped in a row, if any."""
        for record in records:
            if record.skipped is None:
                continue
            halting = record.streak >= self.cfg.max_skipped_steps
            if self.d.is_main:
                if record.step != logged or halting:
                    self.metrics.write(skip_record(record))
                self.progress.write(f"step {record.step}: update skipped, {record.reason()} "
                                    f"({record.streak} in a row)")
            if halting:
                return record
        return None

    def _log(self, last: StepRecord, lr: float, tokens_per_s: float, mfu: float | None, tokens: int) -> None:
        """The log record of step `last` (its loss, grad norm, and whether its update was skipped)."""
        if not self.d.is_main:
            return
        self.metrics.write(log_record(last, lr, tokens_per_s, mfu, tokens, self.backends))
        mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        self.progress.update(self.step, f"loss {last.loss:.4f} | lr {lr:.2e} | grad {last.grad_norm:.2f} | "
                                        f"{tokens_per_s:,.0f} tok/s | mfu {mfu_text}"
                                        + (" | skipped" if last.skipped else ""), log=True)
