"""Triton RMSNorm (kernels/rms_norm.py) against the PyTorch reference run in float64.

    python -m pytest -q tests/test_rms_norm.py            # CPU: Triton interpreter, fp32/fp16
    python -m pytest -q -m slow tests/test_rms_norm.py    # + the 65536-wide rows
    python -m pytest -q -m gpu tests/test_rms_norm.py     # GPU: bf16, M=16384 rows, Liger

Kernel tests go through the launchers with NaN-poisoned preallocated outputs (`out=`), so an
element a kernel forgets to write fails the comparison; autograd tests go through the public
functional (the torch.library custom ops).
"""

import pytest
import torch
from _norm_util import Norm, kernel_cases, param_id, poisoned_backward_outputs, poisoned_forward_outputs
from _util import assert_rel_close, poison, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import compile_report, norm_configs, registry, rms_norm_spec
from tritongpt.kernels import rms_norm as rn

EPS = 1e-6
RMS_NORM = Norm("rms_norm", rn.rms_norm, rms_norm_spec.reference, ("weight",))
OUTPUTS = ("y", "s", "rstd", "dx", "dweight")  # what run_launchers and float64_reference return


def make_inputs(lead, n, dtype, device, weight=True, residual=False, seed=0):
    """Fresh random x (off-centre: RMS is not the standard deviation), weight, residual, and
    upstream grads dy (of y) and ds (of the s output, with a residual)."""
    return RMS_NORM.random_inputs(lead, n, dtype, device, seed, residual, weight=weight)


def float64_reference(x, weight, residual, dy, ds, eps=EPS, weight_offset=0.0):
    """(y, s, rstd, dx, dweight) from kernels/rms_norm_spec.reference in float64; s is x + residual
    (or x); dx is also the residual's gradient."""
    inp = dict(x=x, weight=weight, residual=residual, dy=dy, ds=ds)
    y, s, grads = RMS_NORM.float64_run(inp, eps=eps, weight_offset=weight_offset)
    rstd = (s.pow(2).mean(-1) + eps).rsqrt().flatten()
    return y, s, rstd, grads["x"], grads["weight"]


def run_launchers(x, weight, residual, dy, ds, eps=EPS, weight_offset=0.0):
    """Forward and backward launchers writing into NaN-poisoned preallocated outputs."""
    fwd_out = poisoned_forward_outputs(x, residual, stats=1)
    y, s, rstd = rn.rms_norm_fwd(x, weight, residual, eps, weight_offset, out=fwd_out)
    assert all(a is b for a, b in zip((y, s, rstd), fwd_out))
    saved = s if residual is not None else x
    bwd_out = poisoned_backward_outputs(x, weight)
    dx, dw = rn.rms_norm_bwd(dy, ds, saved, weight, rstd, weight_offset, out=bwd_out)
    assert all(a is b for a, b in zip((dx, dw), bwd_out))
    return y, s, rstd, dx, dw


def check_all(ours, expected, dtype, ds=None):
    """Every output within the dtype's tolerance of float64 (`ds`: the upstream grad of the s
    output, None without a residual)."""
    for name, a, e in zip(OUTPUTS, ours, expected):
        if e is None or (name == "s" and ds is None):
            continue
        assert_rel_close(a, e.reshape(a.shape), tol(dtype), name)


# 2, 7: 64 rows to a tile; 576, 1000: 4 (576: SmolLM-135M); 4099: one row in 8192 columns
WIDTHS = [2, 7, 576, 1000, 4099]


@pytest.mark.parametrize("n,rows,dtype", kernel_cases(WIDTHS), ids=param_id)
def test_kernels_match_float64(n, rows, dtype, device):
    """Weight and residual present (every load and store of both kernels in use). Every width
    with 1, 3 and 37 rows in fp32 (37 rows: several per backward program); fp16 adds its rounding
    on every width."""
    inp = make_inputs((rows,), n, dtype, device, residual=True, seed=n * 100 + rows)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, inp["ds"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_single_column_rows(dtype, device):
    """N = 1: y = w * s / sqrt(s^2 + eps) and dweight match; dx is what survives the cancellation
    g - xhat^2 g (eps / (s^2 + eps) of g, ~1e-6), so it is judged against the size of g * rstd."""
    inp = make_inputs((40,), 1, dtype, device, residual=True, seed=4)
    y, s, rstd, dx, dw = run_launchers(**inp)
    ey, es, erstd, edx, edw = float64_reference(**inp)
    check_all((y, s, rstd, None, dw), (ey, es, erstd, None, edw), dtype, inp["ds"])
    scale = (inp["dy"].double() * inp["weight"].double() * erstd[:, None]).abs().max()
    assert torch.isfinite(dx).all() and ((dx.double() - edx).abs().max() / scale).item() <= tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weight,residual", [(False, False), (True, False), (False, True), (True, True)])
def test_optional_weight_residual(weight, residual, dtype, device):
    inp = make_inputs((2, 5), 300, dtype, device, weight, residual, seed=7)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, inp["ds"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gemma_weight_offset(residual, dtype, device):
    """weight_offset=1: the gain is 1 + weight (Gemma's weights store the gain minus one, here near 0)."""
    inp = make_inputs((6,), 768, dtype, device, residual=residual, seed=17)
    inp["weight"] = inp["weight"] - 1.0
    check_all(run_launchers(**inp, weight_offset=1.0), float64_reference(**inp, weight_offset=1.0), dtype, inp["ds"])


@pytest.mark.parametrize("n", [100, 2 * norm_configs.MAX_BLOCK_N + 5], ids=["one-pass", "chunked"])
def test_eps_is_used(n, device):
    """Rows whose mean square is near eps: ignoring or misplacing eps changes y by far more than tol."""
    inp = make_inputs((4,), n, torch.float32, device, seed=3)
    inp["x"] = 1e-3 * inp["x"]  # mean square ~4e-6
    check_all(run_launchers(**inp, eps=1e-6), float64_reference(**inp, eps=1e-6), torch.float32)


@pytest.mark.parametrize("dtype,weight_offset", [(torch.float32, 0.0), (torch.float16, 1.0)],
                         ids=["fp32", "fp16-gemma"])
def test_chunked_rows_wider_than_one_pass(dtype, weight_offset, device):
    """Rows wider than MAX_BLOCK_N loop over chunks (sum-of-squares pass, then normalize pass, which
    reads back the s it stored; backward: row sums, then chunk by chunk); 5 rows over the
    backward's programs (4 under the interpreter) make a program handle several rows."""
    n = 2 * norm_configs.MAX_BLOCK_N + 5
    assert not norm_configs.row_config(n).one_pass
    inp = make_inputs((5,), n, dtype, device, residual=True, seed=11)
    ours = run_launchers(**inp, weight_offset=weight_offset)
    check_all(ours, float64_reference(**inp, weight_offset=weight_offset), dtype, inp["ds"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,rows", [(200, 150), (60, 601)])
def test_backward_programs_walk_several_tiles(n, rows, dtype, device):
    """Narrow rows: tiles of 16 (N = 200) or 64 (N = 60) rows, several tiles per backward program
    (each loading the next while computing this one), a program's last tile cut short by its row
    range, and the last program's by M."""
    cfg = norm_configs.row_config(n)
    assert rows > 2 * norm_configs.INTERPRETER_BWD_PROGRAMS * cfg.rows and rows % cfg.rows
    inp = make_inputs((rows,), n, dtype, device, residual=True, seed=n + rows)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, inp["ds"])


def test_fuzzed_shapes(device):
    """Random row counts, widths (both sides of the tile sizes; N = 1 is test_single_column_rows)
    and options, fp32."""
    gen = torch.Generator().manual_seed(2025)
    for i in range(8):
        rows = int(torch.randint(1, 90, (1,), generator=gen))
        n = int(torch.randint(2, 3000, (1,), generator=gen))
        weight, residual = (bool(b) for b in torch.randint(0, 2, (2,), generator=gen))
        inp = make_inputs((rows,), n, torch.float32, device, weight, residual, seed=100 + i)
        for name, a, e in zip(OUTPUTS, run_launchers(**inp), float64_reference(**inp)):
            if e is not None and (name != "s" or residual):
                assert_rel_close(a, e.reshape(a.shape), tol(torch.float32), f"{name} (M={rows}, N={n})")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rows_of_65536(dtype, device):
    inp = make_inputs((3,), 65536, dtype, device, residual=True, seed=12)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, inp["ds"])


def test_compile_report_covers_every_row_config():
    """The compile report's RMSNorm variants are the launchers' own table, forward and backward."""
    kernels = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"}
    variants = [v for v in compile_report.variants() if v.kernel.__name__ in kernels]
    configs = {(v.constexprs["BLOCK_N"], v.num_warps, v.constexprs["ONE_PASS"]) for v in variants}
    assert configs == {(c.block_n, c.num_warps, c.one_pass) for c in norm_configs.row_configs()}
    assert len(variants) == 3 * 2 * len(norm_configs.row_configs())  # fp32, fp16, bf16


@pytest.mark.parametrize("weight,residual,weight_offset", [(True, True, 0.0), (True, False, 1.0), (False, True, 0.0)])
def test_autograd_through_custom_ops(weight, residual, weight_offset, device):
    """The public functional (registered `triton` backend): any leading shape, grads of x,
    weight, and of the residual (= grad of x, including what flowed into s)."""
    inp = make_inputs((2, 3, 2), 200, torch.float32, device, weight, residual, seed=21)
    RMS_NORM.check_autograd_against_float64(inp, torch.float32, eps=EPS, weight_offset=weight_offset)


def test_grads_are_bitwise_deterministic(device):
    """dweight (per-program partial rows, then a fixed-order reduction) and dx, twice."""
    inp = make_inputs((37,), 300, torch.float32, device, residual=True, seed=5)
    RMS_NORM.check_autograd_bitwise_deterministic(inp, eps=EPS)


def test_strided_rows_and_leading_dims(device):
    """Row-strided input (a column slice) runs in place; leading dims that cannot be viewed as
    rows (a transpose) are copied by reshape; both give the reference result."""
    RMS_NORM.check_strided_rows_and_leading_dims(device)


def test_zero_rows(device):
    RMS_NORM.check_zero_rows(device)


def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces the custom ops (fake implementations, autograd)
    without graph breaks; forward and backward match eager."""

    def block(x, w, r):
        y, s = rn.rms_norm(x, w, EPS, residual=r)
        return (y * y).sum() + (s * 0.5).sum() + rn.rms_norm(s, w, weight_offset=1.0).sum()

    inp = make_inputs((2, 8), 64, torch.float32, device, residual=True, seed=13)
    RMS_NORM.check_compiled_matches_eager(block, inp)


def test_backends_registered():
    """triton and the reference everywhere; Liger always listed, usable only with CUDA and the package."""
    assert registry.backends("rms_norm") == ["liger", "torch", "triton"]
    liger = registry.backend("rms_norm", "liger")
    assert (liger.needs, liger.requires) == ("cuda", "liger_kernel")
    assert not registry.usable("rms_norm", "liger", "cpu")
    assert registry.backend("rms_norm", "triton").deterministic


# --- bad input: one TritonGPTError before anything is written --------------------------------

# words the error must contain -> bad inputs, from a good x (4, 32) and weight (32,)
BAD_INPUTS = {
    "weight has dtype": lambda x, w: dict(x=x, weight=w.half()),
    "weight must have shape": lambda x, w: dict(x=x, weight=w[:31]),
    "residual shape": lambda x, w: dict(x=x, weight=w, residual=x[:, :31]),
    "residual is on": lambda x, w: dict(x=x, residual=x.to("meta")),
    "contiguous in its last dim": lambda x, w: dict(x=x.t().contiguous().t()),
    "float64": lambda x, w: dict(x=x.double(), weight=w.double()),
    "floating point": lambda x, w: dict(x=x.int()),
    "last dim >= 1": lambda x, w: dict(x=x[:, :0]),
    "eps must be > 0": lambda x, w: dict(x=x, weight=w, eps=0.0),
}


@pytest.mark.parametrize("words", BAD_INPUTS)
def test_bad_input_raises_before_writing(words, device):
    kwargs = BAD_INPUTS[words](torch.randn(4, 32, device=device), torch.randn(32, device=device))
    out = poisoned_forward_outputs(torch.empty(4, 32, device=device), None, stats=1)
    launch = lambda: rn.rms_norm_fwd(kwargs["x"], kwargs.get("weight"), kwargs.get("residual"), kwargs.get("eps", EPS),
                                     out=out)
    RMS_NORM.check_raises_before_writing(words, launch, out, kwargs)


def test_bad_out_and_grads(device):
    x = torch.randn(4, 32, device=device)
    _, _, rstd = rn.rms_norm_fwd(x, None, None, EPS)
    dx_out = poison(torch.empty(4, 32, device=device))
    for words, call in (
            ("dy shape", lambda: rn.rms_norm_bwd(x[:3], None, x, None, rstd, out=(dx_out, x.new_empty(0)))),
            ("ds has dtype", lambda: rn.rms_norm_bwd(x, x.half(), x, None, rstd, out=(dx_out, x.new_empty(0)))),
            ("rstd must be fp32", lambda: rn.rms_norm_bwd(x, None, x, None, rstd[:3], out=(dx_out, x.new_empty(0)))),
            ("out dweight", lambda: rn.rms_norm_bwd(x, None, x, x[0], rstd, out=(dx_out, x.new_empty(0))))):
        with pytest.raises(TritonGPTError, match=words):
            call()
        assert dx_out.isnan().all(), f"dx was written before the error ({words})"
    wrong = (torch.empty(4, 32, device=device, dtype=torch.float16), x.new_empty(0), x.new_empty(4))
    with pytest.raises(TritonGPTError, match="out y"):
        rn.rms_norm_fwd(x, None, None, EPS, out=wrong)


# --- GPU: bf16, training-size shapes, PyTorch's own low-precision error as the yardstick -------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [576, 960, 2048, 3072, 4096, 8192])
def test_gpu_large_within_2x_pytorch_error(n, dtype):
    m = 16384
    inp = make_inputs((m,), n, dtype, "cuda", residual=True, seed=n)
    ours = run_launchers(**inp)
    RMS_NORM.check_within_twice_torch_error(OUTPUTS, ours, float64_reference(**inp), inp, dtype, eps=EPS)


@pytest.mark.gpu
def test_gpu_deterministic_many_programs():
    inp = make_inputs((16384,), 2048, torch.bfloat16, "cuda", residual=True, seed=1)
    first, second = run_launchers(**inp), run_launchers(**inp)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_rows_of_65536():
    inp = make_inputs((64,), 65536, torch.bfloat16, "cuda", residual=True, seed=2)
    check_all(run_launchers(**inp), float64_reference(**inp), torch.bfloat16, inp["ds"])


@pytest.mark.gpu
@pytest.mark.skipif(not registry.installed("liger_kernel"), reason="liger-kernel not installed")
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_gpu_liger_matches_float64(weight_offset):
    inp = make_inputs((4096,), 2048, torch.bfloat16, "cuda", residual=True, seed=3)
    leaves = {k: inp[k].clone().requires_grad_() for k in ("x", "weight", "residual")}
    y, s = registry.resolve("rms_norm", "liger", device="cuda")(
        leaves["x"], leaves["weight"], EPS, leaves["residual"], weight_offset=weight_offset)
    torch.autograd.backward((y, s), (inp["dy"], inp["ds"]))
    ey, es, _, edx, edw = float64_reference(**inp, weight_offset=weight_offset)
    for name, a, e in (("y", y, ey), ("s", s, es), ("dx", leaves["x"].grad, edx),
                       ("dweight", leaves["weight"].grad, edw)):
        assert_rel_close(a, e, tol(torch.bfloat16), name)
