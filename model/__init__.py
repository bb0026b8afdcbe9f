"""tritongpt.model: the GPT, its config and presets; Hugging Face GPT-2 import/export in
`tritongpt.model.hf`.

    from tritongpt.model import GPT, GPTConfig, PRESETS
"""

from tritongpt.model.config import PRESETS, GPTConfig
from tritongpt.model.gpt import GPT, KVCache, sample

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "sample"]
