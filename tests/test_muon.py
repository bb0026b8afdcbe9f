"""--optimizer muon (train/optim.py) and `tritongpt bench converge` (bench/converge.py): which
parameters Muon steps, one step of each part against a float64 reference of its update rule,
the learning-rate scales, training lowers the loss, resume is bitwise with both states in the
checkpoint, the refused combinations, and the time-to-loss summary."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from _util import assert_rel_close
from test_train import assert_resume_bitwise, metrics, prepare_tiny, run, tiny_flags

from tritongpt.bench import converge
from tritongpt.errors import TritonGPTError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPT
from tritongpt.train import config, optim

MUON = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95,
            muon_weight_decay=0.01)
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic, torch.optim.Muon's default


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("tiny"))


def small_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", n_layer=2, n_embd=32, n_head=2, block_size=16, **overrides))


@pytest.mark.parametrize("form", ["gpt2", "llama"])
def test_muon_steps_the_blocks_matrices_and_adamw_the_rest(form):
    overrides = {} if form == "gpt2" else dict(normalization="rmsnorm", ffn="swiglu", bias=False,
                                               pos_embedding="rope", n_kv_head=1)
    model = small_model(**overrides)
    opt = optim.build(model, "muon", "cpu", **MUON)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in opt.parts["muon"].param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in opt.parts["adamw"].param_groups for p in g["params"]}
    suffixes = ("c_attn.weight", "c_proj.weight", "c_fc.weight") if form == "gpt2" else (
        "c_attn.weight", "c_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    expected = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert in_muon == expected and all(n.endswith(suffixes) for n in in_muon), in_muon
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert "transformer.wte.weight" in in_adamw  # the tied embedding / head
    assert not any(n.endswith(suffixes) for n in in_adamw)


def newton_schulz64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz orthogonalisation, in float64."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp_min(1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def test_one_step_of_each_part_matches_its_update_rule():
    """From zero state, one step. Muon's matrices: bitwise what a lone torch.optim.Muon with the
    documented settings does to a copy, and in direction and size (1 - cosine and the norm ratio
    within bf16's 2e-2: torch runs Newton-Schulz in bf16, elementwise several percent off) a
    float64 -lr * sqrt(max(1, rows/cols)) * NS(g) after decay (1 - lr * wd) (the first Nesterov
    update is a multiple of g, and NS divides by the norm). AdamW's parameters: -lr * g / (|g| +
    eps) after its decay (the bias-corrected first step), in float64."""
    model = small_model(backend="torch").double()  # float64: a 1e-3 step of a weight near 1 stays exact
    opt = optim.build(model, "muon", "cpu", **MUON)
    optim.set_lr(opt, 1e-3)
    idx = torch.randint(0, 100, (2, 16))
    model(idx, idx)[1].backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    in_muon = {id(p) for p in optim.hidden_matrices(model)}
    decayed = {id(p) for g in opt.parts["adamw"].param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        old, g = before[name], grads[name]
        if id(p) in in_muon:
            alone = torch.nn.Parameter(old.clone())
            alone.grad = g.clone()
            torch.optim.Muon([alone], lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True).step()
            assert torch.equal(p.detach(), alone.detach()), name
            lr = MUON["muon_lr"] * math.sqrt(max(1, p.shape[0] / p.shape[1]))
            step = p.detach() - old * (1 - MUON["muon_lr"] * MUON["muon_weight_decay"])
            expected = -lr * newton_schulz64(g)
            cosine = (step * expected).sum() / (step.norm() * expected.norm())
            ratio = step.norm() / expected.norm()
            assert 1 - cosine <= 2e-2 and abs(ratio - 1) <= 2e-2, (name, cosine.item(), ratio.item())  # bf16's
        else:
            wd = MUON["weight_decay"] if id(p) in decayed else 0.0
            expected = old * (1 - 1e-3 * wd) - 1e-3 * g / (g.abs() + 1e-8)
            assert_rel_close(p.detach() - old, expected - old, 1e-5, name)


def test_schedule_scales_each_group_to_its_own_peak():
    model = small_model()
    opt = optim.build(model, "muon", "cpu", **MUON)
    optim.set_lr(opt, 5e-4)  # half of lr's peak
    assert {g["lr"] for g in opt.parts["adamw"].param_groups} == {5e-4}
    assert [g["lr"] for g in opt.parts["muon"].param_groups] == [pytest.approx(0.01, rel=1e-12)]
    adamw = optim.build(model, "adamw", "cpu", **MUON)
    optim.set_lr(adamw, 5e-4)
    assert isinstance(adamw, torch.optim.AdamW) and {g["lr"] for g in adamw.param_groups} == {5e-4}


def test_muon_lowers_the_loss_and_resumes_bitwise_with_both_states(tiny_data, tmp_path):
    n = 4
    a, b = assert_resume_bitwise(tiny_flags, tiny_data, tmp_path, n, optimizer="muon", grad_accum=2, dropout=0.1,
                                 eval_interval=n)
    full = tmp_path / "full"
    assert set(a["optimizer"]) == {"muon", "adamw"}
    muon_state = a["optimizer"]["muon"]["state"]
    assert len(muon_state) == 2 * 4 and all("momentum_buffer" in s for s in muon_state.values())
    assert all(int(s["step"]) == 2 * n for s in a["optimizer"]["adamw"]["state"].values())
    for part in ("muon", "adamw"):
        for key, state in a["optimizer"][part]["state"].items():
            for field, value in state.items():
                assert torch.equal(value, b["optimizer"][part]["state"][key][field]), (part, key, field)
    val = [r["val_loss"] for r in metrics(full) if "val_loss" in r]
    losses = [r["loss"] for r in metrics(full) if "loss" in r]
    assert len(val) == 2 and val[1] < val[0] and losses[-1] < losses[0] - 0.3, (val, losses)
    assert all(r["train_s"] > 0 for r in metrics(full) if "val_loss" in r)


def test_resuming_with_the_other_optimizer_is_one_error(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_flags(tiny_data, out, max_steps=2)) == 0
    with pytest.raises(TritonGPTError, match="optimizer adamw; this run has --optimizer muon"):
        run({"out": str(out), "resume": "true", "max_steps": "4", "optimizer": "muon"})


def test_muon_with_fsdp_or_bad_values_is_refused_in_one_line(tiny_data, tmp_path):
    with pytest.raises(TritonGPTError, match="--optimizer muon needs whole weight matrices"):
        config.configure(tiny_flags(tiny_data, tmp_path / "a", optimizer="muon", parallel="fsdp"))
    for key, value in (("muon_lr", "0"), ("muon_momentum", "1.0"), ("muon_weight_decay", "-0.1")):
        with pytest.raises(TritonGPTError, match=key):
            config.configure(tiny_flags(tiny_data, tmp_path / "b", optimizer="muon", **{key: value}))
    done = subprocess.run([sys.executable, "-m", "tritongpt", "train", "--optimizer", "muon", "--parallel", "fsdp",
                           "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--parallel fsdp" in done.stderr
    assert not (tmp_path / "c").exists()


def test_converge_summary_finds_the_first_evaluation_at_the_target():
    def points(name, losses):
        return [{"optimizer": name, "step": 10 * (i + 1), "tokens": 100 * (i + 1), "train_s": 1.5 * (i + 1),
                 "val_loss": loss} for i, loss in enumerate(losses)]
    curves = {"adamw": points("adamw", [5.0, 4.0, 3.5, 3.0]), "muon": points("muon", [4.5, 3.2, 2.9, 2.5]),
              "sgd": points("sgd", [6.0, 5.5, 5.0, 4.8])}
    target, rows = converge.summarize(curves, None)
    assert target == 3.0  # adamw's final val loss
    by = {r["optimizer"]: r for r in rows}
    assert (by["adamw"]["steps_to_target"], by["adamw"]["steps_vs_first"]) == (40, 1.0)
    assert (by["muon"]["steps_to_target"], by["muon"]["tokens_to_target"], by["muon"]["train_s_to_target"]) == \
        (30, 300, 4.5)
    assert by["muon"]["steps_vs_first"] == 0.75
    assert by["sgd"]["steps_to_target"] is None and by["sgd"]["note"] == "not reached"
    target, rows = converge.summarize(curves, 3.3)
    assert [r["steps_to_target"] for r in rows] == [40, 20, None]


def test_converge_command_writes_curves_and_summary(tiny_data, tmp_path):
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "tritongpt", "bench", "converge", "--quick", "--data", str(tiny_data),
            "--max-steps", "6", "--eval-interval", "3", "--out", str(out),
            "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
            "--set", "eval_steps=2", "--set", "backend=torch", "--set", "warmup_steps=2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    csv = next(out.glob("converge_*.csv")).read_text().splitlines()
    assert csv[0] == "optimizer,step,tokens,train_s,val_loss"
    assert [line.split(",")[:2] for line in csv[1:]] == [["adamw", "3"], ["adamw", "6"], ["muon", "3"], ["muon", "6"]]
    assert all(math.isfinite(float(line.split(",")[4])) for line in csv[1:])
    assert "target val loss" in done.stdout and "steps_to_target" in done.stdout
    assert next(out.glob("converge_*.json")).stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "tritongpt", "bench", "converge", "--set", "optimizer=sgd"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "optimizer" in bad.stderr
