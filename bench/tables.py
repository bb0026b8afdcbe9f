"""Benchmark rows and their tables and files: one row schema for kernel and training-step rows,
the run's header (device, versions, date, ceilings), the text tables on stdout (`aligned` and
`fmt` also lay out `tritongpt verify`'s), and the files under OUT (DEFAULT_OUT: `bench-results`):

    OUT/<device>_<date>.json        {"header": {...}, "rows": [...]}
    OUT/<device>_<date>.csv         the same rows, after `# key: value` header lines
    OUT/<device>_<date>_<op>.png    throughput vs size per provider (needs matplotlib)

A second run on the same device and day gets `_2`, `_3`, ... rather than replacing files.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tritongpt.files import atomic_write_bytes
from tritongpt.kernels import registry
from tritongpt.kernels.spec import dtype_name

DEFAULT_OUT = Path("bench-results")  # in the working directory, never inside the package

# The columns of every row, kernel and step alike (a step row uses what applies to it).
COLUMNS = (
    "op",  # a registered op (attention, layer_norm, mlp, ...), or step
    "provider",  # backend or peer name; for step rows the backend combination
    "mode",  # fwd, bwd, fwd+bwd; "train" for step rows
    "series",  # rows of one plot line: everything but the swept size
    "shape",  # the case, e.g. "B=32 T=512 H=32 D=64 causal" or "gpt2 B=16 T=1024"
    "size",  # the swept size (plots' x axis): T, N, C, or the step's sequence length
    "dtype",
    "ms",  # median milliseconds per call (per training step for step rows)
    "tflops",  # TFLOP/s (attention, mlp, step)
    "gbps",  # GB/s (layer_norm)
    "pct_peak",  # percent of the measured ceiling (copy GB/s or matmul TFLOP/s); MFU for step rows
    "speedup",  # BASELINE's ms / this ms, same case and mode (step: vs eager+sdpa)
    "err_out",  # max relative error of the output vs the float32/float64 reference
    "err_grad",  # max relative error over the input gradients
    "tiles",  # (query block, key block) tiles the Triton forward visits (OpSpec.tiles; attention)
    "peak_mem_mb",  # MiB allocated at the peak above the inputs (step: whole training step); CUDA only
    "tokens_per_s",  # step rows
    "loss",  # step rows: loss of the first step (same seed and batch for every combination)
    "backends",  # step rows: the backend each op resolved to
    "note",  # why a value is missing, correctness-only rows, flags
)
NUMERIC = {"size", "ms", "tflops", "gbps", "pct_peak", "speedup", "err_out", "err_grad", "tiles", "peak_mem_mb",
           "tokens_per_s", "loss"}


def blank_row(**values) -> dict:
    """A row with every column, None where not given."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not bench columns: {sorted(unknown)}")
    row = dict.fromkeys(COLUMNS)
    row.update(values)
    if row["note"] is None:
        row["note"] = ""
    return row


def join_notes(*notes: str) -> str:
    """A row's note from several: the non-empty ones, `; ` between them."""
    return "; ".join(n for n in notes if n)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    """{"torch", "triton", "cuda"}: the versions every header names (cuda: None without CUDA)."""
    import triton  # lazy: not installed off Linux; only a header needs it
    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def header(device: torch.device, dtype: torch.dtype, *, quick: bool, command: str, timer: str,
           ceilings: dict, skipped: list[dict], ref_dtype: torch.dtype, interpreter: bool) -> dict:
    """The run's header: what ran where, when, with which software, against which ceilings."""
    return {
        "tool": "tritongpt bench",
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_times": device.type != "cuda",
        **versions(),
        "python": platform.python_version(),
        "dtype": dtype_name(dtype),
        "reference_dtype": dtype_name(ref_dtype),
        "quick": quick,
        "timer": timer,
        "interpreter": interpreter,
        "ceilings": ceilings,
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------------------------
# stdout


DIGITS = {"tokens_per_s": 1, "loss": 5}  # decimals shown per column (default 3)


def fmt(value, digits: int = 3) -> str:
    """A table cell: "-" for None, yes / NO for a bool, a float with `digits` decimals (scientific
    below 1e-2 and from 1e5 on)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def aligned(cells: list[list[str]]) -> list[str]:
    """Rows of cells as text lines, every column but the last (a note) padded to its widest cell."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in cells]


def header_lines(head: dict) -> list[str]:
    lines = [f"tritongpt bench on {head['device']} | torch {head['torch']} | triton {head['triton']} | "
             f"{head['date']} | {head['dtype']}{' | quick' if head['quick'] else ''}",
             f"timer: {head['timer']}"]
    c = head.get("ceilings") or {}
    if c:
        lines.append(f"ceilings: copy {fmt(c['copy_gbps'])} GB/s, "
                     f"matmul {fmt(c['matmul_tflops'])} TFLOP/s ({c['matmul']})")
    if head.get("interpreter"):
        lines.append("TRITON_INTERPRET=1: Triton backends are checked for correctness, never timed")
    return lines


def format_table(head: dict, rows: list[dict]) -> str:
    """The rows as text tables, one per op, after the header lines and with the skipped peers."""
    out = header_lines(head)
    kernel_cols = ("shape", "provider", "mode", "ms", "tflops", "gbps", "pct_peak", "speedup",
                   "err_out", "err_grad", "tiles", "peak_mem_mb", "note")
    step_cols = ("shape", "provider", "ms", "tokens_per_s", "tflops", "pct_peak", "speedup", "loss",
                 "peak_mem_mb", "backends", "note")
    titles = {"tflops": "TFLOP/s", "gbps": "GB/s", "pct_peak": "%peak", "peak_mem_mb": "mem MiB",
              "tokens_per_s": "tok/s", "err_out": "err out", "err_grad": "err grad"}
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        cols = step_cols if op == "step" else kernel_cols
        if op == "step":
            titles_here = {**titles, "pct_peak": "MFU %", "ms": "ms/step"}
        else:
            optional = {"tflops", "gbps", "tiles"}  # shown where some row has them
            used = {c for c in optional if any(r[c] is not None for r in mine)}
            cols = tuple(c for c in cols if c not in optional - used)
            titles_here = titles
        cells = [[titles_here.get(c, c) for c in cols]]
        cells += [[fmt(r[c], DIGITS.get(c, 3)) for c in cols] for r in mine]
        out += ["", f"== {op} ==", *aligned(cells)]
        for s in head.get("skipped", []):
            if s["op"] == op:
                out.append(f"skipped {s['provider']}: {s['reason']}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Files


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "device"


def stem(out_dir: Path, head: dict, prefix: str = "") -> str:
    """`<prefix><device>_<date>`, with `_2`, `_3`, ... when that run's files already exist."""
    base = f"{prefix}{slug(head['device'])}_{head['date'][:10]}"
    name, n = base, 1
    while any((out_dir / f"{name}{suffix}").exists() for suffix in (".json", ".csv")):
        n += 1
        name = f"{base}_{n}"
    return name


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(head: dict, rows: list[dict]) -> str:
    clean = [{k: _json_value(v) for k, v in r.items()} for r in rows]
    return json.dumps({"header": head, "rows": clean}, indent=1, allow_nan=False) + "\n"


def to_csv(head: dict, rows: list[dict]) -> str:
    buf = io.StringIO()
    for key in ("tool", "command", "date", "device", "torch", "triton", "dtype", "timer"):
        buf.write(f"# {key}: {head[key]}\n")
    c = head.get("ceilings") or {}
    if c:
        buf.write(f"# ceilings: copy_gbps={c['copy_gbps']:.6g} matmul_tflops={c['matmul_tflops']:.6g} "
                  f"({c['matmul']})\n")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if _json_value(v) is None else repr(v) if isinstance(v, float) else v)
                         for k, v in r.items()})
    return buf.getvalue()


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by `write`, numbers parsed back (empty cells: None)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    rows = []
    for r in csv.DictReader(lines):
        rows.append({k: (None if v == "" and k != "note" else float(v) if k in NUMERIC else v) for k, v in r.items()})
    return rows


def write(out_dir: Path, head: dict, rows: list[dict]) -> list[Path]:
    """JSON, CSV and (with matplotlib) PNG plots of one run under `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem(out_dir, head)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv"]
    atomic_write_bytes(paths[0], to_json(head, rows).encode())
    atomic_write_bytes(paths[1], to_csv(head, rows).encode())
    return paths + plot(out_dir, name, head, rows)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib  # lazy: optional (the plot extra); rows and tables need no matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: as above
    except ImportError:
        return None
    return plt


def plot_title(head: dict) -> str:
    title = (f"{head['device']} | torch {head['torch']} | triton {head['triton']} | {head['date'][:10]} | "
             f"{head['dtype']}")
    return title + (" | CPU times" if head.get("cpu_times") else "")


def png_bytes(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot(out_dir: Path, name: str, head: dict, rows: list[dict]) -> list[Path]:
    """One PNG per op: throughput vs size, a line per provider, a panel per (series, mode); for
    step rows a bar chart of tokens/s per combination. Nothing without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        if op == "step":
            if not any(r["tokens_per_s"] is not None for r in mine):
                continue
            fig, ax = plt.subplots(figsize=(1.2 * len(mine) + 3, 3.5), layout="constrained")
            _draw_step(ax, mine)
        else:
            series = list(dict.fromkeys(r["series"] for r in mine))
            modes = list(dict.fromkeys(r["mode"] for r in mine))
            fig, axes = plt.subplots(len(series), len(modes), figsize=(4.5 * len(modes), 3.2 * len(series)),
                                     squeeze=False, layout="constrained")
            for i, s in enumerate(series):
                for j, mode in enumerate(modes):
                    _draw_kernel(axes[i][j], op, [r for r in mine if r["series"] == s and r["mode"] == mode],
                                 f"{s} {mode}")
        fig.suptitle(f"{op}\n{plot_title(head)}", fontsize=9)
        path = out_dir / f"{name}_{op}.png"
        atomic_write_bytes(path, png_bytes(plt, fig))
        paths.append(path)
    return paths


def figure(head: dict, rows: list[dict]) -> bytes | None:
    """One PNG: a panel per op (forward+backward throughput vs size, a line per provider and
    series) and one for the training step; None without matplotlib or rows."""
    plt = pyplot()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    if plt is None or not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False, layout="constrained")
    for ax, op in zip(axes[0], ops):
        mine = [r for r in rows if r["op"] == op]
        if op == "step":
            _draw_step(ax, mine)
        else:
            _draw_kernel(ax, op, [r for r in mine if r["mode"] == "fwd+bwd"], f"{op} fwd+bwd", by_series=True)
    fig.suptitle(plot_title(head), fontsize=9)
    return png_bytes(plt, fig)


def _draw_kernel(ax, op: str, rows: list[dict], title: str, by_series: bool = False) -> None:
    unit = "tflops" if any(r["tflops"] is not None for r in rows) else "gbps"
    sizes = sorted({r["size"] for r in rows})
    lines = dict.fromkeys((r["provider"], r["series"] if by_series else "") for r in rows)
    for provider, series in lines:
        points = sorted((r["size"], r[unit]) for r in rows if r["provider"] == provider
                        and (not by_series or r["series"] == series) and r[unit] is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{provider} {series}".strip())
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sizes, [str(int(x)) for x in sizes], minor=False)
    ax.minorticks_off()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(registry.spec(op).size_label if op in registry.ops() else "size")
    ax.set_ylabel("TFLOP/s" if unit == "tflops" else "GB/s")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def _draw_step(ax, rows: list[dict]) -> None:
    timed = [r for r in rows if r["tokens_per_s"] is not None]
    ax.bar([r["provider"] for r in timed], [r["tokens_per_s"] for r in timed])
    ax.set_ylabel("tokens/s")
    ax.set_title(timed[0]["shape"] if timed else "training step", fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)


_START = time.perf_counter()


def log(message: str) -> None:
    """Progress line on stderr, after the seconds since the bench started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)
