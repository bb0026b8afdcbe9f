"""The GPT: every backend combination against the float64 torch model, the model itself against
an independent plain-PyTorch forward, loss semantics, config checks, accounting, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _util import assert_rel_close, rel_err, tol

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS, PRESETS, GPTConfig
from tritongpt.model.gpt import GPT

VOCAB, REAL_VOCAB = 128, 100  # padded rows 100..127 exist but are never predicted
B, T = 2, 16

# model shapes exercised by the backend tests: head_dim 16 (the triton attention's smallest)
VARIANTS = {
    "mha-learned": dict(),
    "gqa-rope-window": dict(n_kv_head=2, pos_embedding="rope", window=5),
    "mqa-sinusoidal-docs": dict(n_kv_head=1, pos_embedding="sinusoidal", window=9),
    "llama-gqa-rope": dict(n_kv_head=2, pos_embedding="rope", normalization="rmsnorm", ffn="swiglu", bias=False,
                           ffn_hidden=96, norm_eps=1e-6),
}
# the ops swapped alone to each other backend without -m slow: all of the first variant's, and the
# Llama variant's own
FAST_SWAPS = {"mha-learned": set(MODEL_OPS), "llama-gqa-rope": {"rms_norm", "swiglu_mlp"}}
DOC_IDS = {"mqa-sinusoidal-docs"}  # variants run with packed documents


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=VOCAB, real_vocab_size=REAL_VOCAB, block_size=32, n_layer=2,
                               n_head=4, n_embd=64, backend="torch"), **overrides})


def random_state(config: GPTConfig, seed: int = 0) -> dict:
    """Weights of a GPT with every parameter perturbed (LayerNorm gains/biases and Linear biases
    included, so none of them is trivially 1 or 0)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.state_dict()


def batch(variant: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, REAL_VOCAB, (B, T), generator=g)
    targets = torch.randint(0, REAL_VOCAB, (B, T), generator=g)
    targets[0, 3] = -1  # ignored
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 3 + [1] * 4 + [2] * 9]) if variant in DOC_IDS else None
    return idx, targets, doc_ids


def full_logits(model: GPT, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits: the forward with targets makes none (its loss op fuses lm_head)."""
    return model.logits(model.hidden_states(idx, doc_ids=doc_ids))


def run(config: GPTConfig, state: dict, inputs, dtype: torch.dtype, device: str = "cpu", autocast=None):
    """logits, loss and {name: grad} of a fresh model with `state`, in `dtype` on `device`
    (under autocast to the dtype `autocast` when given)."""
    model = GPT(config).to(device, dtype)
    model.load_state_dict(state)
    inputs = [None if t is None else t.to(device) for t in inputs]
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        no_logits, loss = model(*inputs)
        with torch.no_grad():
            logits = full_logits(model, inputs[0], inputs[2])
    assert no_logits is None
    loss.backward()
    return logits, loss, {n: p.grad for n, p in model.named_parameters()}


def backend_cases():
    """(variant, backend choices): every variant all-torch and all-triton in fp32; each op the
    variant calls alone swapped to each of its other backends (FAST_SWAPS, the rest with -m slow)."""
    missing = [op for op in MODEL_OPS if "triton" not in registry.backends(op)]
    all_triton = pytest.mark.skipif(bool(missing), reason=f"triton backend not registered yet for {missing}")
    for variant in VARIANTS:
        yield pytest.param(variant, {"backend": "torch"}, id=f"{variant}-all-torch")
        yield pytest.param(variant, {"backend": "triton"}, id=f"{variant}-all-triton", marks=all_triton)
        for op in tiny_config(**VARIANTS[variant]).ops:
            for name in registry.backends(op):
                if name != "torch" and registry.usable(op, name):
                    marks = [] if op in FAST_SWAPS.get(variant, ()) else [pytest.mark.slow]
                    yield pytest.param(variant, {op: name}, id=f"{variant}-{op}-{name}", marks=marks)


@pytest.mark.parametrize("variant,choices", list(backend_cases()))
def test_backends_match_float64_model(variant, choices, device):
    """fp32 forward + backward of the chosen backends (on the GPU when there is one, where
    Triton's fp32 dots use tf32) against the float64 all-torch model on the CPU."""
    config = tiny_config(**VARIANTS[variant])
    state, inputs = random_state(config), batch(variant)
    ref_logits, ref_loss, ref_grads = run(config, state, inputs, torch.float64)
    model_config = tiny_config(**VARIANTS[variant], **choices)
    logits, loss, grads = run(model_config, state, inputs, torch.float32, device.type)
    assert logits.dtype == torch.float32 and logits.shape == (B, T, REAL_VOCAB)
    fp32 = tol(torch.float32, tf32=device.type == "cuda" and "triton" in choices.values())
    assert_rel_close(logits, ref_logits, fp32, "logits")
    assert_rel_close(loss, ref_loss, fp32, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], fp32, f"grad of {name}")


def plain_forward(model: GPT, idx: torch.Tensor, doc_ids: torch.Tensor | None, start: int = 0) -> torch.Tensor:
    """An independent float64 GPT forward written the textbook way (x = x + attn(ln_1(x)); x = x +
    mlp(ln_2(x))), with its own RoPE (complex rotation), sinusoid and masks: full logits. idx
    holds the tokens at positions start, start + 1, ..."""
    c = model.config
    p = {n: t.detach().double() for n, t in model.state_dict().items()}
    hd, h, h_kv = c.n_embd // c.n_head, c.n_head, c.kv_heads
    t = idx.size(1)
    pos = torch.arange(start, start + t, dtype=torch.float64)
    x = p["transformer.wte.weight"][idx]
    if c.pos_embedding == "learned":
        x = x + p["transformer.wpe.weight"][start:start + t]
    elif c.pos_embedding == "sinusoidal":
        table = torch.zeros(t, c.n_embd, dtype=torch.float64)
        for i in range(0, c.n_embd, 2):
            table[:, i] = torch.sin(pos / 10000 ** (i / c.n_embd))
            table[:, i + 1] = torch.cos(pos / 10000 ** (i / c.n_embd))
        assert_rel_close(model.pos_table[start:start + t], table, 1e-7, "sinusoid")  # kept in fp32
        x = x + model.pos_table[start:start + t]

    def rotate(v):  # (B, T, heads, hd): halves as the real/imaginary parts of hd/2 complex numbers
        if c.pos_embedding != "rope":
            return v
        freqs = c.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        z = torch.complex(v[..., :hd // 2], v[..., hd // 2:]) * torch.polar(torch.ones(t, hd // 2, dtype=torch.float64),
                                                                           pos[:, None] * freqs)[:, None]
        return torch.cat([z.real, z.imag], dim=-1)

    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((j > i - c.window) if c.window else True)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    def norm(v, name):  # LayerNorm (weight, bias) or RMSNorm (weight only)
        if c.normalization == "rmsnorm":
            return F.rms_norm(v, (c.n_embd,), p[name + ".weight"], c.norm_eps)
        return F.layer_norm(v, (c.n_embd,), p[name + ".weight"], p.get(name + ".bias"), c.norm_eps)

    def linear(v, name):
        return v @ p[name + ".weight"].T + p.get(name + ".bias", 0.0)

    for layer in range(c.n_layer):
        prefix = f"transformer.h.{layer}."
        a = norm(x, prefix + "ln_1")
        qkv = linear(a, prefix + "attn.c_attn")
        q = rotate(qkv[..., :h * hd].unflatten(-1, (h, hd)))
        k = rotate(qkv[..., h * hd:(h + h_kv) * hd].unflatten(-1, (h_kv, hd)))
        v = qkv[..., (h + h_kv) * hd:].unflatten(-1, (h_kv, hd))
        k, v = (z.repeat_interleave(h // h_kv, dim=2) for z in (k, v))
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", att, v).flatten(2)
        x = x + linear(y, prefix + "attn.c_proj")
        m = norm(x, prefix + "ln_2")
        if c.ffn == "swiglu":
            m = linear(F.silu(linear(m, prefix + "mlp.gate_proj")) * linear(m, prefix + "mlp.up_proj"),
                       prefix + "mlp.down_proj")
        else:
            m = linear(F.gelu(linear(m, prefix + "mlp.c_fc"), approximate="tanh"), prefix + "mlp.c_proj")
        x = x + m
    x = norm(x, "transformer.ln_f")
    return (x @ p["lm_head.weight"].T)[..., :c.real_vocab_size]


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_matches_textbook_forward(variant):
    """The fused prenorm-residual block, the (B, T, H, D) strided q/k/v views, GQA, positions and
    masks compute the plain GPT: checked against an independent float64 forward."""
    config = tiny_config(**VARIANTS[variant])
    model = GPT(config).double()
    model.load_state_dict(random_state(config))
    idx, targets, doc_ids = batch(variant)
    expected = plain_forward(model, idx, doc_ids)
    assert_rel_close(full_logits(model, idx, doc_ids), expected, 1e-12, "logits")
    _, loss = model(idx, targets, doc_ids)
    assert_rel_close(loss, F.cross_entropy(expected.flatten(0, 1), targets.flatten(), ignore_index=-1), 1e-12, "loss")


def test_untied_biasless_model_has_its_own_lm_head_and_no_biases():
    config = tiny_config(tie_embeddings=False, bias=False)
    model = GPT(config).double()
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert all(not n.endswith(".bias") for n, _ in model.named_parameters())
    torch.manual_seed(0)
    idx = torch.randint(0, REAL_VOCAB, (B, T))
    logits, (_, loss) = full_logits(model, idx), model(idx, idx)
    model.transformer.wte.weight.data.add_(1.0)  # an untied embedding does not change lm_head
    assert model.lm_head.weight.abs().max() < 1.0
    assert torch.isfinite(logits).all() and torch.isfinite(loss)


def test_loss_semantics_ignore_index_label_smoothing_and_padding():
    config = tiny_config(label_smoothing=0.1)
    model = GPT(config).double()
    model.load_state_dict(random_state(config))
    with torch.no_grad():  # huge padding rows: any leak into the softmax would dominate the loss
        model.transformer.wte.weight[REAL_VOCAB:] = 100.0
    idx, targets, _ = batch("mha-learned")
    logits, (_, loss) = full_logits(model, idx), model(idx, targets)
    assert logits.shape == (B, T, REAL_VOCAB)
    hidden = model.hidden_states(idx)
    real_logits = hidden @ model.transformer.wte.weight[:REAL_VOCAB].T  # (B, T, V)
    logp = real_logits.log_softmax(-1)[targets != -1]  # (N, V) without the ignored token
    target = targets[targets != -1]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    expected = (0.9 * nll + 0.1 * -logp.mean(-1)).mean()
    assert_rel_close(loss, expected, 1e-12, "loss")
    assert loss.dtype == torch.float64


def test_dropout_only_in_training_mode():
    model = GPT(tiny_config(dropout=0.5))
    idx, targets, _ = batch("mha-learned")
    train_a, train_b = full_logits(model, idx), full_logits(model, idx)
    assert not torch.equal(train_a, train_b)
    assert not torch.equal(model(idx, targets)[1], model(idx, targets)[1])
    model.eval()
    assert torch.equal(full_logits(model, idx), full_logits(model, idx))
    assert torch.equal(model(idx, targets)[1], model(idx, targets)[1])


def test_loss_is_fp32_for_low_precision_logits():
    model = GPT(tiny_config()).to(torch.float16)
    idx, targets, _ = batch("mha-learned")
    logits, (_, loss) = full_logits(model, idx), model(idx, targets)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32


def test_no_targets_gives_last_position_logits():
    config = tiny_config()
    model = GPT(config).double()
    idx, targets, _ = batch("mha-learned")
    full = full_logits(model, idx)
    assert model(idx, targets)[0] is None  # with targets: the loss, no logits
    last, loss = model(idx)
    assert loss is None and last.shape == (B, 1, REAL_VOCAB)
    assert_rel_close(last, full[:, -1:], 1e-12, "last logits")


def test_autocast_bf16_runs_with_fp32_residual_stream():
    """Mixed precision: ops get one dtype each (autocast's for matmuls); loss near the fp32 loss."""
    config = tiny_config()
    model = GPT(config)
    model.load_state_dict(random_state(config))
    idx, targets, _ = batch("mha-learned")
    ref = GPT(config).double()
    ref.load_state_dict(random_state(config))
    _, ref_loss = ref(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (_, loss) = full_logits(model, idx), model(idx, targets)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert_rel_close(loss, ref_loss, tol(torch.bfloat16), "autocast loss")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def loss_and_logits(model: GPT, idx: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None):
    """The training loss, and the logits from a second forward: one function to compile."""
    return model(idx, targets, doc_ids)[1], full_logits(model, idx, doc_ids)


@pytest.mark.parametrize("choice", ["triton", pytest.param("torch", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager_logits_and_grads(choice, device):
    """torch.compile(fullgraph=True) traces the whole model (every backend's custom op included)
    and gives the eager model's logits and grads. One layer keeps the interpreter run short."""
    if choice == "triton" and any("triton" not in registry.backends(op) for op in MODEL_OPS):
        pytest.skip("triton backend not registered yet for every op")
    config = tiny_config(**VARIANTS["gqa-rope-window"], backend=choice, n_layer=1)
    state = random_state(config)
    eager, compiled_model = GPT(config).to(device), GPT(config).to(device)
    eager.load_state_dict(state)
    compiled_model.load_state_dict(state)
    idx, targets, _ = batch("mha-learned")
    idx, targets, doc_ids = idx.to(device), targets.to(device), batch("mqa-sinusoidal-docs")[2].to(device)
    compiled = torch.compile(loss_and_logits, fullgraph=True, backend="aot_eager")
    loss, logits = compiled(compiled_model, idx, targets, doc_ids)
    loss.backward()
    ref_loss, ref_logits = loss_and_logits(eager, idx, targets, doc_ids)
    ref_loss.backward()
    assert_rel_close(logits, ref_logits, tol(torch.float32), "compiled logits")
    grads = dict(eager.named_parameters())
    for name, p in compiled_model.named_parameters():
        assert_rel_close(p.grad, grads[name].grad, tol(torch.float32), f"compiled grad of {name}")


def test_too_long_mismatched_or_float_inputs_are_refused():
    model = GPT(tiny_config(block_size=8))
    with pytest.raises(TritonGPTError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TritonGPTError, match="targets shape"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(TritonGPTError, match="integer"):
        model(torch.zeros(1, 8))


@pytest.mark.parametrize("fields,message", [
    (dict(n_embd=60, n_head=7), "n_embd"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(pos_embedding="alibi"), "pos_embedding"),
    (dict(pos_embedding="rope", n_embd=36, n_head=4), "even head dim"),
    (dict(real_vocab_size=129), "real_vocab_size"),
    (dict(window=0), "window"),
    (dict(dropout=1.0), "dropout"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(n_layer=0), "n_layer"),
    (dict(normalization="batchnorm"), "normalization must be one of layernorm, rmsnorm"),
    (dict(ffn="relu"), "ffn must be one of gelu, swiglu"),
    (dict(ffn="swiglu"), "ffn='swiglu' has no biases"),
    (dict(ffn_hidden=0), "ffn_hidden"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(TritonGPTError, match=message):
        tiny_config(**fields)


def test_presets_have_gpt2s_sizes_and_parameter_counts():
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "small"} <= set(PRESETS)
    with pytest.raises(TritonGPTError, match="unknown model preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(TritonGPTError, match="n_layers"):
        GPTConfig.from_preset("tiny", n_layers=3)
    assert GPTConfig.from_preset("tiny", pos_embedding="rope").pos_embedding == "rope"
    # GPT-2 sizes: (n_layer, n_head, n_embd) and parameter counts with the 50257-row vocabulary,
    # position embedding included: HF's published 124M / 355M / 774M / 1.5B models.
    sizes = {"gpt2": (12, 12, 768, 124_439_808), "gpt2-medium": (24, 16, 1024, 354_823_168),
             "gpt2-large": (36, 20, 1280, 774_030_080), "gpt2-xl": (48, 25, 1600, 1_557_611_200)}
    for name, (n_layer, n_head, n_embd, hf_count) in sizes.items():
        config = GPTConfig.from_preset(name, vocab_size=50257)
        assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (n_layer, n_head, n_embd, 1024)
        with torch.device("meta"):
            model = GPT(config)
        assert model.num_params(non_embedding=False) == hf_count
        assert model.num_params() == hf_count - 1024 * n_embd  # wpe left out, like nanoGPT


def test_flops_per_token_is_6n_plus_attention_over_the_keys_seen():
    model = GPT(tiny_config(window=None))
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 64 * 32
    assert model.flops_per_token(seq_len=16) == 6 * n + 12 * 2 * 64 * 16
    assert GPT(tiny_config(window=5)).flops_per_token() == 6 * n + 12 * 2 * 64 * 5


def test_configure_optimizer_decays_matrices_only():
    model = GPT(tiny_config())
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once, the tied weight too
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_init_follows_gpt2():
    config = tiny_config(n_embd=256, n_head=4, n_layer=8)
    model = GPT(config)
    block = model.transformer.h[3]
    assert abs(block.attn.c_attn.weight.std().item() / 0.02 - 1) < 0.05
    assert abs(block.mlp.c_proj.weight.std().item() / (0.02 / math.sqrt(16)) - 1) < 0.05
    assert abs(block.attn.c_proj.weight.std().item() / (0.02 / math.sqrt(16)) - 1) < 0.05
    assert block.attn.c_attn.bias.abs().max() == 0 and (block.ln_1.weight == 1).all()


def test_set_backends_reresolves_and_is_atomic():
    model = GPT(tiny_config())
    assert model.backend_names() == {"attention": "torch", "layer_norm": "torch", "mlp": "torch",
                                     "linear_cross_entropy": "torch"}
    model.set_backends(attention="sdpa")
    assert model.backend_names()["attention"] == "sdpa" and model.config.attention == "sdpa"
    assert all(b.attn.backend == "sdpa" for b in model.transformer.h)
    with pytest.raises(TritonGPTError, match="unknown mlp backend"):
        model.set_backends(layer_norm="auto", mlp="nope")
    assert model.backend_names() == {"attention": "sdpa", "layer_norm": "torch", "mlp": "torch",
                                     "linear_cross_entropy": "torch"}
    model.set_backends(linear_cross_entropy="chunked")
    assert model.backend_names()["linear_cross_entropy"] == "chunked" and model.config.linear_cross_entropy == "chunked"
    model.set_backends(backend="auto", attention="auto", linear_cross_entropy="auto")
    assert model.backend_names() == {op: registry.choose(op) for op in model.config.ops}
    with pytest.raises(TritonGPTError, match="unknown op"):
        model.set_backends(norm="torch")


# ---- GPU ------------------------------------------------------------------------------------

def outputs(logits, loss, grads) -> dict:
    return {"logits": logits, "loss": loss, **{f"grad of {n}": g for n, g in grads.items()}}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_bf16_autocast_error_at_most_twice_pytorchs(variant):
    """Mixed-precision training step: all-triton under bf16 autocast is within the bf16 tolerance
    of float64 and its error at most 2x that of the all-torch model under the same autocast."""
    config = tiny_config(**VARIANTS[variant])
    state, inputs = random_state(config), batch(variant)
    expected = outputs(*run(config, state, inputs, torch.float64))
    ours = outputs(*run(tiny_config(**VARIANTS[variant], backend="triton"), state, inputs, torch.float32, "cuda",
                        autocast=torch.bfloat16))
    pytorch = outputs(*run(config, state, inputs, torch.float32, "cuda", autocast=torch.bfloat16))
    for name, tensor in ours.items():
        assert_rel_close(tensor, expected[name], tol(torch.bfloat16), name)
        ours_err, pytorch_err = rel_err(tensor, expected[name]), rel_err(pytorch[name], expected[name])
        assert ours_err <= 2 * pytorch_err, f"{name}: error {ours_err:.3g} > 2x PyTorch's {pytorch_err:.3g}"


@pytest.mark.gpu
def test_gpu_inductor_compiled_step_matches_eager_with_fused_adamw():
    config = tiny_config(**VARIANTS["gqa-rope-window"], backend="triton")
    state, (idx, targets, _) = random_state(config), batch("mha-learned")
    idx, targets = idx.cuda(), targets.cuda()
    eager, model = GPT(config).cuda(), GPT(config).cuda()
    eager.load_state_dict(state)
    model.load_state_dict(state)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), device_type="cuda")
    assert opt.defaults["fused"]
    compiled = torch.compile(loss_and_logits, fullgraph=True)
    loss, logits = compiled(model, idx, targets)
    ref_logits = full_logits(eager, idx)
    assert_rel_close(logits, ref_logits, tol(torch.float32, tf32=True), "inductor logits")
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
