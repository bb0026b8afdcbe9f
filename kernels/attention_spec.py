"""The `attention` op's contract: its input checks, its masks, its plain-PyTorch reference
(backend `torch`), and the spec that drives tests, benchmarks and `tritongpt verify`. Its other
backends (PyTorch's SDPA, flash-attn) are `kernels/attention_backends.py`; the Triton kernel is
`kernels/attention.py`.

    softmax(q k^T * scale + mask) v,   q (B, T, H, D), k and v (B, S, Hkv, D), Hkv dividing H

Queries align bottom-right: query i sits at key position i + S - T. `causal` hides later keys;
a `window` w keeps the w keys pos(i) - w < j <= pos(i) (counting the query's own position, causal
only); `doc_ids` (B, S) keep keys of the query's own document.
"""

from __future__ import annotations

import math

import torch

from tritongpt.errors import require
from tritongpt.kernels import checks, registry
from tritongpt.kernels.spec import Case, Inputs, ModelShape, OpSpec, call, first, grads

# ----------------------------------------------------------------------------------------------
# Input checks, shared by every backend


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
          doc_ids: torch.Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Checks attention inputs, layout (batch, seq, heads, head_dim); k/v may have fewer heads
    (grouped-query). Returns (B, T, S, H, H_kv, D): T query length, S key length."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require(t.dim() == 4, f"attention: {name} must be (batch, seq, heads, head_dim), got {checks.describe(t)}")
    checks.same_kind("attention", "q", q, k=k, v=v)
    b, t, h, d = q.shape
    _, s, h_kv, _ = k.shape
    require(k.shape == v.shape, f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    require(k.shape[0] == b, f"attention: batch of k/v ({k.shape[0]}) != batch of q ({b})")
    require(k.shape[3] == d, f"attention: head_dim of k/v ({k.shape[3]}) != head_dim of q ({d})")
    require(t >= 1 and s >= 1, f"attention: sequence lengths must be >= 1, got q {t}, k {s}")
    require(h_kv >= 1 and h % h_kv == 0, f"attention: q heads ({h}) must be a multiple of k/v heads ({h_kv})")
    require(not causal or t <= s,
            f"attention: causal attention needs query length ({t}) <= key length ({s}) (queries align bottom-right)")
    if window is not None:
        require(isinstance(window, int) and window >= 1, f"attention: window must be an int >= 1, got {window!r}")
        require(causal, "attention: window (sliding attention over previous keys) needs causal=True")
    if doc_ids is not None:
        require(doc_ids.shape == (b, s),
                f"attention: doc_ids must be (batch, key_len) = ({b}, {s}), got {tuple(doc_ids.shape)}")
        require(not doc_ids.dtype.is_floating_point and doc_ids.dtype != torch.bool,
                f"attention: doc_ids must be an integer tensor, got {doc_ids.dtype}")
        require(doc_ids.device == q.device, f"attention: doc_ids is on {doc_ids.device} but q is on {q.device}")
        require(t <= s, f"attention: doc_ids need query length ({t}) <= key length ({s}): queries take the last "
                        f"{t} key positions' documents")
    return b, t, s, h, h_kv, d


# ----------------------------------------------------------------------------------------------
# Masks and the reference


def attention_mask(t: int, s: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask, True where query i may see key j: (T, S), or (B, 1, T, S) with doc_ids."""
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


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, window: int | None = None,
              doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T * scale + mask) v. Returns (B, T, H, D). Materializes the (T, S)
    scores: the reference, not a fast path."""
    b, t, s, h, h_kv, d = check(q, k, v, causal, window, doc_ids)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k.repeat_interleave(h // h_kv, dim=2)  # (B, S, H, D): each k/v head serves h // h_kv q heads
    v = v.repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    mask = attention_mask(t, s, causal, window, doc_ids, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)


# ----------------------------------------------------------------------------------------------
# The spec: benchmark sweep, inputs, work


def cases(quick: bool) -> list[Case]:
    """B*T tokens fixed, H*D fixed, T swept, D in two sizes, causal and not."""
    tokens, width = (64, 32) if quick else (16384, 2048)
    seqs = (16, 64) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    head_dims = (16, 32) if quick else (64, 128)
    return [Case("attention", (("B", tokens // t), ("T", t), ("H", width // d), ("D", d)), t,
                 f"D={d} {'causal' if causal else 'full'}", (("causal", causal),))
            for d in head_dims for causal in (True, False) for t in seqs]


LONG_SEQ = 16384  # the long-sequence case `verify` adds to a model's own shape


def model_cases(shape: ModelShape) -> list[Case]:
    """The model's causal self-attention, and one long sequence (the same tokens per step when
    that allows a whole sequence) with its heads."""
    def case(b: int, t: int) -> Case:
        dims = (("B", b), ("T", t), ("H", shape.n_head), ("Hkv", shape.n_kv_head), ("D", shape.head_dim))
        return Case("attention", dims, t, f"D={shape.head_dim} causal", (("causal", True),))
    long_t = max(LONG_SEQ, shape.seq_len)
    return [case(shape.batch, shape.seq_len), case(max(1, shape.batch * shape.seq_len // long_t), long_t)]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """q (B, T, H, D); k and v with Hkv heads (H when the case has no Hkv)."""
    b, t, h, d = case["B"], case["T"], case["H"], case["D"]
    h_kv = dict(case.dims).get("Hkv", h)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=device).to(dtype)
                     for shape in ((b, t, h, d), (b, t, h_kv, d), (b, t, h_kv, d), (b, t, h, d)))
    return Inputs((q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), {"causal": case["causal"]}, dout)


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """4*B*H*T*S*D FLOPs forward (two matmuls), halved when causal; backward 2.5x forward."""
    fwd = 4 * case["B"] * case["H"] * case["T"] * case["T"] * case["D"] * (0.5 if case["causal"] else 1.0)
    return "tflops", fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


ORACLE_CHUNK_BYTES = 2 << 30  # the reference runs a few heads at a time, keeping its scores under this


def chunked_oracle(inputs: Inputs, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference over a few heads at a time (heads are independent): its (T, S) scores would
    not fit in memory at 16k tokens otherwise."""
    q, k, v = inputs.args
    b, t, h, _ = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    scores_bytes = b * t * s * torch.finfo(dtype).bits // 8
    kv_heads = max(1, ORACLE_CHUNK_BYTES // (4 * scores_bytes * group))  # scores, probs and their grads
    outs, dq, dk, dv = [], [], [], []
    for j in range(0, h_kv, kv_heads):
        heads = slice(j * group, (j + kv_heads) * group)
        part = Inputs((q[:, :, heads], k[:, :, j:j + kv_heads], v[:, :, j:j + kv_heads]), inputs.kwargs,
                      inputs.dout[:, :, heads]).detached(dtype)
        out = call(reference, part)
        for acc, g in zip((dq, dk, dv), grads(out, part)):
            acc.append(g)
        outs.append(first(out).detach())
    return torch.cat(outs, dim=2), [torch.cat(g, dim=2) for g in (dq, dk, dv)]


SPEC = OpSpec("attention", reference, cases, make_inputs, work, size_label="T", model_cases=model_cases,
              chunked_oracle=chunked_oracle)
registry.register_op(SPEC)
