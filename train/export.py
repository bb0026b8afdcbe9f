"""`tritongpt export`: a checkpoint as a Hugging Face GPT-2 directory.

    tritongpt export --ckpt out/ --hf exported/shakespeare
    tritongpt export --ckpt out/ckpt_0000300.pt --hf exported/shakespeare --overwrite

It writes config.json + model.safetensors, which `transformers.GPT2LMHeadModel.from_pretrained`
loads with the same logits.
Models GPT-2's format cannot express (RoPE or sinusoidal positions, grouped-query attention,
sliding windows, no biases) are refused with the reason, before anything is written. The
directory is built beside its target and renamed into place; an existing one is replaced only
with --overwrite.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="PATH", help="run directory (its newest checkpoint) or a "
                                                                       "ckpt_*.pt file")
    parser.add_argument("--hf", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from tritongpt.model.hf import save_hf  # lazy: imports torch; `tritongpt export --help` stays free of it
    from tritongpt.train import checkpoint  # lazy: imports torch, as above

    model, _ = checkpoint.load_model(args.ckpt, "cpu", backend="torch")
    out = save_hf(model, args.hf, overwrite=args.overwrite)
    print(f"wrote {out} (config.json, model.safetensors): {model.num_params() / 1e6:.2f}M parameters, "
          f"GPT2LMHeadModel.from_pretrained({str(out)!r}) loads it")
    return 0
