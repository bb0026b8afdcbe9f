"""Fused linear + cross-entropy in Triton: the loss of z = x @ W[:V]^T and its gradients, with every
logits tile made and used on chip, so the (N, V) logits are never written.

    forward     per block of rows, a loop over vocabulary tiles: z tile = x_blk @ W_tile^T (fp32
                accumulation over C), online log-sum-exp (running max and sum), the target's logit
                and, for label smoothing, the sum of logits. Writes lse (N,) and each row's loss (N,).
    backward    dz = softmax(z) - (1 - s) onehot(t) - s / V on rows not ignored, recomputed tile by tile
                from x, W and lse, then scaled by dloss / count after the dots (so fp16 never holds
                the tiny scaled values):
                  dx kernel:  per block of rows, dx_blk += dz_tile @ W_tile over vocabulary tiles
                  dW kernel:  per vocabulary tile, dW_tile += dz_tile^T @ x_blk over row blocks
                Each program owns its output rows and adds into them in a fixed order (fp32
                accumulators in global memory, read and written once per tile step: traffic a GPU
                run has to weigh): deterministic, no atomics, at the price of recomputing the
                logits once per backward kernel (5 matmuls' FLOPs in all, against 3 unfused).

Layout of this file (the ladder of the other kernels): 1. `@triton.jit` kernels; 2. launchers
(validate, allocate, launch); 3. torch.library custom ops with fake implementations and autograd;
4. the public functional, registered as backend `triton` of op `linear_cross_entropy`. Tiles
(`tiles_for`) and the compile report's variants: kernels/linear_cross_entropy_configs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks, linear_cross_entropy_configs, registry
from tritongpt.kernels.linear_cross_entropy_spec import OP, check, check_targets

_LOG2E = tl.constexpr(1.4426950408889634)

# ----------------------------------------------------------------------------------------------
# 1. Triton kernels


@triton.jit
def _logits_tile(
    X,  # (N, C) rows of x, unit column stride
    W,  # (V_padded, C) weight rows, unit column stride
    rows,  # (BLOCK_M,) int64 row indices of this tile
    cols,  # (BLOCK_V,) int64 vocabulary indices of this tile
    row_mask,  # rows < N
    col_mask,  # cols < V
    C,  # width, the reduced dim
    stride_x,  # elements between rows of X
    stride_w,  # elements between rows of W
    BLOCK_M: tl.constexpr,  # rows of the tile
    BLOCK_V: tl.constexpr,  # vocabulary entries of the tile
    BLOCK_K: tl.constexpr,  # C step of the dot loop
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; fp16/bf16 ignore it
):
    """z = X[rows] @ W[cols]^T, (BLOCK_M, BLOCK_V) fp32; masked rows and columns read zeros."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_x + ks[None, :]
    w_ptrs = W + cols[None, :] * stride_w + ks[:, None]  # W^T tile by strides, never a copy
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(C, BLOCK_K)):
        k_mask = ks < C - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _dlogits_tile(
    z,  # (BLOCK_M, BLOCK_V) fp32 logits tile
    lse,  # (BLOCK_M,) fp32 log-sum-exp of each row
    targets,  # (BLOCK_M,) target of each row
    valid,  # (BLOCK_M,) row exists and its target is not ignored
    cols,  # (BLOCK_V,) vocabulary indices of the tile
    col_mask,  # cols < V
    label_smoothing,  # s
    smooth_share,  # s / V
):
    """d(row loss)/dz = softmax - (1 - s) onehot(target) - s / V; zero on ignored rows and cols >= V."""
    probs = tl.exp2((z - lse[:, None]) * _LOG2E)
    hit = cols[None, :] == targets[:, None]
    dz = probs - tl.where(hit, 1.0 - label_smoothing, 0.0) - smooth_share
    return tl.where(valid[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def _add_dot_rows(
    OUT,  # (rows of OUT, C) contiguous fp32 accumulator
    out_rows,  # (BLOCK_R,) int64 rows of OUT this program updates
    out_mask,  # (BLOCK_R,) out_rows that exist
    SRC,  # (rows of SRC, C) operand, row stride stride_src, unit column stride
    src_rows,  # (BLOCK_S,) int64 rows of SRC the tile reads
    src_mask,  # (BLOCK_S,) src_rows that exist
    stride_src,  # elements between rows of SRC
    g,  # (BLOCK_R, BLOCK_S) gradient tile in SRC's dtype
    scale,  # fp32 factor applied after the dot
    accumulate,  # False on the first step: OUT was not written yet, so it is not read
    C,  # width
    BLOCK_C: tl.constexpr,  # columns of OUT updated per dot
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"
):
    """OUT[out_rows] (+)= (g @ SRC[src_rows]) * scale, BLOCK_C columns at a time."""
    for c in range(0, tl.cdiv(C, BLOCK_C)):
        cc = c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = cc < C
        src = tl.load(SRC + src_rows[:, None] * stride_src + cc[None, :],
                      mask=src_mask[:, None] & c_mask[None, :], other=0.0)
        update = tl.dot(g, src, input_precision=INPUT_PRECISION) * scale
        out_ptrs = OUT + out_rows[:, None] * C + cc[None, :]
        out_tile_mask = out_mask[:, None] & c_mask[None, :]
        update += tl.load(out_ptrs, mask=out_tile_mask & accumulate, other=0.0)
        tl.store(out_ptrs, update, mask=out_tile_mask)


@triton.jit
def _lce_fwd_kernel(
    X,  # (N, C) input rows, row stride stride_x, unit column stride
    W,  # (V_padded, C) weight, row stride stride_w, unit column stride
    TARGETS,  # (N,) contiguous integer targets
    LOSS,  # (N,) fp32 output: each row's loss, 0 on ignored rows
    LSE,  # (N,) fp32 output: each row's log-sum-exp over the V logits
    N,  # rows
    C,  # width
    V,  # vocabulary predicted (weight rows >= V are never read)
    stride_x,  # elements between rows of X
    stride_w,  # elements between rows of W
    ignore_index,  # targets equal to it add no loss
    label_smoothing,  # s: weight of the uniform distribution in the target
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary entries per tile
    BLOCK_K: tl.constexpr,  # C step of the logits dot
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    targets = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # of exp(z - running_max)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # for label smoothing's mean logit
    for v in range(0, tl.cdiv(V, BLOCK_V)):
        cols = v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(X, W, rows, cols, row_mask, col_mask, C, stride_x, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))  # finite: every tile has a column < V
        running_sum = (running_sum * tl.exp2((running_max - new_max) * _LOG2E)
                       + tl.sum(tl.exp2((z - new_max[:, None]) * _LOG2E), axis=1))
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    loss = (lse - target_logit) * (1.0 - label_smoothing) + (lse - logit_sum / V) * label_smoothing
    valid = row_mask & (targets != ignore_index)
    tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(LSE + rows, lse, mask=row_mask)


@triton.jit
def _lce_bwd_dx_kernel(
    X,  # (N, C) input rows, row stride stride_x, unit column stride
    W,  # (V_padded, C) weight, row stride stride_w, unit column stride
    TARGETS,  # (N,) contiguous integer targets
    LSE,  # (N,) fp32 log-sum-exp from the forward
    SCALE,  # (1,) fp32: dloss / count of rows not ignored
    DX,  # (N, C) contiguous fp32 output (and accumulator): the gradient of x
    N,  # rows
    C,  # width
    V,  # vocabulary predicted
    stride_x,  # elements between rows of X
    stride_w,  # elements between rows of W
    ignore_index,  # targets equal to it get no gradient
    label_smoothing,  # s
    smooth_share,  # s / V
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary entries per tile
    BLOCK_K: tl.constexpr,  # C step of the logits dot
    BLOCK_C: tl.constexpr,  # columns of DX updated per dot
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    targets = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (targets != ignore_index)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    scale = tl.load(SCALE)
    for v in range(0, tl.cdiv(V, BLOCK_V)):
        cols = v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(X, W, rows, cols, row_mask, col_mask, C, stride_x, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        dz = _dlogits_tile(z, lse, targets, valid, cols, col_mask, label_smoothing, smooth_share)
        dz = dz.to(W.dtype.element_ty)
        # the first vocabulary tile starts the sum: DX is never read before this program wrote it
        _add_dot_rows(DX, rows, row_mask, W, cols, col_mask, stride_w, dz, scale, v > 0, C, BLOCK_C,
                      INPUT_PRECISION)


@triton.jit
def _lce_bwd_dw_kernel(
    X,  # (N, C) input rows, row stride stride_x, unit column stride
    W,  # (V_padded, C) weight, row stride stride_w, unit column stride
    TARGETS,  # (N,) contiguous integer targets
    LSE,  # (N,) fp32 log-sum-exp from the forward
    SCALE,  # (1,) fp32: dloss / count of rows not ignored
    DW,  # (V, C) contiguous fp32 output (and accumulator): the gradient of W[:V]
    N,  # rows (>= 1)
    C,  # width
    V,  # vocabulary predicted
    stride_x,  # elements between rows of X
    stride_w,  # elements between rows of W
    ignore_index,  # targets equal to it give no gradient
    label_smoothing,  # s
    smooth_share,  # s / V
    BLOCK_M: tl.constexpr,  # rows per step of the loop over rows
    BLOCK_V: tl.constexpr,  # vocabulary entries per program
    BLOCK_K: tl.constexpr,  # C step of the logits dot
    BLOCK_C: tl.constexpr,  # columns of DW updated per dot
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    scale = tl.load(SCALE)
    for m in range(0, tl.cdiv(N, BLOCK_M)):
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        targets = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
        valid = row_mask & (targets != ignore_index)
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        z = _logits_tile(X, W, rows, cols, row_mask, col_mask, C, stride_x, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        dz_t = tl.trans(_dlogits_tile(z, lse, targets, valid, cols, col_mask, label_smoothing,
                                      smooth_share).to(X.dtype.element_ty))  # (BLOCK_V, BLOCK_M)
        # the first row block starts the sum: DW is never read before this program wrote it
        _add_dot_rows(DW, cols, col_mask, X, rows, row_mask, stride_x, dz_t, scale, m > 0, C, BLOCK_C,
                      INPUT_PRECISION)


# ----------------------------------------------------------------------------------------------
# 2. Launchers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every tensor a kernel of this file writes is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)



def _check_inputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  label_smoothing: float, vocab: int) -> tuple[int, int]:
    """(N, C) of 2-D x after the op's checks and Triton's device, dtype and stride rules."""
    require(x.dim() == 2, f"{OP}: the launchers take x as (N, C) rows, got {checks.describe(x)}")
    n, c, _ = check(x, weight, targets, ignore_index, label_smoothing, vocab)
    checks.triton_device(OP, x=x, weight=weight)
    return n, c


def linear_cross_entropy_fwd(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             label_smoothing: float, vocab: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, divisor) for x (N, C), weight (V_padded, C), targets (N,): the mean loss (fp32),
    each row's log-sum-exp (N,) fp32 and the count of rows not ignored, at least 1 (fp32), which
    backward divides by."""
    n, c = _check_inputs(x, weight, targets, ignore_index, label_smoothing, vocab)
    check_targets(targets, ignore_index, vocab)
    targets = targets.contiguous()
    row_loss = _empty((n,), torch.float32, x.device)
    lse = _empty((n,), torch.float32, x.device)
    if n:
        precision = checks.input_precision(x.dtype)
        tiles = linear_cross_entropy_configs.launch_tiles(x.dtype, precision, n)
        _lce_fwd_kernel[(triton.cdiv(n, tiles.block_m),)](
            x, weight, targets, row_loss, lse, n, c, vocab, x.stride(0), weight.stride(0), ignore_index,
            float(label_smoothing), BLOCK_M=tiles.block_m, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k,
            INPUT_PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    divisor = (targets != ignore_index).sum().clamp_min(1).to(torch.float32)
    return row_loss.sum() / divisor, lse, divisor


def linear_cross_entropy_bwd(dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             lse: torch.Tensor, divisor: torch.Tensor, ignore_index: int, label_smoothing: float,
                             vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) in x's and weight's dtypes from the loss gradient dloss (a scalar) and the
    forward's lse and divisor. Padding rows (>= vocab) of dweight are zero. Deterministic."""
    n, c = _check_inputs(x, weight, targets, ignore_index, label_smoothing, vocab)
    require(lse.shape == (n,) and lse.dtype == torch.float32 and lse.device == x.device,
            f"{OP}: lse must be fp32 ({n},) on {x.device}, got {checks.describe(lse)}")
    require(dloss.numel() == 1 and divisor.numel() == 1, f"{OP}: dloss and divisor must be scalars")
    targets = targets.contiguous()
    dx32 = _empty((n, c), torch.float32, x.device)  # fp32 sum over vocabulary tiles; x's dtype at the end
    dw = _empty(tuple(weight.shape), weight.dtype, x.device)
    dw32 = dw[:vocab] if weight.dtype == torch.float32 else _empty((vocab, c), torch.float32, x.device)
    dw[vocab:].zero_()  # padding rows are never predicted
    if n == 0:
        dw.zero_()
        return dx32.to(x.dtype), dw
    scale = (dloss.to(torch.float32) / divisor).reshape(1)
    precision = checks.input_precision(x.dtype)
    tiles = linear_cross_entropy_configs.launch_tiles(x.dtype, precision, n)
    common = dict(BLOCK_M=tiles.block_m, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k, BLOCK_C=tiles.block_c,
                  INPUT_PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    args = (n, c, vocab, x.stride(0), weight.stride(0), ignore_index, float(label_smoothing),
            float(label_smoothing) / vocab)
    _lce_bwd_dx_kernel[(triton.cdiv(n, tiles.block_m),)](x, weight, targets, lse, scale, dx32, *args, **common)
    _lce_bwd_dw_kernel[(triton.cdiv(vocab, tiles.block_v),)](x, weight, targets, lse, scale, dw32, *args, **common)
    if weight.dtype != torch.float32:
        dw[:vocab].copy_(dw32)
    return dx32.to(x.dtype), dw


# ----------------------------------------------------------------------------------------------
# 3. Custom ops (opaque to torch.compile, with fake implementations) and their autograd


@torch.library.custom_op("tritongpt::linear_cross_entropy_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            label_smoothing: float, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_fwd(x, weight, targets, ignore_index, label_smoothing, vocab)


@_fwd_op.register_fake
def _(x, weight, targets, ignore_index, label_smoothing, vocab):
    return (x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("tritongpt::linear_cross_entropy_bwd", mutates_args=())
def _bwd_op(dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
            divisor: torch.Tensor, ignore_index: int, label_smoothing: float,
            vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_bwd(dloss, x, weight, targets, lse, divisor, ignore_index, label_smoothing, vocab)


@_bwd_op.register_fake
def _(dloss, x, weight, targets, lse, divisor, ignore_index, label_smoothing, vocab):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, targets, ignore_index, label_smoothing, vocab = inputs
    _, lse, divisor = output
    ctx.mark_non_differentiable(lse, divisor)
    ctx.save_for_backward(x, weight, targets, lse, divisor)
    ctx.options = (ignore_index, label_smoothing, vocab)


def _backward(ctx, dloss, _dlse, _ddivisor):
    x, weight, targets, lse, divisor = ctx.saved_tensors
    dx, dw = _bwd_op(dloss, x, weight, targets, lse, divisor, *ctx.options)
    return dx, dw, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# 4. Public functional, the `triton` backend of op `linear_cross_entropy`


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         label_smoothing: float = 0.0, vocab_limit: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of x @ weight[:vocab_limit]^T against targets, fused (see the module
    docstring; the contract is kernels/linear_cross_entropy_spec.py). x (..., C) with unit column
    stride (leading dims are flattened by `reshape`), weight (V_padded, C), targets x's leading
    shape. Returns the fp32 loss; 0, with zero gradients, when every target is ignore_index."""
    n, c, vocab = check(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    checks.triton_device(OP, x=x, weight=weight)
    loss, _, _ = _fwd_op(x.reshape(n, c), weight, targets.reshape(n), ignore_index, float(label_smoothing), vocab)
    return loss


registry.register(OP, "triton", linear_cross_entropy, needs="triton", deterministic=True)
linear_cross_entropy_configs.register_compile_variants(fwd=_lce_fwd_kernel, dx=_lce_bwd_dx_kernel,
                                                       dw=_lce_bwd_dw_kernel)
