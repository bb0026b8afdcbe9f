"""Tokenizers: tiktoken encodings, GPT-2's built offline from the gpt2.tiktoken asset.

    TRITONGPT_ASSETS=../shared/data python -c \
        "from tritongpt.data.tokenizer import get_encoding; print(get_encoding('gpt2').encode_ordinary('Hello world'))"
    # [15496, 995]
"""

from __future__ import annotations

import functools

import tiktoken
import tiktoken.load

from tritongpt.data.assets import ASSETS, find_asset
from tritongpt.errors import TritonGPTError

try:  # the pattern tiktoken itself uses for GPT-2 / r50k, tuned to its regex engine
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN
except ImportError:  # GPT-2's original split pattern (equivalent)
    GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT = 50256
UINT16_LIMIT = 1 << 16


@functools.cache
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """The tiktoken encoding `name`; "gpt2" comes from the gpt2.tiktoken asset, without network."""
    if name == "gpt2":
        path = find_asset("gpt2.tiktoken")
        try:
            ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=ASSETS["gpt2.tiktoken"].sha256)
        except ValueError as exc:
            raise TritonGPTError(f"{path} is not GPT-2's gpt2.tiktoken ranks file "
                                 f"(sha256 {ASSETS['gpt2.tiktoken'].sha256}): {exc}") from None
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: GPT2_EOT}, explicit_n_vocab=GPT2_EOT + 1)
    if name not in tiktoken.list_encoding_names():
        raise TritonGPTError(f"unknown tokenizer {name!r}; choose from {', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken downloads other encodings' ranks; any failure there is the user's network
        raise TritonGPTError(f"could not load tiktoken encoding {name!r} (tiktoken downloads it on first use; "
                             f"check the network or TIKTOKEN_CACHE_DIR): {type(exc).__name__}: {exc}") from None


def check_fits_uint16(encoding: tiktoken.Encoding) -> None:
    """Shards store uint16 token ids: refuse encodings whose ids reach 65536."""
    if encoding.n_vocab > UINT16_LIMIT:
        raise TritonGPTError(f"tokenizer {encoding.name!r} has {encoding.n_vocab} tokens; uint16 shards hold ids "
                             f"below {UINT16_LIMIT}, so it cannot be used (pick one with a vocabulary of at most "
                             f"65536)")
