"""LayerNorm in Triton: forward, backward, and the fused pre-LN residual add.

    y = (s - mean(s)) * rstd * weight + bias,  rstd = 1 / sqrt(var(s) + eps),  over the last dim,

where s = x, or s = x + residual for the fused variant (which also returns s, the residual stream
of a pre-LN block). Statistics are fp32 whatever the input dtype (fp32, fp16, bf16).

Layout of this file (Liger-Kernel ladder):
  1. `@triton.jit` kernels, on tiles of ROWS rows x BLOCK_N columns (`row_config`), so that narrow
     rows too move several KB per load. Forward: one tile per program; rows up to MAX_BLOCK_N (8192)
     wide are one pass (x and residual read once), wider rows loop over chunks (statistics pass,
     then normalize pass). Backward: a fixed group of rows per program (narrow rows: the next
     tile's loads issued before this tile's math), dweight/dbias accumulated in registers and
     written as one partial row per program; a column-block kernel adds the partial rows in order.
     Summation orders depend only on the shapes and the device: gradients are bitwise reproducible.
  2. launchers `layer_norm_fwd` / `layer_norm_bwd`: validate, allocate, pick the tile config from N
     (`row_config`), launch.
  3. torch.library custom ops `tritongpt::layer_norm_fwd` / `tritongpt::layer_norm_bwd` with fake
     implementations and autograd, so torch.compile(fullgraph=True) traces through them.
  4. the public functional `layer_norm`, registered as the `triton` backend of op `layer_norm`.
Tile configs (`row_config`, `bwd_grid`, the reduction's) are the row-normalization table shared with
RMSNorm (kernels/norm_configs.py), which also reuses the jit helpers here that do not centre
(`load_s_chunk` / `reload_s_chunk`, `load_dy_s`, `store_dx`), the partial-sum reduction
(`reduce_partials`) and the launchers' helpers (`as_rows`, `outputs`, `check_grads`, `check_row_stats`,
`unit_stride`); the compile report's variants: kernels/layer_norm_configs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks, layer_norm_configs, layer_norm_spec, norm_configs, registry

# ----------------------------------------------------------------------------------------------
# 1. Triton kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input rows, row stride stride_x_row, unit column stride
    R,  # (M, N) residual rows added to X before normalizing (read only if HAS_RESIDUAL)
    W,  # (N,) weight (read only if HAS_WEIGHT)
    B,  # (N,) bias (read only if HAS_BIAS)
    Y,  # (M, N) contiguous output LN(s)
    S,  # (M, N) contiguous output s = X + R (written only if HAS_RESIDUAL)
    MEAN,  # (M,) fp32 output: mean of each row of s
    RSTD,  # (M,) fp32 output: 1 / sqrt(var + eps) of each row of s
    stride_x_row,  # elements between rows of X
    stride_r_row,  # elements between rows of R
    M,  # number of rows
    N,  # row length
    eps,  # added to the variance
    HAS_RESIDUAL: tl.constexpr,  # normalize s = X + R and store s to S
    HAS_WEIGHT: tl.constexpr,  # scale by W
    HAS_BIAS: tl.constexpr,  # shift by B
    BLOCK_N: tl.constexpr,  # columns per chunk (power of 2)
    ROWS: tl.constexpr,  # rows per program (power of 2)
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: the whole row stays in registers
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)[:, None]
    x_off = rows64 * stride_x_row
    r_off = rows64 * stride_r_row
    out_off = rows64 * N  # Y and S are contiguous
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        s = load_s_chunk(X, R, S, x_off, r_off, out_off, cols, mask, HAS_RESIDUAL)
        mean = tl.sum(s, axis=1) / N
        centered = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
        _normalize_store_chunk(centered, rstd, W, B, Y + out_off, cols, mask, N, HAS_WEIGHT, HAS_BIAS)
    else:
        # statistics pass: combine per-chunk (mean, sum of squared deviations) as in Chan et al.'s
        # parallel variance, which stays accurate where sum(s^2) - N mean^2 would not
        mean = tl.zeros((ROWS,), dtype=tl.float32)
        m2 = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            s = load_s_chunk(X, R, S, x_off, r_off, out_off, cols, mask, HAS_RESIDUAL)
            seen = tl.cast(start, tl.float32)  # elements already folded into (mean, m2)
            count = tl.cast(tl.minimum(N - start, BLOCK_N), tl.float32)
            chunk_mean = tl.sum(s, axis=1) / count
            centered = tl.where(mask, s - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            mean += delta * count / (seen + count)
            m2 += tl.sum(centered * centered, axis=1) + delta * delta * seen * count / (seen + count)
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the normalize pass reads back S, stored by other threads of this program
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            s = reload_s_chunk(X, S, x_off, out_off, cols, mask, HAS_RESIDUAL)
            centered = tl.where(mask, s - mean[:, None], 0.0)
            _normalize_store_chunk(centered, rstd, W, B, Y + out_off, cols, mask, N, HAS_WEIGHT, HAS_BIAS)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def load_s_chunk(
    X,  # input rows
    R,  # residual rows (read only if HAS_RESIDUAL)
    S,  # output s rows (written only if HAS_RESIDUAL)
    x_off,  # (ROWS, 1) offsets of the rows in X
    r_off,  # (ROWS, 1) offsets of the rows in R
    s_off,  # (ROWS, 1) offsets of the rows in S
    cols,  # (BLOCK_N,) column indices of this chunk
    mask,  # (ROWS, BLOCK_N) valid elements
    HAS_RESIDUAL: tl.constexpr,  # add R and store the sum to S
):
    """One chunk of s as fp32, zero where masked; with a residual, s = x + r is rounded to the
    storage dtype (and stored), so the statistics describe exactly the s that is returned."""
    s = tl.load(X + x_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + r_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_stored = s.to(S.dtype.element_ty)
        tl.store(S + s_off + cols[None, :], s_stored, mask=mask)
        s = s_stored.to(tl.float32)
    return s


@triton.jit
def reload_s_chunk(
    X,  # input rows
    S,  # output s rows (read only if HAS_RESIDUAL)
    x_off,  # (ROWS, 1) offsets of the rows in X
    s_off,  # (ROWS, 1) offsets of the rows in S
    cols,  # (BLOCK_N,) column indices of this chunk
    mask,  # (ROWS, BLOCK_N) valid elements
    HAS_RESIDUAL: tl.constexpr,  # s was stored to S by `load_s_chunk`
):
    """The chunk of s that `load_s_chunk` returned, as fp32 and zero where masked, read back for a
    second pass: from S where it was stored, else from X."""
    if HAS_RESIDUAL:
        s = tl.load(S + s_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(X + x_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _normalize_store_chunk(
    centered,  # fp32 (ROWS, BLOCK_N) chunk of s - mean, zero where masked
    rstd,  # fp32 (ROWS,)
    W,  # (N,) weight (read only if HAS_WEIGHT)
    B,  # (N,) bias (read only if HAS_BIAS)
    y_rows,  # (ROWS, 1) pointers to the rows of Y
    cols,  # (BLOCK_N,) column indices of this chunk
    mask,  # (ROWS, BLOCK_N) valid elements
    N,  # row length
    HAS_WEIGHT: tl.constexpr,  # scale by W
    HAS_BIAS: tl.constexpr,  # shift by B
):
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_rows + cols[None, :], y.to(y_rows.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of Y, row stride stride_dy_row
    DS,  # (M, N) gradient flowing into the S output (read only if HAS_DS)
    S,  # (M, N) the normalized input s saved by the forward, row stride stride_s_row
    W,  # (N,) weight (read only if HAS_WEIGHT)
    MEAN,  # (M,) fp32 row means from the forward
    RSTD,  # (M,) fp32 row 1/std from the forward
    DX,  # (M, N) contiguous output: gradient of s (and so of x and of the residual)
    DW_PARTIAL,  # (programs, N) fp32 output: this program's sum of dy * xhat (if HAS_WEIGHT)
    DB_PARTIAL,  # (programs, N) fp32 output: this program's sum of dy (if HAS_DB)
    ROW_SUMS,  # (2, M) fp32 scratch: c1, c2 of each row (chunked rows only; None when ONE_PASS)
    stride_dy_row,  # elements between rows of DY
    stride_ds_row,  # elements between rows of DS
    stride_s_row,  # elements between rows of S
    M,  # number of rows
    N,  # row length
    rows_per_program,  # this program handles rows [pid * rows_per_program, + rows_per_program)
    HAS_DS: tl.constexpr,  # add DS to the input gradient
    HAS_WEIGHT: tl.constexpr,  # scale by W, and accumulate partial dweight
    HAS_DB: tl.constexpr,  # accumulate partial dbias
    BLOCK_N: tl.constexpr,  # columns per chunk (power of 2)
    ROWS: tl.constexpr,  # rows per tile (power of 2)
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: a tile holds whole rows
):
    # dx = (g - (xhat * c1 + c2)) * rstd (+ ds), g = dy * w, c1 = mean(xhat * g), c2 = mean(g) over the row
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partial_off = pid.to(tl.int64) * N
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        if ROWS > 1:
            # narrow rows: the next tile's loads go out before this tile's math (past row_end they
            # are masked off), as one tile of a few rows holds too few bytes to cover the latency
            dy, s, mean, rstd = _bwd_load_tile(DY, S, MEAN, RSTD, row_start, row_end, stride_dy_row, stride_s_row,
                                               cols, col_mask, ROWS)
            for r0 in range(row_start, row_end, ROWS):
                dy_next, s_next, mean_next, rstd_next = _bwd_load_tile(
                    DY, S, MEAN, RSTD, r0 + ROWS, row_end, stride_dy_row, stride_s_row, cols, col_mask, ROWS)
                dw_acc, db_acc = _bwd_tile(dy, s, mean, rstd, dw_acc, db_acc, r0, row_end, W, DS, DX, stride_ds_row,
                                           N, cols, col_mask, HAS_WEIGHT, HAS_DS, ROWS)
                dy, s, mean, rstd = dy_next, s_next, mean_next, rstd_next
        else:
            # a one-row tile (N > 2048) already has >= 4 KB per tensor in flight; a second would spill
            for r0 in range(row_start, row_end):
                dy, s, mean, rstd = _bwd_load_tile(DY, S, MEAN, RSTD, r0, row_end, stride_dy_row, stride_s_row,
                                                   cols, col_mask, ROWS)
                dw_acc, db_acc = _bwd_tile(dy, s, mean, rstd, dw_acc, db_acc, r0, row_end, W, DS, DX, stride_ds_row,
                                           N, cols, col_mask, HAS_WEIGHT, HAS_DS, ROWS)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + partial_off + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if HAS_DB:
            tl.store(DB_PARTIAL + partial_off + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        # pass 1, row by row: c1 and c2 over the row's chunks, kept in ROW_SUMS
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_mask = rows < row_end
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            c1 = tl.zeros((ROWS,), dtype=tl.float32)
            c2 = tl.zeros((ROWS,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                dy, xhat, g = _bwd_load_chunk(DY, S, W, rows, stride_dy_row, stride_s_row, cols, mask, mean, rstd,
                                              N, HAS_WEIGHT)
                c1 += tl.sum(xhat * g, axis=1)
                c2 += tl.sum(g, axis=1)
            tl.store(ROW_SUMS + rows, c1 / N, mask=row_mask)
            tl.store(ROW_SUMS + M + rows, c2 / N, mask=row_mask)
        tl.debug_barrier()  # pass 2 reads back row sums stored by other threads of this program
        # pass 2, chunk by chunk: dx of every row, and this chunk's dweight/dbias partials in registers
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for r0 in range(row_start, row_end, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                row_mask = rows < row_end
                mask = row_mask[:, None] & (cols < N)[None, :]
                mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
                rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
                dy, xhat, g = _bwd_load_chunk(DY, S, W, rows, stride_dy_row, stride_s_row, cols, mask, mean, rstd,
                                              N, HAS_WEIGHT)
                c1 = tl.load(ROW_SUMS + rows, mask=row_mask, other=0.0)
                c2 = tl.load(ROW_SUMS + M + rows, mask=row_mask, other=0.0)
                store_dx(g, xhat * c1[:, None] + c2[:, None], rstd, DS, DX, rows, stride_ds_row, N, cols, mask, HAS_DS)
                dw_acc += dy * xhat
                db_acc += dy
            if HAS_WEIGHT:
                tl.store(DW_PARTIAL + partial_off + cols, tl.sum(dw_acc, axis=0), mask=cols < N)
            if HAS_DB:
                tl.store(DB_PARTIAL + partial_off + cols, tl.sum(db_acc, axis=0), mask=cols < N)


@triton.jit
def _bwd_tile(
    dy,  # (ROWS, BLOCK_N) gradient of Y, storage dtype, zero where masked
    s,  # (ROWS, BLOCK_N) the normalized input, storage dtype
    mean,  # fp32 (ROWS,) row means
    rstd,  # fp32 (ROWS,) row 1/std
    dw_acc,  # fp32 (ROWS, BLOCK_N) running sum of dy * xhat
    db_acc,  # fp32 (ROWS, BLOCK_N) running sum of dy
    r0,  # first row of the tile
    row_end,  # rows from row_end on are masked off
    W,  # (N,) weight (read only if HAS_WEIGHT)
    DS,  # gradient of the S output (read only if HAS_DS)
    DX,  # (M, N) contiguous output
    stride_ds_row,  # elements between rows of DS
    N,  # row length
    cols,  # (BLOCK_N,) column indices
    col_mask,  # (BLOCK_N,) cols < N
    HAS_WEIGHT: tl.constexpr,  # g = dy * w, else g = dy
    HAS_DS: tl.constexpr,  # add the gradient that reached the S output
    ROWS: tl.constexpr,  # rows per tile
):
    """dx of one tile of whole rows (stored), and the running dweight/dbias sums with it added."""
    rows = r0 + tl.arange(0, ROWS)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    dy = dy.to(tl.float32)
    xhat = tl.where(mask, (s.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:  # reloaded per tile (an L1 hit) rather than held: registers are the limit here
        g = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c1 = tl.sum(xhat * g, axis=1) / N
    c2 = tl.sum(g, axis=1) / N
    store_dx(g, xhat * c1[:, None] + c2[:, None], rstd, DS, DX, rows, stride_ds_row, N, cols, mask, HAS_DS)
    return dw_acc + dy * xhat, db_acc + dy


@triton.jit
def _bwd_load_tile(
    DY,  # gradient of Y
    S,  # the normalized input s
    MEAN,  # fp32 row means
    RSTD,  # fp32 row 1/std
    r0,  # first row of the tile
    row_end,  # rows from row_end on are masked off
    stride_dy_row,  # elements between rows of DY
    stride_s_row,  # elements between rows of S
    cols,  # (BLOCK_N,) column indices
    col_mask,  # (BLOCK_N,) cols < N
    ROWS: tl.constexpr,  # rows per tile
):
    """(dy, s, mean, rstd) of rows r0 .. r0 + ROWS, dy and s in their storage dtype, zero where masked."""
    rows = r0 + tl.arange(0, ROWS)
    row_mask = rows < row_end
    dy, s = load_dy_s(DY, S, rows, stride_dy_row, stride_s_row, cols, row_mask[:, None] & col_mask[None, :])
    mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    return dy, s, mean, rstd


@triton.jit
def load_dy_s(
    DY,  # gradient of Y
    S,  # the normalized input s
    rows,  # (ROWS,) row indices
    stride_dy_row,  # elements between rows of DY
    stride_s_row,  # elements between rows of S
    cols,  # (BLOCK_N,) column indices
    mask,  # (ROWS, BLOCK_N) valid elements
):
    """(dy, s) of the given rows and columns, in their storage dtype, zero where masked."""
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0)
    s = tl.load(S + rows64 * stride_s_row + cols[None, :], mask=mask, other=0.0)
    return dy, s


@triton.jit
def _bwd_load_chunk(
    DY,  # gradient of Y
    S,  # the normalized input s
    W,  # (N,) weight (read only if HAS_WEIGHT)
    rows,  # (ROWS,) row indices
    stride_dy_row,  # elements between rows of DY
    stride_s_row,  # elements between rows of S
    cols,  # (BLOCK_N,) column indices of this chunk
    mask,  # (ROWS, BLOCK_N) valid elements
    mean,  # fp32 (ROWS,) row means
    rstd,  # fp32 (ROWS,) row 1/std
    N,  # row length
    HAS_WEIGHT: tl.constexpr,  # g = dy * w, else g = dy
):
    """(dy, xhat, g = dy * w) for one chunk of rows, fp32, all zero where masked."""
    dy, s = load_dy_s(DY, S, rows, stride_dy_row, stride_s_row, cols, mask)
    dy = dy.to(tl.float32)
    xhat = tl.where(mask, (s.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return dy, xhat, g


@triton.jit
def store_dx(
    g,  # fp32 (ROWS, BLOCK_N) dy times the weight (dy without one)
    g_proj,  # fp32 (ROWS, BLOCK_N) what the normalization takes out of g: xhat * c1 + c2 (RMSNorm: xhat * c)
    rstd,  # fp32 (ROWS,) row 1/std (RMSNorm: 1/rms)
    DS,  # gradient of the S output (read only if HAS_DS)
    DX,  # (M, N) contiguous output
    rows,  # (ROWS,) row indices
    stride_ds_row,  # elements between rows of DS
    N,  # row length (DX's row stride)
    cols,  # (BLOCK_N,) column indices of this chunk
    mask,  # (ROWS, BLOCK_N) valid elements
    HAS_DS: tl.constexpr,  # add the gradient that reached the S output
):
    """dx = (g - g_proj) * rstd (+ ds), stored."""
    dx = (g - g_proj) * rstd[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    if HAS_DS:
        dx += tl.load(DS + rows64 * stride_ds_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    DW_PARTIAL,  # (P, N) fp32 per-program partial dweight (read only if HAS_DW)
    DB_PARTIAL,  # (P, N) fp32 per-program partial dbias (read only if HAS_DB)
    DW,  # (N,) output dweight in the weight's dtype (if HAS_DW)
    DB,  # (N,) output dbias in the bias's dtype (if HAS_DB)
    P,  # number of partial rows
    N,  # row length
    HAS_DW: tl.constexpr,  # reduce DW_PARTIAL into DW
    HAS_DB: tl.constexpr,  # reduce DB_PARTIAL into DB
    BLOCK_P: tl.constexpr,  # partial rows per step (power of 2)
    BLOCK_N: tl.constexpr,  # columns per program (power of 2)
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        mask = (rows[:, None] < P) & col_mask[None, :]
        if HAS_DW:
            dw_acc += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
        if HAS_DB:
            db_acc += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
    if HAS_DW:
        tl.store(DW + cols, tl.sum(dw_acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_DB:
        tl.store(DB + cols, tl.sum(db_acc, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# 2. Launchers: validate, allocate, pick the config, launch. No autograd.


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (M, n) rows, M = all leading dims. A view whenever the leading dims flatten without a
    copy (contiguous, or rows spaced by a stride such as a column slice x[..., :n]); otherwise
    (e.g. transposed leading dims) `reshape` copies. The last dim already has unit stride."""
    return t.reshape(-1, n)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None) -> int:
    n = layer_norm_spec.check(x, weight, bias, residual)
    checks.triton_device("layer_norm", x=x, weight=weight, bias=bias, residual=residual)
    return n


def check_out(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor,
              dtype: torch.dtype) -> None:
    """A preallocated output `name` of `op` is contiguous with the expected shape, dtype and device."""
    require(tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == like.device
            and t.is_contiguous(),
            f"{op}: out {name} must be a contiguous {tuple(shape)} {dtype} tensor on "
            f"{like.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def outputs(op: str, like: torch.Tensor, out: tuple[torch.Tensor, ...] | None,
            *specs: tuple[str, tuple[int, ...], torch.dtype]) -> tuple[torch.Tensor, ...]:
    """The outputs of `op` described by `specs` ((name, shape, dtype) each) on `like`'s device:
    allocated, or the preallocated `out` once each is checked (`check_out`)."""
    if out is None:
        return tuple(like.new_empty(shape, dtype=dtype) for _, shape, dtype in specs)
    for t, (name, shape, dtype) in zip(out, specs, strict=True):
        check_out(op, name, t, shape, like, dtype)
    return tuple(out)


def check_grads(op: str, s: torch.Tensor, dy: torch.Tensor, ds: torch.Tensor | None) -> None:
    """The gradients dy of y and ds of the s output (None: no s output) of a backward of `op` match
    the normalized input s in kind, device and shape."""
    checks.same_kind(op, "s", s, dy=dy, ds=ds)
    checks.triton_device(op, dy=dy, ds=ds)
    for name, t in (("dy", dy), ("ds", ds)):
        require(t is None or t.shape == s.shape,
                f"{op}: {name} shape {tuple(t.shape) if t is not None else None} "
                f"!= input shape {tuple(s.shape)}")


def check_row_stats(op: str, m: int, s: torch.Tensor, **stats: torch.Tensor) -> None:
    """Each of the forward's per-row statistics `stats` (e.g. rstd) is fp32 (m,) on s's device."""
    for name, t in stats.items():
        require(t.shape == (m,) and t.dtype == torch.float32 and t.device == s.device,
                f"{op}: {name} must be fp32 ({m},) on {s.device}, got {tuple(t.shape)} {t.dtype}")


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   residual: torch.Tensor | None, eps: float,
                   out: tuple[torch.Tensor, ...] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, mean, rstd): y = LN(s) shaped like x; s = x + residual (an empty tensor when
    residual is None); mean and rstd are fp32 (M,) with M = x.numel() // N. `out` optionally
    supplies those four tensors preallocated (tests poison them)."""
    n = _check_inputs(x, weight, bias, residual)
    require(eps > 0, f"layer_norm: eps must be > 0, got {eps}")
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y, s, mean, rstd = outputs("layer_norm", x, out, ("y", x.shape, x.dtype),
                               ("s", x.shape if residual is not None else (0,), x.dtype),
                               ("mean", (m,), torch.float32), ("rstd", (m,), torch.float32))
    if m == 0:
        return y, s, mean, rstd
    r2 = as_rows(residual, n) if residual is not None else None
    cfg = norm_configs.row_config(n)
    _layer_norm_fwd_kernel[(triton.cdiv(m, cfg.rows),)](
        x2, r2, weight, bias, y, s if residual is not None else None, mean, rstd,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, m, n, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, ROWS=cfg.rows, ONE_PASS=cfg.one_pass, num_warps=cfg.num_warps)
    return y, s, mean, rstd


def reduce_partials(dw_partial: torch.Tensor | None, db_partial: torch.Tensor | None,
                    dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """dw = the column sums of dw_partial, db = those of db_partial (fp32 (programs, N) partial rows
    of a backward; None: not reduced), added in a fixed order and stored in dw's / db's dtype."""
    partial = dw_partial if dw_partial is not None else db_partial
    programs, n = partial.shape
    _layer_norm_bwd_reduce_kernel[(triton.cdiv(n, norm_configs.REDUCE_BLOCK_N),)](
        dw_partial, db_partial, dw, db, programs, n, HAS_DW=dw_partial is not None, HAS_DB=db_partial is not None,
        BLOCK_P=norm_configs.REDUCE_BLOCK_P, BLOCK_N=norm_configs.REDUCE_BLOCK_N, num_warps=norm_configs.REDUCE_WARPS)


def layer_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor,
                   weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                   out: tuple[torch.Tensor, ...] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) from the gradient dy of y and ds of the s output (None: no s output),
    the normalized input s (x, or x + residual) and the forward's mean/rstd. dweight is an
    empty tensor when weight is None, dbias when has_bias is False. dx is also the residual's
    gradient. Reductions over rows are deterministic (fixed per-program groups, fixed order)."""
    n = _check_inputs(s, weight, None, None)
    check_grads("layer_norm", s, dy, ds)
    s2, dy2 = as_rows(s, n), as_rows(dy, n)
    m = s2.shape[0]
    check_row_stats("layer_norm", m, s, mean=mean, rstd=rstd)
    param_dtype = weight.dtype if weight is not None else s.dtype
    dx, dw, db = outputs("layer_norm", s, out, ("dx", s.shape, s.dtype),
                         ("dweight", (n,) if weight is not None else (0,), param_dtype),
                         ("dbias", (n,) if has_bias else (0,), param_dtype))
    has_dw = weight is not None
    if m == 0:
        dw.zero_()
        db.zero_()
        return dx, dw, db
    ds2 = as_rows(ds, n) if ds is not None else None
    cfg = norm_configs.row_config(n)
    programs, rows_per_program = norm_configs.bwd_grid(m, cfg, s.device)
    dw_partial = s.new_empty((programs, n), dtype=torch.float32) if has_dw else None
    db_partial = s.new_empty((programs, n), dtype=torch.float32) if has_bias else None
    row_sums = None if cfg.one_pass else s.new_empty((2, m), dtype=torch.float32)
    _layer_norm_bwd_kernel[(programs,)](
        dy2, ds2, s2, weight, mean, rstd, dx, dw_partial, db_partial, row_sums,
        dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, s2.stride(0), m, n, rows_per_program,
        HAS_DS=ds is not None, HAS_WEIGHT=has_dw, HAS_DB=has_bias,
        BLOCK_N=cfg.block_n, ROWS=cfg.rows, ONE_PASS=cfg.one_pass, num_warps=cfg.num_warps)
    if has_dw or has_bias:
        reduce_partials(dw_partial, db_partial, dw if has_dw else None, db if has_bias else None)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# 3. Custom ops (opaque to torch.compile, with fake implementations) and their autograd


@torch.library.custom_op("tritongpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd(x, weight, bias, residual, eps)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps):
    n = _check_inputs(x, weight, bias, residual)
    m = x.numel() // n
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,)),
            x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32))


@torch.library.custom_op("tritongpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor,
                       weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                       has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, ds, s, weight, mean, rstd, has_bias)


@_layer_norm_bwd_op.register_fake
def _(dy, ds, s, weight, mean, rstd, has_bias):
    n = s.shape[-1]
    param_dtype = weight.dtype if weight is not None else s.dtype
    return (s.new_empty(s.shape), s.new_empty((n,) if weight is not None else (0,), dtype=param_dtype),
            s.new_empty((n,) if has_bias else (0,), dtype=param_dtype))


def unit_stride(grad: torch.Tensor) -> torch.Tensor:
    """grad, copied to unit last-dim stride when it has none (e.g. the expanded grad of a .sum())."""
    return grad if grad.stride(-1) == 1 else grad.clone(memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    y, s, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dy = unit_stride(dy)
    ds = unit_stride(ds) if ctx.has_residual else None
    dx, dw, db = torch.ops.tritongpt.layer_norm_bwd(dy, ds, s, weight, mean, rstd, ctx.has_bias)
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None,
            dx if ctx.has_residual else None, None)


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# 4. Public functional, the `triton` backend of op `layer_norm`


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, residual: torch.Tensor | None = None):
    """LayerNorm over the last dim (see `kernels/layer_norm_spec.py`, whose signature this follows).
    With `residual`, returns (LN(x + residual), x + residual) from one kernel pass.
    x: any leading shape, last dim N with unit stride; leading dims are flattened with
    `reshape` (a copy only when they cannot be viewed as rows)."""
    y, s, _, _ = torch.ops.tritongpt.layer_norm_fwd(x, weight, bias, residual, eps)
    return y if residual is None else (y, s)


registry.register("layer_norm", "triton", layer_norm, needs="triton", deterministic=True)
layer_norm_configs.register_compile_variants(fwd=_layer_norm_fwd_kernel, bwd=_layer_norm_bwd_kernel,
                                             reduce=_layer_norm_bwd_reduce_kernel)
