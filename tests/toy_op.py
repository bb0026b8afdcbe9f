"""A test-only op written by README's "Adding an op" recipe: `toy_scale(x, weight) = x * weight`
(weight broadcast over rows). Its spec and reference (backend `torch`) and its Triton kernel
(backend `triton`) live in this one file for the test's sake; a real op splits them into
`kernels/<op>_spec.py` and `kernels/<op>.py`.

conftest.py registers it for the test suite; an installed package would name `register` in its
`tritongpt.backends` entry point, as tests/test_adding_an_op.py does for `tritongpt bench`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.errors import require
from tritongpt.kernels import checks
from tritongpt.kernels.spec import Case, Inputs, OpSpec

OP = "toy_scale"

# ---- the spec: checks, reference, cases, inputs, work


def check(x: torch.Tensor, weight: torch.Tensor) -> int:
    require(x.dim() == 2, f"{OP}: x must be (rows, N), got {checks.describe(x)}")
    checks.same_kind(OP, "x", x, weight=weight)
    require(tuple(weight.shape) == (x.shape[1],), f"{OP}: weight must be ({x.shape[1]},), got {tuple(weight.shape)}")
    return x.shape[1]


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    check(x, weight)
    return x * weight


def cases(quick: bool) -> list[Case]:
    m, widths = (16, (8, 40)) if quick else (8192, (1024, 4096))
    return [Case(OP, (("M", m), ("N", n)), n, OP) for n in widths]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    x, weight, dy = (torch.randn(shape, generator=gen, device=device).to(dtype)
                     for shape in ((case["M"], case["N"]), (case["N"],), (case["M"], case["N"])))
    return Inputs((x.requires_grad_(), weight.requires_grad_()), {}, dy)


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """Bytes: forward reads x and writes y; backward reads dy and x, writes dx (weight ignored)."""
    return "gbps", {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * case["M"] * case["N"] * torch.finfo(dtype).bits // 8


SPEC = OpSpec(OP, reference, cases, make_inputs, work, size_label="N")

# ---- the kernel: @triton.jit, launcher, custom op with autograd, functional


@triton.jit
def _scale_kernel(
    X,  # (M, N) rows, unit column stride
    W,  # (N,) the scale
    Y,  # (M, N) output
    stride_row,  # elements between rows of X and Y
    N,  # row length
    BLOCK_N: tl.constexpr,  # columns per program (power of 2, >= N)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_row + cols, mask=mask).to(tl.float32)
    w = tl.load(W + cols, mask=mask).to(tl.float32)
    tl.store(Y + row * stride_row + cols, (x * w).to(Y.dtype.element_ty), mask=mask)


def scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Launcher: y = x * weight, one program per row."""
    n = check(x, weight)
    checks.triton_device(OP, x=x, weight=weight)
    x = x.contiguous()
    y = torch.empty_like(x)
    _scale_kernel[(x.shape[0],)](x, weight, y, x.stride(0), n, BLOCK_N=triton.next_power_of_2(n))
    return y


@torch.library.custom_op("tritongpt_test::toy_scale", mutates_args=())
def _toy_scale_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale(x, weight)


@_toy_scale_op.register_fake
def _(x, weight):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    # dx is the same kernel with dy for x; dweight is a column sum (fp32, a fixed order)
    return scale(dy, weight), (dy.float() * x.float()).sum(0).to(weight.dtype)


_toy_scale_op.register_autograd(_backward, setup_context=_setup_context)


def toy_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _toy_scale_op(x, weight)


def register(registry) -> None:
    """The plugin entry point: the op and its Triton backend."""
    registry.register_op(SPEC)
    registry.register(OP, "triton", toy_scale, needs="triton", deterministic=True)
