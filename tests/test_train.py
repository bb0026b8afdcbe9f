"""Training end to end on real shards of tinyshakespeare: the loss falls, resume is bitwise,
SIGTERM saves, a doc-masked loss is that of each document run alone, and `sample` streams from
the checkpoint. The guard: poisoned steps and loss spikes are skipped, a diverging run stops with
exit code 3 and only finite checkpoints, a damaged newest checkpoint is passed over on resume, a
failed save is one clear error, and (on a GPU) the steps between log steps never sync with the host.

Runs use the "torch" backends on the CPU in fp32 (the Triton interpreter is slow); one test takes
a step with the Triton kernels.
"""

import errno
import io
import itertools
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
import torch.nn.functional as F
from _util import assert_rel_close, rel_err
from test_model import plain_forward

from tritongpt.cli import main
from tritongpt.data.assets import find_asset
from tritongpt.data.loader import doc_ids_from
from tritongpt.data.prepare import prepare
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT
from tritongpt.train import checkpoint, config, optim, trainer
from tritongpt.train.guard import (
    DIVERGED_EXIT,
    GRAD_NONFINITE,
    HALTED,
    LOSS_NONFINITE,
    LOSS_SPIKE,
    UpdateGuard,
    step_unless,
)
from tritongpt.train.mfu import peak_flops
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
    return trainer.train(config.configure(flags))


def argv_of(flags: dict[str, str]) -> list[str]:
    """The command-line form of `flags`."""
    return [arg for key, value in flags.items() for arg in ("--" + key.replace("_", "-"), value)]


def poison_losses(monkeypatch, factors: dict[tuple[int, int], float], grad_accum: int = 1,
                  first_step: int = 0) -> None:
    """Multiply the training loss of micro-batch `micro` of optimizer step `step` (1-based; the
    first step after `first_step`, where a resumed run starts) by factors[(step, micro)]: nan
    poisons the step, a finite factor makes a loss spike. Evaluation forwards are left alone."""
    calls = itertools.count()
    original = GPT.forward

    def forward(self, idx, targets=None, doc_ids=None):
        logits, loss = original(self, idx, targets, doc_ids=doc_ids)
        if self.training and targets is not None:
            call = next(calls)
            factor = factors.get((first_step + call // grad_accum + 1, call % grad_accum))
            if factor is not None:
                loss = loss * factor
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def skips(out: Path) -> dict[int, dict]:
    """The metrics records of the skipped steps, by step."""
    return {r["step"]: r for r in metrics(out) if "skipped" in r}


def assert_finite_and_loads(run_dir: Path) -> list[str]:
    """Every checkpoint in `run_dir` loads and holds only finite values; their names."""
    names = []
    for path in checkpoint.checkpoints(run_dir):
        ckpt = checkpoint.load(path)
        assert checkpoint.nonfinite_tensors(ckpt) == [], path
        assert checkpoint.model_from(ckpt, source=path) is not None
        names.append(path.name)
    return names


def adam_steps(ckpt: dict) -> set[int]:
    """The step counts of the optimizer's parameters: the updates actually applied."""
    return {int(state["step"]) for state in ckpt["optimizer"]["state"].values()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=25, eval_interval=20, sample_tokens=8, keep_ckpts=2,
                          ckpt_interval=10)) == 0
    return out


def test_training_lowers_the_loss_and_fills_the_run_directory(trained):
    log = metrics(trained)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 25 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] > 10.0  # ~ln(50257) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    first = next(r for r in log if "loss" in r)
    assert set(first) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "backends"}
    assert first["mfu"] is None  # no peak FLOPs for a CPU
    assert first["backends"] == {"attention": "torch", "layer_norm": "torch", "mlp": "torch",
                                 "linear_cross_entropy": "torch"}
    assert [r["step"] for r in log if "val_loss" in r] == [20, 25]
    assert (trained / "loss.png").stat().st_size > 1000
    saved = json.loads((trained / "config.json").read_text())
    assert saved == config.from_dict(saved).to_dict() and saved["max_steps"] == 25 and saved["n_layer"] == 2
    assert [p.name for p in checkpoint.checkpoints(trained)] == ["ckpt_0000020.pt", "ckpt_0000025.pt"]  # keep 2


def test_refuses_to_overwrite_a_run(trained, tiny_data):
    with pytest.raises(TritonGPTError, match="--resume"):
        run(tiny_flags(tiny_data, trained))


def assert_resume_bitwise(flags_of, data: Path, tmp_path: Path, n: int, **common) -> tuple[dict, dict]:
    """2n steps in one go == n steps, then resumed for n more (flags_of: tiny_flags or a variant):
    equal logs and bitwise final weights; returns the two final checkpoints (straight, resumed)."""
    full, half = tmp_path / "full", tmp_path / "half"
    assert run(flags_of(data, full, max_steps=2 * n, decay_steps=2 * n, **common)) == 0
    assert run(flags_of(data, half, max_steps=n, decay_steps=2 * n, **common)) == 0
    assert checkpoint.latest(half).name == f"ckpt_{n:07d}.pt"
    assert run({"out": str(half), "resume": "true", "max_steps": str(2 * n)}) == 0
    assert train_log(half) == train_log(full)  # exact float equality: step, loss, lr, grad norm
    a, b = checkpoint.load(full), checkpoint.load(half)
    assert a["step"] == b["step"] == 2 * n
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert json.loads((half / "config.json").read_text())["max_steps"] == 2 * n
    return a, b


def test_resume_is_bitwise(tiny_data, tmp_path):
    """Dropout on and grad_accum 2: RNG states and the loader position are restored."""
    assert_resume_bitwise(tiny_flags, tiny_data, tmp_path, 3, dropout=0.1, grad_accum=2)


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


def test_each_eot_token_starts_a_new_doc_id():
    eot = 9
    x = torch.tensor([[1, 2, 9, 3, 9, 9, 4], [9, 1, 1, 1, 1, 1, 1]])
    assert doc_ids_from(x, eot).tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]


# the fp32 loss of the tiny CPU model against float64 (measured: ~3e-8), tighter than the fp32
# kernel tolerance, since near init the doc mask moves the loss by only ~6e-5 relative
FP32_LOSS_TOL = 1e-6


def test_doc_masked_loss_equals_each_document_run_alone(tmp_path, monkeypatch):
    """With --doc-mask the first step's loss is that of every document of every row run through
    the model on its own (the documents cut at the eot tokens, one before each document): the
    reference is an independent float64 GPT (test_model.plain_forward, with only the causal mask)
    over each document's tokens at their positions in the row, since learned positions count from
    the start of the row, not of the document. Without --doc-mask it is that of the whole rows."""
    docs = tmp_path / "docs"
    docs.mkdir()
    text = find_asset("tinyshakespeare.txt").read_text()[:30_000]
    for i, start in enumerate(range(0, len(text), 120)):  # ~30 tokens each: rows of 32 hold boundaries
        (docs / f"{i:03d}.txt").write_text(text[start:start + 120])
    shards = tmp_path / "shards"
    prepare(docs, shards, workers=1, progress=False)
    eot = json.loads((shards / "meta.json").read_text())["eot_id"]
    first_step = {}
    original = GPT.forward

    def recording_forward(self, idx, targets=None, doc_ids=None):
        if self.training and not first_step:  # the first training forward, before any update
            first_step.update(idx=idx.clone(), targets=targets.clone(), config=self.config,
                              state={k: v.detach().clone() for k, v in self.state_dict().items()})
        return original(self, idx, targets, doc_ids=doc_ids)

    monkeypatch.setattr(GPT, "forward", recording_forward)
    references = {}
    for doc_mask in (False, True):
        first_step.clear()
        out = tmp_path / f"out_{doc_mask}"
        assert run(tiny_flags(shards, out, max_steps=1, eval_steps=1, doc_mask=doc_mask)) == 0
        model = GPT(first_step["config"]).double()
        model.load_state_dict(first_step["state"])
        idx, targets = first_step["idx"], first_step["targets"]
        rows = []
        for row in idx:
            starts = [0] + [t for t in range(1, len(row)) if doc_mask and row[t] == eot]
            rows.append(torch.cat([plain_forward(model, row[None, begin:end], None, start=begin)[0]
                                   for begin, end in zip(starts, [*starts[1:], len(row)])]))
        references[doc_mask] = F.cross_entropy(torch.stack(rows).flatten(0, 1), targets.flatten(), ignore_index=-1)
        logged = torch.tensor(train_log(out)[0][1], dtype=torch.float64)
        assert_rel_close(logged, references[doc_mask], FP32_LOSS_TOL, f"loss with doc_mask={doc_mask}")
    # documents start inside the rows, and the two references lie far apart: a run that ignored
    # the mask (or applied it without --doc-mask) fails the check above
    assert (idx[:, 1:] == eot).sum() >= 2
    assert rel_err(references[True], references[False]) > 10 * FP32_LOSS_TOL


def test_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    cfg = config.resolve({"max_steps": "100", "warmup_steps": "10", "lr": "1e-3", "min_lr": "1e-4"})
    lrs = [optim.lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps or cfg.max_steps)
           for step in range(120)]
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


def test_a_step_on_the_triton_kernels_records_them_and_an_initial_loss(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=1, batch_size=2, block_size=16, eval_steps=1,
                          backend="triton")) == 0
    (record,) = [r for r in metrics(out) if "loss" in r]
    assert record["backends"] == {"attention": "triton", "layer_norm": "triton", "mlp": "triton",
                                  "linear_cross_entropy": "triton"}
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


def test_cpu_runs_fp32_refuses_fp16_and_has_no_peak_flops():
    cpu = torch.device("cpu")
    assert config.resolve_dtype("auto", cpu) == "fp32"
    with pytest.raises(TritonGPTError, match="fp16 needs a CUDA device"):
        config.resolve_dtype("fp16", cpu)
    assert peak_flops(cpu, "fp32") is None  # so MFU is null on the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,compile", [("bf16", "true"), ("fp16", "false")])
def test_cuda_bf16_compiled_and_fp16_scaled_runs_lower_the_loss(tiny_data, tmp_path, dtype, compile):
    """bf16 autocast with torch.compile, and fp16 with the grad scaler, on the Triton kernels."""
    out = tmp_path / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=20, device="cuda", dtype=dtype, compile=compile,
                          backend="triton", sample_tokens=8)) == 0
    records = [r for r in metrics(out) if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    if peak_flops(torch.device("cuda"), dtype) is not None:
        assert 0 < records[-1]["mfu"] < 1
    assert ("scale" in checkpoint.load(out)["scaler"]) == (dtype == "fp16")  # the scaler's state when it is on


# --- the guard ------------------------------------------------------------------------------


def reference_guard(steps: list[tuple[float, float]], max_skipped: int, spike_z: float, window: int) -> list[tuple]:
    """(flags, streak, loss_z) per step, computed in float64 Python from the definition."""
    seen: list[float] = []
    streak, out = 0, []
    for loss, grad_norm in steps:
        flags = (not math.isfinite(loss)) * LOSS_NONFINITE + (not math.isfinite(grad_norm)) * \
            GRAD_NONFINITE + (streak >= max_skipped) * HALTED
        z = math.nan
        if len(seen) >= window:
            last = seen[-window:]
            mean = math.fsum(last) / window
            z = (loss - mean) / math.sqrt(math.fsum((x - mean) ** 2 for x in last) / window)
            flags |= LOSS_SPIKE if math.isfinite(loss) and z > spike_z else 0
        if math.isfinite(loss):
            seen.append(loss)
        streak = streak + 1 if flags else 0
        out.append((flags, streak, z))
    return out


def test_guard_decisions_match_reference():
    """Non-finite loss or grad norm, spikes above a running window, streaks, the latch after
    max_skipped in a row, and a state_dict round trip that continues identically."""
    gen = torch.Generator().manual_seed(7)
    losses = (5.0 + 0.1 * torch.randn(40, generator=gen)).tolist()  # float32 values, as the trainer's
    grad_norms = (1.0 + torch.rand(40, generator=gen)).tolist()
    losses[6], losses[9], losses[13] = math.nan, math.inf, 9.0  # nan, inf, and a spike
    grad_norms[9], grad_norms[20] = math.nan, math.inf  # inf loss with nan grads; a finite loss with inf grads
    losses[30:34] = [math.nan] * 4  # 4 in a row: halted after 3, and stays halted
    steps = list(zip(losses, grad_norms))
    expected = reference_guard(steps, max_skipped=3, spike_z=3.0, window=5)

    guard = UpdateGuard(torch.device("cpu"), max_skipped=3, spike_z=3.0, window=5)
    skipped, records = [], []
    for i, (loss, grad_norm) in enumerate(steps[:25]):
        skipped.append(bool(guard.check(i + 1, torch.tensor(loss, dtype=torch.float32),
                                        torch.tensor(grad_norm, dtype=torch.float32))))
        if i == 11:
            records += guard.drain()
    records += guard.drain()
    resumed = UpdateGuard(torch.device("cpu"), max_skipped=3, spike_z=3.0, window=5)
    resumed.load_state_dict(torch.load(_round_trip(guard.state_dict()), weights_only=True))
    for i, (loss, grad_norm) in enumerate(steps[25:], start=25):
        skipped.append(bool(resumed.check(i + 1, torch.tensor(loss, dtype=torch.float32),
                                          torch.tensor(grad_norm, dtype=torch.float32))))
    records += resumed.drain()

    assert [r.step for r in records] == list(range(1, 41))
    for record, (flags, streak, z), skip in zip(records, expected, skipped):
        assert (record.flags, record.streak) == (flags, streak), record
        assert skip == (flags != 0)
        assert record.loss_z == z or (math.isnan(z) and math.isnan(record.loss_z)) or \
            abs(record.loss_z - z) <= 1e-12 * abs(z), record
    by_step = {r.step: r for r in records}
    assert by_step[7].skipped == by_step[10].skipped == by_step[21].skipped == "nonfinite"
    assert by_step[14].skipped == "spike" and by_step[14].loss_z > 3
    assert by_step[33].streak == 3 and by_step[34].flags == LOSS_NONFINITE | HALTED
    assert by_step[35].flags == HALTED and by_step[35].skipped is None  # the latch holds
    assert [r.step for r in records if r.skipped] == [7, 10, 14, 21, 31, 32, 33, 34]
    assert by_step[7].reason() == "loss nan" and by_step[10].reason() == "loss inf, grad norm nan"
    assert by_step[21].reason().startswith("grad norm inf (loss 5.")


def _round_trip(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_leaves_a_skipped_step_untouched(fused):
    """A skipped step leaves params and AdamW state (step count too) bitwise as they were; an
    applied one equals a plain step. fused: decided on the device (found_inf), as on CUDA."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=fused)
    plain = torch.optim.AdamW(twins, lr=0.1, weight_decay=0.1, fused=fused)
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, twin, g in zip(params, twins, grads):
            p.grad, twin.grad = g.clone(), g.clone()
        before = [p.detach().clone() for p in params]
        state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
        skip = step == 2
        step_unless(opt, torch.tensor(skip))
        if skip:
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state_before.items())
        else:
            plain.step()
            assert all(torch.equal(p, twin) for p, twin in zip(params, twins))
            assert not any(torch.equal(p, b) for p, b in zip(params, before))
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    assert int(opt.state[params[0]]["step"]) == 3


def test_poisoned_step_is_skipped(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    poison_losses(monkeypatch, {(3, 1): math.nan}, grad_accum=2)
    assert run(tiny_flags(tiny_data, out, grad_accum=2)) == 0
    assert capsys.readouterr().out.count("update skipped") == 1
    record = skips(out)[3]
    assert record["skipped"] == "nonfinite" and record["loss"] is None and record["grad_norm"] is None
    assert list(skips(out)) == [3]
    losses = [r["loss"] for r in metrics(out) if "loss" in r and "skipped" not in r]
    assert len(losses) == 7 and all(math.isfinite(loss) for loss in losses)
    ckpt = checkpoint.load(out)
    assert checkpoint.nonfinite_tensors(ckpt) == []
    assert adam_steps(ckpt) == {7}  # 8 steps, one update skipped
    assert ckpt["guard"]["streak"] == 0


def test_divergence_stops_with_only_good_checkpoints(tiny_data, tmp_path, capsys):
    """The issue's run: a learning rate that diverges (loss nan by step 4), checkpoints every 2
    steps, keep 2. The run stops non-zero naming the step, what went non-finite and the newest
    good checkpoint, and every checkpoint left is finite and loads."""
    out = tmp_path / "out"
    flags = tiny_flags(tiny_data, out, lr=1e4, warmup_steps=2, grad_clip=0, max_steps=40, ckpt_interval=2,
                       keep_ckpts=2, log_interval=5, max_skipped_steps=3)
    assert main(["train", *argv_of(flags)]) == DIVERGED_EXIT
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("stopped")]
    skipped = sorted(skips(out))
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert all(r["skipped"] == "nonfinite" and r["loss"] is None for r in skips(out).values())
    newest = checkpoint.latest(out)
    assert line == (f"stopped at step {skipped[-1]}: 3 updates in a row skipped (steps {skipped[0]}-{skipped[-1]}; "
                    f"last: loss nan, grad norm nan); newest good checkpoint: {newest}")
    assert checkpoint.step_of(newest) < skipped[-1]
    assert len(assert_finite_and_loads(out)) == 2
    assert max(r["step"] for r in metrics(out)) == skipped[-1]  # nothing trained or logged after the stop


def test_skip_spikes_skips_an_injected_spike(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    poison_losses(monkeypatch, {(9, 0): 1.5})
    assert run(tiny_flags(tiny_data, out, max_steps=12, skip_spikes=3, spike_window=4)) == 0
    assert list(skips(out)) == [9]
    record = skips(out)[9]
    assert record["skipped"] == "spike" and record["loss_z"] > 3 and record["loss"] > 14
    assert "step 9: update skipped, loss " in capsys.readouterr().out
    ckpt = checkpoint.load(out)
    assert adam_steps(ckpt) == {11}
    assert ckpt["guard"]["seen"] == 12  # every finite loss joined the window, the spike's too


def test_skip_streak_survives_resume_bitwise(tiny_data, tmp_path, monkeypatch):
    """A checkpoint written mid-streak resumes with its skip counter: steps 4-6 poisoned with at
    most 3 skipped in a row stop both the straight run and the run resumed from step 4 at step 6."""
    common = dict(decay_steps=8, max_skipped_steps=3, skip_spikes=3, spike_window=2)
    full, half = tmp_path / "full", tmp_path / "half"
    with monkeypatch.context() as patch:
        poison_losses(patch, {(4, 0): math.nan, (5, 0): math.nan, (6, 0): math.nan})
        assert run(tiny_flags(tiny_data, full, max_steps=8, **common)) == DIVERGED_EXIT
    with monkeypatch.context() as patch:
        poison_losses(patch, {(4, 0): math.nan})
        assert run(tiny_flags(tiny_data, half, max_steps=4, **common)) == 0
    assert checkpoint.load(half)["guard"]["streak"] == 1
    with monkeypatch.context() as patch:
        poison_losses(patch, {(5, 0): math.nan, (6, 0): math.nan}, first_step=4)
        assert run({"out": str(half), "resume": "true", "max_steps": "8"}) == DIVERGED_EXIT

    def log(out):
        return [(r["step"], r["loss"], r["grad_norm"], r.get("skipped")) for r in metrics(out) if "loss" in r]

    assert log(half) == log(full)
    assert [step for step, *_, skipped in log(full) if skipped] == [4, 5, 6]


def test_damaged_newest_checkpoint_resumes_from_previous(tiny_data, tmp_path, capsys):
    """A truncated newest checkpoint is passed over with a warning naming it; the run resumes
    from the one before, bitwise as if never stopped."""
    full, damaged_run = tmp_path / "full", tmp_path / "damaged"
    assert run(tiny_flags(tiny_data, full, max_steps=4)) == 0
    assert run(tiny_flags(tiny_data, damaged_run, max_steps=4, ckpt_interval=2)) == 0
    damaged = checkpoint.path_for(damaged_run, 4)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    assert run({"out": str(damaged_run), "resume": "true"}) == 0  # steps 3 and 4 again
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert str(damaged) in warning and warning.endswith("resuming from ckpt_0000002.pt")
    assert train_log(damaged_run) == train_log(full)
    assert assert_finite_and_loads(damaged_run) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]


def test_no_loadable_checkpoint_is_one_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for step in (2, 4):
        checkpoint.path_for(out, step).write_bytes(b"not a checkpoint")
    with pytest.raises(TritonGPTError, match="no usable checkpoint") as exc:
        config.configure({"out": str(out), "resume": "true"})
    assert "ckpt_0000002.pt" in str(exc.value) and "ckpt_0000004.pt" in str(exc.value)


def test_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    """Disk full on the second checkpoint: one line naming the file and the newest good
    checkpoint, exit 2, no temp file, the first checkpoint intact."""
    out = tmp_path / "out"
    real_save, saves = torch.save, itertools.count(1)

    def save(obj, fh):
        if next(saves) == 2:
            fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, fh)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", *argv_of(tiny_flags(tiny_data, out, max_steps=6, ckpt_interval=2))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tritongpt train: error: cannot write checkpoint {checkpoint.path_for(out, 4)}: No space left on "
                   f"device; the checkpoints already in {out} are intact; newest good checkpoint: "
                   f"{checkpoint.path_for(out, 2)}")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert assert_finite_and_loads(out) == ["ckpt_0000002.pt"]


def test_rotation_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    """The weights turn non-finite after step 3 (keep 1 checkpoint): the step-4 checkpoint is not
    written, so the step-2 one, the last good state, is not rotated out."""
    out = tmp_path / "out"
    steps = itertools.count(1)

    def poisoning_step_unless(optimizer, skip):
        step_unless(optimizer, skip)
        if next(steps) == 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0][0, 0] = math.inf

    monkeypatch.setattr(trainer, "step_unless", poisoning_step_unless)  # where the loop looks it up
    with pytest.raises(TritonGPTError, match="not writing checkpoint .*ckpt_0000004.pt: non-finite values in "
                                             "model.transformer.wte.weight") as exc:
        run(tiny_flags(tiny_data, out, max_steps=6, ckpt_interval=2, keep_ckpts=1))
    assert str(exc.value).endswith(f"newest good checkpoint: {checkpoint.path_for(out, 2)}")
    assert assert_finite_and_loads(out) == ["ckpt_0000002.pt"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_steps_between_log_steps_do_not_sync(tiny_data, tmp_path, monkeypatch, dtype):
    """Every step after the first log step runs under torch.cuda.set_sync_debug_mode("error"): the
    guard (a poisoned step and a spike window included) decides and skips on the device."""
    guarded = []
    real_advance = trainer.Trainer._advance

    def advance(self):
        if self.step < 4:  # until the first log step: lazy initialisation may sync
            return real_advance(self)
        guarded.append(self.step + 1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_advance(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(trainer.Trainer, "_advance", advance)
    poison_losses(monkeypatch, {(6, 0): math.nan})
    out = tmp_path / "out"
    assert run(tiny_flags(tiny_data, out, max_steps=12, log_interval=4, device="cuda", dtype=dtype,
                          skip_spikes=3, spike_window=2)) == 0
    assert guarded == list(range(5, 13))
    assert skips(out)[6]["skipped"] == "nonfinite"
    assert checkpoint.nonfinite_tensors(checkpoint.load(out)) == []
