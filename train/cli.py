"""`tritongpt train`: pretrain a GPT on token shards.

    tritongpt train                                       # tinyshakespeare, preset for the device, OUT=out/
    tritongpt sample --ckpt out/ --prompt "ROMEO:"        # continue the run's model
    tritongpt train --preset small --max-steps 2000 --out runs/small
    tritongpt train --config run.toml --lr 3e-4           # flags override the TOML file
    tritongpt train --out runs/small --resume --max-steps 4000
    torchrun --standalone --nproc_per_node=8 -m tritongpt.cli train --preset gpt2 --data DIR --out runs/gpt2

Settings resolve as defaults < --preset < --config TOML < flags. Every field of TrainConfig (run
settings) and GPTConfig (the model) is a flag below and a TOML key (underscores: n_layer = 4).
Boolean flags alone mean true (--compile); give false to turn one off (--bias false). Optional
values take `none`. OUT receives config.json, metrics.jsonl, ckpt_*.pt and loss.png.
The environment variables listed at the end (one per op a model can call, and TRITONGPT_BACKEND)
choose backends that no flag or file sets (a per-op variable beats --backend); a model uses those
of the ops it calls (the norm of --normalization, the MLP of --ffn) and ignores the others.
"""

from __future__ import annotations

import argparse
import os
import textwrap

from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS
from tritongpt.train import config, trainer
from tritongpt.train.checkpoint import LEGACY_KEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # --warmup is not --warmup-steps: every key is spelled out
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (same keys as the flags)")
    run = parser.add_argument_group("run settings (TrainConfig)")
    model = parser.add_argument_group("model settings (GPTConfig)")
    for group, names in ((run, config.RUN_FIELDS), (model, config.MODEL_FIELDS)):
        for name in names:
            extra = dict(nargs="?", const="true") if config.is_bool(name) else {}
            group.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                               metavar=config.metavar(name), help=config.help_text(name), **extra)
    for old, name in LEGACY_KEYS.items():  # old spellings still work, unlisted
        parser.add_argument("--" + old.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    # the variables config.resolve reads: one per op a model can call (MODEL_OPS), then TRITONGPT_BACKEND
    names = ", ".join(registry.env_var(name) for name in (*MODEL_OPS, registry.EVERY_OP))
    parser.epilog = textwrap.fill("environment variables: " + names, width=100)


def flags_of(args: argparse.Namespace) -> dict[str, str]:
    """The config fields given on the command line, as typed."""
    return {k: v for k, v in vars(args).items() if k in config.RUN_FIELDS or k in config.MODEL_FIELDS}


def run(args: argparse.Namespace) -> int:
    return trainer.train(config.configure(flags_of(args), args.config, env=os.environ))
