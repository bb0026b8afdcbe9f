"""The `swiglu_mlp` op's backends beyond its reference and its Triton kernel, following the
contract of kernels/swiglu_mlp_spec.py: Liger-Kernel's SwiGLU when it is installed (`liger`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritongpt.kernels import registry
from tritongpt.kernels.swiglu_mlp_spec import OP, check


def liger(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
          residual: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """Liger-Kernel's LigerSwiGLUMLP computation (`pip install liger-kernel`): the three projections
    on cuBLAS, silu(g) * u in Liger's fused elementwise kernel (which keeps g and u and recomputes
    the product in its backward); the residual add runs in PyTorch. `recompute` has no effect."""
    # lazy: optional dependency (requires="liger_kernel")
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    check(x, w_gate, w_up, w_down, residual)
    y = F.linear(LigerSiLUMulFunction.apply(F.linear(x, w_gate), F.linear(x, w_up)), w_down)
    return y if residual is None else y + residual


registry.register(OP, "liger", liger, needs="cuda", requires="liger_kernel")
