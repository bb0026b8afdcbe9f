"""Triton flash attention (kernels/attention.py) against the explicit-softmax reference run in
float64: output, log-sum-exp and dq/dk/dv, over causal / non-causal, ragged lengths, query
length != key length, grouped-query heads, sliding windows and document masks.

    python -m pytest -q tests/test_attention.py            # CPU: Triton interpreter, fp32/fp16
    python -m pytest -q -m slow tests/test_attention.py    # every head dim, larger shapes
    python -m pytest -q -m gpu tests/test_attention.py     # bf16, 4k/16k tokens, PyTorch error rule
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _util import assert_rel_close, poison, rel_err, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import attention as attn
from tritongpt.kernels import attention_spec, registry

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
           device=CPU, seed=0):
    """Launch forward and backward into NaN-poisoned buffers and compare all five outputs."""
    q, k, v, do, docs = _inputs(b, t, s, h, h_kv, d, dtype, device, seed, n_docs)
    softmax_scale = scale if scale is not None else 1 / math.sqrt(d)
    out, lse = poison(torch.empty_like(q)), poison(torch.empty(b, h, t, device=device))
    attn.flash_attn_fwd(q, k, v, causal, softmax_scale, window, docs, out=out, lse=lse)
    dq, dk, dv = (poison(torch.empty_like(x)) for x in (q, k, v))
    attn.flash_attn_bwd(do, q, k, v, out, lse, causal, softmax_scale, window, docs, dq=dq, dk=dk, dv=dv)
    expected = _reference(q, k, v, do, causal, scale, window, docs)
    limit = tol(dtype, tf32=device.type == "cuda")
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
    """The same fp32 inputs through F.scaled_dot_product_attention (via attention_spec.sdpa)."""
    q, k, v, _, docs = _inputs(1, 33, 65, 4, 2, 32, torch.float32, device, seed=2, n_docs=n_docs)
    ours = attn.flash_attention(q, k, v, causal, None, window, docs)
    theirs = attention_spec.sdpa(q, k, v, causal, None, window, docs)
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
    for fn in (attn.flash_attention, attention_spec.reference, attention_spec.sdpa):
        with pytest.raises(TritonGPTError, match=r"doc_ids need query length \(8\) <= key length \(4\)"):
            fn(q, k, v, causal=False, doc_ids=doc_ids)


def test_preallocated_outputs_are_checked(device):
    q, k, v = _qkv(device)
    with pytest.raises(TritonGPTError, match="dtype"):
        attn.flash_attn_fwd(q, k, v, True, 0.25, None, None, out=torch.empty_like(q, dtype=torch.float16))


def test_autotune_pruning():
    """Every kernel keeps a config for every head dim in fp16/bf16, with or without doc ids, and
    D=256 drops the big tiles; fp32 at D=256 falls back to one single-stage config; short
    sequences drop long blocks."""
    tables = {"fwd": attn._FWD_CONFIGS, "dq": attn._DQ_CONFIGS, "dkdv": attn._DKDV_CONFIGS}

    def prune(kind, dtype, t, s, d, docs=False):
        q = torch.empty(1, t, 2, d, dtype=dtype)
        return attn._pruner(kind)(tables[kind], {"Q": q, "HEAD_DIM": d}, t_bucket=t, s_bucket=s, HAS_DOCS=docs)

    for kind, configs in tables.items():
        for d in attn.HEAD_DIMS:
            for docs in (False, True):
                assert any(attn.fits(kind, c, d, 2, docs) for c in configs), (kind, d, docs)
        assert not all(attn.fits(kind, c, 256, 2, False) for c in configs), kind
        assert [c.num_stages for c in prune(kind, torch.float32, 4096, 4096, 256)] == [1]
        assert all(c.kwargs["BLOCK_M"] <= 64 for c in prune(kind, torch.float16, 1, 4096, 64))
        with_docs, plain = (prune(kind, torch.float16, 4096, 4096, 64, docs) for docs in (True, False))
        assert 1 <= len(with_docs) <= len(plain) and len(plain) > 1


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
    for fn in (attn.flash_attention, attention_spec.sdpa):
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
