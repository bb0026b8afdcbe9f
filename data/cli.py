"""`tritongpt prepare`: tokenize a corpus into llm.c shards (train_*.bin, val_*.bin, meta.json).

    tritongpt prepare tinyshakespeare --out data/shakespeare
    tritongpt prepare corpus.txt --out data/corpus --val-fraction 0.05
    tritongpt prepare 'docs/**/*.jsonl' --out data/docs --workers 8 --shard-tokens 100000000
    tritongpt prepare 'fineweb-edu/sample/10BT/*.parquet' --out data/edu10B   # pip install 'tritongpt[parquet]'

SOURCE is a text file (split nanoGPT's way: the first 90% of characters train, the rest val, no
end-of-text tokens), a directory or glob of .txt / .jsonl / .parquet files (field or column "text",
or --text-column; split by document,
every 10th to val, each document preceded by end-of-text), or the name tinyshakespeare (found via
TRITONGPT_ASSETS, the cache, or downloaded). Refuses to replace a non-empty --out without --force.
"""

from __future__ import annotations

import argparse
import os

from tritongpt.data.prepare import DEFAULT_SHARD_TOKENS, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="text file, directory or glob of .txt/.jsonl/.parquet files, or "
                                       "'tinyshakespeare'")
    parser.add_argument("--out", required=True, help="output directory for the shards and meta.json")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name (default gpt2, offline), or "
                                                            "hf:DIR for a Hugging Face tokenizer.json in DIR "
                                                            "(vocabularies over 65,536 get uint32 shards)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of characters / documents for val")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: the CPU count); output does not depend on it")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--text-column", default="text", help="the .jsonl field / .parquet column holding each "
                                                              "document's text (default: text)")


def run(args: argparse.Namespace) -> int:
    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   shard_tokens=args.shard_tokens, workers=args.workers, force=args.force,
                   text_column=args.text_column)
    for split in ("train", "val"):
        print(f"{split:<5} {meta['tokens'][split]:>15,} tokens in {len(meta['shards'][split])} shards")
    print(f"wrote {args.out} ({meta['tokenizer']}, vocab {meta['vocab_size']}, eot {meta['eot_id']})")
    return 0
