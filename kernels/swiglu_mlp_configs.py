"""Autotune configs of the fused SwiGLU GEMMs (kernels/swiglu_mlp.py), and what the compile report
compiles of them.

Each kernel autotunes over a fixed list of tiles (`POINTER_CONFIGS`, `TMA_CONFIGS`; under the
interpreter one small tile each), pruned per call to the tiles that fit the problem (the GELU MLP's
`mlp_configs.prune_configs`) and to those within the pass's register budget (`fits_registers`):
the forward GEMM keeps two fp32 accumulators (gate and up) per output tile, the backward's
pointer epilogue whole G and U tiles beside its one. The TMA kernel's configs carry a pre-hook that
gives the host tensor descriptors the config's block shapes. swiglu_mlp.py hands its two kernels
over once (`register_compile_variants`): the compile report then compiles every (dtype, pass) the
op launches at each autotune config that pass may run, the TMA kernel for sm_90 only.

    tritongpt kernels compile --arch sm_90 --filter swiglu
"""

import functools

import torch
import triton

from tritongpt.kernels import compile_report, mlp_configs
from tritongpt.kernels.registry import interpreting

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the GELU MLP's tiles (pointer kernel), tutorial
# 09's Hopper tiles (TMA kernel, wgmma on 64- and 128-row tiles). Each pass runs those whose accumulators
# fit its budget (`fits_registers`).
_POINTER_TILES = [(128, 128, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                  (32, 64, 32, 4, 4)]
_TMA_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4)]
if interpreting():  # the interpreter would time every config on the CPU: one small config each
    _POINTER_TILES = [_POINTER_TILES[-1]]
    _TMA_TILES = [(32, 32, 32, 4, 2)]

# fp32 accumulator values per thread (both accumulators of the forward together) a tile of each (path,
# pass) may hold, from the sm_90 compile report. Pointer forward: 64, the GELU MLP's limit (its 128x64 tile
# on 8 warps takes 101 registers). Pointer backward: 32, since its epilogue loads whole G and U tiles beside
# the accumulator (64 spills at 128x128 on 8 warps). TMA: 128, tutorial 09's 128x256 tile on 8 warps; the
# epilogue works in column quarters (forward 128x128 on 8 warps: 175 registers; backward 128x256: 254).
_ACCUMULATOR_BUDGET = {("pointer", "swiglu"): 64, ("pointer", "swiglu_grad"): 32, ("tma", "swiglu"): 128,
                       ("tma", "swiglu_grad"): 128}


def accumulators(epilogue: str) -> int:
    """Accumulator tiles of a pass: 2 in the forward ("swiglu": gate and up), 1 in the backward."""
    return 2 if epilogue == "swiglu" else 1


def fits_registers(cfg: triton.Config, epilogue: str, path: str) -> bool:
    """The pass `epilogue` may run config `cfg` on `path`: its accumulators fit the path's budget."""
    per_thread = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * accumulators(epilogue) // (32 * cfg.num_warps)
    return per_thread <= _ACCUMULATOR_BUDGET[path, epilogue]


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook of the TMA kernel: the host descriptors take the tile shapes of the config
    being run. The forward's weights are (N, K) (nn.Linear layout, tiles transposed in the kernel),
    the backward's W_down is (K, N); the (M, N) tensors move in quarter-width column blocks."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    for name in ("b_desc", "b2_desc"):
        if nargs[name] is not None:
            nargs[name].block_shape = [bn, bk] if nargs["EPILOGUE"] == "swiglu" else [bk, bn]
    for name in ("c_desc", "c2_desc", "g_desc", "u_desc"):
        if nargs[name] is not None:
            nargs[name].block_shape = [bm, bn // 4]


POINTER_CONFIGS = mlp_configs.tile_configs(_POINTER_TILES)
TMA_CONFIGS = mlp_configs.tile_configs(_TMA_TILES, pre_hook=_set_block_shapes)


def _prune(path: str, configs, named_args, **kwargs):
    """The tiles that fit the problem (mlp_configs.prune_configs) and the pass's register budget
    (the smallest tile if none does)."""
    epilogue = {**named_args, **kwargs}["EPILOGUE"]
    fit = [c for c in mlp_configs.prune_configs(configs, named_args, **kwargs) if fits_registers(c, epilogue, path)]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


prune_pointer_configs = functools.partial(_prune, "pointer")
prune_tma_configs = functools.partial(_prune, "tma")


# ----------------------------------------------------------------------------- compile report

# (label, epilogue, save_gu): what the op launches. fc writes H (and G, U for backward), dH reads G, U.
_USES = [("fc", "swiglu", True), ("fc recompute", "swiglu", False), ("dH", "swiglu_grad", False)]


def _compile_variants(pointer, tma):
    """Every (dtype, pass) the op launches, for each autotune config of both kernels (`pointer`,
    `tma`) the pass may run (`fits_registers`); the TMA kernel (sm_90 only) has descriptors with the
    config's block shapes and an H100's 132 programs."""
    for dtype in (torch.float16, torch.bfloat16):
        name_of_type, ptr = compile_report.triton_type(dtype), compile_report.pointer_type(dtype)
        for label, epilogue, save_gu in _USES:
            fc = epilogue == "swiglu"
            flags = {"EPILOGUE": epilogue, "SAVE_GU": save_gu, "INPUT_PRECISION": "tf32"}
            name = f"{name_of_type} {label} {epilogue}"
            sizes = dict.fromkeys(("M", "N", "K"), "i32")
            # fc: x, W_gate, W_up -> H (+ G, U); dH: dY, W_down, G, U -> dG, dU
            pointers = ("a_ptr", "b_ptr", "c_ptr") + (("b2_ptr",) if fc else ("c2_ptr",))
            pointers += ("g_ptr", "u_ptr") if save_gu or not fc else ()
            strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn", "stride_xm",
                       "stride_xn") + (("stride_b2k", "stride_b2n") if fc else ())
            unit = ("stride_ak", "stride_cn", "stride_xn") + (("stride_bk", "stride_b2k") if fc else ("stride_bn",))
            types = {**sizes, **dict.fromkeys(pointers, ptr), **dict.fromkeys(strides, "i32")}
            for cfg in compile_report.autotune_configs(pointer):
                if fits_registers(cfg, epilogue, "pointer"):
                    yield mlp_configs.gemm_variant(pointer, f"{name} pointer", types, flags, cfg, unit)

            # DTYPE as the launcher passes it (the autotune key): the torch dtype's name
            tma_flags = {**flags, "DTYPE": str(dtype).removeprefix("torch."), "NUM_SMS": 132}
            for cfg in compile_report.autotune_configs(tma):
                if not fits_registers(cfg, epilogue, "tma"):
                    continue
                bm, bn, bk = (cfg.kwargs[d] for d in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                weight = (bn, bk) if fc else (bk, bn)
                out = (bm, bn // 4)
                blocks = {"a_desc": (bm, bk), "b_desc": weight, "c_desc": out}
                blocks |= {"b2_desc": weight} if fc else {"c2_desc": out}
                blocks |= {"g_desc": out, "u_desc": out} if save_gu or not fc else {}
                types = {**sizes, **{d: f"tensordesc<{name_of_type}[{r}, {c}]>" for d, (r, c) in blocks.items()}}
                yield mlp_configs.gemm_variant(tma, f"{name} tma", types, tma_flags, cfg, arches=(90,))


def register_compile_variants(pointer, tma) -> None:
    """swiglu_mlp.py's kernels join the compile report: `pointer` (`_swiglu_matmul_kernel`) and `tma`
    (`_swiglu_tma_kernel`)."""
    compile_report.register_variants(functools.partial(_compile_variants, pointer, tma))
