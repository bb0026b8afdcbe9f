"""The `attention` op's backends beyond its reference and its Triton kernel: PyTorch's SDPA
(backend `sdpa`, and `sdpa-flash` / `sdpa-cudnn` / `sdpa-efficient` / `sdpa-math` pinned to one
of its kernels, those this torch has) and Dao-AILab's flash-attn
(`flash_attn`, usable where it is installed). Each follows the contract of kernels/attention_spec.py: its checks, its
signature, its masks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.attention
import torch.nn.functional as F

from tritongpt.errors import require
from tritongpt.kernels import registry
from tritongpt.kernels.attention_spec import attention_mask, check


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
         softmax_scale: float | None = None, window: int | None = None,
         doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The op through torch.nn.functional.scaled_dot_product_attention (its flash / cuDNN /
    efficient kernels on CUDA). Plain causal with T == S uses is_causal; windows, doc ids and
    bottom-right causal (T < S) pass an explicit mask."""
    b, t, s, h, h_kv, d = check(q, k, v, causal, window, doc_ids)
    plain_causal = causal and window is None and doc_ids is None and t == s
    mask = None if plain_causal else attention_mask(t, s, causal, window, doc_ids, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D) as SDPA wants
        attn_mask=mask, is_causal=plain_causal, scale=softmax_scale, enable_gqa=h != h_kv)
    return out.transpose(1, 2)  # back to (B, T, H, D)


def _sdpa_pinned(kernel_name: str):
    """`sdpa` allowed to use only SDPA's kernel `kernel_name` (an error where it cannot run)."""
    def attention(q, k, v, causal=True, softmax_scale=None, window=None, doc_ids=None):
        with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, kernel_name)), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no kernel available" warnings: the error says it
            return sdpa(q, k, v, causal, softmax_scale, window, doc_ids)
    attention.__name__ = attention.__qualname__ = f"sdpa_{kernel_name.lower()}"
    return attention


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               softmax_scale: float | None = None, window: int | None = None,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Dao-AILab's flash-attn kernel (`pip install flash-attn`): the same (B, T, H, D) layout and
    bottom-right causal alignment, GQA by head count; windows map to its (left, 0) window."""
    from flash_attn import flash_attn_func  # lazy: optional dependency (requires="flash_attn")

    check(q, k, v, causal, window, doc_ids)
    require(doc_ids is None, "attention: the flash_attn backend has no document masking (doc_ids)")
    left = -1 if window is None else window - 1  # flash-attn counts keys left of the query's own
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=(left, 0))


registry.register("attention", "sdpa", sdpa)
for _name, _kernel in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                       ("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-math", "MATH")):
    if hasattr(torch.nn.attention.SDPBackend, _kernel):  # those this torch has
        registry.register("attention", _name, _sdpa_pinned(_kernel), needs="cuda")
registry.register("attention", "flash_attn", flash_attn, needs="cuda", requires="flash_attn")
