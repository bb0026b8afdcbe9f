"""`tritongpt bench`: kernel and training-step benchmarks.

    tritongpt bench all                           # every kernel sweep + the GPT-2 step, bf16, on the GPU
    tritongpt bench attention --dtype fp16        # one op (`tritongpt kernels list` shows them)
    tritongpt bench step --preset gpt2-medium --batch-size 8 --seq-len 1024
    tritongpt bench step --doc-mask --seq-len 8192 --batch-size 2   # packed documents
    tritongpt bench step --ranks 2                # + DDP and FSDP rows over 2 processes (bench/step_parallel.py)
    tritongpt bench all --quick --out /tmp/bench  # tiny shapes and the tiny preset: CPU / CI
    tritongpt bench report --budget 480           # a GPU's whole report in 8 minutes (bench/report.py)
    tritongpt bench converge --quick              # AdamW vs Muon: steps and time to a val loss (bench/converge.py)
    python -m pytest bench/suite --benchmark-only # the same kernels under pytest-benchmark

Prints a table on stdout (progress goes to stderr) and writes OUT/<device>_<date>.json (OUT:
./bench-results in the working directory; a header object and the rows), .csv (the same rows)
and one PNG per op when matplotlib is installed. On a CPU the times are CPU times, and Triton kernels run only under the
interpreter (`TRITON_INTERPRET=1 tritongpt bench all --quick`), checked for correctness and
never timed. Exits 1 when a row is flagged (error above tolerance, losses disagree).
"""

from __future__ import annotations

import argparse
import functools
import typing
from pathlib import Path

import torch

from tritongpt.bench import converge, report, step, step_parallel, sweeps, tables
from tritongpt.bench.tables import DEFAULT_OUT
from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.kernels.measure import Timer
from tritongpt.kernels.spec import DTYPES
from tritongpt.model.config import check_preset
from tritongpt.train.optim import Optimizer

# step defaults: (full, --quick)
STEP_DEFAULTS = {"preset": ("gpt2", "tiny"), "batch_size": (16, 2), "seq_len": (1024, 32), "steps": (10, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=(*registry.ops(), "step", "all", "report", "converge"),
                        help="an op, the training step, all of them, the GPU report, or time to a val loss "
                             "per optimizer (see below)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="input / autocast dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, short timings and the tiny preset: for the CPU and CI")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for the result files (default {DEFAULT_OUT}; report: "
                             f"{DEFAULT_OUT}/report_<device>_<date>)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="report: seconds the whole report may take, compilation included (default 480)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out torch.compile providers and combinations (slow to compile on a CPU)")
    parser.add_argument("--preset", default=None, help="step: model preset (default gpt2; --quick: tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="step: batch size (default 16; --quick: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="step: sequence length (default 1024; --quick: 32)")
    parser.add_argument("--steps", type=int, default=None,
                        help="step: timed training steps, after warm-up steps until the step time is steady "
                             "(default 10; --quick: 2)")
    parser.add_argument("--doc-mask", action="store_true",
                        help="step: packed documents, attention kept inside each (sdpa: dense mask; flex: block mask)")
    parser.add_argument("--ranks", type=int, default=0,
                        help="step: also train the baseline under DDP and FSDP over this many processes "
                             "(torchrun; >= 2, dividing the batch size; default 0: no such rows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every input and model")
    parser.add_argument("--optimizers", nargs="+", choices=typing.get_args(Optimizer), default=["adamw", "muon"],
                        help="converge: the optimizers compared, the first one setting the default target "
                             "(default: adamw muon)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="converge: optimizer steps per run (default: the preset's; --quick: 200)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="converge: evaluate every this many steps (default: the preset's; --quick: 10)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="converge: the val loss to reach (default: the first optimizer's final val loss)")
    parser.add_argument("--data", default=None, help="converge: shard dir (default: tinyshakespeare)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="converge: a `tritongpt train` setting for every run (repeatable), e.g. muon_lr=0.05")


def _resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Fill the defaults that depend on the device and --quick; raise on bad input."""
    device = sweeps.pick_device(args.device)
    args.device = device.type
    args.dtype = args.dtype or next(k for k, v in DTYPES.items() if v == sweeps.default_dtype(device))
    for name, (full, quick) in STEP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise TritonGPTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise TritonGPTError(f"--out {args.out} exists and is not a directory")
    if args.budget <= 0:
        raise TritonGPTError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.target in ("step", "all"):
        check_preset(args.preset)
    if args.ranks and args.target not in ("step", "all"):
        raise TritonGPTError(f"--ranks applies to the training step (step, all), not to {args.target}")
    if args.ranks:  # before the ceilings are measured: nothing runs on bad input
        step_parallel.check_ranks(args.ranks, args.batch_size, device)
    return device, DTYPES[args.dtype]


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, defaults made explicit."""
    parts = ["tritongpt bench", args.target, f"--dtype {args.dtype}", f"--device {args.device}",
             f"--seed {args.seed}"]
    parts += ["--quick"] * args.quick + ["--no-compile"] * (not args.compile)
    if args.target in ("step", "all"):
        parts += [f"--preset {args.preset}", f"--batch-size {args.batch_size}", f"--seq-len {args.seq_len}",
                  f"--steps {args.steps}"] + ["--doc-mask"] * args.doc_mask
        parts += [f"--ranks {args.ranks}"] * bool(args.ranks)
    return " ".join(parts)


def collect(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Run the benchmarks `args` ask for; returns (header, rows)."""
    device, dtype = _resolve(args)
    log = tables.log
    timer = Timer(device, args.quick)
    if device.type == "cpu":
        log("running on the CPU: times are CPU times" + ("" if args.quick else " (without --quick this takes long)"))
    log(f"measuring ceilings on {tables.device_name(device)} ...")
    ceiling = sweeps.ceilings(device, dtype, timer)
    rows, skipped = [], []
    ops = registry.ops() if args.target == "all" else [args.target] if args.target in registry.ops() else []
    for op in ops:
        op_rows, op_skipped = sweeps.run_op(op, device=device, dtype=dtype, quick=args.quick, timer=timer,
                                            ceiling=ceiling, compile=args.compile, seed=args.seed, log=log)
        rows += op_rows
        skipped += op_skipped
    if args.target in ("step", "all"):
        settings = dict(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, device=device,
                        dtype=dtype, steps=args.steps, warmup=1, seed=args.seed, log=log, doc_mask=args.doc_mask)
        # --ranks: the DDP and FSDP rows of the same settings, compared with the baseline with the others
        parallel = functools.partial(step_parallel.parallel_rows, args.ranks, **settings) if args.ranks else None
        rows += step.run_step(**settings, ceiling=ceiling, compile=args.compile, more_rows=parallel)
    head = tables.header(device, dtype, quick=args.quick, command=_command(args), timer=timer.description,
                         ceilings=ceiling, skipped=skipped, ref_dtype=sweeps.reference_dtype(dtype, device),
                         interpreter=registry.interpreting())
    return head, rows


def run(args: argparse.Namespace) -> int:
    if args.target == "converge":
        return converge.run(args, sweeps.pick_device(args.device))
    if args.target == "report":
        return report.run(args, *_resolve(args))
    head, rows = collect(args)
    print(tables.format_table(head, rows))
    for path in tables.write(args.out or DEFAULT_OUT, head, rows):
        print(f"wrote {path}")
    flagged = [r for r in rows if sweeps.FLAG in r["note"] or step.LOSS_FLAG in r["note"]]
    for r in flagged:
        print(f"FLAGGED: {r['op']} {r['provider']} {r['mode']} {r['shape']}: {r['note']}")
    return 1 if flagged else 0
