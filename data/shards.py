"""Token shards in llm.c's format, and nanoGPT's header-less .bin files.

    python -c "import numpy as np; from tritongpt.data.shards import write_shard, read_shard; \
        write_shard('t.bin', np.arange(9)); print(read_shard('t.bin'))"

A shard (llm.c, modded-nanogpt FineWeb) is a header of 256 little-endian int32 — [0] the magic
20240520, [1] the version, [2] the token count, the rest zero — then that many token ids. The
version says their width (VERSIONS): 1 is llm.c's, little-endian uint16, for vocabularies of at
most 65,536 tokens (GPT-2's); 2, this project's extension, is little-endian uint32, which a
writer uses when the vocabulary is larger (`version_for`: e.g. Llama 3's 128,256 tokens).
Readers accept both. nanoGPT's train.bin / val.bin are uint16 ids alone, with no header.
Every file is written to a temp name beside its target and renamed, so none is ever half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tritongpt.errors import TritonGPTError
from tritongpt.files import commit, temp_sibling

MAGIC = 20240520
VERSIONS = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # header version -> the token ids' dtype
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = VERSIONS[1]  # llm.c's, and nanoGPT's header-less files'
VOCAB_CHECK_CHUNK = 1 << 24  # tokens per max() when checking ids against a vocabulary


def version_for(vocab_size: int) -> int:
    """The narrowest shard version whose ids hold a vocabulary of `vocab_size` tokens."""
    for version, dtype in VERSIONS.items():
        if vocab_size <= 1 << (8 * dtype.itemsize):
            return version
    raise TritonGPTError(f"a vocabulary of {vocab_size} tokens does not fit uint32 token ids")


class ShardWriter:
    """Streams tokens into one shard: a temp file with a placeholder header, appended to chunk by
    chunk (bounded memory), then the header's count is filled in and the file renamed into place.
    The ids are uint16 (version 1) unless `vocab_size` exceeds 65,536 (then uint32, version 2)."""

    def __init__(self, path: str | os.PathLike, vocab_size: int = 1 << 16):
        self.path = Path(path)
        self.version = version_for(vocab_size)
        self.dtype = VERSIONS[self.version]
        self._tmp = temp_sibling(self.path)
        self._file = open(self._tmp, "xb")
        self._file.write(bytes(HEADER_BYTES))
        self.num_tokens = 0

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        limit = 1 << (8 * self.dtype.itemsize)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= limit):
            raise TritonGPTError(f"{self.path}: token ids must lie in [0, {limit}) to fit {self.dtype.name} "
                                 f"(shard version {self.version}), got range [{tokens.min()}, {tokens.max()}]")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += tokens.size

    def close(self) -> Path:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, self.version, self.num_tokens)
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


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int = 1 << 16) -> Path:
    """Write `tokens` (ints in [0, vocab_size)) as one llm.c shard at `path`, atomically: uint16
    ids (version 1) for a vocabulary of at most 65,536 tokens, else uint32 (version 2)."""
    with ShardWriter(path, vocab_size) as writer:
        writer.append(tokens)
    return writer.path


def read_header(path: str | os.PathLike) -> int:
    """Validate an llm.c shard header against the file and return its token count."""
    return _read_header(path)[0]


def _read_header(path: str | os.PathLike) -> tuple[int, np.dtype]:
    """(token count, token dtype) of a shard whose header matches the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise TritonGPTError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte llm.c shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise TritonGPTError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not an llm.c token shard "
                             f"(header-less nanoGPT files must be named train.bin / val.bin)")
    if int(header[1]) not in VERSIONS:
        raise TritonGPTError(f"{path}: unsupported shard version {header[1]} (read: 1, uint16 tokens; 2, uint32)")
    dtype = VERSIONS[int(header[1])]
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + dtype.itemsize * count:
        raise TritonGPTError(f"{path}: header says {count} tokens ({HEADER_BYTES + dtype.itemsize * count} bytes, "
                             f"{dtype.name} ids of version {header[1]}) but the file has {size} bytes")
    return count, dtype


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of an llm.c shard, memory-mapped read-only (uint16 or uint32, as its version
    says), after validating its header."""
    count, dtype = _read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


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
