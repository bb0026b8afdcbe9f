"""`tritongpt kernels`: inspect the registered kernels.

    tritongpt kernels list                    # ops and their backends
    tritongpt kernels compile --arch sm_90    # AOT-compile every kernel/config, no GPU needed
    tritongpt kernels compile --arch sm_80 --filter attn
"""

from __future__ import annotations

import argparse

HELP = "list backends; AOT-compile every Triton kernel config for a GPU arch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernels_command", required=True, metavar="{list,compile}")
    sub.add_parser("list", help="ops and their registered backends", description="Ops and their registered backends.")
    comp = sub.add_parser("compile", help="compile every kernel config for an arch and report regs/smem/spills",
                          description="Compile every registered Triton kernel and autotune config for a GPU "
                                      "architecture without a GPU; exit 1 if any fails, spills, or exceeds shared memory.")
    comp.add_argument("--arch", default="sm_90", help="sm_80, sm_86, sm_89 or sm_90 (default sm_90)")
    comp.add_argument("--filter", default="", help="only kernels whose name contains this")


def run(args: argparse.Namespace) -> int:
    from tritongpt.kernels import registry
    if args.kernels_command == "list":
        for op in registry.OP_FLAGS:
            print(f"{op:<11} --{registry.OP_FLAGS[op]:<10} {', '.join(registry.backends(op))}")
        return 0
    from tritongpt.kernels import compile_report
    rows = compile_report.report(args.arch, args.filter)
    print(compile_report.format_table(rows, args.arch))
    return 0 if rows and all(r.ok for r in rows) else 1
