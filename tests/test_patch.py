"""tritongpt.patch / unpatch (model/patch.py) on real transformers models built from small random
configs (fp32, nothing downloaded): GPT-2, Llama (grouped-query), Qwen2 (qkv biases), Mistral
(sliding window). The patched fp32 model is compared with the unpatched one run in float64: loss
within fp32 tolerance and every parameter's gradient close; padded batches (left, right) and
packed sequences exact at the real tokens; greedy `generate` the same tokens; save_pretrained
after patching loads in plain transformers with identical weights; unpatch gives back bitwise
identical outputs.

Backend combinations: for every backend name usable here (with gradients; Triton through the
interpreter), every op that has it on it (the rest on `torch`), and each such op alone on it,
beside all-`torch`. The full product of names is not run: an op's backend sees the same inputs
whatever the other ops run on (the model's activations), so each op-backend pair alone plus
all together covers what can differ, at a fraction of the interpreter's time."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from _util import assert_rel_close, tol

import tritongpt
from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry

transformers = pytest.importorskip("transformers")
patch_module = pytest.importorskip("tritongpt.model.patch")

VOCAB = 100
FP32 = tol(torch.float32)


def randomized(model):
    """Every parameter (norm gains and biases included) moved off its init, in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def gpt2(seed: int = 0, **config):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                            eos_token_id=0, pad_token_id=0), **config})
    return randomized(transformers.GPT2LMHeadModel(cfg))


def llama_like(kind: str = "llama", seed: int = 0, **config):
    """Llama, Qwen2 or Mistral: 2 query heads sharing 1 key/value head, head_dim 16."""
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    cfg = config_class(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False), **config})
    return randomized(model_class(cfg))


MODELS = {"gpt2": gpt2, "llama": llama_like, "qwen2": lambda: llama_like("qwen2"),
          "mistral": lambda: llama_like("mistral", sliding_window=5)}


def runs_here(op: str, name: str) -> bool:
    """`op` has backend `name` and it runs here with gradients."""
    return name in registry.backends(op) and registry.usable(op, name, "cpu")


def on_triton(ops: tuple[str, ...]) -> dict[str, str]:
    """Every op that has a triton backend on it, the rest on torch."""
    return {op: "triton" if runs_here(op, "triton") else "torch" for op in ops}


def combos(ops: tuple[str, ...]) -> list[dict[str, str]]:
    """All-torch; per other backend name usable here: every op that has it on it, and each alone."""
    base = {op: "torch" for op in ops}
    found = [base]
    names = sorted({n for op in ops for n in registry.backends(op)} - {"torch"})
    for name in names:
        ops_with = [op for op in ops if runs_here(op, name)]
        if ops_with:
            found.append({**base, **{op: name for op in ops_with}})
        if len(ops_with) > 1:
            found += [{**base, op: name} for op in ops_with]
    return found


def combo_id(combo: dict[str, str]) -> str:
    return ",".join(f"{op}={n}" for op, n in combo.items() if n != "torch") or "torch"


CASES = [pytest.param(kind, combo, id=f"{kind}-{combo_id(combo)}")
         for kind, ops in (("gpt2", patch_module.GPT2_OPS), ("llama", patch_module.LLAMA_OPS))
         for combo in combos(ops)]
CASES += [pytest.param(kind, on_triton(patch_module.LLAMA_OPS), id=f"{kind}-triton") for kind in ("qwen2", "mistral")]


def tokens(b: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=kwargs.pop("labels", ids), **kwargs).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def assert_matches_float64(model, reference, ids: torch.Tensor, **kwargs) -> None:
    """Loss and every parameter gradient of `model` (fp32, patched) within fp32 tolerance of the
    unpatched `reference` in float64."""
    loss, grads = loss_and_grads(model, ids, **kwargs)
    ref_loss, ref_grads = loss_and_grads(reference, ids, **kwargs)
    assert_rel_close(loss, ref_loss, FP32, "loss")
    names = [n for n, _ in model.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None, name
        assert_rel_close(g, r, FP32, f"grad {name}")


@pytest.mark.parametrize("kind, combo", CASES)
def test_patched_loss_and_gradients_match_float64(kind, combo):
    model = MODELS[kind]()
    reference = copy.deepcopy(model).double()
    chosen = tritongpt.patch(model, **combo)
    assert chosen == combo and patch_module.patched(model) == combo
    assert_matches_float64(model, reference, tokens())
    if combo["linear_cross_entropy"]:
        assert model(tokens(), labels=tokens()).logits is None  # the logits are never made


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_padded_batches_are_exact_at_real_tokens(kind, side, attention):
    """Rows of 12, 7 and 3 real tokens, padded on one side: the real positions' logits, the loss
    (pads labelled -100) and every gradient as the unpatched float64 model with the same mask."""
    model = MODELS[kind]()
    reference = copy.deepcopy(model).double()
    ops = patch_module.GPT2_OPS if kind == "gpt2" else patch_module.LLAMA_OPS
    tritongpt.patch(model, **{**on_triton(ops), "attention": attention})
    ids, mask = tokens(3, 12), torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate((12, 7, 3)):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        ref_logits = reference(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_rel_close(logits[real], ref_logits[real], FP32, "logits at real tokens")
    assert_matches_float64(model, reference, ids, attention_mask=mask, labels=labels)


def test_key_doc_ids_hide_padding_from_real_queries_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    doc_ids = patch_module.key_doc_ids(mask, None, 5, 5)
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 2, 2], [1, 2, 1, 1, 2]]
    packed = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    assert patch_module.key_doc_ids(None, packed, 5, 5).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert patch_module.key_doc_ids(None, torch.arange(5)[None].expand(2, -1), 5, 5) is None  # not packed
    assert patch_module.key_doc_ids(None, packed[:, -1:], 1, 5) is None  # a decode step: plain causal


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences_attend_within_each(use_cache):
    """No mask, position ids restarting at 0: without a cache transformers masks each sequence
    (with one it does not look for them): the patch does what it does."""
    model = llama_like()
    reference = copy.deepcopy(model).double()
    tritongpt.patch(model, **on_triton(patch_module.LLAMA_OPS))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    assert_matches_float64(model, reference, tokens(1, 12), position_ids=position_ids, use_cache=use_cache)


def greedy(model, prompt: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_generate_gives_the_same_greedy_tokens(kind):
    """A left-padded batch through the KV cache (prefill T = S, then T = 1 decode steps); Mistral's
    window (5) is shorter than prompt + output."""
    model = MODELS[kind]()
    prompt, mask = tokens(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    expected = greedy(model, prompt, mask)
    signature = inspect.signature(model.forward)
    tritongpt.patch(model, attention="triton")
    assert model.config._attn_implementation == "tritongpt"
    assert inspect.signature(model.forward) == signature  # generate reads it to build the inputs
    assert torch.equal(greedy(model, prompt, mask), expected)


def test_generate_with_a_static_cache():
    """A static cache's keys run past the mask (unfilled slots): they are cut to it."""
    model = llama_like()
    prompt, mask = tokens(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    expected = greedy(model, prompt, mask, cache_implementation="static")
    tritongpt.patch(model, attention="triton")
    assert torch.equal(greedy(model, prompt, mask, cache_implementation="static"), expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_save_pretrained_after_patch_loads_in_plain_transformers(kind, tmp_path):
    model = MODELS[kind]()
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    tritongpt.patch(model, attention="triton")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation != "tritongpt"
    state = loaded.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_unpatch_restores_identical_outputs(kind):
    model = MODELS[kind]()
    ids = tokens()
    implementation = model.config._attn_implementation
    with torch.no_grad():
        expected = model(ids, labels=ids)
    tritongpt.patch(model, backend="torch")
    tritongpt.unpatch(model)
    assert model.config._attn_implementation == implementation and patch_module.patched(model) is None
    assert not any("forward" in vars(m) or patch_module.ATTENTION_ATTR in vars(m) for m in model.modules())
    with torch.no_grad():
        again = model(ids, labels=ids)
    assert torch.equal(again.logits, expected.logits) and torch.equal(again.loss, expected.loss)
    tritongpt.patch(model, attention="triton")  # patchable again
    tritongpt.unpatch(model)


def test_loss_options_of_the_trainer():
    """num_items_in_batch (gradient accumulation), shift_labels and return_dict=False as transformers'."""
    model = gpt2()
    reference = copy.deepcopy(model)
    tritongpt.patch(model, linear_cross_entropy="triton", attention=False, layer_norm=False, mlp=False)
    ids = tokens()
    labels = ids.clone()
    labels[0, :5] = -100
    for kwargs in ({"num_items_in_batch": torch.tensor(37)}, {"shift_labels": tokens(seed=3)}):
        got, want = model(ids, labels=labels, **kwargs).loss, reference(ids, labels=labels, **kwargs).loss
        assert_rel_close(got, want, FP32, str(sorted(kwargs)))
    as_tuple = model(ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_rel_close(as_tuple[0], reference(ids, labels=labels).loss, FP32, "tuple loss")


def test_attention_dropout_runs_sdpa_with_a_warning():
    """Training with attention dropout: the same loss as transformers' SDPA under the same seed."""
    model = gpt2(attn_pdrop=0.5).train()
    reference = copy.deepcopy(model)
    ids = tokens()
    torch.manual_seed(5)
    expected = reference(ids, labels=ids).loss
    tritongpt.patch(model, attention="triton", layer_norm=False, mlp=False, linear_cross_entropy=False)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="no dropout"):
        got = model(ids, labels=ids).loss
    assert_rel_close(got, expected, FP32, "loss with attention dropout")


def test_bad_uses_are_one_clear_error_and_change_nothing():
    model = gpt2()
    with pytest.raises(TritonGPTError, match="has no rms_norm"):
        tritongpt.patch(model, rms_norm="torch")
    with pytest.raises(TritonGPTError, match="unknown layer_norm backend 'nope'.*choices"):
        tritongpt.patch(model, layer_norm="nope")
    with pytest.raises(TritonGPTError, match="unknown layer_norm backend 'sdpa' \\(from backend\\)"):
        tritongpt.patch(model, backend="sdpa")
    with pytest.raises(TritonGPTError, match="not patched"):
        tritongpt.unpatch(model)
    relu = gpt2(activation_function="relu")
    with pytest.raises(TritonGPTError, match="pass mlp=False"):
        tritongpt.patch(relu)
    assert patch_module.patched(relu) is None and not any("forward" in vars(m) for m in relu.modules())
    assert relu.config._attn_implementation != "tritongpt"
    assert set(tritongpt.patch(relu, mlp=False)) == {"attention", "layer_norm", "linear_cross_entropy"}
    with pytest.raises(TritonGPTError, match="already patched"):
        tritongpt.patch(relu)
    hooked = gpt2()
    hooked.transformer.ln_f.forward = lambda x: x  # as accelerate's device-map hooks do
    with pytest.raises(TritonGPTError, match="'transformer.ln_f' already has its own forward"):
        tritongpt.patch(hooked)
    assert tritongpt.patch(hooked, layer_norm=False)["attention"]  # the hooked kind left alone: fine
    with pytest.raises(TritonGPTError, match="supports GPT2LMHeadModel"):
        tritongpt.patch(torch.nn.Linear(2, 2))
    plain = llama_like()
    plain.set_attn_implementation("tritongpt")  # registered, but no op on the modules
    with pytest.raises(TritonGPTError, match="needs tritongpt.patch"), warnings.catch_warnings():
        plain(tokens())
