"""The `layer_norm` op's contract: its input checks, its plain-PyTorch reference (backend
`torch`), and the spec that drives tests, benchmarks and `tritongpt verify`. Liger's kernel is
`kernels/layer_norm_backends.py`; the Triton kernel is `kernels/layer_norm.py`.

    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias   over the last dim,

where s = x, or s = x + residual: with `residual` the op returns (y, s), the pre-LN block's
fused residual add, else y.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tritongpt.errors import require
from tritongpt.kernels import checks, registry
from tritongpt.kernels.spec import Case, Inputs, ModelShape, OpSpec


def check_rows(op: str, x: torch.Tensor, residual: torch.Tensor | None, **params: torch.Tensor | None) -> int:
    """Checks the inputs of a normalization `op` over the last dim (LayerNorm's, RMSNorm's): x has
    one, each of `params` (weight, bias: None where absent) is (N,), the residual is x's shape, all
    of x's kind. Returns N."""
    require(x.dim() >= 1 and x.shape[-1] >= 1, f"{op}: x must have a last dim >= 1, got {checks.describe(x)}")
    checks.same_kind(op, "x", x, **params, residual=residual)
    n = x.shape[-1]
    for name, p in params.items():
        require(p is None or tuple(p.shape) == (n,),
                f"{op}: {name} must have shape ({n},) to match x's last dim, "
                f"got {tuple(p.shape) if p is not None else None}")
    require(residual is None or residual.shape == x.shape,
            f"{op}: residual shape {tuple(residual.shape) if residual is not None else None} "
            f"!= x shape {tuple(x.shape)}")
    return n


def check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
          residual: torch.Tensor | None) -> int:
    """Checks LayerNorm inputs; returns N, the normalized (last) dim."""
    return check_rows("layer_norm", x, residual, weight=weight, bias=bias)


def reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5, residual: torch.Tensor | None = None):
    """LN(x), or (LN(x + residual), x + residual) with `residual`."""
    n = check(x, weight, bias, residual)
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (n,), weight, bias, eps)
    return y if residual is None else (y, s)


def cases(quick: bool) -> list[Case]:
    """M rows fixed, N swept."""
    m, widths = (64, (64, 256)) if quick else (16384, (768, 1024, 1536, 2048, 3072, 4096, 6144, 8192))
    return [Case("layer_norm", (("M", m), ("N", n)), n, "layer_norm") for n in widths]


def model_cases(shape: ModelShape) -> list[Case]:
    """Every token's row of the residual stream."""
    return [Case("layer_norm", (("M", shape.batch * shape.seq_len), ("N", shape.n_embd)), shape.n_embd, "layer_norm")]


def leaf_randn(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Callable[..., torch.Tensor]:
    """rand(*shape, scale=1.0, shift=0.0): a leaf tensor of randn * scale + shift in `dtype` that
    requires grad, drawn from `gen` (the inputs of a normalization op's cases)."""

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * scale + shift).to(dtype).requires_grad_()

    return rand


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """Rows off-centre (so centring matters), weight near 1, small bias."""
    m, n = case["M"], case["N"]
    rand = leaf_randn(dtype, device, gen)
    args = (rand(m, n, shift=0.5), rand(n, scale=0.1, shift=1.0), rand(n, scale=0.1))
    return Inputs(args, {"eps": 1e-5}, torch.randn(m, n, generator=gen, device=device).to(dtype))


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """Bytes: forward reads x, w, b and writes y; backward reads x, dy, w and writes dx, dw, db
    (the per-row statistics are not counted)."""
    m, n, elt = case["M"], case["N"], torch.finfo(dtype).bits // 8
    moved = {"fwd": 2 * m * n + 2 * n, "bwd": 3 * m * n + 3 * n}
    moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
    return "gbps", moved[mode] * elt


SPEC = OpSpec("layer_norm", reference, cases, make_inputs, work, size_label="N", model_cases=model_cases)
registry.register_op(SPEC)
