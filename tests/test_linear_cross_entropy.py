"""The `linear_cross_entropy` op (kernels/linear_cross_entropy_spec.py: checks, `torch` reference;
kernels/linear_cross_entropy_backends.py: `chunked`; kernels/linear_cross_entropy.py: the fused
Triton kernels): every backend against an independent float64 loss written out from log-softmax,
the ignore / all-ignored / label-smoothing / padding-row semantics, poisoned outputs, strided
inputs, bad input, the memory claim (no logits tensor beyond the chunk budget), and the op inside
a real GPT training step (tied embedding).

    python -m pytest -q tests/test_linear_cross_entropy.py            # CPU: Triton interpreter, fp32/fp16
    python -m pytest -q -m slow tests/test_linear_cross_entropy.py    # + GPU tiles at GPT-2 vocab, compile, RSS
    python -m pytest -q -m gpu tests/test_linear_cross_entropy.py     # GPU: bf16, GPT-2 sizes, peak memory
"""

import pytest
import torch
from _util import assert_rel_close, poison, rel_err, tol
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import compile_report, registry
from tritongpt.kernels import linear_cross_entropy as lce
from tritongpt.kernels import linear_cross_entropy_backends as backends
from tritongpt.kernels import linear_cross_entropy_configs as lce_configs
from tritongpt.kernels import linear_cross_entropy_spec as spec
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPT

OP = "linear_cross_entropy"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [n for n in registry.backends(OP) if registry.usable(OP, n, DEVICE)]

# (N rows, C, V predicted, V_padded weight rows): vocabularies that are no multiple of any block,
# N no multiple of BLOCK_M, C no multiple of BLOCK_K / BLOCK_C
SHAPES = {"V=97": (37, 24, 97, 128), "V=1000": (29, 40, 1000, 1024), "V=50257": (9, 16, 50257, 50304)}


def inputs(n, c, vocab, padded, dtype, seed=0, ignore_every=4):
    """x, weight (logits of std ~2), targets over the whole vocabulary with every
    `ignore_every`-th row ignored (-1), and a loss gradient that is not 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    weight = (torch.randn(padded, c, generator=g, dtype=torch.float64) * 2 * c ** -0.5).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[-1] = vocab - 1  # the last real row
    if ignore_every:
        targets[::ignore_every] = -1
    return x, weight, targets.to(DEVICE), 0.75


def textbook(x, weight, targets, ignore_index=-1, label_smoothing=0.0, vocab_limit=None):
    """The loss in float64 from log-softmax written out (independent of F.cross_entropy): the mean
    over rows not ignored of (1 - s) * -logp[target] + s * mean(-logp) over the V real logits."""
    vocab = vocab_limit or weight.shape[0]
    logits = x.reshape(-1, x.shape[-1]) @ weight[:vocab].T
    logp = logits - logits.logsumexp(-1, keepdim=True)
    t = targets.reshape(-1)
    kept = t != ignore_index
    nll = -logp[kept].gather(1, t[kept].long()[:, None]).squeeze(1)
    return ((1 - label_smoothing) * nll - label_smoothing * logp[kept].mean(-1)).sum() / kept.sum()


def run(fn, x, weight, targets, dloss, **options):
    """(loss, dx, dweight) of fn on fresh leaves, gradients along dloss."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(x, weight, targets, **options)
    dx, dw = torch.autograd.grad(loss, (x, weight), torch.tensor(dloss, dtype=loss.dtype, device=loss.device))
    return loss.detach(), dx, dw


def expected(x, weight, targets, dloss, **options):
    return run(textbook, x.double(), weight.double(), targets, dloss, **options)


def assert_close_to_float64(got, want, dtype, what):
    limit = tol(dtype, tf32=DEVICE.type == "cuda")
    for name, a, b in zip(("loss", "dx", "dweight"), got, want):
        assert_rel_close(a, b, limit, f"{what} {name}")


@pytest.fixture
def chunk_rows(monkeypatch):
    """Set `chunked` to `rows` rows of logits per chunk for a vocabulary `vocab`."""
    def set_rows(rows: int, vocab: int) -> None:
        monkeypatch.setattr(backends, "CHUNK_ELEMENTS", rows * vocab)
        assert backends.chunk_rows(vocab) == rows
    return set_rows


# ---- against float64 ----------------------------------------------------------------------------

def _float64_params():
    """Every backend, shape, dtype and smoothing; the triton backend under the interpreter both with
    the tiles it uses there (wide vocabulary tiles) and with the GPU's. At GPT-2's vocabulary the
    GPU tiles take ~25 s in the interpreter (slow). The `torch` reference is left out there: its
    fp32 dx (PyTorch's own log-softmax backward and matmul) is 1.3e-5 from float64 at V=50257,
    past the fp32 limit; it is what the model computed before."""
    for name in BACKENDS:
        tile_choices = ("interpreter", "gpu") if name == "triton" and registry.interpreting() else ("",)
        for shape in [s for s in SHAPES if name != "torch" or s != "V=50257"]:
            for dtype in (torch.float32, torch.float16):
                for smoothing in (0.0, 0.2):
                    for tiles in tile_choices:
                        slow = (shape == "V=50257" and name == "triton"
                                and (tiles == "gpu" or (dtype == torch.float32) != (smoothing > 0)))
                        label = f"{name}-{shape}-{str(dtype)[6:]}-s{smoothing}" + (f"-{tiles}" if tiles else "")
                        yield pytest.param(name, shape, dtype, smoothing, tiles, id=label,
                                           marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("name, shape, dtype, label_smoothing, tiles", list(_float64_params()))
def test_loss_and_gradients_match_float64(name, shape, dtype, label_smoothing, tiles, chunk_rows, monkeypatch):
    n, c, vocab, padded = SHAPES[shape]
    chunk_rows(5, vocab)  # several chunks, the last one short
    if tiles == "gpu":
        monkeypatch.setattr(lce_configs, "launch_tiles",
                            lambda dtype, precision, rows: lce_configs.tiles_for(dtype, precision))
    x, weight, targets, dloss = inputs(n, c, vocab, padded, dtype)
    options = dict(ignore_index=-1, label_smoothing=label_smoothing, vocab_limit=vocab)
    got = run(registry.resolve(OP, name), x, weight, targets, dloss, **options)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert_close_to_float64(got, expected(x, weight, targets, dloss, **options), dtype, f"{name} {shape}")
    assert (got[2][vocab:] == 0).all(), "padding rows of the weight got a gradient"


@pytest.mark.parametrize("name", BACKENDS)
def test_ignore_index_any_value_and_padding_rows(name):
    """A class id as ignore_index (its rows add nothing and get no gradient), and huge padding rows
    of the weight, which would dominate the softmax if they leaked into it."""
    n, c, vocab, padded = SHAPES["V=97"]
    x, weight, targets, dloss = inputs(n, c, vocab, padded, torch.float32, ignore_every=0)
    targets[::3] = 5
    weight[vocab:] = 100.0
    options = dict(ignore_index=5, label_smoothing=0.1, vocab_limit=vocab)
    got = run(registry.resolve(OP, name), x, weight, targets, dloss, **options)
    assert_close_to_float64(got, expected(x, weight, targets, dloss, **options), torch.float32, name)
    assert (got[1][targets == 5] == 0).all(), "an ignored row got a gradient"
    assert (got[2][vocab:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", BACKENDS)
def test_all_ignored_batch_is_zero_loss_and_zero_gradients(name, dtype):
    n, c, vocab, padded = SHAPES["V=97"]
    x, weight, targets, dloss = inputs(n, c, vocab, padded, dtype)
    targets.fill_(-1)
    loss, dx, dw = run(registry.resolve(OP, name), x, weight, targets, dloss, vocab_limit=vocab, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("name", BACKENDS)
def test_batched_strided_inputs_and_int32_targets(name):
    """x (B, T, C) and weight as column slices of wider tensors (row stride > C), targets a strided
    int32 view: the same loss and gradients as contiguous inputs, in x's shape."""
    b, t, c, vocab, padded = 3, 5, 24, 97, 128
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, t, c + 8, generator=g).to(DEVICE)[..., :c]
    weight = (torch.randn(padded, c + 16, generator=g) * c ** -0.5).to(DEVICE)[:, :c]
    targets = torch.randint(0, vocab, (b, 2 * t), generator=g, dtype=torch.int32).to(DEVICE)[:, ::2]
    targets[0, 1] = -1
    got = run(registry.resolve(OP, name), x, weight, targets, 1.5, vocab_limit=vocab)
    assert got[1].shape == (b, t, c)
    assert_close_to_float64(got, expected(x, weight, targets, 1.5, vocab_limit=vocab), torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_writes_every_output(monkeypatch, dtype):
    """Every tensor the kernels write (row losses, lse, dx / dweight and their fp32 accumulators)
    starts as NaN: an element a kernel skips fails the comparison."""
    monkeypatch.setattr(lce, "_empty", lambda shape, dt, device: poison(torch.empty(shape, dtype=dt, device=device)))
    n, c, vocab, padded = SHAPES["V=1000"]
    x, weight, targets, dloss = inputs(n, c, vocab, padded, dtype)
    options = dict(ignore_index=-1, label_smoothing=0.1, vocab_limit=vocab)
    got = run(lce.linear_cross_entropy, x, weight, targets, dloss, **options)
    assert_close_to_float64(got, expected(x, weight, targets, dloss, **options), dtype, "triton")


# ---- bad input ----------------------------------------------------------------------------------

def _bad(what, x, weight, targets):
    """(x, weight, targets, options, error pattern): input `what` that every backend must refuse."""
    opts = dict(vocab_limit=97)
    out_of_range = targets.clone()
    out_of_range[3] = 97  # a padding row: never predicted
    negative = targets.clone()
    negative[0] = -3
    return {
        "scalar x": (x[0, 0], weight, targets, opts, r"x must be a \(\.\.\., C\)"),
        "weight width": (x, weight[:, :-1], targets, opts, r"weight must be \(vocab, 24\)"),
        "weight dtype": (x, weight.half(), targets, opts, "dtype"),
        "float targets": (x, weight, targets.float(), opts, "targets must be an integer tensor"),
        "targets shape": (x, weight, targets[:-1], opts, "targets shape"),
        "target in padding": (x, weight, out_of_range, opts, r"token ids in \[0, 97\).*e\.g\. 97"),
        "negative target": (x, weight, negative, opts, r"token ids in \[0, 97\).*e\.g\. -3"),
        "vocab_limit": (x, weight, targets, dict(vocab_limit=129), "vocab_limit"),
        "label_smoothing": (x, weight, targets, dict(vocab_limit=97, label_smoothing=1.0), "label_smoothing"),
    }[what]


BAD = ["scalar x", "weight width", "weight dtype", "float targets", "targets shape", "target in padding",
       "negative target", "vocab_limit", "label_smoothing"]


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come before it."""
    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")
    for kernel in ("_lce_fwd_kernel", "_lce_bwd_dx_kernel", "_lce_bwd_dw_kernel"):
        monkeypatch.setattr(lce, kernel, Refuse())


@pytest.mark.parametrize("what", BAD)
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_is_one_clear_error(name, what, no_launch):
    x, weight, targets, _ = inputs(*SHAPES["V=97"], torch.float32)
    bad_x, bad_weight, bad_targets, options, pattern = _bad(what, x, weight, targets)
    with pytest.raises(TritonGPTError, match=pattern):
        registry.resolve(OP, name)(bad_x.requires_grad_(), bad_weight, bad_targets, **options)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's device rules; CUDA has its own")
def test_triton_refuses_float64_and_strided_columns(no_launch):
    x, weight, targets, _ = inputs(*SHAPES["V=97"], torch.float32)
    with pytest.raises(TritonGPTError, match="fp32/fp16/bf16"):
        lce.linear_cross_entropy(x.double(), weight.double(), targets, vocab_limit=97)
    with pytest.raises(TritonGPTError, match="contiguous in its last dim"):
        lce.linear_cross_entropy(torch.randn(37, 48)[:, ::2], weight, targets, vocab_limit=97)


# ---- memory: no logits beyond the chunk budget --------------------------------------------------

class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) any op allocates: outputs that alias no input."""

    def __init__(self):
        super().__init__()
        self.elements, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                elements = t.untyped_storage().nbytes() // t.element_size()
                if elements > self.elements:
                    self.elements, self.op = elements, str(func)
        return out


def largest_allocation(name, x, weight, targets):
    """The largest allocation of forward + backward of backend `name`. The triton backend runs its
    launchers directly: inside a custom op a dispatch mode sees only the op's outputs."""
    options = (-1, 0.1, 1000)  # ignore_index, label_smoothing, vocab
    with LargestAllocation() as seen:
        if name == "triton":
            loss, lse, divisor = lce.linear_cross_entropy_fwd(x, weight, targets, *options)
            lce.linear_cross_entropy_bwd(torch.ones_like(loss), x, weight, targets, lse, divisor, *options)
        else:
            x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = registry.resolve(OP, name)(x, weight, targets, -1, 0.1, 1000)
            loss.backward()
    return seen


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU test of the allocation pattern")
def test_memory_no_tensor_of_chunk_times_vocab_beyond_the_budget(chunk_rows):
    """Forward and backward of `chunked` allocate nothing larger than its chunk of logits (32 x V
    here), and the fused `triton` (interpreter) nothing larger than x or the weight; the `torch`
    reference, recorded the same way, allocates the whole (N, V) logits (the check can fail)."""
    n, c, vocab, padded = 512, 16, 1000, 1024
    chunk_rows(32, vocab)
    x, weight, targets, _ = inputs(n, c, vocab, padded, torch.float32)
    budget = 32 * vocab
    chunked = largest_allocation("chunked", x, weight, targets)
    assert chunked.elements <= budget, f"chunked allocated {chunked.elements} elements in {chunked.op}"
    fused = largest_allocation("triton", x, weight, targets)
    assert fused.elements <= max(x.numel(), weight.numel()), f"triton allocated {fused.elements} in {fused.op}"
    assert largest_allocation("torch", x, weight, targets).elements >= n * vocab


# ---- in a GPT -----------------------------------------------------------------------------------

def gpt_config(**overrides):
    return GPTConfig(**{**dict(vocab_size=128, real_vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32,
                               backend="torch"), **overrides})


def gpt_batch(seed=1, b=2, t=16):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 100, (b, t), generator=g)
    targets = torch.roll(idx, -1, dims=1)  # predicts tokens it also embeds: both uses of the tied rows
    targets[0, :3] = -1
    return idx.to(DEVICE), targets.to(DEVICE)


@pytest.mark.parametrize("name", BACKENDS)
def test_tied_embedding_gradient_in_a_model_step(name):
    """The lm_head weight is the token embedding: its gradient (from the loss op) adds to the
    embedding lookup's, and the whole model's gradients match the float64 all-torch model."""
    torch.manual_seed(0)
    ref = GPT(gpt_config()).double()
    model = GPT(gpt_config(linear_cross_entropy=name)).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx, targets = gpt_batch()
    _, ref_loss = ref(idx.cpu(), targets.cpu())
    ref_loss.backward()
    logits, loss = model(idx, targets)
    loss.backward()
    assert logits is None and model.backend_names()[OP] == name
    assert_rel_close(loss, ref_loss, tol(torch.float32, tf32=DEVICE.type == "cuda"), "loss")
    ref_grads = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        assert_rel_close(p.grad, ref_grads[pname].grad, tol(torch.float32, tf32=DEVICE.type == "cuda"), pname)
    wte = model.transformer.wte.weight.grad
    assert (wte[100:] == 0).all() and (wte[idx.unique()].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_model_with_all_targets_ignored_has_zero_loss_and_gradients(name):
    model = GPT(gpt_config(linear_cross_entropy=name)).to(DEVICE)
    idx, _ = gpt_batch()
    _, loss = model(idx, torch.full_like(idx, -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_training_steps_agree_across_backends():
    """Three AdamW steps from the same weights on the same batch with each loss backend: the
    losses of each step agree with the `torch` backend's (fp32)."""
    idx, targets = gpt_batch(t=16)

    def losses(name):
        torch.manual_seed(0)
        model = GPT(gpt_config(linear_cross_entropy=name)).to(DEVICE)
        optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), DEVICE.type)
        out = []
        for _ in range(3):
            _, loss = model(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    reference = losses("torch")
    assert reference[-1] < reference[0]
    for name in BACKENDS:
        got = losses(name)
        assert abs(got[0] - reference[0]) <= tol(torch.float32, tf32=DEVICE.type == "cuda") * reference[0], name
        for step, (a, b) in enumerate(zip(got, reference)):
            assert abs(a - b) <= 1e-4 * b, f"{name} step {step}: loss {a} vs torch {b}"


# ---- registration, compile report, torch.compile ---------------------------------------------------

def test_registered_backends_and_compile_variants():
    assert {"torch", "chunked", "triton"} <= set(registry.backends(OP))
    chunked, triton_backend = registry.backend(OP, "chunked"), registry.backend(OP, "triton")
    assert chunked.needs == "any" and chunked.deterministic
    assert triton_backend.needs == "triton" and triton_backend.deterministic
    variants = [v for v in compile_report.variants() if v.kernel.__name__.startswith("_lce_")]
    # the three kernels at the tiles the launchers pick: fp16, bf16, fp32 with tf32 and ieee dots
    assert len(variants) == 3 * 4
    for v in variants:
        dtype = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32}[v.signature["X"]]
        tiles = lce_configs.tiles_for(dtype, v.constexprs["INPUT_PRECISION"])
        assert (v.constexprs["BLOCK_M"], v.constexprs["BLOCK_V"], v.constexprs["BLOCK_K"], v.num_warps,
                v.num_stages) == (tiles.block_m, tiles.block_v, tiles.block_k, tiles.num_warps, tiles.num_stages)
        assert v.constexprs.get("BLOCK_C", tiles.block_c) == tiles.block_c


@pytest.mark.slow
def test_chunked_traces_under_torch_compile(chunk_rows):
    """torch.compile(fullgraph=True) traces `chunked` (its autograd.Function and chunk loop)."""
    n, c, vocab, padded = SHAPES["V=97"]
    chunk_rows(8, vocab)
    x, weight, targets, dloss = inputs(n, c, vocab, padded, torch.float32)
    compiled = torch.compile(backends.chunked, fullgraph=True, backend="aot_eager")
    got = run(compiled, x, weight, targets, dloss, vocab_limit=vocab, label_smoothing=0.1)
    assert_close_to_float64(got, expected(x, weight, targets, dloss, vocab_limit=vocab, label_smoothing=0.1),
                            torch.float32, "compiled chunked")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU's resident-memory measurement")
def test_step_benchmark_peak_resident_memory_per_loss_backend():
    """`tritongpt bench step` on a CPU: one fresh process per backend, and at GPT-2's vocabulary
    with 2048 tokens the chunked loss's peak is far under the full logits' (here: ~1000 MB apart,
    each process's peak varying by ~100 MB from run to run, hence the 500 MB margin)."""
    from tritongpt.bench import step

    peaks = {}
    for name in ("torch", "chunked"):
        combo = step.Combo(name, (("attention", "sdpa"), ("layer_norm", "torch"), ("mlp", "torch"), (OP, name)), False)
        peaks[name] = step.fresh_process_peak_rss_mb(combo, "tiny", 32, 64, torch.float32, seed=0)
    assert 0 < peaks["chunked"] < peaks["torch"] - 500, peaks


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_gpt2_sizes_error_and_peak_memory():
    """bf16 at B*T = 4096, C = 768, GPT-2's vocabulary: each backend within the bf16 tolerance of
    float64 and at most 2x the error of the torch reference in bf16; the fused and chunked backends'
    extra memory (above the inputs) at most a quarter of the torch reference's."""
    n, c, vocab, padded = 4096, 768, spec.GPT2_VOCAB, spec.GPT2_VOCAB_PADDED
    x, weight, targets, dloss = inputs(n, c, vocab, padded, torch.bfloat16)
    options = dict(vocab_limit=vocab)
    want = expected(x, weight, targets, dloss, **options)
    peaks, errors = {}, {}
    for name in BACKENDS:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        got = run(registry.resolve(OP, name), x, weight, targets, dloss, **options)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        errors[name] = [rel_err(a, b) for a, b in zip(got, want)]
        for what, err in zip(("loss", "dx", "dweight"), errors[name]):
            assert err <= tol(torch.bfloat16), f"{name} {what}: {err}"
        del got
    for name in BACKENDS:
        for what, ours, theirs in zip(("loss", "dx", "dweight"), errors[name], errors["torch"]):
            assert ours <= 2 * theirs, f"{name} {what}: {ours} > 2x torch's {theirs}"
    for name in ("chunked", "triton"):
        assert peaks[name] <= 0.25 * peaks["torch"], (name, peaks)
