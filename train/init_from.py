"""Starting a run from existing weights (nanoGPT's fine-tuning workflow).

    tritongpt train --init-from hf:path/to/gpt2 --data datasets/shakespeare --lr 3e-5 --max-steps 200
    tritongpt train --init-from ckpt:runs/small --out runs/small-ft       # weights only: fresh optimizer, step 0
    tritongpt train --init-from hf:path/to/SmolLM2-135M --data DIR --block-size 2048   # a LlamaForCausalLM

The model's settings come from the source (a Hugging Face GPT-2 or Llama directory, as `sample --hf`
reads, or a tritongpt checkpoint file or run directory). Settings that may differ from the
source (CHANGEABLE: dropout, label smoothing, a smaller block_size, the backends) are applied; any
other model setting given in a flag or config file that contradicts the source is one error
naming it. Nothing of the source's optimizer, schedule or data position is kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from tritongpt.errors import TritonGPTError, require
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.model.hf import config_from_hf, load_hf
from tritongpt.train import checkpoint

CHANGEABLE = {"dropout", "label_smoothing", "block_size", "backend", *MODEL_OPS}
KINDS = ("hf", "ckpt")


def parse(spec: str) -> tuple[str, Path]:
    """("hf" | "ckpt", path) of an --init-from value."""
    kind, sep, path = spec.partition(":")
    require(bool(sep) and kind in KINDS and path,
            f"init_from must be hf:DIR (a Hugging Face GPT-2 or Llama directory) or ckpt:PATH (a tritongpt "
            f"checkpoint or run directory), got {spec!r}")
    return kind, Path(path).expanduser()


def source_config(spec: str) -> dict[str, Any]:
    """The GPTConfig fields of the source (its backends left to the run)."""
    kind, path = parse(spec)
    if kind == "hf":
        require(path.is_dir(), f"init_from: {path} is not a directory (expected config.json + model.safetensors)")
        require((path / "config.json").is_file(), f"init_from: {path / 'config.json'} not found")
        config = config_from_hf(json.loads((path / "config.json").read_text()))
    else:
        flat = checkpoint.config_of(checkpoint.load(path, "cpu"))
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in flat.items() if k in fields})
    shape = dataclasses.asdict(config)
    for op in (*MODEL_OPS, "backend"):
        shape[op] = None
    return shape


def merge(source: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The source's model fields with the `given` ones (flags, config file) applied where they may
    differ; a contradiction of any other field is a TritonGPTError naming it."""
    for key, value in given.items():
        if key not in CHANGEABLE and value != source[key]:
            raise TritonGPTError(f"init_from: {key} = {value!r} contradicts the source's {key} = {source[key]!r} "
                                 f"(only {', '.join(sorted(CHANGEABLE))} may differ)")
    merged = {**source, **{k: v for k, v in given.items() if k in CHANGEABLE}}
    require(merged["block_size"] <= source["block_size"],
            f"init_from: block_size {merged['block_size']} exceeds the source's {source['block_size']}")
    return merged


def copy_source_weights(model: torch.nn.Module, spec: str) -> None:
    """Copy the weights of the --init-from source `spec` into `model` (whose config came from
    `merge`): the position embedding is cropped to the model's block_size."""
    kind, path = parse(spec)
    if kind == "hf":
        state = load_hf(path, backend="torch", block_size=model.config.block_size).state_dict()
    else:
        state = checkpoint.load(path, "cpu")["model"]
        if "transformer.wpe.weight" in state:
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:model.config.block_size]
    checkpoint.load_model_state(model, state, spec)
