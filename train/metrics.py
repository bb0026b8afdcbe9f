"""Where a run's metrics go: OUT/metrics.jsonl (the record of a run), the optional dashboards fed
from the same records, and OUT/loss.png at the end.

    tritongpt train --tensorboard                 # event files in OUT/tensorboard/; tensorboard --logdir OUT
    tritongpt train --wandb my-project            # Weights & Biases; WANDB_MODE=offline writes OUT/wandb/ only

metrics.jsonl gets one JSON object per log step (step, loss, lr, grad_norm, tokens_per_s, mfu,
tokens, backends; `skipped` when that step's update was), per other skipped step (step, skipped:
"nonfinite" or "spike", loss, grad_norm, loss_z), per evaluation (step, val_loss) and per
HellaSwag evaluation (step, hellaswag_acc, hellaswag_acc_norm); a non-finite value is written as
null, and so is mfu where the GPU's peak is unknown (train/mfu.py). A resumed run cuts the file
back to its checkpoint's step, so it never holds the steps that are trained again.

Both dashboards are extras (`pip install 'tritongpt[tensorboard]'`, `pip install
'tritongpt[wandb]'`), never required: asking for a missing one is one clear error naming the pip
command, raised before training starts. Only rank 0 writes. Every numeric field of a record is a
scalar at the record's step (loss, lr, grad_norm, tokens_per_s, mfu, val_loss, hellaswag
accuracies, ...).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write
from tritongpt.train.guard import StepRecord

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """OUT/metrics.jsonl, started afresh or, resuming at `step`, cut back to it, and the requested
    dashboards; `write(record)` sends a record to all of them."""

    def __init__(self, out: Path, step: int, tensorboard: bool, wandb_project: str | None,
                 config: dict[str, Any]) -> None:
        self.path = Path(out) / METRICS_FILE
        kept = []
        if step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.path, lambda fh: fh.write("".join(line + "\n" for line in kept).encode()))
        self.dashboards = Dashboards(out, tensorboard, wandb_project, config)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.dashboards.write(record)

    def close(self) -> None:
        self.dashboards.close()


def log_record(last: StepRecord, lr: float, tokens_per_s: float, mfu: float | None, tokens: int,
               backends: dict[str, str]) -> dict[str, Any]:
    """The record of a log step, whose last optimizer step the guard recorded as `last`."""
    record = dict(step=last.step, loss=_finite(last.loss), lr=lr, grad_norm=_finite(last.grad_norm),
                  tokens_per_s=tokens_per_s, mfu=mfu, tokens=tokens, backends=backends)
    if last.skipped:
        record.update(skipped=last.skipped, loss_z=_finite(last.loss_z))
    return record


def skip_record(skipped: StepRecord) -> dict[str, Any]:
    """The record of a step whose update was skipped."""
    return dict(step=skipped.step, skipped=skipped.skipped, loss=_finite(skipped.loss),
                grad_norm=_finite(skipped.grad_norm), loss_z=_finite(skipped.loss_z))


def _finite(value: float) -> float | None:
    """`value` for metrics.jsonl: JSON has no NaN or infinity, so those become null."""
    return value if math.isfinite(value) else None


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
            from torch.utils.tensorboard import SummaryWriter  # lazy: the optional tensorboard extra
            self.writers.append(SummaryWriter(log_dir=str(Path(out) / "tensorboard")))
        if wandb_project:
            import wandb  # lazy: the optional wandb extra; it honours WANDB_MODE and WANDB_API_KEY itself
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


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """Train and val loss (and HellaSwag accuracy, when scored) against step from metrics.jsonl, as a
    PNG (skipped without matplotlib)."""
    try:
        import matplotlib  # lazy: optional, and slow to import
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
