"""The `attention` op's backends beyond its reference and its Triton kernel: PyTorch's SDPA
(backend `sdpa`, and `sdpa-flash` / `sdpa-cudnn` / `sdpa-efficient` / `sdpa-math` pinned to one
of its kernels, those this torch has), PyTorch's FlexAttention (`flex`) and Dao-AILab's
flash-attn (`flash_attn`, usable where it is installed). Each follows the contract of
kernels/attention_spec.py: its checks, its signature, its masks.

`flex` runs torch.nn.attention.flex_attention with a block mask built from causal, window and
doc ids: compiled on CUDA (its fused kernel), eagerly elsewhere, where PyTorch has no backward
(its `needs` says so: a CPU run that asks for gradients is one clear error, never a fallback).
Block masks without doc ids depend only on the shape and are cached; with doc ids they are
built on every call, which `tritongpt bench attention` times with and without (its `prepared`
variant builds the mask once, outside the timed call).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.attention
import torch.nn.attention.flex_attention as flex_attention_module
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
    bottom-right causal alignment, GQA by head count; windows map to its (left, 0) window. Doc ids
    go through its varlen kernel: every document of every row one sequence (`cu_seqlens`)."""
    import flash_attn as fa  # lazy: optional dependency (requires="flash_attn")

    b, t, s, h, h_kv, d = check(q, k, v, causal, window, doc_ids)
    left = -1 if window is None else window - 1  # flash-attn counts keys left of the query's own
    if doc_ids is None:
        return fa.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=(left, 0))
    require(t == s, f"attention: the flash_attn backend takes doc_ids only with T == S, got T={t}, S={s}")
    cu_seqlens, longest = cu_seqlens_of(doc_ids)
    out = fa.flash_attn_varlen_func(q.reshape(b * t, h, d), k.reshape(b * s, h_kv, d), v.reshape(b * s, h_kv, d),
                                    cu_seqlens, cu_seqlens, longest, longest, softmax_scale=softmax_scale,
                                    causal=causal, window_size=(left, 0))
    return out.view(b, t, h, d)


def cu_seqlens_of(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn's varlen input for (B, S) doc ids: (cu_seqlens int32 (N + 1,), the longest
    length) of the N documents of the rows laid end to end (each row starts a document). Reads
    the ids on the host; ids that are not non-decreasing along a row (a document that comes back
    later, one sequence to the op's masks) are an error."""
    b, s = doc_ids.shape
    require(bool((doc_ids[:, 1:] >= doc_ids[:, :-1]).all()),
            "attention: the flash_attn backend needs doc_ids non-decreasing along each row (its varlen "
            "documents are contiguous)")
    starts = torch.ones(b, s, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    edges = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([b * s], device=doc_ids.device)])
    return edges.to(torch.int32), int((edges[1:] - edges[:-1]).max())


def _mask_mod(t: int, s: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None):
    """FlexAttention's mask_mod for the op's masks: query i sits at key position i + S - T."""
    def visible(b, h, q_idx, kv_idx):
        pos = q_idx + (s - t)
        ok = kv_idx < s  # a tensor, whichever masks are on
        if causal:
            ok = ok & (kv_idx <= pos)
        if window is not None:
            ok = ok & (kv_idx > pos - window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, pos] == doc_ids[b, kv_idx])
        return ok
    return visible


def flex_block_mask(t: int, s: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None,
                    device: torch.device):
    """The BlockMask of the op's masks (None when nothing is masked): cached per shape without doc
    ids, built from the doc ids otherwise."""
    if not causal and doc_ids is None:
        return None
    if doc_ids is None:
        return _shape_block_mask(t, s, causal, window, str(device))
    return flex_attention_module.create_block_mask(_mask_mod(t, s, causal, window, doc_ids), doc_ids.shape[0], None,
                                                   t, s, device=device, _compile=device.type == "cuda")


@functools.lru_cache(maxsize=32)
def _shape_block_mask(t: int, s: int, causal: bool, window: int | None, device: str):
    return flex_attention_module.create_block_mask(_mask_mod(t, s, causal, window, None), None, None, t, s,
                                                   device=device, _compile=device.startswith("cuda"))


@functools.cache
def _compiled_flex():
    """flex_attention compiled once (its fused Triton kernel; eager flex materializes the scores)."""
    return torch.compile(flex_attention_module.flex_attention, dynamic=False)


def _flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, block_mask,
               grouped: bool) -> torch.Tensor:
    require(q.is_cuda or not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))),
            f"attention: the flex backend has no backward on {q.device} (PyTorch's FlexAttention computes "
            f"gradients on CUDA only); call it under torch.no_grad() or choose another backend")
    if not q.is_cuda:  # no grad wanted (required above), but flex refuses CPU inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, D) as flex wants
    kwargs = dict(block_mask=block_mask, scale=softmax_scale, enable_gqa=grouped)
    if q.is_cuda:
        out = _compiled_flex()(*args, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile()": eager is what runs on a CPU
            out = flex_attention_module.flex_attention(*args, **kwargs)
    return out.transpose(1, 2)  # back to (B, T, H, D)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
         softmax_scale: float | None = None, window: int | None = None,
         doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The op through PyTorch's FlexAttention, its block mask built (or, without doc ids, found in
    the cache) on every call."""
    b, t, s, h, h_kv, d = check(q, k, v, causal, window, doc_ids)
    block_mask = flex_block_mask(t, s, causal, window, doc_ids, q.device)
    return _flex_call(q, k, v, softmax_scale, block_mask, h != h_kv)


def flex_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None, window: int | None = None,
                  doc_ids: torch.Tensor | None = None):
    """`flex` with its block mask built once, for these masks: the returned callable (the op's
    signature) reuses it, so a benchmark can time the attention without the mask build."""
    b, t, s, h, h_kv, d = check(q, k, v, causal, window, doc_ids)
    block_mask = flex_block_mask(t, s, causal, window, doc_ids, q.device)

    def attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, doc_ids=doc_ids):
        return _flex_call(q, k, v, softmax_scale, block_mask, q.shape[2] != k.shape[2])
    return attention


registry.register("attention", "sdpa", sdpa)
for _name, _kernel in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                       ("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-math", "MATH")):
    if hasattr(torch.nn.attention.SDPBackend, _kernel):  # those this torch has
        registry.register("attention", _name, _sdpa_pinned(_kernel), needs="cuda")
registry.register("attention", "flex", flex, needs="cuda-backward", prepared=flex_prepared)
registry.register("attention", "flash_attn", flash_attn, needs="cuda", requires="flash_attn")
