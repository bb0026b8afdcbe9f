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


# Packed-document cases: documents back to back with lengths drawn from a lognormal of this median
# (tokens) and sigma, the last one cut at T. Shaped like FineWeb's GPT-2-token lengths (most
# documents under 1k tokens, a long tail of long ones): an assumption for benchmarking, not a fit.
DOC_MEDIAN, DOC_SIGMA = 400, 1.0
PACKED_SEQS = (1024, 2048, 8192)  # GPT-2's and longer contexts


def packed_doc_ids(batch: int, seq_len: int, median: int, seed: int) -> torch.Tensor:
    """(batch, seq_len) int64 doc ids of packed documents (non-decreasing: 0, 0, ..., 1, 1, ...),
    each row its own draw of lengths; the same for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            draw = torch.empty(1).log_normal_(math.log(median), DOC_SIGMA, generator=gen)
            lengths.append(max(1, round(draw.item())))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq_len])
    return torch.stack(rows)


def _doc_ids_of(case: Case) -> torch.Tensor | None:
    """The doc ids of a packed-document case (None for the others): fixed per case, so `work`
    counts the pairs the inputs have."""
    median = dict(case.options).get("docs")
    return None if median is None else packed_doc_ids(case["B"], case["T"], median, seed=case["T"])


def cases(quick: bool) -> list[Case]:
    """B*T tokens fixed, H*D fixed, T swept, D in two sizes, causal and not; and packed documents
    (causal, documents of median length DOC_MEDIAN) at GPT-2's heads, H=12 and D=64."""
    tokens, width = (64, 32) if quick else (16384, 2048)
    seqs = (16, 64) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    head_dims = (16, 32) if quick else (64, 128)
    swept = [Case("attention", (("B", tokens // t), ("T", t), ("H", width // d), ("D", d)), t,
                  f"D={d} {'causal' if causal else 'full'}", (("causal", causal),))
             for d in head_dims for causal in (True, False) for t in seqs]
    heads, d, median = (2, 16, 12) if quick else (12, 64, DOC_MEDIAN)
    packed = [Case("attention", (("B", max(1, tokens // t)), ("T", t), ("H", heads), ("D", d)), t,
                   f"D={d} causal packed docs", (("causal", True), ("docs", median)))
              for t in ((64,) if quick else PACKED_SEQS)]
    return swept + packed


LONG_SEQ = 16384  # the long-sequence case `verify` adds to a model's own shape


def model_cases(shape: ModelShape) -> list[Case]:
    """The model's causal self-attention, the same with packed documents (training with
    --doc-mask), and one long sequence (the same tokens per step when that allows a whole
    sequence) with its heads."""
    def case(b: int, t: int, docs: int | None = None) -> Case:
        dims = (("B", b), ("T", t), ("H", shape.n_head), ("Hkv", shape.n_kv_head), ("D", shape.head_dim))
        options = (("causal", True),) + ((("docs", docs),) if docs else ())
        return Case("attention", dims, t, f"D={shape.head_dim} causal" + (" packed docs" if docs else ""), options)
    long_t = max(LONG_SEQ, shape.seq_len)
    return [case(shape.batch, shape.seq_len), case(shape.batch, shape.seq_len, min(DOC_MEDIAN, shape.seq_len // 4)),
            case(max(1, shape.batch * shape.seq_len // long_t), long_t)]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """q (B, T, H, D); k and v with Hkv heads (H when the case has no Hkv); doc ids for packed cases."""
    b, t, h, d = case["B"], case["T"], case["H"], case["D"]
    h_kv = dict(case.dims).get("Hkv", h)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=device).to(dtype)
                     for shape in ((b, t, h, d), (b, t, h_kv, d), (b, t, h_kv, d), (b, t, h, d)))
    kwargs = {"causal": case["causal"]}
    docs = _doc_ids_of(case)
    if docs is not None:
        kwargs["doc_ids"] = docs.to(device)
    return Inputs((q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), kwargs, dout)


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """4*H*D FLOPs forward (two matmuls) per visible (query, key) pair, counted as B*T*S (halved
    when causal), or per packed document L^2 / 2; backward 2.5x forward."""
    docs = _doc_ids_of(case)
    if docs is None:
        pairs = case["B"] * case["T"] * case["T"] * (0.5 if case["causal"] else 1.0)
    else:
        pairs = 0.5 * sum(float((torch.unique_consecutive(row, return_counts=True)[1].double() ** 2).sum())
                          for row in docs)
    fwd = 4 * case["H"] * case["D"] * pairs
    return "tflops", fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


TILE = 128  # the tile `tiles` counts in: FlashAttention's forward tile (BLOCK_M = BLOCK_N = 128)


def tiles(case: Case) -> int:
    """TILE x TILE (query block, key block) tiles the Triton forward visits over the whole call
    (every batch row and head): what packed documents save, beside time in benchmark rows."""
    from tritongpt.kernels import attention_blocks  # lazy: imports triton; the spec loads without it

    docs = _doc_ids_of(case)
    rows = 1 if docs is None else case["B"]  # without doc ids every row visits the same tiles
    per_head = attention_blocks.visited_blocks("fwd", case["T"], case["T"], case["causal"], None, docs, TILE, TILE)
    return per_head * case["H"] * case["B"] // rows


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
              chunked_oracle=chunked_oracle, tiles=tiles)
registry.register_op(SPEC)
