"""What the compile report compiles of the RMSNorm kernels (kernels/rms_norm.py). Their tile
configs are the row-normalization table shared with LayerNorm (kernels/norm_configs.py), and their
dweight reduction is LayerNorm's kernel (reported with it). rms_norm.py hands its kernels over once
(`register_compile_variants`): the compile report then compiles every (dtype, row config) the
launchers can pick, all features on (the most registers).

    tritongpt kernels compile --arch sm_90 --filter _rms_norm_
"""

import functools

from tritongpt.kernels import compile_report, norm_configs

# ----------------------------------------------------------------------------------------------
# Compile report: pointers, row strides, M and N divisible by 16 as the JIT specializes them for
# Llama widths (what lets it use vector loads).


def _compile_variants(fwd, bwd):
    """Every (dtype, row config) of the forward `fwd` and backward `bwd` kernels with every feature on."""
    for _, ptr, tiles in norm_configs.compile_tiles():
        for cfg, shape, tile in tiles:
            yield compile_report.KernelVariant(
                fwd, f"{shape} residual+weight",
                {"X": ptr, "R": ptr, "W": ptr, "Y": ptr, "S": ptr, "RSTD": "*fp32",
                 "stride_x_row": "i32", "stride_r_row": "i32", "M": "i32", "N": "i32", "eps": "fp32",
                 "weight_offset": "fp32", "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr",
                 "BLOCK_N": "constexpr", "ROWS": "constexpr", "ONE_PASS": "constexpr"},
                {"HAS_RESIDUAL": True, "HAS_WEIGHT": True, **tile},
                num_warps=cfg.num_warps, num_stages=1,
                aligned=("X", "R", "W", "Y", "S", "RSTD", "stride_x_row", "stride_r_row", "M", "N"))
            row_sums = {} if cfg.one_pass else {"ROW_SUMS": "*fp32"}
            yield compile_report.KernelVariant(
                bwd, f"{shape} ds+weight",
                {"DY": ptr, "DS": ptr, "S": ptr, "W": ptr, "RSTD": "*fp32", "DX": ptr, "DW_PARTIAL": "*fp32",
                 "ROW_SUMS": "*fp32" if row_sums else "constexpr",
                 "stride_dy_row": "i32", "stride_ds_row": "i32", "stride_s_row": "i32",
                 "M": "i32", "N": "i32", "rows_per_program": "i32", "weight_offset": "fp32",
                 "HAS_DS": "constexpr", "HAS_WEIGHT": "constexpr",
                 "BLOCK_N": "constexpr", "ROWS": "constexpr", "ONE_PASS": "constexpr"},
                {"HAS_DS": True, "HAS_WEIGHT": True, **tile, **({} if row_sums else {"ROW_SUMS": None})},
                num_warps=cfg.num_warps, num_stages=1,
                aligned=("DY", "DS", "S", "W", "RSTD", "DX", "DW_PARTIAL", *row_sums,
                         "stride_dy_row", "stride_ds_row", "stride_s_row", "M", "N"))


def register_compile_variants(fwd, bwd) -> None:
    """rms_norm.py's kernels join the compile report: forward and backward."""
    compile_report.register_variants(functools.partial(_compile_variants, fwd, bwd))
