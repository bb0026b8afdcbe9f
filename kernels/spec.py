"""What every op shares: its spec (cases, inputs, work, reference), the dtype names, the error
tolerances and the relative-error measure. Tests, `tritongpt bench`, the pytest-benchmark suite
and `tritongpt verify` iterate over the registered specs, so they know no op by name.

    from tritongpt.kernels import registry
    spec = registry.spec("attention")
    case = spec.cases(quick=True)[0]
    inputs = spec.make_inputs(case, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    out, grads = spec.oracle(inputs, torch.float64)    # the float64 reference: output and input gradients

Each op's spec lives beside its kernels (`kernels/<op>_spec.py`, the op's contract), together with
the op's input checks and its plain-PyTorch reference (the `torch` backend). See README "Adding an op".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# The dtype names used on the command line, in configs and in benchmark rows.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The project's tolerance rule: the max relative error of every backend vs a float64 reference,
# per dtype. fp32 dots on a GPU may use tf32.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
TF32_TOL = 1e-3

MODES = ("fwd", "bwd", "fwd+bwd")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the name benchmark rows and reports use."""
    return str(dtype).removeprefix("torch.")


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """Max relative error allowed for `dtype` (tf32: fp32 matmuls may run as tf32)."""
    return TF32_TOL if tf32 and dtype == torch.float32 else TOL[dtype]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf when actual holds NaN or inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, limit: float, shown: int = 3) -> str:
    """llm.c's failure print: the first `shown` elements whose |actual - expected| exceeds `limit`
    x max |expected| (the rel_err rule), then the largest difference and where it is."""
    a, e = actual.detach().double().reshape(expected.shape), expected.detach().double()
    diff = (a - e).abs().nan_to_num(nan=math.inf)
    bad = (diff > limit * e.abs().max().clamp_min(1e-30)).nonzero()[:shown].tolist()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()

    def at(index: list[int] | tuple[int, ...]) -> str:
        return f"{tuple(index)} {a[tuple(index)].item():.6g} vs {e[tuple(index)].item():.6g}"
    first_bad = "; ".join(at(i) for i in bad) or "none"
    return f"first mismatches {first_bad}; max |diff| {diff.max().item():.3g} at {at(worst)}" if worst else "empty"


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """float32 matmuls without tf32 (a process may have allowed it for speed), restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@dataclass(frozen=True)
class Case:
    """One shape (and setting) of an op, e.g. attention at B=32 T=512 H=32 D=64 causal."""

    op: str
    dims: tuple[tuple[str, int], ...]  # named sizes, e.g. (("B", 32), ("T", 512), ("H", 32), ("D", 64))
    size: int  # the swept size: the plots' x axis
    series: str  # what the cases of one plot line share: everything but the swept size
    options: tuple[tuple[str, Any], ...] = ()  # non-size settings, e.g. (("causal", True),)

    @property
    def shape(self) -> str:
        flags = " ".join(k if v is True else f"{k}={v}" for k, v in self.options if v is not False)
        return " ".join(f"{k}={v}" for k, v in self.dims) + (f" {flags}" if flags else "")

    def __getitem__(self, name: str) -> Any:
        return {**dict(self.dims), **dict(self.options)}[name]


@dataclass
class Inputs:
    """One call of an op: `fn(*args, **kwargs)`, then gradients of the output(s) along `dout`."""

    args: tuple[torch.Tensor, ...]  # the differentiable tensors, leaves requiring grad
    kwargs: dict[str, Any] = field(default_factory=dict)  # the rest: flags, integer tensors, ...
    dout: torch.Tensor | tuple[torch.Tensor, ...] | None = None  # gradient(s) of the output(s)

    @property
    def nbytes(self) -> int:
        tensors = [*self.args, *_tensors(self.dout), *(v for v in self.kwargs.values() if torch.is_tensor(v))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def detached(self, dtype: torch.dtype | None = None) -> Inputs:
        """Fresh leaves (cast to `dtype` if given; integer tensors keep theirs), same values."""
        def cast(t: Any) -> Any:
            if not torch.is_tensor(t) or not t.is_floating_point():
                return t
            return t.detach().to(dtype or t.dtype)
        return Inputs(tuple(cast(a).requires_grad_() for a in self.args),
                      {k: cast(v) for k, v in self.kwargs.items()},
                      None if self.dout is None else
                      tuple(cast(d) for d in self.dout) if isinstance(self.dout, tuple) else cast(self.dout))


def _tensors(value: Any) -> tuple[torch.Tensor, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, tuple) else (value,)


def call(fn: Callable, inputs: Inputs) -> Any:
    """fn(*inputs.args, **inputs.kwargs)."""
    return fn(*inputs.args, **inputs.kwargs)


def grads(out: Any, inputs: Inputs, retain_graph: bool = False) -> tuple[torch.Tensor, ...]:
    """Gradients of `out` (a tensor or a tuple of them) along inputs.dout, for every arg."""
    return torch.autograd.grad(_tensors(out), inputs.args, _tensors(inputs.dout), retain_graph=retain_graph)


def first(out: Any) -> torch.Tensor:
    """The primary output: `out` itself, or its first element when an op returns several."""
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class ModelShape:
    """The sizes a GPT calls its ops at (GPTConfig.shape builds it): what `verify` and the
    measured `auto` check and time each op on."""

    batch: int  # sequences per step
    seq_len: int  # tokens per sequence
    n_embd: int  # model width C
    n_head: int  # query heads
    n_kv_head: int  # key/value heads
    hidden: int  # MLP hidden width
    vocab: int  # real vocabulary (logits the model predicts)
    vocab_padded: int  # rows of the embedding / lm_head weight

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class OpSpec:
    """Everything tests, benchmarks and checks need to know about an op."""

    name: str  # the op's one name: registry key, config field, --flag, TRITONGPT_<NAME>, bench label
    reference: Callable  # plain PyTorch with the op's signature: the `torch` backend and, in float64, the oracle
    cases: Callable[[bool], list[Case]]  # quick -> the sweep: tiny shapes (CPU, CI, tests) or real ones (GPU)
    make_inputs: Callable[[Case, torch.dtype, torch.device, torch.Generator], Inputs]  # fresh random inputs
    work: Callable[[Case, str, torch.dtype], tuple[str, float]]  # mode -> ("tflops", FLOPs) or ("gbps", bytes)
    size_label: str = "size"  # name of the swept size (plots' x axis)
    # the cases a GPT of this shape calls the op at (verify, measured auto); None: not a model op
    model_cases: Callable[[ModelShape], list[Case]] | None = None
    # (inputs, dtype) -> (output, input gradients) of the reference in `dtype`; default: autograd
    # through `reference` at once (an op whose reference is too big at real sizes chunks it here)
    chunked_oracle: Callable[[Inputs, torch.dtype], tuple[torch.Tensor, list[torch.Tensor]]] | None = None
    # case -> the (query block, key block) tiles the Triton kernels visit, for benchmark rows to
    # show beside time (an op whose work the kernel cuts by skipping tiles); None: not counted
    tiles: Callable[[Case], int] | None = None

    def oracle(self, inputs: Inputs, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The reference run in `dtype` on the same inputs: (primary output, input gradients)."""
        with full_fp32_matmuls():
            if self.chunked_oracle is not None:
                return self.chunked_oracle(inputs, dtype)
            upcast = inputs.detached(dtype)
            out = call(self.reference, upcast)
            return first(out).detach(), list(grads(out, upcast))
