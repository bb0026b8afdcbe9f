"""Tile configs of the LayerNorm kernels (kernels/layer_norm.py), and what the compile report
compiles of them.

No autotuner: the launchers take one config per row length (`row_config`), so summation orders
depend only on the shapes. Rows up to MAX_BLOCK_N wide are one pass, whole rows in registers,
several narrow rows to a TILE-element tile and as many warps as keep ELEMENTS_PER_THREAD; wider
rows loop over CHUNK_N-column chunks. The dweight/dbias reduction runs one fixed config
(REDUCE_*). layer_norm.py hands its kernels over once (`register_compile_variants`): the compile
report then compiles every (dtype, row config) the launchers can pick, all features on (the most
registers), plus the reduction.

    tritongpt kernels compile --arch sm_90 --filter _layer_norm_
"""

import functools
from dataclasses import dataclass

import torch
import triton

from tritongpt.kernels import compile_report

MAX_BLOCK_N = 8192  # widest row held in registers in one pass
# Wider rows loop over chunks of CHUNK_N columns, 8 per thread: their two-pass backward keeps more
# live per element (16 per thread spills: sm_80 under Triton 3.9, either arch under 3.6's ptxas).
CHUNK_N, CHUNK_WARPS = 2048, 8
MIN_BLOCK_N = 64  # narrower rows share one config (masked lanes cost nothing that matters)
TILE = 4096  # elements of a (rows, BLOCK_N) tile below MAX_BLOCK_N: narrow rows come several to a tile
ELEMENTS_PER_THREAD = 16  # of each tensor in a tile: two 16-byte vector loads of 16-bit data
# The partial-sum reduction: 128 partial rows per step over 32 columns per program, so N = 768 still
# spreads over 24 programs.
REDUCE_BLOCK_P, REDUCE_BLOCK_N, REDUCE_WARPS = 128, 32, 4


@dataclass(frozen=True)
class RowConfig:
    block_n: int  # columns per chunk
    num_warps: int
    one_pass: bool  # the whole row fits one chunk
    rows: int = 1  # rows per tile


def row_config(n: int) -> RowConfig:
    """The tile config the launchers use for rows of length n (also what the compile report
    compiles, via `row_configs`): whole rows up to MAX_BLOCK_N, several to a tile when narrow, and
    as many warps as keep ELEMENTS_PER_THREAD (8 warps for a 4096 tile, 16 for 8192 columns);
    chunks of CHUNK_N beyond."""
    if n > MAX_BLOCK_N:
        return RowConfig(CHUNK_N, CHUNK_WARPS, False)
    block_n = max(triton.next_power_of_2(n), MIN_BLOCK_N)
    rows = max(TILE // block_n, 1)
    return RowConfig(block_n, rows * block_n // (32 * ELEMENTS_PER_THREAD), True, rows)


def row_configs() -> list[RowConfig]:
    """Every distinct config `row_config` can return."""
    widths = [MIN_BLOCK_N << k for k in range((MAX_BLOCK_N // MIN_BLOCK_N).bit_length())]
    return [row_config(n) for n in widths + [MAX_BLOCK_N + 1]]


# ----------------------------------------------------------------------------------------------
# Compile report: pointers, row strides, M and N divisible by 16 as the JIT specializes them for
# GPT-2 widths (what lets it use vector loads).


def _compile_variants(fwd, bwd, reduce):
    """Every (dtype, row config) of the forward `fwd` and backward `bwd` kernels with every feature
    on, and the dweight/dbias reduction `reduce`, per dtype."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ptr = compile_report.pointer_type(dtype)
        label = str(dtype).removeprefix("torch.")
        for cfg in row_configs():
            shape = (f"BLOCK_N={cfg.block_n} ROWS={cfg.rows} {'one-pass' if cfg.one_pass else 'chunked'} "
                     f"w{cfg.num_warps}")
            tile = {"BLOCK_N": cfg.block_n, "ROWS": cfg.rows, "ONE_PASS": cfg.one_pass}
            yield compile_report.KernelVariant(
                fwd, f"{label} {shape} residual+weight+bias",
                {"X": ptr, "R": ptr, "W": ptr, "B": ptr, "Y": ptr, "S": ptr, "MEAN": "*fp32", "RSTD": "*fp32",
                 "stride_x_row": "i32", "stride_r_row": "i32", "M": "i32", "N": "i32", "eps": "fp32",
                 "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                 "BLOCK_N": "constexpr", "ROWS": "constexpr", "ONE_PASS": "constexpr"},
                {"HAS_RESIDUAL": True, "HAS_WEIGHT": True, "HAS_BIAS": True, **tile},
                num_warps=cfg.num_warps, num_stages=1,
                aligned=("X", "R", "W", "B", "Y", "S", "MEAN", "RSTD", "stride_x_row", "stride_r_row", "M", "N"))
            row_sums = {} if cfg.one_pass else {"ROW_SUMS": "*fp32"}
            yield compile_report.KernelVariant(
                bwd, f"{label} {shape} ds+weight+bias",
                {"DY": ptr, "DS": ptr, "S": ptr, "W": ptr, "MEAN": "*fp32", "RSTD": "*fp32", "DX": ptr,
                 "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "ROW_SUMS": "*fp32" if row_sums else "constexpr",
                 "stride_dy_row": "i32", "stride_ds_row": "i32", "stride_s_row": "i32",
                 "M": "i32", "N": "i32", "rows_per_program": "i32",
                 "HAS_DS": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_DB": "constexpr",
                 "BLOCK_N": "constexpr", "ROWS": "constexpr", "ONE_PASS": "constexpr"},
                {"HAS_DS": True, "HAS_WEIGHT": True, "HAS_DB": True, **tile,
                 **({} if row_sums else {"ROW_SUMS": None})},
                num_warps=cfg.num_warps, num_stages=1,
                aligned=("DY", "DS", "S", "W", "MEAN", "RSTD", "DX", "DW_PARTIAL", "DB_PARTIAL", *row_sums,
                         "stride_dy_row", "stride_ds_row", "stride_s_row", "M", "N"))
        yield compile_report.KernelVariant(
            reduce,
            f"{label} BLOCK_P={REDUCE_BLOCK_P} BLOCK_N={REDUCE_BLOCK_N} w{REDUCE_WARPS} dw+db",
            {"DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "DW": ptr, "DB": ptr, "P": "i32", "N": "i32",
             "HAS_DW": "constexpr", "HAS_DB": "constexpr", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"},
            {"HAS_DW": True, "HAS_DB": True, "BLOCK_P": REDUCE_BLOCK_P, "BLOCK_N": REDUCE_BLOCK_N},
            num_warps=REDUCE_WARPS, num_stages=1, aligned=("DW_PARTIAL", "DB_PARTIAL", "DW", "DB", "N"))


def register_compile_variants(fwd, bwd, reduce) -> None:
    """layer_norm.py's kernels join the compile report: forward, backward and the reduction."""
    compile_report.register_variants(functools.partial(_compile_variants, fwd, bwd, reduce))
