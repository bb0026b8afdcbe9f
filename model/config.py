"""GPTConfig: the shape of a GPT and the backend choice of each op, plus named presets.

    from tritongpt.model.config import GPTConfig
    config = GPTConfig.from_preset("gpt2")                       # GPT-2 124M
    config = GPTConfig.from_preset("tiny", pos_embedding="rope")  # a CPU-sized model
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tritongpt.errors import TritonGPTError, require
from tritongpt.kernels.spec import ModelShape

POS_EMBEDDINGS = ("learned", "sinusoidal", "rope")
MODEL_OPS = ("attention", "layer_norm", "mlp", "linear_cross_entropy")  # the registry ops a GPT calls: each a field


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 tokens padded to a multiple of 64
    real_vocab_size: int = 50257  # ids >= this are padding rows, never predicted or sampled
    block_size: int = 1024  # longest sequence (positions) the model accepts
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    n_embd: int = 768  # model width; head_dim = n_embd // n_head
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    dropout: float = 0.0  # dropout on embeddings and on each sublayer's output (not on attention probs)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True)
    pos_embedding: str = "learned"  # "learned" (GPT-2 wpe), "sinusoidal" (fixed), or "rope" (rotary on q, k)
    window: int | None = None  # sliding-window attention: each query sees this many keys (incl. itself)
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding (GPT-2: True)
    label_smoothing: float = 0.0  # label smoothing of the training loss
    rope_base: float = 10000.0  # RoPE frequency base (pos_embedding="rope" only)
    attention: str | None = None  # attention backend (registry name or "auto"); None: `backend`
    layer_norm: str | None = None  # LayerNorm backend; None: `backend`
    mlp: str | None = None  # MLP backend; None: `backend`
    linear_cross_entropy: str | None = None  # backend of lm_head + the training loss, fused; None: `backend`
    backend: str | None = None  # backend of every op left None (registry name or "auto"); None: auto

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is None (plain multi-head attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def shape(self, batch: int, seq_len: int | None = None) -> ModelShape:
        """The sizes this model calls its ops at for (batch, seq_len) tokens (seq_len: block_size)."""
        return ModelShape(batch=batch, seq_len=seq_len or self.block_size, n_embd=self.n_embd, n_head=self.n_head,
                          n_kv_head=self.kv_heads, hidden=self.mlp_ratio * self.n_embd,
                          vocab=self.real_vocab_size, vocab_padded=self.vocab_size)

    def validate(self) -> None:
        """Raise TritonGPTError naming the first inconsistent field."""
        for name in ("vocab_size", "real_vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"GPTConfig: {name} must be an int >= 1, got {value!r}")
        require(self.real_vocab_size <= self.vocab_size,
                f"GPTConfig: real_vocab_size ({self.real_vocab_size}) must be <= vocab_size ({self.vocab_size})")
        require(self.n_embd % self.n_head == 0,
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        require(self.n_kv_head is None or (isinstance(self.n_kv_head, int) and self.n_kv_head >= 1),
                f"GPTConfig: n_kv_head must be None or an int >= 1, got {self.n_kv_head!r}")
        require(self.n_head % self.kv_heads == 0,
                f"GPTConfig: n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        require(self.pos_embedding in POS_EMBEDDINGS,
                f"GPTConfig: pos_embedding must be one of {', '.join(POS_EMBEDDINGS)}, got {self.pos_embedding!r}")
        require(self.pos_embedding != "rope" or self.head_dim % 2 == 0,
                f"GPTConfig: pos_embedding='rope' needs an even head dim, got n_embd // n_head = {self.head_dim}")
        require(self.pos_embedding != "sinusoidal" or self.n_embd % 2 == 0,
                f"GPTConfig: pos_embedding='sinusoidal' needs an even n_embd, got {self.n_embd}")
        require(self.rope_base > 0, f"GPTConfig: rope_base must be > 0, got {self.rope_base!r}")
        require(self.window is None or (isinstance(self.window, int) and self.window >= 1),
                f"GPTConfig: window must be None or an int >= 1, got {self.window!r}")
        require(0.0 <= self.dropout < 1.0, f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        require(0.0 <= self.label_smoothing < 1.0,
                f"GPTConfig: label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """The preset `name` (see PRESETS) with some fields replaced."""
        check_preset(name)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TritonGPTError(f"unknown GPTConfig field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        return cls(**{**PRESETS[name], **overrides})


# name -> GPTConfig fields. GPT-2 sizes as in the paper / Hugging Face checkpoints (1024
# positions); "tiny" and "small" are CPU-sized: tiny has ~0.2M parameters in its blocks (plus
# 3.2M in the tied 50304-row embedding) and trains at block 64 on two CPU cores in a minute;
# small has ~2.7M in its blocks (plus 9.7M embedding).
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=64, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
}


def check_preset(name: str) -> None:
    """Raise TritonGPTError unless `name` is one of PRESETS."""
    require(name in PRESETS, f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
