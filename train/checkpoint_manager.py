"""Saving and resuming a training run's checkpoints across ranks (the on-disk format is
train/checkpoint.py's).

    manager = CheckpointManager(out, d, mode, model, optimizer, keep=3, async_save=False)
    path, ckpt, passed_over = manager.load_newest()     # at start with --resume
    manager.save(step, train_state)                     # every ckpt_interval steps
    manager.finish_pending()                            # before exit: the background save completes

Without FSDP rank 0 writes one file (model, optimizer and the train state). Under FSDP every rank
writes its shards into a staging directory (in the background with --async-ckpt, over a gloo group
of its own so background writes never interleave with training's collectives); once all are
written rank 0 adds the train state and renames the directory into place. A failure on any rank
(non-finite state, disk full, no permission, a background writer's error) raises one
TritonGPTError on every rank naming the file and the newest good checkpoint, which is left as it
was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from tritongpt.errors import TritonGPTError
from tritongpt.train import checkpoint, distributed, optim


class CheckpointManager:
    def __init__(self, out: Path, d: distributed.Dist, mode: str | None, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, keep: int | None, async_save: bool) -> None:
        self.out, self.d, self.mode = out, d, mode
        self.model, self.optimizer, self.keep = model, optimizer, keep
        self.newest: Path | None = None  # the newest checkpoint known to be good
        self.async_group = torch.distributed.new_group(backend="gloo") if async_save else None
        self.pending: tuple[Any, Path, dict[str, Any]] | None = None  # (future, staging dir, train state)

    def save(self, step: int, train_state: dict[str, Any]) -> None:
        """The checkpoint of `step`: model and optimizer state plus `train_state` (a collective)."""
        if self.mode == "fsdp":
            self._save_sharded(step, train_state)
            return
        error: TritonGPTError | None = None
        if self.d.is_main:
            state = dict(train_state, model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            try:
                checkpoint.save(self.out, state, keep=self.keep)
            except TritonGPTError as exc:
                error = exc
        self._agree_saved(error, step)  # also the barrier after the save
        self.newest = checkpoint.path_for(self.out, step)

    def _save_sharded(self, step: int, train_state: dict[str, Any]) -> None:
        self.finish_pending()
        error: TritonGPTError | None = None
        staging = checkpoint.staging_path_for(self.out, step)
        state = checkpoint.sharded_state(self.model, self.optimizer)
        try:
            checkpoint.require_finite(state, checkpoint.sharded_path_for(self.out, step))
            if self.d.is_main:
                checkpoint.begin_sharded(self.out, step)
        except TritonGPTError as exc:
            error = exc
        self._agree_saved(error, step)  # also the barrier: the staging directory exists
        future = checkpoint.write_shards(staging, state, self.async_group)  # DCP fails on every rank alike
        self.pending = (future, staging, train_state)
        if future is None:
            self.finish_pending()

    def finish_pending(self) -> None:
        """Wait for the sharded save in flight (if any); rank 0 then completes it."""
        if self.pending is None:
            return
        future, staging, train_state = self.pending
        self.pending = None
        error: TritonGPTError | None = None
        try:
            if future is not None:
                future.result()
            if self.d.is_main:
                checkpoint.finish_sharded(self.out, staging, train_state, keep=self.keep)
        except TritonGPTError as exc:
            error = exc
        except (Exception, CheckpointException) as exc:  # the background writer's failure
            error = TritonGPTError(f"cannot write checkpoint shards in {staging}: {exc}")
        self._agree_saved(error, train_state["step"])
        self.newest = checkpoint.sharded_path_for(self.out, train_state["step"])

    def _agree_saved(self, error: TritonGPTError | None, step: int) -> None:
        """Raise on every rank when a save failed on some rank."""
        if distributed.any_rank(self.d, error is not None):
            newest = f"newest good checkpoint: {self.newest or 'none written'}"
            raise TritonGPTError(f"{error}; {newest}" if error else
                                 f"another rank could not write the checkpoint of step {step}; {newest}"
                                 ) from error

    def load_newest(self) -> tuple[Path, dict[str, Any], list[str]]:
        """(path, train state, problems with newer ones passed over) of the newest checkpoint in
        OUT that loads and is finite, its model and optimizer state loaded (under FSDP DCP
        reshards it to this world size)."""
        if self.mode == "fsdp":
            path, ckpt, passed_over = self._load_newest_sharded()
        else:
            path, ckpt, passed_over = checkpoint.newest_good(self.out, "cpu")
            checkpoint.load_model_state(self.model, ckpt["model"], path)
            optim.load_state(self.optimizer, ckpt["optimizer"], path)
        self.newest = path
        return path, ckpt, passed_over

    def _load_newest_sharded(self) -> tuple[Path, dict[str, Any], list[str]]:
        passed_over = []
        for path in reversed(checkpoint.checkpoints(self.out)):
            if not checkpoint.is_sharded(path):
                passed_over.append(f"checkpoint {path}: a single file; --parallel fsdp resumes from sharded "
                                   f"checkpoints (ckpt_N directories)")
                continue
            try:
                train_state = checkpoint.load_sharded_into(path, self.model, self.optimizer,
                                                           any_rank=lambda flag: distributed.any_rank(self.d, flag))
            except TritonGPTError as exc:
                passed_over.append(str(exc))
                continue
            return path, train_state, passed_over
        raise TritonGPTError(f"no usable checkpoint in {self.out}: " + "; ".join(passed_over))
