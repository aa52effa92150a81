"""The repair interface: a learnable transform of the teacher's input."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


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
    #: the learner's flip term: ``"p"`` (mean p_t of the target samples) or ``"log"``
    #: (``-log(1 - p_t)``, which does not saturate when p_t is near 1)
    flip_loss: str = "p"
    #: the learner skips a batch in which fewer than this share of samples are not the target
    min_other_fraction: float = 0.0
    #: the repair changes a region of the input (:meth:`transplant` moves it elsewhere for the
    #: probation's control); False: it changes the whole input (the control is another source)
    has_region: bool = False

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
        """``into`` with what this repair takes away from ``source`` put in (the probation
        checks that it *carries* the target class). A region repair (``has_region``) copies its
        region, moved by ``shift`` positions for the control; the default adds the residual
        ``source - R(source)`` to ``into`` (``shift`` is not used: the control is a residual
        of another class's samples)."""
        return into + (source - self.apply(source))

    def changed(self) -> int:
        """How many positions (or coefficients) the repair changes now; the probation checks
        a repair that changes something."""
        return 0

    def before_update(self, model: nn.Module, x: Tensor, target: int, *, updates: int,
                      last_flip: float, logits_fn: Callable[[Any], Tensor] | None = None,
                      distributed: bool = False) -> bool:
        """Called by the learner before each update's steps (grad enabled, autocast off,
        ``model`` the frozen teacher copy): a repair with a second stage of its own learns it
        here. True when the learner's parameters were replaced (the learner then resets its
        optimizer). Default: nothing."""
        return False

    def learning_input(self, x: Tensor) -> Tensor:
        """What the learner's objective starts from (after :meth:`before_update`): ``x`` itself
        here; a two-stage repair returns its first stage's view, and :meth:`learning_view`
        then applies the second stage only."""
        return x

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
