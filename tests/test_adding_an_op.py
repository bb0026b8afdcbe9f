"""README's "Adding an op" recipe, proven: the toy op of tests/toy_op.py, installed the way a
package adds backends (an entry point in the `tritongpt.backends` group, written under tmp_path
and put on a subprocess's PYTHONPATH), appears in `tritongpt kernels list` and is benchmarked by
`tritongpt bench` with no edit to tritongpt. tests/test_ops.py checks it against its reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def installed_toy(tmp_path: Path) -> dict[str, str]:
    """The environment of a process where the toy op is an installed plugin."""
    info = tmp_path / "toy_op-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-op\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tritongpt.backends]\ntoy_scale = toy_op:register\n")
    path = os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1"}


def tritongpt(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritongpt", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_toy_op_is_listed_and_benchmarked(tmp_path):
    env = installed_toy(tmp_path / "site")
    listed = tritongpt("kernels", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith("toy_scale")]
    assert line.split()[:3] == ["toy_scale", "--toy-scale", "TRITONGPT_TOY_SCALE"] and "triton" in line

    bench = tritongpt("bench", "toy_scale", "--quick", "--no-compile", "--out", str(tmp_path / "out"), env=env)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    rows = json.loads(next((tmp_path / "out").glob("*.json")).read_text())["rows"]
    assert {r["op"] for r in rows} == {"toy_scale"}
    assert {r["provider"] for r in rows} == {"torch", "triton"}
    assert all(r["err_out"] <= 1e-5 and r["err_grad"] <= 1e-5 for r in rows)
    assert all(r["gbps"] > 0 for r in rows if r["provider"] == "torch")
