"""`tritongpt eval`: multiple-choice accuracy in HellaSwag's format, scored as llm.c scores it.

    tritongpt eval --ckpt out/ --task hellaswag                 # the named asset hellaswag_val.jsonl
    tritongpt eval --hf path/to/gpt2 --task hellaswag --limit 1000
    tritongpt eval --ckpt out/ --task hellaswag --data my_items.jsonl

Each line of the file is one item: {"ctx": context, "endings": [4 candidate endings], "label":
index of the right one} (HellaSwag's own files carry more fields, which are ignored). The four
rows context + " " + ending go through the model in one batch; an ending's score is the summed
log-likelihood of its tokens. `acc` counts items whose best-scored ending is the label, and
`acc_norm` the same with each score divided by its ending's token count (length-normalised).
The file is found like the other named assets (TRITONGPT_ASSETS, the cache, a download with a
checksum as the last resort), so an offline machine works with a local copy. Training runs it
every `--eval-hellaswag-interval` steps.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tritongpt.data.assets import find_asset
from tritongpt.data.tokenizer import get_encoding
from tritongpt.errors import TritonGPTError, require
from tritongpt.model.hf import load_hf
from tritongpt.train import checkpoint
from tritongpt.train.distributed import resolve_device
from tritongpt.train.sample import add_backend_arguments, backend_choices

TASKS = {"hellaswag": "hellaswag_val.jsonl"}  # task -> its named asset


@dataclass(frozen=True)
class Item:
    context: str
    endings: tuple[str, ...]
    label: int


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    """The items of a HellaSwag-format JSONL file (the first `limit`); a malformed line is one
    TritonGPTError naming the file and line."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TritonGPTError(f"{where}: not JSON ({exc.msg})") from None
            require(isinstance(raw, dict), f"{where}: expected an object with ctx, endings and label")
            context, endings, label = raw.get("ctx"), raw.get("endings"), raw.get("label")
            require(isinstance(context, str), f"{where}: 'ctx' must be a string")
            require(isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings),
                    f"{where}: 'endings' must be a list of at least 2 non-empty strings")
            require(isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(endings),
                    f"{where}: 'label' must be an int in [0, {len(endings)}), got {label!r}")
            items.append(Item(context, tuple(endings), label))
    require(bool(items), f"{path}: no items")
    return items


def render(enc, item: Item, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask), each (n_endings, L): row i is the context then " " + ending i, zero-padded;
    mask is 1 on the ending's tokens. A row longer than block_size loses context from the left."""
    context = enc.encode_ordinary(item.context)
    rows, masks = [], []
    for ending in item.endings:
        ending_tokens = enc.encode_ordinary(" " + ending)
        row = (context + ending_tokens)[-block_size:]
        rows.append(row)
        masks.append([0] * (len(row) - len(ending_tokens)) + [1] * min(len(ending_tokens), len(row)))
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask


@torch.no_grad()
def ending_losses(model, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) negative log-likelihood of each row's masked tokens, (n_endings,) each, fp32."""
    logits = model.logits(model.hidden_states(tokens)).float()  # (R, L, V)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    scored = mask[:, 1:].to(losses.dtype)  # the token at position t + 1 is predicted at t
    summed = (losses * scored).sum(dim=1)
    return summed, summed / scored.sum(dim=1)


@torch.no_grad()
def evaluate(model, enc, items: list[Item], device: torch.device | str = "cpu") -> dict[str, float]:
    """{"items", "acc", "acc_norm"} of `model` (eval mode is set and restored) on `items`."""
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    for item in items:
        tokens, mask = render(enc, item, model.config.block_size)
        summed, mean = ending_losses(model, tokens.to(device), mask.to(device))
        correct += int(summed.argmin()) == item.label
        correct_norm += int(mean.argmin()) == item.label
    model.train(was_training)
    return {"items": len(items), "acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def task_items(task: str, data: str | None = None, limit: int | None = None) -> list[Item]:
    """The items of `task`: from `data` if given, else its named asset."""
    require(task in TASKS, f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    require(limit is None or limit >= 1, f"--limit must be >= 1, got {limit}")
    path = Path(data) if data else find_asset(TASKS[task])
    require(path.is_file(), f"{path} does not exist")
    return load_items(path, limit)


# ---- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="PATH", help="run directory (its newest checkpoint) or a ckpt_*.pt file")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face GPT-2 directory (config.json + weights)")
    parser.add_argument("--task", default="hellaswag", choices=TASKS, help="the task (default hellaswag)")
    parser.add_argument("--data", metavar="FILE", default=None, help="a JSONL file of items in the task's format "
                                                                     "(default: the task's named asset)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_backend_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    items = task_items(args.task, args.data, args.limit)  # a bad file fails before a model is loaded
    backends = backend_choices(args)
    if args.ckpt:
        ckpt = checkpoint.load(args.ckpt, "cpu")
        model = checkpoint.model_from(ckpt, device, source=args.ckpt, **backends)
        tokenizer = ckpt.get("tokenizer", "gpt2")
    else:
        model, tokenizer = load_hf(args.hf, **backends).to(device).eval(), "gpt2"
    result = evaluate(model, get_encoding(tokenizer), items, device)
    print(f"{args.task}: {result['items']} items, acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f}")
    return 0
