"""The GPT-2 feed-forward block, y = gelu(x @ W1^T + b1) @ W2^T + b2 (+ residual): Triton where a fused
epilogue saves a pass over the (M, Hid) activation, cuBLAS where a GEMM has nothing to fuse.

    forward   a  = gelu(x @ W1^T + b1)         Triton, epilogue "gelu" ("gelu_save_h": also writes h)
              y  = a @ W2^T + b2 (+ residual)   cuBLAS (torch.addmm)
    backward  dH = (dY @ W2) * gelu'(h)         Triton, epilogue "gelu_grad", which also writes each tile's
              db1 = sum over rows of dH          column sums of dH; db1 sums those partials in a fixed order
              dx = dH @ W1, dW1 = dH^T x, dW2 = dY^T a, db2 = sum dY      cuBLAS / torch

The fused GEMM has two implementations with the same epilogues (`choose_path` picks one per call):
  "tma"      `_mlp_tma_kernel`, Hopper: persistent (one program per SM walks the tiles in grouped
             order), operands and outputs through TMA tensor descriptors, the epilogue in column
             sub-tiles - the design of Triton's persistent-matmul tutorial (09).
  "pointer"  `_mlp_matmul_kernel`: one program per tile, pointer loads; sm_80, operands TMA cannot
             address (odd widths, stride-0 grads), and a Triton without host tensor descriptors.
The SwiGLU MLP (kernels/swiglu_mlp.py) shares `choose_path`, `tile_coords`, `column_quarters`,
`tile_grid`, `launch_tma` and `linear`. Weights stay in nn.Linear layout (out, in); neither path copies them.
`recompute=True` keeps neither h nor a for backward, which recomputes both with the forward's fused
kernel (saves 2 * M * Hid activations per block). Choosing between this backend and others by measurement is the `auto`
backend's job; `torch._addmm_activation(..., use_gelu=True)` (cuBLASLt's GELU epilogue) is not used:
it has not been measured against this kernel. Autotune configs and the compile report's variants:
kernels/mlp_configs.py.

    python -m pytest -q tests/test_mlp.py                        # CPU: Triton interpreter vs float64, both paths
    python -m pytest -q -m gpu tests/test_mlp.py                 # GPU: bf16, GPT-2 sizes
    tritongpt kernels compile --arch sm_90 --filter _mlp_        # AOT compile report, no GPU
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks, mlp_configs, mlp_spec, registry

try:  # host-side TMA descriptors (Triton 3.6 has them); without them every call takes the pointer path
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# GELU constants (fp32): sqrt(2/pi), the cubic coefficient of GPT-2's tanh form, 1/sqrt(2), 1/sqrt(2 pi).
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: fewer than tiles, so each walks several


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


@triton.jit
def tile_coords(
    tile,  # linear tile index
    num_pid_m,  # row tiles
    num_pid_n,  # column tiles
    GROUP_M: tl.constexpr,  # row tiles walked together
):
    """(pid_m, pid_n) of `tile` in grouped order: consecutive tiles sweep GROUP_M row tiles before
    the next column tile, so a band of A rows and of B columns is reused from L2, not refetched."""
    tiles_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def column_quarters(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four column quarters of the (BLOCK_M, BLOCK_N) tile acc, left to right, each (BLOCK_M,
    BLOCK_N // 4): acc[:, j * BLOCK_N // 4 + c] as [m, j // 2, j % 2, c] -> [m, c, j // 2, j % 2];
    each split peels the last dim."""
    quarters = tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, BLOCK_N // 4)), (0, 3, 1, 2))
    even, odd = tl.split(quarters)  # j % 2 == 0, 1
    q0, q2 = tl.split(even)
    q1, q3 = tl.split(odd)
    return q0, q1, q2, q3


@triton.jit
def _column_sums(
    acc,  # fp32 (BLOCK_M, width) epilogue result dH
    rows,  # row index of each row of acc
    cols,  # column index of each column of acc
    pid_m,  # the tile's row-tile index
    col_sum_ptr,  # (cdiv(M, SUM_ROWS), N) fp32 column sums of dH, one row per SUM_ROWS rows of dH
    M,  # rows of C
    N,  # columns of C
    BLOCK_M: tl.constexpr,  # rows of the tile
    SUM_ROWS: tl.constexpr,  # rows of dH per partial row: the smallest BLOCK_M of the configs
):
    """The tile's column sums of dH (rows past M excluded) go to its first partial row, zeros to its
    other BLOCK_M // SUM_ROWS - 1: every partial row is written whatever BLOCK_M the autotuner runs
    (benchmark runs included), and db1 adds them in a fixed order - deterministic, no atomics."""
    col_sum = tl.sum(tl.where(rows[:, None] < M, acc, 0.0), axis=0)
    part = tl.arange(0, BLOCK_M // SUM_ROWS)
    part_row = pid_m * (BLOCK_M // SUM_ROWS) + part
    values = tl.where(part[:, None] == 0, col_sum[None, :], 0.0)
    mask = (part_row < tl.cdiv(M, SUM_ROWS))[:, None] & (cols < N)[None, :]
    tl.store(col_sum_ptr + part_row.to(tl.int64)[:, None] * N + cols[None, :], values, mask=mask)


@triton.autotune(configs=mlp_configs.POINTER_CONFIGS, key=["M", "N", "K", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": mlp_configs.prune_configs})
@triton.jit
def _mlp_matmul_kernel(
    a_ptr,  # A (M, K), any strides
    b_ptr,  # B (K, N), any strides: a weight W (N, K) in nn.Linear layout is read as W^T by strides
    c_ptr,  # C (M, N), the output
    bias_ptr,  # (N,) added to every row; read only when HAS_BIAS
    aux_ptr,  # (M, N) h: "gelu_save_h" writes it, "gelu_grad" reads it; None for "gelu"
    col_sum_ptr,  # (cdiv(M, SUM_ROWS), N) fp32 column sums of dH ("gelu_grad" only; see _column_sums)
    M,  # rows of A and C
    N,  # columns of B and C
    K,  # the reduced dim
    stride_am, stride_ak,  # A strides, in elements
    stride_bk, stride_bn,  # B strides
    stride_cm, stride_cn,  # C strides
    stride_xm, stride_xn,  # aux strides
    HAS_BIAS: tl.constexpr,  # add bias_ptr[n] before the epilogue
    EPILOGUE: tl.constexpr,  # "gelu", "gelu_save_h" or "gelu_grad" (see _launch)
    APPROXIMATE: tl.constexpr,  # GELU form: "tanh" or "none" (erf)
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; fp16/bf16 ignore it
    BLOCK_M: tl.constexpr,  # rows of the C tile
    BLOCK_N: tl.constexpr,  # columns of the C tile
    BLOCK_K: tl.constexpr,  # K step of the loop
    GROUP_M: tl.constexpr,  # M tiles walked together so their B columns stay in L2
    SUM_ROWS: tl.constexpr,  # rows of dH per row of col_sum_ptr
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
    if EPILOGUE == "gelu_grad":
        h = tl.load(aux_ptr + out_m * stride_xm + out_n * stride_xn, mask=mask, other=0.0).to(tl.float32)
        acc *= _gelu_grad(h, APPROXIMATE)
        _column_sums(acc, offs_m, offs_n, pid_m, col_sum_ptr, M, N, BLOCK_M, SUM_ROWS)
    else:
        if EPILOGUE == "gelu_save_h":
            tl.store(aux_ptr + out_m * stride_xm + out_n * stride_xn, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = _gelu(acc, APPROXIMATE)
    tl.store(c_ptr + out_m * stride_cm + out_n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tma_epilogue(
    acc,  # fp32 (BLOCK_M, WIDTH) part of an accumulator tile
    pid_m,  # the tile's row-tile index
    off_m,  # first row of the part
    off_n,  # first column of the part
    c_desc,  # C (M, N) descriptor, blocks (BLOCK_M, WIDTH)
    aux_desc,  # (M, N) h descriptor, blocks (BLOCK_M, WIDTH); None for "gelu"
    bias_ptr,  # (N,) bias; read only when HAS_BIAS
    col_sum_ptr,  # (cdiv(M, SUM_ROWS), N) fp32 column sums of dH ("gelu_grad" only)
    M,  # rows of C
    N,  # columns of C
    HAS_BIAS: tl.constexpr,  # add the bias first
    EPILOGUE: tl.constexpr,  # "gelu", "gelu_save_h" or "gelu_grad"
    APPROXIMATE: tl.constexpr,  # GELU form
    BLOCK_M: tl.constexpr,  # rows of the part
    WIDTH: tl.constexpr,  # columns of the part
    SUM_ROWS: tl.constexpr,  # rows of dH per row of col_sum_ptr
):
    """Bias, then the epilogue, on one column block of a tile; TMA loads h and stores h and C (rows
    and columns past the edge are clipped by the descriptors)."""
    cols = off_n + tl.arange(0, WIDTH)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == "gelu_grad":
        acc *= _gelu_grad(aux_desc.load([off_m, off_n]).to(tl.float32), APPROXIMATE)
        _column_sums(acc, off_m + tl.arange(0, BLOCK_M), cols, pid_m, col_sum_ptr, M, N, BLOCK_M, SUM_ROWS)
    else:
        if EPILOGUE == "gelu_save_h":
            aux_desc.store([off_m, off_n], acc.to(aux_desc.dtype))
        acc = _gelu(acc, APPROXIMATE)
    c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@triton.autotune(configs=mlp_configs.TMA_CONFIGS, key=["M", "N", "K", "EPILOGUE", "DTYPE"],
                 prune_configs_by={"early_config_prune": mlp_configs.prune_configs})
@triton.jit
def _mlp_tma_kernel(
    a_desc,  # A (M, K) descriptor, blocks (BLOCK_M, BLOCK_K)
    b_desc,  # B descriptor: over W (N, K), blocks (BLOCK_N, BLOCK_K), when B_NK; else over B (K, N)
    c_desc,  # C (M, N) output descriptor, blocks (BLOCK_M, BLOCK_N // 4)
    aux_desc,  # (M, N) h descriptor like c_desc: "gelu_save_h" writes it, "gelu_grad" reads it; None for "gelu"
    bias_ptr,  # (N,) added to every row; read only when HAS_BIAS
    col_sum_ptr,  # (cdiv(M, SUM_ROWS), N) fp32 column sums of dH ("gelu_grad" only; see _column_sums)
    M,  # rows of A and C
    N,  # columns of B and C
    K,  # the reduced dim
    DTYPE: tl.constexpr,  # the operands' dtype, for the autotune key only (descriptors show the autotuner none)
    B_NK: tl.constexpr,  # B is stored as W (N, K), a weight in nn.Linear layout: its tiles are transposed
    HAS_BIAS: tl.constexpr,  # add bias_ptr[n] before the epilogue
    EPILOGUE: tl.constexpr,  # "gelu", "gelu_save_h" or "gelu_grad" (see _launch)
    APPROXIMATE: tl.constexpr,  # GELU form: "tanh" or "none" (erf)
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; fp16/bf16 ignore it
    BLOCK_M: tl.constexpr,  # rows of the C tile
    BLOCK_N: tl.constexpr,  # columns of the C tile
    BLOCK_K: tl.constexpr,  # K step of the loop
    GROUP_M: tl.constexpr,  # M tiles walked together so their B columns stay in L2
    SUM_ROWS: tl.constexpr,  # rows of dH per row of col_sum_ptr
    NUM_SMS: tl.constexpr,  # programs launched: each walks tiles start, start + NUM_SMS, ...
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue derives its tile from a counter of its own, not the loop's: in the flattened,
    # software-pipelined loop no value then links one tile's loads to the previous tile's epilogue.
    tile_c = start - NUM_SMS
    for tile in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_bn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_am, off_k])  # out-of-bounds rows and K columns read as zeros
            if B_NK:
                b = b_desc.load([off_bn, off_k]).T
            else:
                b = b_desc.load([off_k, off_bn])
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        tile_c += NUM_SMS
        pid_m, pid_n = tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        off_cm = pid_m * BLOCK_M
        off_cn = pid_n * BLOCK_N
        # Epilogue in four column quarters, each a TMA block: fewer registers live in the GELU math at a
        # time and a quarter-tile of shared-memory staging for the TMA stores.
        quarters = column_quarters(acc, BLOCK_M, BLOCK_N)
        for j in tl.static_range(4):  # unrolled: quarters[j] needs a compile-time j
            _tma_epilogue(quarters[j], pid_m, off_cm, off_cn + j * (BLOCK_N // 4), c_desc, aux_desc, bias_ptr,
                          col_sum_ptr, M, N, HAS_BIAS, EPILOGUE, APPROXIMATE, BLOCK_M, BLOCK_N // 4, SUM_ROWS)


# ----------------------------------------------------------------------------- launchers

def _empty(rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every output of the fused kernels is allocated here, in like's dtype unless given (the tests
    poison it with NaN)."""
    return torch.empty(rows, cols, dtype=dtype or like.dtype, device=like.device)



def _tma_addressable(t: torch.Tensor) -> bool:
    """TMA can address the 2-D tensor t: unit stride in its last dim, other strides positive and
    multiples of 16 bytes, base 16-byte aligned (cuTensorMapEncodeTiled's rules)."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def choose_path(*tensors: torch.Tensor) -> str:
    """"tma" on Hopper (and under the interpreter, which runs descriptors too) when this Triton has
    host tensor descriptors and TMA can address every operand and output; else "pointer"."""
    device = tensors[0].device
    hopper = (torch.cuda.get_device_capability(device)[0] == 9 if device.type == "cuda"
              else registry.interpreting())
    return "tma" if TensorDescriptor is not None and hopper and all(map(_tma_addressable, tensors)) else "pointer"


def persistent_programs(device: torch.device) -> int:
    """Persistent programs of the TMA kernels: one per SM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def tile_grid(m: int, n: int, programs: int | None = None) -> Callable[[dict], tuple[int]]:
    """Launch grid of a fused GEMM over an (m, n) C in the running config's (BLOCK_M, BLOCK_N) tiles:
    one program per tile, or with `programs`, at most that many persistent ones walking the tiles."""
    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles if programs is None else min(programs, tiles),)
    return grid


def launch_tma(kernel, tensors: tuple, pointers: tuple, m: int, n: int, k: int, **constexprs) -> None:
    """Launch the persistent TMA kernel `kernel` over an (m, n) C, one program per SM (fewer when there
    are fewer tiles). Its arguments: a descriptor over each of `tensors` (None stays None), `pointers`,
    m, n, k, DTYPE (the autotune key: tensors[0]'s dtype), NUM_SMS and `constexprs`."""
    programs = persistent_programs(tensors[0].device)
    # [1, 1] blocks for now: the autotune pre-hook gives each descriptor the running config's block shape
    descs = [None if t is None else TensorDescriptor.from_tensor(t, [1, 1]) for t in tensors]
    kernel[tile_grid(m, n, programs)](*descs, *pointers, m, n, k, DTYPE=str(tensors[0].dtype).removeprefix("torch."),
                                      NUM_SMS=programs, **constexprs)


def _check(a_name: str, a: torch.Tensor, w: torch.Tensor, approximate: str, **others: torch.Tensor | None) -> None:
    """The GELU form, one dtype and device for every tensor, and a dtype and device Triton runs on."""
    require(approximate in mlp_spec.GELU_FORMS,
            f"mlp: approximate must be one of {mlp_spec.GELU_FORMS}, got {approximate!r}")
    checks.same_kind("mlp", a_name, a, w=w, **others)
    require(a.dtype != torch.float64 and (a.device.type == "cuda" or registry.interpreting()),
            f"mlp: triton matmul needs fp32/fp16/bf16 CUDA tensors (or TRITON_INTERPRET=1), "
            f"got {a.dtype} on {a.device}")


def _launch(a: torch.Tensor, w: torch.Tensor, w_nk: bool, c: torch.Tensor, aux: torch.Tensor | None,
            bias: torch.Tensor | None, col_sums: torch.Tensor | None, epilogue: str, approximate: str,
            path: str) -> None:
    """C = a @ B (+ bias), then per element, by `epilogue`:
        "gelu"         C = gelu(acc)
        "gelu_save_h"  aux = acc (h); C = gelu(acc)
        "gelu_grad"    C = acc * gelu'(aux); col_sums: column sums of C over each tile (see _column_sums)
    B (K, N) is w itself, or w^T for a weight w (N, K) when w_nk. fp32 accumulation."""
    m, k = a.shape
    n = c.shape[1]
    common = dict(HAS_BIAS=bias is not None, EPILOGUE=epilogue, APPROXIMATE=approximate,
                  INPUT_PRECISION=checks.input_precision(a.dtype), SUM_ROWS=mlp_configs.sum_rows(path))
    if path == "tma":
        launch_tma(_mlp_tma_kernel, (a, w, c, aux), (bias, col_sums), m, n, k, B_NK=w_nk, **common)
        return
    stride_bk, stride_bn = (w.stride(1), w.stride(0)) if w_nk else (w.stride(0), w.stride(1))
    _mlp_matmul_kernel[tile_grid(m, n)](
        a, w, c, bias, aux, col_sums, m, n, k, a.stride(0), a.stride(1), stride_bk, stride_bn,
        c.stride(0), c.stride(1), aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0,
        **common)


def fc_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, approximate: str = "tanh",
            save_h: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, h): a = gelu(h), h = x @ w1^T + b1, from one fused kernel; h is returned (and written)
    only when save_h. x (M, C) any strides, w1 (Hid, C) in nn.Linear layout."""
    require(x.dim() == 2 and w1.dim() == 2 and x.shape[1] == w1.shape[1] >= 1,
            f"mlp: fc needs x (M, C) and w1 (Hid, C), got {tuple(x.shape)} and {tuple(w1.shape)}")
    _check("x", x, w1, approximate, b1=b1)
    m, n = x.shape[0], w1.shape[0]
    require(b1 is None or tuple(b1.shape) == (n,), f"mlp: b1 must be ({n},)")
    a = _empty(m, n, x)
    h = _empty(m, n, x) if save_h else None
    if m > 0:
        path = choose_path(*(t for t in (x, w1, a, h) if t is not None))
        _launch(x, w1, True, a, h, b1, None, "gelu_save_h" if save_h else "gelu", approximate, path)
    return a, h


def gelu_grad_matmul(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
                     approximate: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """(dH, db1): dH = (dy @ w2) * gelu'(h) from one fused kernel, and db1 = dH summed over rows,
    from the kernel's per-tile column sums added in a fixed order (deterministic). dy (M, C) any
    strides, w2 (C, Hid) in nn.Linear layout, h (M, Hid)."""
    require(dy.dim() == 2 and w2.dim() == 2 and dy.shape[1] == w2.shape[0] >= 1,
            f"mlp: dH needs dy (M, C) and w2 (C, Hid), got {tuple(dy.shape)} and {tuple(w2.shape)}")
    _check("dy", dy, w2, approximate, h=h)
    m, n = dy.shape[0], w2.shape[1]
    require(tuple(h.shape) == (m, n), f"mlp: h must be ({m}, {n}), got {tuple(h.shape)}")
    dh = _empty(m, n, dy)
    if m == 0:
        return dh, dy.new_zeros(n)
    path = choose_path(dy, w2, h, dh)
    col_sums = _empty(triton.cdiv(m, mlp_configs.sum_rows(path)), n, dy, torch.float32)
    _launch(dy, w2, False, dh, h, None, col_sums, "gelu_grad", approximate, path)
    return dh, col_sums.sum(0).to(dy.dtype)


def linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """a @ w^T + bias (+ residual) on cuBLAS: a GEMM with nothing worth fusing (the bias rides in
    cuBLASLt's epilogue; the residual is one add)."""
    y = torch.addmm(bias, a, w.t()) if bias is not None else a @ w.t()
    return y if residual is None else y.add_(residual)


def mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, residual: torch.Tensor | None, approximate: str,
                save_h: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x (M, C) -> (y (M, C), h (M, Hid) or None unless save_h, a = gelu(h) (M, Hid))."""
    mlp_spec.check(x, w1, b1, w2, b2, approximate, residual)
    a, h = fc_gelu(x, w1, b1, approximate, save_h)
    return linear(a, w2, b2, residual), h, a


def mlp_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                 w2: torch.Tensor, h: torch.Tensor | None, a: torch.Tensor | None,
                 approximate: str) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, dW1, db1, dW2, db2) of y = gelu(x W1^T + b1) W2^T + b2 given dy (M, C).
    h and a None: recompute both with the forward's fused kernel (the `recompute` mode)."""
    if h is None or a is None:
        a, h = fc_gelu(x, w1, b1, approximate, save_h=True)
    dh, db1 = gelu_grad_matmul(dy, w2, h, approximate)
    # The GEMMs with nothing to fuse run on cuBLAS; the weight gradients reduce over M (batch *
    # seq, the long dim), deterministic, as are the column sums (fp32 accumulation in torch.sum).
    return dh @ w1, dh.t() @ x, db1, dy.t() @ a, dy.sum(0)


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
mlp_configs.register_compile_variants(pointer=_mlp_matmul_kernel, tma=_mlp_tma_kernel)
