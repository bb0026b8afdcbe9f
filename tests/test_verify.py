"""`tritongpt verify` (bench/verify.py), the measured `auto` (train/auto.py) and `tritongpt bench
report` (bench/report.py): the verify run passes on this machine (interpreter, small shapes, no
timing), a deliberately wrong backend installed as a plugin makes it exit 1 naming it, the auto
decision logic picks the fastest correct backend and caches its decisions (injected timings: no
GPU here), and the report's phases share its time budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _util import install_plugin

from tritongpt.bench.report import PHASES, Budget
from tritongpt.kernels import registry
from tritongpt.kernels.spec import describe_mismatch
from tritongpt.model.config import GPTConfig
from tritongpt.train import auto
from tritongpt.train.auto import DecisionCache, Timing, choose_backends, fastest

# One CPU thread for the commands these tests run. Why: torch 2.13's CPU sum over a dim is sometimes
# wrong in a process's first call with 2 threads: the second thread's rows are up to 6e-5 (relative)
# off their rerun's for a (64, 97) fp32 tensor's .sum(1), in 8 of 40 processes here, 0 of 40 with one
# thread. That fails `chunked`'s check at 1e-5 and its bitwise rerun; verify checks our backends.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tritongpt(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritongpt", *argv], capture_output=True, text=True,
                          env={**(os.environ if env is None else env), **ONE_THREAD}, timeout=900)


def test_verify_passes_here_and_writes_json(tmp_path):
    done = tritongpt("verify", "--json", str(tmp_path / "v.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no timing was taken" in done.stdout and "0 failed" in done.stdout
    data = json.loads((tmp_path / "v.json").read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} >= {"attention", "layer_norm", "mlp"}
    for op in {r["op"] for r in rows}:  # every usable backend of every op was checked
        expected = {n for n in registry.backends(op) if registry.usable(op, n, "cpu")}
        assert {r["backend"] for r in rows if r["op"] == op} == expected, op
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] is None for r in rows)
    assert all(r["deterministic"] is True for r in rows if registry.backend(r["op"], r["backend"]).deterministic)


def test_a_wrong_plugin_backend_fails_verify_by_name(tmp_path):
    env = install_plugin(tmp_path / "site", "sloppy-attention", "sloppy:register", "sloppy", """
        def register(registry):
            reference = registry.resolve("attention", "torch")

            def attention(q, k, v, causal=True, softmax_scale=None, window=None, doc_ids=None):
                return reference(q, k, v, causal, softmax_scale, window, doc_ids) * 1.01  # 1% off

            registry.register("attention", "sloppy", attention)
        """)
    listed = tritongpt("kernels", "list", env=env)
    attention_line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("attention"))
    assert listed.returncode == 0 and "sloppy" in attention_line
    done = tritongpt("verify", "--no-compile", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "attention backend sloppy" in failed[0] and "err_out" in failed[0]
    assert ": first mismatches (" in failed[0] and "max |diff|" in failed[0]


def test_a_mismatch_is_described_by_its_first_bad_elements_and_largest_difference():
    expected = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    actual = expected.clone().float()
    actual[0, 3] += 0.5  # the first over the limit in row-major order
    actual[2, 1] += 2.0  # the largest
    actual[1, 1] += 1e-6  # within limit * max|expected| = 1e-3 * 11
    text = describe_mismatch(actual, expected, 1e-3)
    assert text == "first mismatches (0, 3) 3.5 vs 3; (2, 1) 11 vs 9; max |diff| 2 at (2, 1) 11 vs 9"
    actual[1, 2] = float("nan")
    assert "(1, 2) nan vs 6" in describe_mismatch(actual, expected, 1e-3)


def test_a_plugin_whose_backward_raises_fails_verify_and_declared_inability_does_not(tmp_path):
    """Only the project's error (an unsupported shape or dtype) and out of memory are "cannot run":
    a backend whose forward is right and whose backward raises RuntimeError fails, with its message."""
    env = install_plugin(tmp_path / "site", "fragile-attention", "fragile:register", "fragile", """
        import torch

        from tritongpt.errors import TritonGPTError

        def register(registry):
            reference = registry.resolve("attention", "torch")

            class Fragile(torch.autograd.Function):
                @staticmethod
                def forward(ctx, q, k, v):
                    return reference(q, k, v)

                @staticmethod
                def backward(ctx, dout):
                    raise RuntimeError("fragile backward is broken")

            def fragile(q, k, v, causal=True, softmax_scale=None, window=None, doc_ids=None):
                return Fragile.apply(q, k, v)

            def picky(q, k, v, causal=True, softmax_scale=None, window=None, doc_ids=None):
                raise TritonGPTError("attention: picky backend supports no shape here")

            registry.register("attention", "fragile", fragile)
            registry.register("attention", "picky", picky)
        """)
    done = tritongpt("verify", "--no-compile", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "attention backend fragile" in failed[0], done.stdout
    assert "RuntimeError: fragile backward is broken" in failed[0]
    picky = [line for line in done.stdout.splitlines() if " picky " in line]
    assert picky and all("cannot run" in line and "TritonGPTError" in line for line in picky), done.stdout


# ---- the measured auto: decision logic with injected timings ---------------------------------

SHAPE = GPTConfig.from_preset("tiny").shape(2)
CPU = torch.device("cpu")


def test_fastest_is_the_fastest_correct_timed_backend():
    timings = [Timing("a", 2.0, True), Timing("b", 1.0, False, "err_out 1e-1 > tolerance"),
               Timing("c", None, False, "RuntimeError: no kernel"), Timing("d", 1.5, True), Timing("e", None, True)]
    assert fastest(timings).backend == "d"
    assert fastest([Timing("b", 1.0, False), Timing("c", None, False)]) is None


def test_choose_measures_once_then_uses_the_cache(tmp_path):
    calls = []

    def measure_op(op, shape, device, dtype):
        calls.append(op)
        if op == "mlp":  # triton is fastest but wrong here
            return [Timing("torch", 3.0, True), Timing("triton", 1.0, False, "err_out 1e-1 > tolerance 1e-5")]
        return [Timing("torch", 3.0, True), Timing("triton", 1.0, True), Timing("sdpa", 2.0, True)]

    cache = DecisionCache(tmp_path / "auto.json")
    lines = []
    first = choose_backends(["attention", "mlp"], SHAPE, CPU, torch.float32, cache, lines.append, measure_op)
    assert first == {"attention": "triton", "mlp": "torch"} and calls == ["attention", "mlp"]
    assert lines[0] == "attention: torch 3 ms, triton 1 ms, sdpa 2 ms -> triton"
    again = choose_backends(["attention", "mlp"], SHAPE, CPU, torch.float32, cache, lines.append, measure_op)
    assert again == first and calls == ["attention", "mlp"]  # cache hits: nothing measured
    other = choose_backends(["attention"], SHAPE, CPU, torch.float16, cache, lines.append, measure_op)
    assert other == {"attention": "triton"} and calls[-1] == "attention"  # another dtype is another key


def test_corrupt_or_stale_cache_is_measured_again(tmp_path):
    calls = []

    def measure_op(op, shape, device, dtype):
        calls.append(op)
        return [Timing("torch", 1.0, True)]

    path = tmp_path / "auto.json"
    path.write_text("{not json")
    cache = DecisionCache(path)
    chosen = choose_backends(["layer_norm"], SHAPE, CPU, torch.float32, cache, print, measure_op)
    assert chosen == {"layer_norm": "torch"}
    assert calls == ["layer_norm"] and json.loads(path.read_text())  # rewritten as valid JSON
    key = auto.cache_key("layer_norm", SHAPE, CPU, torch.float32)
    path.write_text(json.dumps({key: {"backend": "gone-backend", "times": {}}}))
    choose_backends(["layer_norm"], SHAPE, CPU, torch.float32, cache, print, measure_op)
    assert calls == ["layer_norm", "layer_norm"]  # a backend no longer registered is stale
    path.write_text(json.dumps({key: "triton"}))  # malformed entry
    choose_backends(["layer_norm"], SHAPE, CPU, torch.float32, cache, print, measure_op)
    assert len(calls) == 3


def test_no_correct_backend_falls_back_to_torch_and_is_not_cached(tmp_path):
    cache = DecisionCache(tmp_path / "auto.json")
    lines = []
    result = choose_backends(["mlp"], SHAPE, CPU, torch.float32, cache, lines.append,
                             lambda *a: [Timing("triton", None, False, "TritonGPTError: unsupported")])
    assert result == {"mlp": "torch"} and "no backend was both correct and timed" in lines[0]
    assert not (tmp_path / "auto.json").exists()


def test_measure_finds_every_usable_backend_correct_here():
    """measure() on real inputs (the CPU, interpreter): every usable backend runs and is correct."""
    timings = auto.measure("layer_norm", GPTConfig.from_preset("tiny").shape(1, 8), CPU, torch.float32)
    usable = {n for n in registry.backends("layer_norm") if registry.usable("layer_norm", n, CPU)}
    assert {t.backend for t in timings} == usable
    assert all(t.ok for t in timings), timings


# ---- the GPU report command, run on this CPU -------------------------------------------------


def test_budget_shares_leave_time_to_later_phases():
    budget = Budget(100.0)
    first = budget.phase_deadline("verify") - budget.start
    assert abs(first - 100.0 * PHASES["verify"] / sum(PHASES.values())) < 1.0
    assert abs(budget.phase_deadline("step") - budget.end) < 1.0  # the last phase gets all that is left


@pytest.mark.slow
def test_report_writes_its_five_files_within_the_budget(tmp_path):
    done = tritongpt("bench", "report", "--quick", "--no-compile", "--budget", "60", "--out", str(tmp_path),
                     env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytest-gpu.txt", "report.csv", "report.json",
                                                            "report.md", "report.png"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["header"]["phases"]) == {"verify", "pytest-gpu", "kernels", "step"}
    assert data["verify"] and data["kernels"] and data["step"]
    assert "tritongpt verify" in (tmp_path / "report.md").read_text()
