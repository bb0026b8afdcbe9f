"""TrainConfig: every setting of a training run, resolved as defaults < preset < TOML < --flags.

    tritongpt train --preset tiny --max-steps 200 --lr 1e-3
    tritongpt train --config run.toml --n-layer 4 --attention sdpa   # flags beat the file

The run settings are the fields of `TrainConfig`; the model settings are the fields of
`GPTConfig` (`TrainConfig.model`). Both are addressed by the same flat names everywhere: as
TOML keys (`n_layer = 4`), as flags (`--n-layer 4`) and in OUT/config.json. The flags are
generated from the two dataclasses, so a new field is a new flag. An unknown key or a value of
the wrong type is a TritonGPTError naming the key.

A preset names a model (`GPTConfig.from_preset`) plus the run settings that suit it
(TRAIN_PRESETS); `auto` is "tiny" on the CPU and "gpt2" on CUDA. `configure` is a run's config:
with --resume and a checkpoint in --out, the checkpoint's settings replace defaults and preset.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS, PRESETS, GPTConfig, check_preset
from tritongpt.train import checkpoint, init_from
from tritongpt.train.checkpoint import LEGACY_KEYS
from tritongpt.train.optim import Optimizer
from tritongpt.train.parallel import Parallel

Dtype = Literal["auto", "bf16", "fp16", "fp32"]


def _f(default: Any, help: str) -> Any:
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # what to train on and where the run lives
    data: str | None = _f(None, "shard dir from `tritongpt prepare` (default: tinyshakespeare, prepared "
                                "into the data cache)")
    out: str = _f("out", "run directory: checkpoints, config.json, metrics.jsonl, loss.png")
    preset: str = _f("auto", "model + run preset: " + ", ".join(["auto", *PRESETS]) + " (auto: tiny on CPU, "
                             "gpt2 on CUDA)")
    resume: bool = _f(False, "continue from the newest checkpoint in --out (its settings, then --config and "
                             "flags on top)")
    init_from: str | None = _f(None, "start from weights: hf:DIR (a Hugging Face GPT-2 or Llama directory) or "
                                     "ckpt:PATH (a tritongpt checkpoint or run directory); the model settings come "
                                     "from it, "
                                     "the optimizer and schedule start fresh")
    # batch: tokens per optimizer step = batch_size * block_size * grad_accum * world_size
    batch_size: int = _f(8, "sequences per micro-batch, per rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    # optimizer and schedule: linear warmup to lr, cosine down to min_lr at decay_steps
    max_steps: int = _f(1000, "optimizer steps to train")
    decay_steps: int | None = _f(None, "step where the cosine reaches min_lr (default: max_steps)")
    lr: float = _f(6e-4, "peak learning rate")
    min_lr: float = _f(6e-5, "final learning rate")
    warmup_steps: int = _f(100, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    optimizer: Optimizer = _f("adamw", "adamw, or muon: Muon for the blocks' 2-D weight matrices, AdamW (lr, "
                                       "betas, weight_decay) for the rest (train/optim.py)")
    # Muon's defaults are those of Keller Jordan's Muon (github.com/KellerJordan/Muon, its README's
    # example): lr 0.02, momentum 0.95 with Nesterov, weight decay 0.01; torch.optim.Muon's own
    # shape scaling sqrt(max(1, rows / cols)) is that repository's too
    muon_lr: float = _f(0.02, "Muon's peak learning rate (on lr's warmup + cosine schedule, scaled by muon_lr / lr)")
    muon_momentum: float = _f(0.95, "Muon's (Nesterov) momentum")
    muon_weight_decay: float = _f(0.01, "Muon's decoupled weight decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_interval: int = _f(250, "evaluate (val loss + a short sample) every this many steps")
    eval_steps: int = _f(20, "val batches per evaluation")
    sample_tokens: int = _f(128, "tokens of the sample printed at each evaluation and at the end (0: none)")
    eval_hellaswag_interval: int = _f(0, "score HellaSwag (the named asset hellaswag_val.jsonl) every this many "
                                         "steps and at the end (0: never)")
    hellaswag_limit: int | None = _f(None, "HellaSwag items scored per evaluation (default: all 10,042)")
    log_interval: int = _f(10, "log loss, lr, tokens/s, MFU every this many steps")
    ckpt_interval: int = _f(500, "checkpoint every this many steps (and at the end)")
    keep_ckpts: int = _f(3, "keep the newest this many checkpoints; the one just written, the newest good "
                            "state, is never deleted")
    # the guard: an update whose loss or gradient norm is not finite (or, with skip_spikes, whose loss spikes)
    # is skipped; too many in a row stop the run
    max_skipped_steps: int = _f(5, "stop the run (exit code 3) after this many updates in a row were skipped "
                                   "for a non-finite loss or gradient norm or a loss spike")
    skip_spikes: float | None = _f(None, "skip an update whose loss is more than this many standard deviations "
                                         "above the mean of the last --spike-window losses (e.g. 5; default: off)")
    spike_window: int = _f(128, "losses in the running window of --skip-spikes")
    # runtime
    seed: int = _f(1337, "seed for weights, data order, dropout")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (under torchrun: each rank's GPU)")
    dtype: Dtype = _f("auto", "autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with grad "
                              "scaling) or fp32")
    compile: bool = _f(False, "torch.compile the model")
    # how the model is spread over the ranks (train/parallel.py) and how checkpoints are written
    parallel: Parallel = _f("auto", "ddp (replicas; auto under torchrun) or fsdp (FSDP2: parameters, gradients "
                                    "and optimizer state sharded, checkpoints as sharded DCP directories)")
    reshard_after_forward: bool = _f(True, "fsdp: free each block's gathered parameters after its forward "
                                           "(gather again for the backward: less memory, more communication)")
    cpu_offload: bool = _f(False, "fsdp: keep the parameter shards, gradients and optimizer state in host memory")
    dp_shard: int | None = _f(None, "fsdp: shard over groups of this many ranks and replicate across the groups "
                                    "(HSDP, e.g. the GPUs of one node); none: shard over all ranks")
    async_ckpt: bool = _f(False, "fsdp: write checkpoints in the background (dcp.async_save) while training goes "
                                 "on")
    doc_mask: bool = _f(False, "attend only within a document (doc ids from the eot tokens in each batch)")
    peak_tflops: float | None = _f(None, "the GPU's dense peak TFLOP/s in the autocast dtype, for MFU (default: "
                                         "the table in train/mfu.py)")
    # dashboards, fed from the metrics.jsonl records
    tensorboard: bool = _f(False, "also write TensorBoard event files to OUT/tensorboard "
                                  "(pip install 'tritongpt[tensorboard]')")
    wandb: str | None = _f(None, "also log to this Weights & Biases project (pip install 'tritongpt[wandb]'; "
                                 "WANDB_MODE=offline keeps it local)")
    # the model: GPTConfig fields, addressed by their own names (--n-layer, n_layer = ...)
    model: GPTConfig = field(default_factory=lambda: GPTConfig.from_preset("tiny"))

    def to_dict(self) -> dict[str, Any]:
        """The flat form (run fields + model fields), as in TOML files and OUT/config.json."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        flat.update(dataclasses.asdict(self.model))
        return flat

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one rank."""
        return self.batch_size * self.model.block_size * self.grad_accum


RUN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "model"}
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(GPTConfig)}
assert not RUN_FIELDS.keys() & MODEL_FIELDS.keys(), "TrainConfig and GPTConfig field names must differ"
_HINTS = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(GPTConfig)}

# Run settings per model preset, sized for the default data (tinyshakespeare: ~300k train tokens);
# model fields here override the model preset for training. Larger corpora want more steps.
_GPT2_RUN = dict(batch_size=16, grad_accum=1, max_steps=1000, lr=6e-4, min_lr=6e-5, warmup_steps=100,
                 eval_interval=100, eval_steps=20, log_interval=10, ckpt_interval=250, dropout=0.1)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=8, max_steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                 eval_interval=100, eval_steps=10, log_interval=10, ckpt_interval=150),
    "small": dict(batch_size=8, max_steps=600, lr=1e-3, min_lr=1e-4, warmup_steps=50,
                  eval_interval=100, eval_steps=10, log_interval=10, ckpt_interval=200),
    "llama-tiny": dict(batch_size=8, max_steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                       eval_interval=100, eval_steps=10, log_interval=10, ckpt_interval=150),
    "smollm-135m": {**_GPT2_RUN, "batch_size": 4, "grad_accum": 4, "dropout": 0.0},  # 2048 positions per row
    "gpt2": _GPT2_RUN,
    "gpt2-medium": {**_GPT2_RUN, "lr": 3e-4, "min_lr": 3e-5},
    "gpt2-large": {**_GPT2_RUN, "batch_size": 8, "grad_accum": 2, "lr": 2.5e-4, "min_lr": 2.5e-5},
    "gpt2-xl": {**_GPT2_RUN, "batch_size": 4, "grad_accum": 4, "lr": 2e-4, "min_lr": 2e-5},
}


def auto_preset() -> str:
    return "gpt2" if torch.cuda.is_available() else "tiny"


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` -> bf16 on a CUDA GPU that supports it, else fp32 (fp16 needs CUDA)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise TritonGPTError(f"dtype fp16 needs a CUDA device (device is {device}); use bf16 or fp32")
    return name


def resolve(flags: dict[str, str] | None = None, toml_path: str | Path | None = None,
            base: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> TrainConfig:
    """The TrainConfig from defaults < preset < TOML file < flags.

    `flags` maps field names to the strings typed on the command line. `base`, when given (the
    flat config of a run being resumed), replaces defaults and preset. `env` (the command line
    passes os.environ) fills the backend of each op left unset from TRITONGPT_<OP>, then
    `backend` from TRITONGPT_BACKEND: a per-op variable beats a global --backend.
    """
    flags = parse_all(flags or {}, "flag", text=True)
    from_file = read_toml(toml_path) if toml_path else {}
    preset = flags.get("preset", from_file.get("preset", base["preset"] if base else "auto"))
    if preset == "auto":
        preset = auto_preset()
    check_preset(preset)
    layers = [base] if base else [TRAIN_PRESETS.get(preset, {})]
    values: dict[str, Any] = {}
    for layer in (*layers, from_file, flags):
        values.update(layer)
    values["preset"] = preset
    for name, choice in registry.env_choices(env or {}).items():
        if name in (*MODEL_OPS, registry.EVERY_OP) and values.get(name) is None:
            values[name] = choice
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    if values.get("init_from") and not base:  # the model is the source's; given settings may change a few
        given = {k: v for layer in (from_file, flags) for k, v in layer.items() if k in MODEL_FIELDS}
        given.update({k: values[k] for k in (*MODEL_OPS, registry.EVERY_OP) if values.get(k) is not None})
        model = init_from.merge(init_from.source_config(values["init_from"]), given)
    try:
        model_config = GPTConfig(**model) if base or values.get("init_from") else GPTConfig.from_preset(preset,
                                                                                                      **model)
    except TypeError as exc:  # a GPTConfig that rejects a combination without naming it
        raise TritonGPTError(f"model config: {exc}") from exc
    cfg = TrainConfig(**run, model=model_config)
    validate(cfg)
    return cfg


def configure(flags: dict[str, str] | None = None, toml_path: str | Path | None = None,
              env: Mapping[str, str] | None = None) -> TrainConfig:
    """The config of a run: `resolve`d from defaults, preset, TOML, flags and `env` (the backend
    variables; the command line passes os.environ), or — with resume and a checkpoint in OUT —
    from the checkpoint's config with the TOML and flags on top."""
    out = peek("out", flags, toml_path)
    saved = checkpoint.newest_config(out) if peek("resume", flags, toml_path) else None
    if saved is None:
        return resolve(flags, toml_path, env=env)
    resumed = resolve(flags, toml_path, base=saved, env=env)
    return dataclasses.replace(resumed, out=out)  # where the checkpoint was found, even if the run directory moved


def peek(key: str, flags: dict[str, str] | None = None, toml_path: str | Path | None = None) -> Any:
    """One run setting by flags > TOML > default, without resolving the rest (e.g. `out` and
    `resume`, needed to find the checkpoint whose config a resumed run starts from)."""
    if flags and key in flags:
        return parse(key, flags[key], "flag", text=True)
    from_file = read_toml(toml_path) if toml_path else {}
    return from_file[key] if key in from_file else RUN_FIELDS[key].default


def from_dict(flat: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its flat form (OUT/config.json, a checkpoint's config)."""
    return resolve(base=parse_all(flat, "config", text=False))


def read_toml(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML config file, checked against the fields and their types."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise TritonGPTError("reading TOML configs needs Python 3.11+ or `pip install tomli`") from exc
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise TritonGPTError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TritonGPTError(f"config file {path}: invalid TOML: {exc}") from exc
    return parse_all(raw, str(path), text=False)


def parse_all(raw: Mapping[str, Any], source: str, *, text: bool) -> dict[str, Any]:
    """{field: value} of `raw`: old key names renamed, values converted (see `parse`)."""
    return {LEGACY_KEYS.get(k, k): parse(k, v, source, text=text) for k, v in raw.items()}


def parse(key: str, value: Any, source: str, *, text: bool) -> Any:
    """`value` for field `key` converted to the field's type; `text`: it was typed as a string.
    `source` names where it came from in errors: "flag" (then --key is named), a file, "config"."""
    if source == "flag":
        source = "flag --" + key.replace("_", "-")
    key = LEGACY_KEYS.get(key, key)
    if key not in _HINTS or key == "model":
        raise TritonGPTError(f"unknown config key {key!r} (in {source}); see `tritongpt train --help`")
    try:
        return _convert(value, _HINTS[key], text)
    except (TypeError, ValueError) as exc:
        raise TritonGPTError(f"config key {key!r} (in {source}): {value!r} is not {_describe(_HINTS[key])}") from exc


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(value: Any, hint: Any, text: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (text and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, text)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if hint is bool:
        if text and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if hint is int:
        if text:
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(value)
    if hint is float:
        if text:
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    raise TypeError(f"unsupported config type {hint!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string",
            type(None): "none"}.get(hint, str(hint))


def metavar(key: str) -> str:
    """The placeholder shown in --help for field `key`: INT, FLOAT, {auto,bf16,...}, ..."""
    hint = _HINTS[key]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None shows as X
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(typing.get_args(hint)) + "}"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(hint, "VALUE")


def is_bool(key: str) -> bool:
    return _HINTS[key] is bool


def help_text(key: str) -> str:
    f = RUN_FIELDS.get(key) or MODEL_FIELDS[key]
    text = f.metadata.get("help", "")
    if key in MODEL_FIELDS:
        text = f"model: {text} " if text else "model setting "
        text += "(default: the preset's)"
    elif "default" not in text:
        text += f" (default: {f.default}, or the preset's)" if key in _preset_keys() else f" (default: {f.default})"
    return text.replace("%", "%%")


def _preset_keys() -> set[str]:
    return {k for run in TRAIN_PRESETS.values() for k in run}


def validate(cfg: TrainConfig) -> None:
    """Range checks on the run settings (GPTConfig checks its own)."""
    positive = ["batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval",
                "ckpt_interval", "keep_ckpts", "max_skipped_steps"]
    for key in positive:
        if getattr(cfg, key) < 1:
            raise TritonGPTError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    non_negative = ["warmup_steps", "weight_decay", "muon_weight_decay", "grad_clip", "min_lr", "sample_tokens",
                    "eval_hellaswag_interval"]
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise TritonGPTError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.decay_steps is not None and cfg.decay_steps < 1:
        raise TritonGPTError(f"decay_steps must be >= 1, got {cfg.decay_steps}")
    if cfg.skip_spikes is not None and not cfg.skip_spikes > 0:
        raise TritonGPTError(f"skip_spikes must be > 0 (or none: off), got {cfg.skip_spikes}")
    if cfg.hellaswag_limit is not None and cfg.hellaswag_limit < 1:
        raise TritonGPTError(f"hellaswag_limit must be >= 1 (or none: all), got {cfg.hellaswag_limit}")
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        raise TritonGPTError(f"peak_tflops must be > 0 (or none: the table's), got {cfg.peak_tflops}")
    if cfg.init_from is not None:
        init_from.parse(cfg.init_from)
    if cfg.spike_window < 2:
        raise TritonGPTError(f"spike_window must be >= 2, got {cfg.spike_window}")
    if cfg.dp_shard is not None and cfg.dp_shard < 1:
        raise TritonGPTError(f"dp_shard must be >= 1 (or none: all ranks), got {cfg.dp_shard}")
    for key in ("cpu_offload", "async_ckpt", "dp_shard"):
        if getattr(cfg, key) not in (False, None) and cfg.parallel != "fsdp":
            raise TritonGPTError(f"{key} needs --parallel fsdp (parallel is {cfg.parallel})")
    if not cfg.lr > 0:
        raise TritonGPTError(f"lr must be > 0, got {cfg.lr}")
    if cfg.min_lr > cfg.lr:
        raise TritonGPTError(f"min_lr ({cfg.min_lr}) must be <= lr ({cfg.lr})")
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":
        raise TritonGPTError("--optimizer muon needs whole weight matrices and --parallel fsdp shards them: use "
                             "--parallel ddp with muon, or adamw with fsdp")
    if not cfg.muon_lr > 0:
        raise TritonGPTError(f"muon_lr must be > 0, got {cfg.muon_lr}")
    for key in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= getattr(cfg, key) < 1:
            raise TritonGPTError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
