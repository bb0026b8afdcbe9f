"""`tritongpt export`: a checkpoint as a Hugging Face GPT-2 or Llama directory, or a sharded one as a file.

    tritongpt export --ckpt out/ --hf exported/shakespeare
    tritongpt export --ckpt out/ckpt_0000300.pt --hf exported/shakespeare --overwrite
    tritongpt export --ckpt out/ckpt_0000300 --consolidate ckpt_0000300.pt   # a --parallel fsdp checkpoint

It writes config.json + model.safetensors, which `transformers.GPT2LMHeadModel.from_pretrained`
(a LayerNorm + GELU model) or `transformers.LlamaForCausalLM.from_pretrained` (an RMSNorm +
SwiGLU + RoPE model, e.g. --preset llama-tiny) loads with the same logits.
Models the family's format cannot express (for GPT-2: RoPE or sinusoidal positions, grouped-query
attention, no biases; for Llama: biases, learned positions; for both: sliding windows) are
refused with the reason, before anything is written. The
directory is built beside its target and renamed into place; an existing one is replaced only
with --overwrite.
--consolidate writes a sharded (DCP) checkpoint directory as one single-file checkpoint (full
tensors; `sample`, `eval`, `export --hf` and a non-FSDP `train --resume` read it), atomically.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="PATH", help="run directory (its newest checkpoint) or a "
                                                                       "ckpt_*.pt file")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--hf", metavar="DIR", help="Hugging Face directory to write")
    target.add_argument("--consolidate", metavar="FILE.pt", help="write the checkpoint (e.g. a sharded ckpt_N "
                                                                 "directory of --parallel fsdp) as one file")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from tritongpt.model.hf import family_of, save_hf  # lazy: imports torch; `tritongpt export --help` stays free of it
    from tritongpt.train import checkpoint  # lazy: imports torch, as above

    if args.consolidate:
        path = checkpoint.write_file(args.consolidate, checkpoint.load(args.ckpt, "cpu"), overwrite=args.overwrite)
        print(f"wrote {path}")
        return 0
    model, _ = checkpoint.load_model(args.ckpt, "cpu", backend="torch")
    out = save_hf(model, args.hf, overwrite=args.overwrite)
    architecture = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family_of(model.config)]
    print(f"wrote {out} (config.json, model.safetensors): {model.num_params() / 1e6:.2f}M parameters, "
          f"{architecture}.from_pretrained({str(out)!r}) loads it")
    return 0
