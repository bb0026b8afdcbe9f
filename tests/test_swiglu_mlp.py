"""The Triton SwiGLU MLP (kernels/swiglu_mlp.py) against the torch reference run in float64: output
and every gradient, both recompute modes, with and without residual, on both fused-kernel paths (TMA
descriptors, pointers). On CPU the kernels run in the Triton interpreter (fp32, fp16), which runs
tensor descriptors too; `-m gpu` adds bf16 and Llama sizes.

    python -m pytest -q tests/test_swiglu_mlp.py
    python -m pytest -q -m slow tests/test_swiglu_mlp.py
    python -m pytest -q -m gpu tests/test_swiglu_mlp.py
"""

import pytest
import torch
import torch.nn.functional as F
from _util import FusedMLP, assert_bitwise_equal, assert_rel_close, fixed_dy, seeded_randn, tol

import tritongpt
from tritongpt.errors import TritonGPTError
from tritongpt.kernels import mlp, registry, swiglu_mlp, swiglu_mlp_spec

OP = swiglu_mlp_spec.OP
SWIGLU_MLP = FusedMLP(swiglu_mlp, swiglu_mlp.swiglu_mlp, swiglu_mlp_spec.reference)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every Triton output (H, G, U, dG, dU) starts as NaN, so an element a kernel fails to write
    fails the comparison."""
    SWIGLU_MLP.poison_allocations(monkeypatch)


@pytest.fixture
def launched(monkeypatch):
    """The paths ("tma" / "pointer") the fused kernels ran on, one entry per launch."""
    return SWIGLU_MLP.record_launch_paths(monkeypatch)


@pytest.fixture(params=["tma", "pointer"])
def path(request, monkeypatch):
    """"tma": the automatic choice (here, the interpreter: TMA wherever descriptors can address the
    operands); "pointer": the pointer kernel forced, as on sm_80 (the choice is the GELU MLP's)."""
    if request.param == "pointer":
        monkeypatch.setattr(mlp, "choose_path", lambda *tensors: "pointer")
    return request.param


def make_inputs(lead, c, f, dtype, device, seed, residual=True):
    """Fresh random x (*lead, C), nn.Linear-layout weights scaled 1/sqrt(fan_in), residual."""
    rand = seeded_randn(seed, device, dtype)
    return dict(x=rand(*lead, c), w_gate=rand(f, c, scale=c ** -0.5), w_up=rand(f, c, scale=c ** -0.5),
                w_down=rand(c, f, scale=f ** -0.5), residual=rand(*lead, c) if residual else None)


# (leading dims of x, C, F, recompute, residual): M, C and F cover 1, 17, 100, non-multiples of 16
# and block multiples; each is K or N in one of the fused GEMMs. Widths that are multiples of 8 (4 in
# fp32) run the TMA kernel; M = 37 and 64 give it more tiles than programs, K = 40 a partial K block.
CASES = [
    ((1,), 17, 100, False, True),
    ((17,), 100, 256, True, False),
    ((4, 25), 256, 17, True, True),
    ((200,), 17, 1, False, False),
    ((2, 32), 128, 344, False, False),
    ((3, 7), 48, 200, False, True),
    ((37,), 40, 72, False, True),
    ((37,), 40, 72, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,c,f,recompute,residual", CASES,
                         ids=[f"{'x'.join(map(str, k[0]))}-C{k[1]}-F{k[2]}-{'recompute' if k[3] else 'keep'}"
                              f"{'-res' if k[4] else ''}" for k in CASES])
def test_matches_float64_reference(lead, c, f, recompute, residual, dtype, device, path, launched):
    inputs = make_inputs(lead, c, f, dtype, device, seed=hash((lead, c, f)) % 2**31, residual=residual)
    SWIGLU_MLP.check_against_float64(inputs, dtype, recompute)
    SWIGLU_MLP.assert_launch_paths(launched, path, c, f, dtype, recompute)


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_shapes(seed, device, path, launched):
    """Random odd sizes (M, C, F in 1..99, drawn from the seed) with random leading dims, recompute
    and residual: tile edges in every dim of both fused GEMMs, fp16 (TMA where the widths allow)."""
    rng = torch.Generator().manual_seed(1000 + seed)
    m, c, f = (int(v) for v in torch.randint(1, 100, (3,), generator=rng))
    lead = (m,) if seed % 2 else (1, m)
    recompute, residual = bool(seed & 2), not seed & 1
    inputs = make_inputs(lead, c, f, torch.float16, device, seed=seed, residual=residual)
    SWIGLU_MLP.check_against_float64(inputs, torch.float16, recompute)
    SWIGLU_MLP.assert_launch_paths(launched, path, c, f, torch.float16, recompute)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,c,f", [(300, 96, 256), (129, 264, 136), (64, 8, 688)])
def test_larger_sizes(m, c, f, dtype, device, path, launched):
    """Many tiles per persistent program, several K blocks, and (C = 8) one narrow K."""
    for recompute in (False, True):
        SWIGLU_MLP.check_against_float64(make_inputs((m,), c, f, dtype, device, seed=m + c), dtype, recompute)
    assert set(launched) == {path}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-g) = inf: sigmoid(g) = 0, as meant
def test_swiglu_epilogues_over_wide_range(device, path, launched):
    """silu(g) * u, and dG = u silu'(g), dU = silu(g) from the epilogues for g in [-40, 40] (tails,
    and 0) and u in [-2, 2], vs float64 autograd. K = 4 (fp32: TMA-addressable) with one non-zero
    term per product, so the GEMMs pass g, u and dH = 1 through exactly."""
    n, f = 801, 8
    g = torch.linspace(-40, 40, n, dtype=torch.float64)
    u = torch.linspace(2, -2, n, dtype=torch.float64)
    x = torch.zeros(n, 4)
    x[:, 0], x[:, 1] = g.float(), u.float()
    w_gate, w_up = torch.zeros(f, 4), torch.zeros(f, 4)
    w_gate[:, 0], w_up[:, 1] = 1.0, 1.0
    h, g_saved, u_saved = swiglu_mlp.fc_swiglu(x.to(device), w_gate.to(device), w_up.to(device), save_gu=True)
    dy = torch.zeros(n, 4)
    dy[:, 0] = 1.0
    w_down = torch.zeros(4, f)
    w_down[0] = 1.0
    dg, du = swiglu_mlp.swiglu_grad_matmul(dy.to(device), w_down.to(device), g_saved, u_saved)
    g64, u64 = g.clone().requires_grad_(), u.clone().requires_grad_()
    h64 = F.silu(g64) * u64
    h64.sum().backward()
    assert torch.equal(g_saved, g.float()[:, None].expand(n, f).to(device))
    assert torch.equal(u_saved, u.float()[:, None].expand(n, f).to(device))
    for name, ours, exact in (("silu(g) * u", h, h64), ("dG", dg, g64.grad), ("dU", du, u64.grad)):
        assert_rel_close(ours, exact.detach()[:, None].expand(n, f), tol(torch.float32), name)
    assert launched == [path] * 2


@pytest.mark.parametrize("residual", [False, True])
def test_recompute_gives_bitwise_identical_results(residual, device, path):
    """recompute=True reruns the forward's fused kernel in backward (same tiles): every output and
    gradient equals the default mode's bit for bit."""
    inputs = make_inputs((37,), 40, 72, torch.float32, device, seed=23, residual=residual)
    dy = fixed_dy(inputs["x"], seed=5)
    assert_bitwise_equal(*(SWIGLU_MLP.run(inputs, dy, recompute=r) for r in (False, True)))


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_keeps_no_hidden_activations(recompute, device):
    """recompute=True saves no (M, F) tensor for backward; otherwise H, G and U are kept."""
    m, c, f = 9, 16, 48
    inputs = make_inputs((m,), c, f, torch.float32, device, seed=3, residual=False)
    SWIGLU_MLP.check_saved_for_backward(inputs, (m, f), 0 if recompute else 3, recompute=recompute)


def test_strided_views_and_expanded_grad(device, launched):
    """x and residual as column slices of wider tensors (row stride 2C, no copy: TMA takes it), and
    the expanded (stride 0) dy that y.sum() sends back (TMA cannot: dH takes the pointer path)."""
    c, f = 40, 72
    inputs = make_inputs((3, 11), 2 * c, f, torch.float32, device, seed=7)
    inputs = {**inputs, "x": inputs["x"][..., :c], "residual": inputs["residual"][..., c:],
              "w_gate": inputs["w_gate"][:, :c].contiguous(), "w_up": inputs["w_up"][:, c:].contiguous(),
              "w_down": inputs["w_down"][:c]}
    assert inputs["x"].stride(-2) == 2 * c
    SWIGLU_MLP.check_sum_grads_against_float64(inputs)
    assert launched == [SWIGLU_MLP.automatic_path(device), "pointer"]


def test_empty_batch(device):
    SWIGLU_MLP.check_empty_batch(make_inputs((0,), 16, 32, torch.float32, device, seed=5, residual=False))


def test_torch_compile_fullgraph_traces_the_custom_ops(device):
    inputs = make_inputs((2, 5), 24, 40, torch.float32, device, seed=11)
    SWIGLU_MLP.check_compiled_matches_eager(inputs, torch.randn(2, 5, 24, device=device))


def test_bitwise_deterministic(device, path):
    inputs = make_inputs((37,), 40, 72, torch.float32, device, seed=17)
    dy = torch.randn(37, 40, device=device)
    assert_bitwise_equal(*(SWIGLU_MLP.run(inputs, dy) for _ in range(2)))


def test_registered_backends():
    assert registry.resolve(OP, "triton") is swiglu_mlp.swiglu_mlp
    assert tritongpt.swiglu_mlp is swiglu_mlp.swiglu_mlp
    assert {"torch", "triton", "liger"} <= set(registry.backends(OP))
    liger = registry.backend(OP, "liger")
    assert (liger.needs, liger.requires) == ("cuda", "liger_kernel")
    assert not registry.usable(OP, "liger", "cpu")


def _bad_inputs(device):
    ok = make_inputs((3, 4), 16, 32, torch.float32, device, seed=13)
    return [
        ("w_gate must be", dict(ok, w_gate=ok["w_gate"][:, :8])),
        ("w_up must be", dict(ok, w_up=ok["w_up"][:5])),
        ("w_down must be", dict(ok, w_down=ok["w_down"].t().contiguous())),
        ("residual shape", dict(ok, residual=ok["residual"][:2])),
        ("dtype", dict(ok, w_down=ok["w_down"].half())),
        ("float64", {k: v.double() for k, v in ok.items()}),
        ("contiguous in its last dim", dict(ok, w_gate=ok["w_down"].t())),
        ("is on meta", dict(ok, w_up=ok["w_up"].to("meta"))),
        ("last dim >= 1", dict(ok, x=ok["x"][..., :0], w_gate=ok["w_gate"][:, :0], w_up=ok["w_up"][:, :0],
                               w_down=ok["w_down"][:0], residual=ok["residual"][..., :0])),
        ("must be floating point", dict(ok, x=ok["x"].long())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))), ids=[name for name, _ in _bad_inputs("cpu")])
def test_bad_input_raises_before_launch(case, device, monkeypatch):
    message, kwargs = _bad_inputs(device)[case]
    SWIGLU_MLP.check_raises_before_launch(monkeypatch, message, kwargs)


def test_launchers_check_their_inputs(device, monkeypatch):
    """The fused-kernel launchers reject bad operands with one error, before allocating."""
    monkeypatch.setattr(swiglu_mlp, "_empty", lambda *args: pytest.fail("an output was allocated before the check"))
    x, w = torch.randn(5, 8, device=device), torch.randn(16, 8, device=device)
    g, w_down = torch.randn(5, 16, device=device), torch.randn(8, 16, device=device)
    for message, call in [
        ("fc needs x", lambda: swiglu_mlp.fc_swiglu(x[:, :4], w, w)),
        ("fc needs x", lambda: swiglu_mlp.fc_swiglu(x, w, w[:8])),
        ("w_up has dtype", lambda: swiglu_mlp.fc_swiglu(x, w, w.half())),
        ("float64", lambda: swiglu_mlp.fc_swiglu(x.double(), w.double(), w.double())),
        ("g and u must be", lambda: swiglu_mlp.swiglu_grad_matmul(x, w_down, g[:4], g[:4])),
        ("g and u must be", lambda: swiglu_mlp.swiglu_grad_matmul(x, w_down, g, g.t().contiguous().t())),
        ("u has dtype", lambda: swiglu_mlp.swiglu_grad_matmul(x, w_down, g, g.half())),
        ("dH needs dy", lambda: swiglu_mlp.swiglu_grad_matmul(x[None], w_down, g, g)),
    ]:
        with pytest.raises(TritonGPTError, match=message):
            call()


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("c,f", [(576, 1536), (2048, 5632), (4096, 11008)])
@pytest.mark.parametrize("recompute,residual", [(False, True), (True, False)])
def test_llama_sizes_within_twice_pytorch_error(c, f, recompute, residual, dtype, device):
    """M = 16384 rows (8 x 2048 tokens) at SmolLM, TinyLlama and Llama-2-7B widths: our error vs
    float64 is within the dtype's tolerance and at most twice PyTorch's own in the same precision."""
    inputs = make_inputs((8, 2048), c, f, dtype, device, seed=c, residual=residual)
    dy = torch.randn(8, 2048, c, device=device, dtype=dtype)
    SWIGLU_MLP.check_within_twice_torch_error(inputs, dy, dtype, recompute)


@pytest.mark.gpu
def test_fp32_on_gpu_recompute_and_deterministic(device):
    """fp32 at a SmolLM size under 'highest' matmul precision (ieee dots): 1e-5 holds; reruns and the
    recompute mode give bitwise equal results."""
    inputs = make_inputs((4, 1024), 576, 1536, torch.float32, device, seed=1)
    SWIGLU_MLP.check_against_float64(inputs, torch.float32, False)
    dy = torch.randn(4, 1024, 576, device=device)
    assert_bitwise_equal(*(SWIGLU_MLP.run(inputs, dy, recompute=r) for r in (False, False, True)))


@pytest.mark.gpu
def test_hopper_takes_the_tma_path(device, launched):
    """On sm_90 Llama shapes run the persistent TMA kernel; elsewhere the pointer kernel."""
    inputs = make_inputs((2, 1024), 2048, 5632, torch.bfloat16, device, seed=2)
    SWIGLU_MLP.run(inputs, torch.randn(2, 1024, 2048, device=device, dtype=torch.bfloat16))
    assert launched == [SWIGLU_MLP.automatic_path(device)] * 2
