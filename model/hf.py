"""Hugging Face GPT-2 checkpoints <-> GPT.

    from tritongpt.model.hf import load_hf, save_hf
    model = load_hf("path/to/gpt2")            # a directory with config.json + model.safetensors
    model = load_hf("path/to/gpt2", attention="sdpa", block_size=256)
    save_hf(model, "out/gpt2-finetuned")       # config.json + model.safetensors, loadable by
                                               # transformers.GPT2LMHeadModel.from_pretrained

HF's GPT-2 stores its Linear layers as Conv1D, weights (in, out): they are transposed on the
way in and out. Its 50257-row embedding is padded here to a multiple of 64 rows (zeros, never
predicted: real_vocab_size keeps the true size), and the padding is dropped on export.
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

# GPT-2's Conv1D weights, stored (in, out): transposed to nn.Linear's (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF buffers (causal masks) some checkpoints carry; no counterpart here
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# GPTConfig fields load_hf lets the caller choose; the rest come from config.json
LOAD_OVERRIDES = (*MODEL_OPS, "backend", "dropout", "label_smoothing", "block_size", "vocab_size")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
VOCAB_MULTIPLE = 64


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json (as a dict), with LOAD_OVERRIDES fields replaced."""
    require(hf.get("model_type", "gpt2") == "gpt2",
            f"load_hf: model_type must be 'gpt2', got {hf.get('model_type')!r}")
    require(hf.get("activation_function", "gelu_new") in TANH_GELUS,
            f"load_hf: activation_function must be one of {TANH_GELUS} (tanh GELU), "
            f"got {hf.get('activation_function')!r}")
    require(math.isclose(hf.get("layer_norm_epsilon", 1e-5), 1e-5),
            f"load_hf: layer_norm_epsilon must be 1e-5, got {hf.get('layer_norm_epsilon')!r}")
    require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
            "load_hf: only 1/sqrt(head_dim) attention scaling is supported (scale_attn_weights=true, "
            "scale_attn_by_inverse_layer_idx=false)")
    unknown = sorted(set(overrides) - set(LOAD_OVERRIDES))
    require(not unknown, f"load_hf: cannot override {', '.join(unknown)} (fixed by the checkpoint); "
                         f"overridable: {', '.join(LOAD_OVERRIDES)}")
    n_embd, n_positions, real_vocab = hf["n_embd"], hf["n_positions"], hf["vocab_size"]
    n_inner = hf.get("n_inner") or 4 * n_embd
    require(n_inner % n_embd == 0, f"load_hf: n_inner ({n_inner}) must be a multiple of n_embd ({n_embd})")
    block_size = overrides.pop("block_size", n_positions)
    require(block_size <= n_positions,
            f"load_hf: block_size {block_size} exceeds the checkpoint's n_positions {n_positions}")
    fields = dict(vocab_size=-(-real_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, real_vocab_size=real_vocab,
                  block_size=block_size, n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                  mlp_ratio=n_inner // n_embd, bias=True, pos_embedding="learned",
                  tie_embeddings=hf.get("tie_word_embeddings", True))
    return GPTConfig(**{**fields, **overrides})


def load_hf(directory: str | os.PathLike, **overrides) -> GPT:
    """A GPT (fp32, CPU) holding the weights of the GPT-2 checkpoint in `directory`.
    `overrides`: backends, dropout, label_smoothing, a smaller block_size (wpe is cropped), or
    a larger padded vocab_size."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TritonGPTError(f"load_hf: {directory} is not a directory (expected config.json + model.safetensors)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise TritonGPTError(f"load_hf: {config_path} not found")
    config = config_from_hf(json.loads(config_path.read_text()), **overrides)
    weights = {k.removeprefix("transformer."): v for k, v in _read_weights(directory).items()
               if not k.endswith(IGNORED_SUFFIXES)}
    model = GPT(config)
    used = set()
    with torch.no_grad():
        for name, param in model.state_dict().items():  # tensors sharing the parameters' storage
            key = name.removeprefix("transformer.")
            if key == "lm_head.weight" and config.tie_embeddings:
                used.add(key)  # the same tensor as wte.weight (some checkpoints store it twice)
                continue
            if key not in weights:
                raise TritonGPTError(f"load_hf: checkpoint in {directory} has no tensor {key!r}")
            src = weights[key].t() if key.endswith(CONV1D_WEIGHTS) else weights[key]
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
        raise TritonGPTError(f"load_hf: checkpoint tensors with no GPT-2 counterpart: {', '.join(unused[:5])}")
    return model


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


def hf_config(config: GPTConfig) -> dict:
    """The GPT-2 config.json dict for `config`; TritonGPTError naming a field GPT-2 cannot express."""
    for ok, field in ((config.pos_embedding == "learned", "pos_embedding (GPT-2 has learned positions)"),
                      (config.bias, "bias (GPT-2 has biases)"),
                      (config.kv_heads == config.n_head, "n_kv_head (GPT-2 has no grouped-query attention)"),
                      (config.window is None, "window (GPT-2 has no sliding-window attention)")):
        if not ok:
            raise TritonGPTError(f"save_hf: cannot export to GPT-2 format: {field}")
    special = {"bos_token_id": 50256, "eos_token_id": 50256} if config.real_vocab_size == 50257 else {}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.real_vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.mlp_ratio * config.n_embd,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
            "tie_word_embeddings": config.tie_embeddings, **special}


def save_hf(model: GPT, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as a GPT-2 checkpoint directory (config.json + model.safetensors), built in
    a temporary sibling directory and renamed into place. An existing `directory` is replaced
    only with overwrite=True."""
    from safetensors.torch import save_file  # lazy: the optional hf extra

    directory = Path(directory)
    config = hf_config(model.config)
    if directory.exists() and not overwrite:
        raise TritonGPTError(f"save_hf: {directory} exists (pass overwrite=True to replace it)")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # GPT-2 ties it to transformer.wte.weight
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:model.config.real_vocab_size]  # drop the padding rows
        tensors[name] = tensor.contiguous().clone()
    with staged_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    return directory
