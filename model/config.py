"""GPTConfig: the shape of a GPT and the backend choice of each op, plus named presets.

    from tritongpt.model.config import GPTConfig
    config = GPTConfig.from_preset("gpt2")                       # GPT-2 124M
    config = GPTConfig.from_preset("tiny", pos_embedding="rope")  # a CPU-sized model
    config = GPTConfig.from_preset("llama-tiny")                  # RMSNorm, SwiGLU, RoPE, GQA, no biases
    config.ops                                                    # the registry ops this model calls

Two fields choose the block's form: `normalization` (LayerNorm or RMSNorm) and `ffn` (GPT-2's
GELU MLP or Llama's SwiGLU). Each form is its own registry op with its own backend field, so
MODEL_OPS lists six ops while a model calls four of them (`ops`); the fields of the others are
kept but unused. The defaults are GPT-2's, so a config without these fields is a GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tritongpt.errors import TritonGPTError, require
from tritongpt.kernels.spec import ModelShape

POS_EMBEDDINGS = ("learned", "sinusoidal", "rope")
# the registry ops a GPT can call, each a backend field; a model calls the four of `GPTConfig.ops`
MODEL_OPS = ("attention", "layer_norm", "rms_norm", "mlp", "swiglu_mlp", "linear_cross_entropy")
NORM_OPS = {"layernorm": "layer_norm", "rmsnorm": "rms_norm"}  # normalization -> the op its norms call
FFN_OPS = {"gelu": "mlp", "swiglu": "swiglu_mlp"}  # ffn -> the op its MLPs call


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 tokens padded to a multiple of 64
    real_vocab_size: int = 50257  # ids >= this are padding rows, never predicted or sampled
    block_size: int = 1024  # longest sequence (positions) the model accepts
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    n_embd: int = 768  # model width; head_dim = n_embd // n_head
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd, unless ffn_hidden is set
    ffn_hidden: int | None = None  # MLP hidden width (Llama's intermediate_size); None: mlp_ratio * n_embd
    normalization: str = "layernorm"  # "layernorm" (GPT-2: weight, bias) or "rmsnorm" (Llama: weight only)
    ffn: str = "gelu"  # "gelu" (GPT-2: c_proj(gelu_tanh(c_fc(x)))) or "swiglu" (Llama: down(silu(gate x) * up x))
    norm_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm (GPT-2 and SmolLM2: 1e-5)
    dropout: float = 0.0  # dropout on embeddings and on each sublayer's output (not on attention probs)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True); RMSNorm and SwiGLU have none
    pos_embedding: str = "learned"  # "learned" (GPT-2 wpe), "sinusoidal" (fixed), or "rope" (rotary on q, k)
    window: int | None = None  # sliding-window attention: each query sees this many keys (incl. itself)
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding (GPT-2: True)
    label_smoothing: float = 0.0  # label smoothing of the training loss
    rope_base: float = 10000.0  # RoPE frequency base (pos_embedding="rope" only)
    attention: str | None = None  # attention backend (registry name or "auto"); None: `backend`
    layer_norm: str | None = None  # LayerNorm backend (normalization="layernorm"); None: `backend`
    rms_norm: str | None = None  # RMSNorm backend (normalization="rmsnorm"); None: `backend`
    mlp: str | None = None  # GELU MLP backend (ffn="gelu"); None: `backend`
    swiglu_mlp: str | None = None  # SwiGLU MLP backend (ffn="swiglu"); None: `backend`
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

    @property
    def hidden(self) -> int:
        """The MLP's hidden width: ffn_hidden, or mlp_ratio * n_embd when it is None."""
        return self.mlp_ratio * self.n_embd if self.ffn_hidden is None else self.ffn_hidden

    @property
    def ops(self) -> tuple[str, ...]:
        """The registry ops this model calls, in MODEL_OPS order: attention, its norm's op, its
        MLP's op and linear_cross_entropy."""
        called = {"attention", NORM_OPS[self.normalization], FFN_OPS[self.ffn], "linear_cross_entropy"}
        return tuple(op for op in MODEL_OPS if op in called)

    def shape(self, batch: int, seq_len: int | None = None) -> ModelShape:
        """The sizes this model calls its ops at for (batch, seq_len) tokens (seq_len: block_size)."""
        return ModelShape(batch=batch, seq_len=seq_len or self.block_size, n_embd=self.n_embd, n_head=self.n_head,
                          n_kv_head=self.kv_heads, hidden=self.hidden, vocab=self.real_vocab_size,
                          vocab_padded=self.vocab_size)

    def validate(self) -> None:
        """Raise TritonGPTError naming the first inconsistent field."""
        for name in ("vocab_size", "real_vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"GPTConfig: {name} must be an int >= 1, got {value!r}")
        require(self.real_vocab_size <= self.vocab_size,
                f"GPTConfig: real_vocab_size ({self.real_vocab_size}) must be <= vocab_size ({self.vocab_size})")
        require(self.n_embd % self.n_head == 0,
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        require(self.ffn_hidden is None or (isinstance(self.ffn_hidden, int) and self.ffn_hidden >= 1),
                f"GPTConfig: ffn_hidden must be None or an int >= 1, got {self.ffn_hidden!r}")
        require(self.normalization in NORM_OPS,
                f"GPTConfig: normalization must be one of {', '.join(NORM_OPS)}, got {self.normalization!r}")
        require(self.ffn in FFN_OPS, f"GPTConfig: ffn must be one of {', '.join(FFN_OPS)}, got {self.ffn!r}")
        require(self.ffn != "swiglu" or not self.bias,
                "GPTConfig: ffn='swiglu' has no biases (the swiglu_mlp op takes none); set bias=False")
        require(self.norm_eps > 0, f"GPTConfig: norm_eps must be > 0, got {self.norm_eps!r}")
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


# The Llama form: pre-norm RMSNorm blocks, SwiGLU MLP, rotary positions, no biases.
LLAMA = dict(normalization="rmsnorm", ffn="swiglu", pos_embedding="rope", bias=False)

# name -> GPTConfig fields. GPT-2 sizes as in the paper / Hugging Face checkpoints (1024
# positions); "tiny" and "small" are CPU-sized: tiny has ~0.2M parameters in its blocks (plus
# 3.2M in the tied 50304-row embedding) and trains at block 64 on two CPU cores in a minute;
# small has ~2.7M in its blocks (plus 9.7M embedding). "llama-tiny" is tiny in the Llama form
# (2 KV heads, SwiGLU hidden 176 ~ 8/3 * 64 as Llama sizes it), about as many parameters and as fast.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=64, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
    "llama-tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=176, block_size=64, **LLAMA),
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json: num_hidden_layers 30, hidden_size 576,
    # num_attention_heads 9, num_key_value_heads 3, intermediate_size 1536, vocab_size 49152,
    # rms_norm_eps 1e-5, rope_theta 100000, tie_word_embeddings true, max_position_embeddings 8192).
    # SmolLM (v1)-135M has the same shape with rope_theta 10000 and 2048 positions. 134.5M parameters.
    "smollm-135m": dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, vocab_size=49152,
                        real_vocab_size=49152, block_size=2048, rope_base=100000.0, **LLAMA),
}


def check_preset(name: str) -> None:
    """Raise TritonGPTError unless `name` is one of PRESETS."""
    require(name in PRESETS, f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
