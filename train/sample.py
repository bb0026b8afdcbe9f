"""`tritongpt sample`: stream text from a trained checkpoint or a Hugging Face GPT-2 directory.

    tritongpt sample --ckpt out/ --prompt "ROMEO:" --max-new-tokens 200
    tritongpt sample --ckpt out/ckpt_0000500.pt --temperature 0 --max-new-tokens 50   # greedy
    tritongpt sample --hf path/to/gpt2 --prompt "Hello, I'm a language model," --top-p 0.9
    tritongpt sample --hf path/to/SmolLM2-135M --prompt "Gravity is"    # a Llama, its tokenizer.json

Tokens are printed as they are generated. A token can end in the middle of a UTF-8 character
(GPT-2's byte-level BPE); its bytes wait until the character is complete.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tritongpt.data.tokenizer import get_encoding
from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS
from tritongpt.model.hf import load_hf
from tritongpt.train import checkpoint
from tritongpt.train.distributed import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="PATH", help="run directory (its newest checkpoint) or a ckpt_*.pt file")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face GPT-2 or Llama directory (config.json + weights)")
    parser.add_argument("--tokenizer", metavar="NAME", help="gpt2 (tiktoken) or hf:DIR (a tokenizer.json); default: "
                                                            "the checkpoint's, or for --hf the directory's "
                                                            "tokenizer.json if it has one, else gpt2")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens (default 200)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.9 (default off)")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed (default 1337)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_backend_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    backends = backend_choices(args)
    if args.ckpt:
        ckpt = checkpoint.load(args.ckpt, "cpu")
        model = checkpoint.model_from(ckpt, device, source=args.ckpt, **backends)
        enc = get_encoding(args.tokenizer or ckpt.get("tokenizer", "gpt2"))
    else:
        model = load_hf(args.hf, **backends).to(device).eval()
        own = f"hf:{args.hf}" if (Path(args.hf) / "tokenizer.json").is_file() else "gpt2"
        enc = get_encoding(args.tokenizer or own)
    prompt = enc.encode(args.prompt, allowed_special="all") if args.prompt else [enc.eot_token]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    tokens = model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, generator=generator)
    for piece in stream_text(enc, tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--attention, --layer-norm, --mlp and --backend: the kernels to run a loaded model with."""
    for op in MODEL_OPS:
        parser.add_argument(f"--{op.replace('_', '-')}", dest=op, default=None,
                            help=f"{op} backend (default: auto for the device, or TRITONGPT_{op.upper()})")
    parser.add_argument("--norm", dest="layer_norm", help=argparse.SUPPRESS)  # the old name of --layer-norm
    parser.add_argument("--backend", default=None, help="backend of every op not given (default: auto, or "
                                                        "TRITONGPT_BACKEND)")


def backend_choices(args: argparse.Namespace) -> dict[str, str]:
    """{op or "backend": name} from the flags, then the TRITONGPT_* variables (the command line's edge)."""
    given = {k: getattr(args, k) for k in (*MODEL_OPS, registry.EVERY_OP) if getattr(args, k)}
    from_env = {k: v for k, v in registry.env_choices(os.environ).items() if k in (*MODEL_OPS, registry.EVERY_OP)}
    return {**from_env, **given}


def stream_text(enc, tokens: Iterable) -> Iterator[str]:
    """The text of a stream of tokens (ints or 1-element tensors), piece by piece as they come.
    A token that ends inside a UTF-8 character yields nothing until the character is complete."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        if piece := decoder.decode(enc.decode_single_token_bytes(int(token))):
            yield piece
    if tail := decoder.decode(b"", final=True):
        yield tail
