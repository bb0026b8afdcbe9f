"""`tritongpt kernels`: inspect the registered kernels.

    tritongpt kernels list                    # ops and their backends, and which run here
    tritongpt kernels list --markdown         # the same for any machine: README's backend table
    tritongpt kernels compile --arch sm_90    # AOT-compile every kernel/config, no GPU needed
    tritongpt kernels compile --arch sm_80 --filter attn
    tritongpt kernels compile --arch sm_90 --filter attn --emit-table   # regenerate a config table
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernels_command", required=True, metavar="{list,compile}")
    listing = sub.add_parser("list", help="ops and their registered backends",
                             description="Ops, the flag and environment variable that pick each one's backend, "
                                         "and its registered backends (with why one cannot run here).")
    listing.add_argument("--markdown", action="store_true",
                         help="a Markdown table of where each backend runs, the same on every machine")
    comp = sub.add_parser("compile", help="compile every kernel config for an arch and report regs/smem/spills",
                          description="Compile every registered Triton kernel and autotune config for a GPU "
                                      "architecture without a GPU; exit 1 if any fails, spills, or exceeds shared "
                                      "memory.")
    comp.add_argument("--arch", default="sm_90", help="sm_80, sm_86, sm_89 or sm_90 (default sm_90)")
    comp.add_argument("--filter", default="", help="only kernels whose name contains this")
    comp.add_argument("--emit-table", action="store_true",
                      help="instead of the report, compile every candidate config of the kernels that keep a "
                           "config table (e.g. attention) and record those that pass for this arch and Triton "
                           "version in the table's JSON file (kept: entries of other arches and versions)")


def run(args: argparse.Namespace) -> int:
    from tritongpt.kernels import registry  # lazy: keeps `tritongpt --help` torch-free
    if args.kernels_command == "list":
        print(_markdown(registry) if args.markdown else _listing(registry))
        return 0
    from tritongpt.kernels import compile_report  # lazy: keeps `tritongpt --help` torch-free
    if args.emit_table:
        return _emit_table(args.arch, args.filter)
    rows = compile_report.report(args.arch, args.filter)
    print(compile_report.format_table(rows, args.arch))
    return 0 if rows and all(r.ok for r in rows) else 1


def _listing(registry) -> str:
    """One line per op: its flag, its environment variable, its backends (why not, where one
    cannot run here; forward only where it runs without gradients)."""
    def backend(op: str, name: str) -> str:
        reason = registry.unusable_reason(op, name, backward=False)
        if reason is None and not registry.usable(op, name):
            reason = "forward only here"
        return name if reason is None else f"{name} ({reason})"

    rows = [(op, "--" + op.replace("_", "-"), registry.env_var(op),
             ", ".join(backend(op, n) for n in registry.backends(op))) for op in registry.ops()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3] for row in rows)


def _markdown(registry) -> str:
    """README's backend table: per op its flag and variable, per backend where it runs."""
    lines = ["| op | flag, environment variable | backend: where it runs |", "|---|---|---|"]
    for op in registry.ops():
        names = "<br>".join(f"`{n}`: {registry.where(op, n)}" for n in registry.backends(op))
        lines.append(f"| `{op}` | `--{op.replace('_', '-')}`, `{registry.env_var(op)}` | {names} |")
    lines.append(f"| every op | `--backend`, `{registry.env_var(registry.EVERY_OP)}` | a backend name for "
                 f"each op not chosen on its own; `auto` (the default): `triton` where it runs, else `torch` |")
    return "\n".join(lines)


def _emit_table(arch: str, name_filter: str) -> int:
    import triton  # lazy: keeps `tritongpt --help` torch-free

    from tritongpt.kernels import compile_report  # lazy: keeps `tritongpt --help` torch-free
    from tritongpt.progress import Progress  # lazy: keeps `tritongpt --help` fast
    progress = Progress(1, label=f"emit-table {arch}", stream=sys.stderr)

    def step(done: int, total: int) -> None:
        progress.total = total
        progress.update(done, log=done == total or done % 50 == 0)

    written = compile_report.emit_table(arch, name_filter, step)
    progress.close()
    for path, kept, compiled in written:
        print(f"# {path}: {arch}, triton {triton.__version__}: {kept} key/config entries pass ({compiled} variants "
              f"compiled)")
    return 0 if written else 1
