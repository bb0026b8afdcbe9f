"""Report header of the pytest-benchmark suite: where it runs, in which dtype, with what.

    python -m pytest bench/suite --benchmark-only
"""

import torch


def pytest_report_header(config):
    import triton

    from tritongpt.bench.kernels import default_device, default_dtype
    from tritongpt.bench.report import device_name
    device = default_device()
    where = "real shapes" if device.type == "cuda" else "CPU TIMES on tiny shapes; Triton interpreter not timed"
    return [f"tritongpt bench suite: {device_name(device)}, {str(default_dtype(device)).removeprefix('torch.')}, "
            f"{where}; torch {torch.__version__}, triton {triton.__version__}"]
