"""The GPT's building blocks. Each one resolves its op from the backend registry once, at
construction (or when `resolve_op` is called again by GPT.set_backends), and stores the
callable: forward never looks at a backend name.

Shapes: B batch, T query positions, S key positions (T plus cached ones), C n_embd,
H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from tritongpt.kernels import registry
from tritongpt.model.config import GPTConfig


def resolve_op(op: str, config: GPTConfig) -> tuple[str, Callable]:
    """(backend name, callable) for `op` from the config's field of that name, then its `backend`.
    A model may be built for inference only: a backend that cannot train here (no backward) is
    accepted, and the trainer checks its backends for gradients (train/auto.resolve_backends)."""
    name = registry.choose(op, getattr(config, op), config.backend, backward=False)
    return name, registry.resolve(op, name, backward=False)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmul ops run in: autocast's when autocast is on for x's device (mixed-precision
    training), else x's own. Ops take all their tensors in one dtype; this picks it."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Norm(nn.Module):
    """A pre-norm sublayer's normalization through its registry op (`op`: LayerNorm or RMSNorm).
    Called with the residual stream, it adds the previous sublayer's output into the stream
    inside the norm (one fused pass on the triton backends) and returns both (normalized, new
    residual stream). Each subclass holds its parameters and gives them, in the op's argument
    order after x, from `gains(dtype)`."""

    op: str  # the registry op, a GPTConfig backend field

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.eps = config.norm_eps

    def resolve_op(self, config: GPTConfig) -> None:
        self.backend, self.norm = resolve_op(self.op, config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) is a sublayer's output, residual (B, T, C) the stream it adds to (None for
        the first block: x is the stream). Returns (norm(x + residual), x + residual). The stream
        keeps its own dtype (fp32 under autocast, as in nanoGPT); x is cast to it."""
        dtype = x.dtype if residual is None else residual.dtype
        if residual is None:
            return self.norm(x, *self.gains(dtype), self.eps), x
        return self.norm(x.to(dtype), *self.gains(dtype), self.eps, residual=residual)


class LayerNorm(Norm):
    """GPT-2's LayerNorm with optional bias, through the `layer_norm` op."""

    op = "layer_norm"

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias else None
        self.resolve_op(config)

    def gains(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        return self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)


class RMSNorm(Norm):
    """Llama's RMSNorm, x / rms(x) * weight (no bias, no centring), through the `rms_norm` op."""

    op = "rms_norm"

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.resolve_op(config)

    def gains(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        return (self.weight.to(dtype),)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos * base^(-2i/D), i < D/2, each (T, 1, D/2) in
    float64 (cast to the activations' dtype where applied), broadcasting over heads."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the halves (x1, x2) of each head of x (B, T, H, D) by the angles: (x1 cos - x2 sin,
    x2 cos + x1 sin) (the GPT-NeoX / LLaMA layout). Computed in fp32 at least; returns x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = (r.to(dtype) for r in rope)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # (B, T, H, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def sinusoidal_table(n_positions: int, n_embd: int) -> torch.Tensor:
    """The original Transformer's fixed position encodings (n_positions, n_embd): sin on even
    dims, cos on odd dims, wavelengths 2*pi .. 10000*2*pi."""
    positions = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)
    table = torch.empty(n_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq)
    return table.float()


class CausalSelfAttention(nn.Module):
    """Causal (optionally sliding-window, grouped-query, document-masked) self-attention through
    the `attention` op in (B, T, H, D) layout: c_attn's output is viewed as (B, T, H + 2*Hkv, D)
    and q, k, v are strided views of it, no transposes."""

    op = "attention"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.window = config.window
        # q, k, v projections in one matmul; for plain multi-head attention this is GPT-2's c_attn
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.resolve_op(config)

    def resolve_op(self, config: GPTConfig) -> None:
        self.backend, self.attention = resolve_op(self.op, config)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """q (B, T, H, D), k and v (B, T, Hkv, D) for x (B, T, C), rope applied to q and k."""
        b, t, _ = x.shape
        qkv = self.c_attn(x).view(b, t, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                doc_ids: torch.Tensor | None = None,
                kv_cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). kv_cache (k_buf, v_buf, start): buffers (B, block_size, Hkv, D)
        holding `start` earlier positions; this call's k, v are written after them and the T
        queries attend to all start + T keys (causal, aligned bottom-right)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x, rope)
        if kv_cache is not None:
            k_buf, v_buf, start = kv_cache
            k_buf[:, start:start + t] = k
            v_buf[:, start:start + t] = v
            k, v = k_buf[:, :start + t], v_buf[:, :start + t]  # (B, S, Hkv, D)
        y = self.attention(q, k, v, causal=True, window=self.window, doc_ids=doc_ids)  # (B, T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(b, t, c)))


class MLP(nn.Module):
    """GPT-2's MLP, c_proj(gelu_tanh(c_fc(x))), through the fused `mlp` op."""

    op = "mlp"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.resolve_op(config)

    def resolve_op(self, config: GPTConfig) -> None:
        self.backend, self.gelu_mlp = resolve_op(self.op, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). Under autocast the op gets every tensor in autocast's dtype."""
        dtype = compute_dtype(x)
        w1, b1, w2, b2 = (None if p is None else p.to(dtype)
                          for p in (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias))
        return self.dropout(self.gelu_mlp(x.to(dtype), w1, b1, w2, b2, approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama's MLP, down_proj(silu(gate_proj(x)) * up_proj(x)) without biases, through the fused
    `swiglu_mlp` op. The parameters carry Hugging Face Llama's names (mlp.gate_proj, ...)."""

    op = "swiglu_mlp"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.hidden, bias=False)
        self.down_proj = nn.Linear(config.hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.resolve_op(config)

    def resolve_op(self, config: GPTConfig) -> None:
        self.backend, self.swiglu_mlp = resolve_op(self.op, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). Under autocast the op gets every tensor in autocast's dtype."""
        dtype = compute_dtype(x)
        w_gate, w_up, w_down = (p.to(dtype) for p in (self.gate_proj.weight, self.up_proj.weight,
                                                      self.down_proj.weight))
        return self.dropout(self.swiglu_mlp(x.to(dtype), w_gate, w_up, w_down))


# the module of each GPTConfig.normalization and GPTConfig.ffn form
NORMS: dict[str, type[Norm]] = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
FFNS: dict[str, type[nn.Module]] = {"gelu": MLP, "swiglu": SwiGLUMLP}


class Block(nn.Module):
    """A pre-norm transformer block in the prenorm-residual form of flash-attn / Liger: it takes
    the previous sublayer's output and the residual stream separately, and each norm adds the
    pending output into the stream (x + residual) as it normalizes. Its norms and MLP are of the
    config's forms (NORMS, FFNS)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = NORMS[config.normalization](config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = NORMS[config.normalization](config)
        self.mlp = FFNS[config.ffn](config)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, doc_ids: torch.Tensor | None = None,
                kv_cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, T, C): output not yet added to residual (B, T, C) (None: hidden is the
        stream). Returns (this block's MLP output, the stream before it is added)."""
        h, residual = self.ln_1(hidden, residual)  # residual = stream + hidden
        hidden = self.attn(h, rope, doc_ids, kv_cache)
        h, residual = self.ln_2(hidden, residual)  # residual += attention output
        return self.mlp(h), residual


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 init: Linear and Embedding weights N(0, 0.02), biases 0 (norms keep 1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


# the weights of the projections that write into the residual stream (attn.c_proj, and mlp.c_proj
# or mlp.down_proj), by the end of their names
RESIDUAL_PROJECTIONS = ("c_proj.weight", "down_proj.weight")


def residual_std(n_layer: int, std: float = 0.02) -> float:
    """GPT-2's init of the projections that write into the residual stream (RESIDUAL_PROJECTIONS):
    0.02 / sqrt(2 * n_layer), two such writes per block."""
    return std / math.sqrt(2 * n_layer)
