"""The `swiglu_mlp` op: its input checks, its plain-PyTorch reference (backend `torch`), and the spec
that drives tests, benchmarks and `tritongpt verify`. The Triton kernel is `kernels/swiglu_mlp.py`,
Liger's `kernels/swiglu_mlp_backends.py`.

    y = (silu(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T (+ residual)

the Llama feed-forward block (transformers' LlamaMLP: down_proj(silu(gate_proj(x)) * up_proj(x))).
Weights are in nn.Linear layout: w_gate and w_up (F, C), w_down (C, F); no biases. `recompute` is an
activation-memory switch of backends that honour it (Triton then keeps no (M, F) activation and
recomputes it in the backward); the result is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritongpt.errors import require
from tritongpt.kernels import checks, registry
from tritongpt.kernels.spec import Case, Inputs, ModelShape, OpSpec

OP = "swiglu_mlp"


def check(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
          residual: torch.Tensor | None) -> tuple[int, int, int]:
    """Checks SwiGLU-MLP inputs. Returns (M, C, F): rows (all leading dims), model width, hidden width."""
    require(x.dim() >= 1 and x.shape[-1] >= 1, f"{OP}: x must have a last dim >= 1, got {checks.describe(x)}")
    checks.same_kind(OP, "x", x, w_gate=w_gate, w_up=w_up, w_down=w_down, residual=residual)
    c = x.shape[-1]
    require(w_gate.dim() == 2 and w_gate.shape[1] == c and w_gate.shape[0] >= 1,
            f"{OP}: w_gate must be (hidden, {c}) in nn.Linear layout, got {tuple(w_gate.shape)}")
    f = w_gate.shape[0]
    require(tuple(w_up.shape) == (f, c), f"{OP}: w_up must be ({f}, {c}) like w_gate, got {tuple(w_up.shape)}")
    require(tuple(w_down.shape) == (c, f),
            f"{OP}: w_down must be ({c}, {f}) in nn.Linear layout, got {tuple(w_down.shape)}")
    require(residual is None or residual.shape == x.shape,
            f"{OP}: residual shape {tuple(residual.shape) if residual is not None else None} "
            f"!= x shape {tuple(x.shape)}")
    return x.numel() // c, c, f


def reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              residual: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """The SwiGLU MLP in plain PyTorch; autograd here always keeps the activations."""
    check(x, w_gate, w_up, w_down, residual)
    y = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return y if residual is None else y + residual


def cases(quick: bool) -> list[Case]:
    """M rows fixed; (C, F) of Llama-family models: SmolLM-135M, SmolLM-360M, TinyLlama-1.1B,
    Llama-3.2-3B, Llama-2-7B."""
    m, widths = ((64, ((32, 96), (64, 176))) if quick else
                 (16384, ((576, 1536), (960, 2560), (2048, 5632), (3072, 8192), (4096, 11008))))
    return [Case(OP, (("M", m), ("C", c), ("F", f)), c, OP) for c, f in widths]


def model_cases(shape: ModelShape) -> list[Case]:
    """Every token through the block's MLP (the shape's hidden width is F)."""
    m, c, f = shape.batch * shape.seq_len, shape.n_embd, shape.hidden
    return [Case(OP, (("M", m), ("C", c), ("F", f)), c, OP)]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """Weights scaled 1/sqrt(fan_in), as a trained model's keep its activations O(1)."""
    m, c, f = case["M"], case["C"], case["F"]

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    args = (rand(m, c), rand(f, c, scale=c ** -0.5), rand(f, c, scale=c ** -0.5), rand(c, f, scale=f ** -0.5))
    return Inputs(args, {}, torch.randn(m, c, generator=gen, device=device).to(dtype))


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """2*M*K*N FLOPs per matmul: three forward (gate, up, down), six backward."""
    return "tflops", 3 * 2 * case["M"] * case["C"] * case["F"] * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


SPEC = OpSpec(OP, reference, cases, make_inputs, work, size_label="C", model_cases=model_cases)
registry.register_op(SPEC)
