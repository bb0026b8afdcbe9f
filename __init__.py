"""tritongpt: a GPT whose ops (attention, norms, MLPs, lm_head + loss) come from swappable
backends: Triton kernels, PyTorch and its peers. See README.md; `tritongpt kernels list` lists
the ops and backends.

    from tritongpt import GPT, GPTConfig                          # the model
    from tritongpt import flash_attention, layer_norm, gelu_mlp, linear_cross_entropy  # Triton kernels

The names below are imported on first use (PEP 562), so `import tritongpt` stays light (no
torch, no triton). The subpackages (`tritongpt.kernels`, `.model`, `.train`, `.data`,
`.bench`) are namespace packages without `__init__.py`: from the repository root a folder such
as `kernels/` then never shadows an installed distribution of the same name (a regular package
anywhere on sys.path wins over a namespace directory).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "GPT": "tritongpt.model.gpt",
    "KVCache": "tritongpt.model.gpt",
    "GPTConfig": "tritongpt.model.config",
    "PRESETS": "tritongpt.model.config",
    "patch": "tritongpt.model.patch",  # our ops inside Hugging Face models
    "unpatch": "tritongpt.model.patch",
    "flash_attention": "tritongpt.kernels.attention",
    "layer_norm": "tritongpt.kernels.layer_norm",
    "rms_norm": "tritongpt.kernels.rms_norm",
    "gelu_mlp": "tritongpt.kernels.mlp",
    "swiglu_mlp": "tritongpt.kernels.swiglu_mlp",
    "linear_cross_entropy": "tritongpt.kernels.linear_cross_entropy",
    "TritonGPTError": "tritongpt.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)  # lazy: PEP 562, `import tritongpt` stays light
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'tritongpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
