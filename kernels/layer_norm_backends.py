"""The `layer_norm` op's backends beyond its reference and its Triton kernel, following the
contract of kernels/layer_norm_spec.py: Liger-Kernel's LayerNorm when it is installed (`liger`).
"""

from __future__ import annotations

import torch

from tritongpt.kernels import registry
from tritongpt.kernels.layer_norm_spec import check


def liger(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
          eps: float = 1e-5, residual: torch.Tensor | None = None):
    """Liger-Kernel's LayerNorm (`pip install liger-kernel`); the residual add runs in PyTorch."""
    # lazy: optional dependency (requires="liger_kernel")
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    n = check(x, weight, bias, residual)
    s = x if residual is None else x + residual
    ones = torch.ones(n, dtype=x.dtype, device=x.device)
    y = LigerLayerNormFunction.apply(s, ones if weight is None else weight,
                                     torch.zeros_like(ones) if bias is None else bias, eps)
    return y if residual is None else (y, s)


registry.register("layer_norm", "liger", liger, needs="cuda", requires="liger_kernel")
