"""pytest-benchmark suite over the kernels of `tritongpt bench`: every registered backend of
every op (its spec gives the sweep) and torch.compile of its reference, forward / backward /
forward+backward, on the same shapes (tiny shapes on a CPU, real ones on a GPU).

    python -m pytest bench/suite --benchmark-only
    python -m pytest bench/suite --benchmark-only -k "attention and triton and fwd+bwd"
    python -m pytest bench/suite --benchmark-only --benchmark-json bench.json

Rows that cannot run (a backend without a GPU, the Triton interpreter, an unsupported shape,
out of memory) are skipped with the reason. Each benchmark's extra_info holds the op, case,
mode and the work of one call (FLOPs or bytes) so throughput can be computed from its times.
Errors against the reference and the device's ceilings are in `tritongpt bench`, not here.
"""

import contextlib

import pytest
import torch

from tritongpt.bench import sweeps
from tritongpt.kernels import registry
from tritongpt.kernels.measure import describe_error, runner, sync
from tritongpt.kernels.spec import MODES, dtype_name

DEVICE = sweeps.default_device()
DTYPE = sweeps.default_dtype(DEVICE)
QUICK = DEVICE.type != "cuda"  # tiny shapes on a CPU


def _params():
    for op in registry.ops():
        found, _ = sweeps.providers(op, DEVICE)
        for case in registry.spec(op).cases(QUICK):
            for provider in found:
                reason = provider.note if provider.make is None or not provider.timed else ""
                for mode in MODES:
                    why = reason or ("" if provider.backward or mode == "fwd" else provider.note)  # forward only
                    marks = [pytest.mark.skip(reason=f"{provider.name}: {why}")] if why else []
                    name = f"{op}-{provider.name}-{case.shape.replace(' ', '_')}-{mode}"
                    yield pytest.param(case, provider, mode, id=name, marks=marks)


@pytest.mark.parametrize("case, provider, mode", list(_params()))
def test_kernel_time(benchmark, case, provider, mode):
    with provider.scope():
        _bench(benchmark, case, provider, mode)


def _bench(benchmark, case, provider, mode):
    spec = registry.spec(case.op)
    sets = sweeps.input_sets(spec, case, DTYPE, DEVICE)
    try:
        forward = runner(mode, provider.make(sets[0]), sets)
        no_grad = not provider.backward  # forward-only providers: fwd rows, no graph to keep

        def run():
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                return forward()
        run()  # compiles, autotunes, or fails here rather than inside the timing
    except Exception as exc:  # unsupported case, out of memory: skipped, with the reason
        pytest.skip(describe_error(exc))

    def call():
        run()
        sync(DEVICE)

    unit, amount = spec.work(case, mode, DTYPE)
    benchmark.extra_info.update(op=case.op, provider=provider.name, mode=mode, shape=case.shape,
                                dtype=dtype_name(DTYPE), unit=unit, work_per_call=amount,
                                cpu_times=QUICK)
    benchmark(call)
