"""Tile configs of the row-normalization kernels (LayerNorm in kernels/layer_norm.py, RMSNorm in
kernels/rms_norm.py): one table for both, as their kernels share one design.

No autotuner: the launchers take one config per row length (`row_config`), so summation orders
depend only on the shapes. Rows up to MAX_BLOCK_N wide are one pass, whole rows in registers,
several narrow rows to a TILE-element tile and as many warps as keep ELEMENTS_PER_THREAD; wider
rows loop over CHUNK_N-column chunks. The backward runs a fixed number of programs per SM
(`bwd_grid`), each over a fixed group of rows, and the dweight/dbias reduction one fixed config
(REDUCE_*). Each op's `<op>_configs.py` hands the compile report its kernels' variants over these
configs (`compile_tiles`).
"""

from collections.abc import Iterator
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
BWD_PROGRAMS_PER_SM = 2  # backward programs per SM (fixed per device: fixed summation order)
INTERPRETER_BWD_PROGRAMS = 4  # few: the interpreter runs programs one by one; several tiles each


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


def bwd_grid(m: int, cfg: RowConfig, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of a backward over m rows: whole tiles per program (a partial
    tile only at the end of M), programs a fixed number per SM (INTERPRETER_BWD_PROGRAMS off a GPU)."""
    tiles = triton.cdiv(m, cfg.rows)
    if device.type == "cuda":
        programs = min(tiles, BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    else:
        programs = min(tiles, INTERPRETER_BWD_PROGRAMS)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), cfg.rows) * cfg.rows
    return triton.cdiv(m, rows_per_program), rows_per_program


def compile_tiles() -> Iterator[tuple[str, str, list[tuple[RowConfig, str, dict]]]]:
    """What the compile report compiles of a row-normalization kernel: per dtype its name and
    pointer type, and every row config with its label and tile constexprs (BLOCK_N, ROWS, ONE_PASS)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        tiles = [(cfg, f"{label} BLOCK_N={cfg.block_n} ROWS={cfg.rows} {'one-pass' if cfg.one_pass else 'chunked'} "
                       f"w{cfg.num_warps}", {"BLOCK_N": cfg.block_n, "ROWS": cfg.rows, "ONE_PASS": cfg.one_pass})
                 for cfg in row_configs()]
        yield label, compile_report.pointer_type(dtype), tiles
