"""Triton flash attention (kernels/attention.py) against the explicit-softmax reference run in
float64: output, log-sum-exp and dq/dk/dv, over causal / non-causal, ragged lengths, query
length != key length, grouped-query heads, sliding windows and document masks; every config the
pruner keeps for sm_80 or sm_90 (pointer and TMA paths), row offsets past 2^31, and the config
table's claims (generated under Triton 3.6 and the newest; Hopper tiles that feed the tensor cores).

    python -m pytest -q tests/test_attention.py            # CPU: Triton interpreter, fp32/fp16
    python -m pytest -q -m slow tests/test_attention.py    # every head dim, larger shapes
    python -m pytest -q -m gpu tests/test_attention.py     # bf16, 4k/16k tokens, PyTorch error rule
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
from _util import assert_rel_close, poison, rel_err, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import attention as attn
from tritongpt.kernels import attention_backends, attention_blocks, attention_spec, checks, compile_report, registry
from tritongpt.kernels import attention_configs as attn_configs

ON_GPU = torch.cuda.is_available()
CPU = torch.device("cpu")


def _doc_ids(b: int, s: int, n_docs: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B, S) int64 ids of n_docs documents of random lengths per row (sorted, as in packed batches)."""
    return torch.sort(torch.randint(0, n_docs, (b, s), generator=gen), dim=1).values.to(device)


def _inputs(b, t, s, h, h_kv, d, dtype, device, seed, n_docs=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype)
               for shape in ((b, t, h, d), (b, s, h_kv, d), (b, s, h_kv, d)))
    do = torch.randn(b, t, h, d, generator=gen).to(device, dtype)
    docs = _doc_ids(b, s, n_docs, gen, device) if n_docs else None
    return q, k, v, do, docs


def _reference(q, k, v, do, causal, scale, window, docs):
    """float64 output, base-2 log-sum-exp and gradients of attention_spec.reference."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = attention_spec.reference(q64, k64, v64, causal, scale, window, docs)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), do.double())
    b, t, h, d = q.shape
    s = k.shape[1]
    kk = k64.detach().repeat_interleave(h // k.shape[2], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q64.detach(), kk) * (scale or 1 / math.sqrt(d))
    mask = attention_spec.attention_mask(t, s, causal, window, docs, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) / math.log(2)  # (B, H, T), base 2 like the kernel's
    return out.detach(), lse, dq, dk, dv


def _check(b, t, s, h, h_kv, d, causal, window=None, n_docs=0, dtype=torch.float32, scale=None,
           device=CPU, seed=0, tf32=None, doc_ids=None):
    """Launch forward and backward into NaN-poisoned buffers and compare all five outputs (fp32 at
    tf32's tolerance on a GPU unless `tf32` says otherwise); `doc_ids` (B, S) replace random ones."""
    q, k, v, do, docs = _inputs(b, t, s, h, h_kv, d, dtype, device, seed, n_docs)
    docs = docs if doc_ids is None else doc_ids.to(device)
    softmax_scale = scale if scale is not None else 1 / math.sqrt(d)
    out, lse = poison(torch.empty_like(q)), poison(torch.empty(b, h, t, device=device))
    attn.flash_attn_fwd(q, k, v, causal, softmax_scale, window, docs, out=out, lse=lse)
    dq, dk, dv = (poison(torch.empty_like(x)) for x in (q, k, v))
    attn.flash_attn_bwd(do, q, k, v, out, lse, causal, softmax_scale, window, docs, dq=dq, dk=dk, dv=dv)
    expected = _reference(q, k, v, do, causal, scale, window, docs)
    limit = tol(dtype, tf32=device.type == "cuda" if tf32 is None else tf32)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), expected):
        assert_rel_close(got, want, limit, name)


# (B, T, S, H, H_kv, D, causal, window, documents per row): a covering set, not the product.
CASES = [
    (1, 1, 9, 2, 2, 16, True, None, 0),  # one query (decode step; with T = S = 1, dq and dk are exactly 0)
    (2, 17, 17, 2, 1, 16, True, None, 0),  # ragged, GQA 2
    (1, 128, 128, 4, 1, 64, True, None, 0),  # MQA (GQA 4), exact blocks
    (1, 257, 257, 2, 1, 80, False, None, 0),  # ragged, padded head dim, non-causal
    (1, 128, 128, 2, 2, 128, False, None, 0),
    (1, 100, 257, 4, 2, 64, True, 40, 0),  # T < S (bottom-right), window
    (1, 129, 129, 2, 2, 64, True, 3, 0),  # a tiny window (1 would leave one key: dq, dk exactly 0)
    (1, 257, 257, 2, 2, 32, True, None, 4),  # several documents per row
    (2, 70, 90, 2, 1, 64, False, None, 3),  # non-causal with documents, T < S
    (1, 90, 40, 2, 2, 16, False, None, 0),  # non-causal, T > S
    (1, 64, 200, 8, 2, 16, True, 100, 3),  # GQA 4, window + documents + T < S
]


@pytest.mark.parametrize("b,t,s,h,h_kv,d,causal,window,n_docs", CASES)
def test_fp32_matches_float64_reference(b, t, s, h, h_kv, d, causal, window, n_docs, device):
    _check(b, t, s, h, h_kv, d, causal, window, n_docs, torch.float32, device=device)


@pytest.mark.parametrize("b,t,s,h,h_kv,d,causal,window,n_docs", [
    (1, 129, 129, 2, 2, 64, True, None, 0),
    (1, 257, 257, 4, 2, 80, False, None, 3),
    (1, 50, 130, 2, 1, 128, True, 33, 0),
])
def test_fp16_matches_float64_reference(b, t, s, h, h_kv, d, causal, window, n_docs, device):
    _check(b, t, s, h, h_kv, d, causal, window, n_docs, torch.float16, device=device)


# ----------------------------------------------------------------------------------------------
# Packed documents: block ranges narrowed to the documents, exact for any doc ids


def _fuzzed_doc_ids(kind: str, b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """(B, S) doc ids of one kind: random document lengths (some of length 1), one document, many
    one-token documents, or ids that are not non-decreasing (a document id coming back)."""
    if kind == "one":
        return torch.zeros(b, s, dtype=torch.int64)
    if kind == "singletons":  # the first half one-token documents (their dq, dk are 0), then one document
        return torch.arange(s).clamp(max=s // 2).repeat(b, 1)
    if kind == "non-monotone":
        return torch.randint(0, 3, (b, s), generator=gen)
    starts = torch.rand(b, s, generator=gen) < 0.08  # ~12-token documents on average, some of one token
    starts[:, 1:][torch.rand(b, s - 1, generator=gen) < 0.03] = True
    return torch.cumsum(starts.long(), dim=1)


def test_doc_bounds_give_each_positions_document():
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 7], [5, 5, 5, 5, 5, 5, 5], [0, 1, 1, 0, 0, 2, 2]])
    bounds = attention_blocks.doc_bounds(ids)
    assert bounds.dtype == torch.int32 and bounds.shape == (3, 2, 7)
    assert bounds[0].tolist() == [[0, 0, 0, 3, 4, 4, 6], [3, 3, 3, 4, 6, 6, 7]]
    assert bounds[1].tolist() == [[0] * 7, [7] * 7]
    assert bounds[2].tolist() == [[-1] * 7, [7] * 7]  # ids not non-decreasing: the kernels mask everywhere


def _brute_force_tiles(t, s, causal, window, docs, block_m, block_n):
    """(B, query blocks, key blocks) bool: the tiles holding at least one visible (query, key) pair,
    and (B, query blocks, key blocks) bool: the tiles whose every in-range pair is visible."""
    mask = attention_spec.attention_mask(t, s, causal, window, docs, CPU)
    mask = torch.ones(t, s, dtype=torch.bool) if mask is None else mask
    mask = mask.reshape(-1, t, s)
    rows, cols = triton.cdiv(t, block_m), triton.cdiv(s, block_n)
    padded = torch.zeros(mask.shape[0], rows * block_m, cols * block_n, dtype=torch.bool)
    inside = torch.zeros_like(padded)
    padded[:, :t, :s], inside[:, :t, :s] = mask, True
    tiles = padded.view(-1, rows, block_m, cols, block_n)
    inside = inside.view(-1, rows, block_m, cols, block_n)
    return tiles.any(4).any(2), (tiles | ~inside).all(4).all(2)


@pytest.mark.parametrize("seed", range(6))
def test_visited_blocks_are_the_tiles_with_a_visible_pair(seed):
    """The block ranges the kernels walk (attention_blocks mirrors them) cover exactly the tiles
    that hold a visible pair; the unmasked middle holds only fully visible tiles; doc ids that are
    not non-decreasing cost the causal/window range."""
    gen = torch.Generator().manual_seed(seed)
    for trial in range(40):
        s = int(torch.randint(1, 300, (1,), generator=gen))
        t = int(torch.randint(1, s + 1, (1,), generator=gen))
        causal = trial % 4 != 0
        window = int(torch.randint(1, 80, (1,), generator=gen)) if causal and trial % 3 == 0 else None
        kind = ("random", "random", "one", "singletons", "non-monotone", None)[trial % 6]
        docs = None if kind is None else _fuzzed_doc_ids(kind, 2, s, gen)
        block_m, block_n = (16, 32, 64)[trial % 3], (16, 32, 64, 128)[trial % 4]
        for kernel in ("fwd", "dkdv"):
            visited = attention_blocks.visited_blocks(kernel, t, s, causal, window, docs, block_m, block_n)
            any_pair, _ = _brute_force_tiles(t, s, causal, window, None if kind == "non-monotone" else docs,
                                             block_m, block_n)
            expected = int(any_pair.sum()) * (2 if docs is not None and kind == "non-monotone" else 1)
            assert visited == expected, (kernel, t, s, causal, window, kind, block_m, block_n)
        any_pair, full = _brute_force_tiles(t, s, causal, window, docs, block_m, block_n)
        rows = [None] if docs is None else [(b[0].tolist(), b[1].tolist()) for b in attention_blocks.doc_bounds(docs)]
        for batch, bounds in enumerate(rows):
            for m, (lo, full_lo, full_hi, hi) in enumerate(attention_blocks.block_ranges(
                    "fwd", t, s, causal, window, bounds, block_m, block_n)):
                if hi <= lo:  # a block no key is visible to: no iteration
                    assert not any_pair[batch, m].any()
                    continue
                assert lo % block_n == 0 and lo <= full_lo <= full_hi <= hi
                assert all(full[batch, m, n // block_n] for n in range(full_lo, full_hi, block_n))
            for n, (lo, full_lo, full_hi, hi) in enumerate(attention_blocks.block_ranges(
                    "dkdv", t, s, causal, window, bounds, block_m, block_n)):
                if hi <= lo:
                    assert not any_pair[batch, :, n].any()
                    continue
                assert lo % block_m == 0 and lo <= full_lo <= full_hi <= hi
                assert all(full[batch, m // block_m, n] for m in range(full_lo, full_hi, block_m))


def test_packed_documents_visit_an_eighth_of_the_causal_tiles():
    """8 documents x 128 tokens at T = 1024: a document's causal triangle each, not the sequence's."""
    docs = torch.arange(1024).div(128, rounding_mode="floor")[None]
    for kernel, block_m, block_n in (("fwd", 128, 128), ("fwd", 64, 32), ("dkdv", 32, 128)):
        causal = attention_blocks.visited_blocks(kernel, 1024, 1024, True, None, None, block_m, block_n)
        packed = attention_blocks.visited_blocks(kernel, 1024, 1024, True, None, docs, block_m, block_n)
        tiles_per_doc = attention_blocks.visited_blocks(kernel, 128, 128, True, None, None, block_m, block_n)
        assert packed == 8 * tiles_per_doc < causal / 4


@pytest.mark.parametrize("kind", ("random", "one", "singletons"))
def test_cu_seqlens_give_the_documents_of_every_row(kind):
    """flash-attn's varlen input: tokens i, j of the flattened batch share a sequence exactly when
    they share a row and a doc id (checked pair by pair); non-monotone ids are refused."""
    docs = _fuzzed_doc_ids(kind, 3, 50, torch.Generator().manual_seed(3))
    cu_seqlens, longest = attention_backends.cu_seqlens_of(docs)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0 and cu_seqlens[-1] == docs.numel()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    assert (lengths > 0).all() and longest == lengths.max()
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # (B * S,)
    row = torch.arange(3).repeat_interleave(50)
    ids = docs.flatten()
    same_doc = (row[:, None] == row[None, :]) & (ids[:, None] == ids[None, :])
    assert torch.equal(sequence[:, None] == sequence[None, :], same_doc)
    with pytest.raises(TritonGPTError, match="non-decreasing"):
        attention_backends.cu_seqlens_of(_fuzzed_doc_ids("non-monotone", 2, 50, torch.Generator().manual_seed(0)))


DOC_CASES = [  # (B, T, S, H, H_kv, D, causal, window, doc kind)
    (2, 97, 97, 2, 1, 16, True, None, "random"),
    (1, 150, 150, 2, 2, 32, True, 20, "random"),  # window
    (2, 60, 130, 4, 2, 16, True, None, "random"),  # T < S, GQA
    (1, 70, 90, 2, 2, 16, False, None, "random"),  # non-causal, T < S
    (1, 80, 80, 2, 1, 16, True, None, "singletons"),
    (1, 80, 80, 2, 2, 16, False, None, "one"),
    (2, 70, 70, 2, 1, 16, True, None, "non-monotone"),
    (1, 50, 100, 2, 2, 16, False, None, "non-monotone"),
]
DOC_TILES = [  # (fwd, dq, dkdv) block sizes, so document edges fall inside and across blocks
    {}, dict(fwd=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "USE_TMA": False}, num_warps=4, num_stages=1),
             dq=triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "USE_TMA": False}, num_warps=4, num_stages=1),
             dkdv=triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1)),
]


@pytest.mark.parametrize("tiles", DOC_TILES, ids=("smallest", "64-wide"))
@pytest.mark.parametrize("b,t,s,h,h_kv,d,causal,window,kind", DOC_CASES)
def test_fuzzed_doc_ids_match_float64_reference(b, t, s, h, h_kv, d, causal, window, kind, tiles, device):
    docs = _fuzzed_doc_ids(kind, b, s, torch.Generator().manual_seed(t * s))
    with attn_configs.pinned_configs(**tiles):
        _check(b, t, s, h, h_kv, d, causal, window, doc_ids=docs, device=device, seed=t + s)


def test_custom_softmax_scale(device):
    _check(1, 40, 40, 2, 2, 64, True, scale=0.3, device=device)


@pytest.mark.parametrize("dtype,causal,window", [(torch.float32, True, None), (torch.float16, True, 20),
                                                 (torch.float32, False, None)])
def test_packed_qkv_views_through_autograd(dtype, causal, window, device):
    """q, k, v as strided views of one (B, T, 3, H, D) tensor, through the public functional and
    autograd: gradients land in the packed tensor."""
    b, t, h, d = 2, 70, 2, 64
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, t, 3, h, d, generator=gen).to(device, dtype).requires_grad_()
    do = torch.randn(b, t, h, d, generator=gen).to(device, dtype)
    q, k, v = qkv.unbind(2)
    assert q.stride() == (t * 3 * h * d, 3 * h * d, d, 1)
    out = attn.flash_attention(q, k, v, causal=causal, window=window)
    out.backward(do)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = attention_spec.reference(*qkv64.unbind(2), causal=causal, window=window)
    ref.backward(do.double())
    assert_rel_close(out, ref, tol(dtype, tf32=ON_GPU), "out")
    assert_rel_close(qkv.grad, qkv64.grad, tol(dtype, tf32=ON_GPU), "dqkv")


@pytest.mark.parametrize("causal,window,n_docs", [(True, None, 0), (False, None, 0), (True, 7, 0), (False, None, 2)])
def test_agrees_with_torch_sdpa(causal, window, n_docs, device):
    """The same fp32 inputs through F.scaled_dot_product_attention (via attention_backends.sdpa)."""
    q, k, v, _, docs = _inputs(1, 33, 65, 4, 2, 32, torch.float32, device, seed=2, n_docs=n_docs)
    ours = attn.flash_attention(q, k, v, causal, None, window, docs)
    theirs = attention_backends.sdpa(q, k, v, causal, None, window, docs)
    assert_rel_close(ours, theirs, 2 * tol(torch.float32, tf32=ON_GPU), "out vs sdpa")


def test_plain_causal_matches_sdpa_is_causal(device):
    q, k, v, _, _ = _inputs(2, 48, 48, 2, 2, 64, torch.float32, device, seed=3)
    ours = attn.flash_attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True).transpose(1, 2)
    assert_rel_close(ours, theirs, 2 * tol(torch.float32, tf32=ON_GPU), "out vs sdpa is_causal")


def test_backward_is_deterministic(device):
    """GQA dk/dv sum over the group in a fixed order: two runs are bitwise equal."""
    q, k, v, do, docs = _inputs(1, 80, 80, 4, 1, 32, torch.float32, device, seed=4, n_docs=2)
    out, lse = attn.flash_attn_fwd(q, k, v, True, 0.2, None, docs)
    first = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 0.2, None, docs)
    second = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 0.2, None, docs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_noncontiguous_output_gradient(device):
    """The gradient of a sum arrives expanded (all strides 0); backward must still be right."""
    q, k, v, _, _ = _inputs(1, 20, 20, 2, 2, 16, torch.float32, device, seed=5)
    q.requires_grad_()
    attn.flash_attention(q, k, v).sum().backward()
    q64 = q.detach().double().requires_grad_()
    attention_spec.reference(q64, k.double(), v.double()).sum().backward()
    assert_rel_close(q.grad, q64.grad, tol(torch.float32, tf32=ON_GPU), "dq")


def test_torch_compile_fullgraph(device):
    """torch.compile traces through the custom ops (fake implementations + registered autograd)."""
    q, k, v, do, docs = _inputs(1, 24, 24, 2, 1, 16, torch.float32, device, seed=6, n_docs=2)
    q.requires_grad_()

    def f(q, k, v, docs):
        return attn.flash_attention(q, k, v, causal=True, window=9, doc_ids=docs) * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")(q, k, v, docs)
    out.backward(do)
    q64 = q.detach().double().requires_grad_()
    ref = attention_spec.reference(q64, k.double(), v.double(), True, None, 9, docs) * 2
    ref.backward(do.double())
    assert_rel_close(out, ref, tol(torch.float32, tf32=ON_GPU), "out")
    assert_rel_close(q.grad, q64.grad, tol(torch.float32, tf32=ON_GPU), "dq")


def test_registered_as_triton_backend():
    assert registry.resolve("attention", "triton") is attn.flash_attention


def _qkv(device, b=1, t=8, s=8, h=2, h_kv=2, d=16, dtype=torch.float32):
    return (torch.randn(b, t, h, d, device=device, dtype=dtype), torch.randn(b, s, h_kv, d, device=device, dtype=dtype),
            torch.randn(b, s, h_kv, d, device=device, dtype=dtype))


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q.repeat(1, 1, 1, 3), k.repeat(1, 1, 1, 3), v.repeat(1, 1, 1, 3)), "head_dim"),  # 48
    (lambda q, k, v: (q, k.half(), v.half()), "dtype"),
    (lambda q, k, v: (q.repeat(1, 1, 3, 1)[:, :, :3], k, v), "multiple"),
    (lambda q, k, v: (q, k[:1].repeat(2, 1, 1, 1), v[:1].repeat(2, 1, 1, 1)), "batch"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), "head_dim"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float64"),
    (lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), "contiguous"),
    (lambda q, k, v: (q, k.to("meta"), v), "meta"),
])
def test_bad_inputs_raise_one_clear_error(change, message, device):
    q, k, v = change(*_qkv(device))
    with pytest.raises(TritonGPTError, match=message):
        attn.flash_attention(q, k, v)


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=0), "window"),
    (dict(window=4, causal=False), "causal"),
    (dict(doc_ids=torch.zeros(1, 5, dtype=torch.int64)), "doc_ids"),
    (dict(doc_ids=torch.zeros(1, 8)), "integer"),
])
def test_bad_masks_raise_one_clear_error(kwargs, message, device):
    q, k, v = _qkv(device)
    if "doc_ids" in kwargs:
        kwargs["doc_ids"] = kwargs["doc_ids"].to(device)
    with pytest.raises(TritonGPTError, match=message):
        attn.flash_attention(q, k, v, **kwargs)


def test_doc_ids_with_more_queries_than_keys_is_an_error(device):
    """Non-causal T > S has no key position for the first queries' documents."""
    q, k, v = _qkv(device, t=8, s=4)
    doc_ids = torch.randint(0, 2, (1, 4), device=device)
    for fn in (attn.flash_attention, attention_spec.reference, attention_backends.sdpa):
        with pytest.raises(TritonGPTError, match=r"doc_ids need query length \(8\) <= key length \(4\)"):
            fn(q, k, v, causal=False, doc_ids=doc_ids)


def test_preallocated_outputs_are_checked(device):
    q, k, v = _qkv(device)
    with pytest.raises(TritonGPTError, match="dtype"):
        attn.flash_attn_fwd(q, k, v, True, 0.25, None, None, out=torch.empty_like(q, dtype=torch.float16))


# ----------------------------------------------------------------------------------------------
# configs: the table, the pruner, every kept config run under the interpreter, TMA, int64 offsets
# ----------------------------------------------------------------------------------------------

ARCHES = ("sm_80", "sm_90")
CONFIG_KEYS = [(kind, dtypes, d, grouped) for kind in attn_configs.TUNED_KERNELS
               for dtypes in attn_configs.DTYPE_CLASSES for d in attn.HEAD_DIMS for grouped in (False, True)]
TUNED_KERNELS = {"fwd": attn._attn_fwd_kernel, "dq": attn._attn_bwd_dq_kernel, "dkdv": attn._attn_bwd_dkdv_kernel}


def _kept(kind, arch, dtypes="16-bit", d=64, grouped=False, tma_ok=True, t=4096, s=4096):
    return attn_configs.kept_configs(kind, arch, dtypes, d, grouped, tma_ok, t, s)


def _elements(cfg):
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"]


def _names(configs):
    return " ".join(attn_configs.config_name(c) for c in configs)


def test_table_records_triton_36_and_the_newest_for_both_arches():
    """The table is generated (kernels compile --emit-table) under Triton 3.6, the GPU machine's,
    and the newest; a config counts only where it passed under both."""
    for arch in ARCHES:
        versions = attn_configs.table()[arch]
        assert any(v.startswith("3.6.") for v in versions), (arch, sorted(versions))
        assert any(tuple(map(int, v.split(".")[:2])) >= (3, 9) for v in versions), (arch, sorted(versions))


@pytest.mark.parametrize("arch", ARCHES)
def test_every_16_bit_call_keeps_a_config_that_compiled(arch):
    """Every kernel, head dim and GROUP kind has 16-bit configs that compiled without spills under
    every recorded Triton version (no fallback); fp32 has them up to head dim 128."""
    passing = compile_report.passing(attn_configs.table(), arch)
    for kind, dtypes, d, grouped in CONFIG_KEYS:
        if dtypes == "16-bit" or d <= 128:
            names = passing[attn_configs.table_key(kind, dtypes, d, grouped)]
            kept = _kept(kind, arch, dtypes, d, grouped)
            assert names and {attn_configs.config_name(c) for c in kept} <= set(names), (arch, kind, dtypes, d, grouped)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_hopper_backward_keeps_tensor_core_sized_tiles(d, grouped):
    """sm_90, 16-bit, D = 64 and 128 (GQA or not): dK/dV and dQ keep tiles of at least 32 on both
    sides and 4096 elements (the tensor cores starve on 16-wide tiles)."""
    for kind in ("dkdv", "dq"):
        big = [c for c in _kept(kind, "sm_90", d=d, grouped=grouped)
               if min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 32 and _elements(c) >= 4096]
        assert big, (kind, d, grouped)


def test_hopper_forward_keeps_128x128_with_tma_at_head_dim_128():
    kept = _kept("fwd", "sm_90", d=128)
    assert any(_elements(c) == 128 * 128 and c.kwargs["USE_TMA"] for c in kept), _names(kept)
    for d in attn.HEAD_DIMS:  # every head dim: the autotuner can pick TMA on Hopper
        assert any(c.kwargs["USE_TMA"] for c in _kept("fwd", "sm_90", d=d)), d
    for dtypes in ("fp32", "fp32-ieee"):  # and fp32, with tf32 or IEEE dots
        assert any(c.kwargs["USE_TMA"] for c in _kept("fwd", "sm_90", dtypes, d=64)), dtypes


def test_pruner_rules():
    """TMA configs only on sm_90 and only for tensors that suit descriptors; no block longer than
    the (power-of-two) sequence beyond 64; the GPU's shared memory bounds the configs."""
    for arch in ARCHES:
        for kind in attn_configs.TUNED_KERNELS:
            assert not any(c.kwargs.get("USE_TMA") for c in _kept(kind, arch, tma_ok=False))
            short = _kept(kind, arch, t=16, s=4096)
            assert short and all(c.kwargs["BLOCK_M"] <= 64 for c in short), kind
    assert not any(c.kwargs.get("USE_TMA") for kind in attn_configs.TUNED_KERNELS for c in _kept(kind, "sm_80"))
    assert not any(c.kwargs.get("USE_TMA") for kind in attn_configs.TUNED_KERNELS for c in _kept(kind, "sm_86"))
    small = attn_configs.kept_configs("fwd", "sm_90", "16-bit", 128, False, True, 4096, 4096, shared_limit=101376)
    assert small and len(small) < len(_kept("fwd", "sm_90", d=128))


def test_no_table_entry_falls_back_to_the_smallest_single_stage_config():
    kept = attn_configs.kept_configs("dkdv", "sm_90", "16-bit", 48, False, True, 4096, 4096)  # no such head dim
    smallest = attn_configs.smallest_config("dkdv", "16-bit")
    assert [(_elements(c), c.num_stages) for c in kept] == [(_elements(smallest), 1)]


def _union_of_kept_configs(kind):
    """Every config the pruner keeps on sm_80 or sm_90 for any dtype, head dim and GROUP, once per
    (BLOCK_M, BLOCK_N, USE_TMA): warps and stages do not exist in the interpreter."""
    seen = {}
    for arch in ARCHES:
        for _, dtypes, d, grouped in CONFIG_KEYS:
            for cfg in _kept(kind, arch, dtypes, d, grouped):
                seen.setdefault(tuple(sorted(cfg.kwargs.items())), cfg)
    return list(seen.values())


def _pinned_rounds():
    """Rounds of (fwd, dq, dkdv) configs covering every kept config of every kernel."""
    union = {kind: _union_of_kept_configs(kind) for kind in attn_configs.TUNED_KERNELS}
    rounds = max(len(configs) for configs in union.values())
    return [{kind: configs[i % len(configs)] for kind, configs in union.items()} for i in range(rounds)]


@pytest.mark.skipif(ON_GPU, reason="the interpreter's check; on a GPU the autotuner runs these configs")
@pytest.mark.parametrize("configs", _pinned_rounds(), ids=lambda r: _names(r.values()))
def test_every_kept_config_runs_correctly_under_the_interpreter(configs):
    """Each tile and load path the real pruner can pick (union of sm_80 and sm_90) on a ragged GQA
    case with T != S that crosses a 128-key block and keeps every mask region busy."""
    with attn_configs.pinned_configs(**configs):
        _check(1, 70, 150, 2, 1, 16, True, 100, 2)


@pytest.mark.slow
@pytest.mark.parametrize("configs", _pinned_rounds(), ids=lambda r: _names(r.values()))
@pytest.mark.parametrize("shape", [(1, 150, 150, 2, 2, 64, False, None, 0), (2, 130, 257, 4, 2, 80, True, None, 3),
                                   (1, 129, 129, 2, 1, 128, True, 50, 0)])
def test_every_kept_config_on_more_shapes(configs, shape, device):
    with attn_configs.pinned_configs(**configs):
        _check(*shape, device=device)


def test_tma_path_on_packed_views_gqa_padded_head_dim(device):
    """Tensor-descriptor loads and stores (forward, dQ) on q, k, v views of one packed tensor,
    GQA, a head dim padded to a power of two, T < S with a window and doc ids."""
    tma = {"fwd": triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "USE_TMA": True}),
           "dq": triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "USE_TMA": True})}
    gen = torch.Generator().manual_seed(10)
    b, t, h, h_kv, d = 1, 90, 4, 2, 80
    qkv = torch.randn(b, t, h + 2 * h_kv, d, generator=gen).to(device)
    q, k, v = qkv[:, 20:, :h], qkv[:, :, h:h + h_kv], qkv[:, :, h + h_kv:]
    assert attn_configs.suits_tma(q, k, v)
    do = torch.randn(q.shape, generator=gen).to(device)
    docs = _doc_ids(b, t, 2, gen, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with attn_configs.pinned_configs(**tma):
        out = attn.flash_attention(q, k, v, causal=True, window=30, doc_ids=docs)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ref, _, *grads = _reference(q, k, v, do, True, None, 30, docs)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *grads)):
        assert_rel_close(got, want, tol(torch.float32, tf32=ON_GPU), name)


def test_tensors_that_do_not_suit_descriptors_take_pointer_configs(device):
    """A view 8 bytes off alignment, a head stride that is not a multiple of 16 bytes, or an
    expanded sequence axis: no TMA (the pruner drops those configs); the result is still right."""
    base = torch.randn(1, 40, 2, 20, device=device)
    assert attn_configs.suits_tma(base[..., :16])
    assert not attn_configs.suits_tma(base[..., 2:18])  # data pointer 8 bytes into a row
    assert not attn_configs.suits_tma(torch.randn(1, 40, 2, 18, device=device)[..., :16])  # 72-byte head stride
    assert not attn_configs.suits_tma(torch.randn(1, 1, 2, 16, device=device).expand(1, 40, 2, 16))
    q, k, v = base[..., 2:18], base[..., 1:17], base[..., :16]
    out = attn.flash_attention(q, k, v)
    assert_rel_close(out, attention_spec.reference(q.double(), k.double(), v.double()),
                     tol(torch.float32, tf32=ON_GPU), "out")


@pytest.mark.skipif(ON_GPU, reason="CPU interpreter check; the GPU version is test_long_packed_sequence_on_gpu")
def test_row_offsets_past_2_to_the_31():
    """T x sequence stride > 2^31 elements (a long packed QKV sequence): offsets are int64. The
    views share one 4.4 GB buffer of which only the rows read are ever touched."""
    t, stride, d, window = 2100, 1 << 20, 16, 40
    assert (t - 1) * stride >= 2**31
    buf = torch.empty(t * stride, dtype=torch.float16)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.as_strided(buf, (1, t, 1, d), (0, stride, d, 1), i * d) for i in range(3))
    for x in (q, k, v):
        x.copy_(torch.randn(x.shape, generator=gen).half())
    do = torch.randn(1, t, 1, d, generator=gen).half()
    out, lse = attn.flash_attn_fwd(q, k, v, True, 0.25, window, None)
    dq, dk, dv = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 0.25, window, None)
    ref, _, *grads = _reference(q, k, v, do, True, 0.25, window, None)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *grads)):
        assert_rel_close(got, want, tol(torch.float16), name)


def test_fp32_dot_precision_follows_torch(monkeypatch):
    """'highest' float32 matmul precision means IEEE dots (as PyTorch's own fp32 matmuls), else
    tf32; the precision is a table key and an autotune key."""
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert checks.input_precision(torch.float32) == "ieee"
    assert checks.input_precision(torch.bfloat16) == "tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert checks.input_precision(torch.float32) == "tf32"
    assert attn_configs.dtype_class(torch.float32, "ieee") == "fp32-ieee"
    assert all("INPUT_PRECISION" in kernel.keys for kernel in TUNED_KERNELS.values())


def test_autotune_choice_is_cached_on_disk_where_triton_can():
    """Two processes on one GPU must run the same configs: each kernel's autotuner caches its
    choice on disk (Triton >= 3.3's cache_results), and no config has a pre_hook (which would
    disable that cache). Checked outside the interpreter, where the cache applies."""
    code = ("from tritongpt.kernels import attention as a\n"
            "kernels = (a._attn_fwd_kernel, a._attn_bwd_dq_kernel, a._attn_bwd_dkdv_kernel)\n"
            "print([(k.cache_results, any(c.pre_hook for c in k.configs)) for k in kernels])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == str([(True, False)] * 3)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan")])
def test_softmax_scale_must_be_positive(scale, device):
    q, k, v = _qkv(device)
    with pytest.raises(TritonGPTError, match="softmax_scale"):
        attn.flash_attention(q, k, v, softmax_scale=scale)


# ----------------------------------------------------------------------------------------------
# slow (CPU): every head dim, bigger batches/heads, GQA 4 with windows and documents
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("d", attn.HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
def test_every_head_dim(d, causal, device):
    _check(1, 130, 130, 2, 1, d, causal, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_larger_shapes(dtype, device):
    _check(2, 300, 513, 8, 2, 64, True, 200, 5, dtype, device=device)
    _check(2, 513, 513, 4, 4, 96, False, None, 0, dtype, device=device)


# ----------------------------------------------------------------------------------------------
# gpu: bf16, long sequences, every head dim, determinism, the 2x-PyTorch error rule
# ----------------------------------------------------------------------------------------------

def _errors_vs_pytorch(b, t, s, h, h_kv, d, causal, window, n_docs, dtype):
    """(our errors, PyTorch's errors) of out, dq, dk, dv in `dtype` vs the float64 reference."""
    device = torch.device("cuda")
    q, k, v, do, docs = _inputs(b, t, s, h, h_kv, d, dtype, device, seed=7, n_docs=n_docs)
    out64, _, *grads64 = _reference(q, k, v, do, causal, None, window, docs)
    ref = (out64, *grads64)
    errors = []
    for fn in (attn.flash_attention, attention_backends.sdpa):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv, causal, None, window, docs)
        out.backward(do)
        errors.append([rel_err(x, r) for x, r in zip((out, qq.grad, kk.grad, vv.grad), ref)])
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,s,h,h_kv,d,causal,window,n_docs", [
    (2, 1024, 1024, 8, 8, 64, True, None, 0),
    (1, 4096, 4096, 4, 1, 128, True, None, 0),
    (1, 4096, 4096, 4, 2, 64, True, 512, 6),
    (1, 1000, 1500, 4, 2, 80, True, None, 0),
    (2, 777, 777, 4, 4, 256, False, None, 3),
])
def test_bf16_within_2x_pytorch_error(b, t, s, h, h_kv, d, causal, window, n_docs):
    ours, theirs = _errors_vs_pytorch(b, t, s, h, h_kv, d, causal, window, n_docs, torch.bfloat16)
    for name, e_ours, e_torch in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert e_ours <= tol(torch.bfloat16), (name, e_ours)
        assert e_ours <= 2 * e_torch, f"{name}: our bf16 error {e_ours:.3g} > 2x PyTorch's {e_torch:.3g}"


@pytest.mark.gpu
def test_fp16_within_2x_pytorch_error_16k_tokens():
    ours, theirs = _errors_vs_pytorch(1, 16384, 16384, 1, 1, 64, True, None, 0, torch.float16)
    for name, e_ours, e_torch in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert e_ours <= 2 * e_torch, f"{name}: our fp16 error {e_ours:.3g} > 2x PyTorch's {e_torch:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("d", attn.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_head_dim_on_gpu(d, dtype):
    device = torch.device("cuda")
    if dtype == torch.bfloat16:
        q, k, v, do, docs = _inputs(2, 333, 333, 4, 2, d, dtype, device, seed=8, n_docs=2)
        out, lse = attn.flash_attn_fwd(q, k, v, True, 1 / math.sqrt(d), None, docs)
        grads = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 1 / math.sqrt(d), None, docs)
        expected = _reference(q, k, v, do, True, None, None, docs)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected[0], *expected[2:])):
            assert_rel_close(got, want, tol(dtype), name)
    else:
        _check(2, 333, 333, 4, 2, d, True, None, 2, dtype, device=device)


@pytest.mark.gpu
def test_long_backward_is_deterministic_on_gpu():
    q, k, v, do, docs = _inputs(2, 4096, 4096, 8, 2, 128, torch.bfloat16, torch.device("cuda"), seed=9, n_docs=4)
    out, lse = attn.flash_attn_fwd(q, k, v, True, 0.1, None, docs)
    first = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 0.1, None, docs)
    second = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 0.1, None, docs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_every_kept_config_on_gpu():
    """Each config the pruner keeps on this GPU (bf16, D = 64 and 128, GQA, causal with doc ids),
    pinned one at a time: every tile and load path the autotuner may pick is right."""
    device = torch.device("cuda")
    arch, shared = attn_configs._device_arch(device)
    for d in (64, 128):
        union = {kind: attn_configs.kept_configs(kind, arch, "16-bit", d, True, True, 1024, 1024, shared)
                 for kind in attn_configs.TUNED_KERNELS}
        q, k, v, do, docs = _inputs(2, 1000, 1000, 4, 2, d, torch.bfloat16, device, seed=12, n_docs=3)
        expected = _reference(q, k, v, do, True, None, None, docs)
        for i in range(max(len(c) for c in union.values())):
            configs = {kind: cs[i % len(cs)] for kind, cs in union.items()}
            with attn_configs.pinned_configs(**configs):
                out, lse = attn.flash_attn_fwd(q, k, v, True, 1 / math.sqrt(d), None, docs)
                grads = attn.flash_attn_bwd(do, q, k, v, out, lse, True, 1 / math.sqrt(d), None, docs)
            label = _names(configs.values())
            for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected[0], *expected[2:])):
                assert_rel_close(got, want, tol(torch.bfloat16), f"{name} [{label}]")


@pytest.mark.gpu
def test_fp32_highest_precision_is_ieee_on_gpu():
    """With float32 matmul precision 'highest' the kernels use IEEE dots: fp32's 1e-5, not tf32's 1e-3."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check(1, 300, 300, 4, 2, 64, True, None, 2, torch.float32, device=torch.device("cuda"), tf32=False)
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
def test_long_packed_sequence_on_gpu():
    """Packed QKV at H * D = 4096 and T = 175k: T x sequence stride passes 2^31 elements. A
    window keeps it fast; the last 512 queries are checked against the reference."""
    device = torch.device("cuda")
    t, h, d, window, tail = 175_000, 32, 128, 256, 512
    gen = torch.Generator(device).manual_seed(13)
    qkv = torch.randn(1, t, 3, h, d, generator=gen, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert (t - 1) * q.stride(1) >= 2**31
    out = attn.flash_attention(q, k, v, causal=True, window=window)
    keys = slice(t - tail - window, t)
    ref = attention_spec.reference(q[:, -tail:].double(), k[:, keys].double(), v[:, keys].double(), True, None,
                                   window)
    assert_rel_close(out[:, -tail:], ref, tol(torch.bfloat16), "out tail")
    assert torch.isfinite(out).all()
