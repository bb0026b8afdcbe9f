"""Hugging Face tokenizers (`--tokenizer hf:DIR`) through prepare, train and sample, with small
tokenizers built in the test by the `tokenizers` library (nothing downloaded), and uint32 shards
(version 2) for vocabularies over 65,536."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import tiny_flags

from tritongpt.cli import main
from tritongpt.data.assets import find_asset
from tritongpt.data.loader import ShardLoader
from tritongpt.data.shards import HEADER_BYTES, MAGIC, read_header, read_shard, write_shard
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.train import checkpoint, config, trainer

tokenizers = pytest.importorskip("tokenizers")
TEXT = find_asset("tinyshakespeare.txt").read_text()[:20_000]
ODD = "naïve café — 東京 😀 <|endoftext|> end"  # multi-byte characters, and the special token's text


def byte_level_bpe(directory, vocab: int = 400):
    """A GPT-2-style byte-level BPE trained on a slice of tinyshakespeare, saved as tokenizer.json."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer_ = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                              initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer_)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def word_level(directory, vocab: int):
    """A word-level tokenizer of `vocab` words w0, w1, ... plus </s> (the last id): a vocabulary
    over 65,536 without training one."""
    words = {f"w{i}": i for i in range(vocab - 1)} | {"</s>": vocab - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="</s>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(["</s>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return byte_level_bpe(tmp_path_factory.mktemp("bpe") / "tok")


def test_hf_encoding_round_trips_bytes_and_special_tokens(bpe_dir):
    enc = get_encoding(f"hf:{bpe_dir}")
    assert enc.name == f"hf:{bpe_dir.resolve()}" and enc.n_vocab == 400
    assert enc.eot_token == tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json")).token_to_id(
        "<|endoftext|>")
    ordinary = enc.encode_ordinary(ODD)
    assert enc.eot_token not in ordinary  # the special token's text is plain text here
    assert enc.decode(ordinary) == ODD
    special = enc.encode(ODD, allowed_special="all")
    assert special.count(enc.eot_token) == 1 and enc.decode(special) == ODD
    pieces = b"".join(enc.decode_single_token_bytes(t) for t in special)
    assert pieces.decode() == ODD  # streamed bytes: multi-byte characters split across tokens rejoin
    assert len(enc.encode_ordinary(TEXT[:2000])) < 2000 / 1.5  # merges learned: fewer tokens than bytes


def test_hf_encoding_errors(tmp_path):
    with pytest.raises(TritonGPTError, match="tokenizer.json not found"):
        get_encoding(f"hf:{tmp_path}")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    (tmp_path / "noeot").mkdir()
    tok.save(str(tmp_path / "noeot" / "tokenizer.json"))
    with pytest.raises(TritonGPTError, match="no end-of-text token"):
        get_encoding(f"hf:{tmp_path / 'noeot'}")
    (tmp_path / "noeot" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "b"}}))
    get_encoding.cache_clear()
    assert get_encoding(f"hf:{tmp_path / 'noeot'}").eot_token == 1  # tokenizer_config.json's eos_token


def test_prepare_train_and_sample_with_an_hf_tokenizer(bpe_dir, tmp_path, capsys):
    source = tmp_path / "text.txt"
    source.write_text(TEXT)
    shards = tmp_path / "shards"
    assert main(["prepare", str(source), "--out", str(shards), "--tokenizer", f"hf:{bpe_dir}", "--workers", "1"]) == 0
    meta = json.loads((shards / "meta.json").read_text())
    enc = get_encoding(f"hf:{bpe_dir}")
    assert meta["tokenizer"] == enc.name and meta["vocab_size"] == 400 and "version 1" in meta["format"]
    tokens = [np.asarray(read_shard(shards / name)) for split in ("train", "val") for name in meta["shards"][split]]
    assert all(t.dtype == np.uint16 for t in tokens)
    assert enc.decode(np.concatenate(tokens).tolist()) == TEXT  # nanoGPT's split: train + val is the text
    out = tmp_path / "run"
    flags = tiny_flags(shards, out, preset="llama-tiny", n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                       ffn_hidden=64, vocab_size=448, real_vocab_size=400, max_steps=2, sample_tokens=6)
    assert trainer.train(config.configure(flags)) == 0
    assert checkpoint.load(out)["tokenizer"] == enc.name
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0", "--device", "cpu", "--backend", "torch"]) == 0
    printed = capsys.readouterr().out
    model, _ = checkpoint.load_model(out, "cpu", backend="torch")
    prompt = torch.tensor([enc.encode("ROMEO:")])
    expected = enc.decode(model.generate(prompt, 8, temperature=0.0)[0].tolist())
    assert printed.rstrip("\n") == expected


def test_vocab_over_65536_gets_uint32_shards(tmp_path):
    vocab = 70_001
    tokens = np.random.default_rng(0).integers(0, vocab, size=5000)
    tokens[:2] = (vocab - 1, 65_536)  # ids a uint16 cannot hold
    path = write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=vocab)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [MAGIC, 2, 5000] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 4 * 5000 and read_header(path) == 5000
    read = read_shard(path)
    assert read.dtype == np.uint32
    np.testing.assert_array_equal(read, tokens)
    loader = ShardLoader(tmp_path, "train", 2, 8, sequential=True, vocab_size=vocab)
    x, y = loader.next_batch()
    assert torch.equal(x[0], torch.from_numpy(tokens[:8])) and torch.equal(y[0], torch.from_numpy(tokens[1:9]))
    with pytest.raises(TritonGPTError, match=r"\[0, 65536\) to fit uint16"):
        write_shard(tmp_path / "narrow.bin", tokens)  # the default vocabulary: uint16
    with pytest.raises(TritonGPTError, match="token id 70000 .* >= the vocabulary size 70000"):
        ShardLoader(tmp_path, "train", 2, 8, vocab_size=vocab - 1)


def test_prepare_with_a_large_hf_vocabulary_writes_uint32(tmp_path):
    vocab = 70_001
    directory = word_level(tmp_path / "words", vocab)
    ids = [69_999, 3, 65_536, 12, 70_000, 40_000] * 50
    source = tmp_path / "words.txt"
    source.write_text(" ".join(f"w{i}" if i < vocab - 1 else "</s>" for i in ids))
    assert main(["prepare", str(source), "--out", str(tmp_path / "shards"), "--tokenizer", f"hf:{directory}",
                 "--workers", "1", "--val-fraction", "0"]) == 0
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["vocab_size"] == vocab and meta["eot_id"] == vocab - 1 and "version 2" in meta["format"]
    (name,) = meta["shards"]["train"]
    np.testing.assert_array_equal(read_shard(tmp_path / "shards" / name), ids)
