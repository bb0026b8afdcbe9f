"""`tritongpt prepare`: nanoGPT's tinyshakespeare counts, document corpora with end-of-text
separators, sharding, overwrite protection, worker-count independence and the CLI. Real files,
the real gpt2.tiktoken and tinyshakespeare assets (TRITONGPT_ASSETS), no network."""

import json
import re

import numpy as np
import pytest

from tritongpt import cli
from tritongpt.data import assets
from tritongpt.data import prepare as prepare_module
from tritongpt.data.loader import ShardLoader
from tritongpt.data.prepare import prepare
from tritongpt.data.shards import read_shard
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError

EOT = 50256


def split_tokens(out, meta, split):
    return np.concatenate([np.asarray(read_shard(out / name)) for name in meta["shards"][split]])


@pytest.fixture
def small_pieces(monkeypatch):
    """Cut text into many small pieces and tasks, so the streaming seams are exercised."""
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 2000)


def test_tinyshakespeare_matches_nanogpt(tmp_path, small_pieces):
    out = tmp_path / "shakespeare"
    meta = prepare("tinyshakespeare", out, workers=1, progress=False)
    assert meta["tokens"] == {"train": 301_966, "val": 36_059}
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2", 50257, EOT)
    # nanoGPT's data/shakespeare/prepare.py, done whole in memory
    text = assets.find_asset("tinyshakespeare.txt").read_text(encoding="utf-8")
    n = len(text)
    enc = get_encoding("gpt2")
    np.testing.assert_array_equal(split_tokens(out, meta, "train"), enc.encode_ordinary(text[:int(n * 0.9)]))
    np.testing.assert_array_equal(split_tokens(out, meta, "val"), enc.encode_ordinary(text[int(n * 0.9):]))
    loader = ShardLoader(out, "val", 2, 64)
    assert loader.meta == meta and loader.vocab_size == 50257 and loader.num_tokens == 36_059


def test_single_file_universal_newlines_and_val_fraction(tmp_path, small_pieces):
    lines = [f"line {i}: the quick brown fox's {i * 7} jumps" for i in range(400)]
    (tmp_path / "c.txt").write_bytes("\r\n".join(lines).encode())
    meta = prepare(tmp_path / "c.txt", tmp_path / "out", val_fraction=0.25, workers=1, progress=False)
    text = "\n".join(lines)
    cut = int(len(text) * 0.75)
    enc = get_encoding("gpt2")
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", meta, "train"), enc.encode_ordinary(text[:cut]))
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", meta, "val"), enc.encode_ordinary(text[cut:]))
    assert meta["split_rule"] == "characters" and not meta["eot_separators"]


def make_corpus(root):
    """12 .txt documents then a .jsonl of 10: 22 documents in sorted-path order."""
    root.mkdir()
    docs = [f"Document {i}.\nIt has {i} lines,\n" + "and words\n" * (i * 37) for i in range(12)]
    docs[3] = ""  # an empty document still gets its end-of-text
    docs[5] = "text that mentions <|endoftext|> is not an end-of-text token"
    for i, doc in enumerate(docs):
        (root / f"doc_{i:02d}.txt").write_text(doc)
    records = [{"text": f"json record {j} " + "lorem ipsum " * j, "id": j} for j in range(10)]
    (root / "more.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return docs + [r["text"] for r in records]


def test_directory_of_txt_and_jsonl(tmp_path, small_pieces):
    docs = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    meta = prepare(tmp_path / "corpus", out, shard_tokens=300, workers=1, progress=False)
    enc = get_encoding("gpt2")
    val_docs = {9, 19}  # every 10th document
    for split in ("train", "val"):
        chosen = [d for i, d in enumerate(docs) if (i in val_docs) == (split == "val")]
        expected = np.concatenate([[EOT] + enc.encode_ordinary(d) for d in chosen])
        tokens = split_tokens(out, meta, split)
        np.testing.assert_array_equal(tokens, expected)
        assert (tokens == EOT).sum() == len(chosen) == meta["documents"][split]
        assert meta["tokens"][split] == len(tokens)
        sizes = [len(read_shard(out / name)) for name in meta["shards"][split]]
        assert all(s == 300 for s in sizes[:-1]) and 0 < sizes[-1] <= 300
        assert meta["shards"][split] == [f"{split}_{i:06d}.bin" for i in range(len(sizes))]
    assert meta["split_rule"] == "documents" and meta["eot_separators"] and meta["files"] == 13
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json"] + meta["shards"]["train"] +
                                                            meta["shards"]["val"])


def test_jsonl_file_and_glob_sources(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    enc = get_encoding("gpt2")
    meta = prepare(tmp_path / "corpus" / "more.jsonl", tmp_path / "a", workers=1, progress=False)
    assert meta["documents"] == {"train": 9, "val": 1}
    np.testing.assert_array_equal(split_tokens(tmp_path / "a", meta, "val"), [EOT] + enc.encode_ordinary(docs[21]))
    meta = prepare(str(tmp_path / "corpus" / "doc_0*.txt"), tmp_path / "b", workers=1, progress=False)
    assert meta["files"] == 10 and meta["documents"] == {"train": 9, "val": 1}


def test_workers_do_not_change_the_shards(tmp_path, small_pieces):
    make_corpus(tmp_path / "corpus")
    one = prepare(tmp_path / "corpus", tmp_path / "one", shard_tokens=500, workers=1, progress=False)
    two = prepare(tmp_path / "corpus", tmp_path / "two", shard_tokens=500, workers=2, progress=False)
    assert one == two
    for name in one["shards"]["train"] + one["shards"]["val"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "c.txt").write_text("to be or not to be\n" * 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(TritonGPTError, match="out is not empty; pass --force"):
        prepare(tmp_path / "c.txt", out, workers=1, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    meta = prepare(tmp_path / "c.txt", out, workers=1, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000000.bin", "val_000000.bin"]
    assert meta["tokens"]["train"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "out"]  # no temp dirs left
    with pytest.raises(TritonGPTError, match="holds the source file"):
        prepare(tmp_path / "c.txt", tmp_path, workers=1, force=True, progress=False)
    assert (tmp_path / "c.txt").is_file()


def test_bad_input_writes_nothing(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(TritonGPTError, match=r"bad.jsonl:2: expected a JSON object with a string field \"text\""):
        prepare(tmp_path / "bad.jsonl", tmp_path / "out", workers=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TritonGPTError, match="holds no .txt or .jsonl files"):
        prepare(tmp_path / "empty", tmp_path / "out", workers=1, progress=False)
    with pytest.raises(TritonGPTError, match="is not a file, a directory"):
        prepare(tmp_path / "nothing.txt", tmp_path / "out", workers=1, progress=False)
    with pytest.raises(TritonGPTError, match="val_fraction must be in"):
        prepare(tmp_path / "bad.jsonl", tmp_path / "out", val_fraction=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty"]


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare", "--help"])
    assert info.value.code == 0
    assert "tritongpt prepare tinyshakespeare --out" in capsys.readouterr().out
    assert cli.main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tritongpt prepare: error: source") and "missing.txt" in err
    (tmp_path / "c.txt").write_text("Hello world\n" * 20)
    assert cli.main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert re.search(r"^train +54 tokens in 1 shards$", capsys.readouterr().out, re.MULTILINE)


def test_parquet_gives_the_shards_of_the_same_documents_in_jsonl(tmp_path, small_pieces, monkeypatch):
    """FineWeb's layout: a string column among others, several row groups; read a few rows at a
    time (batches straddle row groups), the shards equal those of the same documents as .jsonl."""
    pa = pytest.importorskip("pyarrow")  # the `parquet` extra
    import pyarrow.parquet as pq

    monkeypatch.setattr(prepare_module, "PARQUET_BATCH_ROWS", 3)
    text = assets.find_asset("tinyshakespeare.txt").read_text()[:60_000]
    docs = [doc for doc in text.split("\n\n") if doc][:40] + ["", "naïve ünïcode — ok"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    table = pa.table({"id": [f"<urn:{i}>" for i in range(len(docs))], "content": docs,
                      "score": [float(i) for i in range(len(docs))]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "docs.parquet").num_row_groups == 6
    from_jsonl = prepare(tmp_path / "docs.jsonl", tmp_path / "jsonl", workers=1, progress=False)
    assert cli.main(["prepare", str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "parquet"),
                     "--text-column", "content", "--workers", "2"]) == 0
    from_parquet = json.loads((tmp_path / "parquet" / "meta.json").read_text())
    assert from_parquet["documents"] == from_jsonl["documents"] == {"train": 38, "val": 4}
    assert from_parquet["tokens"] == from_jsonl["tokens"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_tokens(tmp_path / "parquet", from_parquet, split),
                                      split_tokens(tmp_path / "jsonl", from_jsonl, split))
    enc = get_encoding("gpt2")
    expected_val = [t for i, doc in enumerate(docs) if (i + 1) % 10 == 0 for t in [EOT, *enc.encode_ordinary(doc)]]
    np.testing.assert_array_equal(split_tokens(tmp_path / "parquet", from_parquet, "val"), expected_val)

    with pytest.raises(TritonGPTError, match=r"no column 'text' \(columns: id, content, score\)"):
        prepare(tmp_path / "docs.parquet", tmp_path / "bad", workers=1, progress=False)
    with pytest.raises(TritonGPTError, match="column 'score' holds double, not strings"):
        prepare(tmp_path / "docs.parquet", tmp_path / "bad", workers=1, progress=False, text_column="score")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TritonGPTError, match="broken.parquet: not a readable Parquet file"):
        prepare(tmp_path / "broken.parquet", tmp_path / "bad", workers=1, progress=False)
    assert not (tmp_path / "bad").exists()
