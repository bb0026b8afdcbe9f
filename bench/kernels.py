"""Kernel benchmarks: forward, backward and forward+backward of every registered backend of
attention, LayerNorm and the GELU MLP, next to their peers (each SDPA backend alone,
torch.compile of the reference, flash_attn and liger_kernel when installed).

    tritongpt bench attention                 # the full sweep on the GPU, bf16
    tritongpt bench layer_norm --dtype fp16
    tritongpt bench all --quick --out /tmp/bench   # tiny shapes: CPU / CI

Every row carries the median time, TFLOP/s or GB/s and its percent of the ceiling measured in
the same run, the speedup over the `torch` reference, the max relative error of the output and
of the input gradients against a float32/float64 reference computed from the same inputs, and
the peak memory the call allocates. A provider that cannot run a case gives a row with a note.
Triton kernels under the interpreter (TRITON_INTERPRET=1, or no GPU) are checked for
correctness on a tiny case and never timed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import itertools
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tritongpt.bench.report import blank_row, describe_error
from tritongpt.kernels import registry

OPS = ("attention", "layer_norm", "mlp")
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "torch"  # speedups are relative to this backend
COMPILE = "torch.compile"  # the peer that compiles the `torch` backend of the op
INTERPRETER_NOTE = "interpreter: correctness only"

# Max relative error vs the high-precision reference before a row is flagged (DEVELOPERS.md);
# fp32 on a GPU allows tf32 dots. A provider may also be as bad as 2x PyTorch's own error.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
TF32_TOL = 1e-3
FLAG = "ERROR ABOVE TOLERANCE"

MAX_COPIES = 8  # input sets rotated through while timing, so L2 holds none of them
REF_CHUNK_BYTES = 2 << 30  # attention reference: heads per chunk keep the scores under this


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what training uses), fp32 on the CPU (the interpreter's bf16 dots are wrong)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------
# Cases: the sweep of shapes per op


@dataclass(frozen=True)
class Case:
    op: str
    dims: tuple[tuple[str, int], ...]  # named sizes, e.g. (("B", 32), ("T", 512), ("H", 32), ("D", 64))
    size: int  # the plots' x axis: T (attention), N (LayerNorm), C (MLP)
    causal: bool = False  # attention only

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims) + (" causal" if self.causal else "")

    @property
    def series(self) -> str:
        """What the cases of one plot line share: everything but the swept size."""
        if self.op == "attention":
            return f"D={self['D']} {'causal' if self.causal else 'full'}"
        return self.op

    def __getitem__(self, name: str) -> int:
        return dict(self.dims)[name]


def sweep(op: str, quick: bool) -> list[Case]:
    """The cases of `op`: real GPT shapes, or tiny ones for CPU / CI with `quick`.
    attention: B*T tokens fixed, H*D fixed, T swept, D in two sizes, causal and not;
    layer_norm: M rows fixed, N swept; mlp: M rows fixed, width C swept (hidden 4C)."""
    if op == "attention":
        tokens, width = (64, 32) if quick else (16384, 2048)
        seqs = (16, 64) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        head_dims = (16, 32) if quick else (64, 128)
        return [Case(op, (("B", tokens // t), ("T", t), ("H", width // d), ("D", d)), t, causal)
                for d in head_dims for causal in (True, False) for t in seqs]
    if op == "layer_norm":
        m, widths = (64, (64, 256)) if quick else (16384, (768, 1024, 1536, 2048, 3072, 4096, 6144, 8192))
        return [Case(op, (("M", m), ("N", n)), n) for n in widths]
    if op == "mlp":
        m, widths = (64, (32, 64)) if quick else (16384, (768, 1024, 1536, 2048, 3072, 4096))
        return [Case(op, (("M", m), ("C", c), ("H", 4 * c)), c) for c in widths]
    raise ValueError(f"unknown op {op!r}")


def work(case: Case, mode: str, dtype: torch.dtype) -> tuple[str, float]:
    """("tflops", FLOPs) for the matmul-bound ops, ("gbps", bytes) for LayerNorm, per call.
    attention: 4*B*H*T*S*D forward (two matmuls), halved when causal; backward 2.5x forward.
    mlp: 2*M*K*N per matmul, two forward, four backward. layer_norm: forward reads x, w, b and
    writes y; backward reads x, dy, w and writes dx, dw, db (statistics not counted)."""
    passes = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5} if case.op == "attention" else {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}
    if case.op == "attention":
        fwd = 4 * case["B"] * case["H"] * case["T"] * case["T"] * case["D"] * (0.5 if case.causal else 1.0)
        return "tflops", fwd * passes[mode]
    if case.op == "mlp":
        return "tflops", 2 * 2 * case["M"] * case["C"] * case["H"] * passes[mode]
    m, n, elt = case["M"], case["N"], torch.finfo(dtype).bits // 8
    moved = {"fwd": 2 * m * n + 2 * n, "bwd": 3 * m * n + 3 * n}
    moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
    return "gbps", moved[mode] * elt


# ----------------------------------------------------------------------------------------------
# Inputs and the high-precision reference


@dataclass
class InputSet:
    args: tuple[torch.Tensor, ...]  # the op's tensor arguments, leaves requiring grad
    dout: torch.Tensor  # gradient of the output

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.args, self.dout))


def op_kwargs(case: Case) -> dict:
    """The non-tensor arguments of the op's call."""
    return {"attention": {"causal": case.causal}, "layer_norm": {"eps": 1e-5},
            "mlp": {"approximate": "tanh"}}[case.op]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> InputSet:
    """Fresh random inputs of `case` (never zeros), scaled like a trained GPT's activations."""
    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale + shift
        return t.to(dtype).requires_grad_()

    if case.op == "attention":
        qkv = (case["B"], case["T"], case["H"], case["D"])
        args = (rand(*qkv), rand(*qkv), rand(*qkv))
    elif case.op == "layer_norm":
        m, n = case["M"], case["N"]
        args = (rand(m, n, shift=0.5), rand(n, scale=0.1, shift=1.0), rand(n, scale=0.1))
    else:
        m, c, h = case["M"], case["C"], case["H"]
        args = (rand(m, c), rand(h, c, scale=c ** -0.5), rand(h, scale=0.1),
                rand(c, h, scale=h ** -0.5), rand(c, scale=0.1))
    dout = torch.randn(args[0].shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return InputSet(args, dout)


def reference_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 on the CPU and for fp32 inputs, else float32 (fp16/bf16 on a GPU)."""
    return torch.float64 if device.type == "cpu" or dtype == torch.float32 else torch.float32


def reference(case: Case, inputs: InputSet, ref_dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and input gradients of the `torch` backend run in `ref_dtype` on the same inputs.
    Attention heads are independent, so the reference runs a few heads at a time: its (T, S)
    scores would not fit in memory at 16k tokens otherwise."""
    with _full_fp32_matmuls():
        return _reference(case, inputs, ref_dtype)


@contextlib.contextmanager
def _full_fp32_matmuls() -> Iterator[None]:
    """float32 matmuls without tf32 (a process may have allowed it for speed), restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _reference(case: Case, inputs: InputSet, ref_dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    fn = registry.resolve(case.op, BASELINE)
    kwargs = op_kwargs(case)
    upcast = [a.detach().to(ref_dtype) for a in inputs.args]
    dout = inputs.dout.to(ref_dtype)
    if case.op != "attention":
        leaves = [a.requires_grad_() for a in upcast]
        out = fn(*leaves, **kwargs)
        return out.detach(), list(torch.autograd.grad(out, leaves, dout))
    scores_bytes = case["B"] * case["T"] * case["T"] * torch.finfo(ref_dtype).bits // 8
    step = max(1, REF_CHUNK_BYTES // (4 * scores_bytes))  # scores, probs and their grads
    outs, grads = [], [[], [], []]
    for h0 in range(0, case["H"], step):
        leaves = [a[:, :, h0:h0 + step].clone().requires_grad_() for a in upcast]
        out = fn(*leaves, **kwargs)
        for acc, g in zip(grads, torch.autograd.grad(out, leaves, dout[:, :, h0:h0 + step])):
            acc.append(g)
        outs.append(out.detach())
        del out, leaves
    return torch.cat(outs, dim=2), [torch.cat(g, dim=2) for g in grads]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf when actual is not finite."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    return TF32_TOL if dtype == torch.float32 and device.type == "cuda" else TOL[dtype]


# ----------------------------------------------------------------------------------------------
# Providers: registered backends plus peers


@dataclass
class Provider:
    name: str
    make: Callable[[], Callable] | None  # returns the op callable for the next case; None: cannot run
    timed: bool = True  # False: correctness only (Triton interpreter)
    note: str = ""  # why it cannot run, or what its rows mean
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # held while it runs


def _fixed(fn: Callable) -> Callable[[], Callable]:
    return lambda: fn


def _compiled(fn: Callable) -> Callable[[], Callable]:
    """A fresh torch.compile per case, static shapes: dynamo's cache is reset first so no case
    hits the recompile limit and falls back to eager unnoticed."""
    def make() -> Callable:
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
    return make


def _keep_saved_buffers() -> contextlib.AbstractContextManager:
    """Compiled backward graphs that may run again (retain_graph=True), so `bwd` can be timed on
    its own: AOTAutograd's donated buffers would free the saved tensors after the first run."""
    import torch._functorch.config as config
    return config.patch(donated_buffer=False) if hasattr(config, "donated_buffer") else contextlib.nullcontext()


def _sdpa_backends() -> dict[str, object]:
    """SDPA's CUDA kernels by provider name (those this torch knows)."""
    from torch.nn.attention import SDPBackend
    names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
             "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
    return {p: getattr(SDPBackend, m) for p, m in names.items() if hasattr(SDPBackend, m)}


@contextlib.contextmanager
def _sdpa_kernel_only(backend: object) -> Iterator[None]:
    """SDPA restricted to one of its kernels (an error where it cannot run), for a whole provider."""
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no kernel available" warnings: the error says it
        yield


def _flash_attn() -> Callable:
    from flash_attn import flash_attn_func

    def attention(q, k, v, causal=True, softmax_scale=None, window=None, doc_ids=None):
        if window is not None or doc_ids is not None:
            raise NotImplementedError("flash_attn peer: plain (causal) attention only")
        return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)  # (B, T, H, D) like ours
    return attention


def _liger_layer_norm() -> Callable:
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
        if weight is None or bias is None or residual is not None:
            raise NotImplementedError("liger_kernel peer: affine LayerNorm without residual only")
        return LigerLayerNormFunction.apply(x, weight, bias, eps)
    return layer_norm


# peer package -> (the op it covers, a builder of that op's callable)
PACKAGES = {"flash_attn": ("attention", _flash_attn), "liger_kernel": ("layer_norm", _liger_layer_norm)}


def providers(op: str, device: torch.device, compile: bool = True) -> tuple[list[Provider], list[dict]]:
    """Everything that can compute `op` here, and the peers skipped (with the reason)."""
    found, skipped = [], []
    for name in registry.backends(op):
        needs = registry.needs_triton(op, name)
        if needs and registry.interpreting():
            found.append(Provider(name, _fixed(registry.resolve(op, name)), timed=False, note=INTERPRETER_NOTE))
        elif needs and device.type != "cuda":
            found.append(Provider(name, None, note="needs a CUDA device (or TRITON_INTERPRET=1)"))
        else:
            found.append(Provider(name, _fixed(registry.resolve(op, name, device=device))))
    if op == "attention" and "sdpa" in registry.backends(op):
        for name, backend in _sdpa_backends().items():
            if device.type == "cuda":
                found.append(Provider(name, _fixed(registry.resolve(op, "sdpa")),
                                      scope=functools.partial(_sdpa_kernel_only, backend)))
            else:
                skipped.append({"op": op, "provider": name, "reason": "SDPA kernel choice is CUDA only"})
    if compile:
        found.append(Provider(COMPILE, _compiled(registry.resolve(op, BASELINE)), scope=_keep_saved_buffers))
    else:
        skipped.append({"op": op, "provider": COMPILE, "reason": "--no-compile"})
    for package, (package_op, build) in PACKAGES.items():
        if package_op != op:
            continue
        if importlib.util.find_spec(package) is None:
            skipped.append({"op": op, "provider": package, "reason": f"{package} not installed"})
        elif device.type != "cuda":
            skipped.append({"op": op, "provider": package, "reason": f"{package} needs CUDA"})
        else:
            try:
                found.append(Provider(package, _fixed(build())))
            except Exception as exc:  # an installed but broken package: say why, keep going
                skipped.append({"op": op, "provider": package, "reason": describe_error(exc)})
    return found, skipped


# ----------------------------------------------------------------------------------------------
# Timing, memory and the device's ceilings


@dataclass(frozen=True)
class Timer:
    """Median milliseconds of a no-argument callable: triton.testing.do_bench on CUDA (which
    also flushes L2 between calls), a time.perf_counter loop on the CPU."""
    device: torch.device
    quick: bool = False

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "triton.testing.do_bench median; L2 flushed and inputs rotated across copies"
        return "CPU TIMES: wall-clock median of time.perf_counter loops on the CPU, not GPU speed"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench
            warmup, rep = (5, 20) if self.quick else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        budget_s = 0.05 if self.quick else 0.5
        fn()  # warm-up: first-call allocations and lazy initialization
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at the peak of one call of `fn`, above what was allocated before it (the
    inputs); None on the CPU, which has no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def ceilings(device: torch.device, dtype: torch.dtype, timer: Timer) -> dict:
    """What this device reaches on the simplest kernels, measured now with the same timer: GB/s
    of a large device-to-device copy (read + write) and TFLOP/s of a large matmul in `dtype`."""
    cuda = device.type == "cuda"
    copy_bytes = (256 << 20 if timer.quick else 1 << 30) if cuda else (16 << 20 if timer.quick else 256 << 20)
    n = (4096 if timer.quick else 8192) if cuda else (512 if timer.quick else 1024)
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    del src, dst
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    matmul_ms = timer(lambda: a @ b)
    del a, b
    free_memory(device)
    return {"copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9, "copy_bytes": copy_bytes,
            "matmul_tflops": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e12,
            "matmul": f"{n}x{n} @ {n}x{n} {str(dtype).removeprefix('torch.')}"}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def input_sets(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[InputSet]:
    """Random input sets of `case` to rotate through while timing: on CUDA enough that together
    they overflow L2 four times (at most MAX_COPIES), one on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    first = make_inputs(case, dtype, device, gen)
    copies = 1
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        copies = max(1, min(MAX_COPIES, math.ceil(4 * l2 / first.nbytes)))
    return [first] + [make_inputs(case, dtype, device, gen) for _ in range(copies - 1)]


def runner(mode: str, fn: Callable, sets: list[InputSet], kwargs: dict) -> Callable[[], object]:
    """A no-argument callable running `mode` once, on the next input set in turn. Gradients come
    from torch.autograd.grad (nothing accumulates into .grad); `bwd` reuses graphs built here."""
    turn = itertools.cycle(range(len(sets)))
    if mode == "fwd":
        return lambda: fn(*sets[next(turn)].args, **kwargs)
    if mode == "bwd":
        outs = [fn(*s.args, **kwargs) for s in sets]

        def backward() -> object:
            i = next(turn)
            return torch.autograd.grad(outs[i], sets[i].args, sets[i].dout, retain_graph=True)
        return backward

    def forward_backward() -> object:
        s = sets[next(turn)]
        return torch.autograd.grad(fn(*s.args, **kwargs), s.args, s.dout)
    return forward_backward


# ----------------------------------------------------------------------------------------------
# Running the sweep


def run_op(op: str, *, device: torch.device, dtype: torch.dtype, quick: bool, timer: Timer,
           ceiling: dict, compile: bool = True, seed: int = 0,
           log: Callable[[str], None] = lambda message: None) -> tuple[list[dict], list[dict]]:
    """Rows for every (case, provider, mode) of `op`, and the peers skipped here. Providers that
    are only checked for correctness (the interpreter) run on the tiny case alone."""
    found, skipped = providers(op, device, compile)
    for s in skipped:
        log(f"[{op}] skipping {s['provider']}: {s['reason']}")
    cases = sweep(op, quick)
    tiny = sweep(op, quick=True)[0]
    if any(not p.timed for p in found) and tiny not in cases:
        cases.insert(0, tiny)
    rows = []
    for i, case in enumerate(cases):
        log(f"[{op} {i + 1}/{len(cases)}] {case.shape}")
        here = [p for p in found if p.timed or case == tiny]
        rows += run_case(case, here, device=device, dtype=dtype, timer=timer, ceiling=ceiling,
                         seed=seed + i, log=log)
    return rows, skipped


def run_case(case: Case, found: list[Provider], *, device: torch.device, dtype: torch.dtype, timer: Timer,
             ceiling: dict, seed: int = 0, log: Callable[[str], None] = lambda message: None) -> list[dict]:
    """Rows of one case: every provider on the same inputs, errors against one reference."""
    sets = input_sets(case, dtype, device, seed)
    try:
        ref = reference(case, sets[0], reference_dtype(dtype, device))
    except Exception as exc:  # e.g. out of memory: the rows keep their times, errors say why not
        ref = describe_error(exc)
        log(f"  reference failed: {ref}")
    free_memory(device)
    rows: list[dict] = []
    for p in found:
        with p.scope():
            rows += _measure(case, p, sets, ref, device=device, dtype=dtype, timer=timer, ceiling=ceiling, log=log)
        free_memory(device)
    _compare(rows, tolerance(dtype, device))
    return rows


def _measure(case: Case, p: Provider, sets: list[InputSet], ref: tuple | str, *, device: torch.device,
             dtype: torch.dtype, timer: Timer, ceiling: dict, log: Callable[[str], None]) -> list[dict]:
    rows = {mode: blank_row(op=case.op, provider=p.name, mode=mode, series=case.series, shape=case.shape,
                            size=case.size, dtype=str(dtype).removeprefix("torch."), note=p.note)
            for mode in MODES}
    if p.make is None:
        log(f"  {p.name:<16} {p.note}")
        return list(rows.values())
    kwargs = op_kwargs(case)
    try:
        fn = p.make()
        out = fn(*sets[0].args, **kwargs)
        grads = torch.autograd.grad(out, sets[0].args, sets[0].dout)
        errors = {} if isinstance(ref, str) else {
            "err_out": rel_err(out, ref[0]), "err_grad": max(rel_err(g, r) for g, r in zip(grads, ref[1]))}
        del out, grads
    except Exception as exc:
        note = describe_error(exc)
        log(f"  {p.name:<16} cannot run: {note}")
        for row in rows.values():
            row["note"] = _join(p.note, note)
        return list(rows.values())
    for row in rows.values():
        row.update(errors)
        row["note"] = _join(row["note"], f"no errors: reference failed ({ref})" if isinstance(ref, str) else "")
    if not p.timed:
        log(f"  {p.name:<16} {p.note}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        return list(rows.values())
    for mode, row in rows.items():
        try:
            ms = timer(runner(mode, fn, sets, kwargs))
            peak = peak_mb(runner(mode, fn, sets[:1], kwargs), device)
        except Exception as exc:
            row["note"] = _join(row["note"], describe_error(exc))
            log(f"  {p.name:<16} {mode:<8} failed: {row['note']}")
            free_memory(device)
            continue
        unit, amount = work(case, mode, dtype)
        rate = amount / (ms * 1e-3) / (1e12 if unit == "tflops" else 1e9)
        top = ceiling["matmul_tflops" if unit == "tflops" else "copy_gbps"]
        row.update({"ms": ms, unit: rate, "pct_peak": 100 * rate / top, "peak_mem_mb": peak})
        log(f"  {p.name:<16} {mode:<8} {ms:10.4f} ms  {rate:8.2f} {'TFLOP/s' if unit == 'tflops' else 'GB/s'}")
    return list(rows.values())


def _compare(rows: list[dict], tol: float) -> None:
    """Speedups over BASELINE, and a flag on rows whose error exceeds max(tol, 2x BASELINE's own
    error). Non-finite errors are flagged and become None (JSON has no inf)."""
    base = {r["mode"]: r for r in rows if r["provider"] == BASELINE}
    limits = {}
    for key in ("err_out", "err_grad"):
        own = [r[key] for r in base.values() if r[key] is not None and math.isfinite(r[key])]
        limits[key] = max(tol, 2 * max(own)) if own else tol
    for row in rows:
        ref = base.get(row["mode"])
        if ref is not None and ref["ms"] and row["ms"]:
            row["speedup"] = ref["ms"] / row["ms"]
        for key, limit in limits.items():
            err = row[key]
            if err is not None and not err <= limit:  # also catches NaN
                row["note"] = _join(row["note"], f"{FLAG} ({key} {err:.2e} > {limit:.1e})")
                row[key] = err if math.isfinite(err) else None


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
