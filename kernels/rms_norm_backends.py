"""The `rms_norm` op's backends beyond its reference and its Triton kernel, following the contract
of kernels/rms_norm_spec.py: Liger-Kernel's RMSNorm when it is installed (`liger`).
"""

from __future__ import annotations

import torch

from tritongpt.kernels import registry
from tritongpt.kernels.rms_norm_spec import OP, check


def liger(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
          residual: torch.Tensor | None = None, weight_offset: float = 0.0):
    """Liger-Kernel's RMSNorm (`pip install liger-kernel`) in its fp32-throughout casting mode
    ("gemma", as the reference and the Triton kernel compute), without its in-place backward (which
    overwrites dy); the residual add runs in PyTorch."""
    # lazy: optional dependency (requires="liger_kernel")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    n = check(x, weight, residual)
    s = x if residual is None else x + residual
    if weight is None:  # no gain at all, whatever the offset
        weight, weight_offset = torch.ones(n, dtype=x.dtype, device=x.device), 0.0
    y = LigerRMSNormFunction.apply(s, weight, eps, weight_offset, "gemma", False)
    return y if residual is None else (y, s)


registry.register(OP, "liger", liger, needs="cuda", requires="liger_kernel")
