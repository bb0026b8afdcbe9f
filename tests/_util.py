"""Comparison helpers for tests: the shared tolerances and relative error (kernels/spec.py), with
llm.c-style reports of the first mismatches and the max difference when a comparison fails."""

from __future__ import annotations

import torch

from tritongpt.kernels.spec import rel_err  # noqa: F401  (tests import both from here)
from tritongpt.kernels.spec import tolerance as tol  # noqa: F401


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with NaN in place (outputs a kernel must overwrite) and return it."""
    return t.fill_(float("nan"))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, limit: float, name: str = "tensor") -> None:
    """Fail with the first mismatches and the max difference unless rel_err(actual, expected) <= limit."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if err <= limit:
        return
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    diff = (a - e).abs()
    diff[~torch.isfinite(a)] = float("inf")
    bad = torch.nonzero(diff > limit * e.abs().max().clamp_min(1e-30)).flatten()[:5]
    lines = [f"  [{i}] got {a[i].item():.8g} expected {e[i].item():.8g}" for i in bad.tolist()]
    raise AssertionError(f"{name}: relative error {err:.3g} > {limit:g}; max abs diff {diff.max().item():.3g}; "
                         f"{len(bad)} first mismatches:\n" + "\n".join(lines))
