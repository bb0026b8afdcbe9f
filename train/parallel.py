"""How the model is spread over the ranks: DistributedDataParallel or FSDP2.

    torchrun --standalone --nproc_per_node=8 -m tritongpt.cli train --preset gpt2-xl --parallel fsdp
    tritongpt train --parallel fsdp --cpu-offload --reshard-after-forward false
    torchrun --nnodes=4 --nproc_per_node=8 ... -m tritongpt.cli train --parallel fsdp --dp-shard 8   # HSDP

`ddp` (the default under torchrun) keeps the whole model, its gradients and optimizer state on
every rank and all-reduces the gradients. `fsdp` shards all three: `fully_shard` makes each
transformer Block one FSDP group and the root (embeddings, final norm, lm_head — the tied
wte/lm_head weight is one parameter of the root's group, so the tie survives) another, on a 1-D
device mesh over all ranks ("cuda" with nccl on GPUs, "cpu" with gloo). Each parameter is a
DTensor sharded on dim 0; a group is all-gathered just before its forward (and again for its
backward when reshard_after_forward frees it after the forward), its gradients reduce-scattered
in fp32 after its backward, and each rank's optimizer steps its own shard. With `dp_shard N`
(HSDP) the mesh is 2-D: each group of N consecutive ranks (one node's GPUs, where the fast links
are) shards as above, and the groups hold replicas whose gradients are all-reduced across them;
a rank then holds 1/N of the bytes. The kernels see plain
tensors after the all-gather, so every backend and torch.compile run unchanged. A rank holds
about 1/world_size of the parameter, gradient and optimizer bytes (`local_bytes`).

Under FSDP the MixedPrecisionPolicy casts the gathered parameters to the autocast dtype (bf16 or
fp16) and reduces gradients in fp32; `cpu_offload` keeps the shards and optimizer state in host
memory. Gradient accumulation skips the reduce-scatter until the last micro-batch
(`gradient_sync`); `clip_grad_norm` returns the global norm over all shards (a plain tensor, the
same on every rank), so the update guard decides alike everywhere. `full_state_dict` gathers the
whole model onto rank 0's CPU (`whole_model`: a copy there to sample and score with).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tritongpt.errors import TritonGPTError
from tritongpt.model.gpt import GPT
from tritongpt.train.distributed import Dist

Parallel = Literal["auto", "ddp", "fsdp"]


def mode_of(parallel: str, d: Dist) -> str | None:
    """The way this run is spread: "ddp", "fsdp", or None (one process, the model as it is)."""
    if parallel == "auto":
        return "ddp" if d.enabled else None
    if parallel == "ddp" and not d.enabled:
        return None
    return parallel


def device_mesh(d: Dist, dp_shard: int | None = None) -> DeviceMesh:
    """The ranks' mesh: 1-D over all of them, or with `dp_shard` (HSDP) 2-D, ("replicate", "shard")
    = (world_size / dp_shard, dp_shard): consecutive ranks (a node's GPUs) share one set of shards."""
    shards = d.world_size if dp_shard is None else dp_shard
    if shards < 1 or d.world_size % shards:
        raise TritonGPTError(f"dp_shard must divide the world size {d.world_size} (ranks), got {dp_shard}")
    if shards == d.world_size:
        return init_device_mesh(d.device.type, (d.world_size,))
    return init_device_mesh(d.device.type, (d.world_size // shards, shards), mesh_dim_names=("replicate", "shard"))


def shard(model: GPT, d: Dist, param_dtype: torch.dtype | None, reshard_after_forward: bool = True,
          cpu_offload: bool = False, dp_shard: int | None = None) -> GPT:
    """`model` sharded in place with FSDP2 over all ranks, or over groups of `dp_shard` ranks and
    replicated across the groups (HSDP; returned, its class becomes FSDPGPT): each Block a group,
    then the root. `param_dtype` (None: the parameters' own) is what the gathered parameters
    compute in; gradients are reduced in fp32."""
    if cpu_offload and d.device.type != "cuda":
        raise TritonGPTError(f"cpu_offload moves shards off a GPU; the device is {d.device}")
    mesh = device_mesh(d, dp_shard)
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy() if cpu_offload else None)
    options = {k: v for k, v in options.items() if v is not None}
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)
    return model


def replicate(forward: torch.nn.Module, d: Dist) -> DistributedDataParallel:
    """DistributedDataParallel over `forward` (the model, or its torch.compile'd form)."""
    # no buffer is trained or mutated (the sinusoidal table is a constant): skip the per-forward broadcast
    return DistributedDataParallel(forward, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(mode: str | None, model: torch.nn.Module, forward: torch.nn.Module, sync: bool) -> Iterator[None]:
    """The backward inside reduces gradients over the ranks only when `sync` (the last
    micro-batch of a step): DDP's no_sync, FSDP's set_requires_gradient_sync."""
    if mode == "ddp" and not sync:
        with forward.no_sync():
            yield
        return
    if mode == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over all ranks' gradients: the global norm before clipping as a plain
    tensor (under FSDP the norm of the sharded gradients, all-reduced over the mesh)."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls it (a collective under FSDP): the whole model's state dict on rank 0's
    CPU, an empty dict on the other ranks (no full copy there)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_model(model: GPT, mode: str | None, d: Dist) -> GPT | None:
    """The model to sample or score with on this rank: `model` itself, or under FSDP (a
    collective: every rank calls it) a full copy gathered onto rank 0 only (None elsewhere)."""
    if mode != "fsdp":
        return model
    full = full_state_dict(model)
    if not d.is_main:
        return None
    copy = GPT(model.config)
    copy.load_state_dict(full)
    return copy.to(d.device).eval()


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds (its shards under FSDP)."""
    tensors = list(model.parameters()) + [t for state in optimizer.state.values() for t in state.values()
                                          if isinstance(t, torch.Tensor)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)
