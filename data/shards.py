"""Token shards in llm.c's format, and nanoGPT's header-less .bin files.

    python -c "import numpy as np; from tritongpt.data.shards import write_shard, read_shard; \
        write_shard('t.bin', np.arange(9)); print(read_shard('t.bin'))"

A shard (llm.c, modded-nanogpt FineWeb) is a header of 256 little-endian int32 — [0] the magic
20240520, [1] the version 1, [2] the token count, the rest zero — then that many uint16 token ids.
nanoGPT's train.bin / val.bin are the uint16 ids alone, with no header.
Every file is written to a temp name beside its target and renamed, so none is ever half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tritongpt.errors import TritonGPTError
from tritongpt.files import commit, temp_sibling

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
VOCAB_CHECK_CHUNK = 1 << 24  # tokens per max() when checking ids against a vocabulary


class ShardWriter:
    """Streams tokens into one shard: a temp file with a placeholder header, appended to chunk by
    chunk (bounded memory), then the header's count is filled in and the file renamed into place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = temp_sibling(self.path)
        self._file = open(self._tmp, "xb")
        self._file.write(bytes(HEADER_BYTES))
        self.num_tokens = 0

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
            raise TritonGPTError(f"{self.path}: token ids must lie in [0, 65536) to fit uint16, "
                                 f"got range [{tokens.min()}, {tokens.max()}]")
        self._file.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        self.num_tokens += tokens.size

    def close(self) -> Path:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, VERSION, self.num_tokens)
        self._file.seek(0)
        self._file.write(header.tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the rename makes it visible
        self._file.close()
        commit(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Write `tokens` (ints in [0, 65536)) as one llm.c shard at `path`, atomically."""
    with ShardWriter(path) as writer:
        writer.append(tokens)
    return writer.path


def read_header(path: str | os.PathLike) -> int:
    """Validate an llm.c shard header against the file and return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise TritonGPTError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte llm.c shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise TritonGPTError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not an llm.c token shard "
                             f"(header-less nanoGPT files must be named train.bin / val.bin)")
    if header[1] != VERSION:
        raise TritonGPTError(f"{path}: unsupported shard version {header[1]} (only version {VERSION}, uint16 "
                             f"tokens, is read)")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise TritonGPTError(f"{path}: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the file "
                             f"has {size} bytes")
    return count


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of an llm.c shard, memory-mapped read-only (uint16), after validating its header."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a header-less nanoGPT .bin file (raw uint16), memory-mapped read-only."""
    path = Path(path)
    size = path.stat().st_size
    if size % 2:
        raise TritonGPTError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def check_vocab(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike) -> None:
    """Raise naming `path` if any token id is >= vocab_size (a chunked, vectorized max over the file)."""
    for start in range(0, len(tokens), VOCAB_CHECK_CHUNK):
        chunk = np.asarray(tokens[start:start + VOCAB_CHECK_CHUNK])
        if int(chunk.max()) >= vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise TritonGPTError(f"{path}: token id {int(chunk[where - start])} at position {where} is >= the "
                                 f"vocabulary size {vocab_size} (tokenized with a different tokenizer?)")
