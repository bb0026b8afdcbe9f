"""Fine-tune a Hugging Face causal LM for a few steps with tritongpt's ops patched in.

    # a tiny random GPT-2 built from its config; on a CPU `auto` is the torch backends (~1 s a step):
    TRITONGPT_ASSETS=/work/shared/data python examples/finetune_hf.py --steps 5
    # the Triton kernels on a CPU, through the interpreter: correct but slow (~80 s a step, 2 cores)
    TRITON_INTERPRET=1 TRITONGPT_ASSETS=/work/shared/data python examples/finetune_hf.py --steps 2
    # a tiny random Llama (grouped-query attention, RMSNorm, SwiGLU), e.g. on a GPU:
    TRITONGPT_ASSETS=/work/shared/data python examples/finetune_hf.py --model llama --steps 50
    # a model already on disk (config.json + weights; nothing is downloaded), saved after training:
    python examples/finetune_hf.py --from path/to/gpt2 --steps 100 --out gpt2-shakespeare

Text: tinyshakespeare, GPT-2 BPE tokens (both local assets, TRITONGPT_ASSETS). Each batch holds
windows of random lengths, right-padded, with the padding masked (attention_mask) and left out of
the loss (labels -100): the patched attention turns the mask into doc ids, the loss runs through
linear_cross_entropy without making the logits. `--out` writes a checkpoint that plain
transformers loads (patching changes no parameter).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import tritongpt
from tritongpt.data.assets import find_asset
from tritongpt.data.tokenizer import get_encoding

IGNORE_INDEX = -100


def tiny_model(kind: str, vocab: int, positions: int) -> transformers.PreTrainedModel:
    """A small random-init GPT-2 or Llama (head_dim 64, which every attention backend supports)."""
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=128, n_layer=2, n_head=2,
                                         attn_pdrop=0.0)  # attention dropout would route to SDPA
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions)
    return transformers.LlamaForCausalLM(config)


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """Endless (input_ids, attention_mask, labels), each (B, T): random windows of length T/2..T,
    right-padded with token 0 (masked, ignored by the loss)."""
    while True:
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=gen)
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
        ids = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        yield ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2", help="tiny random model (default gpt2)")
    parser.add_argument("--from", dest="source", default=None, help="a local Hugging Face model directory instead")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backend", default=None, help="every op's backend (default: auto)")
    parser.add_argument("--out", default=None, help="save_pretrained here after training")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoding = get_encoding("gpt2")
    tokens = torch.tensor(encoding.encode_ordinary(find_asset("tinyshakespeare.txt", download=False).read_text()))
    torch.manual_seed(0)
    if args.source:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.source, local_files_only=True)
    else:
        model = tiny_model(args.model, encoding.n_vocab, args.seq_len)
    model.to(device).train()
    backends = tritongpt.patch(model, backend=args.backend)  # after .to(device): backends are chosen for it
    print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"on {device}: {' '.join(f'{op}={name}' for op, name in backends.items())}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = batches(tokens, args.batch_size, args.seq_len, torch.Generator().manual_seed(0))
    for step in range(1, args.steps + 1):
        ids, mask, labels = (t.to(device) for t in next(data))
        start = time.perf_counter()
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {out.loss.item():.4f} ({(time.perf_counter() - start) * 1e3:.0f} ms, "
              f"logits {out.logits})")  # None: the loss never made them
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved {args.out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
