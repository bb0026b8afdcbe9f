"""Triton kernels with their PyTorch references, and the backend registry that serves them.

Importing this package registers every backend of every op (`registry.backends(op)`).
"""

from tritongpt.kernels import registry, reference  # noqa: F401  (reference registers `torch`/`sdpa`)
from tritongpt.kernels.registry import backends, choose, resolve  # noqa: F401
