"""The `linear_cross_entropy` op: the GPT's lm_head matmul and its cross-entropy loss as one op,
so a backend can avoid writing the (tokens, vocabulary) logits, the largest tensor of a training
step. Here: its input checks, its plain-PyTorch reference (backend `torch`, the loss as the model
computed it before this op), the row-chunked PyTorch backend (`chunked`), Liger-Kernel's fused
linear cross-entropy when installed (`liger`), and the spec that drives tests, benchmarks and
`tritongpt verify`. The Triton kernel is `kernels/linear_cross_entropy.py`.

    z = x @ weight[:V]^T                    (N, V) logits, never stored by chunked / triton
    loss_i = (1 - s) (lse(z_i) - z_i[t_i]) + s (lse(z_i) - mean_j z_ij)      s = label_smoothing
    loss = sum of loss_i over rows with t_i != ignore_index / their count

V = vocab_limit (the real vocabulary; weight rows >= V are padding, never predicted, and get a
zero gradient). A batch whose targets are all ignore_index has loss 0 and zero gradients in
every backend (PyTorch's mean would be 0/0 = NaN). The loss is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from tritongpt.errors import TritonGPTError, require
from tritongpt.kernels import checks, registry
from tritongpt.kernels.spec import Case, Inputs, ModelShape, OpSpec, call, first, grads

OP = "linear_cross_entropy"

# ----------------------------------------------------------------------------------------------
# Input checks, shared by every backend


def check(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
          label_smoothing: float, vocab_limit: int | None) -> tuple[int, int, int]:
    """Checks shapes, dtypes and options (not target values: see check_targets). Returns (N, C, V):
    rows (all leading dims of x), width, predicted vocabulary."""
    require(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] >= 1,
            f"{OP}: x must be a (..., C) tensor with C >= 1, got "
            f"{checks.describe(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
    require(isinstance(weight, torch.Tensor), f"{OP}: weight must be a tensor, got {type(weight).__name__}")
    checks.same_kind(OP, "x", x, weight=weight)
    c = x.shape[-1]
    require(weight.dim() == 2 and weight.shape[1] == c and weight.shape[0] >= 1,
            f"{OP}: weight must be (vocab, {c}) (nn.Linear layout, x's width), got {tuple(weight.shape)}")
    require(vocab_limit is None or (isinstance(vocab_limit, int) and not isinstance(vocab_limit, bool)
                                    and 1 <= vocab_limit <= weight.shape[0]),
            f"{OP}: vocab_limit must be None or an int in [1, {weight.shape[0]}] (weight rows), got {vocab_limit!r}")
    require(isinstance(targets, torch.Tensor) and not targets.dtype.is_floating_point
            and not targets.dtype.is_complex and targets.dtype != torch.bool,
            f"{OP}: targets must be an integer tensor, got "
            f"{checks.describe(targets) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    require(targets.shape == x.shape[:-1],
            f"{OP}: targets shape {tuple(targets.shape)} must be x's leading shape {tuple(x.shape[:-1])}")
    require(targets.device == x.device, f"{OP}: targets is on {targets.device} but x is on {x.device}")
    require(isinstance(ignore_index, int) and not isinstance(ignore_index, bool),
            f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    require(isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0,
            f"{OP}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    return x.numel() // c, c, weight.shape[0] if vocab_limit is None else vocab_limit


def check_targets(targets: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Every target is ignore_index or a token id in [0, vocab): one TritonGPTError on the CPU. On
    CUDA the check stays on the device (torch._assert_async: no host sync per step; a bad target
    stops the run with a device-side assert naming this check). Skipped while torch.compile traces
    (no values then: the triton backend's custom op still checks at run time)."""
    if torch.compiler.is_compiling():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.device.type == "cuda":
        torch._assert_async(~bad.any(), f"{OP}: a target is outside [0, {vocab}) and not ignore_index ({ignore_index})")
        return
    if bool(bad.any()):
        raise TritonGPTError(f"{OP}: targets must be token ids in [0, {vocab}) or ignore_index ({ignore_index}); "
                             f"{int(bad.sum())} are not, e.g. {int(targets[bad][0])}")


# ----------------------------------------------------------------------------------------------
# Backends in plain PyTorch: the reference (`torch`), row chunks (`chunked`), Liger (`liger`)


def reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
              label_smoothing: float = 0.0, vocab_limit: int | None = None) -> torch.Tensor:
    """The full (..., V) logits, cast to fp32 at least, then PyTorch's cross-entropy: the model's
    loss before this op (sum over rows / the count of rows not ignored, so 0 when all are)."""
    _, _, vocab = check(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    check_targets(targets, ignore_index, vocab)
    logits = F.linear(x, weight)[..., :vocab]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1).long(), ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")
    return total / (targets != ignore_index).sum().clamp_min(1)


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
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    n, c, vocab = check(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    check_targets(targets, ignore_index, vocab)
    if not bool((targets != ignore_index).any()):
        return chunked(x, weight, targets, ignore_index, label_smoothing, vocab_limit)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing)
    return loss_fn(weight[:vocab], x.reshape(n, c), targets.reshape(n).long()).float()


# ----------------------------------------------------------------------------------------------
# The spec: benchmark sweep, inputs, work

GPT2_VOCAB, GPT2_VOCAB_PADDED = 50257, 50304


def _case(n: int, c: int, vocab: int, padded: int, label_smoothing: float = 0.0) -> Case:
    return Case(OP, (("N", n), ("C", c), ("V", vocab), ("Vpad", padded)), c, f"V={vocab}",
                (("label_smoothing", label_smoothing),))


def cases(quick: bool) -> list[Case]:
    """GPT-2's vocabulary and B*T = 16384 tokens, width C swept over the GPT-2 sizes; quick: vocabularies
    that are no multiple of any block, one with label smoothing."""
    if quick:
        return [_case(64, 32, 97, 128), _case(40, 48, 1000, 1024, label_smoothing=0.1)]
    return [_case(16384, c, GPT2_VOCAB, GPT2_VOCAB_PADDED) for c in (768, 1024, 1280, 1600)]


def model_cases(shape: ModelShape) -> list[Case]:
    """Every token's hidden state through lm_head and the loss."""
    return [_case(shape.batch * shape.seq_len, shape.n_embd, shape.vocab, shape.vocab_padded)]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """x like a final LayerNorm's output, weight giving logits of std ~2 (peaked softmaxes), targets
    over the whole vocabulary with about one row in eight ignored, a random fp32 loss gradient."""
    n, c, vocab, padded = case["N"], case["C"], case["V"], case["Vpad"]
    x = torch.randn(n, c, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(padded, c, generator=gen, device=device) * 2 * c ** -0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < 0.125] = -1
    dloss = torch.rand((), generator=gen, device=device) + 0.5
    kwargs = {"targets": targets, "ignore_index": -1, "label_smoothing": case["label_smoothing"],
              "vocab_limit": vocab}
    return Inputs((x, weight), kwargs, dloss)


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """2*N*V*C FLOPs for the logits, twice that backward (dx and dweight); a backend's recomputation
    is not counted."""
    return "tflops", 2 * case["N"] * case["V"] * case["C"] * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


ORACLE_CHUNK_BYTES = 1 << 30  # the reference runs a few rows at a time, keeping its logits under this


def chunked_oracle(inputs: Inputs, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference over row chunks: each chunk's mean loss weighted by its share of the rows not
    ignored (the (N, V) logits and their gradient would not fit in memory at real sizes)."""
    x, weight = inputs.args
    targets, ignore_index = inputs.kwargs["targets"], inputs.kwargs["ignore_index"]
    counted = max(1, int((targets != ignore_index).sum()))
    rows = max(1, ORACLE_CHUNK_BYTES // (3 * weight.shape[0] * torch.finfo(dtype).bits // 8))  # logits, copy, grad
    loss = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=x.device)
    dx, dw = [], torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    for start in range(0, x.shape[0], rows):
        part_targets = targets[start:start + rows]
        share = int((part_targets != ignore_index).sum()) / counted
        part = Inputs((x[start:start + rows], weight), {**inputs.kwargs, "targets": part_targets},
                      inputs.dout * share).detached(dtype)
        out = call(reference, part)
        part_dx, part_dw = grads(out, part)
        loss += first(out).detach() * share
        dx.append(part_dx)
        dw += part_dw
    return loss, [torch.cat(dx), dw]


SPEC = OpSpec(OP, reference, cases, make_inputs, work, size_label="C", model_cases=model_cases,
              chunked_oracle=chunked_oracle)
registry.register_op(SPEC)
registry.register(OP, "chunked", chunked, deterministic=True)
if importlib.util.find_spec("liger_kernel") is not None:
    registry.register(OP, "liger", liger, needs="cuda")
