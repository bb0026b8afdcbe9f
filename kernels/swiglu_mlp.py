"""The Llama feed-forward block, y = (silu(x @ Wg^T) * (x @ Wu^T)) @ Wd^T (+ residual): Triton where a
fused epilogue saves passes over the (M, F) activations, cuBLAS where a GEMM has nothing to fuse.

    forward   H  = silu(G) * U, G = x Wg^T, U = x Wu^T   Triton, epilogue "swiglu": one kernel computes both
                                                       GEMMs (two accumulators over the same x tiles) and
                                                       writes H (with SAVE_GU also G and U, for backward)
              y  = H @ Wd^T (+ residual)               cuBLAS
    backward  dH = dY @ Wd                             Triton, epilogue "swiglu_grad": writes
              dG = dH * U * silu'(G), dU = dH * silu(G)  dG and dU, never dH
              dx = dG Wg + dU Wu, dWg = dG^T x, dWu = dU^T x, dWd = dY^T H      cuBLAS

The forward is one GEMM of x against [Wg; Wu] as xformers' and CUTLASS's "dual GEMM" does it: each
program holds a gate tile and the matching up tile, so the epilogue multiplies them in registers and
only H leaves the chip; the weights stay two nn.Linear-layout tensors, never concatenated or copied.
The fused GEMMs have the GELU MLP's two implementations (kernels/mlp.py, whose `choose_path`, grouped
tile order, column quarters and launch helpers they use):
  "tma"      `_swiglu_tma_kernel`, Hopper: persistent, operands and outputs through TMA tensor
             descriptors, the epilogue in column quarters (Triton's persistent-matmul tutorial, 09).
  "pointer"  `_swiglu_matmul_kernel`: one program per tile, pointer loads; sm_80, operands TMA cannot
             address (odd widths, stride-0 grads), and a Triton without host tensor descriptors.
Backward keeps G, U and H (3 * M * F activations); `recompute=True` keeps none of them and recomputes
all three with the forward's fused kernel, tuned under the same autotune key, so results are bitwise
those of the default. Autotune configs and the compile report's variants: kernels/swiglu_mlp_configs.py.

    python -m pytest -q tests/test_swiglu_mlp.py                   # CPU: Triton interpreter vs float64, both paths
    python -m pytest -q -m gpu tests/test_swiglu_mlp.py            # GPU: bf16, Llama sizes
    tritongpt kernels compile --arch sm_90 --filter swiglu         # AOT compile report, no GPU
"""

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks, mlp, registry, swiglu_mlp_configs, swiglu_mlp_spec
from tritongpt.kernels.mlp import column_quarters, tile_coords
from tritongpt.kernels.swiglu_mlp_spec import OP

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _swiglu(g, u):
    """silu(g) * u of fp32 g, u, as g / (1 + exp(-g)) * u: 0 for g -> -inf, where exp(-g) = inf.
    (tl.sigmoid fails in the interpreter.)"""
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _swiglu_grad(dh, g, u):
    """(dG, dU) of H = silu(g) * u for fp32 dH, g, u: dH * u * silu'(g) and dH * silu(g), where
    silu'(g) = s + silu(g) (1 - s), s = sigmoid(g)."""
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    return dh * u * (s + silu * (1.0 - s)), dh * silu


@triton.autotune(configs=swiglu_mlp_configs.POINTER_CONFIGS, key=["M", "N", "K", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": swiglu_mlp_configs.prune_pointer_configs})
@triton.jit
def _swiglu_matmul_kernel(
    a_ptr,  # A (M, K): x (forward) or dY (backward), any strides
    b_ptr,  # B (K, N), any strides: W_gate (N, K) read as W_gate^T by strides (forward), W_down (K, N)
    b2_ptr,  # the forward's second B (K, N): W_up read as W_up^T; None in the backward
    c_ptr,  # C (M, N): H (forward) or dG (backward)
    c2_ptr,  # (M, N) dU (backward); None in the forward
    g_ptr,  # (M, N) G: the forward writes it when SAVE_GU, the backward reads it; else None
    u_ptr,  # (M, N) U, like g_ptr
    M,  # rows of A and C
    N,  # columns of B and C: the hidden width F
    K,  # the reduced dim
    stride_am, stride_ak,  # A strides, in elements
    stride_bk, stride_bn,  # B strides
    stride_b2k, stride_b2n,  # second B strides (0 in the backward)
    stride_cm, stride_cn,  # C and C2 strides
    stride_xm, stride_xn,  # G and U strides
    EPILOGUE: tl.constexpr,  # "swiglu" (forward) or "swiglu_grad" (backward), see _launch
    SAVE_GU: tl.constexpr,  # the forward also writes G and U (not an autotune key: recompute tunes alike)
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; fp16/bf16 ignore it
    BLOCK_M: tl.constexpr,  # rows of the C tile
    BLOCK_N: tl.constexpr,  # columns of the C tile
    BLOCK_K: tl.constexpr,  # K step of the loop
    GROUP_M: tl.constexpr,  # M tiles walked together so their B columns stay in L2
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones, so only K needs a load mask; their results
    # are computed and never stored. int64 row/column offsets: M * stride may pass 2^31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EPILOGUE == "swiglu":  # the up projection, on the same A tiles
        b2_ptrs = b2_ptr + offs_k[:, None] * stride_b2k + cols[None, :] * stride_b2n
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if EPILOGUE == "swiglu":
            b2 = tl.load(b2_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
            b2_ptrs += BLOCK_K * stride_b2k
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue, in fp32 on the accumulator tiles.
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_m = offs_m.to(tl.int64)[:, None]
    out_n = offs_n.to(tl.int64)[None, :]
    c_offs = out_m * stride_cm + out_n * stride_cn
    x_offs = out_m * stride_xm + out_n * stride_xn
    if EPILOGUE == "swiglu_grad":
        g = tl.load(g_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        dg, du = _swiglu_grad(acc, g, u)
        tl.store(c_ptr + c_offs, dg.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(c2_ptr + c_offs, du.to(c2_ptr.dtype.element_ty), mask=mask)
    else:
        if SAVE_GU:
            tl.store(g_ptr + x_offs, acc.to(g_ptr.dtype.element_ty), mask=mask)
            tl.store(u_ptr + x_offs, acc2.to(u_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + c_offs, _swiglu(acc, acc2).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tma_forward_epilogue(g, u, off_m, off_n, c_desc, g_desc, u_desc, SAVE_GU: tl.constexpr):
    """One column block of the forward's tiles: H = silu(g) * u, and g, u themselves when SAVE_GU,
    stored through TMA (rows and columns past the edge are clipped by the descriptors)."""
    if SAVE_GU:
        g_desc.store([off_m, off_n], g.to(g_desc.dtype))
        u_desc.store([off_m, off_n], u.to(u_desc.dtype))
    c_desc.store([off_m, off_n], _swiglu(g, u).to(c_desc.dtype))


@triton.jit
def _tma_grad_epilogue(dh, off_m, off_n, c_desc, c2_desc, g_desc, u_desc):
    """One column block of the backward's tile: dG and dU from dH and TMA-loaded G, U."""
    dg, du = _swiglu_grad(dh, g_desc.load([off_m, off_n]).to(tl.float32), u_desc.load([off_m, off_n]).to(tl.float32))
    c_desc.store([off_m, off_n], dg.to(c_desc.dtype))
    c2_desc.store([off_m, off_n], du.to(c2_desc.dtype))


@triton.autotune(configs=swiglu_mlp_configs.TMA_CONFIGS, key=["M", "N", "K", "EPILOGUE", "DTYPE"],
                 prune_configs_by={"early_config_prune": swiglu_mlp_configs.prune_tma_configs})
@triton.jit
def _swiglu_tma_kernel(
    a_desc,  # A (M, K) descriptor, blocks (BLOCK_M, BLOCK_K): x or dY
    b_desc,  # forward: over W_gate (N, K), blocks (BLOCK_N, BLOCK_K); backward: over W_down (K, N), (BLOCK_K, BLOCK_N)
    b2_desc,  # forward: over W_up (N, K) like b_desc; None in the backward
    c_desc,  # C (M, N) output descriptor, blocks (BLOCK_M, BLOCK_N // 4): H or dG
    c2_desc,  # (M, N) dU like c_desc (backward); None in the forward
    g_desc,  # (M, N) G like c_desc: the forward writes it when SAVE_GU, the backward reads it; else None
    u_desc,  # (M, N) U, like g_desc
    M,  # rows of A and C
    N,  # columns of B and C: the hidden width F
    K,  # the reduced dim
    DTYPE: tl.constexpr,  # the operands' dtype, for the autotune key only (descriptors show the autotuner none)
    EPILOGUE: tl.constexpr,  # "swiglu" (forward) or "swiglu_grad" (backward), see _launch
    SAVE_GU: tl.constexpr,  # the forward also writes G and U (not an autotune key: recompute tunes alike)
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; fp16/bf16 ignore it
    BLOCK_M: tl.constexpr,  # rows of the C tile
    BLOCK_N: tl.constexpr,  # columns of the C tile
    BLOCK_K: tl.constexpr,  # K step of the loop
    GROUP_M: tl.constexpr,  # M tiles walked together so their B columns stay in L2
    NUM_SMS: tl.constexpr,  # programs launched: each walks tiles start, start + NUM_SMS, ...
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue derives its tile from a counter of its own, not the loop's (as kernels/mlp.py's
    # TMA kernel does): in the flattened, software-pipelined loop no value then links one tile's
    # loads to the previous tile's epilogue.
    tile_c = start - NUM_SMS
    for tile in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_bn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EPILOGUE == "swiglu":
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_am, off_k])  # out-of-bounds rows and K columns read as zeros
            if EPILOGUE == "swiglu":  # gate and up tiles of the same columns, against the same A tile
                acc = tl.dot(a, b_desc.load([off_bn, off_k]).T, acc, input_precision=INPUT_PRECISION)
                acc2 = tl.dot(a, b2_desc.load([off_bn, off_k]).T, acc2, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, b_desc.load([off_k, off_bn]), acc, input_precision=INPUT_PRECISION)

        tile_c += NUM_SMS
        pid_m, pid_n = tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        off_cm = pid_m * BLOCK_M
        off_cn = pid_n * BLOCK_N
        # Epilogue in four column quarters, each a TMA block: fewer registers live at a time and a
        # quarter-tile of shared-memory staging per TMA store.
        quarters = column_quarters(acc, BLOCK_M, BLOCK_N)
        if EPILOGUE == "swiglu":
            ups = column_quarters(acc2, BLOCK_M, BLOCK_N)
            for j in tl.static_range(4):  # unrolled: quarters[j] needs a compile-time j
                _tma_forward_epilogue(quarters[j], ups[j], off_cm, off_cn + j * (BLOCK_N // 4), c_desc, g_desc, u_desc,
                                      SAVE_GU)
        else:
            for j in tl.static_range(4):
                _tma_grad_epilogue(quarters[j], off_cm, off_cn + j * (BLOCK_N // 4), c_desc, c2_desc, g_desc, u_desc)


# ----------------------------------------------------------------------------- launchers

def _empty(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Every output of the fused kernels is allocated here, in like's dtype (the tests poison it with NaN)."""
    return torch.empty(rows, cols, dtype=like.dtype, device=like.device)


def _check(a_name: str, a: torch.Tensor, **others: torch.Tensor | None) -> None:
    """One dtype and device for every tensor, and a dtype and device Triton runs on."""
    checks.same_kind(OP, a_name, a, **others)
    require(a.dtype != torch.float64 and (a.device.type == "cuda" or registry.interpreting()),
            f"{OP}: triton matmul needs fp32/fp16/bf16 CUDA tensors (or TRITON_INTERPRET=1), "
            f"got {a.dtype} on {a.device}")


def _launch(a: torch.Tensor, b: torch.Tensor, b2: torch.Tensor | None, c: torch.Tensor, c2: torch.Tensor | None,
            g: torch.Tensor | None, u: torch.Tensor | None, epilogue: str, save_gu: bool, path: str) -> None:
    """By `epilogue` (fp32 accumulation):
        "swiglu"       G = a @ b^T, U = a @ b2^T for weights b, b2 (N, K); C = silu(G) * U, and with
                       save_gu g = G, u = U
        "swiglu_grad"  dH = a @ b for b (K, N); C = dH * u * silu'(g), C2 = dH * silu(g)"""
    m, k = a.shape
    n = c.shape[1]
    common = dict(EPILOGUE=epilogue, SAVE_GU=save_gu, INPUT_PRECISION=checks.input_precision(a.dtype))
    if path == "tma":
        mlp.launch_tma(_swiglu_tma_kernel, (a, b, b2, c, c2, g, u), (), m, n, k, **common)
        return

    def kn_strides(w):  # (stride along K, stride along N) of B read from w
        if w is None:
            return 0, 0
        return (w.stride(1), w.stride(0)) if epilogue == "swiglu" else (w.stride(0), w.stride(1))

    aux = g if g is not None else c  # G and U share strides; without them the strides go unused
    _swiglu_matmul_kernel[mlp.tile_grid(m, n)](
        a, b, b2, c, c2, g, u, m, n, k, a.stride(0), a.stride(1), *kn_strides(b), *kn_strides(b2),
        c.stride(0), c.stride(1), aux.stride(0), aux.stride(1), **common)


def fc_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, save_gu: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(H, G, U): H = silu(G) * U with G = x @ w_gate^T, U = x @ w_up^T, from one fused kernel; G and
    U are returned (and written) only when save_gu. x (M, C) any strides, w_gate and w_up (F, C) in
    nn.Linear layout."""
    require(x.dim() == 2 and w_gate.dim() == 2 and x.shape[1] == w_gate.shape[1] >= 1
            and w_up.shape == w_gate.shape,
            f"{OP}: fc needs x (M, C) and w_gate, w_up (F, C), got {tuple(x.shape)}, {tuple(w_gate.shape)} "
            f"and {tuple(w_up.shape)}")
    _check("x", x, w_gate=w_gate, w_up=w_up)
    m, f = x.shape[0], w_gate.shape[0]
    h = _empty(m, f, x)
    g, u = (_empty(m, f, x), _empty(m, f, x)) if save_gu else (None, None)
    if m > 0:
        path = mlp.choose_path(*(t for t in (x, w_gate, w_up, h, g, u) if t is not None))
        _launch(x, w_gate, w_up, h, None, g, u, "swiglu", save_gu, path)
    return h, g, u


def swiglu_grad_matmul(dy: torch.Tensor, w_down: torch.Tensor, g: torch.Tensor, u: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dG, dU) = (dH * u * silu'(g), dH * silu(g)) with dH = dy @ w_down, from one fused kernel (dH
    is never written). dy (M, C) any strides, w_down (C, F) in nn.Linear layout, g and u (M, F) with
    the same strides."""
    require(dy.dim() == 2 and w_down.dim() == 2 and dy.shape[1] == w_down.shape[0] >= 1,
            f"{OP}: dH needs dy (M, C) and w_down (C, F), got {tuple(dy.shape)} and {tuple(w_down.shape)}")
    _check("dy", dy, w_down=w_down, g=g, u=u)
    m, f = dy.shape[0], w_down.shape[1]
    require(tuple(g.shape) == tuple(u.shape) == (m, f) and g.stride() == u.stride(),
            f"{OP}: g and u must be ({m}, {f}) with equal strides, got {tuple(g.shape)} {g.stride()} and "
            f"{tuple(u.shape)} {u.stride()}")
    dg, du = _empty(m, f, dy), _empty(m, f, dy)
    if m > 0:
        _launch(dy, w_down, None, dg, du, g, u, "swiglu_grad", False, mlp.choose_path(dy, w_down, g, u, dg, du))
    return dg, du


def swiglu_mlp_forward(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       residual: torch.Tensor | None, save: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """x (M, C) -> (y (M, C), H (M, F), G and U (M, F) or None unless save)."""
    swiglu_mlp_spec.check(x, w_gate, w_up, w_down, residual)
    h, g, u = fc_swiglu(x, w_gate, w_up, save)
    return mlp.linear(h, w_down, None, residual), h, g, u


def swiglu_mlp_backward(dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        w_down: torch.Tensor, h: torch.Tensor | None, g: torch.Tensor | None,
                        u: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, dW_gate, dW_up, dW_down) of y = (silu(x Wg^T) * (x Wu^T)) Wd^T given dy (M, C).
    h, g, u None: recompute them with the forward's fused kernel (the `recompute` mode)."""
    if h is None or g is None or u is None:
        h, g, u = fc_swiglu(x, w_gate, w_up, save_gu=True)
    dg, du = swiglu_grad_matmul(dy, w_down, g, u)
    # The GEMMs with nothing to fuse run on cuBLAS (deterministic); dx accumulates its second
    # product onto the first in place (beta = 1), so dG and dU need no concatenated weight.
    return (dg @ w_gate).addmm_(du, w_up), dg.t() @ x, du.t() @ x, dy.t() @ h


# ----------------------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("tritongpt::swiglu_mlp_forward", mutates_args=())
def _forward_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                residual: torch.Tensor | None, recompute: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, H, G, U) on 2-D x; H, G and U are what backward keeps, empty (0,) tensors when recompute."""
    y, h, g, u = swiglu_mlp_forward(x, w_gate, w_up, w_down, residual, save=not recompute)
    if recompute:
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return y, h, g, u


@_forward_op.register_fake
def _(x, w_gate, w_up, w_down, residual, recompute):
    kept = (0,) if recompute else (x.shape[0], w_gate.shape[0])
    return x.new_empty(x.shape[0], w_down.shape[0]), x.new_empty(kept), x.new_empty(kept), x.new_empty(kept)


@torch.library.custom_op("tritongpt::swiglu_mlp_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, h: torch.Tensor, g: torch.Tensor,
                 u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_gate, dW_up, dW_down); empty H, G, U (the recompute mode) are recomputed."""
    kept = h.numel() > 0
    return swiglu_mlp_backward(dy, x, w_gate, w_up, w_down, *((h, g, u) if kept else (None, None, None)))


@_backward_op.register_fake
def _(dy, x, w_gate, w_up, w_down, h, g, u):
    return torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, residual, recompute = inputs
    _, h, g, u = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, h, g, u)
    ctx.has_residual = residual is not None


def _backward(ctx, dy, _dh, _dg, _du):
    dx, dw_gate, dw_up, dw_down = _backward_op(dy, *ctx.saved_tensors)
    return dx, dw_gate, dw_up, dw_down, dy if ctx.has_residual else None, None


torch.library.register_autograd("tritongpt::swiglu_mlp_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functional

def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               residual: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """y = (silu(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T (+ residual) on Triton; the `swiglu_mlp`
    op's contract (kernels/swiglu_mlp_spec.py). x (..., C); w_gate, w_up (F, C), w_down (C, F) in
    nn.Linear layout. recompute=True keeps no (M, F) activation for backward and recomputes it there."""
    m, c, _ = swiglu_mlp_spec.check(x, w_gate, w_up, w_down, residual)
    checks.triton_device(OP, x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, residual=residual)
    r = residual.reshape(m, c) if residual is not None else None
    y, _, _, _ = _forward_op(x.reshape(m, c), w_gate, w_up, w_down, r, recompute)
    return y.reshape(x.shape)


registry.register(OP, "triton", swiglu_mlp, needs="triton", deterministic=True)
swiglu_mlp_configs.register_compile_variants(pointer=_swiglu_matmul_kernel, tma=_swiglu_tma_kernel)
