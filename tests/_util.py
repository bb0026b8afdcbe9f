"""Comparison helpers for tests: the shared tolerances and relative error (kernels/spec.py), with
llm.c-style reports of the first mismatches and the max difference when a comparison fails; seeded
inputs and forward/backward runs; the checks the two fused MLPs (test_mlp.py, test_swiglu_mlp.py)
share; and fake plugin installs."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tritongpt.errors import TritonGPTError
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


def assert_within_twice_torch_error(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, limit: float,
                                    name: str = "tensor") -> None:
    """Fail unless `ours` is within `limit` of `exact` and has at most twice the relative error of `theirs`."""
    assert_rel_close(ours, exact, limit, name)
    assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact), (
        f"{name}: error {rel_err(ours, exact):.3g} > 2x PyTorch's {rel_err(theirs, exact):.3g}")


def seeded_randn(seed: int, device: torch.device | str, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """rand(*shape, scale=1.0, shift=0.0): float64 normals from one generator seeded `seed`, cast to dtype on device."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)

    return rand


def fixed_dy(x: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    """An upstream gradient for an output shaped like x: float64 normals seeded `seed`, in x's dtype and device."""
    return seeded_randn(seed, x.device, x.dtype)(*x.shape)


def in_float64(inputs: dict) -> dict:
    """`inputs` with every tensor cast to float64 (None stays None)."""
    return {k: v.double() if v is not None else None for k, v in inputs.items()}


def forward_backward(fn: Callable, inputs: dict, dy: torch.Tensor, **kwargs):
    """y = fn(**inputs, **kwargs) and the gradients of <y, dy> wrt every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y = fn(**{**inputs, **leaves}, **kwargs)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_bitwise_equal(first: tuple, *others: tuple) -> None:
    """Fail unless every (output, gradients) result of forward_backward in `others` equals `first` bit for bit."""
    for other in others:
        assert torch.equal(first[0], other[0]), "the outputs differ"
        assert first[1].keys() == other[1].keys()
        for name in first[1]:
            assert torch.equal(first[1][name], other[1][name]), f"d{name} differs"


@dataclass(frozen=True)
class FusedMLP:
    """A fused MLP under test: its kernels' module, fn(x, weights..., residual, recompute=) and its torch reference."""

    kernels: ModuleType  # allocates outputs with `_empty`, launches with `_launch`
    fn: Callable
    reference: Callable

    def poison_allocations(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make every output that the kernels allocate start as NaN."""
        allocate = self.kernels._empty
        monkeypatch.setattr(self.kernels, "_empty", lambda *args: poison(allocate(*args)))

    def record_launch_paths(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """The list, filled as the kernels launch, of each launch's path (its last argument: "tma" / "pointer")."""
        paths = []
        launch = self.kernels._launch

        def spy(*args):
            paths.append(args[-1])
            return launch(*args)

        monkeypatch.setattr(self.kernels, "_launch", spy)
        return paths

    @staticmethod
    def automatic_path(device: torch.device) -> str:
        """The path the automatic choice takes for operands TMA can address: "tma" on sm_90 and in the interpreter."""
        return "tma" if device.type == "cpu" or torch.cuda.get_device_capability(device)[0] == 9 else "pointer"

    @staticmethod
    def assert_launch_paths(launched: list[str], path: str, c: int, hidden: int, dtype: torch.dtype,
                            recompute: bool) -> None:
        """Fail unless fc, (fc again,) dH ran on TMA where `path` allows it and it can address widths c, hidden."""
        per_16_bytes = 128 // torch.finfo(dtype).bits  # TMA needs row strides of 16 bytes
        tma_addressable = c % per_16_bytes == 0 and hidden % per_16_bytes == 0
        ran = "tma" if path == "tma" and tma_addressable else "pointer"
        assert launched == [ran] * (3 if recompute else 2), (c, hidden, launched)

    def run(self, inputs: dict, dy: torch.Tensor, **kwargs):
        """y = fn(**inputs, **kwargs) and the gradients of <y, dy> wrt every tensor input."""
        return forward_backward(self.fn, inputs, dy, **kwargs)

    def check_against_float64(self, inputs: dict, dtype: torch.dtype, recompute: bool, **options) -> None:
        """fn's output and every gradient within dtype's tolerance of reference's in float64 (`options` go to both)."""
        dy = fixed_dy(inputs["x"])
        y, grads = self.run(inputs, dy, recompute=recompute, **options)
        y64, grads64 = forward_backward(self.reference, in_float64(inputs), dy.double(), **options)
        assert_rel_close(y, y64, tol(dtype), "y")
        assert grads.keys() == grads64.keys()
        for name in grads64:
            assert_rel_close(grads[name], grads64[name], tol(dtype), f"d{name}")

    def check_within_twice_torch_error(self, inputs: dict, dy: torch.Tensor, dtype: torch.dtype, recompute: bool,
                                       **options) -> None:
        """fn's output and gradients within dtype's tolerance of float64, at most twice reference's error in dtype."""
        y, grads = self.run(inputs, dy, recompute=recompute, **options)
        y_torch, grads_torch = forward_backward(self.reference, inputs, dy, **options)
        y64, grads64 = forward_backward(self.reference, in_float64(inputs), dy.double(), **options)
        for name, ours, theirs, exact in [("y", y, y_torch, y64)] + [
                (f"d{k}", grads[k], grads_torch[k], grads64[k]) for k in grads64]:
            assert_within_twice_torch_error(ours, theirs, exact, tol(dtype), name)

    def check_sum_grads_against_float64(self, inputs: dict) -> None:
        """fn(**inputs) in fp32 and the gradients of its sum (an expanded dy) within tolerance of float64's."""

        def summed(f, dtype):
            leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
            y = f(**leaves)
            y.sum().backward()
            return y.detach(), {k: v.grad for k, v in leaves.items()}

        (y, grads), (y64, grads64) = summed(self.fn, torch.float32), summed(self.reference, torch.float64)
        assert_rel_close(y, y64, tol(torch.float32), "y")
        for k in inputs:
            assert_rel_close(grads[k], grads64[k], tol(torch.float32), f"d{k}")

    def check_saved_for_backward(self, inputs: dict, shape: tuple[int, ...], count: int, **kwargs) -> None:
        """fn(**inputs, **kwargs) saves `count` tensors of `shape` for backward, which then gives finite gradients."""
        leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = self.fn(**leaves, **kwargs)
        assert saved.count(shape) == count, saved
        y.backward(torch.randn_like(y))
        assert all(torch.isfinite(v.grad).all() for v in leaves.values())

    def check_empty_batch(self, inputs: dict) -> None:
        """fn on zero rows gives an output shaped like x and all-zero gradients."""
        x = inputs["x"]
        y, grads = self.run(inputs, torch.empty_like(x))
        assert y.shape == x.shape
        assert all(g.abs().sum() == 0 for g in grads.values() if g.numel())

    def check_compiled_matches_eager(self, inputs: dict, dy: torch.Tensor) -> None:
        """torch.compile(fn, fullgraph=True) gives eager's output and gradients bit for bit, recomputing or not."""
        backend = "aot_eager" if dy.device.type == "cpu" else "inductor"
        compiled = torch.compile(self.fn, fullgraph=True, backend=backend)
        for recompute in (False, True):
            assert_bitwise_equal(forward_backward(compiled, inputs, dy, recompute=recompute),
                                 self.run(inputs, dy, recompute=recompute))

    def check_raises_before_launch(self, monkeypatch: pytest.MonkeyPatch, message: str, kwargs: dict) -> None:
        """fn(**kwargs) raises a TritonGPTError matching `message` before the kernels allocate an output or launch."""

        def no_output(*args):
            raise AssertionError("an output was allocated or a kernel launched before the input check")

        monkeypatch.setattr(self.kernels, "_empty", no_output)
        monkeypatch.setattr(self.kernels, "_launch", no_output)
        with pytest.raises(TritonGPTError, match=message):
            self.fn(**kwargs)


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
