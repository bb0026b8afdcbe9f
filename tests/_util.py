"""Comparison helpers for tests: relative error against a float64 reference, with llm.c-style
reports of the first mismatches and the max difference when a comparison fails."""

from __future__ import annotations

import torch

# Max relative error vs a float64 reference, by dtype (DEVELOPERS.md). fp32 dots on a GPU may
# use tf32: pass tf32=True there.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
TF32_TOL = 1e-3


def tol(dtype: torch.dtype, tf32: bool = False) -> float:
    return TF32_TOL if tf32 and dtype == torch.float32 else TOL[dtype]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with NaN in place (outputs a kernel must overwrite) and return it."""
    return t.fill_(float("nan"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; inf when actual has NaN/inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "tensor") -> None:
    """Fail with the first mismatches and the max difference unless rel_err(actual, expected) <= tol."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if err <= tol:
        return
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    diff = (a - e).abs()
    diff[~torch.isfinite(a)] = float("inf")
    bad = torch.nonzero(diff > tol * e.abs().max().clamp_min(1e-30)).flatten()[:5]
    lines = [f"  [{i}] got {a[i].item():.8g} expected {e[i].item():.8g}" for i in bad.tolist()]
    raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g}; max abs diff {diff.max().item():.3g}; "
                         f"{len(bad)} first mismatches:\n" + "\n".join(lines))
