"""Checkpoints: atomic save, newest-first lookup, pruning, and loading a model for inference.

    tritongpt sample --ckpt out/                      # load_model(out/) -> the newest checkpoint
    python -c "from tritongpt.train.checkpoint import load_model; print(load_model('out')[0])"

A checkpoint is `RUN_DIR/ckpt_{step:07d}.pt`, a torch.save'd dict:
    step, model (state dict), model_config (asdict of GPTConfig), train_config (flat TrainConfig),
    optimizer, scaler, rng (one entry per rank: python, numpy, torch, cuda states),
    loader (one state per rank), backends (op -> backend name), tokenizer, world_size.
It is written to a temporary name in the same directory, fsynced, then renamed over the final
name (and the directory fsynced), so a crash or kill -9 mid-save leaves the previous checkpoints
intact and never a truncated `ckpt_*.pt`. Everything in it is tensors and plain Python values,
so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritongpt.errors import TritonGPTError

_NAME = re.compile(r"^ckpt_(\d{7,})\.pt$")


def path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:07d}.pt"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The finished checkpoints in `run_dir`, oldest first (temporary files are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in `run_dir`, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: str | Path, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write `state` (which holds "step") as the checkpoint of its step; keep the newest `keep`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = path_for(run_dir, state["step"])
    atomic_write(final, lambda fh: torch.save(state, fh))
    if keep is not None:
        for old in checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def atomic_write(path: Path, write) -> None:
    """Call write(binary file handle) on a temporary file beside `path`, fsync it, rename it to
    `path`, fsync the directory. Readers see the old file or the complete new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at `path`: a checkpoint file, or a run directory (its newest one)."""
    path = Path(path)
    if path.is_dir():
        newest = latest(path)
        if newest is None:
            raise TritonGPTError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = newest
    if not path.is_file():
        raise TritonGPTError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc


def read_train_config(path: str | Path) -> dict[str, Any]:
    """The flat train config stored in a checkpoint file, without reading its tensors (mmap)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["train_config"]
    except Exception as exc:
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides: Any):
    """(GPT in eval mode on `device`, flat train config dict) from a checkpoint file or run dir.

    `overrides` replace GPTConfig fields that do not change the weights (e.g. attention="torch").
    """
    ckpt = load(path, "cpu")
    return model_from(ckpt, device, source=path, **overrides), ckpt["train_config"]


def model_from(ckpt: dict[str, Any], device: str | torch.device = "cpu", source: Any = "checkpoint",
               **overrides: Any):
    """The GPT of a loaded checkpoint dict, in eval mode on `device`."""
    from tritongpt import GPT, GPTConfig

    model = GPT(GPTConfig(**{**ckpt["model_config"], **overrides}))
    load_weights(model, ckpt["model"], source)
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TritonGPTError(f"checkpoint {source} does not fit this model config: {exc}") from exc


def rng_state() -> dict[str, Any]:
    """Every random generator training uses, as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuples(value: Any) -> Any:
    """random.setstate wants tuples where a round trip may have produced lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
