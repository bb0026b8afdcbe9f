"""RMSNorm in Triton: forward, backward, and the fused pre-norm residual add.

    y = s * rstd * (weight + weight_offset),  rstd = 1 / sqrt(mean(s^2) + eps),  over the last dim,

where s = x, or s = x + residual for the fused variant (which also returns s, the residual stream
of a pre-norm block); weight_offset is 0 for Llama, 1 for Gemma. rstd is fp32 whatever the input
dtype (fp32, fp16, bf16).

The design is LayerNorm's (kernels/layer_norm.py) without the centring: the same tiles of ROWS rows
x BLOCK_N columns (`norm_configs.row_config`), one pass with whole rows in registers up to
MAX_BLOCK_N (8192) columns and a sum-of-squares pass then a normalize pass over chunks beyond it,
the backward over a fixed group of rows per program (`norm_configs.bwd_grid`: narrow rows load the
next tile before this tile's math) with dweight accumulated in registers, one fp32 partial row per
program, which LayerNorm's column reduction (`layer_norm.reduce_partials`) adds in a fixed order:
dweight is bitwise reproducible. The backward of a row is

    dx = (g - xhat * mean(xhat * g)) * rstd (+ ds),  xhat = s * rstd,  g = dy * (weight + weight_offset),

and dweight the column sums of dy * xhat.

Layout of this file (Liger-Kernel ladder):
  1. `@triton.jit` kernels; the loads of s (with the residual add: `load_s_chunk`, `reload_s_chunk`)
     and of (dy, s) (`load_dy_s`), and the store of dx (`store_dx`) are LayerNorm's helpers.
  2. launchers `rms_norm_fwd` / `rms_norm_bwd`: validate, allocate, pick the tile config, launch;
     the allocation and the checks of gradients and statistics are LayerNorm's launchers' helpers.
  3. torch.library custom ops `tritongpt::rms_norm_fwd` / `tritongpt::rms_norm_bwd` with fake
     implementations and autograd, so torch.compile(fullgraph=True) traces through them.
  4. the public functional `rms_norm`, registered as the `triton` backend of op `rms_norm`.
The compile report's variants: kernels/rms_norm_configs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks, norm_configs, registry, rms_norm_configs, rms_norm_spec
from tritongpt.kernels.layer_norm import (
    as_rows,
    check_grads,
    check_row_stats,
    load_dy_s,
    load_s_chunk,
    outputs,
    reduce_partials,
    reload_s_chunk,
    store_dx,
    unit_stride,
)

OP = rms_norm_spec.OP

# ----------------------------------------------------------------------------------------------
# 1. Triton kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # (M, N) input rows, row stride stride_x_row, unit column stride
    R,  # (M, N) residual rows added to X before normalizing (read only if HAS_RESIDUAL)
    W,  # (N,) weight (read only if HAS_WEIGHT)
    Y,  # (M, N) contiguous output RMSNorm(s)
    S,  # (M, N) contiguous output s = X + R (written only if HAS_RESIDUAL)
    RSTD,  # (M,) fp32 output: 1 / sqrt(mean(s^2) + eps) of each row of s
    stride_x_row,  # elements between rows of X
    stride_r_row,  # elements between rows of R
    M,  # number of rows
    N,  # row length
    eps,  # added to the mean square
    weight_offset,  # added to W (Gemma's 1 + weight)
    HAS_RESIDUAL: tl.constexpr,  # normalize s = X + R and store s to S
    HAS_WEIGHT: tl.constexpr,  # scale by W + weight_offset
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
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
        _scale_store_chunk(s, rstd, W, Y + out_off, cols, mask, N, weight_offset, HAS_WEIGHT)
    else:
        # sum-of-squares pass (no cancellation to guard against, unlike LayerNorm's variance)
        sum_sq = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            s = load_s_chunk(X, R, S, x_off, r_off, out_off, cols, mask, HAS_RESIDUAL)
            sum_sq += tl.sum(s * s, axis=1)
        rstd = 1.0 / tl.sqrt(sum_sq / N + eps)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the normalize pass reads back S, stored by other threads of this program
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            s = reload_s_chunk(X, S, x_off, out_off, cols, mask, HAS_RESIDUAL)
            _scale_store_chunk(s, rstd, W, Y + out_off, cols, mask, N, weight_offset, HAS_WEIGHT)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _gain(
    W,  # (N,) weight
    cols,  # (BLOCK_N,) column indices
    N,  # row length
    weight_offset,  # added to the weight
):
    """fp32 (BLOCK_N,) weight + weight_offset (columns past N are never stored)."""
    return tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + weight_offset


@triton.jit
def _scale_store_chunk(
    s,  # fp32 (ROWS, BLOCK_N) chunk of s, zero where masked
    rstd,  # fp32 (ROWS,)
    W,  # (N,) weight (read only if HAS_WEIGHT)
    y_rows,  # (ROWS, 1) pointers to the rows of Y
    cols,  # (BLOCK_N,) column indices of this chunk
    mask,  # (ROWS, BLOCK_N) valid elements
    N,  # row length
    weight_offset,  # added to W
    HAS_WEIGHT: tl.constexpr,  # scale by W + weight_offset
):
    y = s * rstd[:, None]
    if HAS_WEIGHT:
        y *= _gain(W, cols, N, weight_offset)[None, :]
    tl.store(y_rows + cols[None, :], y.to(y_rows.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # (M, N) gradient of Y, row stride stride_dy_row
    DS,  # (M, N) gradient flowing into the S output (read only if HAS_DS)
    S,  # (M, N) the normalized input s saved by the forward, row stride stride_s_row
    W,  # (N,) weight (read only if HAS_WEIGHT)
    RSTD,  # (M,) fp32 row 1/rms from the forward
    DX,  # (M, N) contiguous output: gradient of s (and so of x and of the residual)
    DW_PARTIAL,  # (programs, N) fp32 output: this program's sum of dy * xhat (if HAS_WEIGHT)
    ROW_SUMS,  # (M,) fp32 scratch: mean(xhat * g) of each row (chunked rows only; None when ONE_PASS)
    stride_dy_row,  # elements between rows of DY
    stride_ds_row,  # elements between rows of DS
    stride_s_row,  # elements between rows of S
    M,  # number of rows
    N,  # row length
    rows_per_program,  # this program handles rows [pid * rows_per_program, + rows_per_program)
    weight_offset,  # added to W
    HAS_DS: tl.constexpr,  # add DS to the input gradient
    HAS_WEIGHT: tl.constexpr,  # scale by W + weight_offset, and accumulate partial dweight
    BLOCK_N: tl.constexpr,  # columns per chunk (power of 2)
    ROWS: tl.constexpr,  # rows per tile (power of 2)
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: a tile holds whole rows
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partial_off = pid.to(tl.int64) * N
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        if ROWS > 1:
            # narrow rows: the next tile's loads go out before this tile's math (past row_end they
            # are masked off), as one tile of a few rows holds too few bytes to cover the latency
            dy, s, rstd = _bwd_load_tile(DY, S, RSTD, row_start, row_end, stride_dy_row, stride_s_row,
                                         cols, col_mask, ROWS)
            for r0 in range(row_start, row_end, ROWS):
                dy_next, s_next, rstd_next = _bwd_load_tile(DY, S, RSTD, r0 + ROWS, row_end, stride_dy_row,
                                                            stride_s_row, cols, col_mask, ROWS)
                dw_acc = _bwd_tile(dy, s, rstd, dw_acc, r0, row_end, W, DS, DX, stride_ds_row, N, cols, col_mask,
                                   weight_offset, HAS_WEIGHT, HAS_DS, ROWS)
                dy, s, rstd = dy_next, s_next, rstd_next
        else:
            # a one-row tile (N > 2048) already has >= 4 KB per tensor in flight
            for r0 in range(row_start, row_end):
                dy, s, rstd = _bwd_load_tile(DY, S, RSTD, r0, row_end, stride_dy_row, stride_s_row,
                                             cols, col_mask, ROWS)
                dw_acc = _bwd_tile(dy, s, rstd, dw_acc, r0, row_end, W, DS, DX, stride_ds_row, N, cols, col_mask,
                                   weight_offset, HAS_WEIGHT, HAS_DS, ROWS)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + partial_off + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    else:
        # pass 1, row by row: mean(xhat * g) over the row's chunks, kept in ROW_SUMS
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_mask = rows < row_end
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            c = tl.zeros((ROWS,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                dy, xhat, g = _bwd_load_chunk(DY, S, W, rows, stride_dy_row, stride_s_row, cols, mask, rstd, N,
                                              weight_offset, HAS_WEIGHT)
                c += tl.sum(xhat * g, axis=1)
            tl.store(ROW_SUMS + rows, c / N, mask=row_mask)
        tl.debug_barrier()  # pass 2 reads back row sums stored by other threads of this program
        # pass 2, chunk by chunk: dx of every row, and this chunk's dweight partials in registers
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for r0 in range(row_start, row_end, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                row_mask = rows < row_end
                mask = row_mask[:, None] & (cols < N)[None, :]
                rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
                dy, xhat, g = _bwd_load_chunk(DY, S, W, rows, stride_dy_row, stride_s_row, cols, mask, rstd, N,
                                              weight_offset, HAS_WEIGHT)
                c = tl.load(ROW_SUMS + rows, mask=row_mask, other=0.0)
                store_dx(g, xhat * c[:, None], rstd, DS, DX, rows, stride_ds_row, N, cols, mask, HAS_DS)
                if HAS_WEIGHT:
                    dw_acc += dy * xhat
            if HAS_WEIGHT:
                tl.store(DW_PARTIAL + partial_off + cols, tl.sum(dw_acc, axis=0), mask=cols < N)


@triton.jit
def _bwd_tile(
    dy,  # (ROWS, BLOCK_N) gradient of Y, storage dtype, zero where masked
    s,  # (ROWS, BLOCK_N) the normalized input, storage dtype, zero where masked
    rstd,  # fp32 (ROWS,) row 1/rms
    dw_acc,  # fp32 (ROWS, BLOCK_N) running sum of dy * xhat
    r0,  # first row of the tile
    row_end,  # rows from row_end on are masked off
    W,  # (N,) weight (read only if HAS_WEIGHT)
    DS,  # gradient of the S output (read only if HAS_DS)
    DX,  # (M, N) contiguous output
    stride_ds_row,  # elements between rows of DS
    N,  # row length
    cols,  # (BLOCK_N,) column indices
    col_mask,  # (BLOCK_N,) cols < N
    weight_offset,  # added to W
    HAS_WEIGHT: tl.constexpr,  # g = dy * (w + weight_offset), else g = dy
    HAS_DS: tl.constexpr,  # add the gradient that reached the S output
    ROWS: tl.constexpr,  # rows per tile
):
    """dx of one tile of whole rows (stored), and the running dweight sums with it added."""
    rows = r0 + tl.arange(0, ROWS)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    dy = dy.to(tl.float32)
    xhat = s.to(tl.float32) * rstd[:, None]  # masked: s = 0
    g = dy
    if HAS_WEIGHT:  # reloaded per tile (an L1 hit) rather than held: registers are the limit here
        g = dy * _gain(W, cols, N, weight_offset)[None, :]
        dw_acc += dy * xhat
    c = tl.sum(xhat * g, axis=1) / N
    store_dx(g, xhat * c[:, None], rstd, DS, DX, rows, stride_ds_row, N, cols, mask, HAS_DS)
    return dw_acc


@triton.jit
def _bwd_load_tile(
    DY,  # gradient of Y
    S,  # the normalized input s
    RSTD,  # fp32 row 1/rms
    r0,  # first row of the tile
    row_end,  # rows from row_end on are masked off
    stride_dy_row,  # elements between rows of DY
    stride_s_row,  # elements between rows of S
    cols,  # (BLOCK_N,) column indices
    col_mask,  # (BLOCK_N,) cols < N
    ROWS: tl.constexpr,  # rows per tile
):
    """(dy, s, rstd) of rows r0 .. r0 + ROWS, dy and s in their storage dtype, zero where masked."""
    rows = r0 + tl.arange(0, ROWS)
    row_mask = rows < row_end
    dy, s = load_dy_s(DY, S, rows, stride_dy_row, stride_s_row, cols, row_mask[:, None] & col_mask[None, :])
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    return dy, s, rstd


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
    rstd,  # fp32 (ROWS,) row 1/rms
    N,  # row length
    weight_offset,  # added to W
    HAS_WEIGHT: tl.constexpr,  # g = dy * (w + weight_offset), else g = dy
):
    """(dy, xhat, g) for one chunk of rows, fp32, all zero where masked."""
    dy, s = load_dy_s(DY, S, rows, stride_dy_row, stride_s_row, cols, mask)
    dy = dy.to(tl.float32)
    xhat = s.to(tl.float32) * rstd[:, None]
    g = dy
    if HAS_WEIGHT:
        g = dy * _gain(W, cols, N, weight_offset)[None, :]
    return dy, xhat, g


# ----------------------------------------------------------------------------------------------
# 2. Launchers: validate, allocate, pick the config, launch. No autograd.


def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None) -> int:
    n = rms_norm_spec.check(x, weight, residual)
    checks.triton_device(OP, x=x, weight=weight, residual=residual)
    return n


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                 weight_offset: float = 0.0, out: tuple[torch.Tensor, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd): y = RMSNorm(s) shaped like x; s = x + residual (an empty tensor when residual
    is None); rstd is fp32 (M,) with M = x.numel() // N. `out` optionally supplies those three
    tensors preallocated (tests poison them)."""
    n = _check_inputs(x, weight, residual)
    require(eps > 0, f"{OP}: eps must be > 0, got {eps}")
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y, s, rstd = outputs(OP, x, out, ("y", x.shape, x.dtype),
                         ("s", x.shape if residual is not None else (0,), x.dtype), ("rstd", (m,), torch.float32))
    if m == 0:
        return y, s, rstd
    r2 = as_rows(residual, n) if residual is not None else None
    cfg = norm_configs.row_config(n)
    _rms_norm_fwd_kernel[(triton.cdiv(m, cfg.rows),)](
        x2, r2, weight, y, s if residual is not None else None, rstd,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, m, n, eps, weight_offset,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        BLOCK_N=cfg.block_n, ROWS=cfg.rows, ONE_PASS=cfg.one_pass, num_warps=cfg.num_warps)
    return y, s, rstd


def rms_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
                 rstd: torch.Tensor, weight_offset: float = 0.0, out: tuple[torch.Tensor, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) from the gradient dy of y and ds of the s output (None: no s output), the
    normalized input s (x, or x + residual) and the forward's rstd. dweight is an empty tensor when
    weight is None. dx is also the residual's gradient. Reductions over rows are deterministic
    (fixed per-program groups, fixed order)."""
    n = _check_inputs(s, weight, None)
    check_grads(OP, s, dy, ds)
    s2, dy2 = as_rows(s, n), as_rows(dy, n)
    m = s2.shape[0]
    check_row_stats(OP, m, s, rstd=rstd)
    has_dw = weight is not None
    dw_shape, dw_dtype = ((n,), weight.dtype) if has_dw else ((0,), s.dtype)
    dx, dw = outputs(OP, s, out, ("dx", s.shape, s.dtype), ("dweight", dw_shape, dw_dtype))
    if m == 0:
        dw.zero_()
        return dx, dw
    ds2 = as_rows(ds, n) if ds is not None else None
    cfg = norm_configs.row_config(n)
    programs, rows_per_program = norm_configs.bwd_grid(m, cfg, s.device)
    dw_partial = s.new_empty((programs, n), dtype=torch.float32) if has_dw else None
    row_sums = None if cfg.one_pass else s.new_empty((m,), dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, ds2, s2, weight, rstd, dx, dw_partial, row_sums,
        dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, s2.stride(0), m, n, rows_per_program, weight_offset,
        HAS_DS=ds is not None, HAS_WEIGHT=has_dw,
        BLOCK_N=cfg.block_n, ROWS=cfg.rows, ONE_PASS=cfg.one_pass, num_warps=cfg.num_warps)
    if has_dw:
        reduce_partials(dw_partial, None, dw, None)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# 3. Custom ops (opaque to torch.compile, with fake implementations) and their autograd


@torch.library.custom_op("tritongpt::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                     weight_offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, residual, eps, weight_offset)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps, weight_offset):
    n = _check_inputs(x, weight, residual)
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,)),
            x.new_empty((x.numel() // n,), dtype=torch.float32))


@torch.library.custom_op("tritongpt::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
                     rstd: torch.Tensor, weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, ds, s, weight, rstd, weight_offset)


@_rms_norm_bwd_op.register_fake
def _(dy, ds, s, weight, rstd, weight_offset):
    dw = s.new_empty((s.shape[-1],), dtype=weight.dtype) if weight is not None else s.new_empty((0,))
    return s.new_empty(s.shape), dw


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, weight_offset = inputs
    _, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.weight_offset = weight_offset
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s if residual is not None else x, weight, rstd)


def _backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds = unit_stride(ds) if ctx.has_residual else None
    dx, dw = torch.ops.tritongpt.rms_norm_bwd(unit_stride(dy), ds, s, weight, rstd, ctx.weight_offset)
    return dx, dw if ctx.has_weight else None, dx if ctx.has_residual else None, None, None


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# 4. Public functional, the `triton` backend of op `rms_norm`


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
             residual: torch.Tensor | None = None, weight_offset: float = 0.0):
    """RMSNorm over the last dim (see `kernels/rms_norm_spec.py`, whose signature this follows).
    With `residual`, returns (RMSNorm(x + residual), x + residual) from one kernel pass.
    x: any leading shape, last dim N with unit stride; leading dims are flattened with
    `reshape` (a copy only when they cannot be viewed as rows)."""
    y, s, _ = torch.ops.tritongpt.rms_norm_fwd(x, weight, residual, eps, weight_offset)
    return y if residual is None else (y, s)


registry.register(OP, "triton", rms_norm, needs="triton", deterministic=True)
rms_norm_configs.register_compile_variants(fwd=_rms_norm_fwd_kernel, bwd=_rms_norm_bwd_kernel)
