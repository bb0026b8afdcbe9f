"""tritongpt: a GPT-2 style model whose attention, LayerNorm and MLP come from swappable
backends (Triton kernels, PyTorch SDPA, plain PyTorch). See README.md."""

__version__ = "0.1.0"
