"""Dashboards fed from the same records as metrics.jsonl (which stays the record of a run).

    tritongpt train --tensorboard                 # event files in OUT/tensorboard/; tensorboard --logdir OUT
    tritongpt train --wandb my-project            # Weights & Biases; WANDB_MODE=offline writes OUT/wandb/ only

Both are extras (`pip install 'tritongpt[tensorboard]'`, `pip install 'tritongpt[wandb]'`),
never required: asking for a missing one is one clear error naming the pip command, raised
before training starts. Only rank 0 writes. Every numeric field of a record is a scalar at the
record's step (loss, lr, grad_norm, tokens_per_s, mfu, val_loss, hellaswag accuracies, ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tritongpt.errors import TritonGPTError


def check_available(tensorboard: bool, wandb_project: str | None) -> None:
    """Raise before anything runs when a requested dashboard's package is missing."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TritonGPTError("--tensorboard needs the tensorboard package: pip install 'tritongpt[tensorboard]'")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise TritonGPTError("--wandb needs the wandb package: pip install 'tritongpt[wandb]'")


class Dashboards:
    """The requested writers; `write(record)` sends a metrics record to each of them."""

    def __init__(self, out: Path, tensorboard: bool, wandb_project: str | None, config: dict[str, Any]) -> None:
        check_available(tensorboard, wandb_project)
        self.writers: list[Any] = []
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writers.append(SummaryWriter(log_dir=str(Path(out) / "tensorboard")))
        if wandb_project:
            import wandb  # honours WANDB_MODE (offline, disabled) and WANDB_API_KEY as wandb itself does
            self.wandb_run = wandb.init(project=wandb_project, dir=str(out), config=config,
                                        name=Path(out).resolve().name, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self.writers:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
