"""Hugging Face Llama import/export against real transformers LlamaForCausalLM models built from
small random configs (nothing downloaded): same logits and loss, same greedy tokens, both
directions, GQA and RoPE's layout included; `--init-from hf:DIR`, `export --hf` and `sample --hf`
(with the directory's tokenizer.json) on the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _util import assert_rel_close, tol
from test_hf import assert_same_model, ids
from test_tokenizer import byte_level_bpe
from test_train import prepare_tiny

from tritongpt.cli import main
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPT
from tritongpt.model.hf import load_hf, save_hf
from tritongpt.model.layers import apply_rope, rope_angles
from tritongpt.train import checkpoint

transformers = pytest.importorskip("transformers")
HF_VOCAB = 100


def hf_llama(seed: int = 0, **config):
    """A LlamaForCausalLM (GQA: 4 query heads, 2 KV heads) with every parameter randomized,
    RMSNorm gains included."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500.0,
                                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0), **config})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def llama_config(**overrides) -> GPTConfig:
    return GPTConfig.from_preset("llama-tiny", **{**dict(vocab_size=128, real_vocab_size=HF_VOCAB, block_size=32,
                                                         n_layer=2, ffn_hidden=96, backend="torch"), **overrides})


@pytest.mark.parametrize("tied", [False, True])
def test_load_llama_matches_transformers(tmp_path, tied):
    theirs = hf_llama(tie_word_embeddings=tied)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_hf(tmp_path, backend="torch")
    c = ours.config
    assert (c.normalization, c.ffn, c.pos_embedding, c.bias, c.tie_embeddings) == ("rmsnorm", "swiglu", "rope",
                                                                                     False, tied)
    assert (c.n_kv_head, c.hidden, c.rope_base, c.norm_eps, c.block_size) == (2, 96, 500.0, 1e-5, 32)
    assert c.real_vocab_size == HF_VOCAB and c.vocab_size == 128
    assert (ours.transformer.wte.weight[HF_VOCAB:] == 0).all()
    assert_same_model(ours, theirs)


def test_rope_layout_needs_no_permutation():
    """HF's q_proj rows land unpermuted in c_attn: rotating q by HF's rotate_half equals ours."""
    theirs = hf_llama()
    attn = theirs.model.layers[0].self_attn
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    positions = torch.arange(5)[None]
    cos, sin = theirs.double().model.rotary_emb(x, positions)
    q = attn.q_proj(x).view(1, 5, 4, 16)  # (B, T, H, D)
    hf_q, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2),
                                                                            cos, sin)
    ours = apply_rope(q, rope_angles(torch.arange(5), 16, 500.0))
    assert_rel_close(ours, hf_q.transpose(1, 2), 1e-6, "rotated q")  # HF's angles are fp32


def test_save_llama_loads_in_transformers_and_round_trips(tmp_path):
    config = llama_config()
    ours = GPT(config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    out = save_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    hf = json.loads((out / "config.json").read_text())
    assert (hf["model_type"], hf["num_key_value_heads"], hf["intermediate_size"]) == ("llama", 2, 96)
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert theirs.model.embed_tokens.weight.shape == (HF_VOCAB, 64)
    layer = theirs.model.layers[1]
    c_attn = ours.transformer.h[1].attn.c_attn.weight
    assert torch.equal(layer.self_attn.q_proj.weight, c_attn[:64])
    assert torch.equal(layer.self_attn.k_proj.weight, c_attn[64:96])
    assert torch.equal(layer.self_attn.v_proj.weight, c_attn[96:])
    assert torch.equal(layer.mlp.down_proj.weight, ours.transformer.h[1].mlp.down_proj.weight)
    assert torch.equal(theirs.model.norm.weight, ours.transformer.ln_f.weight)
    assert_same_model(ours, theirs)
    back = load_hf(out, backend="torch")
    for name, tensor in back.state_dict().items():
        original = ours.state_dict()[name]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor, original = tensor[:HF_VOCAB], original[:HF_VOCAB]
        assert torch.equal(tensor, original), name


def test_llama_refusals(tmp_path):
    with pytest.raises(TritonGPTError, match="cannot export to llama format: pos_embedding"):
        save_hf(GPT(llama_config(pos_embedding="learned")), tmp_path / "learned")
    with pytest.raises(TritonGPTError, match="cannot export to llama format: normalization"):
        save_hf(GPT(llama_config(normalization="layernorm")), tmp_path / "ln")
    with pytest.raises(TritonGPTError, match="cannot export to gpt2 format: norm_eps"):
        save_hf(GPT(llama_config(normalization="layernorm", ffn="gelu", pos_embedding="learned", bias=True,
                                 n_kv_head=None, norm_eps=1e-6)), tmp_path / "eps")
    assert list(tmp_path.iterdir()) == []
    theirs = hf_llama()
    theirs.save_pretrained(tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value, message in (("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                 "rope_type"), ("mlp_bias", True, "mlp_bias"), ("hidden_act", "gelu", "hidden_act")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, key: value}))
        with pytest.raises(TritonGPTError, match=message):
            load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(TritonGPTError, match="max_position_embeddings 32"):
        load_hf(tmp_path / "hf", block_size=64)


def test_init_from_hf_llama_then_export_on_the_cli(tmp_path, tiny_shards):
    """train --init-from hf:DIR starts from the Llama's weights (step-0 loss = HF's), and export
    --hf writes a directory transformers loads with the trained weights."""
    theirs = hf_llama(vocab_size=50304, max_position_embeddings=64)
    theirs.save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    argv = ["train", "--init-from", f"hf:{tmp_path / 'hf'}", "--data", str(tiny_shards), "--out", str(out),
            "--block-size", "16", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1",
            "--eval-interval", "1000", "--eval-steps", "1", "--sample-tokens", "0", "--log-interval", "1",
            "--backend", "torch", "--device", "cpu", "--dtype", "fp32"]
    assert main(argv) == 0
    model, _ = checkpoint.load_model(out, "cpu", backend="torch")
    assert (model.config.normalization, model.config.n_kv_head, model.config.block_size) == ("rmsnorm", 2, 16)
    assert main(["export", "--ckpt", str(out), "--hf", str(tmp_path / "exported")]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    idx = ids(t=16)
    with torch.no_grad():
        expected = exported.double()(idx).logits
    assert_rel_close(model.logits(model.hidden_states(idx)), expected, tol(torch.float32), "logits")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("llama_data"), chars=8_000)


def test_sample_from_an_hf_llama_directory_uses_its_tokenizer(tmp_path, capsys):
    """`sample --hf DIR` of a Llama directory with a tokenizer.json: greedy text = transformers'."""
    directory = byte_level_bpe(tmp_path / "llama", vocab=400)  # byte-level: 256 bytes + merges
    theirs = hf_llama(vocab_size=400)
    theirs.save_pretrained(directory)
    enc = get_encoding(f"hf:{directory}")
    prompt = "ROMEO: the"
    capsys.readouterr()
    assert main(["sample", "--hf", str(directory), "--prompt", prompt, "--max-new-tokens", "10", "--temperature", "0",
                 "--device", "cpu", "--backend", "torch"]) == 0
    printed = capsys.readouterr().out
    idx = torch.tensor([enc.encode(prompt)])
    expected = theirs.double().generate(idx, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(idx))
    assert printed.rstrip("\n") == enc.decode(expected[0].tolist())
