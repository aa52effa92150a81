"""Where the teacher's inputs live: one small record, resolved once per guard and read by every
defense (the audit searches inside it, the eraser fills erased positions with its floor, a later
repair stays inside it).

The guard resolves it at the first floating-point batch the teacher is fed inside the guard, from
``input_range`` when the user states it, else from that batch (:func:`infer_input_range`), and
keeps it with its saved state, so a resumed run uses the same domain.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class InputDomain:
    """The valid inputs of the teacher, in the units it receives (after the user's
    normalisation).

    Attributes:
        shape: one input's shape without the batch, e.g. ``(3, 32, 32)``.
        low, high: per channel, the box the audit's searches stay in.
        floor: per channel, the lowest value real inputs take (black in image space, whatever
            the normalisation): what an erased position becomes by default. It equals ``low``
            except when the range was read off a batch of unknown scale, where ``low`` is
            widened and ``floor`` is the batch's own minimum.
        source: how the domain was found, in words (the report says it).
    """

    shape: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    floor: tuple[float, ...]
    source: str

    @property
    def channels(self) -> int:
        return len(self.low)

    @property
    def is_image(self) -> bool:
        """Inputs with a channel axis and at least one spatial axis (B, C, H, ...)."""
        return len(self.shape) >= 2

    @property
    def range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(low, high)`` per channel, as :func:`~abd_plugin.audit.audit` takes it."""
        return self.low, self.high

    def floor_tensor(self) -> Tensor:
        """``floor`` as float64, shaped to broadcast over a batch ``(B, *shape)``: one value per
        channel for images, a scalar for feature vectors."""
        if not self.is_image:
            return torch.tensor(self.floor[0], dtype=torch.float64)
        low = torch.tensor(self.floor, dtype=torch.float64)
        return low.reshape((1, len(self.floor)) + (1,) * (len(self.shape) - 1))

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "low": list(self.low), "high": list(self.high),
                "floor": list(self.floor), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputDomain:
        return cls(shape=tuple(int(v) for v in d["shape"]),
                   low=tuple(float(v) for v in d["low"]),
                   high=tuple(float(v) for v in d["high"]),
                   floor=tuple(float(v) for v in d["floor"]), source=str(d["source"]))


def infer_input_range(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The valid input range, read off a batch ``x`` (B, C, ...) the teacher is fed.

    Values all inside [0, 1] -> (0, 1); inside [-1, 1] -> (-1, 1); otherwise the batch's
    per-channel minimum and maximum, widened by a quarter of their span on each side (a
    generator whose output is normalised data). Pass ``input_range=`` to the guard or to
    :func:`~abd_plugin.audit.audit` to state it exactly.
    """
    v = x.detach().double()
    c = v.shape[1] if v.dim() >= 2 else 1
    flat = v.transpose(0, 1).reshape(c, -1) if v.dim() >= 2 else v.reshape(1, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    eps = 1e-6
    if float(lo.min()) >= -eps and float(hi.max()) <= 1 + eps:
        return (0.0,) * c, (1.0,) * c
    if float(lo.min()) >= -1 - eps and float(hi.max()) <= 1 + eps:
        return (-1.0,) * c, (1.0,) * c
    span = (hi - lo).clamp_min(1e-3)
    return tuple((lo - span / 4).tolist()), tuple((hi + span / 4).tolist())


def resolve_domain(x: Tensor, input_range: Sequence[float] | None = None) -> InputDomain:
    """The domain of the teacher's inputs from ``input_range`` (``(low, high)`` scalars, stated
    by the user) or, when it is None, from the batch ``x`` (:func:`infer_input_range`)."""
    shape = tuple(int(s) for s in x.shape[1:])
    c = int(x.shape[1]) if x.dim() >= 2 else 1
    if input_range is not None:
        lo, hi = float(input_range[0]), float(input_range[1])
        return InputDomain(shape, (lo,) * c, (hi,) * c, (lo,) * c,
                           f"given: input_range=({lo:g}, {hi:g})")
    low, high = infer_input_range(x)
    known = max(high) <= 1.0 and min(low) >= -1.0  # read as [0, 1] or [-1, 1]
    if known:
        return InputDomain(shape, low, high, low,
                           f"read off the first batch: values in [{low[0]:g}, {high[0]:g}]")
    if x.dim() < 3:  # feature vectors of unknown scale: no channel to take a floor from
        floor: tuple[float, ...] = (0.0,) * len(low)
    else:  # each channel's minimum over this batch (black, for normalised images)
        v = x.detach().double().transpose(0, 1).reshape(c, -1)
        floor = tuple(v.min(dim=1).values.cpu().tolist())
    return InputDomain(shape, low, high, floor,
                       "read off the first batch (unknown scale: its range widened by a quarter)")


__all__ = ["InputDomain", "infer_input_range", "resolve_domain"]
