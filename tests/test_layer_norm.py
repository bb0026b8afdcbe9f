"""Triton LayerNorm (kernels/layer_norm.py) against the PyTorch reference run in float64.

    python -m pytest -q tests/test_layer_norm.py            # CPU: Triton interpreter, fp32/fp16
    python -m pytest -q -m slow tests/test_layer_norm.py    # + the 65536-wide rows
    python -m pytest -q -m gpu tests/test_layer_norm.py     # GPU: bf16, M=16384 rows

Kernel tests go through the launchers with NaN-poisoned preallocated outputs (`out=`), so an
element a kernel forgets to write fails the comparison; autograd tests go through the public
functional (the torch.library custom ops).
"""

import pytest
import torch
from _norm_util import Norm, kernel_cases, param_id, poisoned_backward_outputs, poisoned_forward_outputs
from _util import assert_rel_close, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import layer_norm as ln
from tritongpt.kernels import layer_norm_spec, norm_configs

EPS = 1e-5
LAYER_NORM = Norm("layer_norm", ln.layer_norm, layer_norm_spec.reference, ("weight", "bias"))
OUTPUTS = ("y", "s", "mean", "rstd", "dx", "dweight", "dbias")  # what run_launchers and float64_reference return


def make_inputs(lead, n, dtype, device, weight=True, bias=True, residual=False, seed=0):
    """Fresh random x (off-center, so centering matters), weight, bias, residual, and upstream
    grads dy (of y) and ds (of the s output, with a residual)."""
    return LAYER_NORM.random_inputs(lead, n, dtype, device, seed, residual, weight=weight, bias=bias)


def float64_reference(x, weight, bias, residual, dy, ds, eps=EPS):
    """(y, s, mean, rstd, dx, dweight, dbias) from kernels/layer_norm_spec.reference in float64;
    s is x + residual (or x); dx is also the residual's gradient."""
    inp = dict(x=x, weight=weight, bias=bias, residual=residual, dy=dy, ds=ds)
    y, s, grads = LAYER_NORM.float64_run(inp, eps=eps)
    mean = s.mean(-1).flatten()
    rstd = (s.var(-1, unbiased=False) + eps).rsqrt().flatten()
    return y, s, mean, rstd, grads["x"], grads["weight"], grads["bias"]


def run_launchers(x, weight, bias, residual, dy, ds, eps=EPS):
    """Forward and backward launchers writing into NaN-poisoned preallocated outputs."""
    fwd_out = poisoned_forward_outputs(x, residual, stats=2)
    y, s, mean, rstd = ln.layer_norm_fwd(x, weight, bias, residual, eps, out=fwd_out)
    assert all(a is b for a, b in zip((y, s, mean, rstd), fwd_out))
    saved = s if residual is not None else x
    bwd_out = poisoned_backward_outputs(x, weight, bias)
    dx, dw, db = ln.layer_norm_bwd(dy, ds, saved, weight, mean, rstd, bias is not None, out=bwd_out)
    assert all(a is b for a, b in zip((dx, dw, db), bwd_out))
    return y, s, mean, rstd, dx, dw, db


def check_all(ours, expected, dtype, n, ds=None):
    """Every output within the dtype's tolerance of float64 (`ds`: the upstream grad of the s
    output, None without a residual). Row means are judged relative to the largest |s| (a mean
    near 0 still carries the rounding of its summands)."""
    s_max = expected[1].abs().max()
    for name, a, e in zip(OUTPUTS, ours, expected):
        if e is None or (name == "s" and ds is None):
            continue
        if n == 1 and name in ("dx", "dweight"):
            # a single element is its own mean: xhat = 0 exactly, so LayerNorm passes no gradient
            # and dx is just ds (float64 PyTorch leaves ~1e-13 of rounding, which no relative
            # test survives)
            exact = ds if name == "dx" and ds is not None else torch.zeros_like(a)
            assert torch.equal(a, exact), f"{name} for N=1 must be exactly {exact}, got {a}"
        elif name == "mean":
            err = ((a.double() - e).abs().max() / s_max).item() if torch.isfinite(a).all() else float("inf")
            assert err <= tol(dtype), f"mean: error {err:.3g} of max |s| > {tol(dtype)}"
        else:
            assert_rel_close(a, e.reshape(a.shape), tol(dtype), name)


WIDTHS = [1, 7, 768, 1000, 4099]  # 1, 7: 64 rows to a tile; 768, 1000: 4; 4099: one row in 8192 columns


@pytest.mark.parametrize("n,rows,dtype", kernel_cases(WIDTHS), ids=param_id)
def test_kernels_match_float64(n, rows, dtype, device):
    """Weight, bias and residual all present (every load and store of both kernels in use).
    Every width with 1, 3 and 37 rows in fp32 (37 rows: several per backward program); fp16
    adds its rounding on every width."""
    inp = make_inputs((rows,), n, dtype, device, residual=True, seed=n * 100 + rows)
    ours = run_launchers(**inp)
    check_all(ours, float64_reference(**inp), dtype, n, inp["ds"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weight,bias,residual", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False),
    (False, False, True), (True, False, True)])
def test_optional_weight_bias_residual(weight, bias, residual, dtype, device):
    inp = make_inputs((2, 5), 300, dtype, device, weight, bias, residual, seed=7)
    ours = run_launchers(**inp)
    check_all(ours, float64_reference(**inp), dtype, 300, inp["ds"])


def test_eps_is_used(device):
    """Rows with a variance near eps: ignoring or misplacing eps changes y by far more than tol."""
    inp = make_inputs((4,), 100, torch.float32, device, seed=3)
    inp["x"] = 3.0 + 1e-2 * inp["x"]  # variance ~ 4e-4
    ours = run_launchers(**inp, eps=1e-3)
    check_all(ours, float64_reference(**inp, eps=1e-3), torch.float32, 100)


def test_one_pass_up_to_8192():
    """Rows up to 8192 wide are read once (one pass), more warps for wider rows; narrow rows come
    several to a tile."""
    assert norm_configs.row_config(8192).one_pass and not norm_configs.row_config(8193).one_pass
    assert norm_configs.row_config(8192).num_warps > norm_configs.row_config(1024).num_warps
    assert norm_configs.row_config(768).rows > 1 and norm_configs.row_config(8192).rows == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunked_rows_wider_than_one_pass(dtype, device):
    """Rows wider than MAX_BLOCK_N loop over chunks (statistics pass, then normalize pass, which
    reads back the s it stored; backward: row sums, then chunk by chunk); 5 rows over the
    backward's programs (4 under the interpreter) make a program handle several rows."""
    n = 2 * norm_configs.MAX_BLOCK_N + 5
    assert not norm_configs.row_config(n).one_pass
    inp = make_inputs((5,), n, dtype, device, residual=True, seed=11)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, n, inp["ds"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,rows", [(200, 150), (60, 601)])
def test_backward_programs_walk_several_tiles(n, rows, dtype, device):
    """Narrow rows: tiles of 16 (N = 200) or 64 (N = 60) rows, several tiles per backward program
    (each loading the next while computing this one), a program's last tile cut short by its row
    range, and the last program's by M."""
    cfg = norm_configs.row_config(n)
    assert rows > 2 * norm_configs.INTERPRETER_BWD_PROGRAMS * cfg.rows and rows % cfg.rows
    inp = make_inputs((rows,), n, dtype, device, residual=True, seed=n + rows)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, n, inp["ds"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rows_of_65536(dtype, device):
    inp = make_inputs((3,), 65536, dtype, device, residual=True, seed=12)
    check_all(run_launchers(**inp), float64_reference(**inp), dtype, 65536, inp["ds"])


def test_row_configs_cover_every_width():
    """`row_configs` (what the compile report compiles) lists exactly the configs the launchers
    pick for N = 1 .. 65536."""
    picked = {norm_configs.row_config(n) for n in range(1, 65537)}
    assert picked == set(norm_configs.row_configs())


@pytest.mark.parametrize("weight,bias,residual", [(True, True, True), (True, True, False), (False, True, False)])
def test_autograd_through_custom_ops(weight, bias, residual, device):
    """The public functional (registered `triton` backend): any leading shape, grads of x,
    weight, bias, and of the residual (= grad of x, including what flowed into s)."""
    inp = make_inputs((2, 3, 2), 200, torch.float32, device, weight, bias, residual, seed=21)
    LAYER_NORM.check_autograd_against_float64(inp, torch.float32, eps=EPS)


def test_grads_are_bitwise_deterministic(device):
    inp = make_inputs((9,), 300, torch.float32, device, residual=True, seed=5)
    LAYER_NORM.check_autograd_bitwise_deterministic(inp, eps=EPS)


def test_strided_rows_and_leading_dims(device):
    """Row-strided input (a column slice) runs in place; leading dims that cannot be viewed as
    rows (a transpose) are copied by reshape; both give the reference result."""
    LAYER_NORM.check_strided_rows_and_leading_dims(device)


def test_zero_rows(device):
    LAYER_NORM.check_zero_rows(device)


def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces the custom ops (fake implementations, autograd)
    without graph breaks; forward and backward match eager."""

    def block(x, w, b, r):
        y, s = ln.layer_norm(x, w, b, EPS, residual=r)
        return (y * y).sum() + (s * 0.5).sum() + ln.layer_norm(s, w).sum()

    inp = make_inputs((2, 8), 64, torch.float32, device, residual=True, seed=13)
    LAYER_NORM.check_compiled_matches_eager(block, inp)


# --- bad input: one TritonGPTError before anything is written --------------------------------

# words the error must contain -> bad inputs, from a good x (4, 32) and weight (32,)
BAD_INPUTS = {
    "weight has dtype": lambda x, w: dict(x=x, weight=w.half()),
    "weight must have shape": lambda x, w: dict(x=x, weight=w[:31]),
    "bias must have shape": lambda x, w: dict(x=x, bias=w[:, None]),
    "residual shape": lambda x, w: dict(x=x, residual=x[:, :31]),
    "contiguous in its last dim": lambda x, w: dict(x=x.t().contiguous().t()),
    "float64": lambda x, w: dict(x=x.double(), weight=w.double()),
    "floating point": lambda x, w: dict(x=x.int()),
}


@pytest.mark.parametrize("words", BAD_INPUTS)
def test_bad_input_raises_before_writing(words, device):
    kwargs = BAD_INPUTS[words](torch.randn(4, 32, device=device), torch.randn(32, device=device))
    out = poisoned_forward_outputs(torch.empty(4, 32, device=device), None, stats=2)
    launch = lambda: ln.layer_norm_fwd(kwargs["x"], kwargs.get("weight"), kwargs.get("bias"), kwargs.get("residual"),
                                       EPS, out=out)
    LAYER_NORM.check_raises_before_writing(words, launch, out, kwargs)


def test_bad_out_eps_and_grads(device):
    x = torch.randn(4, 32, device=device)
    _, _, mean, rstd = ln.layer_norm_fwd(x, None, None, None, EPS)
    with pytest.raises(TritonGPTError, match="dy shape"):
        ln.layer_norm_bwd(x[:3], None, x, None, mean, rstd, False)
    with pytest.raises(TritonGPTError, match="ds has dtype"):
        ln.layer_norm_bwd(x, x.half(), x, None, mean, rstd, False)
    with pytest.raises(TritonGPTError, match="mean must be fp32"):
        ln.layer_norm_bwd(x, None, x, None, mean[:3], rstd, False)
    with pytest.raises(TritonGPTError, match="eps"):
        ln.layer_norm(x, eps=0.0)
    wrong = (torch.empty(4, 32, device=device, dtype=torch.float16), x.new_empty(0),
             x.new_empty(4), x.new_empty(4))
    with pytest.raises(TritonGPTError, match="out y"):
        ln.layer_norm_fwd(x, None, None, None, EPS, out=wrong)


# --- GPU: bf16, training-size shapes, PyTorch's own low-precision error as the yardstick -------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [768, 1024, 1600, 2048, 4096, 8192])
def test_gpu_large_within_2x_pytorch_error(n, dtype):
    m = 16384
    inp = make_inputs((m,), n, dtype, "cuda", residual=True, seed=n)
    ours = run_launchers(**inp)
    LAYER_NORM.check_within_twice_torch_error(OUTPUTS, ours, float64_reference(**inp), inp, dtype, eps=EPS)


@pytest.mark.gpu
def test_gpu_deterministic_many_programs():
    inp = make_inputs((16384,), 768, torch.bfloat16, "cuda", residual=True, seed=1)
    first, second = run_launchers(**inp), run_launchers(**inp)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_rows_of_65536():
    inp = make_inputs((64,), 65536, torch.bfloat16, "cuda", residual=True, seed=2)
    check_all(run_launchers(**inp), float64_reference(**inp), torch.bfloat16, 65536, inp["ds"])
