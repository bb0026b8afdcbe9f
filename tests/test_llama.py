"""The Llama form of the model (RMSNorm, SwiGLU, RoPE, GQA, no biases) in training: the
llama-tiny preset trains with every backend combination usable here and resumes bitwise, its
backends and form are recorded in checkpoints, the parameter count and FLOPs count SwiGLU's
three matrices and RMSNorm's bias-free gains, and ops a model does not call are left alone."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from test_train import assert_resume_bitwise, metrics, prepare_tiny, run, tiny_flags

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.model.gpt import GPT
from tritongpt.train import checkpoint, config
from tritongpt.train.auto import resolve_backends
from tritongpt.train.cli import add_arguments

LLAMA_OPS = ("attention", "rms_norm", "swiglu_mlp", "linear_cross_entropy")
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint"


def llama_flags(data: Path, out: Path, **overrides) -> dict[str, str]:
    """A very small llama-tiny run: 2 layers, 2 query heads sharing 1 KV head, SwiGLU hidden 48."""
    return tiny_flags(data, out, **{**dict(preset="llama-tiny", n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                           ffn_hidden=48), **overrides})


def combos():
    """(choices): all torch, all triton, and each op of the Llama form alone on each of its
    other backends usable on this machine (with gradients)."""
    yield pytest.param({"backend": "torch"}, id="all-torch")
    yield pytest.param({"backend": "triton"}, id="all-triton")
    for op in LLAMA_OPS:
        for name in registry.backends(op):
            if name != "torch" and registry.usable(op, name):
                yield pytest.param({"backend": "torch", op: name}, id=f"{op}-{name}")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("llama_tiny"), chars=20_000)


@pytest.mark.parametrize("choices", list(combos()))
def test_llama_tiny_trains_with_each_backend_combination(tiny_data, tmp_path, choices):
    out = tmp_path / "out"
    flags = llama_flags(tiny_data, out, max_steps=2, batch_size=2, block_size=16, eval_steps=1, **choices)
    assert run(flags) == 0
    records = [r for r in metrics(out) if "loss" in r]
    expected = {op: choices.get(op, choices["backend"]) for op in LLAMA_OPS}
    assert records[0]["backends"] == expected  # the ops the model calls, and only those
    assert 5.0 < records[0]["loss"] < 12.0 and records[-1]["step"] == 2
    saved = checkpoint.read_config(checkpoint.latest(out))
    assert (saved["normalization"], saved["ffn"], saved["pos_embedding"], saved["n_kv_head"],
            saved["ffn_hidden"]) == ("rmsnorm", "swiglu", "rope", 1, 48)
    assert saved["layer_norm"] is None and saved["mlp"] is None  # not called: never resolved


def test_llama_tiny_resumes_bitwise(tiny_data, tmp_path):
    """2N steps in one go == N steps, then resumed for N more (dropout on, grad_accum 2)."""
    a, _ = assert_resume_bitwise(llama_flags, tiny_data, tmp_path, 3, dropout=0.1, grad_accum=2)
    assert any(name.endswith("mlp.gate_proj.weight") for name in a["model"])
    model, _ = checkpoint.load_model(tmp_path / "half", backend="torch")
    assert model.config.normalization == "rmsnorm" and model.config.ffn == "swiglu"


def llama_param_count(c: GPTConfig) -> int:
    """Parameters of a tied Llama-form GPT, counted by hand: embedding; per layer two RMSNorm
    gains, q / k / v / o (k, v with n_kv_head heads) and SwiGLU's gate, up and down; final norm."""
    kv = c.kv_heads * c.head_dim
    per_layer = 2 * c.n_embd + c.n_embd * (c.n_embd + 2 * kv) + c.n_embd * c.n_embd + 3 * c.n_embd * c.hidden
    return c.vocab_size * c.n_embd + c.n_layer * per_layer + c.n_embd


@pytest.mark.parametrize("preset, published", [("llama-tiny", None), ("smollm-135m", 134_515_008)])
def test_parameter_count_and_flops_count_swiglu_and_rmsnorm(preset, published):
    c = GPTConfig.from_preset(preset, backend="torch")
    with torch.device("meta"):  # SmolLM2's 135M parameters without allocating them
        model = GPT(c)
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    assert model.num_params() == llama_param_count(c)
    if published is not None:  # HuggingFaceTB/SmolLM2-135M's model card
        assert model.num_params() == published
    assert model.flops_per_token() == 6 * llama_param_count(c) + 12 * c.n_layer * c.n_embd * c.block_size


def test_ops_a_model_does_not_call_are_left_alone():
    """A GPT-2 ignores rms_norm / swiglu_mlp choices (even unknown ones) and a Llama the
    layer_norm / mlp ones; auto resolution fills only the ops the model calls."""
    gpt2 = GPTConfig.from_preset("tiny", rms_norm="nosuch", backend="torch")
    assert gpt2.ops == ("attention", "layer_norm", "mlp", "linear_cross_entropy")
    resolved = resolve_backends(gpt2, torch.device("cpu"))
    assert resolved.rms_norm == "nosuch" and resolved.swiglu_mlp is None and resolved.layer_norm == "torch"
    llama = GPTConfig.from_preset("llama-tiny", layer_norm="nosuch", mlp="nosuch")
    assert llama.ops == LLAMA_OPS
    model = GPT(llama)
    assert set(model.backend_names()) == set(LLAMA_OPS)
    model.set_backends(mlp="nosuch-either", swiglu_mlp="torch")
    assert model.backend_names()["swiglu_mlp"] == "torch"
    with pytest.raises(TritonGPTError, match="unknown swiglu_mlp backend 'nosuch'"):
        model.set_backends(swiglu_mlp="nosuch")


def test_new_fields_are_flags_and_env_vars():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = vars(parser.parse_args(["--rms-norm", "torch", "--swiglu-mlp", "torch", "--normalization", "rmsnorm",
                                   "--ffn", "swiglu", "--ffn-hidden", "40", "--norm-eps", "1e-6"]))
    assert args == dict(config=None, rms_norm="torch", swiglu_mlp="torch", normalization="rmsnorm", ffn="swiglu",
                        ffn_hidden="40", norm_eps="1e-6")
    assert all(registry.env_var(op) in parser.epilog for op in MODEL_OPS)
    cfg = config.resolve({"preset": "tiny", "normalization": "rmsnorm", "ffn": "swiglu", "bias": "false",
                          "ffn_hidden": "40"}, env={"TRITONGPT_RMS_NORM": "torch", "TRITONGPT_SWIGLU_MLP": "triton"})
    assert (cfg.model.rms_norm, cfg.model.swiglu_mlp, cfg.model.hidden, cfg.model.n_embd) == ("torch", "triton", 40,
                                                                                                64)
    with pytest.raises(TritonGPTError, match="ffn='swiglu' has no biases"):
        config.resolve({"preset": "llama-tiny", "bias": "true"})


def test_legacy_checkpoint_loads_as_gpt2():
    flat = checkpoint.read_config(LEGACY / "run" / "ckpt_0000002.pt")
    assert "normalization" not in flat and "ffn" not in flat  # written before the fields existed
    model, _ = checkpoint.load_model(LEGACY / "run", backend="torch")
    assert (model.config.normalization, model.config.ffn, model.config.norm_eps) == ("layernorm", "gelu", 1e-5)
    assert set(model.backend_names()) == set(model.config.ops) == {"attention", "layer_norm", "mlp",
                                                                   "linear_cross_entropy"}
