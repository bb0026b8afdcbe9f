"""The `tritongpt` command.

    tritongpt --help
    tritongpt kernels compile --arch sm_90
    tritongpt <command> --help

Each subcommand lives beside the code it drives, as a module with add_arguments(parser) and
run(args) -> exit code; only the chosen command's module is imported (so `tritongpt --help`
needs no torch). Bad input (TritonGPTError, missing files) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tritongpt.errors import TritonGPTError

# subcommand -> (module holding add_arguments and run, one-line help)
COMMANDS = {
    "kernels": ("tritongpt.kernels.cli", "list backends; AOT-compile every Triton kernel config for a GPU arch"),
    "prepare": ("tritongpt.data.cli", "tokenize a text corpus into llm.c token shards"),
    "train": ("tritongpt.train.cli", "pretrain a GPT (default: tinyshakespeare on a device-sized preset)"),
    "sample": ("tritongpt.train.sample", "stream text from a checkpoint (--ckpt) or a Hugging Face GPT-2 directory"),
    "attention-map": ("tritongpt.train.attention_map",
                      "plot attention weights (per layer/head) of a checkpoint over a text"),
    "bench": ("tritongpt.bench.cli", "benchmark every op's backends and GPT training steps"),
    "verify": ("tritongpt.bench.verify", "check every backend of every op on this device at a model's shapes"),
    "eval": ("tritongpt.train.evaluate", "multiple-choice accuracy (HellaSwag's format) of a checkpoint or HF model"),
    "export": ("tritongpt.train.export", "write a checkpoint as a Hugging Face GPT-2 directory"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="tritongpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)  # lazy: only the chosen command's module (no torch for --help)
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # the only positional before its own
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        code = args.run(args)
    except (TritonGPTError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        print(f"tritongpt {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"tritongpt {args.command}: interrupted", file=sys.stderr)
        code = 130
    distributed = sys.modules.get("tritongpt.train.distributed")  # imported only by commands that can join one
    if distributed is not None and distributed.joined_group:
        distributed.end_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
