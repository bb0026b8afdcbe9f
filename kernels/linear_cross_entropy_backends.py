"""The `linear_cross_entropy` op's backends beyond its reference and its Triton kernel, following
the contract of kernels/linear_cross_entropy_spec.py: `chunked`, the op in plain PyTorch over row
chunks (never more than a chunk of logits at once, any device), and Liger-Kernel's fused linear
cross-entropy when it is installed (`liger`).
"""

from __future__ import annotations

import torch

from tritongpt.kernels import registry
from tritongpt.kernels.linear_cross_entropy_spec import OP, check, check_targets

# Logits elements (rows x V) one chunk of `chunked` holds: 2**23 is 32 MiB in fp32, about 166 rows
# of GPT-2's vocabulary; a few such temporaries live at once.
CHUNK_ELEMENTS = 2 ** 23


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of `chunked` for a vocabulary of `vocab` (at least 1)."""
    return max(1, CHUNK_ELEMENTS // vocab)


def _chunked_pass(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  label_smoothing: float, vocab: int, with_grads: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, divisor, dx, dweight) over row chunks of x (N, C), never more than chunk_rows(vocab)
    rows of logits at once. With with_grads the gradients of the *summed* row losses (divide by
    `divisor` for the mean's): dx in x's dtype, dweight (V_padded, C) in fp32 at least (a sum over
    chunks); else both None."""
    n = x.shape[0]
    loss_dtype = torch.promote_types(x.dtype, torch.float32)
    w = weight[:vocab]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).long()  # ignored rows gather column 0, then count 0
    total = x.new_zeros((), dtype=loss_dtype)
    dx = torch.empty_like(x) if with_grads else None
    dw = weight.new_zeros(weight.shape, dtype=loss_dtype) if with_grads else None  # padding rows stay 0
    rows = chunk_rows(vocab)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes here are chosen, not autocast's
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            xc, tc, vc = x[part], safe_targets[part], valid[part]
            z = (xc @ w.T).to(loss_dtype)  # (r, V): the only logits there are, one chunk
            lse = torch.logsumexp(z, dim=1)
            row_loss = (1.0 - label_smoothing) * (lse - z.gather(1, tc[:, None]).squeeze(1))
            if label_smoothing:
                row_loss = row_loss + label_smoothing * (lse - z.mean(dim=1))
            total = total + torch.where(vc, row_loss, 0.0).sum()
            if with_grads:  # d(row loss)/dz = softmax - (1 - s) onehot(t) - s / V, in place of z
                dz = z.sub_(lse[:, None]).exp_()
                dz[torch.arange(dz.shape[0], device=dz.device), tc] -= 1.0 - label_smoothing
                if label_smoothing:
                    dz.sub_(label_smoothing / vocab)
                dz = dz.mul_(vc[:, None]).to(x.dtype)  # ignored rows: no gradient
                torch.mm(dz, w, out=dx[part])
                dw[:vocab].add_(dz.T @ xc)
    divisor = valid.sum().clamp_min(1).to(loss_dtype)
    return total / divisor, divisor, dx, dw


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The forward computes the gradients too (the loss is a scalar: backward only scales them),
    so each chunk's logits are made once: 3 matmuls, as for the full logits."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, label_smoothing, vocab):
        loss, divisor, dx, dw = _chunked_pass(x, weight, targets, ignore_index, label_smoothing, vocab,
                                              with_grads=True)
        ctx.save_for_backward(dx, dw, divisor)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dx, dw, divisor = ctx.saved_tensors
        scale = dloss / divisor  # 0-dim fp32: dx keeps its dtype, one rounding
        return dx * scale, (dw * scale).to(ctx.weight_dtype), None, None, None, None


def chunked(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
            label_smoothing: float = 0.0, vocab_limit: int | None = None) -> torch.Tensor:
    """The op in plain PyTorch over row chunks (chunk_rows(V) rows of logits at a time), any
    device: the memory saving of the fused kernel without Triton."""
    n, c, vocab = check(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    check_targets(targets, ignore_index, vocab)
    x2, t = x.reshape(n, c), targets.reshape(n)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(x2, weight, t, ignore_index, float(label_smoothing), vocab)
    return _chunked_pass(x2, weight, t, ignore_index, float(label_smoothing), vocab, with_grads=False)[0]


def liger(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
          label_smoothing: float = 0.0, vocab_limit: int | None = None) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (`pip install liger-kernel`) on weight[:V]. Liger
    divides by the count of targets, so an all-ignored batch goes to `chunked` (loss 0)."""
    # lazy: optional dependency (requires="liger_kernel")
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    n, c, vocab = check(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    check_targets(targets, ignore_index, vocab)
    if not bool((targets != ignore_index).any()):
        return chunked(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing)
    return loss_fn(weight[:vocab], x.reshape(n, c), targets.reshape(n).long()).float()


registry.register(OP, "chunked", chunked, deterministic=True)
registry.register(OP, "liger", liger, needs="cuda", requires="liger_kernel")
