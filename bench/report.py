"""`tritongpt bench report`: turn a (rented) GPU into results ready to commit, within a time budget.

    tritongpt bench report                          # 8 minutes (--budget 480), compilation included
    tritongpt bench report --budget 300 --out bench/results/H100_2026-12-05
    TRITON_INTERPRET=1 tritongpt bench report --quick --budget 120   # a CPU: the same files, CPU times

Four phases, each given its share of the time still left (a phase that finishes early leaves
its time to the next): `tritongpt verify` at the gpt2 shapes; `python -m pytest -m gpu` (a
subprocess with its own timeout); the kernel sweep of every op (cases in order, stopping when
the phase's time is up); the training-step benchmark (combinations in order, likewise). Progress
goes to stderr. After every phase the folder is rewritten with all that finished, so a run cut
short (budget, Ctrl-C, a crash) leaves its results. The folder holds five files:

    report.json     header (device, versions, date, budget, phases) + verify, kernel and step rows
    report.csv      the kernel and step rows (bench columns)
    report.md       the tables ready for README.md's "GPU results"
    report.png      one figure: a panel per op (fwd+bwd throughput vs size per provider) + the step
    pytest-gpu.txt  the output of python -m pytest -m gpu
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tritongpt.bench import step, sweeps, tables
from tritongpt.bench.verify import verify
from tritongpt.files import atomic_write_bytes
from tritongpt.kernels import registry
from tritongpt.kernels.measure import Timer
from tritongpt.kernels.spec import dtype_name
from tritongpt.model.config import GPTConfig

# phase -> weight: its share of the time left when it starts, against the phases after it
PHASES = {"verify": 2.0, "pytest-gpu": 3.0, "kernels": 3.0, "step": 2.0}
REPO = Path(__file__).resolve().parents[1]


class Budget:
    """Deadlines for the phases of a run that must end `seconds` after it started."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def phase_deadline(self, phase: str) -> float:
        names = list(PHASES)
        later = sum(PHASES[p] for p in names[names.index(phase):])
        return time.monotonic() + self.left() * PHASES[phase] / later


def default_out(device_name: str) -> Path:
    return tables.DEFAULT_OUT / f"report_{tables.slug(device_name)}_{datetime.now(timezone.utc):%Y-%m-%d}"


def run(args, device: torch.device, dtype: torch.dtype) -> int:
    """The report command; exit 1 when a check failed (verify, pytest, flagged rows)."""
    log = tables.log
    budget = Budget(args.budget)
    out = args.out if args.out is not None else default_out(tables.device_name(device))
    out.mkdir(parents=True, exist_ok=True)
    head = {"tool": "tritongpt bench report", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": tables.device_name(device), **tables.versions(), "dtype": dtype_name(dtype),
            "budget_s": args.budget,
            "interpreter": registry.interpreting(), "phases": {}}
    results = {"verify": [], "pytest": {}, "kernels": [], "step": []}
    failed = False
    try:
        timer = Timer(device, quick=True)
        head["ceilings"] = sweeps.ceilings(device, dtype, timer)

        deadline = budget.phase_deadline("verify")
        log(f"[report] verify ({deadline - time.monotonic():.0f} s)")
        _, results["verify"] = verify(GPTConfig.from_preset("gpt2"), 8, None, device, dtype,
                                      compile=args.compile, log=log)
        failed |= any(r["status"] == "FAIL" for r in results["verify"])
        _finish(head, "verify", deadline)
        write(out, head, results)

        deadline = budget.phase_deadline("pytest-gpu")
        log(f"[report] python -m pytest -m gpu ({deadline - time.monotonic():.0f} s)")
        results["pytest"] = run_gpu_tests(out / "pytest-gpu.txt", deadline - time.monotonic())
        failed |= results["pytest"]["returncode"] != 0
        _finish(head, "pytest-gpu", deadline)
        write(out, head, results)

        deadline = budget.phase_deadline("kernels")
        log(f"[report] kernel sweeps ({deadline - time.monotonic():.0f} s)")
        results["kernels"], head["skipped"] = sweep(device, dtype, timer, head["ceilings"], deadline, args, log)
        _finish(head, "kernels", deadline)
        write(out, head, results)

        deadline = budget.phase_deadline("step")
        log(f"[report] training step ({deadline - time.monotonic():.0f} s)")
        results["step"] = step.run_step(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
                                        device=device, dtype=dtype, steps=args.steps, warmup=2,
                                        ceiling=head["ceilings"], compile=args.compile, seed=args.seed, log=log,
                                        deadline=deadline, doc_mask=args.doc_mask)
        _finish(head, "step", deadline)
    finally:
        for path in write(out, head, results):
            print(f"wrote {path}")
    flagged = [r for r in results["kernels"] + results["step"]
               if sweeps.FLAG in r["note"] or step.LOSS_FLAG in r["note"]]
    return 1 if failed or flagged else 0


def _finish(head: dict, phase: str, deadline: float) -> None:
    head["phases"][phase] = "done" if time.monotonic() <= deadline else "done, past its share of the budget"


def run_gpu_tests(log_path: Path, seconds: float) -> dict:
    """python -m pytest -m gpu in a subprocess, stopped after `seconds`; its output goes to log_path."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-x"]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(seconds, 10))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += f"\n[report] stopped after {seconds:.0f} s (the budget's share for the GPU tests)\n"
        code = 124
    atomic_write_bytes(log_path, output.encode())
    summary = next((line for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)), "")
    return {"returncode": code, "summary": summary.strip("= ")}


def sweep(device: torch.device, dtype: torch.dtype, timer: Timer, ceiling: dict, deadline: float, args,
          log) -> tuple[list[dict], list[dict]]:
    """Kernel rows of every op, case by case in sweep order, until `deadline`: the first cases of
    every op before the later ones, so a short budget still covers each op."""
    found = {op: sweeps.providers(op, device, args.compile) for op in registry.ops()}
    skipped = [s for _, left_out in found.values() for s in left_out]
    queues = {op: list(registry.spec(op).cases(args.quick)) for op in registry.ops()}
    rows, i = [], 0
    while any(queues.values()) and time.monotonic() < deadline:
        for op, queue in queues.items():
            if queue and time.monotonic() < deadline:
                case = queue.pop(0)
                log(f"[kernels] {op} {case.shape}")
                rows += sweeps.run_case(registry.spec(op), case, found[op][0], device=device, dtype=dtype,
                                         timer=timer, ceiling=ceiling, seed=args.seed + i, log=log)
                i += 1
    left = sum(len(q) for q in queues.values())
    if left:
        log(f"[kernels] budget: {left} cases not run")
    return rows, skipped


def write(out: Path, head: dict, results: dict) -> list[Path]:
    """All five files from what has finished (rewritten after every phase)."""
    rows = results["kernels"] + results["step"]
    paths = {name: out / name for name in ("report.json", "report.csv", "report.md", "report.png")}
    atomic_write_bytes(paths["report.json"], json.dumps({"header": head, **results}, indent=1,
                                                        default=str).encode() + b"\n")
    atomic_write_bytes(paths["report.csv"], tables.to_csv({**_csv_header(head)}, rows).encode())
    atomic_write_bytes(paths["report.md"], markdown(head, results).encode())
    figure = tables.figure(head, rows)
    if figure is None:
        del paths["report.png"]
    else:
        atomic_write_bytes(paths["report.png"], figure)
    written = list(paths.values())
    if (out / "pytest-gpu.txt").exists():
        written.append(out / "pytest-gpu.txt")
    return written


def _csv_header(head: dict) -> dict:
    return {"command": f"tritongpt bench report --budget {head['budget_s']}", "timer": "triton.testing.do_bench",
            **head}


def markdown(head: dict, results: dict) -> str:
    """Tables for README.md: verify's verdicts, fwd+bwd throughput per op and provider, the step."""
    lines = [f"### {head['device']} | torch {head['torch']} | triton {head['triton']} | {head['date'][:10]} | "
             f"{head['dtype']}" + (" | CPU times" if "CPU" in head["device"] else ""), ""]
    if results["verify"]:
        bad = [r for r in results["verify"] if r["status"] == "FAIL"]
        lines += [f"`tritongpt verify` (gpt2, B=8, T=1024): {len(results['verify'])} checks, {len(bad)} failed.", "",
                  "| op | backend | shape | err out | err grad | fwd+bwd ms | speedup vs torch |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['backend']} | {r['shape']} | {_num(r['err_out'])} | {_num(r['err_grad'])} | "
                  f"{_num(r['fwd_bwd_ms'])} | {_num(r['speedup'])} |" for r in results["verify"]]
        lines.append("")
    if results["pytest"]:
        lines += [f"`python -m pytest -m gpu`: {results['pytest']['summary'] or 'no summary'} "
                  f"(exit {results['pytest']['returncode']})", ""]
    for op in dict.fromkeys(r["op"] for r in results["kernels"]):
        mine = [r for r in results["kernels"] if r["op"] == op and r["mode"] == "fwd+bwd"]
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        unit = "TFLOP/s" if any(r["tflops"] is not None for r in mine) else "GB/s"
        lines += [f"{op}, forward+backward {unit}:", "", "| shape | " + " | ".join(providers) + " |",
                  "|---|" + "---|" * len(providers)]
        for shape in dict.fromkeys(r["shape"] for r in mine):
            cells = {r["provider"]: r["tflops"] if r["tflops"] is not None else r["gbps"] for r in mine
                     if r["shape"] == shape}
            lines.append(f"| {shape} | " + " | ".join(_num(cells.get(p)) for p in providers) + " |")
        lines.append("")
    if results["step"]:
        lines += [f"Training step ({results['step'][0]['shape']}):", "",
                  "| combination | ms/step | tokens/s | MFU % | peak MiB |", "|---|---|---|---|---|"]
        lines += [f"| {r['provider']} | {_num(r['ms'])} | {_num(r['tokens_per_s'])} | {_num(r['pct_peak'])} | "
                  f"{_num(r['peak_mem_mb'])} |" for r in results["step"]]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
