"""`tritongpt attention-map`: heat maps of a model's attention weights over a text.

    tritongpt attention-map --ckpt out/ --text "ROMEO: But soft, what light" --out attn.png
    tritongpt attention-map --hf path/to/gpt2 --text "The cat sat on the mat." --layer 5 --head 1 --out attn.png

One heat map per chosen (layer, head): row i is query token i's attention over the key tokens,
softmax(q k^T / sqrt(D)) under the model's causal (and sliding-window) mask, computed explicitly
from the model's own q and k (RoPE applied) in the plain PyTorch path. Tokens label the axes.
A second file, OUT with a `_positions` suffix, shows the cosine similarity between position
embeddings (learned or sinusoidal; RoPE has none). Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write
from tritongpt.kernels.attention_spec import attention_mask
from tritongpt.model.hf import load_hf
from tritongpt.train import checkpoint

MAX_LABELED_PANELS = 16  # token tick labels only when the figure has at most this many heat maps
TORCH_BACKENDS = dict(backend="torch")  # the reference path, on any machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="PATH", help="run directory (its newest checkpoint) or a ckpt_*.pt file")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face GPT-2 directory (config.json + weights)")
    parser.add_argument("--text", required=True, help="text to tokenize and attend over")
    parser.add_argument("--layer", type=int, default=None, help="layer to plot (default: every layer)")
    parser.add_argument("--head", type=int, default=None, help="head to plot (default: every head)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="image to write")


def attention_probs(model, idx: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: attention weights (B, H, T, T) in fp32} of `model` on idx (B, T): softmax of the
    scaled q k^T with the model's mask, from the q, k each chosen layer computes in forward."""
    captured = {}

    def capture(layer: int):
        def hook(module, args):
            x, rope = args[0], args[1]
            q, k, _ = module.qkv(x, rope)  # (B, T, H, D), (B, T, Hkv, D)
            k = k.repeat_interleave(module.n_head // module.n_kv_head, dim=2)
            scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / module.head_dim ** 0.5
            mask = attention_mask(q.size(1), k.size(1), True, module.window, None, q.device)
            captured[layer] = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).float()
        return hook

    handles = [model.transformer.h[layer].attn.register_forward_pre_hook(capture(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model.hidden_states(idx)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def position_similarity(model) -> torch.Tensor | None:
    """Cosine similarity (block_size, block_size) of the position embeddings; None for RoPE."""
    if model.config.pos_embedding == "learned":
        table = model.transformer.wpe.weight
    elif model.config.pos_embedding == "sinusoidal":
        table = model.pos_table
    else:
        return None
    table = torch.nn.functional.normalize(table.detach().double(), dim=-1)
    return (table @ table.T).float()


def _load(args: argparse.Namespace):
    """(model in eval mode, tokenizer name)."""
    if args.hf:
        return load_hf(args.hf, **TORCH_BACKENDS).eval(), "gpt2"
    ckpt = checkpoint.load(args.ckpt, "cpu")  # as load_model does, keeping the checkpoint's tokenizer name
    return checkpoint.model_from(ckpt, "cpu", source=args.ckpt, **TORCH_BACKENDS), ckpt.get("tokenizer", "gpt2")


def _pick(value: int | None, count: int, name: str) -> list[int]:
    if value is None:
        return list(range(count))
    if not 0 <= value < count:
        raise TritonGPTError(f"--{name} {value} out of range: the model has {count} {name}s (0..{count - 1})")
    return [value]


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=120,
                                              bbox_inches="tight"))


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # lazy: optional (this command's error names the pip install), and slow to import
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TritonGPTError("attention-map needs matplotlib: pip install matplotlib") from exc
    out = Path(args.out)
    if not out.parent.is_dir():
        raise TritonGPTError(f"--out: directory {out.parent} does not exist")
    model, tokenizer = _load(args)
    layers = _pick(args.layer, model.config.n_layer, "layer")
    heads = _pick(args.head, model.config.n_head, "head")
    enc = get_encoding(tokenizer)
    tokens = enc.encode(args.text, allowed_special="all")
    if not 1 <= len(tokens) <= model.config.block_size:
        raise TritonGPTError(f"--text is {len(tokens)} tokens; need 1..{model.config.block_size} (block_size)")
    if max(tokens) >= model.config.real_vocab_size:
        raise TritonGPTError(f"--text has token id {max(tokens)} outside the model's vocabulary "
                             f"({model.config.real_vocab_size}); was it trained with tokenizer {tokenizer!r}?")
    labels = [enc.decode([t]).replace("\n", "\\n") for t in tokens]
    probs = attention_probs(model, torch.tensor([tokens]), layers)

    panels = [(layer, head) for layer in layers for head in heads]
    cols = min(len(heads), 4) if len(layers) == 1 else len(heads)
    rows = -(-len(panels) // cols)
    size = max(3.0, 0.25 * len(tokens))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (layer, head) in zip(axes.flat, panels):
        ax.imshow(probs[layer][0, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer} head {head}", fontsize=8)
        if len(panels) <= MAX_LABELED_PANELS:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("attention weights (row: query token, column: key token)")
    _save(fig, out)
    plt.close(fig)
    print(f"wrote {out} ({len(panels)} heat maps, {len(tokens)} tokens)")

    similarity = position_similarity(model)
    if similarity is None:
        print("RoPE model: no position embeddings to compare")
        return 0
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(similarity.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    fig.colorbar(image, ax=ax)
    ax.set_title(f"{model.config.pos_embedding} position embeddings\ncosine similarity")
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    positions_out = out.with_name(f"{out.stem}_positions{out.suffix}")
    _save(fig, positions_out)
    plt.close(fig)
    print(f"wrote {positions_out}")
    return 0
