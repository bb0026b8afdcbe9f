"""The GPT: GPT-2's architecture (nanoGPT-style, GPT-2 parameter names) whose attention,
norms, MLP and lm_head + loss (`linear_cross_entropy`) come from the backend registry; with
normalization="rmsnorm", ffn="swiglu" and RoPE it is the Llama architecture (RMSNorm modules
in place of the LayerNorms, mlp.gate_proj / up_proj / down_proj in place of c_fc / c_proj).

    from tritongpt import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("tiny", attention="sdpa"))
    _, loss = model(idx, targets)                 # idx, targets: (B, T) int64; no logits are made
    logits = model.logits(model.hidden_states(idx))   # (B, T, V) when they are wanted
    out = model.eval().generate(idx, 50, temperature=0.8, top_k=200)
    model.backend_names()                         # {"attention": "sdpa", "layer_norm": ..., "mlp": ..., ...}
                                                  # (the ops of model.config.ops only)

Shapes: B batch, T sequence, C n_embd, V real_vocab_size (padding rows excluded).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from tritongpt.errors import TritonGPTError, require
from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.model.layers import (
    NORMS,
    RESIDUAL_PROJECTIONS,
    Block,
    compute_dtype,
    init_weights,
    residual_std,
    resolve_op,
    rope_angles,
    sinusoidal_table,
)


class KVCache:
    """Preallocated keys/values of every layer for generation: (n_layer, B, block_size, Hkv, D)
    each (grouped-query: only the Hkv key/value heads are stored), filled up to `length`."""

    def __init__(self, config: GPTConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch, config.block_size, config.kv_heads, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions held


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding (V_padded, C)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=NORMS[config.normalization](config),
        )
        if config.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.transformer = nn.ModuleDict(modules)
        if config.pos_embedding == "sinusoidal":  # fixed, so a buffer derived from the config
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=residual_std(config.n_layer))
        self.resolve_op(config)

    def resolve_op(self, config: GPTConfig) -> None:
        """The training loss: lm_head and cross-entropy as the one op `linear_cross_entropy`."""
        self.loss_backend, self.linear_cross_entropy = resolve_op("linear_cross_entropy", config)

    # ---- backends -------------------------------------------------------------------------

    def set_backends(self, **choices: str) -> None:
        """Re-resolve the ops of every module, e.g. set_backends(attention="sdpa"): keyword
        arguments are MODEL_OPS names or `backend`; "auto" returns an op to the default. Raises
        (changing nothing) on an unknown or unusable backend of an op the model calls; the choice
        for an op it does not call is only recorded. The choices land in self.config."""
        unknown = sorted(set(choices) - {*MODEL_OPS, registry.EVERY_OP})
        if unknown:
            raise TritonGPTError(f"set_backends: unknown op(s) {', '.join(unknown)}; ops: {', '.join(MODEL_OPS)}")
        config = dataclasses.replace(self.config, **choices)
        for op in config.ops:
            registry.choose(op, getattr(config, op), config.backend, backward=False)  # as resolve_op does
        for module in self.modules():
            if hasattr(module, "resolve_op"):
                module.resolve_op(config)
        self.config = config

    def backend_names(self) -> dict[str, str]:
        """op -> the backend its modules use, for the ops the model calls (config.ops), e.g.
        {"attention": "triton", "layer_norm": "torch", "mlp": "triton", "linear_cross_entropy": "chunked"}."""
        block = self.transformer.h[0]
        names = {module.op: module.backend for module in (block.attn, self.transformer.ln_f, block.mlp)}
        return {**names, "linear_cross_entropy": self.loss_backend}

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids; targets (B, T) next-token ids, -1 = ignored; doc_ids (B, T) ints:
        attention stays within a document (packed sequences). With targets: (None, the mean fp32
        cross-entropy loss) from the `linear_cross_entropy` op, whatever its backend (the logits
        are what it avoids making; `logits(hidden_states(idx))` gives them); 0 when every target
        is ignored. Without: logits of the last position only (B, 1, V), None. V =
        real_vocab_size: padding rows of the embedding are never predicted."""
        self._check_ids(idx, "idx")
        if targets is not None:
            self._check_ids(targets, "targets")
            if targets.shape != idx.shape:
                raise TritonGPTError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        x = self.hidden_states(idx, doc_ids=doc_ids)  # (B, T, C)
        if targets is None:
            return self.logits(x[:, [-1], :]), None
        dtype = compute_dtype(x)  # autocast's, as lm_head's matmul would run in
        loss = self.linear_cross_entropy(x.to(dtype), self.lm_head.weight.to(dtype), targets, ignore_index=-1,
                                         label_smoothing=self.config.label_smoothing,
                                         vocab_limit=self.config.real_vocab_size)
        return None, loss

    def hidden_states(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """The final norm's output (B, T, C) for idx (B, T). With a cache, idx continues the
        cache.length positions already held (written into the cache; the caller advances length)."""
        b, t = idx.shape
        start = 0 if cache is None else cache.length
        if start + t > self.config.block_size:
            raise TritonGPTError(f"sequence of {start + t} positions exceeds block_size {self.config.block_size}")
        positions = torch.arange(start, start + t, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(positions)
        elif self.config.pos_embedding == "sinusoidal":
            x = x + self.pos_table[start:start + t].to(x.dtype)
        else:
            rope = rope_angles(positions, self.config.head_dim, self.config.rope_base)
        hidden, residual = self.transformer.drop(x), None
        for i, block in enumerate(self.transformer.h):
            kv_cache = None if cache is None else (cache.k[i], cache.v[i], start)
            hidden, residual = block(hidden, residual, rope, doc_ids, kv_cache)
        x, _ = self.transformer.ln_f(hidden, residual)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head over the real vocabulary: (..., C) -> (..., real_vocab_size)."""
        return self.lm_head(x)[..., :self.config.real_vocab_size]

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point
                or ids.dtype == torch.bool):
            raise TritonGPTError(f"{name} must be a (batch, seq) integer tensor, got "
                                 f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.size(1) > self.config.block_size:
            raise TritonGPTError(f"{name} has {ids.size(1)} positions, more than block_size {self.config.block_size}")

    # ---- accounting -------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, each tied weight once. As in nanoGPT, the learned position embedding
        (wpe) is left out by default; the token embedding stays in, since it doubles as lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, PaLM appendix B / nanoGPT style:
        6 N for the weight matmuls (N = num_params(), so SwiGLU's three matrices and grouped-query
        attention's narrower k, v projections count as built) plus 12 * n_layer * n_embd * S for
        attention's q k^T and (probs) v over the n_head query heads (n_head * head_dim = n_embd,
        whatever n_kv_head is), S = keys each query sees: seq_len (default block_size), capped by
        the sliding window. Masked-out (causal) keys are counted, as in PaLM."""
        keys = seq_len or self.config.block_size
        if self.config.window is not None:
            keys = min(keys, self.config.window)
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * keys

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float],
                            device_type: str, params: list[nn.Parameter] | None = None) -> torch.optim.AdamW:
        """AdamW over `params` (default: all of the model's) with weight decay on matrices and
        embeddings (params with >= 2 dims) only, not on biases and norm gains; fused on CUDA."""
        params = [p for p in (self.parameters() if params is None else params) if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """idx (B, T) followed by up to max_new_tokens sampled tokens: (B, T + n). See
        generate_stream for the arguments; fewer than max_new_tokens only when every row hit eos_id."""
        steps = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator))
        return torch.cat([idx] + [tok[:, None] for tok in steps], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of each row, a (B,) int64 tensor, max_new_tokens times.

        Sampling: logits / temperature (temperature 0: greedy argmax), then only the top_k most
        likely tokens and/or the smallest set reaching probability top_p; `generator` seeds the
        draws. Padding ids (>= real_vocab_size) are never produced. With eos_id a row that
        produced it keeps yielding eos_id, and the stream ends once every row has.

        Uses a KV cache: one prefill of the prompt, then one position per step. The model sees
        at most block_size positions: a longer prompt is cropped to its last block_size tokens,
        and when the cache is full the context restarts from the last block_size // 2 tokens
        (one recomputed prefill), so generation can run past block_size. Call model.eval() first
        (dropout is not switched off here)."""
        self._check_ids(idx[:, -self.config.block_size:], "idx")
        _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, self.config.real_vocab_size)
        block_size = self.config.block_size
        cache = KVCache(self.config, idx.size(0), idx.device, compute_dtype(self.lm_head.weight))
        tokens = idx
        logits = self._extend(tokens[:, -block_size:], cache)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            yield next_token
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                return
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if cache.length == block_size:  # no room for another position: restart the context
                cache.length = 0
                logits = self._extend(tokens[:, -max(1, block_size // 2):], cache)
            else:
                logits = self._extend(next_token[:, None], cache)

    def _extend(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run idx (B, T) after the cached positions; fp32 logits of the last position (B, V)."""
        x = self.hidden_states(idx, cache=cache)
        cache.length += idx.size(1)
        return self.logits(x[:, -1, :]).float()


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                    eos_id: int | None, vocab: int) -> None:
    require(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
            f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    require(temperature >= 0 and math.isfinite(temperature),
            f"generate: temperature must be >= 0 (0: greedy), got {temperature!r}")
    require(top_k is None or (isinstance(top_k, int) and top_k >= 1),
            f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    require(top_p is None or 0.0 < top_p <= 1.0, f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    require(eos_id is None or 0 <= eos_id < vocab,
            f"generate: eos_id must be a token id in [0, {vocab}), got {eos_id!r}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and then to the smallest
    most-likely set whose probability reaches top_p. Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
