"""Input checks every Triton launcher shares, raised before any launch. Each op's own checks
(shapes, options) live in its spec file (`kernels/<op>_spec.py`), shared by all its backends.
"""

from __future__ import annotations

import torch

from tritongpt.errors import require
from tritongpt.kernels.registry import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def input_precision(dtype: torch.dtype) -> str:
    """The `input_precision` of a kernel's fp32 `tl.dot`s, as PyTorch's own fp32 matmuls do it:
    "ieee" when float32 matmul precision is 'highest', else "tf32" (16-bit dots ignore it)."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def describe(t: torch.Tensor) -> str:
    """"(2, 3) float32 on cpu": a tensor in an error message."""
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def same_kind(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` has `ref`'s dtype and device."""
    require(ref.dtype in FLOAT_DTYPES, f"{op}: {ref_name} must be floating point, got {describe(ref)}")
    for name, t in others.items():
        if t is None:
            continue
        require(t.device == ref.device, f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        require(t.dtype == ref.dtype, f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def triton_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Triton kernels need CUDA tensors (or any device under TRITON_INTERPRET=1), unit stride in
    the last dim, and no float64 (Triton's dots have no fp64 path)."""
    for name, t in tensors.items():
        if t is None:
            continue
        require(t.device.type == "cuda" or interpreting(),
                f"{op}: triton backend needs CUDA tensors (or TRITON_INTERPRET=1); {name} is on {t.device}")
        require(t.dtype != torch.float64, f"{op}: triton backend supports fp32/fp16/bf16; {name} is float64")
        require(t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1,
                f"{op}: {name} must be contiguous in its last dim, got strides {t.stride()}")
