"""Assets, the GPT-2 tokenizer, llm.c shards and the ShardLoader: real files in tmp dirs, the real
gpt2.tiktoken asset, no network."""

import hashlib
import json

import numpy as np
import pytest
import torch

from tritongpt.data import assets
from tritongpt.data.loader import ShardLoader
from tritongpt.data.shards import HEADER_BYTES, MAGIC, read_header, read_shard, version_for, write_shard
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError


def random_tokens(n, seed=0, high=50257):
    return np.random.default_rng(seed).integers(0, high, size=n, dtype=np.int64)


# ---- assets ----------------------------------------------------------------------------------

@pytest.fixture
def asset_env(tmp_path, monkeypatch):
    env_dir, cache = tmp_path / "env", tmp_path / "cache"
    env_dir.mkdir()
    monkeypatch.setenv("TRITONGPT_ASSETS", str(tmp_path / "absent") + ":" + str(env_dir))
    monkeypatch.setenv("TRITONGPT_CACHE", str(cache))
    return env_dir, cache


def test_asset_lookup_order_env_then_cache(asset_env):
    env_dir, cache = asset_env
    cache.mkdir()
    (cache / "tinyshakespeare.txt").write_text("cached")
    assert assets.find_asset("tinyshakespeare.txt", download=False) == cache / "tinyshakespeare.txt"
    (env_dir / "tinyshakespeare.txt").write_text("from env")
    assert assets.find_asset("tinyshakespeare.txt", download=False) == env_dir / "tinyshakespeare.txt"


def test_asset_missing_says_what_to_put_where(asset_env):
    env_dir, cache = asset_env
    with pytest.raises(TritonGPTError) as info:
        assets.find_asset("gpt2.tiktoken", download=False)
    message = str(info.value)
    for part in ("gpt2.tiktoken", "TRITONGPT_ASSETS", str(cache), str(env_dir), assets.ASSETS["gpt2.tiktoken"].sha256):
        assert part in message


def test_download_into_cache_verifies_sha256(tmp_path, monkeypatch):
    """The download path, offline: tinyshakespeare from a file:// URL (urllib), gpt2.tiktoken from a
    local path (tiktoken's reader, its own cache disabled)."""
    shared = {name: assets.find_asset(name, download=False) for name in ("tinyshakespeare.txt", "gpt2.tiktoken")}
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITONGPT_ASSETS", str(tmp_path / "absent"))
    monkeypatch.setenv("TRITONGPT_CACHE", str(cache))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    for name, url in (("tinyshakespeare.txt", shared["tinyshakespeare.txt"].as_uri()),
                      ("gpt2.tiktoken", str(shared["gpt2.tiktoken"]))):
        monkeypatch.setitem(assets.ASSETS, name, assets.Asset(assets.ASSETS[name].checksum, url, "test"))
        assert assets.find_asset(name) == cache / name
        assert (cache / name).read_bytes() == shared[name].read_bytes()
    bad_sha = assets.Asset("sha256:" + "0" * 64, shared["tinyshakespeare.txt"].as_uri(), "test")
    monkeypatch.setitem(assets.ASSETS, "other.txt", bad_sha)
    with pytest.raises(TritonGPTError, match="downloading it failed .*checksum of the download is sha256:86c4e6aa"):
        assets.find_asset("other.txt")
    # git's blob id as the checksum (HellaSwag's file is known by its object id in its repository)
    text = shared["tinyshakespeare.txt"].read_bytes()
    blob_id = hashlib.sha1(f"blob {len(text)}".encode() + bytes(1) + text).hexdigest()
    monkeypatch.setitem(assets.ASSETS, "blob.txt", assets.Asset(f"git-blob-sha1:{blob_id}",
                                                                shared["tinyshakespeare.txt"].as_uri(), "test"))
    assert assets.find_asset("blob.txt").read_bytes() == text
    assert sorted(p.name for p in cache.iterdir()) == ["blob.txt", "gpt2.tiktoken", "tinyshakespeare.txt"]


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITONGPT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "tritongpt"
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"


# ---- tokenizer -------------------------------------------------------------------------------

def test_gpt2_encoding_offline():
    enc = get_encoding("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "Shall I compare thee to a summer's day?\n\n  Thou art more lovely 1234!"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(TritonGPTError, match="unknown tokenizer 'nope'.*gpt2"):
        get_encoding("nope")


def test_shard_version_follows_the_vocabulary():
    """uint16 ids (llm.c's version 1) up to 65,536 tokens, uint32 (version 2) above (tests/test_tokenizer.py)."""
    assert [version_for(v) for v in (50257, 65536, 65537, 128256)] == [1, 1, 2, 2]


# ---- shards ----------------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    tokens = random_tokens(1000, high=65536)
    path = write_shard(tmp_path / "s.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [MAGIC, 1, 1000] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * 1000 and read_header(path) == 1000
    np.testing.assert_array_equal(read_shard(path), tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_write_shard_rejects_ids_over_uint16(tmp_path):
    with pytest.raises(TritonGPTError, match="uint16"):
        write_shard(tmp_path / "s.bin", np.array([1, 70000]))
    assert list(tmp_path.iterdir()) == []


def corrupt(path, int_index, value):
    data = bytearray(path.read_bytes())
    data[4 * int_index:4 * int_index + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, pattern", [
    ("magic", "bad magic number 12345"),
    ("version", "unsupported shard version 3"),
    ("wider", "header says 500 tokens .*uint32 ids of version 2.* but the file has 2024 bytes"),
    ("count", "header says 501 tokens .* but the file has 2024 bytes"),
    ("truncated", "header says 500 tokens .* but the file has 2022 bytes"),
    ("short", "shorter than the 1024-byte"),
])
def test_corrupt_shard_rejected(tmp_path, case, pattern):
    data = tmp_path / "d"
    data.mkdir()
    path = write_shard(data / "train_000000.bin", random_tokens(500))
    if case == "magic":
        corrupt(path, 0, 12345)
    elif case == "version":
        corrupt(path, 1, 3)
    elif case == "wider":  # a uint16 shard labelled uint32
        corrupt(path, 1, 2)
    elif case == "count":
        corrupt(path, 2, 501)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-2])
    else:
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TritonGPTError, match=pattern) as info:
        ShardLoader(data, "train", 2, 8)
    assert str(path) in str(info.value)


def test_token_over_vocab_rejected(tmp_path):
    tokens = random_tokens(300)
    tokens[123] = 50300
    path = write_shard(tmp_path / "train_000000.bin", tokens)
    ShardLoader(tmp_path, "train", 2, 8)  # no vocabulary known: accepted
    with pytest.raises(TritonGPTError, match="token id 50300 at position 123 is >= the vocabulary size 50257") as info:
        ShardLoader(tmp_path, "train", 2, 8, vocab_size=50257)
    assert str(path) in str(info.value)


def test_too_few_tokens_and_missing_split(tmp_path):
    path = write_shard(tmp_path / "train_000000.bin", random_tokens(16))
    ShardLoader(tmp_path, "train", 2, 15)
    with pytest.raises(TritonGPTError, match=r"block_size \+ 1 = 17 tokens .*train_000000.bin, has 16"):
        ShardLoader(tmp_path, "train", 2, 16)
    with pytest.raises(TritonGPTError, match="no 'val' data in"):
        ShardLoader(tmp_path, "val", 2, 8)
    (tmp_path / "meta.json").write_text(json.dumps({"shards": {"train": [path.name, "train_000001.bin"]}}))
    with pytest.raises(TritonGPTError, match="train_000001.bin: missing"):
        ShardLoader(tmp_path, "train", 2, 8)
    with pytest.raises(TritonGPTError, match="does not exist"):
        ShardLoader(tmp_path / "nowhere", "train", 2, 8)


# ---- loader ----------------------------------------------------------------------------------

def test_nanogpt_headerless_bin(tmp_path):
    tokens = random_tokens(1001, seed=3)
    tokens.astype(np.uint16).tofile(tmp_path / "val.bin")
    loader = ShardLoader(tmp_path, "val", 4, 10, sequential=True, vocab_size=50257)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
    expected = np.stack([tokens[i * 10:i * 10 + 11] for i in range(4)])
    np.testing.assert_array_equal(x.numpy(), expected[:, :-1])
    np.testing.assert_array_equal(y.numpy(), expected[:, 1:])
    (tmp_path / "train.bin").write_bytes(b"\0" * 21)
    with pytest.raises(TritonGPTError, match="train.bin: 21 bytes is not a whole number"):
        ShardLoader(tmp_path, "train", 1, 4)


def test_llmc_fineweb_names_and_order(tmp_path):
    a, b = random_tokens(50, seed=1), random_tokens(70, seed=2)
    write_shard(tmp_path / "fineweb_train_000002.bin", b)
    write_shard(tmp_path / "fineweb_train_000001.bin", a)
    write_shard(tmp_path / "fineweb_val_000000.bin", a)
    loader = ShardLoader(tmp_path, "train", 1, 10, sequential=True)
    assert [p.name for p, _ in loader.files] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert loader.num_windows == 4 + 6 and loader.num_tokens == 120
    rows = [loader.next_batch() for _ in range(11)]
    np.testing.assert_array_equal(rows[4][0].numpy()[0], b[:10])  # 5th window: first of the second shard
    np.testing.assert_array_equal(rows[10][0].numpy()[0], a[:10])  # wrapped around


@pytest.fixture
def shard_dir(tmp_path):
    tokens = random_tokens(5100, seed=7)
    for i in range(3):
        write_shard(tmp_path / f"train_{i:06d}.bin", tokens[i * 1700:(i + 1) * 1700])
    return tmp_path


def batches(loader, n):
    return [tuple(t.numpy() for t in loader.next_batch()) for _ in range(n)]


@pytest.mark.parametrize("sequential", [False, True])
def test_batches_are_shifted_windows_of_the_data(shard_dir, sequential):
    loader = ShardLoader(shard_dir, "train", 3, 16, seed=1, sequential=sequential)
    windows = np.concatenate([np.lib.stride_tricks.sliding_window_view(s, 17) for s in loader.shards])
    for x, y in batches(loader, 20):
        assert x.shape == y.shape == (3, 16)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            assert (windows == np.concatenate([row_x, row_y[-1:]])).all(axis=1).any()


def test_random_batches_deterministic_by_seed(shard_dir):
    first = batches(ShardLoader(shard_dir, "train", 4, 32, seed=5), 5)
    again = batches(ShardLoader(shard_dir, "train", 4, 32, seed=5), 5)
    other = batches(ShardLoader(shard_dir, "train", 4, 32, seed=6), 5)
    for (x1, y1), (x2, y2), (x3, _) in zip(first, again, other):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert not np.array_equal(x1, x3)
    assert not np.array_equal(first[0][0], first[1][0])


@pytest.mark.parametrize("sequential", [False, True])
def test_resume_from_state_dict(shard_dir, sequential):
    straight = batches(ShardLoader(shard_dir, "train", 4, 32, seed=9, sequential=sequential), 30)
    loader = ShardLoader(shard_dir, "train", 4, 32, seed=9, sequential=sequential)
    head = batches(loader, 12)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
    resumed = ShardLoader(shard_dir, "train", 4, 32, seed=0, sequential=sequential)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(straight, head + batches(resumed, 18)):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    with pytest.raises(TritonGPTError, match="saved state"):
        ShardLoader(shard_dir, "train", 4, 32, sequential=not sequential).load_state_dict(state)


@pytest.mark.parametrize("sequential", [False, True])
def test_ranks_read_their_own_part_of_the_global_batch(shard_dir, sequential):
    whole = batches(ShardLoader(shard_dir, "train", 6, 16, seed=2, sequential=sequential), 8)
    ranks = [batches(ShardLoader(shard_dir, "train", 2, 16, seed=2, rank=r, world_size=3, sequential=sequential), 8)
             for r in range(3)]
    for step, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([ranks[r][step][0] for r in range(3)]), x)
        np.testing.assert_array_equal(np.concatenate([ranks[r][step][1] for r in range(3)]), y)
        assert not np.array_equal(ranks[0][step][0], ranks[1][step][0])
    if sequential:  # one pass over all ranks reads every window once, in order
        loaders = [ShardLoader(shard_dir, "train", 2, 16, rank=r, world_size=3, sequential=True) for r in range(3)]
        windows = [np.asarray(s)[k * 16:(k + 1) * 16] for s in loaders[0].shards for k in range(1699 // 16)]
        assert loaders[0].num_windows == len(windows) == 318
        read = [row for _ in range(318 // 6) for loader in loaders for row in loader.next_batch()[0].numpy()]
        np.testing.assert_array_equal(np.stack(read), np.stack(windows))


def test_loader_argument_errors(shard_dir):
    with pytest.raises(TritonGPTError, match="rank 2 is outside"):
        ShardLoader(shard_dir, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(TritonGPTError, match="batch_size must be an integer >= 1"):
        ShardLoader(shard_dir, "train", 0, 8)
