"""Ahead-of-time compile report (kernels/compile_report.py): the LayerNorm kernels compile for
sm_90 within its limits, every registered kernel compiles in at least one config (every config,
for sm_90 and sm_80, under -m slow), a broken variant is a failed row, not a crash; what the
report reads from PTX (smallest wgmma/mma N, TMA, widest load), variants specialized like the
JIT's, config tables (intersection over Triton versions, JSON file round trip), and the attention
configs that carry the Hopper claims compile for sm_90 (CI runs that test under Triton 3.6 too).

    python -m pytest -q tests/test_compile_report.py

The compile runs in a child process without TRITON_INTERPRET: under the interpreter (which the
test setup turns on without a GPU) @triton.jit builds interpreter functions that cannot compile.
"""

import json
import os
import subprocess
import sys

import pytest
import triton

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import attention, attention_configs, compile_report, norm_configs

LAYER_NORM_KERNELS = {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_layer_norm_bwd_reduce_kernel"}

# Child process: the sm_90 report of the LayerNorm kernels, plus one fwd variant made invalid
# (BLOCK_N must be a power of 2), as JSON rows with the formatted tables.
CHILD = """
import dataclasses, json
from tritongpt.kernels import compile_report as cr
from tritongpt.kernels import norm_configs
rows = cr.report("sm_90", "_layer_norm_")
good = next(v for v in cr.variants() if v.kernel.__name__ == "_layer_norm_fwd_kernel")
broken = dataclasses.replace(good, config="BLOCK_N=1000 (not a power of 2)",
                             constexprs={**good.constexprs, "BLOCK_N": 1000})
bad_row = cr.compile_variant(broken, 90)
print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "table": cr.format_table(rows, "sm_90"),
                  "bad_row": dataclasses.asdict(bad_row), "bad_table": cr.format_table([bad_row], "sm_90"),
                  "n_configs": len(norm_configs.row_configs())}))
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
    configs = {(v.constexprs["BLOCK_N"], v.num_warps, v.constexprs["ONE_PASS"]) for v in compile_report.variants()
               if v.kernel.__name__ in LAYER_NORM_KERNELS - {"_layer_norm_bwd_reduce_kernel"}}
    assert configs == {(c.block_n, c.num_warps, c.one_pass) for c in norm_configs.row_configs()}


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
                                                                "_attn_bwd_dq_kernel", "_mlp_matmul_kernel",
                                                                "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
                                                                "_swiglu_matmul_kernel", "_swiglu_tma_kernel"}
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, f"{r['kernel']} [{r['config']}]: {r['error']}"
    dots = {r["kernel"]: r["tensor_cores"] for r in rows}
    assert dots["_attn_fwd_kernel"] == dots["_mlp_matmul_kernel"] == dots["_swiglu_tma_kernel"] == "wgmma", dots
    assert next(r for r in rows if r["kernel"] == "_swiglu_tma_kernel")["tma"]


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


# ----------------------------------------------------------------------------------------------
# What the report reads from PTX, how variants are specialized, config tables
# ----------------------------------------------------------------------------------------------

PTX = """
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f2}, %rd3, %rd4, 1, 1, 1, 0, 1;
    cp.async.cg.shared.global [ %r1 + 0 ], [ %rd5 + 0 ], 0x10, %r2;
    cp.async.ca.shared.global [ %r3 + 0 ], [ %rd6 + 0 ], 8, %r4;
    ld.global.nc.v2.b32 { %r5, %r6 }, [ %rd7 + 0 ];
    ld.global.b64 %rd8, [ %rd9 + 0 ];
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r7], [%rd10, {%r8, %r9}], [%r10];
"""


def test_ptx_features():
    assert compile_report.ptx_features(PTX) == {"tensor_cores": "wgmma", "mma_n": 64, "tma": True, "load_bits": 128}
    ampere = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};\n" \
             "ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\nld.global.b16 %rs1, [ %rd2 + 0 ];"
    assert compile_report.ptx_features(ampere) == {"tensor_cores": "mma", "mma_n": 8, "tma": False, "load_bits": 128}
    assert compile_report.ptx_features("ld.global.b16 %rs1, [ %rd2 + 0 ];") == {
        "tensor_cores": "", "mma_n": None, "tma": False, "load_bits": 16}


def test_jit_variant_specializes_like_the_jit():
    """Integer 1 becomes the constant 1, multiples of 16 are divisible by 16 (sizes and strides
    alike), values past int32 are i64, pointers are aligned: what Triton's JIT does for a call."""
    kernel = attention._attn_bwd_preprocess_kernel
    args = {"Out": "*bf16", "DOut": "*bf16", "Delta": "*fp32", "stride_ob": 1, "stride_ot": 2048, "stride_oh": 64,
            "stride_dob": 2**33, "stride_dot": 48, "stride_doh": 17, "H": 32, "T": 4096}
    consts = {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_M": 128}
    variant = compile_report.jit_variant(kernel, "label", args, consts, num_warps=8, num_stages=1)
    assert variant.signature["stride_ob"] == "constexpr" and variant.constexprs["stride_ob"] == 1
    assert variant.signature["stride_dob"] == "i64" and variant.signature["stride_doh"] == "i32"
    assert {"Out", "DOut", "Delta", "stride_ot", "stride_oh", "stride_dob", "stride_dot", "H", "T"} == set(
        variant.aligned)
    assert (variant.num_warps, variant.num_stages) == (8, 1)
    assert compile_report.jit_variant(kernel, "label", {**args, "T": 0.5}, consts).signature["T"] == "fp32"
    with pytest.raises(TritonGPTError, match="no example value for argument 'T'"):
        compile_report.jit_variant(kernel, "label", {k: a for k, a in args.items() if k != "T"}, consts)
    native = getattr(triton.runtime.jit, "native_specialize_impl", None)  # Triton 3.6 .. 3.9
    if native is not None:  # the same answers as Triton's own specialization, where it exposes it
        from triton.backends.compiler import BaseBackend
        for value in (1, 16, 17, 2**31, 2**33 + 8):
            theirs = native(BaseBackend, value, False, True, True)
            ours = compile_report.jit_variant(kernel, "label", {**args, "T": value}, consts)
            assert (ours.signature["T"], "T" in ours.aligned) == (theirs[0], theirs[1] == "D"), value


def test_report_compiles_the_configs_kept_for_its_arch(monkeypatch):
    """`report(arch)` compiles what the pruner keeps on `arch` (sm_80: no TMA, the sm_80 table),
    and leaves out kernels that run on other arches only (the Hopper TMA MLP kernels)."""
    compiled = {80: [], 90: []}
    monkeypatch.setattr(compile_report, "interpreting", lambda: False)
    monkeypatch.setattr(compile_report, "compile_variant", lambda v, arch: compiled[arch].append(v))
    for arch in ("sm_80", "sm_90"):
        compile_report.report(arch)
    for arch, number in (("sm_80", 80), ("sm_90", 90)):
        prefix = "bf16 D=128 causal "
        got = {v.config.removeprefix(prefix) for v in compiled[number]
               if v.kernel.__name__ == "_attn_fwd_kernel" and v.config.startswith(prefix) and "GQA" not in v.config}
        kept = attention_configs.kept_configs("fwd", arch, "16-bit", 128, False, True, 1024, 1024)
        assert got == {attention_configs.config_name(c) for c in kept}, arch
    assert not any(v.config.endswith(" tma") for v in compiled[80])
    names = {n: {v.kernel.__name__ for v in variants} for n, variants in compiled.items()}
    assert names[90] - names[80] == {"_mlp_tma_kernel", "_swiglu_tma_kernel"}


def test_passing_is_the_intersection_over_triton_versions():
    table = {"sm_90": {"3.6.0": {"a": {"x": 100, "y": 200}, "b": {"x": 1}, "c": {}},
                       "3.9.0": {"a": {"x": 120, "z": 5}, "b": {}, "c": {"x": 2}}}}
    assert compile_report.passing(table, "sm_90") == {"a": {"x": 120}, "b": {}, "c": {}}
    assert compile_report.passing(table, "sm_80") == {}


def test_table_file_round_trip(tmp_path):
    """JSON with sorted keys, one entry a line: a regenerated table diffs line by line."""
    table = {"sm_80": {"3.6.0": {"fwd 16-bit D=64": {"64x64 w4 s3": 57344, "32x32 w8 s2": 16384}}}}
    path = tmp_path / "some_configs.json"
    assert compile_report.read_table(path) == {}
    compile_report.write_table(path, table)
    assert compile_report.read_table(path) == table
    assert path.read_text() == json.dumps(table, indent=2, sort_keys=True) + "\n"
    assert path.read_text().index('"32x32 w8 s2"') < path.read_text().index('"64x64 w4 s3"')


# Child process: sm_90 compiles of the attention configs that carry the Hopper claims (what CI
# also runs under Triton 3.6): per kernel and head dim 64 / 128 (bf16, causal, T = S = 1024) the
# biggest kept tile, and the forward's 128x128 TMA tile at head dim 128.
ATTENTION_HOPPER = """
import dataclasses, json
import torch
from tritongpt.kernels import attention as a, attention_configs as ac, compile_report as cr
kernels = {"fwd": a._attn_fwd_kernel, "dq": a._attn_bwd_dq_kernel, "dkdv": a._attn_bwd_dkdv_kernel}
rows = []
for kind in ac.TUNED_KERNELS:
    for d in (64, 128):
        kept = ac.kept_configs(kind, "sm_90", "16-bit", d, False, True, 1024, 1024)
        big = max(kept, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], bool(c.kwargs.get("USE_TMA"))))
        picks = [big] + [c for c in kept if kind == "fwd" and d == 128 and c.kwargs["BLOCK_M"] == 128
                         and c.kwargs["BLOCK_N"] == 128 and c.kwargs["USE_TMA"] and c is not big][:1]
        for cfg in picks:
            variant = ac._variant(kernels[kind], torch.bfloat16, "tf32", d, True, False, False, 1, cfg)
            row = cr.compile_variant(variant, 90)
            rows.append(dict(dataclasses.asdict(row), kind=kind, d=d, m=cfg.kwargs["BLOCK_M"], n=cfg.kwargs["BLOCK_N"]))
print(json.dumps(rows))
"""


def test_attention_hopper_configs_compile():
    out = subprocess.run([sys.executable, "-c", ATTENTION_HOPPER], capture_output=True, text=True,
                         env=compile_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        label = f"{r['kind']} D={r['d']} [{r['config']}]"
        assert r["ok"] and r["spill_bytes"] == 0, f"{label}: {r['error']}"
        assert r["tensor_cores"] == "wgmma", label
        if r["kind"] != "fwd":
            assert min(r["m"], r["n"]) >= 32 and r["m"] * r["n"] >= 4096, label
    fwd_128 = [r for r in rows if r["kind"] == "fwd" and r["d"] == 128 and r["m"] == r["n"] == 128]
    assert fwd_128 and all(r["tma"] for r in fwd_128), fwd_128


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_attention_report_passes(arch):
    """`tritongpt kernels compile --arch ARCH --filter attn`: every config the pruner keeps compiles
    without spills; on sm_90 every forward variant has a TMA config."""
    out = subprocess.run([sys.executable, "-m", "tritongpt", "kernels", "compile", "--arch", arch, "--filter", "attn"],
                         capture_output=True, text=True, env=compile_env(), timeout=3000)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    assert ", 0 with spills" in lines[0], lines[0]
    if arch == "sm_90":
        fwd = [line for line in lines[3:] if line.startswith("_attn_fwd_kernel")]
        variants = {" ".join(line.split()[1:4]) for line in fwd}  # dtype, head dim, masks
        with_tma = {" ".join(line.split()[1:4]) for line in fwd if " tma " in line}
        assert variants and variants == with_tma, variants - with_tma
