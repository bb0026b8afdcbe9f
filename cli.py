"""The `tritongpt` command.

    tritongpt --help
    tritongpt kernels compile --arch sm_90
    tritongpt <command> --help

Each subcommand lives beside the code it drives, as a module with HELP, add_arguments(parser)
and run(args) -> exit code. Bad input (TritonGPTError, missing files) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tritongpt.errors import TritonGPTError

# subcommand -> module holding HELP, add_arguments, run
COMMANDS = {
    "kernels": "tritongpt.kernels.cli",
    "prepare": "tritongpt.data.cli",
    "train": "tritongpt.train.cli",
    "sample": "tritongpt.train.sample",
    "attention-map": "tritongpt.model.cli",
    "bench": "tritongpt.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritongpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TritonGPTError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        print(f"tritongpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tritongpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
