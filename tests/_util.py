"""Comparison helpers for tests: the shared tolerances and relative error (kernels/spec.py), with
llm.c-style reports of the first mismatches and the max difference when a comparison fails."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

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


def install_plugin(site: Path, dist: str, entry: str, module: str | None = None, code: str = "") -> dict[str, str]:
    """Make `site` look like site-packages holding distribution `dist`, whose `tritongpt.backends`
    entry point is `entry` ("module:function"); `code` becomes `module`.py there. Returns the
    environment of a subprocess that sees it (PYTHONPATH: site, then tests/, then the caller's),
    so the test process itself is not changed."""
    site.mkdir(parents=True, exist_ok=True)
    if module is not None:
        (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tritongpt.backends]\n{dist} = {entry}\n")
    path = os.pathsep.join([str(site), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1"}
