"""What the LayerNorm and RMSNorm tests (test_layer_norm.py, test_rms_norm.py) share: seeded inputs,
NaN-poisoned launcher outputs, runs through autograd and in float64, and the checks both make of a norm
fn(x, *params, eps, residual) -> y, or (y, s = x + residual) with a residual."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _util import assert_rel_close, assert_within_twice_torch_error, poison, seeded_randn, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry

# how each per-column param is drawn: a gain near 1, a bias near 0
_PARAM_DRAWS = {"weight": dict(scale=0.5, shift=1.0), "bias": {}}


def kernel_cases(widths: list[int]) -> list[tuple[int, int, torch.dtype]]:
    """(n, rows, dtype): every width with 1, 3 and 37 rows in fp32, with 3 rows in fp16, and 1000 x 37 in fp16."""
    return ([(n, rows, torch.float32) for n in widths for rows in (1, 3, 37)]
            + [(n, 3, torch.float16) for n in widths] + [(1000, 37, torch.float16)])


def param_id(value) -> str:
    """A test id part: the value as printed, dtypes without their "torch." prefix."""
    return str(value).removeprefix("torch.")


def poisoned_forward_outputs(x: torch.Tensor, residual: torch.Tensor | None, stats: int) -> tuple[torch.Tensor, ...]:
    """NaN `out` for a forward launcher: y, s (empty without a residual), then `stats` fp32 per-row vectors."""
    m = x.numel() // x.shape[-1]
    return (poison(torch.empty_like(x)), poison(torch.empty_like(x)) if residual is not None else x.new_empty(0),
            *(poison(torch.empty(m, device=x.device, dtype=torch.float32)) for _ in range(stats)))


def poisoned_backward_outputs(x: torch.Tensor, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """NaN `out` for a backward launcher: dx, then the gradient of each param (empty for an absent one)."""
    n = x.shape[-1]
    return (poison(torch.empty_like(x)),
            *(poison(torch.empty(n, dtype=x.dtype, device=x.device)) if p is not None else x.new_empty(0)
              for p in params))


def autograd_run(fn: Callable, inp: dict, **options):
    """(y, s or None) of fn(x, params, residual, **options) and the gradients of <y, dy> (+ <s, ds>) by input name."""
    leaves = {k: (v.clone().requires_grad_() if v is not None else None)
              for k, v in inp.items() if k not in ("dy", "ds")}
    out = fn(**leaves, **options)
    if leaves["residual"] is None:
        out.backward(inp["dy"])
        outputs = (out, None)
    else:
        torch.autograd.backward(out, (inp["dy"], inp["ds"]))
        outputs = out
    return outputs, {k: (v.grad if v is not None else None) for k, v in leaves.items()}


@dataclass(frozen=True)
class Norm:
    """A norm under test: its registry op, functional fn(x, *params, eps, residual) and torch reference alike."""

    op: str
    fn: Callable
    reference: Callable
    params: tuple[str, ...]  # the per-column inputs besides x: ("weight", "bias") or ("weight",)

    def random_inputs(self, lead: tuple[int, ...], n: int, dtype: torch.dtype, device: torch.device | str, seed: int,
                      residual: bool = False, **present: bool) -> dict:
        """Seeded x (off-centre), each param unless present[name] is False, residual, and upstream grads dy, ds."""
        rand = seeded_randn(seed, device, dtype)
        shape = (*lead, n)
        inp = {"x": rand(*shape, scale=2.0, shift=0.5)}
        for name in self.params:
            inp[name] = rand(n, **_PARAM_DRAWS[name]) if present.get(name, True) else None
        return dict(inp, residual=rand(*shape) if residual else None, dy=rand(*shape),
                    ds=rand(*shape) if residual else None)

    def float64_run(self, inp: dict, **options):
        """(y, s, gradients by input name) of the reference in float64; s is x + residual (or x)."""
        leaves = {k: v.detach().double().requires_grad_() if v is not None else None
                  for k, v in inp.items() if k not in ("dy", "ds")}
        out = self.reference(**leaves, **options)
        has_residual = leaves["residual"] is not None
        y, s = out if has_residual else (out, leaves["x"])
        outputs, upstream = [y], [inp["dy"].double()]
        if has_residual:
            outputs.append(s)
            upstream.append(inp["ds"].double())
        grads = iter(torch.autograd.grad(outputs, [t for t in leaves.values() if t is not None], upstream))
        return y.detach(), s.detach(), {k: next(grads) if t is not None else None for k, t in leaves.items()}

    def check_autograd_against_float64(self, inp: dict, dtype: torch.dtype, **options) -> None:
        """The registered `triton` backend's y, s and gradients within dtype's tolerance of the float64 reference's."""
        (y, s), grads = autograd_run(registry.resolve(self.op, "triton"), inp, **options)
        ey, es, expected = self.float64_run(inp, **options)
        assert_rel_close(y, ey, tol(dtype), "y")
        if inp["residual"] is not None:
            assert_rel_close(s, es, tol(dtype), "s")
            assert_rel_close(grads["residual"], expected["x"], tol(dtype), "dresidual")
        assert_rel_close(grads["x"], expected["x"], tol(dtype), "dx")
        for name in self.params:
            assert (grads[name] is None) == (expected[name] is None)
            if expected[name] is not None:
                assert_rel_close(grads[name], expected[name], tol(dtype), f"d{name}")

    def check_autograd_bitwise_deterministic(self, inp: dict, **options) -> None:
        """Two runs of the registered `triton` backend through autograd give bitwise equal gradients."""
        fn = registry.resolve(self.op, "triton")
        _, first = autograd_run(fn, inp, **options)
        _, second = autograd_run(fn, inp, **options)
        for name in first:
            assert torch.equal(first[name], second[name]), f"d{name} differs between two runs"

    def check_strided_rows_and_leading_dims(self, device: torch.device) -> None:
        """fn on a column slice (row stride 2N) and on a transpose (leading dims copied) within fp32 tolerance."""
        n = 96
        base = self.random_inputs((6, 4), 2 * n, torch.float32, device, seed=8)
        x_slice = base["x"][..., :n]  # row stride 2n, last-dim stride 1
        x_transposed = self.random_inputs((4, 6), n, torch.float32, device, seed=9)["x"].transpose(0, 1)
        params = {k: base[k][:n].contiguous() for k in self.params}
        for x in (x_slice, x_transposed):
            expected = self.reference(x.double(), **{k: v.double() for k, v in params.items()})
            assert_rel_close(self.fn(x, **params), expected, tol(torch.float32), "y")

    def check_zero_rows(self, device: torch.device) -> None:
        """fn on zero rows gives an empty y, and backward a zero weight gradient."""
        x = torch.randn(0, 16, device=device, requires_grad=True)
        w = torch.randn(16, device=device, requires_grad=True)
        y = self.fn(x, w)
        assert y.shape == (0, 16)
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(16, device=device))

    def check_compiled_matches_eager(self, block: Callable, inp: dict) -> None:
        """torch.compile(block, fullgraph=True) gives eager's loss and gradients of block(x, *params, residual)."""
        names = ("x", *self.params, "residual")
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (block, compiled):
            leaves = [inp[k].clone().requires_grad_() for k in names]
            loss = fn(*leaves)
            loss.backward()
            results.append([loss.detach()] + [t.grad for t in leaves])
        for name, a, e in zip(("loss", *(f"d{k}" for k in names)), *results):
            assert_rel_close(a, e, tol(torch.float32), name)

    def check_raises_before_writing(self, words: str, launch: Callable, out: tuple[torch.Tensor, ...],
                                    kwargs: dict) -> None:
        """launch() raises a TritonGPTError matching `words` with `out` still NaN, and fn(**kwargs) the same error."""
        with pytest.raises(TritonGPTError, match=words):
            launch()
        assert all(t.isnan().all() for t in out), "an output was written before the error"
        with pytest.raises(TritonGPTError, match=words):  # the same error through the custom op
            self.fn(**kwargs)

    def check_within_twice_torch_error(self, names: tuple[str, ...], ours: tuple, expected: tuple, inp: dict,
                                       dtype: torch.dtype, **options) -> None:
        """Launcher y, s and gradients within dtype's tolerance of float64, at most twice the reference's in dtype."""
        (y, s), grads = autograd_run(self.reference, inp, **options)
        theirs = {"y": y, "s": s, **{f"d{k}": grads[k] for k in ("x", *self.params)}}
        for name, a, e in zip(names, ours, expected):
            if name in theirs:
                assert_within_twice_torch_error(a, theirs[name], e.reshape(a.shape), tol(dtype), name)
