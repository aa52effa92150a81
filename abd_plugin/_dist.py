"""What the defenses share across data-parallel ranks, so that every rank decides alike: the input
domain, the audit's verdict, the eraser's mask updates and the re-audit's decisions.

A guard synchronises when its student is wrapped in ``DistributedDataParallel`` and more than one
rank runs (``ctx.distributed``); a rank-local run is untouched. Every function here is a
collective: all ranks must call it at the same point (they do, when the ranks run the same loop in
lockstep, as DDP training does).
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def world_size() -> int:
    """Ranks in the default process group (1 without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def rank() -> int:
    import torch.distributed as dist

    return int(dist.get_rank()) if world_size() > 1 else 0


def data_parallel(student: nn.Module) -> bool:
    """Whether ``student`` trains data-parallel across several ranks (DDP-wrapped, world > 1)."""
    return isinstance(student, nn.parallel.DistributedDataParallel) and world_size() > 1


def _device_for(t: Tensor) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (a new tensor on ``t``'s device); ``t`` itself on one rank."""
    import torch.distributed as dist

    if world_size() < 2:
        return t
    buf = t.detach().to(_device_for(t), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_mean(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor averaged over ranks (one flat all-reduce)."""
    n = world_size()
    if n < 2 or not tensors:
        return tensors
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in tensors])) / n
    out, i = [], 0
    for g in tensors:
        out.append(flat[i:i + g.numel()].view_as(g).to(g.dtype))
        i += g.numel()
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    import torch.distributed as dist

    if world_size() < 2:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = ["world_size", "rank", "data_parallel", "all_reduce_sum", "all_reduce_mean",
           "broadcast"]
