"""Autotune configs of the fused MLP GEMMs (kernels/mlp.py), and what the compile report compiles of them.

Each kernel autotunes over a fixed list of tiles (`POINTER_CONFIGS`, `TMA_CONFIGS`; under the
interpreter one small tile each, since it would time every config on the CPU), pruned per call
to the tiles that fit the problem (`prune_configs`). The TMA kernel's configs carry a pre-hook
that gives the host tensor descriptors the config's block shapes. mlp.py hands its two kernels
over once (`register_compile_variants`): the compile report then compiles every (dtype,
epilogue) the MLP launches at each autotune config, the TMA kernel for sm_90 only.

    tritongpt kernels compile --arch sm_90 --filter _mlp_
"""

import functools

import torch
import triton

from tritongpt.kernels import compile_report
from tritongpt.kernels.registry import interpreting

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Pointer kernel: at most 64 fp32 accumulators per
# thread (larger tiles spill in the GELU epilogues, compile report sm_90); the small tiles keep every SM
# busy when M or a width is small. TMA kernel: tutorial 09's Hopper tiles, wgmma on 128-row tiles.
_POINTER_TILES = [(128, 128, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                  (32, 64, 32, 4, 4)]
_TMA_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]
if interpreting():  # the interpreter would time every config on the CPU (Triton 3.6 even a lone
    _POINTER_TILES = [_POINTER_TILES[-1]]  # pruned one), so each kernel gets a single small config
    _TMA_TILES = [(32, 32, 32, 4, 2)]


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook of the TMA kernel: the host descriptors take the tile shapes of the config
    being run (the epilogue stores and loads quarter-width column blocks)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
    for name in ("c_desc", "aux_desc"):
        if nargs[name] is not None:
            nargs[name].block_shape = [bm, bn // 4]


def tile_configs(tiles, pre_hook=None) -> list[triton.Config]:
    """One autotune config per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of `tiles`, GROUP_M 8."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                          pre_hook=pre_hook) for bm, bn, bk, w, s in tiles]


POINTER_CONFIGS = tile_configs(_POINTER_TILES)
TMA_CONFIGS = tile_configs(_TMA_TILES, pre_hook=_set_block_shapes)


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a 128-row tile for M = 16 wastes 7/8 of it)."""
    args = {**named_args, **kwargs}
    m, n, k = (triton.next_power_of_2(args[d]) for d in ("M", "N", "K"))
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m) and c.kwargs["BLOCK_N"] <= max(64, n)
           and c.kwargs["BLOCK_K"] <= max(32, k)]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def sum_rows(path: str) -> int:
    """Rows of dH per partial column-sum row: the smallest BLOCK_M the path's autotuner may run."""
    return min(c.kwargs["BLOCK_M"] for c in (TMA_CONFIGS if path == "tma" else POINTER_CONFIGS))


# ----------------------------------------------------------------------------- compile report

# (label, epilogue, approximate): what the op launches; fc carries b1, dH none.
_USES = [("fc", "gelu_save_h", "tanh"), ("fc", "gelu_save_h", "none"), ("fc recompute", "gelu", "tanh"),
         ("fc recompute", "gelu", "none"), ("dH", "gelu_grad", "tanh"), ("dH", "gelu_grad", "none")]


def gemm_variant(kernel, label: str, types: dict[str, str], constexprs: dict, cfg: triton.Config,
             unit: tuple[str, ...] = (), arches: tuple[int, ...] = ()) -> compile_report.KernelVariant:
    """One compile-report variant of `kernel`: `types` for the runtime arguments, constexpr for the
    rest; None arguments are constexpr None (as at runtime), `unit` strides constexpr 1, and every
    other pointer, size and stride divisible by 16, as the JIT specializes GPT-2 shapes. `arches`:
    the architectures `choose_path` runs it on (all when empty)."""
    fn = compile_report.unwrap(kernel)
    constexprs = {**{a: None for a in fn.arg_names if a not in types}, **dict.fromkeys(unit, 1), **constexprs,
                  **cfg.kwargs}
    signature = {a: "constexpr" if a in constexprs else types[a] for a in fn.arg_names}
    aligned = tuple(a for a, t in signature.items() if t != "constexpr" and not t.startswith("tensordesc"))
    meta = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return compile_report.KernelVariant(fn, f"{label} {meta} w{cfg.num_warps} s{cfg.num_stages}", signature,
                                        constexprs, cfg.num_warps, cfg.num_stages, aligned, arches=arches)


def _compile_variants(pointer, tma):
    """Every (dtype, epilogue) the MLP launches, for each autotune config of both kernels (`pointer`,
    `tma`); the TMA kernel (sm_90 only) has descriptors with the config's block shapes and an H100's
    132 programs."""
    for dtype in (torch.float16, torch.bfloat16):
        name_of_type, ptr = compile_report.triton_type(dtype), compile_report.pointer_type(dtype)
        for label, epilogue, approximate in _USES:
            fc = label.startswith("fc")
            flags = {"HAS_BIAS": fc, "EPILOGUE": epilogue, "APPROXIMATE": approximate, "INPUT_PRECISION": "tf32"}
            name = f"{name_of_type} {label} {epilogue} {approximate}"
            used = {"bias_ptr": ptr} if fc else {"col_sum_ptr": "*fp32"}
            sizes = dict.fromkeys(("M", "N", "K"), "i32")

            pointers = ("a_ptr", "b_ptr", "c_ptr") + (("aux_ptr",) if epilogue != "gelu" else ())
            strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn", "stride_xm",
                       "stride_xn")
            unit = ("stride_ak", "stride_cn", "stride_xn", "stride_bk" if fc else "stride_bn")
            types = {**used, **sizes, **dict.fromkeys(pointers, ptr), **dict.fromkeys(strides, "i32")}
            pointer_flags = {**flags, "SUM_ROWS": sum_rows("pointer")}
            for cfg in compile_report.autotune_configs(pointer):
                yield gemm_variant(pointer, f"{name} pointer", types, pointer_flags, cfg, unit)

            # DTYPE as the launcher passes it (the autotune key): the torch dtype's name
            tma_flags = {**flags, "DTYPE": str(dtype).removeprefix("torch."), "B_NK": fc, "SUM_ROWS": sum_rows("tma"),
                         "NUM_SMS": 132}
            for cfg in compile_report.autotune_configs(tma):
                bm, bn, bk = (cfg.kwargs[d] for d in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                blocks = {"a_desc": (bm, bk), "b_desc": (bn, bk) if fc else (bk, bn), "c_desc": (bm, bn // 4)}
                blocks |= {"aux_desc": (bm, bn // 4)} if epilogue != "gelu" else {}
                types = {**used, **sizes,
                         **{d: f"tensordesc<{name_of_type}[{r}, {c}]>" for d, (r, c) in blocks.items()}}
                yield gemm_variant(tma, f"{name} tma", types, tma_flags, cfg, arches=(90,))


def register_compile_variants(pointer, tma) -> None:
    """mlp.py's kernels join the compile report: `pointer` (`_mlp_matmul_kernel`) and `tma`
    (`_mlp_tma_kernel`)."""
    compile_report.register_variants(functools.partial(_compile_variants, pointer, tma))
