"""Tokenize a text corpus into llm.c shards: train_000000.bin ..., val_000000.bin ..., meta.json.

    tritongpt prepare tinyshakespeare --out data/shakespeare          # 301,966 train / 36,059 val tokens
    tritongpt prepare 'corpus/**/*.jsonl' --out data/corpus --workers 8 --shard-tokens 100000000

Two split rules:
  * one text file (or the name `tinyshakespeare`): nanoGPT's rule. The first
    int(chars * (1 - val_fraction)) characters are train, the rest val; each split is tokenized
    with encode_ordinary and no end-of-text tokens, so the counts equal nanoGPT's prepare.py.
    The file is read twice: once to count its characters, once to tokenize it.
  * many documents (a directory or glob of .txt / .jsonl / .parquet files; a .jsonl file is one
    document per line, field "text" (--text-column); a .parquet file (FineWeb's format; needs
    pyarrow, the `parquet` extra) one document per row of that string column, read in batches of
    PARQUET_BATCH_ROWS rows so memory stays bounded; a .txt file is one document): document i goes to val when
    floor((i + 1) * val_fraction) > floor(i * val_fraction) (every 10th document for 0.1, in
    the sorted file order), and every document is preceded by end-of-text, as llm.c's fineweb.py.
Memory stays bounded whatever the corpus size: files are read in blocks and re-cut into pieces
of about CHUNK_CHARS characters at points where tokenizing the pieces separately gives exactly the
tokens of the whole (just after a newline, or else just before a space, with non-whitespace on
both sides; only text with no such point for 4 * CHUNK_CHARS characters is cut anywhere).
Pieces are tokenized by `workers` processes (at most one per CHUNK_CHARS bytes of input) and written
in input order, so the shards do not depend on the number of workers. The output directory is
built beside its target and swapped in whole once every shard is written (tritongpt.files).
"""

from __future__ import annotations

import codecs
import collections
import functools
import glob
import io
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tritongpt.data.assets import find_asset
from tritongpt.data.shards import VERSIONS, ShardWriter, version_for
from tritongpt.data.tokenizer import get_encoding, tokenizer_name
from tritongpt.errors import TritonGPTError
from tritongpt.files import staged_dir
from tritongpt.progress import Progress

CHUNK_CHARS = 1 << 20  # characters per tokenization piece and per worker task
READ_BYTES = 1 << 20
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shard size: 200 MB per shard
NAMED_SOURCES = {"tinyshakespeare": "tinyshakespeare.txt"}
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOCUMENT_SUFFIXES = (".jsonl", ".parquet")  # a file of many documents
PARQUET_BATCH_ROWS = 1024  # rows read from a Parquet file at a time


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str = "gpt2",
            val_fraction: float = 0.1, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
            force: bool = False, progress: bool = True, text_column: str = "text") -> dict:
    """Tokenize `source` into shards in `out_dir` and return meta.json's contents (see the module doc)."""
    if not 0.0 <= val_fraction < 1.0:
        raise TritonGPTError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 1 <= shard_tokens < 1 << 31:
        raise TritonGPTError(f"shard_tokens must be in [1, 2**31) (an int32 header count), got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise TritonGPTError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TritonGPTError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TritonGPTError(f"output directory {out} is not empty; pass --force (force=True) to replace it")
    single_file, files = resolve_source(source)
    inside = [f for f in files if out.resolve() in f.resolve().parents]
    if inside:
        raise TritonGPTError(f"output directory {out} holds the source file {inside[0]}; choose another --out")
    tokenizer = tokenizer_name(tokenizer)  # as meta.json records it (an hf: directory made absolute)
    encoding = get_encoding(tokenizer)
    total_bytes = sum(f.stat().st_size for f in files)
    workers = max(1, min(workers, math.ceil(total_bytes / CHUNK_CHARS)))  # no more processes than tasks

    with staged_dir(out) as staging:
        meta = _write_shards(staging, single_file, files, encoding, tokenizer, val_fraction, shard_tokens, workers,
                             text_column,
                             _Progress(total_bytes, enabled=progress))
        meta["source"] = str(source)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def resolve_source(source: str | os.PathLike) -> tuple[bool, list[Path]]:
    """(single_file, files): a text file; a directory or glob of .txt/.jsonl files; or a named corpus."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path.suffix not in DOCUMENT_SUFFIXES, [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise TritonGPTError(f"source directory {path} holds no .txt or .jsonl files")
        return False, files
    if any(c in text for c in "*?["):
        files = sorted(f for f in map(Path, glob.glob(os.path.expanduser(text), recursive=True))
                       if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise TritonGPTError(f"source pattern {text!r} matches no .txt or .jsonl files")
        return False, files
    if text in NAMED_SOURCES:
        return True, [find_asset(NAMED_SOURCES[text])]
    raise TritonGPTError(f"source {text!r} is not a file, a directory, a glob of .txt/.jsonl files, or a named "
                         f"corpus ({', '.join(NAMED_SOURCES)})")


def _write_shards(directory: Path, single_file: bool, files: list[Path], encoding, tokenizer: str,
                  val_fraction: float, shard_tokens: int, workers: int, text_column: str, progress: _Progress) -> dict:
    documents = collections.Counter()
    if single_file:
        items = _single_file_items(files[0], val_fraction, progress)
    else:
        items = _document_items(files, val_fraction, progress, documents, text_column)
    writers = {split: _SplitShards(directory, split, shard_tokens, encoding.n_vocab) for split in SPLITS}
    try:
        for result in _ordered_map(functools.partial(_tokenize, tokenizer), _tasks(items), workers):
            for split, tokens in result:
                writers[split].write(tokens)
                progress.add_tokens(tokens.size)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    progress.finish()
    version = version_for(encoding.n_vocab)
    meta = {
        "tokenizer": tokenizer,
        "vocab_size": encoding.n_vocab,
        "eot_id": encoding.eot_token,
        "tokens": {split: writers[split].num_tokens for split in SPLITS},
        "shards": {split: writers[split].names for split in SPLITS},
        "split_rule": "characters" if single_file else "documents",
        "val_fraction": val_fraction,
        "eot_separators": not single_file,
        "shard_tokens": shard_tokens,
        "files": len(files),
        "format": f"llm.c: 256 int32 header (magic 20240520, version {version}, token count), then "
                  f"{VERSIONS[version].name} tokens",
    }
    if not single_file:
        meta["documents"] = {split: documents[split] for split in SPLITS}
    return meta


def _single_file_items(path: Path, val_fraction: float, progress: _Progress) -> Iterator[tuple[str, str, bool]]:
    """(split, text, eot_first) pieces of one file, split nanoGPT's way at a character offset."""
    progress.message(f"counting the characters of {path} to place the train/val split")
    total_chars = sum(len(block) for block in _read_text(path))
    split_at = int(total_chars * (1 - val_fraction))

    def blocks() -> Iterator[tuple[str, str]]:
        offset = 0
        for block in _read_text(path, progress):
            if offset < split_at < offset + len(block):
                yield "train", block[:split_at - offset]
                yield "val", block[split_at - offset:]
            else:
                yield ("train" if offset < split_at else "val"), block
            offset += len(block)

    for split, group in itertools.groupby(blocks(), key=lambda pair: pair[0]):
        for piece in _pieces(block for _, block in group):
            yield split, piece, False


def _document_items(files: list[Path], val_fraction: float, progress: _Progress,
                    documents: collections.Counter, text_column: str = "text") -> Iterator[tuple[str, str, bool]]:
    """(split, text, eot_first) pieces of every document; each document's first piece starts with eot."""
    def docs() -> Iterator[Iterable[str]]:
        for path in files:
            if path.suffix == ".jsonl":
                yield from ([text] for text in _read_jsonl(path, progress, text_column))
            elif path.suffix == ".parquet":
                yield from ([text] for text in _read_parquet(path, progress, text_column))
            else:
                yield _read_text(path, progress)

    for index, blocks in enumerate(docs()):
        split = "val" if math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction) else "train"
        documents[split] += 1
        first = True
        for piece in _pieces(blocks):
            yield split, piece, first
            first = False
        if first:  # an empty document still gets its end-of-text
            yield split, "", True


def _read_text(path: Path, progress: _Progress | None = None) -> Iterator[str]:
    """Decoded UTF-8 blocks of a file with universal newlines (as Python's open(path, "r") reads it)."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    try:
        with open(path, "rb") as f:
            for raw in iter(lambda: f.read(READ_BYTES), b""):
                if progress:
                    progress.add_bytes(len(raw))
                if block := decoder.decode(raw):
                    yield block
            if block := decoder.decode(b"", final=True):
                yield block
    except UnicodeDecodeError as exc:
        raise TritonGPTError(f"{path}: not UTF-8 text ({exc})") from None


def _read_jsonl(path: Path, progress: _Progress, field: str = "text") -> Iterator[str]:
    """The `field` string of each line of a .jsonl file."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            progress.add_bytes(len(line))
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (ValueError, KeyError, TypeError) as exc:
                raise TritonGPTError(f"{path}:{number}: expected a JSON object with a string field \"{field}\" "
                                     f"({type(exc).__name__}: {exc})") from None
            if not isinstance(text, str):
                raise TritonGPTError(f"{path}:{number}: field \"{field}\" is {type(text).__name__}, not a string")
            yield text


def _read_parquet(path: Path, progress: _Progress, column: str) -> Iterator[str]:
    """The `column` string of each row of a Parquet file, PARQUET_BATCH_ROWS rows at a time."""
    try:
        import pyarrow as pa  # lazy: pyarrow is the optional `parquet` extra
        import pyarrow.parquet as pq  # lazy: as above
    except ImportError:
        raise TritonGPTError(f"{path}: reading Parquet needs pyarrow (pip install 'tritongpt[parquet]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TritonGPTError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise TritonGPTError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); choose one with "
                             f"--text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TritonGPTError(f"{path}: column {column!r} holds {kind}, not strings")
    rows, size, done = max(1, parquet.metadata.num_rows), path.stat().st_size, 0
    for number, batch in enumerate(parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column])):
        texts = batch.column(0).to_pylist()
        if None in texts:
            row = number * PARQUET_BATCH_ROWS + texts.index(None)
            raise TritonGPTError(f"{path}: row {row} has no {column!r} (null)")
        shown, done = done, done + len(texts)
        progress.add_bytes(size * done // rows - size * shown // rows)
        yield from texts


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of about CHUNK_CHARS that tokenize as the whole does."""
    carry = ""
    for block in blocks:
        carry += block
        while len(carry) >= CHUNK_CHARS:
            cut = _last_safe_cut(carry)
            if cut is None:
                if len(carry) < 4 * CHUNK_CHARS:
                    break
                cut = CHUNK_CHARS
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def _last_safe_cut(text: str) -> int | None:
    """The last offset where GPT-2-style regex pre-tokenization never joins the two sides: after a
    newline, else before a space, with non-whitespace on both sides of that single character."""
    for sep, after in (("\n", 1), (" ", 0)):
        i = len(text) - 1
        while (i := text.rfind(sep, 1, i)) > 0:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + after
    return None


def _tasks(items: Iterable[tuple[str, str, bool]]) -> Iterator[list[tuple[str, str, bool]]]:
    """Group pieces into worker tasks of about CHUNK_CHARS characters."""
    task, size = [], 0
    for item in items:
        task.append(item)
        size += len(item[1])
        if size >= CHUNK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


def _tokenize(tokenizer: str, task: list[tuple[str, str, bool]]) -> list[tuple[str, np.ndarray]]:
    """Worker: token ids of a task's pieces, concatenated per split in input order."""
    encoding = get_encoding(tokenizer)
    per_split: dict[str, list[int]] = {}
    for split, text, eot_first in task:
        ids = per_split.setdefault(split, [])
        if eot_first:
            ids.append(encoding.eot_token)
        ids.extend(encoding.encode_ordinary(text))
    return [(split, np.array(ids, dtype=np.uint32)) for split, ids in per_split.items()]


def _ordered_map(fn, tasks: Iterable, workers: int) -> Iterator:
    """map(fn, tasks) in input order on `workers` processes, with at most 2 * workers tasks in
    flight (Pool.imap would read the whole input ahead, so memory would grow with the corpus)."""
    if workers == 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitShards:
    """Writes one split's token stream as {split}_000000.bin, {split}_000001.bin, ... of shard_tokens each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, vocab_size: int):
        self.directory, self.split, self.shard_tokens, self.vocab_size = directory, split, shard_tokens, vocab_size
        self.names: list[str] = []
        self.num_tokens = 0
        self._writer: ShardWriter | None = None

    def write(self, tokens: np.ndarray) -> None:
        self.num_tokens += tokens.size
        while tokens.size:
            if self._writer is None:
                self._writer = ShardWriter(self.directory / f"{self.split}_{len(self.names):06d}.bin", self.vocab_size)
            room = self.shard_tokens - self._writer.num_tokens
            self._writer.append(tokens[:room])
            tokens = tokens[room:]
            if self._writer.num_tokens == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self.names.append(self._writer.close().name)
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class _Progress:
    """Bytes read and tokens written, on stderr: a redrawn bar on a terminal, else a line per 10%."""

    def __init__(self, total_bytes: int, enabled: bool = True):
        self.bar = Progress(total_bytes, label="prepare", enabled=enabled, stream=sys.stderr,
                            counter=lambda done, total: f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB")
        self.bytes = self.tokens = 0
        self.start = time.perf_counter()
        self.next_decile = 1

    def add_bytes(self, n: int) -> None:
        self.bytes += n

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        self._show(final=False)

    def finish(self) -> None:
        self._show(final=True)
        self.bar.close()

    def message(self, text: str) -> None:
        self.bar.write(f"prepare: {text}")

    def _show(self, final: bool) -> None:
        fraction = min(self.bytes / self.bar.total, 1.0)
        decile = fraction * 10 >= self.next_decile and fraction < 1.0
        if decile:
            self.next_decile = int(fraction * 10) + 1
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.bytes, f"{fraction:6.1%} {self.tokens:,} tokens {rate:,.0f} tok/s", log=final or decile)
