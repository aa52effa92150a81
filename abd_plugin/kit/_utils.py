"""Small helpers shared by the kit modules (not public API)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn


def _logits(out: Any) -> Tensor:
    """Logits from a model output: a tensor, a tuple/list (logits first), a dict with
    ``'logits'``, or an object with a ``.logits`` attribute."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _logits(out[0])
    if isinstance(out, dict) and "logits" in out:
        return _logits(out["logits"])
    if hasattr(out, "logits"):
        return _logits(out.logits)
    raise TypeError(
        f"cannot find logits in a model output of type {type(out).__name__}; return a tensor, "
        "a tuple with logits first, a dict with 'logits', or an object with .logits"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every sub-module's own train/eval flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in flags:
            module.training = was_training


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter or buffer; ``fallback`` for stateless models."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback
