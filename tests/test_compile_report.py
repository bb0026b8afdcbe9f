"""Ahead-of-time compile report (kernels/compile_report.py): the LayerNorm kernels compile for
sm_90 within its limits, every registered kernel compiles in at least one config (every config,
for sm_90 and sm_80, under -m slow), and a broken variant is a failed row, not a crash.

    python -m pytest -q tests/test_compile_report.py

The compile runs in a child process without TRITON_INTERPRET: under the interpreter (which the
test setup turns on without a GPU) @triton.jit builds interpreter functions that cannot compile.
"""

import json
import os
import subprocess
import sys

import pytest

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import compile_report
from tritongpt.kernels import layer_norm as ln

LAYER_NORM_KERNELS = {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_layer_norm_bwd_reduce_kernel"}

# Child process: the sm_90 report of the LayerNorm kernels, plus one fwd variant made invalid
# (BLOCK_N must be a power of 2), as JSON rows with the formatted tables.
CHILD = """
import dataclasses, json
from tritongpt.kernels import compile_report as cr
from tritongpt.kernels import layer_norm as ln
rows = cr.report("sm_90", "_layer_norm_")
good = next(v for v in cr.variants() if v.kernel.__name__ == "_layer_norm_fwd_kernel")
broken = dataclasses.replace(good, config="BLOCK_N=1000 (not a power of 2)",
                             constexprs={**good.constexprs, "BLOCK_N": 1000})
bad_row = cr.compile_variant(broken, 90)
print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "table": cr.format_table(rows, "sm_90"),
                  "bad_row": dataclasses.asdict(bad_row), "bad_table": cr.format_table([bad_row], "sm_90"),
                  "n_configs": len(ln.row_configs())}))
"""


def compile_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def child_report() -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=compile_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_layer_norm_compiles_for_sm90_without_spills(child_report):
    rows = child_report["rows"]
    # fwd and bwd for every row config, plus the reduction, for fp32, fp16 and bf16
    assert len(rows) == 3 * (2 * child_report["n_configs"] + 1)
    assert {r["kernel"] for r in rows} == LAYER_NORM_KERNELS
    for r in rows:
        label = f"{r['kernel']} [{r['config']}]"
        assert r["ok"], f"{label}: {r['error']}"
        assert r["registers"] is not None and 0 < r["registers"] <= 255, f"{label}: registers {r['registers']}"
        assert r["spill_bytes"] == 0, f"{label}: {r['spill_bytes']} bytes spilled"
        assert r["shared"] <= compile_report.SHARED_LIMIT[90], f"{label}: shared {r['shared']}"
    assert child_report["table"].startswith(f"# compile report for sm_90: {len(rows)}/{len(rows)} ok")


def test_broken_variant_is_a_failed_row(child_report):
    row = child_report["bad_row"]
    assert not row["ok"] and row["error"] and row["registers"] is None
    table = child_report["bad_table"]
    assert table.startswith("# compile report for sm_90: 0/1 ok")
    assert "FAIL" in table and "BLOCK_N=1000" in table


def test_row_configs_are_what_the_report_compiles():
    """The variants come from the launchers' own table, so they cannot drift from it."""
    configs = {(v.constexprs["BLOCK_N"], v.num_warps, v.constexprs["ONE_PASS"])
               for v in ln._variants() if v.kernel.__name__ != "_layer_norm_bwd_reduce_kernel"}
    assert configs == {(c.block_n, c.num_warps, c.one_pass) for c in ln.row_configs()}


def test_unknown_arch():
    with pytest.raises(TritonGPTError, match="unknown --arch 'sm_99'; choices: sm_80, sm_86, sm_89, sm_90"):
        compile_report.report("sm_99")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="interpreter not on")
def test_interpreter_is_refused():
    with pytest.raises(TritonGPTError, match="unset TRITON_INTERPRET"):
        compile_report.report("sm_90")


# Child process: the first variant of every registered kernel, compiled for sm_90.
FIRST_OF_EACH = """
import dataclasses, json
from tritongpt.kernels import compile_report as cr
first = {}
for v in cr.variants():
    first.setdefault(v.name or v.kernel.__name__, v)
print(json.dumps([dataclasses.asdict(cr.compile_variant(v, 90)) for v in first.values()]))
"""


def test_every_kernel_compiles_for_sm90():
    """One config of each kernel (the full sweep is the slow test below and `tritongpt kernels
    compile`); kernels that later issues register join automatically."""
    out = subprocess.run([sys.executable, "-c", FIRST_OF_EACH], capture_output=True, text=True,
                         env=compile_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} >= LAYER_NORM_KERNELS | {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                                                "_attn_bwd_dq_kernel", "_mlp_matmul_kernel"}
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, f"{r['kernel']} [{r['config']}]: {r['error']}"
    dots = {r["kernel"]: r["tensor_cores"] for r in rows}
    assert dots["_attn_fwd_kernel"] == dots["_mlp_matmul_kernel"] == "wgmma", dots


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_full_report_passes(arch):
    """`tritongpt kernels compile --arch ARCH`: every kernel and config compiles, no spills."""
    out = subprocess.run([sys.executable, "-m", "tritongpt", "kernels", "compile", "--arch", arch],
                         capture_output=True, text=True, env=compile_env(), timeout=3000)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    head = next(line for line in out.stdout.splitlines() if line.startswith("# compile report"))
    done, total = head.split(": ")[1].split(" ")[0].split("/")
    assert done == total and int(total) > 100, head
