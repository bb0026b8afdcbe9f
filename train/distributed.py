"""torchrun / DistributedDataParallel setup and rank-0 helpers.

    torchrun --standalone --nproc_per_node=8 -m tritongpt.cli train --preset gpt2 --data DIR

Under torchrun (RANK, LOCAL_RANK and WORLD_SIZE in the environment) `setup` joins the process
group — nccl when the run is on CUDA, gloo on the CPU — and pins each process to the GPU of its
local rank. Without torchrun it is a world of one and nothing is initialized (but for
--parallel fsdp, which shards over a process group even of one: it joins a one-process group on
an in-memory store). Every collective below is a no-op in a world of one, so the training loop
calls them unconditionally. How the model is spread over the ranks is train/parallel.py's.

Restarts (`torchrun --max-restarts N`) need a c10d rendezvous (`--standalone` or
`--rdzv-backend=c10d`) and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, and
`setup` refuses to start without them: otherwise (torch 2.13; the static rendezvous always)
every restarted group shares the agent's store with the group before it, whose process groups'
addresses are still in it, and a restarted worker that reads a killed one's address fails to
connect or hangs (pytorch/pytorch#135712; 2 of 3 restarts did here). With both, each restart
gets a fresh store.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tritongpt.errors import TritonGPTError


@dataclass(frozen=True)
class Dist:
    rank: int  # global rank, 0..world_size-1
    local_rank: int  # rank on this node (picks the GPU)
    world_size: int
    device: torch.device  # where this rank trains

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this rank's GPU when CUDA is available, else the CPU; `cuda` -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TritonGPTError(f"device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TritonGPTError(f"device: {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise TritonGPTError(f"device: {device} does not exist ({torch.cuda.device_count()} GPUs)")
    return device


def setup(device_name: str = "auto", group_of_one: bool = False) -> Dist:
    """Join the torchrun process group if there is one (with `group_of_one`, a one-process group
    without torchrun); returns this process's place in it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if world_size > 1 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise TritonGPTError(f"torchrun --max-restarts {restarts} shares its store with the restarted groups, which "
                             f"can then fail or hang at the restart (pytorch/pytorch#135712): run torchrun with "
                             f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and a c10d rendezvous (--standalone or "
                             f"--rdzv-backend=c10d)")
    if (world_size > 1 or group_of_one) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, local_rank, world_size, device)


# True once this process has left a torchrun process group: the CLI then ends it with `end_worker`.
joined_group = False


def cleanup() -> None:
    global joined_group
    if dist.is_initialized():
        dist.destroy_process_group()
        joined_group = int(os.environ.get("WORLD_SIZE", "1")) > 1  # not a --parallel fsdp group of one


def end_worker(code: int) -> None:
    """Exit now, skipping interpreter shutdown. Why: torch 2.13's DDP keeps its gloo process group
    alive past destroy_process_group (its threads outlive it), and interpreter shutdown then
    sometimes aborts the worker (SIGABRT, "terminate called without an active exception"; about
    1 run in 10 on 2 busy cores), turning a finished run into a failed one. Every file the run
    writes is already fsynced and renamed; only the standard streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (returns a new tensor)."""
    value = value.detach().clone()
    if d.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on some rank (e.g. a signal reached only one)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank (picklable objects; used for RNG and loader states)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out

