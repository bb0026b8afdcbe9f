"""`tritongpt kernels`: inspect the registered kernels.

    tritongpt kernels list                    # ops and their backends
    tritongpt kernels compile --arch sm_90    # AOT-compile every kernel/config, no GPU needed
    tritongpt kernels compile --arch sm_80 --filter attn
    tritongpt kernels compile --arch sm_90 --filter attn --emit-table   # regenerate a config table
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernels_command", required=True, metavar="{list,compile}")
    sub.add_parser("list", help="ops and their registered backends",
                   description="Ops, the flag and environment variable that pick each one's backend, and its "
                               "registered backends ('not here': needs a GPU this machine lacks).")
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
        rows = [(op, "--" + op.replace("_", "-"), registry.env_var(op),
                 ", ".join(f"{n}{'' if registry.usable(op, n) else ' (not here)'}" for n in registry.backends(op)))
                for op in registry.ops()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        return 0
    from tritongpt.kernels import compile_report  # lazy: keeps `tritongpt --help` torch-free
    if args.emit_table:
        return _emit_table(args.arch, args.filter)
    rows = compile_report.report(args.arch, args.filter)
    print(compile_report.format_table(rows, args.arch))
    return 0 if rows and all(r.ok for r in rows) else 1


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
