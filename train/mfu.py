"""Model FLOPs utilization: achieved model FLOP/s per GPU over the GPU's dense tensor-core peak.

    tritongpt train --peak-tflops 165     # a card missing from the table (or a different clock)

PEAK_FLOPS holds each card's dense (no 2:4 sparsity) peak by autocast dtype: bf16/fp16 with fp32
accumulation, which is what training uses (GeForce cards run fp16-accumulate twice as fast, not
counted), and TF32 for fp32 runs (torch.set_float32_matmul_precision("high")). The first
substring of torch.cuda.get_device_name() that matches wins, so longer names come first.
The model FLOPs per token are GPT.flops_per_token: 6 N over the parameters as built (SwiGLU's
three matrices, grouped-query attention's narrower k/v projections, bias-free RMSNorm gains)
plus attention's score and value matmuls.
"""

from __future__ import annotations

import torch

TERA = 1e12

# (substring of the device name, {dtype: peak FLOP/s}); source per row
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    # NVIDIA H200 datasheet (SXM): 1,979 TFLOPS BF16/FP16 and 989 TF32 with sparsity, halved here
    ("H200", {"bf16": 989 * TERA, "fp16": 989 * TERA, "fp32": 494 * TERA}),
    # NVIDIA H20 (HGX H20 product brief): 148 TFLOPS BF16/FP16, 74 TF32, dense
    ("H20", {"bf16": 148 * TERA, "fp16": 148 * TERA, "fp32": 74 * TERA}),
    # NVIDIA H100 datasheet: PCIe 1,513 / NVL 1,671 / SXM 1,979 TFLOPS BF16 with sparsity; TF32 half that
    ("H100 PCIe", {"bf16": 756 * TERA, "fp16": 756 * TERA, "fp32": 378 * TERA}),
    ("H100 NVL", {"bf16": 835 * TERA, "fp16": 835 * TERA, "fp32": 417 * TERA}),
    ("H100", {"bf16": 989 * TERA, "fp16": 989 * TERA, "fp32": 494 * TERA}),
    # NVIDIA B200 datasheet (HGX B200): 4.5 PFLOPS FP16/BF16 and 2.2 PFLOPS TF32 with sparsity per GPU
    ("B200", {"bf16": 2250 * TERA, "fp16": 2250 * TERA, "fp32": 1100 * TERA}),
    # NVIDIA A100 datasheet: 312 TFLOPS BF16/FP16, 156 TF32, dense
    ("A100", {"bf16": 312 * TERA, "fp16": 312 * TERA, "fp32": 156 * TERA}),
    # NVIDIA A10 datasheet: 125 TFLOPS BF16/FP16, 62.5 TF32, dense
    ("A10", {"bf16": 125 * TERA, "fp16": 125 * TERA, "fp32": 62.5 * TERA}),
    # NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor with sparsity; TF32 154.8 with sparsity
    ("A6000", {"bf16": 154.8 * TERA, "fp16": 154.8 * TERA, "fp32": 77.4 * TERA}),
    # NVIDIA L40S datasheet: 733 TFLOPS BF16/FP16 and 366 TF32 with sparsity
    ("L40S", {"bf16": 362 * TERA, "fp16": 362 * TERA, "fp32": 183 * TERA}),
    # NVIDIA L40 datasheet: 362 TFLOPS BF16/FP16 and 181 TF32 with sparsity
    ("L40", {"bf16": 181 * TERA, "fp16": 181 * TERA, "fp32": 90.5 * TERA}),
    # NVIDIA L4 datasheet: 242 TFLOPS BF16/FP16 and 120 TF32 with sparsity
    ("L4", {"bf16": 121 * TERA, "fp16": 121 * TERA, "fp32": 60 * TERA}),
    # NVIDIA Blackwell GeForce whitepaper (RTX 5090): 209.5 TFLOPS FP16/BF16 with FP32 accumulate, 104.8 TF32
    ("RTX 5090", {"bf16": 209.5 * TERA, "fp16": 209.5 * TERA, "fp32": 104.8 * TERA}),
    # NVIDIA Ada whitepaper (RTX 4090): 165.2 TFLOPS FP16/BF16 with FP32 accumulate, 82.6 TF32
    ("RTX 4090", {"bf16": 165.2 * TERA, "fp16": 165.2 * TERA, "fp32": 82.6 * TERA}),
    # NVIDIA Ampere GA102 whitepaper (RTX 3090): 71 TFLOPS FP16/BF16 with FP32 accumulate, 35.6 TF32
    ("RTX 3090", {"bf16": 71 * TERA, "fp16": 71 * TERA, "fp32": 35.6 * TERA}),
    # NVIDIA V100 datasheet (SXM2): 125 TFLOPS FP16 tensor, 15.7 FP32 (no bf16, no tf32)
    ("V100", {"fp16": 125 * TERA, "fp32": 15.7 * TERA}),
    # AMD Instinct MI300X datasheet: 1,307.4 TFLOPS BF16/FP16 and 653.7 TF32, dense (ROCm torch)
    ("MI300X", {"bf16": 1307.4 * TERA, "fp16": 1307.4 * TERA, "fp32": 653.7 * TERA}),
]


def peak_flops(device: torch.device, dtype: str, override_tflops: float | None = None) -> float | None:
    """The peak FLOP/s for MFU: `override_tflops` (TFLOP/s) when given, else the table's entry for
    this GPU and dtype; None on the CPU or a GPU missing from the table."""
    if override_tflops is not None:
        return override_tflops * TERA
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(dtype)
    return None
