"""tritongpt's ops inside Hugging Face causal LMs: `patch(model)` and `unpatch(model)`.

    import tritongpt
    model = transformers.AutoModelForCausalLM.from_pretrained("path/to/llama")   # GPT-2, Llama, Qwen2, Mistral
    tritongpt.patch(model)                              # every op on `auto`: triton where it runs, else torch
    tritongpt.patch(model, attention="sdpa", backend="triton")   # the registry's names and precedence
    tritongpt.patch(model, linear_cross_entropy=False)  # False: leave that part as transformers has it
    loss = model(input_ids, attention_mask=mask, labels=input_ids).loss          # logits None (below)
    tritongpt.model.patch.patched(model)                # {op: backend} while patched, else None
    tritongpt.unpatch(model)                            # transformers' own computation again

How it works. Nothing is added to the model and no parameter moves, so `state_dict`,
`save_pretrained`, optimizers and checkpoints are those of the plain model:
- norms (`nn.LayerNorm`, Llama-family RMSNorm) and MLPs (GPT-2's Conv1D GELU MLP, the SwiGLU MLP)
  get an instance `forward` that calls the `layer_norm`/`rms_norm` and `mlp`/`swiglu_mlp` op on
  the module's own parameters (Conv1D weights, stored (in, out), are passed as transposed copies,
  made each call: the triton mlp needs a contiguous last dim);
- attention: this module registers `attention_forward` in transformers' `AttentionInterface` as
  "tritongpt" (with flash-attention's mask function, which hands it the (B, S) padding mask, not
  a dense 4-D one), `patch` switches the model to it and stores the resolved `attention` op on
  each attention module. Keys a query may not see become doc ids: real tokens 1, padding 0 before
  them and 2 after them, so with causal masking every real query sees exactly the real keys up to
  its position (left, right or inner padding), and every pad query sees at least itself (no empty
  softmax row; its output is then set to 0, as transformers' flash-attention path gives, and its
  SDPA path where a pad sees no key, so a left pad's prediction of the first real token is the
  same). Packed sequences (no mask, position ids restarting at 0, no cache: `use_cache=False`,
  where transformers looks for them) become one doc id each, numbered by transformers'
  `find_packed_sequence_indices`. With a KV cache the T queries
  align bottom-right with the S keys (the op's convention: decode steps have T = 1); a mask
  shorter than the keys (a static cache's unfilled slots) cuts the keys to it, as transformers'
  flash-attention path does. Attention dropout (training with `attn_pdrop` / `attention_dropout`
  > 0) has no tritongpt kernel: those calls run transformers' SDPA function on the same mask,
  with a warning saying so;
- the LM's `forward`, when `labels` are given, runs the base model and computes transformers'
  causal-LM loss (labels shifted inside, -100 ignored, `num_items_in_batch` and `shift_labels`
  honoured) with `linear_cross_entropy` on the last hidden states and `lm_head.weight`: the
  (tokens, vocabulary) logits are never made and the output's `logits` is None (as Liger-Kernel
  does). Without labels it is the model's own forward. A batch whose labels are all ignored has
  loss 0 (transformers' mean gives NaN).
Backends are chosen once, at `patch`, by `registry.choose` for the model's device with gradients:
patch after moving the model to its device.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, flash_attention_mask
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralMLP, MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm

from tritongpt.errors import TritonGPTError, require
from tritongpt.kernels import attention_spec, registry
from tritongpt.model.layers import compute_dtype

ATTENTION_NAME = "tritongpt"  # the attn_implementation this module registers
ATTENTION_ATTR = "tritongpt_attention"  # the resolved attention op, on each patched attention module
PATCH_ATTR = "_tritongpt_patch"  # the Patch record, on a patched model
IGNORE_INDEX = -100  # transformers' label of a position without loss
GELU_FORMS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # GPT-2 activation -> mlp's approximate
SILU = ("silu", "swish")
REAL, PAD_BEFORE, PAD_AFTER = 1, 0, 2  # the doc ids of real tokens and of padding before / after them


@dataclass(frozen=True)
class Family:
    """The modules of one transformers causal-LM family that `patch` swaps."""
    ops: tuple[str, str, str, str]  # the registry ops: attention, the norm's, the MLP's, linear_cross_entropy
    norm: type[nn.Module]  # the norm modules (every one in the model)
    mlp: type[nn.Module]  # the MLP modules
    attention: type[nn.Module]  # the attention modules
    output: type  # what the LM forward returns


GPT2_OPS = ("attention", "layer_norm", "mlp", "linear_cross_entropy")
LLAMA_OPS = ("attention", "rms_norm", "swiglu_mlp", "linear_cross_entropy")
FAMILIES: dict[type, Family] = {
    GPT2LMHeadModel: Family(GPT2_OPS, nn.LayerNorm, GPT2MLP, GPT2Attention, CausalLMOutputWithCrossAttentions),
    LlamaForCausalLM: Family(LLAMA_OPS, LlamaRMSNorm, LlamaMLP, LlamaAttention, CausalLMOutputWithPast),
    Qwen2ForCausalLM: Family(LLAMA_OPS, Qwen2RMSNorm, Qwen2MLP, Qwen2Attention, CausalLMOutputWithPast),
    MistralForCausalLM: Family(LLAMA_OPS, MistralRMSNorm, MistralMLP, MistralAttention, CausalLMOutputWithPast),
}


@dataclass
class Patch:
    """What `patch` did to a model, for `unpatch` and for reports."""
    backends: dict[str, str]  # op -> backend name, for the ops patched
    modules: list[str]  # qualified names of the modules given an instance forward ("" is the model)
    attn_implementation: str | None  # the model's attention implementation before; None: attention not patched


# ----------------------------------------------------------------------------------------------
# The swapped computations (bound to each module with types.MethodType, the op as a keyword)


def _layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor, *, op: Callable) -> torch.Tensor:
    weight, bias = (None if p is None else p.to(x.dtype) for p in (module.weight, module.bias))
    return op(x, weight, bias, module.eps)


def _rms_norm_forward(module: nn.Module, x: torch.Tensor, *, op: Callable) -> torch.Tensor:
    return op(x, module.weight.to(x.dtype), module.variance_epsilon)


def _gelu_mlp_forward(module: GPT2MLP, x: torch.Tensor, *, op: Callable, approximate: str) -> torch.Tensor:
    """GPT-2's MLP. Its Conv1D weights are (in, out); the op takes nn.Linear's (out, in) with a
    contiguous last dim, so each call transposes a copy (autograd carries the gradients back)."""
    dtype = compute_dtype(x)
    w1, w2 = (p.t().to(dtype).contiguous() for p in (module.c_fc.weight, module.c_proj.weight))
    b1, b2 = (p.to(dtype) for p in (module.c_fc.bias, module.c_proj.bias))
    return module.dropout(op(x.to(dtype), w1, b1, w2, b2, approximate=approximate))


def _swiglu_mlp_forward(module: nn.Module, x: torch.Tensor, *, op: Callable) -> torch.Tensor:
    dtype = compute_dtype(x)
    return op(x.to(dtype), *(p.weight.to(dtype) for p in (module.gate_proj, module.up_proj, module.down_proj)))


def key_doc_ids(mask: torch.Tensor | None, position_ids: torch.Tensor | None, t: int, s: int
                ) -> torch.Tensor | None:
    """(B, S) int32 doc ids that make the causal op see what transformers' mask allows, or None
    (plain causal): from the (B, S) padding mask (True: a real token), else from position ids
    of packed sequences (T == S, no cache)."""
    if mask is not None:
        real = mask.bool()
        after = real.cumsum(1) > 0  # at or after the row's first real token
        return torch.where(real, REAL, torch.where(after, PAD_AFTER, PAD_BEFORE)).to(torch.int32)
    if position_ids is not None and t == s:
        packed = find_packed_sequence_indices(position_ids)
        return None if packed is None else packed.to(torch.int32)
    return None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, position_ids: torch.Tensor | None = None,
                      use_cache: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (B, H, T, D), key and value (B, Hkv, S, D),
    attention_mask the (B, S) padding mask or None; returns ((B, T, H, D), no weights). Runs the
    module's `attention` op, or transformers' SDPA for attention dropout. Padding queries output 0
    (as transformers' flash-attention path, and its SDPA path where a pad sees no key)."""
    op = getattr(module, ATTENTION_ATTR, None)
    require(op is not None, f"attn_implementation={ATTENTION_NAME!r} needs tritongpt.patch(model): "
                            f"{type(module).__name__} has no tritongpt attention op")
    b, t, s = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] < s:  # a static cache's unfilled slots
        s = attention_mask.shape[-1]
        key, value = key[:, :, :s], value[:, :, :s]
    # transformers reads packed sequences from position ids only without a cache (use_cache off)
    packed_positions = None if use_cache or position_ids is None else position_ids.expand(b, -1)
    doc_ids = key_doc_ids(attention_mask, packed_positions, t, s)
    if dropout > 0.0:
        warnings.warn(f"tritongpt attention has no dropout: {type(module).__name__} runs transformers' SDPA while "
                      f"attention dropout is {dropout} (set the config's attention dropout to 0 to use tritongpt's)",
                      RuntimeWarning, stacklevel=2)
        visible = attention_spec.attention_mask(t, s, True, sliding_window, doc_ids, query.device)
        out, _ = sdpa_attention_forward(module, query, key, value, visible.expand(b, 1, t, s), dropout=dropout,
                                        scaling=scaling)
    else:
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, T, H, D) views
        out = op(q, k, v, causal=True, softmax_scale=scaling, window=sliding_window, doc_ids=doc_ids)
    if attention_mask is not None:
        out = out.masked_fill(~attention_mask[:, -t:, None, None].bool(), 0.0)
    return out, None


AttentionInterface.register(ATTENTION_NAME, attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)  # the (B, S) padding mask, or None


def _causal_lm_forward(model: nn.Module, *args, op: Callable, output: type, **kwargs):
    """The LM's forward; with labels, transformers' causal-LM loss through `linear_cross_entropy`
    on the base model's last hidden states, and no logits."""
    forward = type(model).forward
    signature = inspect.signature(forward)
    arguments = signature.bind(model, *args, **kwargs).arguments
    labels = arguments.pop("labels", None)
    if labels is None:
        return forward(model, *args, **kwargs)
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)
    extra = arguments.pop(var_keyword, {})
    arguments.pop(next(iter(signature.parameters)))  # self
    arguments.pop("logits_to_keep", None)
    return_dict = extra.pop("return_dict", None)
    num_items = extra.pop("num_items_in_batch", None)
    shift_labels = extra.pop("shift_labels", None)
    ignore_index = extra.pop("ignore_index", IGNORE_INDEX)
    outputs = getattr(model, model.base_model_prefix)(**arguments, **extra)
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # position i predicts label i + 1
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    dtype = compute_dtype(hidden)
    loss = op(hidden.to(dtype), model.lm_head.weight.to(dtype), shift_labels, ignore_index=ignore_index)
    if num_items is not None:  # a sum over this batch's labels / the count over all accumulated batches
        loss = loss * (shift_labels != ignore_index).sum() / num_items
    fields = {f.name: getattr(outputs, f.name, None) for f in dataclasses.fields(output)
              if f.name not in ("loss", "logits")}
    result = output(loss=loss, logits=None, **fields)
    if return_dict is None:
        return_dict = model.config.return_dict
    return result if return_dict else result.to_tuple()


def _lm_forward(cls: type, op: Callable, output: type) -> Callable:
    """`_causal_lm_forward` with the signature of `cls.forward` (generate reads it to decide which
    inputs, e.g. position_ids and logits_to_keep, the model takes)."""
    @functools.wraps(cls.forward)
    def forward(model: nn.Module, *args, **kwargs):
        return _causal_lm_forward(model, *args, op=op, output=output, **kwargs)
    return forward


# ----------------------------------------------------------------------------------------------
# patch / unpatch


def family_of(model: nn.Module) -> Family:
    """The Family of a transformers causal LM (a TritonGPTError naming the supported ones otherwise)."""
    found = next((FAMILIES[c] for c in type(model).__mro__ if c in FAMILIES), None)
    require(found is not None, f"tritongpt.patch supports {', '.join(c.__name__ for c in FAMILIES)}; "
                               f"got {type(model).__name__}")
    return found


def _check_model(model: nn.Module, family: Family, patched: list[str]) -> None:
    """That the model's modules of the ops in `patched` compute what those ops do, and that their
    forwards are the class's own: a TritonGPTError before anything changes."""
    config = model.config
    attention_op, norm_op, mlp_op, loss_op = family.ops
    if attention_op in patched:
        require(not getattr(config, "add_cross_attention", False),
                "tritongpt.patch: cross-attention (add_cross_attention=True) is not supported; pass attention=False")
    if mlp_op in patched:
        if family.mlp is GPT2MLP:
            require(config.activation_function in GELU_FORMS,
                    f"tritongpt.patch: the mlp op computes GELU ({', '.join(GELU_FORMS)}), this model's activation is "
                    f"{config.activation_function!r}; pass mlp=False")
        else:
            require(config.hidden_act in SILU and not getattr(config, "mlp_bias", False),
                    f"tritongpt.patch: the swiglu_mlp op computes silu(gate) * up without biases, this model has "
                    f"hidden_act={config.hidden_act!r}, mlp_bias={getattr(config, 'mlp_bias', False)}; "
                    f"pass swiglu_mlp=False")
    if loss_op in patched:
        require(getattr(model.lm_head, "bias", None) is None,
                "tritongpt.patch: linear_cross_entropy has no bias, this model's lm_head has one; "
                "pass linear_cross_entropy=False")
    swapped = tuple(kind for op, kind in ((norm_op, family.norm), (mlp_op, family.mlp)) if op in patched)
    for name, module in model.named_modules():
        if isinstance(module, swapped) or (name == "" and loss_op in patched):
            require("forward" not in vars(module),
                    f"tritongpt.patch: module {name or type(model).__name__!r} already has its own forward (another "
                    f"patch, or accelerate hooks); tritongpt.patch would replace it")
        if isinstance(module, nn.LayerNorm) and norm_op in patched:
            require(len(module.normalized_shape) == 1,
                    f"tritongpt.patch: LayerNorm {name!r} normalizes {module.normalized_shape}, not one dim")


def patch(model: nn.Module, *, attention: str | bool | None = None, layer_norm: str | bool | None = None,
          mlp: str | bool | None = None, linear_cross_entropy: str | bool | None = None,
          rms_norm: str | bool | None = None, swiglu_mlp: str | bool | None = None,
          backend: str | None = None) -> dict[str, str]:
    """Run `model`'s attention, norms, MLPs and loss on tritongpt's ops, in place; returns
    {op: backend name} of the ops patched. Each op takes a backend name (`tritongpt kernels list`),
    None (then `backend`, then `auto`), or False (leave that part alone); the registry picks and
    checks the names for the model's device, with gradients. GPT-2 has attention, layer_norm,
    mlp and linear_cross_entropy; Llama, Qwen2 and Mistral attention, rms_norm, swiglu_mlp and
    linear_cross_entropy: naming another op is an error, as is patching twice."""
    family = family_of(model)
    require(getattr(model, PATCH_ATTR, None) is None,
            "tritongpt.patch: the model is already patched; call tritongpt.unpatch(model) first")
    given = dict(attention=attention, layer_norm=layer_norm, mlp=mlp, linear_cross_entropy=linear_cross_entropy,
                 rms_norm=rms_norm, swiglu_mlp=swiglu_mlp)
    foreign = sorted(op for op, choice in given.items() if op not in family.ops and choice is not None)
    require(not foreign, f"tritongpt.patch: {type(model).__name__} has no {', '.join(foreign)}; "
                         f"its ops: {', '.join(family.ops)}")
    for op, choice in given.items():
        require(choice is None or choice is False or isinstance(choice, str),
                f"tritongpt.patch: {op} must be a backend name, None or False, got {choice!r}")
    device = next(model.parameters()).device
    backends = {op: registry.choose(op, given[op], backend, device) for op in family.ops if given[op] is not False}
    _check_model(model, family, list(backends))
    ops = {op: registry.resolve(op, name, device=device) for op, name in backends.items()}
    attention_op, norm_op, mlp_op, loss_op = family.ops
    forwards: list[tuple[type, Callable]] = []
    if norm_op in ops:
        norm_forward = _layer_norm_forward if norm_op == "layer_norm" else _rms_norm_forward
        forwards.append((family.norm, functools.partial(norm_forward, op=ops[norm_op])))
    if mlp_op in ops:
        mlp_forward = (functools.partial(_gelu_mlp_forward, approximate=GELU_FORMS[model.config.activation_function])
                       if family.mlp is GPT2MLP else _swiglu_mlp_forward)
        forwards.append((family.mlp, functools.partial(mlp_forward, op=ops[mlp_op])))
    record = Patch(backends, [], None)
    for name, module in model.named_modules():
        for kind, forward in forwards:
            if isinstance(module, kind):
                module.forward = types.MethodType(forward, module)
                record.modules.append(name)
        if attention_op in ops and isinstance(module, family.attention):
            setattr(module, ATTENTION_ATTR, ops[attention_op])
    if attention_op in ops:
        record.attn_implementation = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
    if loss_op in ops:
        model.forward = types.MethodType(_lm_forward(type(model), ops[loss_op], family.output), model)
        record.modules.append("")
    setattr(model, PATCH_ATTR, record)
    return dict(backends)


def patched(model: nn.Module) -> dict[str, str] | None:
    """{op: backend name} of a patched model; None if it is not patched."""
    record = getattr(model, PATCH_ATTR, None)
    return None if record is None else dict(record.backends)


def unpatch(model: nn.Module) -> None:
    """Undo `patch`: the modules' own forwards and the attention implementation from before."""
    record = getattr(model, PATCH_ATTR, None)
    if record is None:
        raise TritonGPTError("tritongpt.unpatch: the model is not patched")
    for name in record.modules:
        del model.get_submodule(name).forward
    for module in model.modules():
        if ATTENTION_ATTR in vars(module):
            delattr(module, ATTENTION_ATTR)
    if record.attn_implementation is not None:
        model.set_attn_implementation(record.attn_implementation)
    delattr(model, PATCH_ATTR)
