"""Training end to end on real shards of tinyshakespeare: the loss falls, resume is bitwise,
SIGTERM saves, doc masks reach the model, and `sample` streams from the checkpoint.

Runs use the "torch" backends on the CPU in fp32 (the Triton interpreter is slow); one test takes
a step with the Triton kernels.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritongpt.cli import main
from tritongpt.data.assets import find_asset
from tritongpt.data.prepare import prepare
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.train import checkpoint, config, trainer
from tritongpt.train.sample import stream_text

REPO = Path(__file__).resolve().parents[1]


def prepare_tiny(directory: Path, chars: int = 40_000) -> Path:
    """Shards of the first `chars` characters of tinyshakespeare (about 11k train tokens)."""
    source = directory / "shakespeare.txt"
    source.write_text(find_asset("tinyshakespeare.txt").read_text()[:chars])
    prepare(source, directory / "shards", workers=1, progress=False)
    return directory / "shards"


def tiny_flags(data: Path, out: Path, **overrides) -> dict[str, str]:
    """Flags (as typed on the command line) of a very small CPU run."""
    flags = dict(data=data, out=out, preset="tiny", n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4,
                 max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4, log_interval=1, eval_interval=1000,
                 eval_steps=2, ckpt_interval=1000, sample_tokens=0, backend="torch", device="cpu", dtype="fp32")
    flags.update(overrides)
    return {k: str(v) for k, v in flags.items()}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_log(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(out) if "loss" in r]


def run(flags: dict[str, str]) -> int:
    return trainer.train(trainer.configure(flags))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=25, eval_interval=20, sample_tokens=8, keep_ckpts=2,
                          ckpt_interval=10)) == 0
    return out


def test_loss_falls_and_run_dir(trained):
    log = metrics(trained)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 25 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] > 10.0  # ~ln(50257) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    first = next(r for r in log if "loss" in r)
    assert set(first) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "backends"}
    assert first["mfu"] is None  # no peak FLOPs for a CPU
    assert first["backends"] == {"attention": "torch", "layer_norm": "torch", "mlp": "torch"}
    assert [r["step"] for r in log if "val_loss" in r] == [20, 25]
    assert (trained / "loss.png").stat().st_size > 1000
    saved = json.loads((trained / "config.json").read_text())
    assert saved == config.from_dict(saved).to_dict() and saved["max_steps"] == 25 and saved["n_layer"] == 2
    assert [p.name for p in checkpoint.checkpoints(trained)] == ["ckpt_0000020.pt", "ckpt_0000025.pt"]  # keep 2


def test_refuses_to_overwrite_a_run(trained, tiny_data):
    with pytest.raises(TritonGPTError, match="--resume"):
        run(tiny_flags(tiny_data, trained))


def test_resume_is_bitwise(tiny_data, tmp_path):
    """2N steps in one go == N steps, then resumed for N more (dropout on: RNG states restored)."""
    n = 3
    common = dict(decay_steps=2 * n, dropout=0.1, grad_accum=2)
    full, half = tmp_path / "full", tmp_path / "half"
    assert run(tiny_flags(tiny_data, full, max_steps=2 * n, **common)) == 0
    assert run(tiny_flags(tiny_data, half, max_steps=n, **common)) == 0
    assert checkpoint.latest(half).name == f"ckpt_{n:07d}.pt"
    assert run({"out": str(half), "resume": "true", "max_steps": str(2 * n)}) == 0
    assert train_log(half) == train_log(full)  # exact float equality: step, loss, lr, grad norm
    a, b = checkpoint.load(full), checkpoint.load(half)
    assert a["step"] == b["step"] == 2 * n
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert json.loads((half / "config.json").read_text())["max_steps"] == 2 * n


def test_sigterm_saves_then_exits(tiny_data, tmp_path):
    out = tmp_path / "out"
    flags = tiny_flags(tiny_data, out, max_steps=100_000)
    argv = [sys.executable, "-m", "tritongpt.cli", "train"]
    for key, value in flags.items():
        argv += ["--" + key.replace("_", "-"), value]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output
    last_step = metrics(out)[-1]["step"]
    assert checkpoint.latest(out).name == f"ckpt_{last_step:07d}.pt"
    assert checkpoint.load(out)["step"] == last_step >= 2


def test_doc_ids_from_eot():
    eot = 9
    x = torch.tensor([[1, 2, 9, 3, 9, 9, 4], [9, 1, 1, 1, 1, 1, 1]])
    assert trainer.doc_ids_from(x, eot).tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]


def test_doc_mask_reaches_the_model(tmp_path):
    """On multi-document shards (an eot before each document) the doc mask changes the loss."""
    docs = tmp_path / "docs"
    docs.mkdir()
    text = find_asset("tinyshakespeare.txt").read_text()[:30_000]
    for i, start in enumerate(range(0, len(text), 600)):
        (docs / f"{i:03d}.txt").write_text(text[start:start + 600])
    prepare(docs, tmp_path / "shards", workers=1, progress=False)
    losses = {}
    for doc_mask in (False, True):
        out = tmp_path / f"out_{doc_mask}"
        assert run(tiny_flags(tmp_path / "shards", out, max_steps=1, eval_steps=1, doc_mask=doc_mask)) == 0
        losses[doc_mask] = train_log(out)[0][1]
    assert losses[True] != losses[False]


def test_lr_schedule():
    cfg = config.resolve({"max_steps": "100", "warmup_steps": "10", "lr": "1e-3", "min_lr": "1e-4"})
    lrs = [trainer.lr_at(step, cfg) for step in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))  # cosine falls
    assert lrs[55] == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lrs[100:] == [1e-4] * 20


def test_stream_text_waits_for_whole_characters():
    enc = get_encoding("gpt2")
    text = "naïve café — 日本語 🎉 done"
    tokens = enc.encode(text)
    assert any(not _is_utf8(enc.decode_single_token_bytes(t)) for t in tokens)  # some tokens split characters
    pieces = list(stream_text(enc, [torch.tensor([t]) for t in tokens]))
    assert "".join(pieces) == text
    assert len(pieces) > 1 and all("\ufffd" not in p for p in pieces)  # streamed, never a broken character


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_sample_command_streams_from_checkpoint(trained, capsys):
    assert main(["sample", "--ckpt", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                 "--device", "cpu", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert main(["sample", "--ckpt", str(checkpoint.latest(trained)), "--prompt", "ROMEO:",
                 "--max-new-tokens", "12", "--device", "cpu", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # the seed fixes the draws
    model, train_config = checkpoint.load_model(trained)
    assert not model.training and train_config["max_steps"] == 25


def test_one_step_with_triton_kernels(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=1, batch_size=2, block_size=16, eval_steps=1,
                          backend="triton")) == 0
    (record,) = [r for r in metrics(out) if "loss" in r]
    assert record["backends"] == {"attention": "triton", "layer_norm": "triton", "mlp": "triton"}
    assert 10.0 < record["loss"] < 11.5


@pytest.mark.slow
def test_default_command_prepares_tinyshakespeare(tmp_path):
    """`tritongpt train` with no data flag prepares tinyshakespeare into the cache; sample continues it."""
    env = {**os.environ, "TRITONGPT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tritongpt.cli"]
    done = subprocess.run(cmd + ["train", "--out", str(out), "--max-steps", "20", "--eval-interval", "20",
                                 "--backend", "torch"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "cache" / "tinyshakespeare" / "meta.json").is_file()
    assert "final sample" in done.stdout
    sampled = subprocess.run(cmd + ["sample", "--ckpt", str(out), "--max-new-tokens", "20"], env=env,
                             capture_output=True, text=True)
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr


def test_sample_command_from_hf_directory(tmp_path, capsys):
    from tritongpt import GPT, GPTConfig
    from tritongpt.model.hf import save_hf

    torch.manual_seed(0)
    save_hf(GPT(GPTConfig.from_preset("tiny", n_layer=1, backend="torch")), tmp_path / "hf")
    assert main(["sample", "--hf", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "5",
                 "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out) > len("Hello\n")


def test_dtype_and_peak_flops_on_cpu():
    cpu = torch.device("cpu")
    assert trainer.resolve_dtype("auto", cpu) == "fp32"
    with pytest.raises(TritonGPTError, match="fp16 needs a CUDA device"):
        trainer.resolve_dtype("fp16", cpu)
    assert trainer.peak_flops(cpu, "fp32") is None  # so MFU is null on the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,compile", [("bf16", "true"), ("fp16", "false")])
def test_cuda_mixed_precision_steps(tiny_data, tmp_path, dtype, compile):
    """bf16 autocast with torch.compile, and fp16 with the grad scaler, on the Triton kernels."""
    out = tmp_path / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=20, device="cuda", dtype=dtype, compile=compile,
                          backend="triton", sample_tokens=8)) == 0
    records = [r for r in metrics(out) if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    if trainer.peak_flops(torch.device("cuda"), dtype) is not None:
        assert 0 < records[-1]["mfu"] < 1
    assert ("scale" in checkpoint.load(out)["scaler"]) == (dtype == "fp16")  # the scaler's state when it is on
