"""The GPT-2 feed-forward block, y = gelu(x @ W1^T + b1) @ W2^T + b2 (+ residual), on ONE Triton
matmul kernel whose epilogue is picked by constexpr flags:

    forward   a  = gelu(x @ W1^T + b1)        epilogue "gelu" (or "gelu_save_h": also writes h)
              y  = a @ W2^T + b2 (+ r)        epilogue "linear" / "residual"
    backward  dH = (dY @ W2) * gelu'(h)       epilogue "gelu_grad": dA never makes a pass of its own
              dx = dH @ W1                    epilogue "linear"
              dW1 = dH^T x, db1 = sum dH, dW2 = dY^T a, db2 = sum dY   (cuBLAS, see mlp_backward)

Weights stay in nn.Linear layout (out, in); the kernel reads W^T through strides, never a copy.
`recompute=True` keeps neither h nor a for backward, which recomputes both with the same fused
kernel (saves 2 * M * hidden activations per block).

    python -m pytest -q tests/test_mlp.py                   # CPU: Triton interpreter vs float64
    python -m pytest -q -m gpu tests/test_mlp.py            # GPU: bf16, GPT-2 sizes
    tritongpt kernels compile --arch sm_90 --filter mlp_matmul  # AOT compile report, no GPU
"""


import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks, compile_report, mlp_spec, registry

EPILOGUES = ("linear", "residual", "gelu", "gelu_save_h", "gelu_grad")

# GELU constants (fp32): sqrt(2/pi), the cubic coefficient of GPT-2's tanh form, 1/sqrt(2), 1/sqrt(2 pi).
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the big tiles feed wgmma / mma on large GEMMs,
# the small ones keep every SM busy when M (batch * seq) or a width is small.
_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 4, 4),
          (64, 64, 64, 4, 3), (32, 64, 32, 4, 4)]
if registry.interpreting():  # the interpreter would time every config on the CPU (Triton 3.6 even a lone
    _TILES = [_TILES[-1]]  # pruned one), so it gets a single config: the smallest tile
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _TILES]


def _tile(cfg: triton.Config) -> int:
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"]


def _fits_epilogue(cfg: triton.Config, epilogue: str) -> bool:
    """Epilogues that read or write a second tile or evaluate GELU spill registers (compile report,
    sm_90) above 64 fp32 accumulators per thread; a plain "linear" store takes any tile."""
    return epilogue == "linear" or cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 64 * 32 * cfg.num_warps


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles the epilogue fits, minus tiles far larger than the problem (a 128-row tile
    for M = 16 wastes 7/8 of it)."""
    args = {**named_args, **kwargs}
    m, n, k = (triton.next_power_of_2(args[d]) for d in ("M", "N", "K"))
    fit = [c for c in configs if _fits_epilogue(c, args["EPILOGUE"]) and c.kwargs["BLOCK_M"] <= max(32, m)
           and c.kwargs["BLOCK_N"] <= max(64, n) and c.kwargs["BLOCK_K"] <= max(32, k)]
    return fit or [min(configs, key=_tile)]


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gelu(h, APPROXIMATE: tl.constexpr):
    """GELU of fp32 h. The tanh form as h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3): equal to
    0.5 h (1 + tanh(u)) without its cancellation for negative h. (tl.sigmoid fails in the interpreter,
    and so does constexpr * tensor: tensors go first in these products.)"""
    if APPROXIMATE == "tanh":
        return h / (1.0 + tl.exp((h + h * h * h * _GELU_CUBIC) * (-2.0 * _SQRT_2_OVER_PI)))
    else:
        return h * 0.5 * (1.0 + tl.erf(h * _INV_SQRT_2))


@triton.jit
def _gelu_grad(h, APPROXIMATE: tl.constexpr):
    """d gelu(h) / dh of fp32 h, for the form `_gelu` computes."""
    if APPROXIMATE == "tanh":
        s = 1.0 / (1.0 + tl.exp((h + h * h * h * _GELU_CUBIC) * (-2.0 * _SQRT_2_OVER_PI)))
        return s + h * s * (1.0 - s) * (h * h * (3.0 * _GELU_CUBIC) + 1.0) * (2.0 * _SQRT_2_OVER_PI)
    else:
        return (1.0 + tl.erf(h * _INV_SQRT_2)) * 0.5 + h * tl.exp(h * h * -0.5) * _INV_SQRT_2PI


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _mlp_matmul_kernel(
    a_ptr,  # A (M, K), any strides
    b_ptr,  # B (K, N), any strides: a weight W (N, K) in nn.Linear layout is read as W^T by strides
    c_ptr,  # C (M, N), the output
    bias_ptr,  # (N,) added to every row; read only when HAS_BIAS
    aux_ptr,  # (M, N): "residual" adds it, "gelu_grad" reads h from it, "gelu_save_h" writes h to it
    M,  # rows of A and C
    N,  # columns of B and C
    K,  # the reduced dim
    stride_am, stride_ak,  # A strides, in elements
    stride_bk, stride_bn,  # B strides
    stride_cm, stride_cn,  # C strides
    stride_xm, stride_xn,  # aux strides
    HAS_BIAS: tl.constexpr,  # add bias_ptr[n] before the epilogue
    EPILOGUE: tl.constexpr,  # one of EPILOGUES (see fused_matmul)
    APPROXIMATE: tl.constexpr,  # GELU form of the gelu epilogues: "tanh" or "none" (erf)
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; fp16/bf16 ignore it
    BLOCK_M: tl.constexpr,  # rows of the C tile
    BLOCK_N: tl.constexpr,  # columns of the C tile
    BLOCK_K: tl.constexpr,  # K step of the loop
    GROUP_M: tl.constexpr,  # M tiles walked together so their B columns stay in L2
):
    # Grouped program order: consecutive programs sweep GROUP_M row tiles before the next column
    # tile, so a band of A rows and of B columns is reused from L2 rather than refetched.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

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
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue, in fp32 on the accumulator tile.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_m = offs_m.to(tl.int64)[:, None]
    out_n = offs_n.to(tl.int64)[None, :]
    aux_ptrs = aux_ptr + out_m * stride_xm + out_n * stride_xn
    if EPILOGUE == "residual":
        acc += tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
    elif EPILOGUE == "gelu":
        acc = _gelu(acc, APPROXIMATE)
    elif EPILOGUE == "gelu_save_h":
        tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = _gelu(acc, APPROXIMATE)
    elif EPILOGUE == "gelu_grad":
        acc *= _gelu_grad(tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32), APPROXIMATE)
    tl.store(c_ptr + out_m * stride_cm + out_n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _empty(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Every Triton output of this file is allocated here (the tests poison it with NaN)."""
    return torch.empty(rows, cols, dtype=like.dtype, device=like.device)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow PyTorch's matmul setting: tf32 unless float32 matmul precision is 'highest'."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def fused_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
                 epilogue: str = "linear", aux: torch.Tensor | None = None,
                 approximate: str = "tanh") -> torch.Tensor:
    """C = a @ b (+ bias), then per element, by `epilogue`:
        "linear"       C = acc
        "residual"     C = acc + aux
        "gelu"         C = gelu(acc)
        "gelu_save_h"  aux = acc (the pre-activation h, written into the caller's tensor); C = gelu(acc)
        "gelu_grad"    C = acc * gelu'(aux)
    a (M, K) and b (K, N) take any strides (pass `w.t()` for a weight in nn.Linear layout);
    fp32 accumulation; C (M, N) has a's dtype."""
    require(epilogue in EPILOGUES, f"mlp: unknown epilogue {epilogue!r}; choices: {', '.join(EPILOGUES)}")
    require(approximate in mlp_spec.GELU_FORMS,
            f"mlp: approximate must be one of {mlp_spec.GELU_FORMS}, got {approximate!r}")
    require(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
            f"mlp: matmul needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[1]
    require(bias is None or tuple(bias.shape) == (n,), f"mlp: bias must be ({n},)")
    require((aux is not None) == (epilogue != "linear" and epilogue != "gelu"),
            f"mlp: epilogue {epilogue!r} {'needs' if aux is None else 'takes no'} aux tensor")
    require(aux is None or tuple(aux.shape) == (m, n), f"mlp: aux must be ({m}, {n})")
    require(k >= 1, "mlp: matmul needs K >= 1")
    checks.same_kind("mlp", "a", a, b=b, bias=bias, aux=aux)
    # a and b may have any strides (w.t(), an expanded dy), so no triton_device stride check here
    require(a.dtype != torch.float64 and (a.device.type == "cuda" or registry.interpreting()),
            f"mlp: triton matmul needs fp32/fp16/bf16 CUDA tensors (or TRITON_INTERPRET=1), "
            f"got {a.dtype} on {a.device}")
    c = _empty(m, n, a)
    if m == 0:
        return c
    aux_arg = aux if aux is not None else c  # "linear" / "gelu" never touch aux_ptr

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _mlp_matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, aux_arg, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        aux_arg.stride(0), aux_arg.stride(1),
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, APPROXIMATE=approximate,
        INPUT_PRECISION=_input_precision(a.dtype))
    return c


def mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, residual: torch.Tensor | None, approximate: str,
                save_h: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x (M, C) -> (y (M, C), h (M, Hid) or None unless save_h, a = gelu(h) (M, Hid)). Two launches."""
    mlp_spec.check(x, w1, b1, w2, b2, approximate, residual)
    h = _empty(x.shape[0], w1.shape[0], x) if save_h else None
    a = fused_matmul(x, w1.t(), b1, epilogue="gelu_save_h" if save_h else "gelu", aux=h, approximate=approximate)
    y = fused_matmul(a, w2.t(), b2, epilogue="linear" if residual is None else "residual", aux=residual)
    return y, h, a


def mlp_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                 w2: torch.Tensor, h: torch.Tensor | None, a: torch.Tensor | None,
                 approximate: str) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, dW1, db1, dW2, db2) of y = gelu(x W1^T + b1) W2^T + b2 given dy (M, C).
    h and a None: recompute both with the forward's fused kernel (the `recompute` mode)."""
    if h is None or a is None:
        h = _empty(x.shape[0], w1.shape[0], x)
        a = fused_matmul(x, w1.t(), b1, epilogue="gelu_save_h", aux=h, approximate=approximate)
    dh = fused_matmul(dy, w2, epilogue="gelu_grad", aux=h, approximate=approximate)  # (M, C) @ (C, Hid)
    dx = fused_matmul(dh, w1)  # (M, Hid) @ (Hid, C)
    # Weight and bias gradients reduce over M (batch * seq, the long dim): cuBLAS through
    # torch.matmul, the known-fast path for these long-K GEMMs (no split-K tuning of our own), and
    # deterministic, as are the column sums (fp32 accumulation inside torch.sum).
    dw1 = dh.t() @ x  # (Hid, M) @ (M, C)
    dw2 = dy.t() @ a  # (C, M) @ (M, Hid)
    return dx, dw1, dh.sum(0), dw2, dy.sum(0)


# ----------------------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("tritongpt::gelu_mlp_forward", mutates_args=())
def _forward_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, residual: torch.Tensor | None, approximate: str,
                recompute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, a) on 2-D x; h and a are what backward keeps, empty (0,) tensors when recompute."""
    y, h, a = mlp_forward(x, w1, b1, w2, b2, residual, approximate, save_h=not recompute)
    if recompute:
        return y, x.new_empty(0), x.new_empty(0)
    return y, h, a


@_forward_op.register_fake
def _(x, w1, b1, w2, b2, residual, approximate, recompute):
    kept = (0,) if recompute else (x.shape[0], w1.shape[0])
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(kept), x.new_empty(kept)


@torch.library.custom_op("tritongpt::gelu_mlp_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                 w2: torch.Tensor, h: torch.Tensor, a: torch.Tensor,
                 approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW1, db1, dW2, db2); empty h and a (the recompute mode) are recomputed."""
    kept = h.numel() > 0
    return mlp_backward(dy, x, w1, b1, w2, h if kept else None, a if kept else None, approximate)


@_backward_op.register_fake
def _(dy, x, w1, b1, w2, h, a, approximate):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, approximate, recompute = inputs
    _, h, a = output
    ctx.save_for_backward(x, w1, b1, w2, h, a)
    ctx.approximate = approximate
    ctx.has_b2 = b2 is not None
    ctx.has_residual = residual is not None


def _backward(ctx, dy, _dh, _da):
    x, w1, b1, w2, h, a = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _backward_op(dy, x, w1, b1, w2, h, a, ctx.approximate)
    return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if ctx.has_b2 else None,
            dy if ctx.has_residual else None, None, None)


torch.library.register_autograd("tritongpt::gelu_mlp_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functional

def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, approximate: str = "tanh", residual: torch.Tensor | None = None,
             recompute: bool = False) -> torch.Tensor:
    """y = gelu(x @ w1^T + b1) @ w2^T + b2 (+ residual) on Triton; the `mlp` op's contract
    (kernels/mlp_spec.py). x (..., C); w1 (Hid, C), w2 (C, Hid) in nn.Linear layout.
    recompute=True keeps no hidden activations for backward and recomputes them there."""
    m, c, _ = mlp_spec.check(x, w1, b1, w2, b2, approximate, residual)
    checks.triton_device("mlp", x=x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    r = residual.reshape(m, c) if residual is not None else None
    y, _, _ = _forward_op(x.reshape(m, c), w1, b1, w2, b2, r, approximate, recompute)
    return y.reshape(x.shape)


registry.register("mlp", "triton", gelu_mlp, needs="triton", deterministic=True)


# ----------------------------------------------------------------------------- compile report

def _compile_variants():
    """Every (dtype, epilogue, operand layout) the MLP launches, for each autotune config. Unit
    strides are constexpr 1 and the rest divisible by 16, as the JIT specializes GPT-2 shapes."""
    uses = [  # (label, epilogue, approximate, has bias, B is a weight read as W^T by strides)
        ("fc", "gelu_save_h", "tanh", True, True), ("fc", "gelu_save_h", "none", True, True),
        ("fc recompute", "gelu", "tanh", True, True), ("fc recompute", "gelu", "none", True, True),
        ("proj", "linear", "tanh", True, True), ("proj", "residual", "tanh", True, True),
        ("dH", "gelu_grad", "tanh", False, False), ("dH", "gelu_grad", "none", False, False),
        ("dx", "linear", "tanh", False, False),
    ]
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn", "stride_xm", "stride_xn")
    for dtype in ("fp16", "bf16"):
        for label, epilogue, approximate, bias, weight_t in uses:
            unit = ("stride_ak", "stride_cn", "stride_xn", "stride_bk" if weight_t else "stride_bn")
            pointers = {p: f"*{dtype}" for p in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "aux_ptr")}
            ints = {n: "i32" for n in ("M", "N", "K", *strides) if n not in unit}
            constexprs = {**dict.fromkeys(unit, 1), "HAS_BIAS": bias, "EPILOGUE": epilogue,
                          "APPROXIMATE": approximate, "INPUT_PRECISION": "tf32"}
            meta = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
            signature = {**pointers, **ints, **dict.fromkeys((*constexprs, *meta), "constexpr")}
            gelu = f" {approximate}" if "gelu" in epilogue else ""
            yield from compile_report.autotune_variants(
                _mlp_matmul_kernel, signature, constexprs, f"{dtype} {label} {epilogue}{gelu}", (*pointers, *ints),
                keep=lambda cfg, epilogue=epilogue: _fits_epilogue(cfg, epilogue))


compile_report.register_variants(_compile_variants)
