"""The Triton GELU MLP (kernels/mlp.py) against the torch reference run in float64: output and
every gradient, both GELU forms, both recompute modes, with and without biases and residual, on
both fused-kernel paths (TMA descriptors, pointers). On CPU the kernels run in the Triton
interpreter (fp32, fp16), which runs tensor descriptors too; `-m gpu` adds bf16 and GPT-2 sizes.

    python -m pytest -q tests/test_mlp.py
    python -m pytest -q -m slow tests/test_mlp.py
    python -m pytest -q -m gpu tests/test_mlp.py
"""

import pytest
import torch
import torch.nn.functional as F
from _util import FusedMLP, assert_bitwise_equal, assert_rel_close, seeded_randn, tol

import tritongpt
from tritongpt.errors import TritonGPTError
from tritongpt.kernels import mlp, mlp_configs, mlp_spec, registry

GELU_MLP = FusedMLP(mlp, mlp.gelu_mlp, mlp_spec.reference)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every Triton output (h, a, dH, the column sums of dH) starts as NaN, so an element a kernel
    fails to write fails the comparison."""
    GELU_MLP.poison_allocations(monkeypatch)


@pytest.fixture
def launched(monkeypatch):
    """The paths ("tma" / "pointer") the fused kernels ran on, one entry per launch."""
    return GELU_MLP.record_launch_paths(monkeypatch)


@pytest.fixture(params=["tma", "pointer"])
def path(request, monkeypatch):
    """"tma": the automatic choice (here, the interpreter: TMA wherever descriptors can address the
    operands); "pointer": the pointer kernel forced, as on sm_80."""
    if request.param == "pointer":
        monkeypatch.setattr(mlp, "choose_path", lambda *tensors: "pointer")
    return request.param


def make_inputs(lead, c, hid, dtype, device, seed, bias=True, residual=True):
    """Fresh random x (*lead, C), nn.Linear-layout weights scaled 1/sqrt(fan_in), biases, residual."""
    rand = seeded_randn(seed, device, dtype)
    return dict(x=rand(*lead, c), w1=rand(hid, c, scale=c ** -0.5), b1=rand(hid) if bias else None,
                w2=rand(c, hid, scale=hid ** -0.5), b2=rand(c) if bias else None,
                residual=rand(*lead, c) if residual else None)


# (leading dims of x, C, Hid, approximate, recompute, biases, residual): M, C and Hid cover 1, 17,
# 100, 768, non-multiples of 16 and block multiples; each of them is K or N in one of the matmuls.
# Widths that are multiples of 8 (4 in fp32) run the TMA kernel; M = 37 and 64 give it more tiles
# than programs, and K = 40 a partial K block.
CASES = [
    ((1,), 17, 100, "tanh", False, True, True),
    ((17,), 100, 768, "none", True, True, False),
    ((4, 25), 768, 17, "tanh", True, False, True),
    ((768,), 17, 1, "none", False, False, False),
    ((2, 32), 128, 512, "tanh", False, True, False),
    ((3, 7), 48, 200, "none", False, True, True),
    ((5,), 33, 96, "tanh", True, True, True),
    ((37,), 40, 72, "none", False, True, True),
    ((37,), 40, 72, "tanh", True, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,c,hid,approximate,recompute,bias,residual", CASES,
                         ids=[f"{'x'.join(map(str, k[0]))}-C{k[1]}-H{k[2]}-{k[3]}-{'recompute' if k[4] else 'keep'}"
                              f"{'-bias' if k[5] else ''}{'-res' if k[6] else ''}" for k in CASES])
def test_matches_float64_reference(lead, c, hid, approximate, recompute, bias, residual, dtype, device, path,
                                   launched):
    inputs = make_inputs(lead, c, hid, dtype, device, seed=hash((lead, c, hid)) % 2**31, bias=bias,
                         residual=residual)
    GELU_MLP.check_against_float64(inputs, dtype, recompute, approximate=approximate)
    GELU_MLP.assert_launch_paths(launched, path, c, hid, dtype, recompute)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,c,hid", [(300, 96, 384), (129, 264, 136), (64, 8, 1024)])
def test_larger_sizes(m, c, hid, dtype, device, path, launched):
    """Many tiles per persistent program, several K blocks, and (C = 8) one narrow K."""
    for approximate, recompute in (("tanh", False), ("none", True)):
        inputs = make_inputs((m,), c, hid, dtype, device, seed=m + c)
        GELU_MLP.check_against_float64(inputs, dtype, recompute, approximate=approximate)
    assert set(launched) == {path}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-2u) = inf: sigmoid(2u) = 0, as meant
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_epilogues_over_wide_range(approximate, device, path, launched):
    """gelu(h), gelu'(h) and the column sums of gelu'(h) from the epilogues, h in [-40, 40] (tails,
    and 0), vs float64 autograd. K = 4 (fp32: TMA-addressable) with one non-zero term, so the
    matmuls pass h (and 1) through exactly."""
    h = torch.linspace(-40, 40, 801, dtype=torch.float64)
    x = torch.zeros(801, 4)
    x[:, 0] = h.float()
    w1 = torch.zeros(8, 4)
    w1[:, 0] = 1.0
    act, h_saved = mlp.fc_gelu(x.to(device), w1.to(device), None, approximate, save_h=True)
    dy = torch.zeros(801, 4)
    dy[:, 0] = 1.0
    w2 = torch.zeros(4, 8)
    w2[0] = 1.0
    grad, grad_sum = mlp.gelu_grad_matmul(dy.to(device), w2.to(device), h_saved, approximate)
    h64 = h.clone().requires_grad_()
    act64 = F.gelu(h64, approximate=approximate)
    act64.sum().backward()
    assert torch.equal(h_saved, h.float()[:, None].expand(801, 8).to(device))
    assert_rel_close(act, act64[:, None].expand(801, 8), tol(torch.float32), "gelu")
    assert_rel_close(grad, h64.grad[:, None].expand(801, 8), tol(torch.float32), "gelu'")
    assert_rel_close(grad_sum, h64.grad.sum().expand(8), tol(torch.float32), "column sums of gelu'")
    assert launched == [path] * 2


@pytest.mark.parametrize("sum_rows", [8, 32])
def test_column_sums_fill_every_partial_row(sum_rows, device, path, monkeypatch):
    """db1's partial rows each sum sum_rows rows of dH; a tile of more rows (the autotuner may pick
    any BLOCK_M) writes its sums to its first partial row and zeros to the rest, so every
    (NaN-poisoned) partial row is written whatever the tile: 37 rows are 5 partial rows of 8."""
    monkeypatch.setattr(mlp_configs, "sum_rows", lambda path: sum_rows)
    x, w2 = torch.randn(37, 40, device=device), torch.randn(40, 72, device=device) / 8
    h = torch.randn(37, 72, device=device)
    dh, db1 = mlp.gelu_grad_matmul(x, w2, h, "tanh")
    h64 = h.double().requires_grad_()
    dh64, = torch.autograd.grad(F.gelu(h64, approximate="tanh"), h64, x.double() @ w2.double())
    assert_rel_close(dh, dh64, tol(torch.float32), "dH")
    assert_rel_close(db1, dh64.sum(0), tol(torch.float32), "db1")


def test_choose_path(device, monkeypatch):
    """TMA where descriptors exist and can address every operand: unit last stride, other strides
    positive multiples of 16 bytes; otherwise (or without triton.tools.tensor_descriptor) pointers."""
    ok = torch.empty(32, 40, device=device)
    expected = GELU_MLP.automatic_path(device)
    assert mlp.choose_path(ok, ok[:, :8], ok.t().contiguous()) == expected
    misaligned = torch.empty(1281, device=device)[1:].view(32, 40)
    for bad in (ok[:, :39].contiguous(), ok.t(), ok[:1].expand(32, 40), misaligned):
        assert mlp.choose_path(ok, bad) == "pointer", bad.stride()
    monkeypatch.setattr(mlp, "TensorDescriptor", None)
    assert mlp.choose_path(ok) == "pointer"


def test_strided_views_and_expanded_grad(device, launched):
    """x and residual as column slices of wider tensors (row stride 2C, no copy: TMA takes it), and
    the expanded (stride 0) dy that y.sum() sends back (TMA cannot: dH takes the pointer path)."""
    c, hid = 40, 72
    inputs = make_inputs((3, 11), 2 * c, hid, torch.float32, device, seed=7)
    inputs = {**inputs, "x": inputs["x"][..., :c], "residual": inputs["residual"][..., c:],
              "w1": inputs["w1"][:, :c].contiguous(), "w2": inputs["w2"][:c], "b2": inputs["b2"][:c]}
    assert inputs["x"].stride(-2) == 2 * c
    GELU_MLP.check_sum_grads_against_float64(inputs)
    assert launched == [GELU_MLP.automatic_path(device), "pointer"]


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_keeps_no_hidden_activations(recompute, device):
    """recompute=True saves no (M, Hid) tensor for backward; otherwise h and a are kept."""
    m, c, hid = 9, 16, 48
    inputs = make_inputs((m,), c, hid, torch.float32, device, seed=3, residual=False)
    GELU_MLP.check_saved_for_backward(inputs, (m, hid), 0 if recompute else 2, recompute=recompute)


def test_empty_batch(device):
    GELU_MLP.check_empty_batch(make_inputs((0,), 16, 32, torch.float32, device, seed=5, residual=False))


def test_torch_compile_fullgraph_traces_the_custom_ops(device):
    inputs = make_inputs((2, 5), 24, 40, torch.float32, device, seed=11)
    GELU_MLP.check_compiled_matches_eager(inputs, torch.randn(2, 5, 24, device=device))


def test_bitwise_deterministic(device, path):
    """db1 comes from per-tile column sums added in a fixed order: reruns match bit for bit."""
    inputs = make_inputs((37,), 40, 72, torch.float32, device, seed=17)
    dy = torch.randn(37, 40, device=device)
    assert_bitwise_equal(*(GELU_MLP.run(inputs, dy) for _ in range(2)))


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
    GELU_MLP.check_raises_before_launch(monkeypatch, message, kwargs)


def test_launchers_check_their_inputs(device, monkeypatch):
    """The fused-kernel launchers reject bad operands with one error, before allocating."""
    monkeypatch.setattr(mlp, "_empty", lambda *args: pytest.fail("an output was allocated before the check"))
    x, w1, h = torch.randn(5, 8, device=device), torch.randn(16, 8, device=device), torch.randn(5, 16, device=device)
    w2 = torch.randn(8, 16, device=device)
    for message, call in [
        ("approximate must be", lambda: mlp.fc_gelu(x, w1, None, "exact")),
        ("fc needs x", lambda: mlp.fc_gelu(x[:, :4], w1, None)),
        ("b1 must be", lambda: mlp.fc_gelu(x, w1, torch.randn(8, device=device))),
        ("w has dtype|b has dtype", lambda: mlp.fc_gelu(x, w1.half(), None)),
        ("h must be", lambda: mlp.gelu_grad_matmul(x, w2, h[:4])),
        ("h has dtype", lambda: mlp.gelu_grad_matmul(x, w2, h.half())),
        ("dH needs dy", lambda: mlp.gelu_grad_matmul(x[None], w2, h)),
    ]:
        with pytest.raises(TritonGPTError, match=message):
            call()


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
    GELU_MLP.check_within_twice_torch_error(inputs, dy, dtype, recompute, approximate=approximate)


@pytest.mark.gpu
def test_fp32_on_gpu_and_deterministic(device):
    """fp32 at a GPT-2 size: under PyTorch's default float32 matmul precision ('highest') the dots
    are ieee, not tf32, so 1e-5 holds; two runs give bitwise equal results."""
    inputs = make_inputs((4, 1024), 768, 3072, torch.float32, device, seed=1)
    GELU_MLP.check_against_float64(inputs, torch.float32, False, approximate="tanh")
    dy = torch.randn(4, 1024, 768, device=device)
    assert_bitwise_equal(*(GELU_MLP.run(inputs, dy) for _ in range(2)))


@pytest.mark.gpu
def test_hopper_takes_the_tma_path(device, launched):
    """On sm_90 GPT-2 shapes run the persistent TMA kernel; elsewhere the pointer kernel."""
    inputs = make_inputs((2, 1024), 768, 3072, torch.bfloat16, device, seed=2)
    GELU_MLP.run(inputs, torch.randn(2, 1024, 768, device=device, dtype=torch.bfloat16))
    assert launched == [GELU_MLP.automatic_path(device)] * 2
