"""Tokenizers: tiktoken encodings (GPT-2's built offline from the gpt2.tiktoken asset) and
Hugging Face tokenizers (a directory's tokenizer.json, through the `tokenizers` library).

    TRITONGPT_ASSETS=../shared/data python -c \
        "from tritongpt.data.tokenizer import get_encoding; print(get_encoding('gpt2').encode_ordinary('Hello world'))"
    # [15496, 995]
    get_encoding("hf:path/to/SmolLM2-135M")   # its tokenizer.json; `tritongpt prepare --tokenizer hf:DIR`

A name is what `prepare` records in meta.json and training in each checkpoint, so `train` and
`sample` use the tokenizer the shards were made with. An HF tokenizer's name is "hf:" and the
absolute directory. It answers the part of tiktoken's Encoding this project calls (HFEncoding):
encode_ordinary (special tokens' text is plain text), encode(allowed_special="all"), decode,
decode_single_token_bytes (for streaming), eot_token and n_vocab. Its end-of-text token is the
eos_token of tokenizer_config.json when the directory has one, else the first of EOT_CANDIDATES
in its vocabulary. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

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
HF_PREFIX = "hf:"
# end-of-text tokens of common HF tokenizers (GPT-2 / SmolLM, Llama 3, Llama 2 / Mistral, Gemma)
EOT_CANDIDATES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


@functools.cache
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding | HFEncoding:
    """The tokenizer `name`: a tiktoken encoding ("gpt2" from the gpt2.tiktoken asset, without
    network) or "hf:DIR", the Hugging Face tokenizer.json in DIR."""
    if name.startswith(HF_PREFIX):
        return HFEncoding(Path(name.removeprefix(HF_PREFIX)).expanduser())
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


def tokenizer_name(name: str) -> str:
    """The name to record for tokenizer `name`: "hf:" names with their directory made absolute."""
    if name.startswith(HF_PREFIX):
        return HF_PREFIX + str(Path(name.removeprefix(HF_PREFIX)).expanduser().resolve())
    return name


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet inverted: the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {chr(b if b in printable else next(extra)): b for b in range(256)}


class HFEncoding:
    """A Hugging Face tokenizer (tokenizer.json in `directory`) with tiktoken's Encoding methods
    that this project calls."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer  # lazy: the optional hf extra

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TritonGPTError(f"tokenizer hf:{directory}: {path} not found (a Hugging Face tokenizer directory "
                                 f"holds tokenizer.json)")
        self.name = HF_PREFIX + str(directory.resolve())
        self._tokenizer = Tokenizer.from_file(str(path))
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_token = self._end_of_text(directory)
        spec = json.loads(path.read_text())
        decoders = spec.get("decoder") or {}
        kinds = {d.get("type") for d in decoders.get("decoders", [decoders])}
        self._byte_level = "ByteLevel" in kinds  # GPT-2-style: each token's characters stand for bytes
        self._bytes = _byte_decoder() if self._byte_level else {}
        self._added = set(self._tokenizer.get_added_tokens_decoder())  # ids of added (special) tokens

    def _end_of_text(self, directory: Path) -> int:
        config = directory / "tokenizer_config.json"
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        for token in ([eos] if eos else []) + list(EOT_CANDIDATES):
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        raise TritonGPTError(f"tokenizer {self.name}: no end-of-text token (no eos_token in tokenizer_config.json "
                             f"and none of {', '.join(EOT_CANDIDATES)} in its vocabulary)")

    def encode_ordinary(self, text: str) -> list[int]:
        """The ids of `text`, special tokens' text encoded as plain text, no BOS/EOS added."""
        self._tokenizer.encode_special_tokens = True
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, allowed_special: str = "all") -> list[int]:
        """The ids of `text`, special tokens' text as the special tokens (allowed_special="all" only)."""
        if allowed_special != "all":
            raise TritonGPTError(f"tokenizer {self.name}: encode supports allowed_special='all' only")
        self._tokenizer.encode_special_tokens = False
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes token `token` stands for: byte-level tokens by GPT-2's alphabet, byte-fallback
        tokens (<0x0A>) as their byte, SentencePiece's word marker as a space, else its UTF-8 text."""
        piece = self._tokenizer.id_to_token(token)
        if piece is None:
            raise TritonGPTError(f"tokenizer {self.name}: token id {token} is outside its {self.n_vocab} tokens")
        if token in self._added:
            return piece.encode()
        if self._byte_level:
            return bytes(self._bytes[c] for c in piece) if all(c in self._bytes for c in piece) else piece.encode()
        if match := BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
