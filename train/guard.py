"""The update guard: an optimizer step whose update would poison the model is not applied.

    tritongpt train --skip-spikes 5 --spike-window 128 --max-skipped-steps 5

An update whose loss or gradient norm is not finite, or with --skip-spikes whose loss spikes,
is not applied. The decision is made on the device from values all-reduced over the ranks
(identical everywhere, so replicas never drift apart) and the step is skipped there too (fused
AdamW's found_inf, as the GradScaler does), so a step adds no host sync; the host reads the
guard's records at log and checkpoint steps. fp16 overflow skips stay the GradScaler's and are
not counted. After --max-skipped-steps skipped in a row the run stops with one line and exit
code 3 (DIVERGED_EXIT); no checkpoint ever holds a non-finite value.
"""

from __future__ import annotations

import dataclasses
import math

import torch

DIVERGED_EXIT = 3  # exit code of a run stopped by --max-skipped-steps

# Why a step's update was skipped: the bits of StepRecord.flags.
LOSS_NONFINITE, GRAD_NONFINITE, LOSS_SPIKE, HALTED = 1, 2, 4, 8


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
