"""Flash attention (FA2-style) forward and backward in Triton, with TMA loads on Hopper.

Layout: q (B, T, H, D), k and v (B, S, H_kv, D), H_kv dividing H, D in HEAD_DIMS, with any batch,
sequence and head strides (e.g. views of one packed QKV tensor) and a contiguous head dim: the
kernels take strides and never copy; offsets are int64 where they can pass 2^31. Tensor-descriptor
(TMA) configs also need 16-byte aligned pointers and strides (`attention_configs.suits_tma`).

Forward: each program owns BLOCK_M queries of one (batch, head) and streams BLOCK_N keys at a
time through an online softmax in base 2 (scale and log2(e) fold into one FMA per score), saving
each row's log2-sum-exp2 (`lse`). Every kernel runs on one grid axis, block major (one block of
every (batch, head) before the next block of any); under causal masking query blocks run last to
first, so the blocks that see the most keys start first. Backward recomputes the probabilities
from `lse`: a preprocess computes delta = rowsum(dO * O); dK/dV runs one program per BLOCK_N keys
of one k/v head over (query head of the group, query block) as ONE flattened loop (GQA summed in
a fixed order, no atomics; a nested loop costs ~50 registers); dQ one per BLOCK_M queries. Both
are deterministic.

Masks (the semantics of `attention_spec.attention_mask`): query i sits at key position
pos(i) = i + S - T; causal keeps keys j <= pos(i), a window w keeps j > pos(i) - w, doc ids keep
the query's own document. Each program walks three block ranges from kernels/attention_blocks.py:
masked edge blocks, a middle of fully visible blocks with no mask at all (`CHECK_POS=False`),
masked edge blocks; blocks that causal, window or the program's documents exclude are never
visited, so packed documents cost work in proportion to the sum of their squared lengths.

Loads: pipelined pointer loads everywhere; on sm_90 the forward and dQ also have tensor-descriptor
configs (`USE_TMA`, device-built descriptors: a host descriptor's per-config pre_hook would
disable the autotuner's disk cache) where the installed Triton has `tl.make_tensor_descriptor`.
fp32 inputs honour `torch.get_float32_matmul_precision()` ("highest": IEEE dots, else tf32).
Configs (tiles, the config table, the pruner, the compile report's variants):
kernels/attention_configs.py.

    python -m pytest -q tests/test_attention.py
    tritongpt kernels compile --arch sm_90 --filter attn
"""

import math

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import attention_blocks, attention_configs, attention_spec, checks, registry
from tritongpt.kernels.attention_blocks import key_bounds, query_bounds
from tritongpt.kernels.attention_configs import HEAD_DIMS

_LOG2E = tl.constexpr(1.4426950408889634)  # scores * scale * log2(e), then exp2 == exp

# ----------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rows_source(
    base,  # pointer to row 0, column 0 of a (n_rows, HEAD_DIM) matrix with unit column stride
    n_rows,  # rows of the matrix
    stride_row,  # elements between rows
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # columns per tile: HEAD_DIM rounded up to a power of two
    USE_TMA: tl.constexpr,
):
    """What `_load_rows` / `_store_rows` take: a tensor descriptor (TMA; rows and columns outside
    the matrix load as 0 and are never stored), or the base pointer itself."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                        block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        src = base
    return src


@triton.jit
def _load_rows(
    src,  # from _rows_source
    row0,  # first row of the tile
    offs_r,  # arange(0, rows per tile)
    offs_d,  # arange(0, BLOCK_D)
    n_rows,  # rows of the matrix
    stride_row,  # elements between rows
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_ROWS: tl.constexpr,  # the tile may run past the last row (pointer loads mask only then)
    USE_TMA: tl.constexpr,
):
    """Rows row0 + offs_r of the matrix; rows past its end and columns past HEAD_DIM read 0."""
    if USE_TMA:
        tile = src.load([row0, 0])
    else:
        # int64 offset of the tile's first row: row * stride may pass 2^31 (long packed QKV)
        ptrs = src + tl.cast(row0, tl.int64) * stride_row + offs_r[:, None] * stride_row + offs_d[None, :]
        rows_ok = (row0 + offs_r) < n_rows
        if CHECK_ROWS and HEAD_DIM != BLOCK_D:
            tile = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif CHECK_ROWS:
            tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        elif HEAD_DIM != BLOCK_D:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(
    dst,  # from _rows_source
    tile,  # (rows per tile, BLOCK_D) fp32 values
    row0,  # first row of the tile
    offs_r,  # arange(0, rows per tile)
    offs_d,  # arange(0, BLOCK_D)
    n_rows,  # rows of the matrix
    stride_row,  # elements between rows
    HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Store the tile's rows inside the matrix, first HEAD_DIM columns, in the matrix's dtype."""
    if USE_TMA:
        dst.store([row0, 0], tile.to(dst.dtype))
    else:
        ptrs = dst + tl.cast(row0, tl.int64) * stride_row + offs_r[:, None] * stride_row + offs_d[None, :]
        tl.store(ptrs, tile.to(dst.dtype.element_ty),
                 mask=((row0 + offs_r) < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _visible(
    pos_q,  # key position of each query (broadcasts against pos_k)
    pos_k,  # key positions
    doc_q,  # document id of each query (ignored unless HAS_DOCS)
    doc_k,  # document id of each key (ignored unless HAS_DOCS)
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """True where a query may see a key: the key exists, and causal, window and documents allow it."""
    ok = pos_k < S
    if CAUSAL:
        ok = ok & (pos_k <= pos_q)
    if HAS_WINDOW:
        ok = ok & (pos_k > pos_q - window)
    if HAS_DOCS:
        ok = ok & (doc_q == doc_k)
    return ok


@triton.jit
def _query_program(
    T,  # query length
    H,  # query heads
    GROUP,  # query heads per k/v head
    BLOCK_M: tl.constexpr,  # queries per program
    CAUSAL: tl.constexpr,
):
    """(query block, batch * H + head, batch, head, k/v head) of this program of the forward or dQ.
    One grid axis (CUDA caps axes 1 and 2 at 65535): program = query block * (B * H) + batch * H +
    head, so one query block of every (batch, head) runs before the next block of any; under causal
    masking the last query blocks, which see the most keys, run first."""
    blocks = tl.cdiv(T, BLOCK_M)
    n_bh = tl.num_programs(0) // blocks
    start_m = tl.program_id(0) // n_bh
    off_bh = tl.program_id(0) % n_bh
    if CAUSAL:
        start_m = blocks - 1 - start_m
    off_h = (off_bh % H).to(tl.int64)
    return start_m, off_bh, (off_bh // H).to(tl.int64), off_h, off_h // GROUP


@triton.jit
def _fwd_inner(
    acc,  # (BLOCK_M, BLOCK_D) fp32 running sum of p @ v
    l_i,  # (BLOCK_M,) fp32 running softmax denominators
    m_i,  # (BLOCK_M,) fp32 running row maxima of the raw scores q.k (-inf: no visible key yet)
    q,  # (BLOCK_M, BLOCK_D) query tile
    pos_q,  # (BLOCK_M,) key position of each query
    doc_q,  # (BLOCK_M,) document of each query (ignored unless HAS_DOCS)
    k_src,  # K of this (batch, kv head), from _rows_source
    v_src,  # V of this (batch, kv head), from _rows_source
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
    CHECK_POS: tl.constexpr,  # these key blocks need the causal / window / document / key-length masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "ieee" or "tf32"
    USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_rows(k_src, start_n, offs_n, offs_d, S, stride_kt, HEAD_DIM, BLOCK_D, CHECK_POS, USE_TMA)
        v = _load_rows(v_src, start_n, offs_n, offs_d, S, stride_vt, HEAD_DIM, BLOCK_D, CHECK_POS, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32 raw scores
        if CHECK_POS:
            pos_k = start_n + offs_n
            doc_k = pos_k
            if HAS_DOCS:
                doc_k = tl.load(doc_base + pos_k * stride_ds, mask=pos_k < S, other=0)
            ok = _visible(pos_q[:, None], pos_k[None, :], doc_q[:, None], doc_k[None, :], S, window,
                          CAUSAL, HAS_WINDOW, HAS_DOCS)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = m_new
        if CHECK_POS:  # a row with no visible key yet keeps m = -inf but shifts by 0: no -inf - -inf
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = m_shift * qk_scale
        p = tl.math.exp2(qk * qk_scale - shift[:, None])  # scale and shift: one FMA per score
        alpha = tl.math.exp2(m_i * qk_scale - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@attention_configs.autotune("fwd")
@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, T, H, D) queries
    K,  # (B, S, H_kv, D) keys
    V,  # (B, S, H_kv, D) values
    Out,  # (B, T, H, D) output
    Lse,  # (B, H, T) fp32 output: log2-sum-exp2 of each query's scaled scores, for backward
    DocIds,  # (B, S) int document id of each key position (read only when HAS_DOCS)
    DocBounds,  # (B, 2, S) int32 document start and end of each position, from doc_bounds (HAS_DOCS only)
    stride_qb, stride_qt, stride_qh,  # Q strides (the head dim is contiguous)
    stride_kb, stride_kt, stride_kh,  # K strides
    stride_vb, stride_vt, stride_vh,  # V strides
    stride_ob, stride_ot, stride_oh,  # Out strides
    stride_db, stride_ds,  # DocIds strides
    H,  # query heads
    GROUP,  # query heads per k/v head: H // H_kv
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    sm_scale,  # softmax scale (natural units, > 0)
    t_bucket,  # autotune key only: next power of two of T
    s_bucket,  # autotune key only: next power of two of S
    tma_ok,  # autotune key only: 1 when the tensors suit tensor descriptors
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    USE_TMA: tl.constexpr,  # tensor-descriptor loads and stores
):
    start_m, off_bh, off_b, off_h, off_hkv = _query_program(T, H, GROUP, BLOCK_M, CAUSAL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = start_m * BLOCK_M
    q_src = _rows_source(Q + off_b * stride_qb + off_h * stride_qh, T, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_src = _rows_source(K + off_b * stride_kb + off_hkv * stride_kh, S, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D,
                         USE_TMA)
    v_src = _rows_source(V + off_b * stride_vb + off_hkv * stride_vh, S, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D,
                         USE_TMA)
    q = _load_rows(q_src, row0, offs_m, offs_d, T, stride_qt, HEAD_DIM, BLOCK_D, True, USE_TMA)
    pos_q = row0 + offs_m + (S - T)
    doc_q = pos_q
    doc_base = DocIds + off_b * stride_db
    if HAS_DOCS:
        doc_q = tl.load(doc_base + pos_q * stride_ds, mask=row0 + offs_m < T, other=0)
    qk_scale = sm_scale * _LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bounds = key_bounds(start_m, T, S, window, DocBounds + off_b * 2 * S, BLOCK_M, BLOCK_N, CAUSAL,
                        HAS_WINDOW, HAS_DOCS)
    for region in tl.static_range(3):  # masked, unmasked (the fully visible middle), masked
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pos_q, doc_q, k_src, v_src, doc_base, stride_kt, stride_vt,
                                   stride_ds, offs_n, offs_d, bounds[region], bounds[region + 1], S, window,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, region != 1, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                   INPUT_PRECISION, USE_TMA)

    empty = l_i == 0.0  # no visible key (only padding rows past T under these masks; guarded anyway)
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i * qk_scale + tl.math.log2(l_safe))  # +inf: backward's p = 0
    tl.store(Lse + off_bh.to(tl.int64) * T + row0 + offs_m, lse, mask=row0 + offs_m < T)
    o_dst = _rows_source(Out + off_b * stride_ob + off_h * stride_oh, T, stride_ot, HEAD_DIM, BLOCK_M, BLOCK_D,
                         USE_TMA)
    _store_rows(o_dst, acc / l_safe[:, None], row0, offs_m, offs_d, T, stride_ot, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # (B, T, H, D) forward output
    DOut,  # (B, T, H, D) gradient of the output
    Delta,  # (B, H, T) fp32 output: rowsum(dO * O)
    stride_ob, stride_ot, stride_oh,  # Out strides (the head dim is contiguous)
    stride_dob, stride_dot, stride_doh,  # DOut strides
    H,  # query heads
    T,  # query length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
):
    n_bh = tl.num_programs(0) // tl.cdiv(T, BLOCK_M)  # one grid axis, as in the forward
    row0 = (tl.program_id(0) // n_bh) * BLOCK_M
    off_bh = tl.program_id(0) % n_bh
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + off_b * stride_ob + off_h * stride_oh, row0, offs_m, offs_d, T, stride_ot, HEAD_DIM,
                   BLOCK_D, True, False)
    do = _load_rows(DOut + off_b * stride_dob + off_h * stride_doh, row0, offs_m, offs_d, T, stride_dot, HEAD_DIM,
                    BLOCK_D, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * T + row0 + offs_m, delta, mask=row0 + offs_m < T)


@triton.jit
def _dkdv_inner(
    dk,  # (BLOCK_N, BLOCK_D) fp32 running dK (unscaled)
    dv,  # (BLOCK_N, BLOCK_D) fp32 running dV
    k,  # (BLOCK_N, BLOCK_D) key tile
    v,  # (BLOCK_N, BLOCK_D) value tile
    pos_k,  # (BLOCK_N,) key positions
    doc_k,  # (BLOCK_N,) document of each key (ignored unless HAS_DOCS)
    q_group,  # Q + this batch + the group's first query head
    do_group,  # DOut + this batch + the group's first query head
    lse_group,  # Lse row of the group's first query head (the group's rows follow, T apart)
    delta_group,  # Delta row of the group's first query head
    doc_base,  # DocIds + this batch
    stride_qh,  # Q stride between heads
    stride_qt,  # Q stride between queries
    stride_doh,  # DOut stride between heads
    stride_dot,  # DOut stride between queries
    stride_ds,  # DocIds stride between keys
    offs_m,  # arange(0, BLOCK_M)
    offs_d,  # arange(0, BLOCK_D)
    lo,  # first query (multiple of BLOCK_M)
    hi,  # end of queries
    GROUP,  # query heads per k/v head
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHECK_POS: tl.constexpr,  # these query blocks need the causal / window / document masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    blocks = tl.cdiv(hi - lo, BLOCK_M)
    # (query head of the group, query block) as one flat loop: a nested head loop around the
    # pipelined block loop costs ~50 registers (compile report) that the big tiles cannot spare
    for i in range(0, GROUP * blocks):
        g = i // blocks
        start_m = lo + (i - g * blocks) * BLOCK_M
        rows = start_m + offs_m
        q = _load_rows(q_group + g.to(tl.int64) * stride_qh, start_m, offs_m, offs_d, T, stride_qt, HEAD_DIM, BLOCK_D,
                       True, False)
        do = _load_rows(do_group + g.to(tl.int64) * stride_doh, start_m, offs_m, offs_d, T, stride_dot, HEAD_DIM,
                        BLOCK_D, True, False)
        lse = tl.load(lse_group + g * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_group + g * T + rows, mask=rows < T, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse[None, :])
        if CHECK_POS:
            pos_q = rows + (S - T)
            doc_q = pos_q
            if HAS_DOCS:
                doc_q = tl.load(doc_base + pos_q * stride_ds, mask=rows < T, other=0)
            ok = _visible(pos_q[None, :], pos_k[:, None], doc_q[None, :], doc_k[:, None], S, window,
                          CAUSAL, HAS_WINDOW, HAS_DOCS)
            p_t = tl.where(ok, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M) fp32
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@attention_configs.autotune("dkdv")
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, T, H, D) queries
    K,  # (B, S, H_kv, D) keys
    V,  # (B, S, H_kv, D) values
    DOut,  # (B, T, H, D) gradient of the output
    Lse,  # (B, H, T) fp32 from the forward
    Delta,  # (B, H, T) fp32 from the preprocess
    DocIds,  # (B, S) int document ids (read only when HAS_DOCS)
    DocBounds,  # (B, 2, S) int32 document start and end of each position, from doc_bounds (HAS_DOCS only)
    DK,  # (B, S, H_kv, D) output: gradient of K, summed over the group's query heads
    DV,  # (B, S, H_kv, D) output: gradient of V, summed over the group's query heads
    stride_qb, stride_qt, stride_qh,  # Q strides (the head dim is contiguous)
    stride_kb, stride_kt, stride_kh,  # K strides
    stride_vb, stride_vt, stride_vh,  # V strides
    stride_dob, stride_dot, stride_doh,  # DOut strides
    stride_dkb, stride_dkt, stride_dkh,  # DK strides
    stride_dvb, stride_dvt, stride_dvh,  # DV strides
    stride_db, stride_ds,  # DocIds strides
    H,  # query heads
    GROUP,  # query heads per k/v head: H // H_kv
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    sm_scale,  # softmax scale (natural units, > 0)
    t_bucket,  # autotune key only: next power of two of T
    s_bucket,  # autotune key only: next power of two of S
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
):
    # one grid axis, key block major: the first key blocks (seen by the most queries under causal) first
    n_bhkv = tl.num_programs(0) // tl.cdiv(S, BLOCK_N)
    start_n = tl.program_id(0) // n_bhkv
    off_bhkv = tl.program_id(0) % n_bhkv
    h_kv = H // GROUP
    off_b = (off_bhkv // h_kv).to(tl.int64)
    off_hkv = (off_bhkv % h_kv).to(tl.int64)
    off_h0 = off_hkv * GROUP  # the group's first query head
    col0 = start_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + off_b * stride_kb + off_hkv * stride_kh, col0, offs_n, offs_d, S, stride_kt, HEAD_DIM, BLOCK_D,
                   True, False)
    v = _load_rows(V + off_b * stride_vb + off_hkv * stride_vh, col0, offs_n, offs_d, S, stride_vt, HEAD_DIM, BLOCK_D,
                   True, False)
    pos_k = col0 + offs_n
    doc_base = DocIds + off_b * stride_db
    doc_k = pos_k
    if HAS_DOCS:
        doc_k = tl.load(doc_base + pos_k * stride_ds, mask=pos_k < S, other=0)
    qk_scale = sm_scale * _LOG2E
    q_group = Q + off_b * stride_qb + off_h0 * stride_qh
    do_group = DOut + off_b * stride_dob + off_h0 * stride_doh
    stats_row = (off_b * H + off_h0) * T  # the group's first row of Lse / Delta

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bounds = query_bounds(start_n, T, S, window, DocBounds + off_b * 2 * S, BLOCK_M, BLOCK_N, CAUSAL,
                          HAS_WINDOW, HAS_DOCS)
    for region in tl.static_range(3):  # masked (the causal diagonal), unmasked, masked (the window's trailing edge)
        dk, dv = _dkdv_inner(dk, dv, k, v, pos_k, doc_k, q_group, do_group, Lse + stats_row, Delta + stats_row,
                             doc_base, stride_qh, stride_qt, stride_doh, stride_dot, stride_ds, offs_m, offs_d,
                             bounds[region], bounds[region + 1], GROUP, T, S, window, qk_scale, HEAD_DIM, BLOCK_D,
                             BLOCK_M, region != 1, CAUSAL, HAS_WINDOW, HAS_DOCS, INPUT_PRECISION)
    _store_rows(DK + off_b * stride_dkb + off_hkv * stride_dkh, dk * sm_scale, col0, offs_n, offs_d, S, stride_dkt,
                HEAD_DIM, False)
    _store_rows(DV + off_b * stride_dvb + off_hkv * stride_dvh, dv, col0, offs_n, offs_d, S, stride_dvt, HEAD_DIM,
                False)


@triton.jit
def _dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) fp32 running dQ (unscaled)
    q,  # (BLOCK_M, BLOCK_D) query tile
    do,  # (BLOCK_M, BLOCK_D) output-gradient tile
    lse,  # (BLOCK_M,) fp32 from the forward
    delta,  # (BLOCK_M,) fp32 from the preprocess
    pos_q,  # (BLOCK_M,) key position of each query
    doc_q,  # (BLOCK_M,) document of each query (ignored unless HAS_DOCS)
    k_src,  # K of this (batch, kv head), from _rows_source
    v_src,  # V of this (batch, kv head), from _rows_source
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
    CHECK_POS: tl.constexpr,  # these key blocks need the causal / window / document / key-length masks
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_rows(k_src, start_n, offs_n, offs_d, S, stride_kt, HEAD_DIM, BLOCK_D, CHECK_POS, USE_TMA)
        v = _load_rows(v_src, start_n, offs_n, offs_d, S, stride_vt, HEAD_DIM, BLOCK_D, CHECK_POS, USE_TMA)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale - lse[:, None])
        if CHECK_POS:
            pos_k = start_n + offs_n
            doc_k = pos_k
            if HAS_DOCS:
                doc_k = tl.load(doc_base + pos_k * stride_ds, mask=pos_k < S, other=0)
            ok = _visible(pos_q[:, None], pos_k[None, :], doc_q[:, None], doc_k[None, :], S, window,
                          CAUSAL, HAS_WINDOW, HAS_DOCS)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@attention_configs.autotune("dq")
@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, T, H, D) queries
    K,  # (B, S, H_kv, D) keys
    V,  # (B, S, H_kv, D) values
    DOut,  # (B, T, H, D) gradient of the output
    Lse,  # (B, H, T) fp32 from the forward
    Delta,  # (B, H, T) fp32 from the preprocess
    DocIds,  # (B, S) int document ids (read only when HAS_DOCS)
    DocBounds,  # (B, 2, S) int32 document start and end of each position, from doc_bounds (HAS_DOCS only)
    DQ,  # (B, T, H, D) output: gradient of Q
    stride_qb, stride_qt, stride_qh,  # Q strides (the head dim is contiguous)
    stride_kb, stride_kt, stride_kh,  # K strides
    stride_vb, stride_vt, stride_vh,  # V strides
    stride_dob, stride_dot, stride_doh,  # DOut strides
    stride_dqb, stride_dqt, stride_dqh,  # DQ strides
    stride_db, stride_ds,  # DocIds strides
    H,  # query heads
    GROUP,  # query heads per k/v head: H // H_kv
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    sm_scale,  # softmax scale (natural units, > 0)
    t_bucket,  # autotune key only: next power of two of T
    s_bucket,  # autotune key only: next power of two of S
    tma_ok,  # autotune key only: 1 when the tensors suit tensor descriptors
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    USE_TMA: tl.constexpr,  # tensor-descriptor loads of K and V
):
    start_m, off_bh, off_b, off_h, off_hkv = _query_program(T, H, GROUP, BLOCK_M, CAUSAL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = start_m * BLOCK_M
    rows = row0 + offs_m
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, row0, offs_m, offs_d, T, stride_qt, HEAD_DIM, BLOCK_D,
                   True, False)
    do = _load_rows(DOut + off_b * stride_dob + off_h * stride_doh, row0, offs_m, offs_d, T, stride_dot, HEAD_DIM,
                    BLOCK_D, True, False)
    stats = off_bh.to(tl.int64) * T + rows
    lse = tl.load(Lse + stats, mask=rows < T, other=float("inf"))
    delta = tl.load(Delta + stats, mask=rows < T, other=0.0)
    pos_q = rows + (S - T)
    doc_q = pos_q
    doc_base = DocIds + off_b * stride_db
    if HAS_DOCS:
        doc_q = tl.load(doc_base + pos_q * stride_ds, mask=rows < T, other=0)
    k_src = _rows_source(K + off_b * stride_kb + off_hkv * stride_kh, S, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D,
                         USE_TMA)
    v_src = _rows_source(V + off_b * stride_vb + off_hkv * stride_vh, S, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D,
                         USE_TMA)
    qk_scale = sm_scale * _LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bounds = key_bounds(start_m, T, S, window, DocBounds + off_b * 2 * S, BLOCK_M, BLOCK_N, CAUSAL,
                        HAS_WINDOW, HAS_DOCS)
    for region in tl.static_range(3):  # masked, unmasked (the fully visible middle), masked
        dq = _dq_inner(dq, q, do, lse, delta, pos_q, doc_q, k_src, v_src, doc_base, stride_kt, stride_vt, stride_ds,
                       offs_n, offs_d, bounds[region], bounds[region + 1], S, window, qk_scale, HEAD_DIM, BLOCK_D,
                       BLOCK_N, region != 1, CAUSAL, HAS_WINDOW, HAS_DOCS, INPUT_PRECISION, USE_TMA)
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, dq * sm_scale, row0, offs_m, offs_d, T, stride_dqt,
                HEAD_DIM, False)


# ----------------------------------------------------------------------------------------------
# 2. Launchers: validate, allocate, grid, launch (no autograd)
# ----------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
           doc_ids: torch.Tensor | None, softmax_scale: float = 1.0, **outputs: torch.Tensor | None
           ) -> tuple[int, ...]:
    """Shared attention checks + what these kernels need; returns (B, T, S, H, H_kv, D)."""
    b, t, s, h, h_kv, d = attention_spec.check(q, k, v, causal, window, doc_ids)
    require(d in HEAD_DIMS, f"attention: triton backend supports head_dim in {HEAD_DIMS}, got {d}")
    require(math.isfinite(softmax_scale) and softmax_scale > 0,
            f"attention: triton backend needs a finite softmax_scale > 0, got {softmax_scale}")
    checks.triton_device("attention", q=q, k=k, v=v, **outputs)
    checks.same_kind("attention", "q", q, **outputs)
    return b, t, s, h, h_kv, d


def _doc_args(doc_ids: torch.Tensor | None, bounds: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """DocIds and DocBounds pointers and the doc ids' strides; empty placeholders without doc ids."""
    if doc_ids is None:
        none = torch.empty(0, dtype=torch.int32, device=device)
        return none, none, 0, 0
    bounds = attention_blocks.doc_bounds(doc_ids) if bounds is None else bounds
    return doc_ids, bounds, doc_ids.stride(0), doc_ids.stride(1)


def _mask_meta(q: torch.Tensor, causal: bool, window: int | None, doc_ids: torch.Tensor | None) -> dict:
    d = q.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal, HAS_WINDOW=window is not None,
                HAS_DOCS=doc_ids is not None, INPUT_PRECISION=checks.input_precision(q.dtype))


def _rows3(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a (B, T, H, D) tensor (the head dim is contiguous)."""
    return x.stride(0), x.stride(1), x.stride(2)


def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                   window: int | None, doc_ids: torch.Tensor | None, out: torch.Tensor | None = None,
                   lse: torch.Tensor | None = None, bounds: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch. Returns (out (B, T, H, D), lse (B, H, T) fp32 base-2 log-sum-exp). `out` and
    `lse` may be preallocated (any strides for `out` with a unit last stride; `lse` contiguous);
    `bounds` is doc_bounds(doc_ids), computed here when not given."""
    b, t, s, h, h_kv, d = _check(q, k, v, causal, window, doc_ids, softmax_scale, out=out)
    require(out is None or out.shape == q.shape, f"attention: out must have q's shape {tuple(q.shape)}")
    require(lse is None or (lse.shape == (b, h, t) and lse.dtype == torch.float32 and lse.is_contiguous()),
            f"attention: lse must be a contiguous fp32 ({b}, {h}, {t}) tensor")
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device) if lse is None else lse
    docs, bounds, stride_db, stride_ds = _doc_args(doc_ids, bounds, q.device)
    tma_ok = attention_configs.tma_ready(q, k, v, out)
    attention_configs.launch("fwd", _attn_fwd_kernel, lambda meta: (b * h * triton.cdiv(t, meta["BLOCK_M"]),),
            q, k, v, out, lse, docs, bounds, *_rows3(q), *_rows3(k), *_rows3(v), *_rows3(out), stride_db, stride_ds,
            h, h // h_kv, t, s, window or 0, softmax_scale, *attention_configs.buckets(t, s), int(tma_ok),
            **_mask_meta(q, causal, window, doc_ids))
    return out, lse


def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, softmax_scale: float, window: int | None,
                   doc_ids: torch.Tensor | None, dq: torch.Tensor | None = None,
                   dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, bounds: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch: delta = rowsum(dO * O), then the dK/dV and dQ passes. Returns (dq, dk, dv);
    each may be preallocated with its input's shape and a unit last stride."""
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum
        dout = dout.contiguous()
    b, t, s, h, h_kv, d = _check(q, k, v, causal, window, doc_ids, softmax_scale, dout=dout, out=out, dq=dq, dk=dk,
                                 dv=dv)
    for name, given, like in (("dout", dout, q), ("out", out, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if given is not None:
            require(given.shape == like.shape,
                    f"attention: {name} must have shape {tuple(like.shape)}, got {tuple(given.shape)}")
    require(lse.shape == (b, h, t) and lse.dtype == torch.float32 and lse.is_contiguous(),
            f"attention: lse must be a contiguous fp32 ({b}, {h}, {t}) tensor")
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    meta = _mask_meta(q, causal, window, doc_ids)
    docs, bounds, stride_db, stride_ds = _doc_args(doc_ids, bounds, q.device)

    delta = torch.empty_like(lse)
    rows = attention_configs.preprocess_rows(meta["BLOCK_D"])
    _attn_bwd_preprocess_kernel[(b * h * triton.cdiv(t, rows),)](
        out, dout, delta, *_rows3(out), *_rows3(dout), h, t, HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=rows)
    shared = (h, h // h_kv, t, s, window or 0, softmax_scale, *attention_configs.buckets(t, s))
    attention_configs.launch("dkdv", _attn_bwd_dkdv_kernel, lambda m: (b * h_kv * triton.cdiv(s, m["BLOCK_N"]),),
            q, k, v, dout, lse, delta, docs, bounds, dk, dv, *_rows3(q), *_rows3(k), *_rows3(v), *_rows3(dout),
            *_rows3(dk), *_rows3(dv), stride_db, stride_ds, *shared, **meta)
    tma_ok = attention_configs.tma_ready(k, v)
    attention_configs.launch("dq", _attn_bwd_dq_kernel, lambda m: (b * h * triton.cdiv(t, m["BLOCK_M"]),),
            q, k, v, dout, lse, delta, docs, bounds, dq, *_rows3(q), *_rows3(k), *_rows3(v), *_rows3(dout),
            *_rows3(dq), stride_db, stride_ds, *shared, int(tma_ok), **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# 3. torch.library custom ops (fake implementations + autograd), so torch.compile traces through
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("tritongpt::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                       bounds: torch.Tensor | None, causal: bool, softmax_scale: float,
                       window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attn_fwd(q, k, v, causal, softmax_scale, window, doc_ids, bounds=bounds)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, doc_ids, bounds, causal, softmax_scale, window):
    b, t, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("tritongpt::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, doc_ids: torch.Tensor | None, bounds: torch.Tensor | None, causal: bool,
                       softmax_scale: float, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale, window, doc_ids, bounds=bounds)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, doc_ids, bounds, causal, softmax_scale, window):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, bounds, causal, softmax_scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids, bounds)
    ctx.causal, ctx.softmax_scale, ctx.window = causal, softmax_scale, window


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, doc_ids, bounds = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, doc_ids, bounds, ctx.causal, ctx.softmax_scale,
                                    ctx.window)
    return dq, dk, dv, None, None, None, None, None


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
    bounds = None if doc_ids is None else attention_blocks.doc_bounds(doc_ids)  # once for forward and backward
    out, _ = _flash_attn_fwd_op(q, k, v, doc_ids, bounds, causal, scale, window)
    return out


registry.register("attention", "triton", flash_attention, needs="triton", deterministic=True)
attention_configs.register_compile_variants(fwd=_attn_fwd_kernel, dq=_attn_bwd_dq_kernel, dkdv=_attn_bwd_dkdv_kernel,
                                            preprocess=_attn_bwd_preprocess_kernel)
