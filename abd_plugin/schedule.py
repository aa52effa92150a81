"""When Self-Retrospection runs: one schedule object that the guard, the SR hook and host adapters
all ask, and that :meth:`ABDGuard.set_schedule` updates."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class SRSchedule:
    """The SR window over the student's optimizer steps (the guard counts them from 0).

    SR runs at step ``s`` while a :meth:`forced` block is open, or when ``s >= start`` and
    ``(s - start) % every == 0``, where ``start`` is ``start_step``, else
    ``int(start_fraction * total_steps)``; with neither, only :meth:`forced` opens the window.

    Attributes:
        start_step, start_fraction, total_steps, every: the retrospection section's fields
            (flat ``sr_start_step``, ``sr_start_fraction``, ``total_steps``, ``sr_every``).
        lr: the learning rate of the student's optimizer steps inside the window (``sr_lr``;
            None: the optimizer's own).
        auto: SR, with its ``lr``, runs from the guard's optimizer-step hook. A host that runs
            SR at a point of its own (the Lightning callback, in ``on_before_optimizer_step``)
            sets it to False and asks :meth:`active` itself.
    """

    start_step: int | None = None
    start_fraction: float | None = None
    total_steps: int | None = None
    every: int = 1
    lr: float | None = None
    auto: bool = True
    _forced: int = field(default=0, repr=False)

    @property
    def start(self) -> int | None:
        """The first SR step, or None when only :meth:`forced` opens the window."""
        if self.start_step is not None:
            return self.start_step
        if self.start_fraction is not None and self.total_steps is not None:
            return int(self.start_fraction * self.total_steps)
        return None

    def active(self, step: int) -> bool:
        """Whether SR runs at student step ``step``."""
        if self._forced:
            return True
        start = self.start
        if start is None or step < start:
            return False
        return (step - start) % self.every == 0

    @contextmanager
    def forced(self) -> Iterator[None]:
        """Open the window for the steps inside the block (re-entrant)."""
        self._forced += 1
        try:
            yield
        finally:
            self._forced -= 1

    def update(self, total_steps: int | None = None, *, start_step: int | None = None,
               start_fraction: float | None = None) -> None:
        """Set what the host knows once it runs (None: keep the current value)."""
        if start_fraction is not None and not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"sr_start_fraction must be in [0, 1], got {start_fraction}")
        if total_steps is not None:
            self.total_steps = int(total_steps)
        if start_step is not None:
            self.start_step = int(start_step)
        if start_fraction is not None:
            self.start_fraction = float(start_fraction)
