"""Ahead-of-time compile of every registered Triton kernel and autotune config for a GPU
architecture, without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`.

Kernel files (through their `<op>_configs.py`) describe what to compile by calling
`register_variants(provider)` with a function that yields `KernelVariant`s (built with
`jit_variant`, which specializes arguments the way Triton's JIT specializes a real call, or with
`autotune_variants`). The report reads the PTX for what decides speed: tensor-core instructions
and the smallest wgmma/mma N they use, whether TMA (`cp.async.bulk.tensor`) appears, and the
widest global load (bits per thread per instruction); it runs Triton's bundled `ptxas -v` for
registers and spills.

Config tables: a configs module may also `register_table(path, provider)`: its provider yields
candidate variants, each with a `table_entry` (key, config name). `emit_table` compiles them and
records, per architecture and Triton version, the configs that passed under each key in the JSON
file at `path` (`write_table`, `read_table`); `passing(table, arch)` gives the configs that passed
under every Triton version recorded, which is what a kernel's autotune pruner may offer. The
kernel's configs module says how to regenerate its table (kernels/attention_configs.py).

    tritongpt kernels compile --arch sm_90
    tritongpt kernels compile --arch sm_90 --filter attn --emit-table
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write
from tritongpt.kernels import registry
from tritongpt.kernels.registry import interpreting

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide, table 21).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
_INT32 = range(-2**31, 2**31)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class KernelVariant:
    kernel: Any  # the @triton.jit function (autotune/heuristics wrappers removed)
    config: str  # human label: block sizes, warps, stages, dtype
    signature: dict[str, str]  # every argument -> "*fp16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()  # arguments Triton may assume divisible by 16: pointers, integer sizes, strides
    name: str = ""  # defaults to the kernel's name
    table_entry: tuple[str, str] | None = None  # (key, config name) this candidate decides in a config table
    arches: tuple[int, ...] = ()  # the architectures it runs on (90: a Hopper-only TMA kernel); () is every one


@dataclass
class CompileRow:
    kernel: str
    config: str
    ok: bool
    registers: int | None = None
    shared: int | None = None
    spill_bytes: int | None = None
    tensor_cores: str = ""  # "wgmma", "mma" or "" (none found)
    error: str = ""
    mma_n: int | None = None  # smallest N of the wgmma / mma instructions (wgmma m64nNk16; mma.sync is n8)
    tma: bool = False  # TMA copies (cp.async.bulk.tensor) appear
    load_bits: int | None = None  # widest global load per thread: ld.global vector or cp.async size, in bits
    extra: dict = field(default_factory=dict)


def triton_type(dtype: torch.dtype) -> str:
    """Triton's name of a torch dtype in kernel signatures: 'fp32', 'fp16', 'bf16'."""
    return _TRITON_TYPES[dtype]


def pointer_type(dtype: torch.dtype) -> str:
    """The signature type of a pointer to `dtype` tensor data: '*fp32', '*fp16', '*bf16'."""
    return "*" + triton_type(dtype)


_PROVIDERS: list[Callable[..., Iterable[KernelVariant]]] = []
_TABLES: list[tuple[Path, Callable[..., Iterable[KernelVariant]]]] = []


def register_variants(provider: Callable[..., Iterable[KernelVariant]]) -> Callable:
    """Kernel files (through their configs modules) call this at import with a function yielding
    their variants: `provider()`, or `provider(arch)` (e.g. "sm_80") when it takes an argument, to
    yield that architecture's."""
    _PROVIDERS.append(provider)
    return provider


def register_table(path: Path, provider: Callable[..., Iterable[KernelVariant]]) -> Callable:
    """A kernel file's config table: `provider` yields candidate variants with `table_entry` set;
    `emit_table` writes the results to the JSON file at `path` (see `write_table`)."""
    _TABLES.append((Path(path), provider))
    return provider


def unwrap(kernel: Any) -> Any:
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers (under the interpreter:
    the interpreted function, which has the same argument names but cannot compile)."""
    from triton.runtime.interpreter import InterpretedFunction
    while not isinstance(kernel, triton.runtime.JITFunction | InterpretedFunction):
        kernel = kernel.fn
    return kernel


def autotune_configs(kernel: Any) -> list[triton.Config]:
    """The configs of the outermost @triton.autotune around `kernel`."""
    while not isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return kernel.configs


def autotune_variants(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any],
                      label: str, aligned: tuple[str, ...] = (),
                      keep: Callable[[triton.Config], bool] = lambda c: True) -> Iterator[KernelVariant]:
    """One variant per autotune config of `kernel` that `keep` accepts, with the config's
    meta-parameters merged into `constexprs`."""
    for cfg in autotune_configs(kernel):
        if not keep(cfg):
            continue
        meta = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
        yield KernelVariant(unwrap(kernel), f"{label} {meta} w{cfg.num_warps} s{cfg.num_stages}",
                            signature, {**constexprs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, aligned)


def jit_variant(kernel: Any, label: str, args: dict[str, Any], constexprs: dict[str, Any],
                num_warps: int = 4, num_stages: int = 3, **fields: Any) -> KernelVariant:
    """The variant Triton's JIT compiles for a call with these argument values. `args` gives every
    non-constexpr argument an example: a pointer type string ("*bf16"; tensors from torch are
    16-byte aligned), an int (1 becomes the constant 1, multiples of 16 are marked divisible by 16,
    i64 beyond 32 bits), a float (fp32) or a bool (u1). `constexprs` holds the rest; `fields`
    passes on to KernelVariant (name, table_entry)."""
    signature, consts, aligned = {}, dict(constexprs), []
    for name in unwrap(kernel).arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in args:
            raise TritonGPTError(f"jit_variant: no example value for argument {name!r} of {unwrap(kernel).__name__}")
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            aligned.append(name)
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int) and value == 1:
            signature[name], consts[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if value in _INT32 else "i64"
            if value % 16 == 0:
                aligned.append(name)
        else:
            signature[name] = "fp32"
    return KernelVariant(unwrap(kernel), label, signature, consts, num_warps, num_stages, tuple(aligned), **fields)


def _provide(provider: Callable, arch: str) -> Iterable[KernelVariant]:
    """A provider's variants: for `arch` ("sm_90") when it takes an argument, else its only list."""
    return provider(arch) if inspect.signature(provider).parameters else provider()


def variants(arch: str = "sm_90") -> list[KernelVariant]:
    """Every registered variant; providers that take an architecture get `arch`."""
    registry.load()  # importing the kernel files registers their variants
    return [v for provider in _PROVIDERS for v in _provide(provider, arch)]


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself assembles `arch` with (its PTX .version matches that one)."""
    from triton.backends.nvidia import compiler as nvidia
    try:
        return nvidia.get_ptxas(arch).path  # Triton >= 3.5: a newer ptxas for sm_90+
    except TypeError:
        return nvidia.get_ptxas().path  # one ptxas for every arch
    except AttributeError:
        return triton.knobs.nvidia.ptxas.path


def _ptxas_stats(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from `ptxas -v` on the PTX Triton produced."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        out = subprocess.run([_ptxas_path(arch), f"-arch=sm_{arch}{suffix}", "-v", str(src),
                              "-o", str(Path(tmp, "k.o"))], capture_output=True, text=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return (int(regs.group(1)) if regs else None), (sum(spills) if spills else None)


_WGMMA_N = re.compile(r"\bwgmma\.mma_async\S*\.m64n(\d+)k\d+")
_MMA_N = re.compile(r"\bmma\.sync\S*\.m\d+n(\d+)k\d+")
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d+))?\.[bfsu](\d+)\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)")


def ptx_features(ptx: str) -> dict:
    """What the PTX says about speed: tensor cores ("wgmma" / "mma" / ""), their smallest N, TMA
    copies, and the widest global load in bits (vector ld.global or cp.async bytes * 8)."""
    wgmma = [int(n) for n in _WGMMA_N.findall(ptx)]
    mma = [int(n) for n in _MMA_N.findall(ptx)]
    loads = [int(vec or 1) * int(bits) for vec, bits in _LD_GLOBAL.findall(ptx)]
    loads += [8 * int(size, 0) for size in _CP_ASYNC.findall(ptx)]
    return {"tensor_cores": "wgmma" if wgmma else ("mma" if mma else ""), "mma_n": min(wgmma or mma or [0]) or None,
            "tma": "cp.async.bulk.tensor" in ptx, "load_bits": max(loads) if loads else None}


def compile_variant(variant: KernelVariant, arch: int) -> CompileRow:
    kernel = variant.kernel
    name = variant.name or kernel.__name__
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in variant.aligned}
    try:
        src = ASTSource(fn=kernel, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    except Exception as exc:  # a compile failure is a row of the report, not a crash of it
        first = str(exc).strip().splitlines()
        return CompileRow(name, variant.config, False, error=f"{type(exc).__name__}: {first[0] if first else ''}")
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, arch)
    shared = compiled.metadata.shared
    row = CompileRow(name, variant.config, True, regs, shared, spills, **ptx_features(ptx))
    if regs is None:
        row.ok, row.error = False, "ptxas -v reported no register count"
    elif shared > SHARED_LIMIT[arch]:
        row.ok, row.error = False, f"shared memory {shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B"
    elif spills:
        row.ok, row.error = False, f"{spills} bytes of register spills"
    return row


def _arch_number(arch: str) -> int:
    if arch not in ARCHES:
        raise TritonGPTError(f"unknown --arch {arch!r}; choices: {', '.join(ARCHES)}")
    if interpreting():  # @triton.jit then builds interpreter functions, which cannot compile
        raise TritonGPTError("the compile report needs compilable kernels: unset TRITON_INTERPRET")
    return ARCHES[arch]


def report(arch: str, name_filter: str = "") -> list[CompileRow]:
    number = _arch_number(arch)
    return [compile_variant(v, number) for v in variants(arch)
            if name_filter in (v.name or v.kernel.__name__) and (not v.arches or number in v.arches)]


def format_table(rows: list[CompileRow], arch: str) -> str:
    head = ("kernel", "config", "status", "regs", "smem B", "spill B", "tensor cores", "min N", "TMA", "load bits")
    body = [(r.kernel, r.config, "ok" if r.ok else f"FAIL {r.error}", str(r.registers), str(r.shared),
             str(r.spill_bytes or 0) if r.ok or r.spill_bytes else "-", r.tensor_cores or "-",
             str(r.mma_n or "-"), "yes" if r.tma else "no", str(r.load_bits or "-")) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    spilled = sum(bool(r.spill_bytes) for r in rows)
    lines = [f"# compile report for {arch}: {sum(r.ok for r in rows)}/{len(rows)} ok, {spilled} with spills "
             f"(triton {triton.__version__})",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Config tables: which candidate configs compile cleanly, per architecture and Triton version
# ----------------------------------------------------------------------------------------------

def passing(table: dict, arch: str) -> dict[str, dict[str, int]]:
    """key -> {config: shared bytes} of the configs that passed for `arch` under every Triton
    version in `table` (table[arch][version][key][config] = shared bytes, as `read_table` gives
    it); the largest shared memory of the versions."""
    runs = list(table.get(arch, {}).values())
    if not runs:
        return {}
    keys = set.intersection(*(set(run) for run in runs))
    return {key: {cfg: max(run[key][cfg] for run in runs)
                  for cfg in set.intersection(*(set(run[key]) for run in runs))} for key in keys}


def write_table(path: Path, table: dict) -> None:
    """Write `table` as JSON to `path`: sorted keys, one entry a line, so a regenerated table diffs
    line by line against the old one."""
    text = json.dumps(table, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def read_table(path: Path) -> dict:
    """The table in the JSON file at `path` ({} if there is none)."""
    return json.loads(path.read_text()) if path.exists() else {}


def emit_table(arch: str, name_filter: str = "",
               progress: Callable[[int, int], None] = lambda done, total: None) -> list[tuple[Path, int, int]]:
    """Compile every table candidate whose kernel name contains `name_filter` for `arch` and record
    under this Triton version, in each table's file, the configs that passed under each key:
    every candidate variant of that key and config compiled cleanly (after one fails, the rest of
    its key and config are skipped). Returns (path, configs kept, variants compiled) per table."""
    number = _arch_number(arch)
    registry.load()
    written = []
    for path, provider in _TABLES:
        candidates = [v for v in _provide(provider, arch) if name_filter in (v.name or v.kernel.__name__)]
        if not candidates:
            continue
        passed: dict[str, dict[str, int]] = {}
        failed: set[tuple[str, str]] = set()
        compiled = 0
        for i, variant in enumerate(candidates):
            key, config = variant.table_entry
            configs = passed.setdefault(key, {})
            if (key, config) not in failed:
                row = compile_variant(variant, number)
                compiled += 1
                if row.ok:
                    configs[config] = max(configs.get(config, 0), row.shared)
                else:
                    failed.add((key, config))
            progress(i + 1, len(candidates))
        kept = {key: {cfg: shared for cfg, shared in configs.items() if (key, cfg) not in failed}
                for key, configs in passed.items()}
        table = read_table(path)
        table.setdefault(arch, {})[triton.__version__] = kept
        write_table(path, table)
        written.append((path, sum(len(c) for c in kept.values()), compiled))
    return written
