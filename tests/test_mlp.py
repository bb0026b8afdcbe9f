"""The Triton GELU MLP (kernels/mlp.py) against the torch reference run in float64: output and
every gradient, both GELU forms, both recompute modes, with and without biases and residual.
On CPU the kernels run in the Triton interpreter (fp32, fp16); `-m gpu` adds bf16 and GPT-2 sizes.

    python -m pytest -q tests/test_mlp.py
    python -m pytest -q -m gpu tests/test_mlp.py
"""

import pytest
import torch
import torch.nn.functional as F
from _util import assert_rel_close, poison, rel_err, tol

import tritongpt
from tritongpt.errors import TritonGPTError
from tritongpt.kernels import mlp, mlp_spec, registry


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every Triton output (h, a, y, dH, dx) starts as NaN, so an element a kernel fails to write
    fails the comparison."""
    allocate = mlp._empty
    monkeypatch.setattr(mlp, "_empty", lambda rows, cols, like: poison(allocate(rows, cols, like)))


def make_inputs(lead, c, hid, dtype, device, seed, bias=True, residual=True):
    """Fresh random x (*lead, C), nn.Linear-layout weights scaled 1/sqrt(fan_in), biases, residual."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return dict(x=rand(*lead, c), w1=rand(hid, c, scale=c ** -0.5), b1=rand(hid) if bias else None,
                w2=rand(c, hid, scale=hid ** -0.5), b2=rand(c) if bias else None,
                residual=rand(*lead, c) if residual else None)


def run(fn, inputs, dy, **kwargs):
    """y = fn(**inputs, **kwargs) and the gradients of <y, dy> wrt every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y = fn(**{**inputs, **leaves}, **kwargs)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def check_against_reference(inputs, approximate, recompute, dtype):
    g = torch.Generator().manual_seed(1234)
    x = inputs["x"]
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, dtype)
    y, grads = run(mlp.gelu_mlp, inputs, dy, approximate=approximate, recompute=recompute)
    inputs64 = {k: v.double() if v is not None else None for k, v in inputs.items()}
    y64, grads64 = run(mlp_spec.reference, inputs64, dy.double(), approximate=approximate)
    assert_rel_close(y, y64, tol(dtype), "y")
    assert grads.keys() == grads64.keys()
    for name in grads64:
        assert_rel_close(grads[name], grads64[name], tol(dtype), f"d{name}")


# (leading dims of x, C, Hid, approximate, recompute, biases, residual): M, C and Hid cover 1, 17,
# 100, 768, non-multiples of 16 and block multiples; each of them is K or N in one of the matmuls.
CASES = [
    ((1,), 17, 100, "tanh", False, True, True),
    ((17,), 100, 768, "none", True, True, False),
    ((4, 25), 768, 17, "tanh", True, False, True),
    ((768,), 17, 1, "none", False, False, False),
    ((2, 32), 128, 512, "tanh", False, True, False),
    ((3, 7), 48, 200, "none", False, True, True),
    ((5,), 33, 96, "tanh", True, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,c,hid,approximate,recompute,bias,residual", CASES,
                         ids=[f"{'x'.join(map(str, k[0]))}-C{k[1]}-H{k[2]}-{k[3]}-{'recompute' if k[4] else 'keep'}"
                              f"{'-bias' if k[5] else ''}{'-res' if k[6] else ''}" for k in CASES])
def test_matches_float64_reference(lead, c, hid, approximate, recompute, bias, residual, dtype, device):
    inputs = make_inputs(lead, c, hid, dtype, device, seed=hash((lead, c, hid)) % 2**31, bias=bias,
                         residual=residual)
    check_against_reference(inputs, approximate, recompute, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-2u) = inf: sigmoid(2u) = 0, as meant
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_epilogues_over_wide_range(approximate, device):
    """gelu(h) and gelu'(h) from the epilogues, h in [-40, 40] (tails, and 0), vs float64 autograd."""
    h = torch.linspace(-40, 40, 801, dtype=torch.float64)
    ones = torch.ones(1, 3, dtype=torch.float32, device=device)
    act = mlp.fused_matmul(h[:, None].float().to(device), ones, epilogue="gelu", approximate=approximate)
    grad = mlp.fused_matmul(torch.ones(801, 1, device=device), ones, epilogue="gelu_grad",
                            aux=h[:, None].float().to(device).expand(801, 3).contiguous(), approximate=approximate)
    h64 = h.clone().requires_grad_()
    act64 = F.gelu(h64, approximate=approximate)
    act64.sum().backward()
    assert_rel_close(act, act64[:, None].expand(801, 3), tol(torch.float32), "gelu")
    assert_rel_close(grad, h64.grad[:, None].expand(801, 3), tol(torch.float32), "gelu'")


def test_strided_views_and_expanded_grad(device):
    """x and residual as column slices of wider tensors (row stride 2C, no copy), and the expanded
    (stride 0) dy that y.sum() sends back."""
    c, hid = 40, 72
    inputs = make_inputs((3, 11), 2 * c, hid, torch.float32, device, seed=7)
    inputs = {**inputs, "x": inputs["x"][..., :c], "residual": inputs["residual"][..., c:],
              "w1": inputs["w1"][:, :c].contiguous(), "w2": inputs["w2"][:c], "b2": inputs["b2"][:c]}
    assert inputs["x"].stride(-2) == 2 * c
    ys = {}
    for name, fn, dtype in (("triton", mlp.gelu_mlp, torch.float32), ("reference", mlp_spec.reference, torch.float64)):
        leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
        y = fn(**leaves)
        y.sum().backward()
        ys[name] = (y.detach(), {k: v.grad for k, v in leaves.items()})
    assert_rel_close(ys["triton"][0], ys["reference"][0], tol(torch.float32), "y")
    for k in inputs:
        assert_rel_close(ys["triton"][1][k], ys["reference"][1][k], tol(torch.float32), f"d{k}")


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_keeps_no_hidden_activations(recompute, device):
    """recompute=True saves no (M, Hid) tensor for backward; otherwise h and a are kept."""
    m, c, hid = 9, 16, 48
    inputs = make_inputs((m,), c, hid, torch.float32, device, seed=3, residual=False)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp.gelu_mlp(**leaves, recompute=recompute)
    assert saved.count((m, hid)) == (0 if recompute else 2)
    y.backward(torch.randn_like(y))
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


def test_empty_batch(device):
    inputs = make_inputs((0,), 16, 32, torch.float32, device, seed=5, residual=False)
    y, grads = run(mlp.gelu_mlp, inputs, torch.empty(0, 16, device=device))
    assert y.shape == (0, 16)
    assert all(g.abs().sum() == 0 for g in grads.values() if g.numel())


def test_torch_compile_fullgraph_traces_the_custom_ops(device):
    inputs = make_inputs((2, 5), 24, 40, torch.float32, device, seed=11)
    dy = torch.randn(2, 5, 24, device=device)
    compiled = torch.compile(mlp.gelu_mlp, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    for recompute in (False, True):
        y, grads = run(compiled, inputs, dy, recompute=recompute)
        y_eager, grads_eager = run(mlp.gelu_mlp, inputs, dy, recompute=recompute)
        assert torch.equal(y, y_eager)
        for k in grads_eager:
            assert torch.equal(grads[k], grads_eager[k]), k


def test_registered_backend():
    assert registry.resolve("mlp", "triton") is mlp.gelu_mlp
    assert tritongpt.gelu_mlp is mlp.gelu_mlp
    assert {"torch", "triton"} <= set(registry.backends("mlp"))


def _bad_inputs(device):
    ok = make_inputs((3, 4), 16, 32, torch.float32, device, seed=13)
    return [
        ("w1 must be", dict(ok, w1=ok["w1"][:, :8])),
        ("w2 must be", dict(ok, w2=ok["w2"].t().contiguous())),
        ("b1 must be", dict(ok, b1=ok["b1"][:5])),
        ("b2 must be", dict(ok, b2=ok["b2"][None])),
        ("residual shape", dict(ok, residual=ok["residual"][:2])),
        ("dtype", dict(ok, w2=ok["w2"].half())),
        ("float64", {k: v.double() for k, v in ok.items()}),
        ("contiguous in its last dim", dict(ok, w1=ok["w2"].t())),
        ("is on meta", dict(ok, b1=ok["b1"].to("meta"))),
        ("last dim >= 1", dict(ok, x=ok["x"][..., :0], w1=ok["w1"][:, :0], w2=ok["w2"][:0], b2=ok["b2"][:0],
                               residual=ok["residual"][..., :0])),
        ("approximate", dict(ok, approximate="exact")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))),
                         ids=[name for name, _ in _bad_inputs("cpu")])
def test_bad_input_raises_before_launch(case, device, monkeypatch):
    message, kwargs = _bad_inputs(device)[case]

    def no_output(*args):
        raise AssertionError("an output was allocated before the input check")

    monkeypatch.setattr(mlp, "_empty", no_output)
    with pytest.raises(TritonGPTError, match=message):
        mlp.gelu_mlp(**kwargs)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("c", [768, 1600, 4096])
@pytest.mark.parametrize("approximate,recompute,residual", [("tanh", False, True), ("none", True, False)])
def test_gpt2_sizes_within_twice_pytorch_error(c, approximate, recompute, residual, dtype, device):
    """M = 16384 rows (8 x 2048 tokens), Hid = 4C: our error vs float64 is within the dtype's
    tolerance and at most twice PyTorch's own error in the same precision."""
    inputs = make_inputs((8, 2048), c, 4 * c, dtype, device, seed=c, residual=residual)
    dy = torch.randn(8, 2048, c, device=device, dtype=dtype)
    y, grads = run(mlp.gelu_mlp, inputs, dy, approximate=approximate, recompute=recompute)
    y_torch, grads_torch = run(mlp_spec.reference, inputs, dy, approximate=approximate)
    inputs64 = {k: v.double() if v is not None else None for k, v in inputs.items()}
    y64, grads64 = run(mlp_spec.reference, inputs64, dy.double(), approximate=approximate)
    for name, ours, theirs, exact in [("y", y, y_torch, y64)] + [
            (f"d{k}", grads[k], grads_torch[k], grads64[k]) for k in grads64]:
        assert_rel_close(ours, exact, tol(dtype), name)
        assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact), (
            f"{name}: error {rel_err(ours, exact):.3g} > 2x PyTorch's {rel_err(theirs, exact):.3g}")


@pytest.mark.gpu
def test_fp32_on_gpu_and_deterministic(device):
    """fp32 at a GPT-2 size: under PyTorch's default float32 matmul precision ('highest') the dots
    are ieee, not tf32, so 1e-5 holds; two runs give bitwise equal results."""
    inputs = make_inputs((4, 1024), 768, 3072, torch.float32, device, seed=1)
    check_against_reference(inputs, "tanh", False, torch.float32)
    dy = torch.randn(4, 1024, 768, device=device)
    first, second = (run(mlp.gelu_mlp, inputs, dy) for _ in range(2))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
