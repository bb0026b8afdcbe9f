"""Checkpoint files: atomic writes (a kill -9 mid-save leaves the previous checkpoint), newest
lookup, pruning, RNG state round trips, and load_model from a run directory or a file."""

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT
from tritongpt.train import checkpoint, config


def tiny_state(step: int, cfg: config.TrainConfig, model: GPT) -> dict:
    """A checkpoint dict as the trainer writes it (no optimizer, for speed)."""
    return dict(step=step, model=model.state_dict(), config=cfg.to_dict(), optimizer={}, scaler={},
                rng=[checkpoint.rng_state()], loader=[{}], tokenizer="gpt2", world_size=1)


@pytest.fixture(scope="module")
def tiny():
    cfg = config.resolve({"n_layer": "1", "n_embd": "16", "n_head": "2", "block_size": "16", "backend": "torch"})
    torch.manual_seed(0)
    return cfg, GPT(cfg.model)


def test_save_latest_and_prune(tmp_path, tiny):
    cfg, model = tiny
    assert checkpoint.latest(tmp_path) is None
    for step in (5, 10, 20, 100):
        checkpoint.save(tmp_path, tiny_state(step, cfg, model), keep=3)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt_0000010.pt", "ckpt_0000020.pt",
                                                                  "ckpt_0000100.pt"]
    assert checkpoint.latest(tmp_path).name == "ckpt_0000100.pt"  # by step, not by name length or mtime
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_previous_checkpoint(tmp_path, tiny, monkeypatch):
    cfg, model = tiny
    checkpoint.save(tmp_path, tiny_state(1, cfg, model))

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, tiny_state(2, cfg, model))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_0000001.pt"]  # the temp file is cleaned up
    assert checkpoint.load(tmp_path)["step"] == 1


def test_kill_9_mid_save_leaves_previous_checkpoint(tmp_path, tiny):
    """A real process killed (SIGKILL) while writing checkpoint 2: checkpoint 1 stays the newest."""
    cfg, model = tiny
    checkpoint.save(tmp_path, tiny_state(1, cfg, model))
    script = textwrap.dedent(f"""
        import sys, time, torch
        from tritongpt.train import checkpoint
        def stall(obj, fh):
            fh.write(b"x" * 100_000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(600)
        torch.save = stall
        checkpoint.save({str(tmp_path)!r}, {{"step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ckpt_0000001.pt"]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")  # the half-written temp file
    assert checkpoint.latest(tmp_path).name == "ckpt_0000001.pt"
    assert checkpoint.load(tmp_path)["step"] == 1
    checkpoint.save(tmp_path, tiny_state(3, cfg, model), keep=1)  # later saves still work
    assert checkpoint.latest(tmp_path).name == "ckpt_0000003.pt"


def test_load_model_from_dir_and_file(tmp_path, tiny):
    cfg, model = tiny
    path = checkpoint.save(tmp_path, tiny_state(7, cfg, model))
    for source in (tmp_path, path):
        loaded, flat = checkpoint.load_model(source, "cpu")
        assert not loaded.training
        assert flat == cfg.to_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded, _ = checkpoint.load_model(tmp_path, attention="sdpa")
    assert loaded.backend_names()["attention"] == "sdpa"
    assert checkpoint.read_config(path) == cfg.to_dict()


def test_load_errors(tmp_path, tiny):
    with pytest.raises(TritonGPTError, match="no checkpoint"):
        checkpoint.load_model(tmp_path)
    with pytest.raises(TritonGPTError, match="does not exist"):
        checkpoint.load_model(tmp_path / "ckpt_0000001.pt")
    (tmp_path / "ckpt_0000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TritonGPTError, match="cannot read"):
        checkpoint.load_model(tmp_path)
    cfg, model = tiny
    state = tiny_state(2, cfg, model)
    state["config"]["n_embd"] = 32  # weights no longer fit the config
    checkpoint.save(tmp_path, state)
    with pytest.raises(TritonGPTError, match="does not fit"):
        checkpoint.load_model(tmp_path)


def test_rng_state_round_trip(tmp_path):
    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint"


def test_checkpoint_from_before_one_config_loads():
    flat = checkpoint.read_config(LEGACY / "run" / "ckpt_0000002.pt")
    assert flat["layer_norm"] == "torch" and flat["attention"] == "sdpa" and "norm" not in flat
    model, _ = checkpoint.load_model(LEGACY / "run", backend="torch")
    assert model.config.n_embd == 16 and model.config.real_vocab_size == 64
    tokens = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0.0)
    assert tokens.shape == (1, 6) and int(tokens.max()) < 64


def test_checkpoint_from_before_one_config_resumes(tmp_path):
    """--resume continues the old run as if it had never stopped (the losses of steps 3 and 4
    equal those of the old code's uninterrupted run)."""
    from tritongpt.train import trainer

    shutil.copytree(LEGACY / "run", tmp_path / "run")
    flags = {"out": str(tmp_path / "run"), "resume": "true", "max_steps": "4", "data": str(LEGACY / "data")}
    assert trainer.train(trainer.configure(flags)) == 0
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "loss" in r}
    expected = json.loads((LEGACY / "straight_losses.json").read_text())
    assert losses.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
    new = torch.load(checkpoint.latest(tmp_path / "run"), weights_only=True)
    assert new["step"] == 4 and new["config"]["layer_norm"] == "torch" and "train_config" not in new
