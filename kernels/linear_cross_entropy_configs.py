"""Tile configs of the fused linear + cross-entropy kernels (kernels/linear_cross_entropy.py), and
what the compile report compiles of them.

No autotuner: one tile shape per input dtype and fp32 dot precision (`tiles_for`), so the
summation order and hence the result never depend on an autotuner's pick; under the interpreter
a launch takes wider vocabulary tiles and no more rows per tile than it has (`launch_tiles`).
linear_cross_entropy.py hands its three kernels over once (`register_compile_variants`): the
compile report then compiles each for every input dtype (and fp32 dot precision) at its tiles.

    tritongpt kernels compile --arch sm_90 --filter _lce_
"""

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton

from tritongpt.kernels import compile_report
from tritongpt.kernels.registry import interpreting


@dataclass(frozen=True)
class Tiles:
    block_m: int  # rows per tile
    block_v: int  # vocabulary entries per tile
    block_k: int  # C step of the logits dot
    block_c: int  # columns of dx / dW updated per dot in the backward
    num_warps: int
    num_stages: int


# One tile shape per input dtype (fixed, so the summation order and hence the result never depend
# on an autotuner's pick), chosen by the compile report: no spills on sm_80 / sm_90 under Triton
# 3.6 and 3.9 (BLOCK_C=64 for 16-bit, or 4 warps for fp32, spill or sit at 255 registers).
TILES = {torch.float16: Tiles(64, 128, 64, 32, 8, 3), torch.bfloat16: Tiles(64, 128, 64, 32, 8, 3),
         torch.float32: Tiles(64, 64, 32, 64, 8, 2)}
IEEE_TILES = Tiles(32, 64, 16, 32, 8, 2)  # fp32 dots without tf32 run on CUDA cores: operands in registers


# The interpreter runs each tile step as Python over numpy, its dots without BLAS: vocabulary tiles
# this wide keep a step at GPT-2's vocabulary in seconds there (the tests also run the GPU tiles).
INTERPRETER_BLOCK_V = 2048


def tiles_for(dtype: torch.dtype, precision: str) -> Tiles:
    """The GPU tiles for inputs of `dtype` and dots of `precision` (checks.input_precision)."""
    return IEEE_TILES if dtype == torch.float32 and precision == "ieee" else TILES[dtype]


def launch_tiles(dtype: torch.dtype, precision: str, rows: int) -> Tiles:
    """The tiles a launch over `rows` rows uses: the GPU's; under the interpreter with
    INTERPRETER_BLOCK_V and no more rows per tile than there are (padding rows cost as real ones)."""
    tiles = tiles_for(dtype, precision)
    if not interpreting():
        return tiles
    block_m = min(tiles.block_m, max(16, triton.next_power_of_2(rows)))  # 16: tl.dot's smallest
    return dataclasses.replace(tiles, block_m=block_m, block_v=INTERPRETER_BLOCK_V)


# ----------------------------------------------------------------------------------------------
# Compile report


def _compile_variants(fwd, dx, dw):
    """The forward `fwd` and backward `dx`, `dw` kernels for each input dtype (and fp32 dot
    precision) at its tiles."""
    scalars = {"N": "i32", "C": "i32", "V": "i32", "stride_x": "i32", "stride_w": "i32", "ignore_index": "i32",
               "label_smoothing": "fp32"}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ptr = compile_report.pointer_type(dtype)
        # fp32 dots: tf32 (training's setting) and ieee (float32 matmul precision 'highest')
        for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
            tiles = tiles_for(dtype, precision)
            label = (f"{str(dtype).removeprefix('torch.')}{' ieee' if precision == 'ieee' else ''} "
                     f"BLOCK_M={tiles.block_m} BLOCK_V={tiles.block_v} BLOCK_K={tiles.block_k}")
            meta = {"BLOCK_M": tiles.block_m, "BLOCK_V": tiles.block_v, "BLOCK_K": tiles.block_k,
                    "INPUT_PRECISION": precision}
            yield compile_report.KernelVariant(
                fwd, f"{label} w{tiles.num_warps} s{tiles.num_stages}",
                {"X": ptr, "W": ptr, "TARGETS": "*i64", "LOSS": "*fp32", "LSE": "*fp32", **scalars,
                 **dict.fromkeys(meta, "constexpr")},
                meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                aligned=("X", "W", "TARGETS", "LOSS", "LSE", "C", "stride_x", "stride_w"))
            bwd_meta = {**meta, "BLOCK_C": tiles.block_c}
            for kernel, out in ((dx, "DX"), (dw, "DW")):
                yield compile_report.KernelVariant(
                    kernel, f"{label} BLOCK_C={tiles.block_c} w{tiles.num_warps} s{tiles.num_stages}",
                    {"X": ptr, "W": ptr, "TARGETS": "*i64", "LSE": "*fp32", "SCALE": "*fp32", out: "*fp32",
                     **scalars, "smooth_share": "fp32", **dict.fromkeys(bwd_meta, "constexpr")},
                    bwd_meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                    aligned=("X", "W", "TARGETS", "LSE", out, "C", "stride_x", "stride_w"))


def register_compile_variants(fwd, dx, dw) -> None:
    """linear_cross_entropy.py's kernels join the compile report: forward, dx and dW."""
    compile_report.register_variants(functools.partial(_compile_variants, fwd, dx, dw))
