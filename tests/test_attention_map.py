"""`tritongpt attention-map`: the attention weights it plots are the model's (checked against
transformers' own attentions and against the model's attention output), and the command
writes its images from a real Hugging Face export and a real training checkpoint."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from _util import assert_rel_close, tol
from test_model import VARIANTS, random_state, tiny_config

from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT
from tritongpt.model.hf import load_hf, save_hf
from tritongpt.train import attention_map

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_weights_match_transformers_attentions(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager"))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    theirs.eval().save_pretrained(tmp_path)
    idx = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.double()(idx, output_attentions=True).attentions  # per layer (B, H, T, T)
    probs = attention_map.attention_probs(load_hf(tmp_path, backend="torch"), idx, [0, 1])
    for layer in (0, 1):
        assert_rel_close(probs[layer], expected[layer], tol(torch.float32), f"layer {layer} weights")


def test_weights_reproduce_the_models_attention_output():
    """For a GQA + RoPE + sliding-window model: weights @ v == what the attention op fed c_proj,
    and the weights are zero outside the window."""
    config = tiny_config(**VARIANTS["gqa-rope-window"])
    model = GPT(config).double()
    model.load_state_dict(random_state(config))
    idx = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    seen = {}
    attn = model.transformer.h[1].attn
    handles = [attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], rope=args[1])),
               attn.c_proj.register_forward_pre_hook(lambda m, args: seen.update(y=args[0]))]
    probs = attention_map.attention_probs(model, idx, [1])[1]  # (B, H, T, T)
    for handle in handles:
        handle.remove()
    _, _, v = attn.qkv(seen["x"], seen["rope"])
    v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=2)  # (B, T, H, D)
    out = torch.einsum("bhts,bshd->bthd", probs.double(), v).flatten(2)
    assert_rel_close(out, seen["y"], tol(torch.float32), "weights @ v")
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    outside = (j > i) | (j <= i - config.window)
    assert (probs[..., outside] == 0).all()
    assert_rel_close(probs.sum(-1), torch.ones(2, 4, 12), tol(torch.float32), "row sums")


def test_position_similarity():
    learned = GPT(tiny_config())
    sim = attention_map.position_similarity(learned)
    assert sim.shape == (32, 32)
    assert_rel_close(sim.diagonal(), torch.ones(32), tol(torch.float32), "self-similarity")
    sinusoidal = attention_map.position_similarity(GPT(tiny_config(pos_embedding="sinusoidal")))
    assert sinusoidal[0, 1] > sinusoidal[0, 20]  # nearby positions look alike
    assert attention_map.position_similarity(GPT(tiny_config(pos_embedding="rope"))) is None


def run_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    attention_map.add_arguments(parser)
    return attention_map.run(parser.parse_args(list(argv)))


@pytest.fixture
def gpt2_vocab_export(tmp_path):
    """A tiny GPT with GPT-2's vocabulary, exported in Hugging Face format; the encoding."""
    pytest.importorskip("matplotlib")
    try:
        from tritongpt.data.tokenizer import get_encoding
        enc = get_encoding("gpt2")
    except (ImportError, TritonGPTError) as exc:
        pytest.skip(f"GPT-2 tokenizer unavailable: {exc}")
    model = GPT(tiny_config(vocab_size=50304, real_vocab_size=50257))
    return save_hf(model, tmp_path / "hf"), model, enc


def test_command_writes_heat_maps_from_hf_export(gpt2_vocab_export, tmp_path):
    directory, _, _ = gpt2_vocab_export
    out = tmp_path / "attn.png"
    assert run_command("--hf", str(directory), "--text", "Hello world, hello", "--layer", "1", "--out", str(out)) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "attn_positions.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn.png", "attn_positions.png", "hf"]
    with pytest.raises(TritonGPTError, match="--head 9 out of range"):
        run_command("--hf", str(directory), "--text", "Hi", "--head", "9", "--out", str(out))


def test_command_reads_training_checkpoint(gpt2_vocab_export, tmp_path):
    checkpoint = pytest.importorskip("tritongpt.train.checkpoint")
    _, model, _ = gpt2_vocab_export
    config = dataclasses.replace(model.config, attention="triton")  # recorded backends are overridden
    checkpoint.save(tmp_path / "run", {"step": 3, "model": model.state_dict(), "config": dataclasses.asdict(config),
                                       "tokenizer": "gpt2"})
    out = tmp_path / "ckpt.png"
    assert run_command("--ckpt", str(tmp_path / "run"), "--text", "To be, or not", "--out", str(out)) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    cli = pytest.importorskip("tritongpt.cli")
    try:
        code = cli.main(["attention-map", "--hf", str(tmp_path / "none"), "--text", "x",
                         "--out", str(tmp_path / "a.png")])
    except ImportError as exc:  # another subcommand's module not written yet
        pytest.skip(f"tritongpt CLI incomplete: {exc}")
    assert code == 2
    assert "not a directory" in capsys.readouterr().err
