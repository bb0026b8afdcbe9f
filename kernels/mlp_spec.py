"""The `mlp` op: its input checks, its plain-PyTorch reference (backend `torch`), and the spec
that drives tests, benchmarks and `tritongpt verify`. The Triton kernel is `kernels/mlp.py`.

    y = gelu(x @ w1^T + b1) @ w2^T + b2 (+ residual)

Weights are in nn.Linear layout (out, in); `approximate` is "tanh" (GPT-2) or "none" (exact
erf). `recompute` is an activation-memory switch of backends that honour it (Triton keeps no
hidden activation and recomputes it in the backward); the result is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritongpt.errors import require
from tritongpt.kernels import checks, registry
from tritongpt.kernels.spec import Case, Inputs, ModelShape, OpSpec

GELU_FORMS = ("tanh", "none")


def check(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
          b2: torch.Tensor | None, approximate: str, residual: torch.Tensor | None) -> tuple[int, int, int]:
    """Checks GELU-MLP inputs. Returns (M, C, Hid): rows (all leading dims), model width, hidden width."""
    require(approximate in GELU_FORMS, f"mlp: approximate must be one of {GELU_FORMS}, got {approximate!r}")
    require(x.dim() >= 1 and x.shape[-1] >= 1, f"mlp: x must have a last dim >= 1, got {checks.describe(x)}")
    checks.same_kind("mlp", "x", x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    c = x.shape[-1]
    require(w1.dim() == 2 and w1.shape[1] == c and w1.shape[0] >= 1,
            f"mlp: w1 must be (hidden, {c}) in nn.Linear layout, got {tuple(w1.shape)}")
    hid = w1.shape[0]
    require(w2.dim() == 2 and tuple(w2.shape) == (c, hid),
            f"mlp: w2 must be ({c}, {hid}) in nn.Linear layout, got {tuple(w2.shape)}")
    for name, bias, size in (("b1", b1, hid), ("b2", b2, c)):
        require(bias is None or tuple(bias.shape) == (size,),
                f"mlp: {name} must be ({size},), got {tuple(bias.shape) if bias is not None else None}")
    require(residual is None or residual.shape == x.shape,
            f"mlp: residual shape {tuple(residual.shape) if residual is not None else None} "
            f"!= x shape {tuple(x.shape)}")
    return x.numel() // c, c, hid


def reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None, approximate: str = "tanh", residual: torch.Tensor | None = None,
              recompute: bool = False) -> torch.Tensor:
    """The MLP in plain PyTorch; autograd here always keeps the hidden activation."""
    check(x, w1, b1, w2, b2, approximate, residual)
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    return y if residual is None else y + residual


def cases(quick: bool) -> list[Case]:
    """M rows fixed, width C swept, hidden 4C."""
    m, widths = (64, (32, 64)) if quick else (16384, (768, 1024, 1536, 2048, 3072, 4096))
    return [Case("mlp", (("M", m), ("C", c), ("H", 4 * c)), c, "mlp") for c in widths]


def model_cases(shape: ModelShape) -> list[Case]:
    """Every token through the block's MLP."""
    m, c, h = shape.batch * shape.seq_len, shape.n_embd, shape.hidden
    return [Case("mlp", (("M", m), ("C", c), ("H", h)), c, "mlp")]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """Weights scaled 1/sqrt(fan_in), as a trained GPT's keep its activations O(1)."""
    m, c, h = case["M"], case["C"], case["H"]

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    args = (rand(m, c), rand(h, c, scale=c ** -0.5), rand(h, scale=0.1), rand(c, h, scale=h ** -0.5),
            rand(c, scale=0.1))
    return Inputs(args, {"approximate": "tanh"}, torch.randn(m, c, generator=gen, device=device).to(dtype))


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """2*M*K*N FLOPs per matmul: two forward, four backward."""
    return "tflops", 2 * 2 * case["M"] * case["C"] * case["H"] * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


SPEC = OpSpec("mlp", reference, cases, make_inputs, work, size_label="C", model_cases=model_cases)
registry.register_op(SPEC)
