"""Normalise what models return into logits, and validate the tensors the defenses consume.

Data-free KD code bases disagree on what a model returns: a bare tensor, a tuple ``(logits,
*activations)`` (ZSKT), a dict with ``"logits"`` or an object with ``.logits`` (Hugging Face).
Every part of the core goes through :func:`extract_logits`, so none of them guesses by shape.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

LogitsFn = Callable[[Any], Tensor]


def extract_logits(output: Any, logits_fn: LogitsFn | None = None) -> Tensor:
    """Return the logits tensor of a model output.

    Args:
        output: a tensor, a tuple/list whose first element is the logits, a mapping with key
            ``"logits"``, or an object with a ``.logits`` attribute.
        logits_fn: overrides the rule above (``logits_fn(output) -> Tensor``).
    """
    if logits_fn is not None:
        out = logits_fn(output)
    elif isinstance(output, Tensor):
        out = output
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        out = output[0]
    elif isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        out = output["logits"]
    elif isinstance(getattr(output, "logits", None), Tensor):
        out = output.logits
    else:
        raise TypeError(
            f"cannot find logits in a model output of type {type(output).__name__}; "
            "return a tensor, a tuple with logits first, a dict with 'logits', or pass "
            "logits_fn=lambda out: ... to ABDGuard/ABDConfig"
        )
    if not isinstance(out, Tensor):
        raise TypeError(f"logits_fn returned {type(out).__name__}, expected a torch.Tensor")
    return out


def replace_logits(output: Any, logits: Tensor) -> Any:
    """Return ``output`` with its logits swapped for ``logits`` (same container type).

    Only the standard containers that :func:`extract_logits` reads without a ``logits_fn`` can be
    rebuilt (the logits go where that rule finds them); anything else raises ``TypeError``.
    """
    if isinstance(output, Tensor):
        return logits
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (logits,) + tuple(output[1:])
    if isinstance(output, list) and output and isinstance(output[0], Tensor):
        return [logits] + list(output[1:])
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        new = type(output)(output) if not hasattr(output, "__dataclass_fields__") else output
        new["logits"] = logits
        return new
    if isinstance(getattr(output, "logits", None), Tensor):
        try:
            output.logits = logits
            return output
        except Exception:  # frozen output object: fall through
            pass
    raise TypeError(
        f"cannot put logits back into a model output of type {type(output).__name__}; "
        "use the explicit API (guard.vaccine_penalty) for this model"
    )


def check_input(x: Tensor, where: str = "input") -> None:
    """Reject inputs the defenses cannot use (not a tensor, integer, unbatched, NaN/Inf), with the
    fix in the message."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{where} has integer dtype {x.dtype}; the defenses need float images: "
            "convert with x.float() / 255 (or your normalisation) before the model"
        )
    if x.dim() < 2:
        raise ValueError(f"{where} must be batched (batch first), got shape {tuple(x.shape)}")
    if not torch.isfinite(x.detach()).all():
        raise ValueError(
            f"{where} contains NaN or Inf; the defenses refuse non-finite batches (they would "
            "write NaN into gradients): check the generator / data pipeline that produced it"
        )


def check_logits(
    logits: Tensor, batch: int | None = None, where: str = "logits", classes: int | None = None
) -> None:
    """Logits must be a finite float (B, C) tensor with C >= 2, B matching the input and C the
    teacher's number of classes (``classes``, when known)."""
    if not torch.is_floating_point(logits):
        raise TypeError(f"{where} must be floating point, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"{where} must have shape (batch, num_classes) with num_classes >= 2, got "
            f"{tuple(logits.shape)}; if the model returns something else pass logits_fn=..."
        )
    if classes is not None and logits.shape[1] != classes:
        raise ValueError(
            f"{where} have shape {tuple(logits.shape)}: {logits.shape[1]} classes, but the "
            f"teacher's own output has {classes} (shape ({logits.shape[0]}, {classes})); pass the "
            "teacher's logits for this batch (the same model the guard wraps)"
        )
    if batch is not None and logits.shape[0] != batch:
        raise ValueError(
            f"{where} has {logits.shape[0]} rows for a batch of {batch} inputs; pass the logits "
            "computed on exactly this batch"
        )
    if not torch.isfinite(logits.detach()).all():
        raise ValueError(
            f"{where} contain NaN or Inf; check the model and its input (a diverged generator "
            "or un-normalised input is the usual cause)"
        )
