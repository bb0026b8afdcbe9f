"""README's "Adding an op" recipe, proven: the toy op of tests/toy_op.py, installed the way a
package adds backends (an entry point in the `tritongpt.backends` group, written under tmp_path
and put on a subprocess's PYTHONPATH), appears in `tritongpt kernels list` and is benchmarked by
`tritongpt bench` with no edit to tritongpt. tests/test_ops.py checks it against its reference."""

from __future__ import annotations

import json
import subprocess
import sys

from _util import install_plugin


def tritongpt(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritongpt", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_toy_op_is_listed_and_benchmarked(tmp_path):
    env = install_plugin(tmp_path / "site", "toy-op", "toy_op:register")  # toy_op.py is in tests/
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
