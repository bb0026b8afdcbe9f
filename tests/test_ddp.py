"""DistributedDataParallel with real torch.distributed (gloo, 2 CPU processes under torchrun):
2 processes x grad_accum 1 train on the same global batches as 1 process x grad_accum 2, so they
log the same losses within fp32 tolerance.

Why the batches compose: the trainer draws ONE loader batch per optimizer step, of
world_size * grad_accum * batch_size windows that depend only on (seed, step) (data/loader.py),
and each rank cuts its rows [rank * grad_accum * B, (rank + 1) * grad_accum * B) into grad_accum
micro-batches. At world 2 / accum 1 rank r gets rows [r*B, (r+1)*B); at world 1 / accum 2
micro-batch m gets the same rows [m*B, (m+1)*B). test_loader_batches_compose checks that
directly, the torchrun tests check the training: also that a loss poisoned on one rank only makes
every rank skip that update (the guard decides on all-reduced values).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _util import assert_rel_close
from test_train import argv_of, metrics, poison_losses, prepare_tiny, run, skips, tiny_flags

from tritongpt.data.loader import ShardLoader
from tritongpt.train import checkpoint

STEPS = 4
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("tiny"))


def test_loader_batches_compose(tiny_data):
    B, T, accum = 3, 16, 2
    single = ShardLoader(tiny_data, "train", accum * B, T, seed=5)
    ranks = [ShardLoader(tiny_data, "train", B, T, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, y = single.next_batch()
        per_rank = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([xr for xr, _ in per_rank]))
        assert torch.equal(y, torch.cat([yr for _, yr in per_rank]))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_match_grad_accum(tiny_data, tmp_path, optimizer):
    flags = tiny_flags(tiny_data, tmp_path / "ddp", max_steps=STEPS, batch_size=2, grad_accum=1, optimizer=optimizer)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tritongpt.cli", "train"]
    for key, value in flags.items():
        argv += ["--" + key.replace("_", "-"), value]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("training tiny model") == 1  # only rank 0 prints

    assert run(tiny_flags(tiny_data, tmp_path / "single", max_steps=STEPS, batch_size=2, grad_accum=2,
                          optimizer=optimizer)) == 0
    ddp = [r for r in metrics(tmp_path / "ddp") if "loss" in r]
    single = [r for r in metrics(tmp_path / "single") if "loss" in r]
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    # torch's Muon orthogonalises in bf16, which turns the all-reduce's 1e-7 reordering into bf16
    # rounding differences of the update: bf16's tolerance there, fp32's for AdamW
    limit = 2e-2 if optimizer == "muon" else 1e-5
    for key in ("loss", "grad_norm"):
        assert_rel_close(torch.tensor([r[key] for r in ddp], dtype=torch.float64),
                         torch.tensor([r[key] for r in single], dtype=torch.float64), limit, key)
    assert ddp[0]["tokens"] == single[0]["tokens"] == 2 * 2 * 32  # the same global batch
    saved = checkpoint.load(tmp_path / "ddp")
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2 and saved["step"] == STEPS


def test_a_step_poisoned_on_one_rank_is_skipped_on_every_rank(tiny_data, tmp_path, monkeypatch):
    """Rank 1's loss is nan at step 2 and spikes (x1.5) at step 4: every rank skips both updates,
    the spike too although only rank 1 saw it (the guard decides on the all-reduced loss), and the
    run stays equal to one process whose second micro-batch is poisoned alike (the same rows)."""
    steps = 5
    script = tmp_path / "poisoned_rank.py"
    script.write_text(textwrap.dedent(f"""
        import math, os, sys
        sys.path.insert(0, {str(TESTS)!r})
        import pytest
        from test_train import poison_losses
        from tritongpt.cli import main
        if os.environ["RANK"] == "1":
            poison_losses(pytest.MonkeyPatch(), {{(2, 0): math.nan, (4, 0): 1.5}})
        sys.exit(main(["train", *sys.argv[1:]]))
    """))
    common = dict(max_steps=steps, batch_size=2, skip_spikes=3, spike_window=2)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
            *argv_of(tiny_flags(tiny_data, tmp_path / "ddp", grad_accum=1, **common))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step 2: update skipped, loss nan, grad norm nan (1 in a row)") == 1  # rank 0 prints

    poison_losses(monkeypatch, {(2, 1): float("nan"), (4, 1): 1.5}, grad_accum=2)
    assert run(tiny_flags(tiny_data, tmp_path / "single", grad_accum=2, **common)) == 0
    for out in (tmp_path / "ddp", tmp_path / "single"):
        assert {step: r["skipped"] for step, r in skips(out).items()} == {2: "nonfinite", 4: "spike"}
    ddp = [r for r in metrics(tmp_path / "ddp") if "loss" in r and "skipped" not in r]
    single = [r for r in metrics(tmp_path / "single") if "loss" in r and "skipped" not in r]
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 3, 5]
    for key in ("loss", "grad_norm"):
        assert_rel_close(torch.tensor([r[key] for r in ddp], dtype=torch.float64),
                         torch.tensor([r[key] for r in single], dtype=torch.float64), 1e-5, key)
    saved = checkpoint.load(tmp_path / "ddp")
    assert {int(state["step"]) for state in saved["optimizer"]["state"].values()} == {steps - 2}
