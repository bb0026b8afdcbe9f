"""Checkpoints: atomic save, newest-first lookup, pruning, and loading a model for inference.

    tritongpt sample --ckpt out/                      # load_model(out/) -> the newest checkpoint
    python -c "from tritongpt.train.checkpoint import load_model; print(load_model('out')[0])"

A checkpoint is `RUN_DIR/ckpt_{step:07d}.pt`, a torch.save'd dict:
    step, model (state dict), config (the flat TrainConfig, model fields included, each op's
    backend name resolved), optimizer, scaler, rng (one entry per rank: python, numpy, torch,
    cuda states), loader (one state per rank), tokenizer, world_size.
Checkpoints written before config was one dict (train_config + model_config + backends, and the
op `layer_norm` spelled `norm`) still load: `config_of` converts them. This module owns the format
and imports nothing from the rest of train/; its LEGACY_KEYS (old key -> name now) also rename
old TOML keys and flags (train/config.py).
It is written to a temporary name in the same directory, fsynced, then renamed over the final
name (and the directory fsynced), so a crash or kill -9 mid-save leaves the previous checkpoints
intact and never a truncated `ckpt_*.pt`; a failed write (disk full, no permission) is one
TritonGPTError naming the file, with no temp file left. Everything in it is tensors and plain
Python values, so it loads with `torch.load(weights_only=True)`.

A state holding a NaN or an infinity is never written, and pruning keeps the checkpoint just
written (so the newest good state is never deleted). `newest_good` finds the checkpoint to resume
from: the newest one that loads and is finite, naming each newer one passed over.

Under --parallel fsdp a checkpoint is a directory `RUN_DIR/ckpt_{step:07d}/`: the model and
optimizer as a torch.distributed.checkpoint (DCP) of FQN-keyed state dicts, every rank writing
its own shards, plus `train_state.pt` (the rest of the dict above, written by rank 0). All ranks
write into `.ckpt_{step:07d}.staging/` (a name no lookup lists), DCP fsyncs its files, and rank 0
adds train_state.pt and renames the directory into place: a kill -9 at any moment leaves the
previous checkpoints as they were, and a directory named ckpt_* is always complete. Finite-only
holds as for files (each rank checks its shards before anything is written). DCP reshards on
load, so a run resumes at another world size (`load_sharded_into`); `load` consolidates one into
the single-file dict (full tensors, the optimizer keyed by parameter index as
`optimizer.state_dict()` keys it), which is how `sample`, `eval` and `export` read it and how
`export --consolidate` writes it as a ckpt_*.pt file.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor

from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write, fsync_dir, temp_sibling
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.model.gpt import GPT

_NAME = re.compile(r"^ckpt_(\d{7,})(\.pt)?$")  # a file ckpt_N.pt, or (sharded) a directory ckpt_N
TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: everything but the model and optimizer
# old key -> its name now, read in checkpoints, TOML files and flags written before the rename
LEGACY_KEYS = {"norm": "layer_norm"}


def path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:07d}.pt"


def sharded_path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:07d}"


def is_sharded(path: str | Path) -> bool:
    """True for a sharded (DCP) checkpoint directory."""
    path = Path(path)
    return bool(_NAME.match(path.name)) and path.is_dir() and (path / TRAIN_STATE).is_file()


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The finished checkpoints in `run_dir` (files and sharded directories), oldest first
    (temporary files and staging directories are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.is_dir(), p) for p in run_dir.iterdir()
             if (m := _NAME.match(p.name)) and (p.is_dir() if m.group(2) is None else p.is_file())]
    return [p for _, _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in `run_dir`, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def save(run_dir: str | Path, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write `state` (which holds "step") as the checkpoint of its step, then keep the newest
    `keep` checkpoints up to it. A state with a non-finite tensor, or a write that fails, is a
    TritonGPTError naming the file; the checkpoints already there are untouched."""
    run_dir = Path(run_dir)
    final = write_file(path_for(run_dir, state["step"]), state)
    if keep is not None:
        prune(run_dir, final, keep)
    return final


def write_file(path: str | Path, state: dict[str, Any], overwrite: bool = True) -> Path:
    """Write `state` as the single-file checkpoint `path` (atomically; finite states only)."""
    path = Path(path)
    require_finite(state, path)
    if path.exists() and not overwrite:
        raise TritonGPTError(f"{path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: torch.save(state, fh))
    except OSError as exc:
        raise TritonGPTError(f"cannot write checkpoint {path}: {exc.strerror or exc}; the checkpoints already "
                             f"in {path.parent} are intact") from exc
    return path


def prune(run_dir: Path, newest: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints up to `newest`, the one just written (finite
    and complete, so never deleted). Later steps are left alone: they belong to a run that was
    resumed from before them (they failed to load, or are overwritten as the run gets there)."""
    older = [p for p in checkpoints(run_dir) if step_of(p) <= step_of(newest) and p != newest]
    for old in older[:max(0, len(older) - (keep - 1))]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def require_finite(state: Any, path: Path) -> None:
    """A TritonGPTError naming `path` (the checkpoint not written) when `state` holds a non-finite
    value (under FSDP: in this rank's shards)."""
    bad = nonfinite_tensors(state)
    if bad:
        raise TritonGPTError(f"not writing checkpoint {path}: non-finite values in {_names(bad)}")


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Where (dotted keys) the floating-point tensors of a nested state hold a NaN or an infinity."""
    found: list[tuple[str, torch.Tensor]] = []
    _float_tensors(state, prefix, found)
    finite: dict[torch.device, list[bool]] = {}
    for device in {t.device for _, t in found}:  # one device-to-host read per device
        finite[device] = torch.stack([torch.isfinite(t).all() for _, t in found if t.device == device]).tolist()
    flags = {device: iter(values) for device, values in finite.items()}
    return [name for name, t in found if not next(flags[t.device])]


def _float_tensors(value: Any, name: str, found: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(value, DTensor):  # a shard: this rank checks its own part
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            found.append((name, value))
    elif isinstance(value, dict):
        for key, item in value.items():
            _float_tensors(item, f"{name}.{key}" if name else str(key), found)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _float_tensors(item, f"{name}.{i}" if name else str(i), found)


def _names(names: list[str], at_most: int = 3) -> str:
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def newest_good(run_dir: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[Path, dict[str, Any], list[str]] | None:
    """(path, checkpoint dict, passed_over) of the newest checkpoint in `run_dir` that loads and
    holds only finite values; `passed_over` says, newest first, why each newer one was not used.
    None when `run_dir` has no checkpoint; a TritonGPTError naming every file when none is good."""
    passed_over = []
    for path in reversed(checkpoints(run_dir)):
        try:
            ckpt = load(path, device)
        except TritonGPTError as exc:
            passed_over.append(str(exc))
            continue
        bad = nonfinite_tensors(ckpt)
        if bad:
            passed_over.append(f"checkpoint {path} holds non-finite values in {_names(bad)}")
            continue
        return path, ckpt, passed_over
    if passed_over:
        raise TritonGPTError(f"no usable checkpoint in {run_dir}: " + "; ".join(passed_over))
    return None


def newest_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The flat config of the newest checkpoint in `run_dir` that can be read (cheap: tensors are
    mmapped, not read), None when there is no checkpoint; a TritonGPTError when none reads."""
    problems = []
    for path in reversed(checkpoints(run_dir)):
        try:
            return read_config(path)
        except TritonGPTError as exc:
            problems.append(str(exc))
    if problems:
        raise TritonGPTError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))
    return None


def load(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at `path`: a checkpoint file, a sharded checkpoint directory
    (consolidated: full tensors), or a run directory (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        newest = latest(path)
        if newest is None:
            raise TritonGPTError(f"no checkpoint (ckpt_*.pt or a sharded ckpt_* directory) in {path}")
        path = newest
    if is_sharded(path):
        return consolidate(path, device)
    if not path.is_file():
        raise TritonGPTError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc


def read_config(path: str | Path) -> dict[str, Any]:
    """The flat config stored in a checkpoint, without reading its tensors (mmap)."""
    if is_sharded(path):
        return config_of(read_train_state(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc
    return config_of(ckpt)


def config_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The flat config of a loaded checkpoint dict, older layouts converted."""
    if "config" in ckpt:
        return ckpt["config"]
    old = {**ckpt.get("model_config", {}), **ckpt["train_config"]}  # train_config held the model fields too
    flat = {LEGACY_KEYS.get(k, k): v for k, v in old.items()}
    for op, name in ckpt.get("backends", {}).items():  # what the run actually used
        flat[op] = name
    return flat


# --- sharded (DCP) checkpoints ---------------------------------------------------------------

def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP saves and loads of a run: the model's and optimizer's state dicts keyed by
    parameter names, each tensor this rank's shard (a DTensor under FSDP, a plain tensor else)."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def staging_path_for(run_dir: str | Path, step: int) -> Path:
    """Where every rank writes the sharded checkpoint of `step` before it is renamed into place."""
    return Path(run_dir) / f".ckpt_{step:07d}.staging"


def begin_sharded(run_dir: str | Path, step: int) -> Path:
    """Rank 0, before any rank writes: an empty staging directory for `step` (a stale one,
    left by a killed save, is removed)."""
    staging = staging_path_for(run_dir, step)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise TritonGPTError(f"cannot write checkpoint {sharded_path_for(run_dir, step)}: "
                             f"{exc.strerror or exc}") from exc
    return staging


def write_shards(staging: Path, state: dict[str, Any], async_group: Any = None) -> Future | None:
    """Every rank: write this rank's shards of `state` (see sharded_state) into `staging` — at
    once, or with `async_group` (a process group of its own, so the background writes never
    interleave with training's collectives) in a background thread, returning its Future. The
    files are fsynced; the caller checks finiteness first (nonfinite_tensors, agreed by all ranks)."""
    try:
        if async_group is None:
            dcp.save(state, checkpoint_id=staging)
            return None
        return dcp.async_save(state, checkpoint_id=staging, process_group=async_group)
    except (Exception, CheckpointException) as exc:  # DCP gathers every rank's failure into a CheckpointException
        raise TritonGPTError(f"cannot write checkpoint shards in {staging}: {exc}") from exc


def finish_sharded(run_dir: str | Path, staging: Path, train_state: dict[str, Any], keep: int | None) -> Path:
    """Rank 0, once every rank's shards are written: add train_state.pt (step, config, scaler,
    rng, loader, guard, ...), rename the staging directory to ckpt_{step:07d}, prune as `save`."""
    run_dir = Path(run_dir)
    final = sharded_path_for(run_dir, train_state["step"])
    require_finite(train_state, final)
    try:
        atomic_write(staging / TRAIN_STATE, lambda fh: torch.save(train_state, fh))
        fsync_dir(staging)
        if final.exists():  # a later step of a run resumed from before it: replaced only now
            old = temp_sibling(final)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
        fsync_dir(run_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise TritonGPTError(f"cannot write checkpoint {final}: {exc.strerror or exc}; the checkpoints already "
                             f"in {run_dir} are intact") from exc
    if keep is not None:
        prune(run_dir, final, keep)
    return final


def read_train_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """train_state.pt of a sharded checkpoint: the checkpoint dict without model and optimizer."""
    try:
        return torch.load(Path(path) / TRAIN_STATE, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc


def load_sharded_into(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      any_rank: Callable[[bool], bool] = bool, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every rank (a collective under torch.distributed): load the sharded checkpoint at `path`
    into `model` and `optimizer` — FSDP-sharded or not, at any world size (DCP reads the parts of
    the saved shards each rank now holds) — and return its train_state. A damaged or non-finite
    checkpoint is a TritonGPTError (on every rank alike, as DCP gathers failures) and may leave
    the model partly loaded: load another one over it."""
    train_state = read_train_state(path, device)
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as exc:  # the latter is a BaseException
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc
    bad = nonfinite_tensors(state)  # this rank's shards; `any_rank` (True everywhere if on some rank) agrees
    if any_rank(bool(bad)):
        raise TritonGPTError(f"checkpoint {path} holds non-finite values" + (f" in {_names(bad)}" if bad else ""))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return train_state


def consolidate(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The single-file checkpoint dict of the sharded checkpoint at `path`, read in this process
    alone (no process group needed): full tensors, the optimizer keyed by index."""
    ckpt = read_train_state(path, device)
    full: dict[str, Any] = {}
    try:  # what the public dcp_to_torch_save does, without writing a file
        _load_state_dict(full, storage_reader=dcp.FileSystemReader(os.fspath(path)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise TritonGPTError(f"cannot read checkpoint {path}: {exc}") from exc
    model = {k: v.to(device) for k, v in full["model"].items()}
    return {**ckpt, "model": model, "optimizer": indexed_optimizer_state(full["optimizer"])}


def indexed_optimizer_state(by_name: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (get_optimizer_state_dict's) keyed by
    index instead, as optimizer.state_dict() does: parameters numbered in param_groups order."""
    groups, state, index = [], {}, 0
    for group in by_name["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in by_name["state"]:
                state[index] = by_name["state"][name]
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return {"state": state, "param_groups": groups}


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides: Any):
    """(GPT in eval mode on `device`, flat config dict) from a checkpoint file or run dir.

    The backends are chosen for `device` (auto), not taken from the run, which may have trained
    elsewhere; `overrides` replace GPTConfig fields that do not change the weights, e.g.
    attention="sdpa" or backend="torch".
    """
    ckpt = load(path, "cpu")
    return model_from(ckpt, device, source=path, **overrides), config_of(ckpt)


def model_from(ckpt: dict[str, Any], device: str | torch.device = "cpu", source: Any = "checkpoint",
               **overrides: Any):
    """The GPT of a loaded checkpoint dict, in eval mode on `device` (backends as in load_model)."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {*MODEL_OPS, "backend"}
    shape = {k: v for k, v in config_of(ckpt).items() if k in fields}
    model = GPT(GPTConfig(**shape, **overrides))
    load_model_state(model, ckpt["model"], source)
    return model.to(device).eval()


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    """model.load_state_dict(state); a state that does not fit is a TritonGPTError naming `source`."""
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
