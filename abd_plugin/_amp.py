"""Dtype and autocast plumbing: the defenses run their extra forwards in the precision the user's
own forward used.

* :func:`capture` records the autocast state (on or off, and its dtype) for a device type; the
  guard records it at every student training forward, and :func:`replay` re-enters it around the
  work done at the optimizer step (SR), which runs after the user's ``autocast`` block closed.
* :func:`as_input_of` casts a floating input to the floating dtype of the model about to run on
  it, when autocast is off (under autocast the ops cast for themselves): the student batch SR
  reuses is in the student's dtype, while the teacher may be float64 or bfloat16.

* :func:`cast_to_model` casts unconditionally, for work that switches autocast off itself.

All are no-ops when nothing differs, so float32 runs without autocast are untouched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype | None


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else False
    except RuntimeError:  # a device type autocast does not know
        return False


def _dtype(device_type: str) -> torch.dtype | None:
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype()
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else None
    except RuntimeError:
        return None


def capture(device_type: str) -> AutocastState:
    """The autocast state now, for ``device_type`` (``x.device.type``)."""
    on = _enabled(device_type)
    return AutocastState(device_type, on, _dtype(device_type) if on else None)


@contextlib.contextmanager
def replay(state: AutocastState | None) -> Iterator[None]:
    """Run the block under the autocast state ``state`` recorded earlier (None: as it is)."""
    if state is None:
        yield
        return
    now = _enabled(state.device_type)
    if state.enabled:
        if now and _dtype(state.device_type) == state.dtype:
            yield
            return
        with torch.autocast(state.device_type, dtype=state.dtype):
            yield
    elif now:
        with torch.autocast(state.device_type, enabled=False):
            yield
    else:
        yield


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """Dtype of the model's first floating parameter (or buffer); None if it has none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return None


def cast_to_model(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` cast to ``model``'s floating dtype whatever the autocast state: for work that runs
    with autocast switched off (the eraser's mask updates), where a bfloat16 or float16 batch made
    under the user's autocast would meet float32 weights."""
    if not x.is_floating_point():
        return x
    dt = floating_dtype(model)
    return x if dt is None or dt == x.dtype else x.to(dt)


def as_input_of(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` cast to ``model``'s floating dtype when the two differ and autocast is off for
    ``x``'s device (differentiable: the gradient flows back in ``x``'s dtype)."""
    if not x.is_floating_point():
        return x
    dt = floating_dtype(model)
    if dt is None or dt == x.dtype or _enabled(x.device.type):
        return x
    return x.to(dt)
