"""Data-parallel training across processes: the pieces the trainer needs from torch.distributed.

Design choices:

- torchrun describes the job through environment variables (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``); without them everything here is a no-op for a single process, so the
  trainer has one code path.
- Backend nccl on GPUs, gloo on CPUs; one GPU per process (``cuda:LOCAL_RANK``).
- CPU ranks share the machine's cores evenly unless the user fixed a thread count.
- Gradients are averaged by ``DistributedDataParallel``; with gradient accumulation they are
  all-reduced only on the last micro-batch (``sync_gradients``).
- Rank 0 alone writes files; it collects every rank's batch-sampler state (``gather``) so a
  checkpoint resumes all ranks exactly.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Distributed:
    """This process's place in the job: rank, number of processes and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; a CUDA device that is absent is a ValueError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, ...), if any.

    Backend nccl on GPUs, gloo on CPUs. Without torchrun: a single process, no group.
    """
    dev = resolve_device(device)
    if "WORLD_SIZE" not in os.environ:
        return Distributed(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, dev, owns)


def set_threads(dist: Distributed, num_threads: int, workers: int = 1) -> None:
    """Share ``num_threads`` cores (0: all, or this rank's share of them) between
    ``workers`` threads of this process: torch's intra-op threads = cores // workers."""
    cores = num_threads or max(1, (os.cpu_count() or 1) // dist.world_size)
    if num_threads or workers > 1 or (dist.world_size > 1 and dist.device.type == "cpu"):
        torch.set_num_threads(max(1, cores // workers))


def wrap_model(model: torch.nn.Module, dist: Distributed) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when there is more than one process."""
    if dist.world_size == 1:
        return model
    return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def sync_gradients(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A context for one backward pass: under DDP, all-reduce its gradients only if ``sync``."""
    if sync or not isinstance(model, DDP):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_over_ranks(value: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """The mean of ``value`` over all ranks (``value`` itself for one process)."""
    if dist.world_size == 1:
        return value
    value = value.clone()
    torch_dist.all_reduce(value)
    return value / dist.world_size


def any_rank(flag: bool, dist: Distributed) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: call it on all)."""
    if dist.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=dist.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def gather(tensor: torch.Tensor, dist: Distributed) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
    if dist.world_size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    torch_dist.all_gather(out, tensor)
    return out


def finish(dist: Distributed) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if dist.owns_group:
        torch_dist.destroy_process_group()


__all__ = ["Distributed", "any_rank", "finish", "gather", "init_distributed",
           "mean_over_ranks", "resolve_device", "set_threads", "sync_gradients", "wrap_model"]
