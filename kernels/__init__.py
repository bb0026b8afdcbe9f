"""Triton kernels with their PyTorch references, and the backend registry that serves them.

Importing this package registers every backend of every op (`registry.backends(op)`).
"""

from tritongpt.kernels import registry, reference  # noqa: F401  (reference registers `torch`/`sdpa`)
from tritongpt.kernels.registry import backends, choose, resolve  # noqa: F401
from tritongpt.kernels import layer_norm as _layer_norm  # noqa: F401  (registers the `triton` LayerNorm)
from tritongpt.kernels.mlp import gelu_mlp  # noqa: F401  (registers the `triton` mlp backend)
from tritongpt.kernels.attention import flash_attention  # noqa: F401  (registers attention "triton")
