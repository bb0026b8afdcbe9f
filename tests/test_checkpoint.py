"""Checkpoint files: atomic writes (a kill -9 mid-save leaves the previous checkpoint), failed
writes as one error, no non-finite state ever written, newest lookup, pruning that keeps the
newest good state, the newest good checkpoint to resume from, RNG state round trips, and
load_model from a run directory or a file."""

import errno
import json
import math
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tritongpt import files
from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT
from tritongpt.train import checkpoint, config, trainer


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


def _disk_full(monkeypatch):
    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)


def _permission_denied(monkeypatch):
    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(files, "open", refuse, raising=False)  # the temp file cannot be created


@pytest.mark.parametrize("fail,message", [(_disk_full, "No space left on device"),
                                          (_permission_denied, "Permission denied")])
def test_failed_write_leaves_previous_checkpoint(tmp_path, tiny, monkeypatch, fail, message):
    cfg, model = tiny
    checkpoint.save(tmp_path, tiny_state(1, cfg, model), keep=1)
    fail(monkeypatch)
    with pytest.raises(TritonGPTError) as exc:
        checkpoint.save(tmp_path, tiny_state(2, cfg, model), keep=1)
    assert str(exc.value) == (f"cannot write checkpoint {tmp_path / 'ckpt_0000002.pt'}: {message}; the checkpoints "
                              f"already in {tmp_path} are intact")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_0000001.pt"]  # the temp file is cleaned up
    assert checkpoint.load(tmp_path)["step"] == 1


def test_nonfinite_state_is_never_written(tmp_path, tiny):
    """A NaN in the weights or an inf in the optimizer state: the checkpoint is refused, naming
    where, and the previous one (keep 1) is not rotated out."""
    cfg, model = tiny
    checkpoint.save(tmp_path, tiny_state(1, cfg, model), keep=1)
    state = tiny_state(2, cfg, model)
    state["model"] = {k: v.clone() for k, v in state["model"].items()}
    state["model"]["lm_head.weight"][3, 1] = math.nan
    state["optimizer"] = {"state": {0: {"step": torch.tensor(2.0), "exp_avg_sq": torch.full((2, 2), math.inf)}}}
    with pytest.raises(TritonGPTError) as exc:
        checkpoint.save(tmp_path, state, keep=1)
    assert str(exc.value) == (f"not writing checkpoint {tmp_path / 'ckpt_0000002.pt'}: non-finite values in "
                              f"model.lm_head.weight, optimizer.state.0.exp_avg_sq")
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt_0000001.pt"]
    assert checkpoint.nonfinite_tensors(checkpoint.load(tmp_path)) == []


def test_nonfinite_tensors_names_nested_values():
    state = {"a": torch.ones(3), "b": [torch.zeros(2), (torch.tensor([1.0, -math.inf]),)],
             "c": {"d": torch.tensor(math.nan, dtype=torch.float64)}, "e": torch.arange(3), "f": 1.5,
             "g": torch.tensor([1.0], dtype=torch.bfloat16)}
    assert checkpoint.nonfinite_tensors(state) == ["b.1.0", "c.d"]
    assert checkpoint.nonfinite_tensors({"rng": torch.ByteTensor([255]), "step": 3}) == []


def test_prune_keeps_what_was_just_written(tmp_path, tiny):
    """A run resumed from step 10 past a damaged ckpt_20 writes step 15 with keep 1: step 10 goes,
    step 15 (the newest good state) stays, and the later, damaged one is left alone."""
    cfg, model = tiny
    checkpoint.save(tmp_path, tiny_state(10, cfg, model))
    checkpoint.path_for(tmp_path, 20).write_bytes(b"truncated")
    checkpoint.save(tmp_path, tiny_state(15, cfg, model), keep=1)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt_0000015.pt", "ckpt_0000020.pt"]
    assert checkpoint.load(checkpoint.path_for(tmp_path, 15))["step"] == 15


def test_newest_good_passes_over_damaged_and_nonfinite(tmp_path, tiny):
    cfg, model = tiny
    assert checkpoint.newest_good(tmp_path) is None
    checkpoint.save(tmp_path, tiny_state(1, cfg, model))
    nan_state = tiny_state(2, cfg, model)
    nan_state["model"] = {k: torch.full_like(v, math.nan) for k, v in nan_state["model"].items()}
    torch.save(nan_state, checkpoint.path_for(tmp_path, 2))  # as a version without the guard wrote them
    good = checkpoint.path_for(tmp_path, 1).read_bytes()
    checkpoint.path_for(tmp_path, 3).write_bytes(good[: len(good) // 2])
    path, ckpt, passed_over = checkpoint.newest_good(tmp_path)
    assert path.name == "ckpt_0000001.pt" and ckpt["step"] == 1
    assert len(passed_over) == 2
    assert passed_over[0].startswith(f"cannot read checkpoint {checkpoint.path_for(tmp_path, 3)}")
    assert passed_over[1].startswith(f"checkpoint {checkpoint.path_for(tmp_path, 2)} holds non-finite values in "
                                     "model.")
    assert checkpoint.newest_config(tmp_path) == cfg.to_dict()  # from ckpt 2: readable, tensors unread
    checkpoint.path_for(tmp_path, 1).write_bytes(b"")
    with pytest.raises(TritonGPTError, match="no usable checkpoint") as exc:
        checkpoint.newest_good(tmp_path)
    assert all(f"ckpt_000000{i}.pt" in str(exc.value) for i in (1, 2, 3))


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
    shutil.copytree(LEGACY / "run", tmp_path / "run")
    flags = {"out": str(tmp_path / "run"), "resume": "true", "max_steps": "4", "data": str(LEGACY / "data")}
    assert trainer.train(config.configure(flags)) == 0
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "loss" in r}
    expected = json.loads((LEGACY / "straight_losses.json").read_text())
    assert losses.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
    new = torch.load(checkpoint.latest(tmp_path / "run"), weights_only=True)
    assert new["step"] == 4 and new["config"]["layer_norm"] == "torch" and "train_config" not in new
