"""Hugging Face GPT-2 import/export against real transformers models built from small random
configs (nothing downloaded): same logits and loss, same greedy tokens, both directions."""

from __future__ import annotations

import json

import pytest
import torch
from _util import assert_rel_close, tol
from test_model import random_state, tiny_config

from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT
from tritongpt.model.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")
HF_VOCAB = 100


def hf_model(seed: int = 0, **config):
    """A GPT2LMHeadModel with every parameter randomized (biases and LayerNorms included)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**dict(vocab_size=HF_VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=0), **config})
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def ids(b: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (b, t), generator=torch.Generator().manual_seed(1))


def assert_same_model(ours: GPT, theirs) -> None:
    """Our fp32 logits and loss within fp32 tolerance of HF's in float64; same greedy tokens."""
    theirs = theirs.double()
    idx = ids()
    with torch.no_grad():
        ref = theirs(idx, labels=idx)
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)  # HF shifts labels inside
    _, loss = ours(idx, targets)
    logits = ours.logits(ours.hidden_states(idx))
    assert_rel_close(logits, ref.logits, tol(torch.float32), "logits")
    assert_rel_close(loss, ref.loss, tol(torch.float32), "loss")
    prompt = idx[:, :4]
    expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))
    got = ours.double().generate(prompt, 12, temperature=0.0)
    assert torch.equal(got, expected)
    assert len(set(got[:, 4:].flatten().tolist())) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_load_hf_matches_transformers(tmp_path, weights):
    theirs = hf_model()
    if weights == "safetensors":
        theirs.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:  # the older format: a state dict pickled by torch, HF's own key names and Conv1D layout
        theirs.config.to_json_file(tmp_path / "config.json")
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_hf(tmp_path, backend="torch")
    assert ours.config.real_vocab_size == HF_VOCAB and ours.config.vocab_size == 128
    assert (ours.transformer.wte.weight[HF_VOCAB:] == 0).all()
    assert_same_model(ours, theirs)


def test_load_hf_untied_lm_head(tmp_path):
    theirs = hf_model(tie_word_embeddings=False)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, backend="torch")
    assert not ours.config.tie_embeddings
    assert_same_model(ours, theirs)


def test_save_hf_loads_in_transformers(tmp_path):
    config = tiny_config(pos_embedding="learned")
    ours = GPT(config)
    ours.load_state_dict(random_state(config))
    out = save_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
    assert json.loads((out / "config.json").read_text())["vocab_size"] == config.real_vocab_size
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert theirs.transformer.wte.weight.shape == (config.real_vocab_size, config.n_embd)
    assert_same_model(ours, theirs)
    back = load_hf(out, backend="torch")  # and back again: the same weights, padding rows zero
    for name, tensor in back.state_dict().items():
        original = ours.state_dict()[name].float()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor, original = tensor[:config.real_vocab_size], original[:config.real_vocab_size]
        assert torch.equal(tensor, original), name


def test_save_hf_refuses_and_replaces(tmp_path):
    with pytest.raises(TritonGPTError, match="pos_embedding"):
        save_hf(GPT(tiny_config(pos_embedding="rope")), tmp_path / "rope")
    with pytest.raises(TritonGPTError, match="n_kv_head"):
        save_hf(GPT(tiny_config(n_kv_head=2)), tmp_path / "gqa")
    assert list(tmp_path.iterdir()) == []  # refused before writing anything
    first, second = GPT(tiny_config()), GPT(tiny_config(n_layer=1))
    save_hf(first, tmp_path / "m")
    with pytest.raises(TritonGPTError, match="exists"):
        save_hf(second, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["n_layer"] == 2
    save_hf(second, tmp_path / "m", overwrite=True)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["n_layer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_hf_overrides_and_errors(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path / "hf")
    cropped = load_hf(tmp_path / "hf", block_size=16, attention="sdpa")
    assert cropped.config.block_size == 16 and cropped.backend_names()["attention"] == "sdpa"
    assert torch.equal(cropped.transformer.wpe.weight, theirs.transformer.wpe.weight[:16].float())
    with pytest.raises(TritonGPTError, match="n_positions"):
        load_hf(tmp_path / "hf", block_size=64)
    with pytest.raises(TritonGPTError, match="cannot override n_layer"):
        load_hf(tmp_path / "hf", n_layer=3)
    with pytest.raises(TritonGPTError, match="not a directory"):
        load_hf(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TritonGPTError, match="config.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(TritonGPTError, match="no model.safetensors"):
        load_hf(tmp_path / "hf")
    theirs.config.activation_function = "relu"
    theirs.config.to_json_file(tmp_path / "hf" / "config.json")
    with pytest.raises(TritonGPTError, match="activation_function"):
        load_hf(tmp_path / "hf")
