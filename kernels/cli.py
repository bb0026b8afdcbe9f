"""`tritongpt kernels`: inspect the registered kernels.

    tritongpt kernels list                    # ops and their backends
    tritongpt kernels compile --arch sm_90    # AOT-compile every kernel/config, no GPU needed
    tritongpt kernels compile --arch sm_80 --filter attn
"""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    from tritongpt.kernels import registry
    if args.kernels_command == "list":
        rows = [(op, "--" + op.replace("_", "-"), registry.env_var(op),
                 ", ".join(f"{n}{'' if registry.usable(op, n) else ' (not here)'}" for n in registry.backends(op)))
                for op in registry.ops()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        return 0
    from tritongpt.kernels import compile_report
    rows = compile_report.report(args.arch, args.filter)
    print(compile_report.format_table(rows, args.arch))
    return 0 if rows and all(r.ok for r in rows) else 1
