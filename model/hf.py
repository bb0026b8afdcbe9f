"""Hugging Face GPT-2 and Llama checkpoints <-> GPT.

    from tritongpt.model.hf import load_hf, save_hf
    model = load_hf("path/to/gpt2")            # a directory with config.json + model.safetensors
    model = load_hf("path/to/SmolLM2-135M", attention="sdpa", block_size=2048)   # a LlamaForCausalLM
    save_hf(model, "out/finetuned")            # config.json + model.safetensors, loadable by
                                               # transformers' GPT2LMHeadModel / LlamaForCausalLM

The family comes from config.json's model_type on the way in ("gpt2" or "llama") and from the
model's form on the way out (LayerNorm + GELU MLP: GPT-2; RMSNorm + SwiGLU + RoPE: Llama).
HF's GPT-2 stores its Linear layers as Conv1D, weights (in, out): they are transposed on the way
in and out. HF's Llama keeps q_proj, k_proj, v_proj apart: they are stacked into our fused c_attn
(rows q, then k, then v) and split again on export; o_proj is attn.c_proj, input_layernorm /
post_attention_layernorm are ln_1 / ln_2, model.norm is ln_f. HF's Llama rotates the halves of
each head (rotate_half: dims i and i + D/2 form a pair), the layout of our RoPE
(layers.apply_rope), so q_proj / k_proj rows need no permutation (Meta's original checkpoints
pair neighbours, 2i and 2i + 1: transformers' conversion script permutes them into this layout).
The embedding is padded here to a multiple of 64 rows (zeros, never predicted: real_vocab_size
keeps the true size), and the padding is dropped on export.
Weights load from model.safetensors (or a sharded model.safetensors.index.json), else
pytorch_model.bin. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from tritongpt.errors import TritonGPTError, require
from tritongpt.files import staged_dir
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.model.gpt import GPT

FAMILIES = ("gpt2", "llama")  # config.json model_types load_hf reads
POSITIONS_KEY = {"gpt2": "n_positions", "llama": "max_position_embeddings"}  # each family's longest sequence
# GPT-2's Conv1D weights, stored (in, out): transposed to nn.Linear's (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF buffers (causal masks) some checkpoints carry; no counterpart here
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# GPTConfig fields load_hf lets the caller choose; the rest come from config.json
LOAD_OVERRIDES = (*MODEL_OPS, "backend", "dropout", "label_smoothing", "block_size", "vocab_size")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
VOCAB_MULTIPLE = 64


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a GPT-2 or Llama config.json (as a dict), with LOAD_OVERRIDES fields replaced."""
    family = hf.get("model_type", "gpt2")
    require(family in FAMILIES, f"load_hf: model_type must be one of {', '.join(FAMILIES)}, got {family!r}")
    unknown = sorted(set(overrides) - set(LOAD_OVERRIDES))
    require(not unknown, f"load_hf: cannot override {', '.join(unknown)} (fixed by the checkpoint); "
                         f"overridable: {', '.join(LOAD_OVERRIDES)}")
    fields, n_positions = _gpt2_fields(hf) if family == "gpt2" else _llama_fields(hf)
    block_size = overrides.pop("block_size", n_positions)
    require(block_size <= n_positions,
            f"load_hf: block_size {block_size} exceeds the checkpoint's {POSITIONS_KEY[family]} {n_positions}")
    real_vocab = hf["vocab_size"]
    fields.update(vocab_size=-(-real_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, real_vocab_size=real_vocab,
                  block_size=block_size)
    return GPTConfig(**{**fields, **overrides})


def _gpt2_fields(hf: dict) -> tuple[dict, int]:
    """The GPTConfig fields (but vocab and block size) of a GPT-2 config.json, and its n_positions."""
    require(hf.get("activation_function", "gelu_new") in TANH_GELUS,
            f"load_hf: activation_function must be one of {TANH_GELUS} (tanh GELU), "
            f"got {hf.get('activation_function')!r}")
    require(math.isclose(hf.get("layer_norm_epsilon", 1e-5), 1e-5),
            f"load_hf: layer_norm_epsilon must be 1e-5, got {hf.get('layer_norm_epsilon')!r}")
    require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
            "load_hf: only 1/sqrt(head_dim) attention scaling is supported (scale_attn_weights=true, "
            "scale_attn_by_inverse_layer_idx=false)")
    n_embd = hf["n_embd"]
    n_inner = hf.get("n_inner") or 4 * n_embd
    require(n_inner % n_embd == 0, f"load_hf: n_inner ({n_inner}) must be a multiple of n_embd ({n_embd})")
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, mlp_ratio=n_inner // n_embd, bias=True,
                pos_embedding="learned", tie_embeddings=hf.get("tie_word_embeddings", True)), hf["n_positions"]


def _llama_fields(hf: dict) -> tuple[dict, int]:
    """The GPTConfig fields (but vocab and block size) of a Llama config.json, and its
    max_position_embeddings. transformers 4 writes rope_theta / rope_scaling, 5 rope_parameters."""
    require(hf.get("hidden_act", "silu") == "silu", f"load_hf: hidden_act must be 'silu', got {hf.get('hidden_act')!r}")
    for key in ("attention_bias", "mlp_bias"):
        require(not hf.get(key, False), f"load_hf: {key} must be false (tritongpt's Llama has no biases)")
    require(hf.get("pretraining_tp", 1) == 1, f"load_hf: pretraining_tp must be 1, got {hf.get('pretraining_tp')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    require(rope.get("rope_type", rope.get("type", "default")) == "default",
            f"load_hf: only plain RoPE is supported (rope_type 'default'), got {rope!r}")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    require(hf.get("head_dim") in (None, n_embd // n_head),
            f"load_hf: head_dim {hf.get('head_dim')} must be hidden_size / num_attention_heads ({n_embd // n_head})")
    return dict(n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                n_embd=n_embd, ffn_hidden=hf["intermediate_size"], normalization="rmsnorm", ffn="swiglu",
                pos_embedding="rope", bias=False, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                tie_embeddings=hf.get("tie_word_embeddings", False)), hf.get("max_position_embeddings", 2048)


def load_hf(directory: str | os.PathLike, **overrides) -> GPT:
    """A GPT (fp32, CPU) holding the weights of the GPT-2 or Llama checkpoint in `directory`.
    `overrides`: backends, dropout, label_smoothing, a smaller block_size (wpe is cropped), or
    a larger padded vocab_size."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TritonGPTError(f"load_hf: {directory} is not a directory (expected config.json + model.safetensors)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise TritonGPTError(f"load_hf: {config_path} not found")
    hf = json.loads(config_path.read_text())
    config = config_from_hf(hf, **overrides)
    raw = _read_weights(directory)
    family = hf.get("model_type", "gpt2")
    weights = _gpt2_to_ours(raw) if family == "gpt2" else _llama_to_ours(raw, config)
    model = GPT(config)
    used = set()
    with torch.no_grad():
        for name, param in model.state_dict().items():  # tensors sharing the parameters' storage
            key = name.removeprefix("transformer.")
            if key == "lm_head.weight" and config.tie_embeddings:
                used.add(key)  # the same tensor as wte.weight (some checkpoints store it twice)
                continue
            if key not in weights:
                raise TritonGPTError(f"load_hf: checkpoint in {directory} has no tensor for {key!r}")
            src = weights[key]
            used.add(key)
            if key in ("wte.weight", "lm_head.weight"):  # pad the vocab rows with zeros
                src = torch.cat([src, src.new_zeros(config.vocab_size - src.size(0), src.size(1))])
            elif key == "wpe.weight":
                src = src[:config.block_size]
            if src.shape != param.shape:
                raise TritonGPTError(f"load_hf: {key} has shape {tuple(src.shape)}, "
                                     f"the config needs {tuple(param.shape)}")
            param.copy_(src)
    unused = sorted(set(weights) - used)
    if unused:
        raise TritonGPTError(f"load_hf: checkpoint tensors with no {family} counterpart: {', '.join(unused[:5])}")
    return model


# HF Llama's names -> ours (without the "transformer." prefix): per layer (model.layers.{i}. <-> h.{i}.)
# and outside the layers; q_proj, k_proj and v_proj are attn.c_attn's rows (LLAMA_QKV)
LLAMA_LAYER_NAMES = {"input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
                     "self_attn.o_proj.weight": "attn.c_proj.weight", "mlp.gate_proj.weight": "mlp.gate_proj.weight",
                     "mlp.up_proj.weight": "mlp.up_proj.weight", "mlp.down_proj.weight": "mlp.down_proj.weight"}
LLAMA_NAMES = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
               "lm_head.weight": "lm_head.weight"}
LLAMA_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
TO_LLAMA_LAYER_NAMES = {ours: theirs for theirs, ours in LLAMA_LAYER_NAMES.items()}
TO_LLAMA_NAMES = {ours: theirs for theirs, ours in LLAMA_NAMES.items()}
LLAMA_IGNORED = (".rotary_emb.inv_freq",)  # a buffer older checkpoints carry, derived from rope_theta


def _gpt2_to_ours(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's tensors under our names (no "transformer." prefix), Conv1D weights transposed."""
    weights = {k.removeprefix("transformer."): v for k, v in raw.items() if not k.endswith(IGNORED_SUFFIXES)}
    return {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in weights.items()}


def _llama_to_ours(raw: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Llama's tensors under our names; each layer's q_proj, k_proj, v_proj stacked into c_attn.
    A tensor with no counterpart keeps its own name (load_hf then names it)."""
    weights = {}
    for key, tensor in raw.items():
        if key.endswith(LLAMA_IGNORED):
            continue
        layer, sep, rest = key.removeprefix("model.layers.").partition(".")
        if key.startswith("model.layers.") and sep and layer.isdigit() and rest in LLAMA_LAYER_NAMES:
            weights[f"h.{layer}.{LLAMA_LAYER_NAMES[rest]}"] = tensor
        elif key in LLAMA_NAMES:
            weights[LLAMA_NAMES[key]] = tensor
        elif not (key.startswith("model.layers.") and rest in LLAMA_QKV):
            weights[key] = tensor
    for i in range(config.n_layer):
        names = [f"model.layers.{i}.{name}" for name in LLAMA_QKV]
        missing = [name for name in names if name not in raw]
        if missing:
            raise TritonGPTError(f"load_hf: Llama checkpoint has no tensor {missing[0]!r}")
        weights[f"h.{i}.attn.c_attn.weight"] = torch.cat([raw[name] for name in names])
    return weights


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file  # lazy: the optional hf extra
        return load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        from safetensors.torch import load_file  # lazy: the optional hf extra
        weights = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_file(directory / shard))
        return weights
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise TritonGPTError(f"load_hf: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                         f"in {directory}")


def family_of(config: GPTConfig) -> str:
    """The Hugging Face family `config` exports as: "gpt2" for the LayerNorm + GELU MLP form,
    "llama" for any other (whose other fields must then be Llama's)."""
    return "gpt2" if config.normalization == "layernorm" and config.ffn == "gelu" else "llama"


def hf_config(config: GPTConfig) -> dict:
    """The GPT-2 or Llama (family_of) config.json dict for `config`; TritonGPTError naming a field
    that family cannot express."""
    family = family_of(config)
    checks = {"gpt2": ((config.pos_embedding == "learned", "pos_embedding (GPT-2 has learned positions)"),
                       (config.bias, "bias (GPT-2 has biases)"),
                       (config.kv_heads == config.n_head, "n_kv_head (GPT-2 has no grouped-query attention)"),
                       (math.isclose(config.norm_eps, 1e-5), "norm_eps (GPT-2's LayerNorm epsilon is 1e-5)")),
              "llama": ((config.normalization == "rmsnorm", "normalization (Llama has RMSNorm)"),
                        (config.ffn == "swiglu", "ffn (Llama has the SwiGLU MLP)"),
                        (config.pos_embedding == "rope", "pos_embedding (Llama has RoPE)"),
                        (not config.bias, "bias (Llama has no biases)"))}[family]
    for ok, field in (*checks, (config.window is None, "window (no sliding-window attention)")):
        if not ok:
            raise TritonGPTError(f"save_hf: cannot export to {family} format: {field}")
    if family == "llama":
        # rope_theta for transformers 4, rope_parameters for 5 (each ignores the other's key)
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.real_vocab_size,
                "hidden_size": config.n_embd, "intermediate_size": config.hidden, "num_hidden_layers": config.n_layer,
                "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
                "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.block_size,
                "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_base,
                "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}, "rope_scaling": None,
                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
                "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32"}
    special = {"bos_token_id": 50256, "eos_token_id": 50256} if config.real_vocab_size == 50257 else {}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.real_vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.hidden,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
            "tie_word_embeddings": config.tie_embeddings, **special}


def _ours_to_llama(name: str, tensor: torch.Tensor, config: GPTConfig) -> dict[str, torch.Tensor]:
    """{HF Llama name: tensor} of our parameter `name` (c_attn splits into q_proj, k_proj, v_proj)."""
    key = name.removeprefix("transformer.")
    if key in TO_LLAMA_NAMES:
        return {TO_LLAMA_NAMES[key]: tensor}
    layer, _, rest = key.removeprefix("h.").partition(".")
    prefix = f"model.layers.{layer}."
    if rest == "attn.c_attn.weight":
        q_rows, kv_rows = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        return dict(zip((prefix + n for n in LLAMA_QKV), tensor.split([q_rows, kv_rows, kv_rows])))
    return {prefix + TO_LLAMA_LAYER_NAMES[rest]: tensor}


def save_hf(model: GPT, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as a GPT-2 or Llama (family_of) checkpoint directory (config.json +
    model.safetensors), built in a temporary sibling directory and renamed into place. An
    existing `directory` is replaced only with overwrite=True."""
    from safetensors.torch import save_file  # lazy: the optional hf extra

    directory = Path(directory)
    config = hf_config(model.config)
    if directory.exists() and not overwrite:
        raise TritonGPTError(f"save_hf: {directory} exists (pass overwrite=True to replace it)")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied to the token embedding (tie_word_embeddings)
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_WEIGHTS) and config["model_type"] == "gpt2":
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:model.config.real_vocab_size]  # drop the padding rows
        named = {name: tensor} if config["model_type"] == "gpt2" else _ours_to_llama(name, tensor, model.config)
        tensors.update({k: v.contiguous().clone() for k, v in named.items()})
    with staged_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    return directory
