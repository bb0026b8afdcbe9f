"""What practitioners reach for after pretraining (train/init_from.py, train/metrics.py's dashboards,
train/mfu.py, HellaSwag in train/evaluate.py), end to end on the CPU: a run started from a
Hugging Face GPT-2 has, at its first step, exactly that model's loss on the same batch; one
started from a checkpoint continues its weights; TensorBoard event files and W&B's offline run
hold the metrics.jsonl values; HellaSwag is scored during training; --peak-tflops gives an MFU."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_eval_export import ITEMS, save_random_gpt2
from test_train import metrics, prepare_tiny, tiny_flags

from tritongpt.data.loader import ShardLoader
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.train import checkpoint, config, trainer
from tritongpt.train.evaluate import evaluate, load_items
from tritongpt.train.metrics import check_available

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    save_random_gpt2(path, noise=0.3)  # far from a fresh init, whose loss is about ln(vocab) too
    return path


def run(flags: dict[str, str]) -> int:
    return trainer.train(config.configure(flags))


def finetune_flags(shards, out, source: str, **overrides) -> dict[str, str]:
    flags = tiny_flags(shards, out, init_from=source, max_steps=2, dropout=0.0, **overrides)
    for key in ("n_layer", "n_embd", "n_head"):  # the model comes from the source
        flags.pop(key)
    return flags


def test_init_from_hf_starts_at_the_hf_models_loss(shards, hf_dir, tmp_path):
    flags = finetune_flags(shards, tmp_path / "run", f"hf:{hf_dir}")
    assert run(flags) == 0
    saved = checkpoint.read_config(checkpoint.latest(tmp_path / "run"))
    assert (saved["n_embd"], saved["n_layer"], saved["block_size"]) == (32, 2, 32)  # block_size cropped from 64
    first = next(r for r in metrics(tmp_path / "run") if r.get("step") == 1)
    x, y = ShardLoader(shards, "train", 4, 32, seed=saved["seed"]).next_batch()  # the run's first batch
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    with torch.no_grad():
        logits = theirs(x).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert abs(first["loss"] - expected) <= 1e-5 * expected, (first["loss"], expected)


def test_init_from_checkpoint_continues_its_weights(shards, tmp_path):
    assert run(tiny_flags(shards, tmp_path / "base", max_steps=3)) == 0
    base, _ = checkpoint.load_model(tmp_path / "base", backend="torch")
    assert run(finetune_flags(shards, tmp_path / "ft", f"ckpt:{tmp_path / 'base'}", lr=1e-12, min_lr=0.0,
                              warmup_steps=1)) == 0
    tuned, _ = checkpoint.load_model(tmp_path / "ft", backend="torch")
    for name, tensor in base.state_dict().items():  # an lr of 1e-12 leaves them as they were, to fp32 rounding
        torch.testing.assert_close(tuned.state_dict()[name], tensor, rtol=1e-6, atol=1e-9, msg=name)
    assert checkpoint.load(tmp_path / "ft")["step"] == 2  # a fresh schedule: steps counted from 0


@pytest.mark.parametrize("extra, message", [
    (dict(n_embd="64"), "n_embd = 64 contradicts the source's n_embd = 32"),
    (dict(block_size="128"), "block_size 128 exceeds the source's 64"),
])
def test_init_from_refuses_contradicting_settings(shards, hf_dir, tmp_path, extra, message):
    with pytest.raises(TritonGPTError, match=message):
        config.configure({**finetune_flags(shards, tmp_path / "run", f"hf:{hf_dir}"), **extra})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("source, message", [
    ("hf:/no/such/dir", "is not a directory"),
    ("gpt2", "init_from must be hf:DIR"),
])
def test_init_from_bad_source_is_one_error(shards, tmp_path, source, message):
    with pytest.raises(TritonGPTError, match=message):
        config.configure(finetune_flags(shards, tmp_path / "run", source))


def test_tensorboard_and_wandb_offline_hold_the_metrics(shards, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert run(tiny_flags(shards, out, max_steps=3, tensorboard="true", wandb="tritongpt-test")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [step for step, _ in logged]
    assert [e.value for e in scalars] == pytest.approx([loss for _, loss in logged], rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(events.Tags()["scalars"])
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert b"grad_norm" in run_file.read_bytes()


def test_missing_dashboard_extra_is_one_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what Python reports for a package that is not there
    with pytest.raises(TritonGPTError, match=r"pip install 'tritongpt\[tensorboard\]'"):
        check_available(tensorboard=True, wandb_project=None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TritonGPTError, match=r"pip install 'tritongpt\[wandb\]'"):
        check_available(tensorboard=False, wandb_project="p")


def test_hellaswag_during_training(shards, tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "hellaswag_val.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    monkeypatch.setenv("TRITONGPT_ASSETS", os.pathsep.join([str(assets), os.environ.get("TRITONGPT_ASSETS", "")]))
    out = tmp_path / "run"
    assert run(tiny_flags(shards, out, max_steps=4, eval_hellaswag_interval=2, hellaswag_limit=4)) == 0
    scored = [r for r in metrics(out) if "hellaswag_acc" in r]
    assert [r["step"] for r in scored] == [2, 4]
    model, _ = checkpoint.load_model(out, backend="torch")
    expected = evaluate(model, get_encoding("gpt2"), load_items(assets / "hellaswag_val.jsonl", limit=4))
    assert (scored[-1]["hellaswag_acc"], scored[-1]["hellaswag_acc_norm"]) == (expected["acc"], expected["acc_norm"])


def test_peak_tflops_gives_an_mfu(shards, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_flags(shards, out, max_steps=2, peak_tflops=0.5)) == 0
    model, _ = checkpoint.load_model(out, backend="torch")
    for record in (r for r in metrics(out) if "loss" in r):
        expected = record["tokens_per_s"] * model.flops_per_token() / 0.5e12
        assert record["mfu"] == pytest.approx(expected, rel=1e-9)
