"""Input checks shared by every backend of an op, raised before any launch.

Each op's checker returns the sizes the launchers need; the Triton launchers add their own
device/stride requirements on top (see `triton_device`).
"""

from __future__ import annotations

import torch

from tritongpt.errors import TritonGPTError
from tritongpt.kernels.registry import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GELU_FORMS = ("tanh", "none")


def require(ok: bool, message: str) -> None:
    """Raise TritonGPTError(message) unless ok."""
    if not ok:
        raise TritonGPTError(message)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def same_kind(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` has `ref`'s dtype and device."""
    require(ref.dtype in FLOAT_DTYPES, f"{op}: {ref_name} must be floating point, got {_describe(ref)}")
    for name, t in others.items():
        if t is None:
            continue
        require(t.device == ref.device,
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        require(t.dtype == ref.dtype,
                f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def triton_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Triton kernels need CUDA tensors (or any device under TRITON_INTERPRET=1), unit stride in
    the last dim, and no float64 (Triton's dots have no fp64 path)."""
    for name, t in tensors.items():
        if t is None:
            continue
        require(t.device.type == "cuda" or interpreting(),
                f"{op}: triton backend needs CUDA tensors (or TRITON_INTERPRET=1); {name} is on {t.device}")
        require(t.dtype != torch.float64,
                f"{op}: triton backend supports fp32/fp16/bf16; {name} is float64")
        require(t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1,
                f"{op}: {name} must be contiguous in its last dim, got strides {t.stride()}")


def layer_norm_shapes(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      residual: torch.Tensor | None) -> int:
    """Checks LayerNorm inputs; returns N, the normalized (last) dim."""
    require(x.dim() >= 1 and x.shape[-1] >= 1, f"layer_norm: x must have a last dim >= 1, got {_describe(x)}")
    same_kind("layer_norm", "x", x, weight=weight, bias=bias, residual=residual)
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        require(p is None or tuple(p.shape) == (n,),
                f"layer_norm: {name} must have shape ({n},) to match x's last dim, got {tuple(p.shape) if p is not None else None}")
    require(residual is None or residual.shape == x.shape,
            f"layer_norm: residual shape {tuple(residual.shape) if residual is not None else None} != x shape {tuple(x.shape)}")
    return n


def attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     window: int | None, doc_ids: torch.Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Checks attention inputs, layout (batch, seq, heads, head_dim); k/v may have fewer heads
    (grouped-query). Returns (B, T, S, H, H_kv, D): T query length, S key length."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require(t.dim() == 4, f"attention: {name} must be (batch, seq, heads, head_dim), got {_describe(t)}")
    same_kind("attention", "q", q, k=k, v=v)
    b, t, h, d = q.shape
    _, s, h_kv, _ = k.shape
    require(k.shape == v.shape, f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    require(k.shape[0] == b, f"attention: batch of k/v ({k.shape[0]}) != batch of q ({b})")
    require(k.shape[3] == d, f"attention: head_dim of k/v ({k.shape[3]}) != head_dim of q ({d})")
    require(t >= 1 and s >= 1, f"attention: sequence lengths must be >= 1, got q {t}, k {s}")
    require(h_kv >= 1 and h % h_kv == 0,
            f"attention: q heads ({h}) must be a multiple of k/v heads ({h_kv})")
    require(not causal or t <= s,
            f"attention: causal attention needs query length ({t}) <= key length ({s}) (queries align bottom-right)")
    if window is not None:
        require(isinstance(window, int) and window >= 1, f"attention: window must be an int >= 1, got {window!r}")
        require(causal, "attention: window (sliding attention over previous keys) needs causal=True")
    if doc_ids is not None:
        require(doc_ids.shape == (b, s),
                f"attention: doc_ids must be (batch, key_len) = ({b}, {s}), got {tuple(doc_ids.shape)}")
        require(not doc_ids.dtype.is_floating_point and doc_ids.dtype != torch.bool,
                f"attention: doc_ids must be an integer tensor, got {doc_ids.dtype}")
        require(doc_ids.device == q.device, f"attention: doc_ids is on {doc_ids.device} but q is on {q.device}")
        require(t <= s, f"attention: doc_ids need query length ({t}) <= key length ({s}): queries take the last "
                        f"{t} key positions' documents")
    return b, t, s, h, h_kv, d


def mlp_shapes(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, approximate: str, residual: torch.Tensor | None) -> tuple[int, int, int]:
    """Checks GELU-MLP inputs, weights in nn.Linear layout (out, in). Returns (M, C, Hid):
    rows (all leading dims), model width, hidden width."""
    require(approximate in GELU_FORMS, f"mlp: approximate must be one of {GELU_FORMS}, got {approximate!r}")
    require(x.dim() >= 1 and x.shape[-1] >= 1, f"mlp: x must have a last dim >= 1, got {_describe(x)}")
    same_kind("mlp", "x", x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    c = x.shape[-1]
    require(w1.dim() == 2 and w1.shape[1] == c and w1.shape[0] >= 1,
            f"mlp: w1 must be (hidden, {c}) in nn.Linear layout, got {tuple(w1.shape)}")
    hid = w1.shape[0]
    require(w2.dim() == 2 and tuple(w2.shape) == (c, hid),
            f"mlp: w2 must be ({c}, {hid}) in nn.Linear layout, got {tuple(w2.shape)}")
    require(b1 is None or tuple(b1.shape) == (hid,), f"mlp: b1 must be ({hid},), got {tuple(b1.shape) if b1 is not None else None}")
    require(b2 is None or tuple(b2.shape) == (c,), f"mlp: b2 must be ({c},), got {tuple(b2.shape) if b2 is not None else None}")
    require(residual is None or residual.shape == x.shape,
            f"mlp: residual shape {tuple(residual.shape) if residual is not None else None} != x shape {tuple(x.shape)}")
    return x.numel() // c, c, hid
