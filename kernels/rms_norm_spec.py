"""The `rms_norm` op's contract: its input checks, its plain-PyTorch reference (backend `torch`), and
the spec that drives tests, benchmarks and `tritongpt verify`. Liger's kernel is
`kernels/rms_norm_backends.py`; the Triton kernel is `kernels/rms_norm.py`.

    y = s / sqrt(mean(s^2) + eps) * (weight + weight_offset)   over the last dim,

Llama's RMSNorm (no centring, no bias), where s = x, or s = x + residual: with `residual` the op
returns (y, s), the pre-norm block's fused residual add, else y. `weight_offset=1.0` is Gemma's
form, whose weight stores the gain minus one. The input checks and the random inputs are
LayerNorm's (`layer_norm_spec.check_rows`, `leaf_randn`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritongpt.kernels import registry
from tritongpt.kernels.layer_norm_spec import check_rows, leaf_randn
from tritongpt.kernels.spec import Case, Inputs, ModelShape, OpSpec

OP = "rms_norm"


def check(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None) -> int:
    """Checks RMSNorm inputs; returns N, the normalized (last) dim."""
    return check_rows(OP, x, residual, weight=weight)


def reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
              residual: torch.Tensor | None = None, weight_offset: float = 0.0):
    """RMSNorm(x), or (RMSNorm(x + residual), x + residual) with `residual`."""
    n = check(x, weight, residual)
    s = x if residual is None else x + residual
    gain = weight if weight is None or weight_offset == 0.0 else weight + weight_offset
    y = F.rms_norm(s, (n,), gain, eps)
    return y if residual is None else (y, s)


def cases(quick: bool) -> list[Case]:
    """M rows fixed, N swept over Llama-family widths: SmolLM-135M, SmolLM-360M, TinyLlama-1.1B /
    Llama-3.2-1B, Llama-3.2-3B, Llama-2-7B, Llama-2-13B, Llama-3-70B."""
    m, widths = (64, (64, 576)) if quick else (16384, (576, 960, 2048, 3072, 4096, 5120, 8192))
    return [Case(OP, (("M", m), ("N", n)), n, OP) for n in widths]


def model_cases(shape: ModelShape) -> list[Case]:
    """Every token's row of the residual stream."""
    return [Case(OP, (("M", shape.batch * shape.seq_len), ("N", shape.n_embd)), shape.n_embd, OP)]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """Rows off-centre (RMS is not the standard deviation), weight near 1."""
    m, n = case["M"], case["N"]
    rand = leaf_randn(dtype, device, gen)
    args = (rand(m, n, shift=0.5), rand(n, scale=0.1, shift=1.0))
    return Inputs(args, {"eps": 1e-6}, torch.randn(m, n, generator=gen, device=device).to(dtype))


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """Bytes: forward reads x, w and writes y; backward reads x, dy, w and writes dx, dw (the
    per-row rstd is not counted)."""
    m, n, elt = case["M"], case["N"], torch.finfo(dtype).bits // 8
    moved = {"fwd": 2 * m * n + n, "bwd": 3 * m * n + 2 * n}
    moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
    return "gbps", moved[mode] * elt


SPEC = OpSpec(OP, reference, cases, make_inputs, work, size_label="N", model_cases=model_cases)
registry.register_op(SPEC)
