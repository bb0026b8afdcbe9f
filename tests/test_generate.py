"""Generation: the KV-cached decoder against full recomputation, sampling restrictions (top-k,
top-p, padding ids), seeds, eos and the streaming interface."""

from __future__ import annotations

import pytest
import torch
from test_model import REAL_VOCAB, VARIANTS, random_state, tiny_config

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.model.gpt import GPT, sample


def model_for(variant: str = "mha-learned", dtype=torch.float64, **overrides) -> GPT:
    config = tiny_config(**{**VARIANTS[variant], **overrides})
    model = GPT(config).to(dtype).eval()
    model.load_state_dict(random_state(config))
    return model


def prompt(b: int = 2, t: int = 5, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, REAL_VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def greedy_by_recompute(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole context through forward at every step, the
    context following generate_stream's documented policy past block_size (crop the prompt to
    block_size; when block_size positions are held, restart from the last block_size // 2)."""
    block = model.config.block_size
    held = min(idx.size(1), block)
    tokens = idx
    for _ in range(steps):
        logits, _ = model(tokens[:, -held:])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        held = block // 2 if held == block else held + 1
    return tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_recompute(variant):
    model = model_for(variant)
    idx = prompt()
    out = model.generate(idx, 12, temperature=0.0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, greedy_by_recompute(model, idx, 12))


def test_generation_past_block_size_restarts_context():
    model = model_for("gqa-rope-window", block_size=8)
    idx = prompt(t=10)  # longer than block_size: cropped to its last 8 tokens
    out = model.generate(idx, 20, temperature=0.0)
    assert out.shape == (2, 30)
    assert torch.equal(out, greedy_by_recompute(model, idx, 20))
    learned = model_for("mha-learned", block_size=8)
    assert torch.equal(learned.generate(idx, 20, temperature=0.0), greedy_by_recompute(learned, idx, 20))


@pytest.mark.skipif("triton" not in registry.backends("attention"), reason="triton attention not registered yet")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test; the gpu test covers the CUDA kernel")
def test_cached_greedy_with_triton_attention_matches_float64():
    """The decode step calls the attention op with 1 query against S cached keys (bottom-right
    causal): the triton kernel in fp32 picks the float64 torch model's tokens."""
    model = model_for("gqa-rope-window", dtype=torch.float32, attention="triton")
    reference = model_for("gqa-rope-window")
    idx = prompt()
    assert torch.equal(model.generate(idx, 6, temperature=0.0), greedy_by_recompute(reference, idx, 6))


def last_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx)
    return logits[:, -1].double()


def test_top_k_restricts_support():
    model = model_for()
    idx = prompt(b=1).expand(2000, -1)
    allowed = set(last_logits(model, idx[:1]).topk(5, dim=-1).indices[0].tolist())
    drawn = model.generate(idx, 1, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(drawn.tolist()) == allowed  # only the top 5, each of them drawn at this temperature


def nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p (float64)."""
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    chosen, mass = set(), 0.0
    for token in order:
        chosen.add(token)
        mass += probs[token].item()
        if mass >= top_p:
            break
    return chosen


def test_top_p_restricts_support():
    model = model_for()
    with torch.no_grad():  # a peaked distribution, so the nucleus is a few tokens
        model.lm_head.weight.mul_(3.0)
    idx = prompt(b=1)
    logits = last_logits(model, idx)[0]
    allowed = nucleus(logits, 0.6)
    assert 1 < len(allowed) < REAL_VOCAB // 2
    drawn = model.generate(idx.expand(2000, -1), 1, top_p=0.6, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(drawn.tolist()) == allowed
    both = model.generate(idx.expand(2000, -1), 1, top_p=0.6, top_k=2, generator=torch.Generator().manual_seed(1))
    top2 = torch.full_like(logits, float("-inf")).scatter(0, logits.topk(2).indices, logits.topk(2).values)
    assert set(both[:, -1].tolist()) == nucleus(top2, 0.6)  # top_p applies to the top-k distribution


def test_sample_function_over_many_steps_respects_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        drawn = sample(logits, temperature=1.0, top_k=3, generator=g)
        assert (drawn[:, None] == top3).any(-1).all()
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


def test_padding_ids_are_never_sampled():
    model = model_for()
    assert model.config.vocab_size > REAL_VOCAB
    with torch.no_grad():  # padding rows (tied lm_head) that would win every draw if not excluded
        model.transformer.wte.weight[REAL_VOCAB:] = 50.0
    out = model.generate(prompt(b=200), 3, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert out.max() < REAL_VOCAB


def test_seeds_reproduce():
    model = model_for()
    idx = prompt()
    runs = [model.generate(idx, 16, top_k=20, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_stream_yields_the_same_tokens_step_by_step():
    model = model_for("gqa-rope-window")
    idx = prompt()
    steps = list(model.generate_stream(idx, 7, temperature=0.8, generator=torch.Generator().manual_seed(5)))
    assert len(steps) == 7 and all(s.shape == (2,) and s.dtype == torch.long for s in steps)
    out = model.generate(idx, 7, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.stack(steps, dim=1), out[:, 5:])


def test_eos_stops_each_row():
    model = model_for()
    idx = prompt(b=3)
    free = model.generate(idx, 10, temperature=0.0)[:, 5:]  # (3, 10) greedy tokens without eos
    eos = free[0, 0].item()  # row 0 finishes at once; the others when (if) they reach it
    expected, ends = free.clone(), []
    for row in expected:
        hits = (row == eos).nonzero()
        end = hits[0].item() if len(hits) else len(row)
        row[end:] = eos  # a finished row keeps yielding eos
        ends.append(end)
    out = model.generate(idx, 10, temperature=0.0, eos_id=eos)
    assert torch.equal(out[:, 5:], expected[:, :max(ends) + 1])  # ends once every row has finished
    assert ends[0] == 0 and max(ends) > 0
    single = model.generate(idx[:1], 10, temperature=0.0, eos_id=eos)
    assert single.shape == (1, 6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_id=REAL_VOCAB), "eos_id"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_sampling_argument_errors(kwargs, message):
    model = model_for()
    with pytest.raises(TritonGPTError, match=message):
        model.generate(prompt(), **{"max_new_tokens": 3, **kwargs})


@pytest.mark.gpu
def test_gpu_cached_decoding_with_triton_picks_the_float64_best_tokens():
    """On the GPU (tf32 dots) near-ties may break either way: every greedy token's float64 logit
    (full recompute on the generated prefix) must be the best within the tf32 tolerance."""
    model = model_for("gqa-rope-window", dtype=torch.float32, backend="triton").cuda()
    reference = model_for("gqa-rope-window")
    idx = prompt()
    out = model.generate(idx.cuda(), 8, temperature=0.0).cpu()
    for step in range(idx.size(1), out.size(1)):
        logits = last_logits(reference, out[:, :step])  # (B, V)
        chosen = logits.gather(1, out[:, step:step + 1]).squeeze(1)
        assert (chosen >= logits.max(-1).values - 1e-3 * logits.abs().max()).all(), f"step {step}"
