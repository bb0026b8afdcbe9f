"""tritongpt.bench: kernel benchmarks (`kernels`), training-step benchmarks (`step`), their
tables and files (`report`), the `tritongpt bench` command (`cli`) and a pytest-benchmark suite
(`bench/suite`, run with `python -m pytest bench/suite --benchmark-only`)."""
