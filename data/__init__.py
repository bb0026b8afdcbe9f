"""tritongpt.data: named assets, tiktoken tokenizers, llm.c token shards, corpus preparation and
the ShardLoader.

    tritongpt prepare tinyshakespeare --out data/shakespeare
    python -c "from tritongpt.data import ShardLoader; print(ShardLoader('data/shakespeare', 'val', 8, 256, sequential=True).num_tokens)"

meta.json (written by `tritongpt prepare`, exposed as ShardLoader.meta): tokenizer, vocab_size
(the tokenizer's n_vocab), eot_id, tokens {train, val}, shards {train: [...], val: [...]},
split_rule ("characters" or "documents"), val_fraction, eot_separators, shard_tokens, files,
source, format, and documents {train, val} for document corpora.
"""

__all__ = ["ShardLoader"]


def __getattr__(name: str):
    # imported on first use, so tokenizer worker processes (which import tritongpt.data.prepare)
    # do not pay for importing torch
    if name == "ShardLoader":
        from tritongpt.data.loader import ShardLoader
        return ShardLoader
    raise AttributeError(f"module 'tritongpt.data' has no attribute {name!r}")
