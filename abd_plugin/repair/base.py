"""The repair interface: a learnable transform of the teacher's input."""
from __future__ import annotations

from typing import Any

from torch import Tensor


class InputRepair:
    """A learnable transform ``R`` of the teacher's input that undoes one family of triggers.

    A repair holds its own parameters (created for the first input it is prepared for) and
    offers two views of itself:

    * :meth:`apply` — ``R(x)`` with the parameters as they are now (detached: nothing learns;
      differentiable in ``x``). The guard's teacher pre-hook, the re-audit and
      ``ctx.teacher_view`` all use it.
    * :meth:`learning_view` — ``(R(x), cost)`` with the parameters in the graph, for
      :class:`~abd_plugin.repair.RepairLearner`: ``cost`` is a scalar in [0, 1] saying how much
      of the input the repair changes (the learner prices it), computed from the same tensors as
      ``R(x)``.

    Subclasses implement :meth:`prepare`, :meth:`parameters`, :meth:`learning_view`,
    :meth:`apply`, :meth:`summary` and the state methods.
    """

    #: short name used in reports
    kind: str = "repair"

    def prepare(self, x: Tensor) -> bool:
        """Make sure the parameters exist for inputs shaped like ``x`` and live on its device;
        True when they were created or replaced (the learner then rebuilds its optimizer)."""
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        """The tensors the learner optimises (leaf tensors with ``requires_grad``)."""
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        """Whether the repair has parameters (it was prepared, or loaded from a state)."""
        raise NotImplementedError

    def learning_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(R(x), cost)`` with the parameters in the graph."""
        raise NotImplementedError

    def apply(self, x: Tensor) -> Tensor:
        """``R(x)`` with the current parameters, detached (``x`` itself before it is ready)."""
        raise NotImplementedError

    def transplant(self, into: Tensor, source: Tensor, shift: tuple[int, ...] = ()
                   ) -> Tensor:
        """``into`` with the part of the input this repair changes taken from ``source``
        (moved by ``shift`` positions: the control). Repairs that change a region implement it;
        the eraser's probation uses it to check that the region *carries* the target class."""
        raise NotImplementedError(f"{type(self).__name__} has no region to transplant")

    def summary(self) -> dict[str, Any]:
        """Numbers the eraser's report shows (e.g. how many positions a mask erases)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def blend(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    """``(1 - m) * x + m * fill``: the erasure (one formula for the hook, the learning and the
    re-audit)."""
    return x * (1 - m) + fill * m


__all__ = ["InputRepair", "blend"]
