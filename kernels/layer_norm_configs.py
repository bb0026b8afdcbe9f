"""What the compile report compiles of the LayerNorm kernels (kernels/layer_norm.py). Their tile
configs are the row-normalization table shared with RMSNorm (kernels/norm_configs.py).
layer_norm.py hands its kernels over once (`register_compile_variants`): the compile report then
compiles every (dtype, row config) the launchers can pick, all features on (the most registers),
plus the dweight/dbias reduction.

    tritongpt kernels compile --arch sm_90 --filter _layer_norm_
"""

import functools

from tritongpt.kernels import compile_report, norm_configs

# ----------------------------------------------------------------------------------------------
# Compile report: pointers, row strides, M and N divisible by 16 as the JIT specializes them for
# GPT-2 widths (what lets it use vector loads).


def _compile_variants(fwd, bwd, reduce):
    """Every (dtype, row config) of the forward `fwd` and backward `bwd` kernels with every feature
    on, and the dweight/dbias reduction `reduce`, per dtype."""
    for label, ptr, tiles in norm_configs.compile_tiles():
        for cfg, shape, tile in tiles:
            yield compile_report.KernelVariant(
                fwd, f"{shape} residual+weight+bias",
                {"X": ptr, "R": ptr, "W": ptr, "B": ptr, "Y": ptr, "S": ptr, "MEAN": "*fp32", "RSTD": "*fp32",
                 "stride_x_row": "i32", "stride_r_row": "i32", "M": "i32", "N": "i32", "eps": "fp32",
                 "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                 "BLOCK_N": "constexpr", "ROWS": "constexpr", "ONE_PASS": "constexpr"},
                {"HAS_RESIDUAL": True, "HAS_WEIGHT": True, "HAS_BIAS": True, **tile},
                num_warps=cfg.num_warps, num_stages=1,
                aligned=("X", "R", "W", "B", "Y", "S", "MEAN", "RSTD", "stride_x_row", "stride_r_row", "M", "N"))
            row_sums = {} if cfg.one_pass else {"ROW_SUMS": "*fp32"}
            yield compile_report.KernelVariant(
                bwd, f"{shape} ds+weight+bias",
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
            f"{label} BLOCK_P={norm_configs.REDUCE_BLOCK_P} BLOCK_N={norm_configs.REDUCE_BLOCK_N} "
            f"w{norm_configs.REDUCE_WARPS} dw+db",
            {"DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "DW": ptr, "DB": ptr, "P": "i32", "N": "i32",
             "HAS_DW": "constexpr", "HAS_DB": "constexpr", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"},
            {"HAS_DW": True, "HAS_DB": True, "BLOCK_P": norm_configs.REDUCE_BLOCK_P,
             "BLOCK_N": norm_configs.REDUCE_BLOCK_N},
            num_warps=norm_configs.REDUCE_WARPS, num_stages=1, aligned=("DW_PARTIAL", "DB_PARTIAL", "DW", "DB", "N"))


def register_compile_variants(fwd, bwd, reduce) -> None:
    """layer_norm.py's kernels join the compile report: forward, backward and the reduction."""
    compile_report.register_variants(functools.partial(_compile_variants, fwd, bwd, reduce))
