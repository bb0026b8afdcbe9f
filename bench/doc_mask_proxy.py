"""Packed documents' work on a CPU: the Triton attention kernels' forward + backward time under
the Triton interpreter, where a kernel's time is proportional to the tiles it visits, for
causal attention and for the same sequence split into documents (doc ids).

    TRITON_INTERPRET=1 python -m tritongpt.bench.doc_mask_proxy            # B=1 T=1024 H=2 D=16 fp32
    TRITON_INTERPRET=1 python -m tritongpt.bench.doc_mask_proxy --repeats 3

Each row: median seconds of fwd+bwd over --repeats calls, the ratio to causal, and the tiles the
forward, dK/dV and dQ kernels visit (kernels/attention_blocks.py `visited_blocks`, at the tiles
the interpreter runs) as a fraction of causal's. Ideal for 8 documents x 128 is 1/8; the
kernels' edge tiles and per-program overhead keep it above that.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tritongpt.errors import TritonGPTError, require
from tritongpt.kernels import attention_blocks, attention_configs, registry
from tritongpt.kernels.attention import flash_attention
from tritongpt.kernels.attention_spec import DOC_MEDIAN, packed_doc_ids


def masks(t: int) -> dict[str, torch.Tensor | None]:
    """The doc ids of each row: none (causal), 8 equal documents, documents shaped like FineWeb's."""
    return {"causal": None,
            f"8 docs x {t // 8}": torch.arange(t).div(t // 8, rounding_mode="floor")[None],
            f"packed docs (median {DOC_MEDIAN})": packed_doc_ids(1, t, DOC_MEDIAN, seed=t)}


def fwd_bwd_seconds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                    repeats: int) -> float:
    """Median seconds of one forward + backward of the triton backend."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiles(t: int, doc_ids: torch.Tensor | None) -> dict[str, int]:
    """Tiles each kernel visits per head, at the configs the interpreter runs."""
    counts = {}
    for kernel, kind in (("fwd", "fwd"), ("dkdv", "dkdv"), ("dq", "dq")):
        c = attention_configs.smallest_config(kind, "16-bit").kwargs
        counts[kernel] = attention_blocks.visited_blocks(kernel, t, t, True, None, doc_ids, c["BLOCK_M"], c["BLOCK_N"])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="calls per row; the median is reported")
    args = parser.parse_args(argv)
    try:
        require(registry.interpreting(), "doc_mask_proxy measures the Triton interpreter: set TRITON_INTERPRET=1")
        require(args.seq_len >= 8 and args.seq_len % 8 == 0, f"--seq-len must be a multiple of 8, got {args.seq_len}")
        require(args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}")
    except TritonGPTError as exc:
        parser.exit(2, f"error: {exc}\n")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.seq_len, args.heads, args.head_dim, generator=gen).requires_grad_()
               for _ in range(3))
    print(f"triton attention fwd+bwd under the interpreter: B=1 T={args.seq_len} H={args.heads} "
          f"D={args.head_dim} fp32, median of {args.repeats}")
    print(f"{'mask':<28}{'seconds':>9}{'x causal':>10}{'fwd tiles':>11}{'dkdv tiles':>12}{'dq tiles':>10}")
    base = None
    for name, doc_ids in masks(args.seq_len).items():
        seconds = fwd_bwd_seconds(q, k, v, doc_ids, args.repeats)
        counts = tiles(args.seq_len, doc_ids)
        base = base or (seconds, counts)
        frac = {kernel: counts[kernel] / base[1][kernel] for kernel in counts}
        cells = [f"{counts[kernel]:>6} ({frac[kernel]:.2f})".rjust(width)
                 for kernel, width in (("fwd", 11), ("dkdv", 12), ("dq", 10))]
        print(f"{name:<28}{seconds:9.2f}{seconds / base[0]:10.3f}" + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
