"""Flash attention (FA2-style) forward and backward in Triton.

Layout (batch, seq, heads, head_dim). q, k, v may be strided views (e.g. of one packed
(B, T, 3, H, D) tensor): every kernel takes all four strides of each tensor and never copies.

Forward: each program owns BLOCK_M queries of one (batch, head) and streams BLOCK_N keys at a
time, keeping the running max / sum of an online softmax in base 2 (scale * log2(e) folded
into the scores). It saves the log2-sum-exp2 of each query row (`lse`) for backward.
Backward recomputes the probabilities from `lse`: a preprocess computes delta = rowsum(dO * O),
a dK/dV pass runs one program per BLOCK_N keys of one k/v head (looping over that head's group
of query heads, so grouped-query dk/dv are summed in a fixed order without atomics), and a dQ
pass runs one program per BLOCK_M queries. Both passes are deterministic.

Masks (same semantics as `attention_spec.attention_mask`): query i sits at key position
pos(i) = i + S - T; causal keeps keys j <= pos(i); a window w keeps j > pos(i) - w; doc ids
keep keys of the query's own document. Key blocks that causal/window bounds exclude are never
visited; blocks they keep entirely run without any position mask (`CHECK_POS=False`).

Hopper: this is a plain pointer kernel (tl.dot compiles to wgmma on sm_90, mma on sm_80);
there is no TMA / warp-specialized path.

    python -m pytest -q tests/test_attention.py
    tritongpt kernels compile --arch sm_90 --filter attn
"""

import functools
import math

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import attention_spec, checks, compile_report, registry
from tritongpt.kernels.registry import interpreting

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
_LOG2E = tl.constexpr(1.4426950408889634)  # scores * scale * log2(e), then exp2 == exp


# ----------------------------------------------------------------------------------------------
# Autotune configs: a short list per kernel, pruned per call by head dim, dtype and seq lengths
# ----------------------------------------------------------------------------------------------

def _configs(table: dict) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


# (BLOCK_M, BLOCK_N, warps, stages) -> (smallest head dim, largest head dim, largest head dim with
# doc ids) the config compiles for at 16-bit without register spills or shared-memory overflow on
# both sm_80 and sm_90, as measured by `tritongpt kernels compile` (Triton 3.9; a config that
# reached 254-255 registers at some head dim is kept below it). Forward and dQ hold BLOCK_M
# queries and stream BLOCK_N keys; dK/dV holds BLOCK_N keys (two fp32 accumulators) and streams
# BLOCK_M queries. At head_dim 256 dK/dV uses 32-key blocks over 8 warps: mma.sync even on sm_90.
_FWD_TABLE = {(64, 32, 4, 3): (16, 128, 128), (64, 32, 8, 2): (256, 256, 256), (64, 64, 4, 3): (16, 64, 64),
              (64, 64, 8, 2): (64, 128, 128), (128, 32, 4, 3): (16, 64, 32), (128, 64, 8, 3): (16, 128, 64),
              (128, 128, 8, 2): (16, 32, 32)}
_DQ_TABLE = {(64, 16, 8, 2): (256, 256, 256), (64, 32, 4, 3): (16, 128, 64), (64, 32, 8, 2): (16, 256, 128),
             (64, 64, 4, 2): (16, 64, 32), (128, 32, 8, 3): (16, 128, 64), (128, 64, 8, 2): (16, 64, 32)}
_DKDV_TABLE = {(16, 32, 8, 1): (256, 256, 256), (16, 32, 8, 2): (16, 256, 128), (16, 64, 4, 2): (16, 64, 32),
               (16, 128, 8, 2): (16, 128, 32), (32, 64, 4, 2): (16, 16, 16), (32, 128, 8, 3): (16, 32, 16),
               (64, 64, 4, 2): (16, 32, 16), (64, 128, 8, 2): (16, 32, 16)}
_TABLES = {"fwd": _FWD_TABLE, "dq": _DQ_TABLE, "dkdv": _DKDV_TABLE}
_FWD_CONFIGS, _DQ_CONFIGS, _DKDV_CONFIGS = (_configs(t) for t in (_FWD_TABLE, _DQ_TABLE, _DKDV_TABLE))


def fits(kind: str, cfg: triton.Config, head_dim: int, elem_bytes: int, doc_ids: bool) -> bool:
    """Whether `cfg` of kernel `kind` compiles without spills at this head dim, element size and
    doc-id masking (an fp32 tile counts as a 16-bit tile of twice the head dim)."""
    key = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
    smallest, largest, largest_with_docs = _TABLES[kind][key]
    width = head_dim * elem_bytes // 2
    return smallest <= width <= (largest_with_docs if doc_ids else largest)


def _smallest(configs: list) -> triton.Config:
    return min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))


def _pruner(kind: str):
    """early_config_prune for kernel `kind`: drop configs that do not fit this head dim / dtype, or
    whose blocks are longer than the sequences (rounded up to a power of two)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t, s = args["t_bucket"], args["s_bucket"]
        kept = [c for c in configs if fits(kind, c, args["HEAD_DIM"], args["Q"].element_size(), args["HAS_DOCS"])]
        if not kept:  # e.g. fp32 at head_dim 256: the smallest tiles, without multi-stage buffering
            c = _smallest(configs)
            return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=1)]
        short = [c for c in kept if c.kwargs["BLOCK_M"] <= max(t, 64) and c.kwargs["BLOCK_N"] <= max(s, 64)]
        return short or kept
    return prune


def _autotune(kind: str, configs: list):
    """Tuned once per (power-of-two bucket of T and of S, head dim, masks, dtypes): a decode loop
    whose key length grows by one per step does not re-tune at every step."""
    key = ["t_bucket", "s_bucket", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS"]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _pruner(kind)})


# ----------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(
    ptrs,  # (R, BLOCK_D) pointers
    rows_ok,  # (R,) rows inside the tensor
    cols_ok,  # (BLOCK_D,) columns inside head_dim
    CHECK_ROWS: tl.constexpr,  # rows may run past the sequence end
    CHECK_COLS: tl.constexpr,  # BLOCK_D > head_dim (padded to a power of two)
):
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _visible(
    pos_q,  # key position of each query (broadcasts against pos_k)
    pos_k,  # key positions
    doc_q,  # document id of each query (ignored unless HAS_DOCS)
    doc_k,  # document id of each key (ignored unless HAS_DOCS)
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    CHECK_POS: tl.constexpr,  # apply the causal / window / key-length masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """True where a query may see a key. Call only when CHECK_POS or HAS_DOCS."""
    if CHECK_POS:
        ok = pos_k < S
        if CAUSAL:
            ok = ok & (pos_k <= pos_q)
        if HAS_WINDOW:
            ok = ok & (pos_k > pos_q - window)
        if HAS_DOCS:
            ok = ok & (doc_q == doc_k)
    else:
        ok = doc_q == doc_k
    return ok


@triton.jit
def _key_bounds(
    start_m,  # index of the query block
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Keys [lo, hi) that queries start_m * BLOCK_M + [0, BLOCK_M) may see, split so that key
    blocks starting in [full_lo, full_hi) are visible to every query of the block (no mask)."""
    first = start_m * BLOCK_M + S - T  # key position of the block's first query
    last = first + BLOCK_M - 1
    lo = 0
    full_lo = 0
    hi = S
    full_hi = (S // BLOCK_N) * BLOCK_N  # the ragged last key block needs the key-length mask
    if CAUSAL:
        hi = tl.minimum(S, last + 1)
        full_hi = tl.minimum(full_hi, ((first + 1) // BLOCK_N) * BLOCK_N)
        if HAS_WINDOW:
            lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_bounds(
    start_n,  # index of the key block
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Queries [lo, hi) that may see keys start_n * BLOCK_N + [0, BLOCK_N), split so that query
    blocks starting in [full_lo, full_hi) see every key of the block. Query rows past T need no
    mask here: their lse is +inf, so their probabilities are 0."""
    first = start_n * BLOCK_N - (S - T)  # the first key, as a query index (query i sits at i + S - T)
    last = first + BLOCK_N - 1
    lo = 0
    full_lo = 0
    hi = T
    full_hi = T
    if CAUSAL:  # query i sees key j iff i >= j - (S - T)
        lo = (tl.maximum(first, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(last, 0), BLOCK_M) * BLOCK_M
        if HAS_WINDOW:  # ... and i < j - (S - T) + window
            hi = tl.minimum(T, last + window)
            full_hi = (tl.maximum(first + window, 0) // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_inner(
    acc,  # (BLOCK_M, BLOCK_D) fp32 running sum of p @ v
    l_i,  # (BLOCK_M,) fp32 running softmax denominators
    m_i,  # (BLOCK_M,) fp32 running row maxima (base-2 scaled scores)
    q,  # (BLOCK_M, BLOCK_D) query tile
    pos_q,  # (BLOCK_M,) key position of each query
    doc_q,  # (BLOCK_M,) document of each query (ignored unless HAS_DOCS)
    k_base,  # K + this (batch, kv head)
    v_base,  # V + this (batch, kv head)
    doc_base,  # DocIds + this batch
    stride_kt,  # K stride between keys
    stride_vt,  # V stride between keys
    stride_ds,  # DocIds stride between keys
    offs_n,  # arange(0, BLOCK_N)
    offs_d,  # arange(0, BLOCK_D)
    lo,  # first key (multiple of BLOCK_N)
    hi,  # end of keys
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHECK_POS: tl.constexpr,  # these key blocks need the causal / window / key-length masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        pos_k = start_n + offs_n
        k = _load_tile(k_base + pos_k[:, None] * stride_kt + offs_d[None, :], pos_k < S, offs_d < HEAD_DIM,
                       CHECK_POS, HEAD_DIM != BLOCK_D)
        v = _load_tile(v_base + pos_k[:, None] * stride_vt + offs_d[None, :], pos_k < S, offs_d < HEAD_DIM,
                       CHECK_POS, HEAD_DIM != BLOCK_D)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, base-2 scores
        if CHECK_POS or HAS_DOCS:
            doc_k = pos_k
            if HAS_DOCS:
                doc_k = tl.load(doc_base + pos_k * stride_ds, mask=pos_k < S, other=0)
            ok = _visible(pos_q[:, None], pos_k[None, :], doc_q[:, None], doc_k[None, :], S, window,
                          CHECK_POS, CAUSAL, HAS_WINDOW, HAS_DOCS)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if CHECK_POS or HAS_DOCS:  # a row with no visible key yet: avoid -inf - -inf = NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@_autotune("fwd", _FWD_CONFIGS)
@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, T, H, D) queries
    K,  # (B, S, H_kv, D) keys
    V,  # (B, S, H_kv, D) values
    Out,  # (B, T, H, D) output
    Lse,  # (B, H, T) fp32 output: log2-sum-exp2 of each query's scaled scores, for backward
    DocIds,  # (B, S) int document id of each key position (read only when HAS_DOCS)
    stride_qb, stride_qt, stride_qh, stride_qd,  # Q strides
    stride_kb, stride_kt, stride_kh, stride_kd,  # K strides
    stride_vb, stride_vt, stride_vh, stride_vd,  # V strides
    stride_ob, stride_ot, stride_oh, stride_od,  # Out strides
    stride_db, stride_ds,  # DocIds strides
    H,  # query heads
    GROUP,  # query heads per k/v head: H // H_kv
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    sm_scale,  # softmax scale (natural units)
    t_bucket,  # autotune key only: next power of two of T
    s_bucket,  # autotune key only: next power of two of S
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
):
    start_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first
        start_m = tl.num_programs(0) - 1 - start_m
    off_h = tl.program_id(1)  # heads and batch on axes 1 and 2: CUDA caps each at 65535, not their product
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * H + off_h  # row of Lse / Delta
    off_hkv = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   offs_m < T, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    pos_q = offs_m + (S - T)
    doc_q = pos_q
    doc_base = DocIds + off_b * stride_db
    if HAS_DOCS:
        doc_q = tl.load(doc_base + pos_q * stride_ds, mask=offs_m < T, other=0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    qk_scale = sm_scale * _LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_bounds(start_m, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # window's leading edge, the fully visible middle, then the causal diagonal / ragged end
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pos_q, doc_q, k_base, v_base, doc_base,
                               stride_kt, stride_vt, stride_ds, offs_n, offs_d, lo, full_lo, S, window,
                               qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_DOCS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pos_q, doc_q, k_base, v_base, doc_base,
                               stride_kt, stride_vt, stride_ds, offs_n, offs_d, full_lo, full_hi, S, window,
                               qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_DOCS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pos_q, doc_q, k_base, v_base, doc_base,
                               stride_kt, stride_vt, stride_ds, offs_n, offs_d, full_hi, hi, S, window,
                               qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_DOCS)

    empty = l_i == 0.0  # no visible key (only padding rows past T under these masks; guarded anyway)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # +inf: backward's p = 0
    tl.store(Lse + off_bh * T + offs_m, lse, mask=offs_m < T)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # (B, T, H, D) forward output
    DOut,  # (B, T, H, D) gradient of the output
    Delta,  # (B, H, T) fp32 output: rowsum(dO * O)
    stride_ob, stride_ot, stride_oh, stride_od,  # Out strides
    stride_dob, stride_dot, stride_doh, stride_dod,  # DOut strides
    H,  # query heads
    T,  # query length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
):
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)  # heads and batch on axes 1 and 2: CUDA caps each at 65535, not their product
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * H + off_h  # row of Lse / Delta
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   offs_m < T, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    do = _load_tile(DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    offs_m < T, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_inner(
    dk,  # (BLOCK_N, BLOCK_D) fp32 running dK (unscaled)
    dv,  # (BLOCK_N, BLOCK_D) fp32 running dV
    k,  # (BLOCK_N, BLOCK_D) key tile
    v,  # (BLOCK_N, BLOCK_D) value tile
    pos_k,  # (BLOCK_N,) key positions
    doc_k,  # (BLOCK_N,) document of each key (ignored unless HAS_DOCS)
    q_base,  # Q + this (batch, head)
    do_base,  # DOut + this (batch, head)
    lse_base,  # Lse + this (batch, head)
    delta_base,  # Delta + this (batch, head)
    doc_base,  # DocIds + this batch
    stride_qt,  # Q stride between queries
    stride_dot,  # DOut stride between queries
    stride_ds,  # DocIds stride between keys
    offs_m,  # arange(0, BLOCK_M)
    offs_d,  # arange(0, BLOCK_D)
    lo,  # first query (multiple of BLOCK_M)
    hi,  # end of queries
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHECK_POS: tl.constexpr,  # these query blocks need the causal / window masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base + rows[:, None] * stride_qt + offs_d[None, :], rows < T, offs_d < HEAD_DIM,
                       True, HEAD_DIM != BLOCK_D)
        do = _load_tile(do_base + rows[:, None] * stride_dot + offs_d[None, :], rows < T, offs_d < HEAD_DIM,
                        True, HEAD_DIM != BLOCK_D)
        lse = tl.load(lse_base + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if CHECK_POS or HAS_DOCS:
            pos_q = rows + (S - T)
            doc_q = pos_q
            if HAS_DOCS:
                doc_q = tl.load(doc_base + pos_q * stride_ds, mask=rows < T, other=0)
            ok = _visible(pos_q[None, :], pos_k[:, None], doc_q[None, :], doc_k[:, None], S, window,
                          CHECK_POS, CAUSAL, HAS_WINDOW, HAS_DOCS)
            p_t = tl.where(ok, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) fp32
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@_autotune("dkdv", _DKDV_CONFIGS)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, T, H, D) queries
    K,  # (B, S, H_kv, D) keys
    V,  # (B, S, H_kv, D) values
    DOut,  # (B, T, H, D) gradient of the output
    Lse,  # (B, H, T) fp32 from the forward
    Delta,  # (B, H, T) fp32 from the preprocess
    DocIds,  # (B, S) int document ids (read only when HAS_DOCS)
    DK,  # (B, S, H_kv, D) output: gradient of K, summed over the group's query heads
    DV,  # (B, S, H_kv, D) output: gradient of V, summed over the group's query heads
    stride_qb, stride_qt, stride_qh, stride_qd,  # Q strides
    stride_kb, stride_kt, stride_kh, stride_kd,  # K strides
    stride_vb, stride_vt, stride_vh, stride_vd,  # V strides
    stride_dob, stride_dot, stride_doh, stride_dod,  # DOut strides
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,  # DK strides
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,  # DV strides
    stride_db, stride_ds,  # DocIds strides
    H,  # query heads
    GROUP,  # query heads per k/v head: H // H_kv
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    sm_scale,  # softmax scale (natural units)
    t_bucket,  # autotune key only: next power of two of T
    s_bucket,  # autotune key only: next power of two of S
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
):
    start_n = tl.program_id(0)
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                   offs_n < S, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    v = _load_tile(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                   offs_n < S, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    doc_base = DocIds + off_b * stride_db
    doc_k = offs_n
    if HAS_DOCS:
        doc_k = tl.load(doc_base + offs_n * stride_ds, mask=offs_n < S, other=0)
    qk_scale = sm_scale * _LOG2E
    lo, full_lo, full_hi, hi = _query_bounds(start_n, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):  # the group's query heads, in order: deterministic sums, no atomics
        off_h = off_hkv * GROUP + g
        off_bh = off_b * H + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DOut + off_b * stride_dob + off_h * stride_doh
        # the causal diagonal, the fully visible middle, then the window's trailing edge
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, doc_k, q_base, do_base, Lse + off_bh * T, Delta + off_bh * T,
                             doc_base, stride_qt, stride_dot, stride_ds, offs_m, offs_d, lo, full_lo, T, S, window,
                             qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_DOCS)
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, doc_k, q_base, do_base, Lse + off_bh * T, Delta + off_bh * T,
                             doc_base, stride_qt, stride_dot, stride_ds, offs_m, offs_d, full_lo, full_hi, T, S,
                             window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, HAS_WINDOW, HAS_DOCS)
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, doc_k, q_base, do_base, Lse + off_bh * T, Delta + off_bh * T,
                             doc_base, stride_qt, stride_dot, stride_ds, offs_m, offs_d, full_hi, hi, T, S, window,
                             qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_DOCS)
    store_ok = (offs_n < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dk_ptrs = DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    dv_ptrs = DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) fp32 running dQ (unscaled)
    q,  # (BLOCK_M, BLOCK_D) query tile
    do,  # (BLOCK_M, BLOCK_D) output-gradient tile
    lse,  # (BLOCK_M,) fp32 from the forward
    delta,  # (BLOCK_M,) fp32 from the preprocess
    pos_q,  # (BLOCK_M,) key position of each query
    doc_q,  # (BLOCK_M,) document of each query (ignored unless HAS_DOCS)
    k_base,  # K + this (batch, kv head)
    v_base,  # V + this (batch, kv head)
    doc_base,  # DocIds + this batch
    stride_kt,  # K stride between keys
    stride_vt,  # V stride between keys
    stride_ds,  # DocIds stride between keys
    offs_n,  # arange(0, BLOCK_N)
    offs_d,  # arange(0, BLOCK_D)
    lo,  # first key (multiple of BLOCK_N)
    hi,  # end of keys
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHECK_POS: tl.constexpr,  # these key blocks need the causal / window / key-length masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        pos_k = start_n + offs_n
        k = _load_tile(k_base + pos_k[:, None] * stride_kt + offs_d[None, :], pos_k < S, offs_d < HEAD_DIM,
                       CHECK_POS, HEAD_DIM != BLOCK_D)
        v = _load_tile(v_base + pos_k[:, None] * stride_vt + offs_d[None, :], pos_k < S, offs_d < HEAD_DIM,
                       CHECK_POS, HEAD_DIM != BLOCK_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if CHECK_POS or HAS_DOCS:
            doc_k = pos_k
            if HAS_DOCS:
                doc_k = tl.load(doc_base + pos_k * stride_ds, mask=pos_k < S, other=0)
            ok = _visible(pos_q[:, None], pos_k[None, :], doc_q[:, None], doc_k[None, :], S, window,
                          CHECK_POS, CAUSAL, HAS_WINDOW, HAS_DOCS)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N) fp32
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@_autotune("dq", _DQ_CONFIGS)
@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, T, H, D) queries
    K,  # (B, S, H_kv, D) keys
    V,  # (B, S, H_kv, D) values
    DOut,  # (B, T, H, D) gradient of the output
    Lse,  # (B, H, T) fp32 from the forward
    Delta,  # (B, H, T) fp32 from the preprocess
    DocIds,  # (B, S) int document ids (read only when HAS_DOCS)
    DQ,  # (B, T, H, D) output: gradient of Q
    stride_qb, stride_qt, stride_qh, stride_qd,  # Q strides
    stride_kb, stride_kt, stride_kh, stride_kd,  # K strides
    stride_vb, stride_vt, stride_vh, stride_vd,  # V strides
    stride_dob, stride_dot, stride_doh, stride_dod,  # DOut strides
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,  # DQ strides
    stride_db, stride_ds,  # DocIds strides
    H,  # query heads
    GROUP,  # query heads per k/v head: H // H_kv
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    sm_scale,  # softmax scale (natural units)
    t_bucket,  # autotune key only: next power of two of T
    s_bucket,  # autotune key only: next power of two of S
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
):
    start_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first
        start_m = tl.num_programs(0) - 1 - start_m
    off_h = tl.program_id(1)  # heads and batch on axes 1 and 2: CUDA caps each at 65535, not their product
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * H + off_h  # row of Lse / Delta
    off_hkv = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   offs_m < T, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    do = _load_tile(DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    offs_m < T, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    lse = tl.load(Lse + off_bh * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(Delta + off_bh * T + offs_m, mask=offs_m < T, other=0.0)
    pos_q = offs_m + (S - T)
    doc_q = pos_q
    doc_base = DocIds + off_b * stride_db
    if HAS_DOCS:
        doc_q = tl.load(doc_base + pos_q * stride_ds, mask=offs_m < T, other=0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    qk_scale = sm_scale * _LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_bounds(start_m, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _dq_inner(dq, q, do, lse, delta, pos_q, doc_q, k_base, v_base, doc_base, stride_kt, stride_vt, stride_ds,
                   offs_n, offs_d, lo, full_lo, S, window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                   CAUSAL, HAS_WINDOW, HAS_DOCS)
    dq = _dq_inner(dq, q, do, lse, delta, pos_q, doc_q, k_base, v_base, doc_base, stride_kt, stride_vt, stride_ds,
                   offs_n, offs_d, full_lo, full_hi, S, window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False,
                   CAUSAL, HAS_WINDOW, HAS_DOCS)
    dq = _dq_inner(dq, q, do, lse, delta, pos_q, doc_q, k_base, v_base, doc_base, stride_kt, stride_vt, stride_ds,
                   offs_n, offs_d, full_hi, hi, S, window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                   CAUSAL, HAS_WINDOW, HAS_DOCS)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------
# 2. Launchers: validate, allocate, grid, launch (no autograd)
# ----------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
           doc_ids: torch.Tensor | None, **outputs: torch.Tensor | None) -> tuple[int, ...]:
    """Shared attention checks + what these kernels need; returns (B, T, S, H, H_kv, D)."""
    b, t, s, h, h_kv, d = attention_spec.check(q, k, v, causal, window, doc_ids)
    require(d in HEAD_DIMS, f"attention: triton backend supports head_dim in {HEAD_DIMS}, got {d}")
    checks.triton_device("attention", q=q, k=k, v=v, **outputs)
    checks.same_kind("attention", "q", q, **outputs)
    return b, t, s, h, h_kv, d


def _doc_args(doc_ids: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """DocIds pointer and strides; an empty placeholder when there are no doc ids."""
    if doc_ids is None:
        return torch.empty(0, dtype=torch.int64, device=device), 0, 0
    return doc_ids, doc_ids.stride(0), doc_ids.stride(1)


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch an autotuned kernel. The interpreter runs one config, the smallest, straight through
    the jitted function: autotuning would run every config (Triton < 3.7 benchmarks even one)."""
    if interpreting():
        kernel.fn[grid](*args, **meta, **_smallest(kernel.configs).kwargs)
    else:
        kernel[grid](*args, **meta)


def _buckets(t: int, s: int) -> tuple[int, int]:
    return triton.next_power_of_2(t), triton.next_power_of_2(s)


def _mask_meta(d: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None) -> dict:
    return dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal,
                HAS_WINDOW=window is not None, HAS_DOCS=doc_ids is not None)


def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                   window: int | None, doc_ids: torch.Tensor | None, out: torch.Tensor | None = None,
                   lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch. Returns (out (B, T, H, D), lse (B, H, T) fp32 base-2 log-sum-exp). `out` and
    `lse` may be preallocated (any strides for `out` with a unit last stride; `lse` contiguous)."""
    b, t, s, h, h_kv, d = _check(q, k, v, causal, window, doc_ids, out=out)
    require(out is None or out.shape == q.shape, f"attention: out must have q's shape {tuple(q.shape)}")
    require(lse is None or (lse.shape == (b, h, t) and lse.dtype == torch.float32 and lse.is_contiguous()),
            f"attention: lse must be a contiguous fp32 ({b}, {h}, {t}) tensor")
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device) if lse is None else lse
    docs, stride_db, stride_ds = _doc_args(doc_ids, q.device)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), h, b)  # noqa: E731
    _launch(_attn_fwd_kernel, grid, q, k, v, out, lse, docs, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_db, stride_ds, h, h // h_kv, t, s, window or 0, softmax_scale, *_buckets(t, s),
            **_mask_meta(d, causal, window, doc_ids))
    return out, lse


def _preprocess_rows(block_d: int) -> int:
    """Query rows per preprocess program: 8K elements per tile."""
    return min(128, 8192 // block_d)


def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, softmax_scale: float, window: int | None,
                   doc_ids: torch.Tensor | None, dq: torch.Tensor | None = None,
                   dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch: delta = rowsum(dO * O), then the dK/dV and dQ passes. Returns (dq, dk, dv);
    each may be preallocated with its input's shape and a unit last stride."""
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum
        dout = dout.contiguous()
    b, t, s, h, h_kv, d = _check(q, k, v, causal, window, doc_ids, dout=dout, out=out, dq=dq, dk=dk, dv=dv)
    for name, given, like in (("dout", dout, q), ("out", out, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if given is not None:
            require(given.shape == like.shape,
                    f"attention: {name} must have shape {tuple(like.shape)}, got {tuple(given.shape)}")
    require(lse.shape == (b, h, t) and lse.dtype == torch.float32 and lse.is_contiguous(),
            f"attention: lse must be a contiguous fp32 ({b}, {h}, {t}) tensor")
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    meta = _mask_meta(d, causal, window, doc_ids)
    docs, stride_db, stride_ds = _doc_args(doc_ids, q.device)

    delta = torch.empty_like(lse)
    rows = _preprocess_rows(meta["BLOCK_D"])
    _attn_bwd_preprocess_kernel[(triton.cdiv(t, rows), h, b)](
        out, dout, delta, *out.stride(), *dout.stride(), h, t,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=rows)
    shared = (h, h // h_kv, t, s, window or 0, softmax_scale, *_buckets(t, s))
    _launch(_attn_bwd_dkdv_kernel, lambda m: (triton.cdiv(s, m["BLOCK_N"]), h_kv, b),
            q, k, v, dout, lse, delta, docs, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *dk.stride(), *dv.stride(), stride_db, stride_ds, *shared, **meta)
    _launch(_attn_bwd_dq_kernel, lambda m: (triton.cdiv(t, m["BLOCK_M"]), h, b),
            q, k, v, dout, lse, delta, docs, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *dq.stride(), stride_db, stride_ds, *shared, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# 3. torch.library custom ops (fake implementations + autograd), so torch.compile traces through
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("tritongpt::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                       causal: bool, softmax_scale: float, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attn_fwd(q, k, v, causal, softmax_scale, window, doc_ids)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, doc_ids, causal, softmax_scale, window):
    b, t, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("tritongpt::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, doc_ids: torch.Tensor | None, causal: bool, softmax_scale: float,
                       window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale, window, doc_ids)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, doc_ids, causal, softmax_scale, window):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, causal, softmax_scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.causal, ctx.softmax_scale, ctx.window = causal, softmax_scale, window


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, doc_ids, ctx.causal, ctx.softmax_scale, ctx.window)
    return dq, dk, dv, None, None, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# 4. Public functional
# ----------------------------------------------------------------------------------------------

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, window: int | None = None,
                    doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v without materializing the scores. q: (B, T, H, D); k, v:
    (B, S, H_kv, D) with H_kv dividing H; head_dim in HEAD_DIMS. Same semantics as
    `attention_spec.reference` (causal aligns bottom-right; window; doc_ids (B, S))."""
    d = _check(q, k, v, causal, window, doc_ids)[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    out, _ = _flash_attn_fwd_op(q, k, v, doc_ids, causal, scale, window)
    return out


registry.register("attention", "triton", flash_attention, needs="triton", deterministic=True)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (`tritongpt kernels compile --filter attn`)
# ----------------------------------------------------------------------------------------------

_ELEMENT_POINTERS = ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")
_ELEM_BYTES = {"fp16": 2, "bf16": 2}


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict, tuple]:
    """(signature, constexprs, aligned) of `kernel` as the launchers call it: element pointers of
    `dtype`, fp32 Lse/Delta, int64 doc ids, unit last-dim strides (Triton specializes 1 as a
    constant), other strides divisible by 16 (every supported head dim is a multiple of 16)."""
    sig, consts, aligned = {}, dict(constexprs), []
    for name in compile_report.unwrap(kernel).arg_names:
        if name in constexprs or name in ("BLOCK_M", "BLOCK_N"):
            sig[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d") and name != "stride_ds":
            sig[name], consts[name] = "constexpr", 1
        elif name.startswith("stride_"):
            sig[name] = "i32"
            if name not in ("stride_db", "stride_ds"):
                aligned.append(name)
        elif name in _ELEMENT_POINTERS or name in ("Lse", "Delta", "DocIds"):
            sig[name] = "*" + dtype if name in _ELEMENT_POINTERS else ("*i64" if name == "DocIds" else "*fp32")
            aligned.append(name)
        else:
            sig[name] = "fp32" if name == "sm_scale" else "i32"
    return sig, consts, tuple(aligned)


def _keeps(kind: str, d: int, elem_bytes: int, masks: bool, cfg: triton.Config) -> bool:
    """`fits` with the config last, for functools.partial."""
    return fits(kind, cfg, d, elem_bytes, masks)


def _compile_variants():
    """Every kernel for fp16 and bf16, causal and not, head dims 64 and 128, with each autotune
    config the pruner keeps; every other head dim for fp16 causal; windows + doc ids at fp16 D=64, 128, 256."""
    combos = [(dtype, causal, d, False) for dtype in _ELEM_BYTES for causal in (True, False) for d in (64, 128)]
    combos += [("fp16", True, d, False) for d in HEAD_DIMS if d not in (64, 128)]
    combos += [("fp16", True, d, True) for d in (64, 128, 256)]
    for dtype, causal, d, masks in combos:
        block_d = triton.next_power_of_2(d)
        meta = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=masks, HAS_DOCS=masks)
        label = f"{dtype} D={d} causal={causal}" + (" window+docs" if masks else "")
        for kind, kernel in (("fwd", _attn_fwd_kernel), ("dkdv", _attn_bwd_dkdv_kernel), ("dq", _attn_bwd_dq_kernel)):
            sig, consts, aligned = _signature(kernel, dtype, meta)
            keep = functools.partial(_keeps, kind, d, _ELEM_BYTES[dtype], masks)
            yield from compile_report.autotune_variants(kernel, sig, consts, label, aligned, keep=keep)
        if causal and not masks:  # the preprocess has no mask constexprs: once per dtype and head dim
            pre = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_preprocess_rows(block_d))
            sig, consts, aligned = _signature(_attn_bwd_preprocess_kernel, dtype, pre)
            yield compile_report.KernelVariant(_attn_bwd_preprocess_kernel, f"{dtype} D={d} BLOCK_M={pre['BLOCK_M']}",
                                               sig, consts, 4, 1, aligned)


compile_report.register_variants(_compile_variants)
