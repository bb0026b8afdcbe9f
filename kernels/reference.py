"""Plain-PyTorch versions of every op: the `torch` backend, and (run in float64) the oracle
the Triton kernels are tested against. Attention also gets `sdpa`, PyTorch's fused
`scaled_dot_product_attention`.

Signatures here are the contract every backend of an op follows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tritongpt.kernels import checks, registry


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, residual: torch.Tensor | None = None):
    """LayerNorm over the last dim. With `residual`, normalizes s = x + residual and returns
    (LN(s), s), the pre-LN block's fused residual path; otherwise returns LN(x)."""
    n = checks.layer_norm_shapes(x, weight, bias, residual)
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (n,), weight, bias, eps)
    return y if residual is None else (y, s)


def attention_mask(t: int, s: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask, True where query i may see key j: (T, S), or (B, 1, T, S) with doc_ids.
    Queries align bottom-right: query i sits at key position i + S - T. A window w keeps keys
    j with pos(i) - w < j <= pos(i), i.e. w keys counting the query's own position."""
    if not causal and doc_ids is None:
        return None
    pos_q = torch.arange(s - t, s, device=device)[:, None]  # (T, 1)
    pos_k = torch.arange(s, device=device)[None, :]  # (1, S)
    mask = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        mask &= pos_k <= pos_q
    if window is not None:
        mask &= pos_k > pos_q - window
    if doc_ids is not None:
        same_doc = doc_ids[:, s - t:, None] == doc_ids[:, None, :]  # (B, T, S)
        mask = (mask & same_doc)[:, None]  # (B, 1, T, S), broadcast over heads
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, window: int | None = None,
              doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T * scale + mask) v. q: (B, T, H, D); k, v: (B, S, H_kv, D) with
    H_kv dividing H. Returns (B, T, H, D). Materializes the (T, S) scores: reference only."""
    b, t, s, h, h_kv, d = checks.attention_shapes(q, k, v, causal, window, doc_ids)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k.repeat_interleave(h // h_kv, dim=2)  # (B, S, H, D): each k/v head serves h // h_kv q heads
    v = v.repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    mask = attention_mask(t, s, causal, window, doc_ids, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None, window: int | None = None,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The same op through torch.nn.functional.scaled_dot_product_attention (its flash / cuDNN /
    efficient kernels on CUDA). Plain causal with T == S uses is_causal; windows, doc ids and
    bottom-right causal (T < S) pass an explicit mask."""
    b, t, s, h, h_kv, d = checks.attention_shapes(q, k, v, causal, window, doc_ids)
    plain_causal = causal and window is None and doc_ids is None and t == s
    mask = None if plain_causal else attention_mask(t, s, causal, window, doc_ids, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D) as SDPA wants
        attn_mask=mask, is_causal=plain_causal, scale=softmax_scale, enable_gqa=h != h_kv)
    return out.transpose(1, 2)  # back to (B, T, H, D)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, approximate: str = "tanh", residual: torch.Tensor | None = None,
             recompute: bool = False) -> torch.Tensor:
    """y = gelu(x @ w1^T + b1) @ w2^T + b2 (+ residual); weights in nn.Linear layout (out, in);
    approximate "tanh" (GPT-2) or "none" (exact erf). `recompute` is the Triton backend's
    activation-memory switch; autograd here always keeps the hidden activation."""
    checks.mlp_shapes(x, w1, b1, w2, b2, approximate, residual)
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    return y if residual is None else y + residual


registry.register("layer_norm", "torch", layer_norm)
registry.register("attention", "torch", attention)
registry.register("attention", "sdpa", sdpa_attention)
registry.register("mlp", "torch", gelu_mlp)
