"""A soft mask over input positions, filled with the domain's floor: the repair for triggers that
occupy a small region (a patch, a line, scattered strokes)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import InputRepair, blend


class MaskErasure(InputRepair):
    """``R(x) = (1 - m) * x + m * fill`` with ``m = sigmoid(a)``, one value per input position
    (shared by the channels of an image; one per feature of a vector), starting at
    ``sigmoid(-4)`` (about 2 %). ``cost`` is ``mean(m)``, the erased share of the input.

    Args:
        fill: the value erased positions take, shaped to broadcast over a batch (a scalar, or
            one value per channel ``(1, C, 1, ...)``); set later with :meth:`set_fill` when it
            is resolved from the first batch.
    """

    kind = "mask"
    has_region = True

    def __init__(self, fill: Tensor | None = None) -> None:
        self.logits: Tensor | None = None  # (1, 1, *spatial) for images, (1, F) for vectors
        self.fill: Tensor | None = None if fill is None else fill.detach().clone()

    def set_fill(self, fill: Tensor) -> None:
        """Fix the fill value (kept from then on, and saved with the state)."""
        self.fill = fill.detach().clone()

    def _fill_like(self, x: Tensor) -> Tensor:
        assert self.fill is not None, "set_fill() first"
        return self.fill.to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def _shape_for(x: Tensor) -> tuple[int, ...]:
        return (1, 1) + tuple(x.shape[2:]) if x.dim() >= 3 else (1,) + tuple(x.shape[1:])

    def prepare(self, x: Tensor) -> bool:
        shape = self._shape_for(x)
        if self.logits is None:
            self.logits = torch.full(shape, -4.0, device=x.device).requires_grad_(True)
            return True
        if tuple(self.logits.shape) != shape:
            raise ValueError(
                f"the trigger eraser learned a mask of shape {tuple(self.logits.shape)} but "
                f"the teacher now gets inputs of shape {tuple(x.shape[1:])}; one guard "
                "serves one input size (use a guard per resolution)")
        if self.logits.device != x.device:
            with torch.no_grad():
                self.logits = self.logits.detach().to(x.device).requires_grad_(True)
            return True
        return False

    def parameters(self) -> list[Tensor]:
        return [] if self.logits is None else [self.logits]

    @property
    def ready(self) -> bool:
        return self.logits is not None

    def mask(self) -> Tensor | None:
        """The current soft mask in [0, 1] (detached), or None before the first batch."""
        return None if self.logits is None else torch.sigmoid(self.logits.detach())

    # ------------------------------------------------------------------ the transform
    def learning_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.logits is not None, "prepare() first"
        m = torch.sigmoid(self.logits).to(x.dtype)
        return blend(x, m, self._fill_like(x)), m.float().mean()

    def apply(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(1 - m) * x + m * fill`` with the current mask, or ``mask`` when given
        (differentiable in ``x``)."""
        m = self.mask() if mask is None else mask
        if m is None:
            return x
        return blend(x, m.to(device=x.device, dtype=x.dtype), self._fill_like(x))

    def transplant(self, into: Tensor, source: Tensor, shift: tuple[int, ...] = ()
                   ) -> Tensor:
        """``into`` with the masked region copied from ``source`` (same shape):
        ``(1 - m) * into + m * source``, the mask rolled by ``shift`` along the input's
        positions (one offset per spatial axis, or per feature axis for vectors; ``()``: in
        place). Rolled copies are the control: an equal-area region elsewhere."""
        m = self.mask()
        assert m is not None, "prepare() first"
        if shift:
            m = torch.roll(m, shifts=tuple(shift), dims=tuple(range(-len(shift), 0)))
        return blend(into, m.to(device=into.device, dtype=into.dtype), source)

    def changed(self) -> int:
        m = self.mask()
        return 0 if m is None else int((m > 0.5).sum())

    def summary(self) -> dict[str, Any]:
        m = self.mask()
        return {"pixels": 0 if m is None else int((m > 0.5).sum()),
                "mass": 0.0 if m is None else float(m.sum()),
                "fraction": 0.0 if m is None else float(m.mean())}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"mask_logits": None if self.logits is None else self.logits.detach().cpu().clone(),
                "fill": None if self.fill is None else self.fill.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        logits = state["mask_logits"]
        self.logits = None if logits is None else logits.clone().requires_grad_(True)
        fill = state.get("fill")
        self.fill = None if fill is None else fill.clone()
