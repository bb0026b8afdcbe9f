"""Every registered op, every backend usable here, every quick case of its spec: output and all
input gradients against the op's reference in float64 (the spec's oracle), and a bitwise-equal
rerun where the backend claims determinism. A backend that runs here forward only (its `needs`
is "cuda-backward") has its output checked, and asking it for gradients must be a clear error.
Driven by the specs alone, so a new op (and the test-only toy op registered in conftest.py) is
covered with no edit here.

    python -m pytest -q tests/test_ops.py
"""

from __future__ import annotations

import zlib

import pytest
import torch
from _util import assert_rel_close, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.kernels.spec import call, first, grads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    for op in registry.ops():
        for name in registry.backends(op):
            if registry.usable(op, name, DEVICE, backward=False):
                for i, case in enumerate(registry.spec(op).cases(True)):
                    yield pytest.param(op, name, case, id=f"{op}-{name}-{case.shape.replace(' ', '_')}-{i}")


@pytest.mark.parametrize("op, name, case", list(_params()))
def test_backend_matches_float64_reference(op, name, case):
    spec = registry.spec(op)
    gen = torch.Generator(DEVICE).manual_seed(zlib.crc32(case.shape.encode()))
    inputs = spec.make_inputs(case, torch.float32, DEVICE, gen)
    expected_out, expected_grads = spec.oracle(inputs, torch.float64)
    fn = registry.resolve(op, name, device=DEVICE, backward=False)
    limit = tol(torch.float32, tf32=DEVICE.type == "cuda")
    if not registry.usable(op, name, DEVICE):  # forward only here
        with torch.no_grad():
            assert_rel_close(first(call(fn, inputs)), expected_out, limit, f"{op}/{name} out")
        with pytest.raises(TritonGPTError, match="backward"):
            call(fn, inputs)
        return
    out = call(fn, inputs)
    got = grads(out, inputs)
    assert_rel_close(first(out), expected_out, limit, f"{op}/{name} out")
    assert len(got) == len(expected_grads) == len(inputs.args)
    for i, (g, e) in enumerate(zip(got, expected_grads)):
        assert_rel_close(g, e, limit, f"{op}/{name} grad of arg {i}")
    if registry.backend(op, name).deterministic:
        again = call(fn, inputs)
        assert torch.equal(first(again), first(out)), f"{op}/{name} claims determinism: output differs on a rerun"
        for a, b in zip(grads(again, inputs), got):
            assert torch.equal(a, b), f"{op}/{name} claims determinism: a gradient differs on a rerun"


def test_every_op_has_cases_and_a_torch_backend():
    for op in registry.ops():
        spec = registry.spec(op)
        assert spec.name == op and spec.cases(True) and spec.cases(False)
        assert registry.resolve(op, "torch") is spec.reference
