"""Test setup: Triton kernels run through the interpreter when there is no GPU (set before any
kernel module is imported), named assets come from ../shared/data, and `gpu` tests skip
without CUDA."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _shared.is_dir():
    os.environ.setdefault("TRITONGPT_ASSETS", str(_shared))
# Tests pick backends explicitly; a developer's shell must not change what they test.
for _var in [v for v in os.environ if v.startswith("TRITONGPT_") and v != "TRITONGPT_ASSETS"]:
    del os.environ[_var]

# The test-only op written by README's "Adding an op" recipe: spec-driven tests (test_ops.py),
# the benchmark's quick run and verify pick it up like any op.
import toy_op  # noqa: E402  (after TRITON_INTERPRET is set: it defines a Triton kernel)

from tritongpt.kernels import registry  # noqa: E402

toy_op.register(registry)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
