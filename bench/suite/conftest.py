"""Report header of the pytest-benchmark suite: where it runs, in which dtype, with what.

    python -m pytest bench/suite --benchmark-only
"""

from tritongpt.bench.sweeps import default_device, default_dtype
from tritongpt.bench.tables import device_name, versions
from tritongpt.kernels.spec import dtype_name


def pytest_report_header(config):
    device = default_device()
    where = "real shapes" if device.type == "cuda" else "CPU TIMES on tiny shapes; Triton interpreter not timed"
    software = versions()
    return [f"tritongpt bench suite: {device_name(device)}, {dtype_name(default_dtype(device))}, "
            f"{where}; torch {software['torch']}, triton {software['triton']}"]
