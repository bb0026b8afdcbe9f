"""`tritongpt bench`: the quick suite runs on the CPU end to end and its files agree with each
other; the full sweeps' shapes and the FLOP/byte counts are the intended ones; failures become
rows, not crashes."""

import contextlib
import csv
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritongpt.bench import step, sweeps, tables
from tritongpt.cli import main
from tritongpt.kernels import registry
from tritongpt.kernels.measure import Timer
from tritongpt.kernels.spec import MODES, Case
from tritongpt.model.config import GPTConfig

REPO = Path(__file__).resolve().parents[1]
HEADER_FIELDS = ("tool", "command", "date", "device", "device_type", "torch", "triton", "dtype", "quick",
                 "timer", "ceilings", "skipped")
QUICK_STEP = ["--batch-size", "1", "--seq-len", "16", "--steps", "1"]  # the interpreter runs each step


def _run(argv: list[str]) -> tuple[int, str]:
    """main(argv) -> (exit code, stdout), on one CPU thread: tiny ops on a shared 2-core machine
    only wait for a second thread."""
    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`tritongpt bench all --quick` on this machine (CPU: torch backends timed, Triton on the
    interpreter for correctness), run once for the tests below."""
    out_dir = tmp_path_factory.mktemp("bench")
    rc, stdout = _run(["bench", "all", "--quick", "--no-compile", "--out", str(out_dir), *QUICK_STEP])
    (json_path,) = out_dir.glob("*.json")
    data = json.loads(json_path.read_text())
    return rc, stdout, out_dir, json_path, data


def test_quick_run_succeeds_and_prints_table(quick_run):
    rc, stdout, _, json_path, _ = quick_run
    assert rc == 0, stdout
    for title in ("== attention ==", "== layer_norm ==", "== mlp ==", "== step =="):
        assert title in stdout
    assert f"wrote {json_path}" in stdout
    if not torch.cuda.is_available():
        assert "CPU TIMES" in stdout


def test_json_header_names_device_software_and_ceilings(quick_run):
    *_, data = quick_run
    head = data["header"]
    for name in HEADER_FIELDS:
        assert name in head, name
    assert head["torch"] == torch.__version__ and head["quick"] is True
    assert head["ceilings"]["copy_gbps"] > 0 and head["ceilings"]["matmul_tflops"] > 0
    assert head["cpu_times"] == (not torch.cuda.is_available())
    assert head["date"][:4].isdigit() and "T" in head["date"]


def test_csv_rows_match_json_rows(quick_run):
    _, _, _, json_path, data = quick_run
    text = json_path.with_suffix(".csv").read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    for key in ("device", "torch", "triton", "date"):
        assert any(line.startswith(f"# {key}: {data['header'][key]}") for line in comments), key
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    assert len(rows) == len(data["rows"]) > 0
    for from_csv, from_json in zip(rows, data["rows"]):
        assert list(from_csv) == list(tables.COLUMNS) == list(from_json)
        for key, value in from_json.items():
            if value is None:
                assert from_csv[key] == "", key
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(from_csv[key]) == value, key
            else:
                assert from_csv[key] == str(value), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex runs forward only on a CPU")
def test_forward_only_and_prepared_rows_and_tiles(quick_run):
    """On a CPU `flex` (no CPU backward) times its forward and says why its other modes are
    empty; its `(prepared)` rows build the block mask outside the timed calls; every attention
    row counts the tiles the Triton forward visits (their count: tests/test_attention.py)."""
    rows = [r for r in quick_run[-1]["rows"] if r["op"] == "attention"]
    for name in ("flex", "flex (prepared)"):
        mine = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == name}
        assert mine, name
        for (shape, mode), r in mine.items():
            assert r["err_out"] is not None and r["err_out"] <= 1e-5, (name, shape, r)
            assert (r["ms"] is not None) == (mode == "fwd"), (name, shape, mode, r)
            assert mode == "fwd" or "no backward here" in r["note"]
    assert all(isinstance(r["tiles"], int) and r["tiles"] >= 1 for r in rows)


def test_every_backend_and_step_combination_has_rows(quick_run):
    rows, skipped = quick_run[-1]["rows"], quick_run[-1]["header"]["skipped"]
    for op in registry.ops():
        providers = {r["provider"] for r in rows if r["op"] == op}
        left_out = {s["provider"] for s in skipped if s["op"] == op}
        assert set(registry.backends(op)) <= providers | left_out, (op, providers, left_out)
        assert {n for n in registry.backends(op) if registry.usable(op, n)} <= providers
    tiny_combos = step.combos(GPTConfig.from_preset("tiny").ops, compile=False)
    expected = [c.name for c in tiny_combos] + [step.HF_PLAIN, step.HF_PATCHED]
    assert [r["provider"] for r in rows if r["op"] == "step"] == expected


def test_kernel_errors_are_finite_and_within_tolerance(quick_run):
    device = sweeps.default_device()
    tol = sweeps.row_tolerance(sweeps.default_dtype(device), device)
    for r in [r for r in quick_run[-1]["rows"] if r["op"] in registry.ops()]:
        assert sweeps.FLAG not in r["note"], r
        if r["provider"] == "triton" and not registry.triton_usable(device):
            continue  # a row saying it needs CUDA or the interpreter
        forward_only = "forward only" in r["note"]  # no input gradients to compare
        errs = [r["err_out"]] + [r["err_grad"]] * (not forward_only)
        assert all(e is not None and math.isfinite(e) for e in errs), r
        if device.type == "cpu":  # fp32 vs float64; on a GPU the limit is also 2x PyTorch's error
            assert all(e <= tol for e in errs), r


def test_torch_rows_are_timed_and_interpreted_triton_rows_are_not(quick_run):
    rows = [r for r in quick_run[-1]["rows"] if r["op"] in registry.ops()]
    for r in rows:
        if registry.interpreting() and r["provider"] == "triton":
            assert r["ms"] is None and r["note"] == sweeps.INTERPRETER_NOTE, r  # never timed
        elif r["provider"] in ("torch", "sdpa"):
            spec = registry.spec(r["op"])
            unit, _ = spec.work(spec.cases(True)[0], r["mode"], torch.float32)
            assert r["ms"] > 0 and r[unit] > 0 and r["pct_peak"] > 0, r
            if r["provider"] == sweeps.BASELINE:
                assert r["speedup"] == 1.0
    assert any(r["provider"] == "triton" for r in rows)


def test_step_losses_agree_with_the_baseline(quick_run):
    rows = [r for r in quick_run[-1]["rows"] if r["op"] == "step"]
    base = next(r for r in rows if r["provider"] == step.BASELINE)
    assert base["ms"] > 0 and base["tokens_per_s"] > 0 and base["loss"] > 0
    compared = [r for r in rows if r["loss"] is not None]
    assert len(compared) >= 2 if registry.triton_usable() else len(compared) >= 1
    device = sweeps.default_device()
    tol = step.loss_tolerance(sweeps.default_dtype(device), device)
    for r in compared:
        assert abs(r["loss"] - base["loss"]) <= tol * base["loss"], r
        assert step.LOSS_FLAG not in r["note"], r


def test_one_png_per_op_and_for_the_step(quick_run):
    pytest.importorskip("matplotlib")
    _, _, out_dir, json_path, _ = quick_run
    for op in (*registry.ops(), "step"):
        png = out_dir / f"{json_path.stem}_{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


# ---- pieces ---------------------------------------------------------------------------------


def test_full_sweeps_fix_the_token_count_and_span_the_swept_sizes():
    cases = registry.spec("attention").cases(False)
    attention = [c for c in cases if "docs" not in dict(c.options)]
    packed = [c for c in cases if "docs" in dict(c.options)]
    assert {c["B"] * c["T"] for c in cases} == {16384}
    assert {c["H"] * c["D"] for c in attention} == {2048}
    assert {(c["H"], c["D"]) for c in packed} == {(12, 64)} and [c["T"] for c in packed] == [1024, 2048, 8192]
    assert {c["D"] for c in attention} == {64, 128} and {c["causal"] for c in attention} == {True, False}
    assert min(c["T"] for c in attention) == 512 and max(c["T"] for c in attention) == 16384
    norms = registry.spec("layer_norm").cases(False)
    assert {c["M"] for c in norms} == {16384}
    assert (min(c["N"] for c in norms), max(c["N"] for c in norms)) == (768, 8192)
    mlps = registry.spec("mlp").cases(False)
    assert {c["M"] for c in mlps} == {16384}
    assert (min(c["C"] for c in mlps), max(c["C"] for c in mlps)) == (768, 4096)
    assert all(c["H"] == 4 * c["C"] for c in mlps)


def test_flop_and_byte_counts_per_mode():
    work = {op: registry.spec(op).work for op in ("attention", "mlp", "layer_norm")}
    full = Case("attention", (("B", 2), ("T", 8), ("H", 3), ("D", 4)), 8, "", (("causal", False),))
    causal = Case("attention", full.dims, 8, "", (("causal", True),))
    assert work["attention"](full, "fwd", torch.bfloat16) == ("tflops", 4 * 2 * 3 * 8 * 8 * 4)
    assert work["attention"](causal, "fwd", torch.bfloat16)[1] == 4 * 2 * 3 * 8 * 8 * 4 / 2
    assert work["attention"](full, "bwd", torch.bfloat16)[1] == 2.5 * work["attention"](full, "fwd", torch.bfloat16)[1]
    mlp = Case("mlp", (("M", 5), ("C", 6), ("H", 24)), 6, "")
    assert work["mlp"](mlp, "fwd", torch.float32) == ("tflops", 2 * (2 * 5 * 6 * 24))
    assert work["mlp"](mlp, "bwd", torch.float32)[1] == 4 * (2 * 5 * 6 * 24)
    norm = Case("layer_norm", (("M", 7), ("N", 9)), 9, "")
    assert work["layer_norm"](norm, "fwd", torch.bfloat16) == ("gbps", 2 * (2 * 7 * 9 + 2 * 9))
    assert work["layer_norm"](norm, "fwd+bwd", torch.float32)[1] == 4 * (5 * 7 * 9 + 5 * 9)


def _tiny_norm_rows(*extra: sweeps.Provider) -> list[dict]:
    device = torch.device("cpu")
    timer = Timer(device, quick=True)
    found = [p for p in sweeps.providers("layer_norm", device, compile=False)[0] if p.name == "torch"]
    spec = registry.spec("layer_norm")
    return sweeps.run_case(spec, spec.cases(True)[0], found + list(extra), device=device, dtype=torch.float32,
                            timer=timer, ceiling={"copy_gbps": 1.0, "matmul_tflops": 1.0})


def test_broken_provider_gives_rows_with_a_note():
    def broken():
        raise RuntimeError("no kernel for this shape")
    rows = _tiny_norm_rows(sweeps.Provider("broken", lambda inputs: lambda *a, **k: broken()))
    bad = [r for r in rows if r["provider"] == "broken"]
    assert len(bad) == len(MODES)
    assert all(r["ms"] is None and "RuntimeError: no kernel for this shape" in r["note"] for r in bad)
    assert all(r["ms"] > 0 for r in rows if r["provider"] == "torch")


def test_wrong_provider_is_flagged():
    torch_norm = registry.resolve("layer_norm", "torch")
    off = sweeps.Provider("off-by-1%", lambda inputs: lambda x, w, b, eps: torch_norm(x, w * 1.01, b, eps))
    rows = _tiny_norm_rows(off)
    wrong = [r for r in rows if r["provider"] == "off-by-1%"]
    assert all(sweeps.FLAG in r["note"] and r["err_out"] > 1e-3 for r in wrong)
    assert not any(sweeps.FLAG in r["note"] for r in rows if r["provider"] == "torch")


def test_second_run_does_not_replace_files(tmp_path):
    head = {"tool": "tritongpt bench", "command": "x", "date": "2026-01-02T03:04:05+00:00", "device": "Some GPU",
            "torch": "t", "triton": "tr", "dtype": "bfloat16", "timer": "do_bench", "ceilings": {}, "skipped": []}
    rows = [tables.blank_row(op="layer_norm", provider="torch", mode="fwd", series="layer_norm", shape="M=1 N=2",
                             size=2, ms=1.5, gbps=2.0)]
    first = tables.write(tmp_path, head, rows)
    second = tables.write(tmp_path, head, rows)
    assert first[0].name == "Some-GPU_2026-01-02.json" and second[0].name == "Some-GPU_2026-01-02_2.json"
    assert json.loads(first[0].read_text())["rows"][0]["ms"] == 1.5
    assert tables.read_csv(second[1]) == [{**rows[0], "size": 2.0}]


@pytest.mark.parametrize("argv, message", [
    (["step", "--preset", "nope"], "unknown model preset 'nope'"),
    (["mlp", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["step", "--ranks", "2", "--batch-size", "3"], "--batch-size 3 does not split into 2 equal shares"),
    (["step", "--ranks", "1"], "--ranks must be >= 2"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["bench", *argv, "--quick", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _per_rank_mib(row: dict) -> float:
    """The parameter + optimizer-state MiB a rank holds, from a parallel step row's note."""
    return float(re.search(r"per rank: params\+optimizer ([\d.]+) MiB", row["note"]).group(1))


def test_step_ranks_adds_ddp_and_fsdp_rows(tmp_path, monkeypatch):
    """`bench step --ranks 2`: the baseline under DDP and under FSDP over 2 CPU processes (gloo,
    one torchrun each) reaches the baseline's loss on the same batch, and an FSDP rank holds
    about half the parameter + optimizer bytes of a DDP rank. Only the baseline combination runs
    here besides them (quick_run covers the others); --doc-mask leaves out the transformers rows
    (hf+patch runs the interpreter here) and has the ranks split the doc ids with the rows."""
    baseline = [c for c in step.combos(GPTConfig.from_preset("tiny").ops, compile=False) if c.name == step.BASELINE]
    monkeypatch.setattr(step, "combos", lambda ops, compile=True: baseline)
    rc, stdout = _run(["bench", "step", "--quick", "--device", "cpu", "--no-compile", "--ranks", "2", "--doc-mask",
                       "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--out", str(tmp_path)])
    assert rc == 0, stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "--ranks 2" in data["header"]["command"]
    rows = {r["provider"]: r for r in data["rows"]}
    assert list(rows) == [step.BASELINE, "ddp x2", "fsdp x2"]
    base, ddp, fsdp = rows[step.BASELINE], rows["ddp x2"], rows["fsdp x2"]
    for r in (ddp, fsdp):
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0, r
        assert step.LOSS_FLAG not in r["note"] and "failed" not in r["note"], r
        assert abs(r["loss"] - base["loss"]) <= step.loss_tolerance(torch.float32, torch.device("cpu")) * base["loss"]
        assert r["note"].startswith("2 ranks (gloo)") and "CPU times of 2 processes" in r["note"], r
    assert 0.45 <= _per_rank_mib(fsdp) / _per_rank_mib(ddp) <= 0.55, (fsdp["note"], ddp["note"])


def test_out_must_be_a_directory(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("keep me")
    assert main(["bench", "layer_norm", "--quick", "--out", str(path)]) == 2
    assert "is not a directory" in capsys.readouterr().err and path.read_text() == "keep me"


@pytest.mark.slow
def test_quick_run_times_torch_compile_peers_and_combinations(tmp_path):
    """torch.compile peers and combinations (slow to compile on a CPU)."""
    rc, stdout = _run(["bench", "all", "--quick", "--out", str(tmp_path), *QUICK_STEP])
    assert rc == 0, stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    compiled = [r for r in data["rows"] if r["provider"] == sweeps.COMPILE]
    assert {r["op"] for r in compiled} == set(registry.ops())
    assert all(r["ms"] > 0 and r["err_out"] <= 1e-5 for r in compiled), compiled
    assert any(r["provider"] == "compile+sdpa" and r["ms"] for r in data["rows"])


@pytest.mark.slow
def test_pytest_benchmark_suite_passes_on_layer_norm():
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/suite", "-q", "-p", "no:cacheprovider",
                             "--benchmark-only", "--benchmark-max-time=0.01", "--benchmark-min-rounds=1",
                             "-k", "layer_norm and not compile"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


@pytest.mark.gpu
def test_gpu_quick_attention_is_timed(tmp_path):
    rc, stdout = _run(["bench", "attention", "--quick", "--no-compile", "--out", str(tmp_path)])
    assert rc == 0, stdout
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    ours = [r for r in rows if r["provider"] == "triton"]
    assert ours and all(r["ms"] > 0 and r["tflops"] > 0 and r["peak_mem_mb"] is not None for r in ours)
    assert {r["provider"] for r in rows} >= {"sdpa-flash", "sdpa-math"}
