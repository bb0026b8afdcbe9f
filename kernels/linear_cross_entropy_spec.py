"""The `linear_cross_entropy` op: the GPT's lm_head matmul and its cross-entropy loss as one op,
so a backend can avoid writing the (tokens, vocabulary) logits, the largest tensor of a training
step. Here is its contract: its input checks, its plain-PyTorch reference (backend `torch`, the
loss as the model computed it before this op), and the spec that drives tests, benchmarks and
`tritongpt verify`. Its other backends (row-chunked PyTorch, Liger-Kernel) are
`kernels/linear_cross_entropy_backends.py`; the Triton kernel is `kernels/linear_cross_entropy.py`.

    z = x @ weight[:V]^T                    (N, V) logits, never stored by chunked / triton
    loss_i = (1 - s) (lse(z_i) - z_i[t_i]) + s (lse(z_i) - mean_j z_ij)      s = label_smoothing
    loss = sum of loss_i over rows with t_i != ignore_index / their count

V = vocab_limit (the real vocabulary; weight rows >= V are padding, never predicted, and get a
zero gradient). A batch whose targets are all ignore_index has loss 0 and zero gradients in
every backend (PyTorch's mean would be 0/0 = NaN). The loss is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

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
# The reference (backend `torch`)


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
