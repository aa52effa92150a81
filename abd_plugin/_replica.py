"""A hook-free, frozen, eval-mode copy of the teacher that the defenses run instead of the user's
teacher, so that host hooks (DeepInversion BN hooks, CMI feature hooks) never see the defenses'
extra forwards and the user's teacher is never touched."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def hook_free_copy(model: nn.Module) -> nn.Module:
    """``deepcopy`` the model with every hook dictionary replaced by an empty one, so the copy
    neither runs nor duplicates hooks registered on the original (a host's own hooks, such as
    DeepInversion's BatchNorm-statistics hooks, never see the defenses' forwards)."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for attr, val in vars(m).items():
            if "hooks" in attr and isinstance(val, dict):
                memo[id(val)] = type(val)()
    clone = copy.deepcopy(model, memo)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def model_device(model: nn.Module, fallback: torch.device | None = None) -> torch.device:
    """Device of the model's first parameter or buffer; ``fallback`` (default CPU) for stateless
    models."""
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return fallback if fallback is not None else torch.device("cpu")


class TeacherReplica:
    """Lazily made frozen copy of a teacher; follows the device of the inputs it is given."""

    def __init__(self, teacher: nn.Module) -> None:
        self._source = unwrap_model(teacher)
        self._module: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            self._module = hook_free_copy(self._source)
        return self._module

    def to_device_of(self, x: torch.Tensor) -> nn.Module:
        mod = self.module
        if model_device(mod) != x.device:
            mod.to(x.device)
        return mod


def average_over_ranks(student: nn.Module, grads: list[Tensor]) -> list[Tensor]:
    """Average gradients a hook adds to ``.grad`` over the DDP ranks: DDP all-reduces only what
    ``backward`` produced (SR's and the KDIGA term's gradients come after it). Unchanged when the
    student is not DDP-wrapped or there is one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return grads
    if not isinstance(student, nn.parallel.DistributedDataParallel):
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = [], 0
    for g in grads:
        out.append(flat[i:i + g.numel()].view_as(g))
        i += g.numel()
    return out


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (BatchNorm running statistics, counters) on exit,
    **without** bumping the buffers' autograd version counters, so a graph built inside the block
    (a term back-propagated later by the user) stays usable. Safe for BatchNorm: in train mode
    its backward does not read the running statistics; in eval mode they did not change."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.data.copy_(v)  # .data: the restore is invisible to autograd's version check


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> float:
    """Add ``grads`` to the parameters' ``.grad`` (creating it where None); returns their L2
    norm. Used by the hooks that add gradients between ``backward()`` and ``step()``."""
    total = 0.0
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            total += float(g.pow(2).sum())
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
    return total ** 0.5



class ViewedModel(nn.Module):
    """``model(view(x))``: a frozen teacher copy that sees its inputs through a transform (a
    repair's, or the guard's ``teacher_view``), for the re-audit and other hooks' own forwards."""

    def __init__(self, model: nn.Module, view: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.view = view

    def forward(self, x: Tensor) -> Any:
        return self.model(self.view(x))
