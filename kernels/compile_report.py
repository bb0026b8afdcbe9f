"""Ahead-of-time compile of every registered Triton kernel and autotune config for a GPU
architecture, without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`.

Kernel files describe what to compile by calling `register_variants(provider)` with a function
that yields `KernelVariant`s (usually built with `autotune_variants`). The report reads PTX for
tensor-core instructions and runs Triton's bundled `ptxas -v` for registers and spills.

    tritongpt kernels compile --arch sm_90
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritongpt.errors import TritonGPTError
from tritongpt.kernels.registry import interpreting

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide, table 21).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


@dataclass(frozen=True)
class KernelVariant:
    kernel: Any  # the @triton.jit function (autotune/heuristics wrappers removed)
    config: str  # human label: block sizes, warps, stages, dtype
    signature: dict[str, str]  # every argument -> "*fp16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()  # arguments Triton may assume divisible by 16 (pointers, strides)
    name: str = ""  # defaults to the kernel's name


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
    extra: dict = field(default_factory=dict)


_PROVIDERS: list[Callable[[], Iterable[KernelVariant]]] = []


def register_variants(provider: Callable[[], Iterable[KernelVariant]]) -> Callable:
    """Kernel files call this at import with a function yielding their variants."""
    _PROVIDERS.append(provider)
    return provider


def unwrap(kernel: Any) -> Any:
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
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


def variants() -> list[KernelVariant]:
    from tritongpt.kernels import registry
    registry.load()  # importing the kernel files registers their variants
    return [v for provider in _PROVIDERS for v in provider()]


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
    tensor_cores = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.", ptx) else "")
    row = CompileRow(name, variant.config, True, regs, shared, spills, tensor_cores)
    if regs is None:
        row.ok, row.error = False, "ptxas -v reported no register count"
    elif shared > SHARED_LIMIT[arch]:
        row.ok, row.error = False, f"shared memory {shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B"
    elif spills:
        row.ok, row.error = False, f"{spills} bytes of register spills"
    return row


def report(arch: str, name_filter: str = "") -> list[CompileRow]:
    if arch not in ARCHES:
        raise TritonGPTError(f"unknown --arch {arch!r}; choices: {', '.join(ARCHES)}")
    if interpreting():  # @triton.jit then builds interpreter functions, which cannot compile
        raise TritonGPTError("the compile report needs compilable kernels: unset TRITON_INTERPRET")
    return [compile_variant(v, ARCHES[arch]) for v in variants()
            if name_filter in (v.name or v.kernel.__name__)]


def format_table(rows: list[CompileRow], arch: str) -> str:
    head = ("kernel", "config", "status", "regs", "smem B", "spill B", "tensor cores")
    body = [(r.kernel, r.config, "ok" if r.ok else f"FAIL {r.error}", str(r.registers), str(r.shared),
             str(r.spill_bytes or 0) if r.ok or r.spill_bytes else "-", r.tensor_cores or "-") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [f"# compile report for {arch}: {sum(r.ok for r in rows)}/{len(rows)} ok (triton {triton.__version__})",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)
