"""The defense-hook interface: one base class of typed no-op callbacks.

:class:`ABDGuard` calls every registered hook at fixed points of a distillation loop. The call
order is a contract (tested in ``tests/test_call_order.py``):

1. ``on_teacher_forward`` runs inside the teacher's forward on a *synthesis* batch (the input
   carries gradient back to a generator or to optimised pixels). A returned scalar is a **loss
   term**: its gradient is added, once, to whatever loss the user back-propagates through the
   teacher's output. Nothing else about the user's objective changes.
2. ``on_student_forward`` sees every student forward (the guard keeps the last training batch).
3. ``on_before_student_step`` runs between the user's ``backward()`` and the optimizer's
   ``step()`` for optimizers that update the student; a hook adds **gradient terms** to ``.grad``.
4. ``on_after_student_step`` runs after that step.

Hooks hold their own state and expose it through ``state_dict``/``load_state_dict`` so that a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .guard import ABDGuard


class DefenseHook:
    """Base class of a defense plugged into :class:`~abd_plugin.ABDGuard`. All callbacks are
    no-ops; override the ones you need."""

    #: short name used in reports and state dicts
    name: str = "defense"

    def on_guard_enter(self, guard: "ABDGuard") -> None:
        """The guard's ``with`` block starts (or ``guard.attach()`` was called)."""

    def on_guard_exit(self, guard: "ABDGuard") -> None:
        """The guard's block ends, normally or by exception."""

    def on_teacher_forward(
        self, guard: "ABDGuard", x: Tensor, teacher_logits: Tensor
    ) -> Optional[Tensor]:
        """Teacher ran on a synthesis batch ``x`` (B, ...) giving ``teacher_logits`` (B, C), both
        still in the autograd graph. Return a scalar loss term to add, or ``None``."""
        return None

    def on_student_forward(self, guard: "ABDGuard", x: Tensor, student_logits: Tensor) -> None:
        """Student ran on ``x``."""

    def on_before_student_step(
        self, guard: "ABDGuard", optimizer: Optional[torch.optim.Optimizer]
    ) -> None:
        """Gradients of the student are ready; add gradient terms to ``p.grad`` here."""

    def on_after_student_step(
        self, guard: "ABDGuard", optimizer: Optional[torch.optim.Optimizer]
    ) -> None:
        """The optimizer stepped the student."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        return None

    def report(self) -> Dict[str, Any]:
        return {}
