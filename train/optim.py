"""The optimizer of a run: AdamW, or Muon for the blocks' hidden matrices with AdamW for the rest.

    tritongpt train --optimizer muon                       # Muon: lr 0.02, momentum 0.95, wd 0.01
    tritongpt train --optimizer muon --muon-lr 0.05 --lr 3e-3
    torchrun --standalone --nproc_per_node=8 -m tritongpt.cli train --optimizer muon --preset gpt2

`adamw` (nanoGPT's): AdamW over every parameter, weight decay on matrices and embeddings only
(GPT.configure_optimizer). `muon` (the split of modded-nanogpt and Keller Jordan's Muon):
torch.optim.Muon over the 2-D weight matrices inside the transformer blocks (attention's
c_attn and c_proj, the MLP's c_fc and c_proj or gate/up/down_proj) — momentum, a Newton-Schulz
orthogonalisation of the Nesterov update, a step scaled by sqrt(max(1, rows / cols)) — and
AdamW (lr, betas, weight_decay) over the embeddings, the tied head, norm gains and biases. c_attn
is orthogonalised as one (3C, C) matrix, not as three. Both follow the run's warmup + cosine
schedule, each group scaled to its own peak: `set_lr` gives a group lr x group["lr_scale"]
(muon_lr / lr for Muon's group, 1 for AdamW's).

`MuonWithAdamW` steps both as one optimizer (param_groups, step, zero_grad, state_dict), so the
GradScaler, the update guard, gradient clipping and checkpoints treat it as they treat AdamW; its
state_dict holds both ({"adamw": ..., "muon": ...}) and a resume is bitwise. torch's Muon takes
no found_inf, so the guard's skip decision is read on the host: one device sync per step.
Muon orthogonalises whole matrices, which under FSDP no rank holds (each has a row shard):
`--optimizer muon --parallel fsdp` is refused by the config's validation. Under DDP every rank
steps the same full matrices after the gradient all-reduce.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT

Optimizer = Literal["adamw", "muon"]


def hidden_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the transformer blocks: what Muon steps (not embeddings, head, gains)."""
    return [p for p in model.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]


class MuonWithAdamW:
    """torch.optim.Muon and torch.optim.AdamW over disjoint parameters, stepped as one optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def build(model: GPT, optimizer: Optimizer, device_type: str, *, lr: float, betas: tuple[float, float],
          weight_decay: float, muon_lr: float, muon_momentum: float, muon_weight_decay: float
          ) -> torch.optim.AdamW | MuonWithAdamW:
    """The run's optimizer over `model`'s parameters (module docstring); Muon's group carries
    `lr_scale`, its peak learning rate over `lr`."""
    if optimizer == "adamw":
        return model.configure_optimizer(weight_decay, lr, betas, device_type)
    hidden = hidden_matrices(model)
    in_muon = {id(p) for p in hidden}
    adamw = model.configure_optimizer(weight_decay, lr, betas, device_type,
                                      params=[p for p in model.parameters() if id(p) not in in_muon])
    muon = torch.optim.Muon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay)
    for group in muon.param_groups:
        group["lr_scale"] = muon_lr / lr
    return MuonWithAdamW(muon, adamw)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The schedule's (AdamW's) learning rate at optimizer step `step` (0-based): linear warmup to
    lr, then cosine to min_lr at decay_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """Every group at `lr` (the schedule's AdamW rate) times its lr_scale (AdamW's groups: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def load_state(optimizer: torch.optim.Optimizer | MuonWithAdamW, state: dict[str, Any], source: Any) -> None:
    """optimizer.load_state_dict(state), or one error when `source` (a checkpoint) was written by
    the other --optimizer."""
    saved = "muon" if set(state) == {"muon", "adamw"} else "adamw"
    running = "muon" if isinstance(optimizer, MuonWithAdamW) else "adamw"
    if saved != running:
        raise TritonGPTError(f"{source} holds the optimizer state of --optimizer {saved}; this run has --optimizer "
                             f"{running} (resume with --optimizer {saved}, or start a new run in another --out)")
    optimizer.load_state_dict(state)
