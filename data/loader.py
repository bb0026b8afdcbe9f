"""ShardLoader: (x, y) batches of token windows from memory-mapped shards, DDP-aware and resumable.

    python -c "from tritongpt.data.loader import ShardLoader; \
        x, y = ShardLoader('datasets/shakespeare', 'train', 4, 64).next_batch(); print(x.shape)"

Which files a split reads, first match wins:
  1. meta.json (from `tritongpt prepare`): the shards it lists for the split;
  2. llm.c / modded-nanogpt shards: {split}_*.bin, *_{split}_*.bin, *_{split}.bin, sorted by name
     (fineweb_train_000001.bin, tiny_shakespeare_val.bin), each with the 256-int32 header;
  3. nanoGPT's header-less {split}.bin (raw uint16).
Every file is validated on open (magic, version, token count against the file size and, when a
vocabulary size is known — the argument, else meta.json's — every id below it) and memory-mapped.

Batches: step s of the run draws the global batch, world_size * batch_size windows of
block_size + 1 tokens (x, then y shifted by one), and rank r takes rows [r*B, (r+1)*B).
  * random (default): window starts uniform over every offset of every shard (a window never
    crosses a shard end), from a generator seeded by (seed, s). So a batch depends only on seed
    and step: the global batch is the same for any world_size, and the state is just the step.
  * sequential: the shards cut into consecutive windows at stride block_size (each token is
    predicted once per pass), global batch s holding windows s*W*B ... (s+1)*W*B - 1, wrapping
    around after the last; rank r reads every W-th block of B windows (rank-strided).
Packed documents: `doc_ids_from` numbers the documents of a batch's rows from its eot tokens
(prepare puts one before every document), the doc_ids a GPT keeps attention within.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tritongpt.data.shards import check_vocab, read_raw, read_shard
from tritongpt.errors import TritonGPTError


class ShardLoader:
    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, block_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, sequential: bool = False, vocab_size: int | None = None):
        for name, value, low in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                                 ("world_size", world_size, 1), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise TritonGPTError(f"ShardLoader: {name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise TritonGPTError(f"ShardLoader: rank {rank} is outside [0, world_size={world_size})")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.block_size = int(batch_size), int(block_size)
        self.seed, self.rank, self.world_size, self.sequential = int(seed), rank, world_size, sequential
        self.step = 0
        self.meta = _read_meta(self.data_dir)
        self.vocab_size = vocab_size if vocab_size is not None else (self.meta or {}).get("vocab_size")
        self.files = split_files(self.data_dir, split, self.meta)
        self.shards = []
        for path, has_header in self.files:
            tokens = read_shard(path) if has_header else read_raw(path)
            if self.vocab_size is not None:
                check_vocab(tokens, self.vocab_size, path)
            self.shards.append(tokens)
        self.num_tokens = sum(len(tokens) for tokens in self.shards)
        # windows (sequential) or window starts (random) per shard; global index -> shard by cumsum
        T = self.block_size
        per_shard = [(len(s) - 1) // T if sequential else len(s) - T for s in self.shards]
        self._ends = np.cumsum(np.maximum(per_shard, 0))
        self.num_windows = int(self._ends[-1])
        if self.num_windows == 0:
            largest = max(self.files, key=lambda f: f[0].stat().st_size)[0]
            raise TritonGPTError(f"{split} data in {self.data_dir} is too short: one sequence needs block_size + 1 = "
                                 f"{T + 1} tokens in one file, and the largest, {largest}, has "
                                 f"{max(len(s) for s in self.shards)}")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y): int64 CPU tensors of shape (batch_size, block_size), y = x shifted by one."""
        B, T = self.batch_size, self.block_size
        global_batch = self.world_size * B
        if self.sequential:
            windows = (self.step * global_batch + np.arange(global_batch)) % self.num_windows
        else:
            windows = np.random.default_rng([self.seed, self.step]).integers(0, self.num_windows, size=global_batch)
        windows = windows[self.rank * B:(self.rank + 1) * B]
        shard = np.searchsorted(self._ends, windows, side="right")
        local = windows - np.concatenate(([0], self._ends))[shard]
        starts = local * T if self.sequential else local
        rows = np.stack([self.shards[i][s:s + T + 1] for i, s in zip(shard.tolist(), starts.tolist())])
        self.step += 1
        return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))

    def state_dict(self) -> dict:
        """Everything needed to continue the same stream of batches (the same on every rank)."""
        return {"split": self.split, "sequential": self.sequential, "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if bool(state["sequential"]) != self.sequential:
            mode = "sequential" if state["sequential"] else "random"
            raise TritonGPTError(f"ShardLoader: the saved state is for {mode} order; this loader's sequential="
                                 f"{self.sequential}")
        self.seed, self.step = int(state["seed"]), int(state["step"])


def doc_ids_from(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) document ids of the token rows idx (B, T): each eot token starts a new document."""
    return torch.cumsum((idx == eot_id).to(torch.int32), dim=1)


def _read_meta(data_dir: Path) -> dict | None:
    if not data_dir.is_dir():
        raise TritonGPTError(f"data directory {data_dir} does not exist")
    path = data_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise TritonGPTError(f"{path}: not valid JSON ({exc})") from None


def split_files(data_dir: Path, split: str, meta: dict | None) -> list[tuple[Path, bool]]:
    """(path, has_llm_c_header) of each file of `split`, in reading order (see the module doc)."""
    if meta is not None:
        names = meta.get("shards", {}).get(split)
        if not names:
            raise TritonGPTError(f"{data_dir / 'meta.json'} lists no {split!r} shards")
        for name in names:
            if not (data_dir / name).is_file():
                raise TritonGPTError(f"{data_dir / name}: missing ({split!r} shard listed in meta.json)")
        return [(data_dir / name, True) for name in names]
    patterns = (f"{split}_*.bin", f"*_{split}_*.bin", f"*_{split}.bin")
    shards = sorted({path for pattern in patterns for path in data_dir.glob(pattern) if path.is_file()})
    if shards:
        return [(path, True) for path in shards]
    raw = data_dir / f"{split}.bin"
    if raw.is_file():
        return [(raw, False)]
    raise TritonGPTError(f"no {split!r} data in {data_dir}: expected meta.json, llm.c shards "
                         f"({', '.join(patterns)}) or nanoGPT's header-less {split}.bin")
