"""The defense-hook interface: one base class of typed no-op callbacks, and the small context the
guard hands them.

:class:`ABDGuard` calls every registered hook at fixed points of a distillation loop. The call
order is a contract (``tests/test_hook_order.py`` checks it with a hook generated from this
class's ``on_*`` members, so a callback the guard never calls fails there):

1. ``on_guard_enter`` when the guard's block starts, after the guard installed its own hooks.
2. ``on_teacher_input`` runs before every teacher forward inside the guard (the guard's data-free
   audit has run by then, ``ctx.audit``); a returned tensor replaces the teacher's input (the
   trigger eraser's repair).
3. ``on_teacher_output`` runs after every teacher forward whose input went through
   ``on_teacher_input``; a returned tensor replaces the teacher's logits in what the loop
   receives (the trigger eraser's acting spectral gain, under a loss on logit values, hands
   its labels on at the raw teacher's scale).
4. ``on_teacher_forward`` runs inside the teacher's forward on a *synthesis* batch (the input
   carries gradient back to a generator or to optimised pixels). A returned scalar is a **loss
   term**: its gradient is added, once, to whatever loss the user back-propagates through the
   teacher's output. Nothing else about the user's objective changes.
5. ``on_student_forward`` sees every student forward (the guard keeps the last training batch).
6. ``on_before_student_step`` runs between the user's ``backward()`` and the optimizer's
   ``step()`` for optimizers that update the student; a hook adds **gradient terms** to ``.grad``.
7. ``on_after_student_step`` runs after that step.
8. ``on_guard_exit`` when the block ends, normally or by an exception.

The guard calls every callback through one dispatcher (``ABDGuard._dispatch``), which also
times each hook (the ``seconds`` of its report record): a new event is one method here and one
dispatch call in the guard. Hooks hold their own state and expose it through
``state_dict``/``load_state_dict`` so that a resumed run continues exactly where it stopped; the
guard saves it under :attr:`DefenseHook.state_key`.

The built-in defenses are hooks like a user's: the guard builds them from the config through one
list of factories (:mod:`abd_plugin.defenses`: the audit, the trigger eraser, SV, SR, KDIGA) and
registers the user's hooks after them. Each hook reports through its own record (a
:class:`HookReport` subclass whose :meth:`~HookReport.lines` print it); the guard's report is
those records in registration order. A hook that changes the teacher's input also says how in
:meth:`DefenseHook.view_input`, so that ``ctx.teacher_view`` shows other hooks the same repaired
teacher. The audit publishes its verdict on the context (``ctx.audit``) and the guard resolves
where inputs live once (``ctx.domain``) for every hook to read.
"""
from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditReport
    from .domain import InputDomain


class ABDWarning(UserWarning):
    """A defense could not do what its configuration asks (the report says the same); filter
    with ``warnings.filterwarnings("ignore", category=ABDWarning)``."""


def warn_once(owner: object, key: str, message: str) -> None:
    """``warnings.warn(message, ABDWarning)`` the first time ``owner`` (a guard or a hook, one
    per guard) meets ``key``; later calls are silent (the report keeps the counts)."""
    seen: set[str] = owner.__dict__.setdefault("_abd_warned", set())
    if key in seen:
        return
    seen.add(key)
    warnings.warn(message, ABDWarning, stacklevel=3)


class GuardContext(Protocol):
    """What a :class:`DefenseHook` sees of the guard that calls it."""

    @property
    def step(self) -> int:
        """Student optimizer steps taken inside the guard so far (0-based index of the next)."""

    @property
    def last_student_batch(self) -> Tensor | None:
        """The student's last training batch (detached), or None."""

    def suspended(self) -> AbstractContextManager[None]:
        """A block whose forwards and optimizer steps the guard's hooks do not see (use it for a
        hook's own extra forwards)."""

    @property
    def audit(self) -> AuditReport | None:
        """The data-free teacher audit, once it ran (at the first teacher batch); None before,
        or when ``audit=False``."""

    def publish_audit(self, report: AuditReport) -> None:
        """Make ``report`` the guard's audit (:attr:`audit`); the audit hook calls it."""

    @property
    def domain(self) -> InputDomain | None:
        """Where the teacher's inputs live (:class:`~abd_plugin.domain.InputDomain`), resolved
        once at the first floating-point teacher batch (from ``input_range``, the teacher's own
        evidence or that batch, :func:`~abd_plugin.domain.resolve_domain`); None before."""

    @property
    def loss_terms(self) -> tuple[int, int]:
        """Loss terms attached to teacher logits so far, and how many were back-propagated."""

    @property
    def plain_teacher_forwards(self) -> int:
        """Teacher forwards with gradients on, on an input that does not require grad (no
        synthesis batch)."""

    @property
    def distributed(self) -> bool:
        """The student trains data-parallel over several ranks: a hook whose decisions must
        agree across ranks takes them collectively (:mod:`abd_plugin._dist`; every rank reaches
        the same hook calls in lockstep)."""

    @property
    def student_loss_kind(self) -> str | None:
        """What the loop's losses do with the student's logits, read off the gradients of its
        first training forwards: ``"softmax"`` when every gradient row sums to zero (a loss
        that only sees the logits' differences: KL, cross-entropy, at any temperature),
        ``"values"`` when they do not (an L1 or MSE on the logits themselves), ``None`` before
        a student backward was seen."""

    def teacher_view(self, x: Tensor) -> Tensor:
        """``x`` as the guard's teacher sees it: every hook's :meth:`DefenseHook.view_input`
        in registration order (the trigger eraser's current mask when it is on; differentiable
        in ``x``; nothing is learned or counted); ``x`` itself (the same object) when no hook
        changes it. A hook that runs its own copy of the teacher uses it to query the same,
        repaired teacher as the loop."""


@dataclass
class HookReport:
    """Base of the record a hook's :meth:`DefenseHook.report` returns: the guard's report is the
    audit's record plus one record per hook, printed through :meth:`lines`.

    Attributes:
        seconds: wall time of all the hook's callbacks (filled by the guard, which times them).
        warnings: what the hook could not do, in words (the report prints them at its end).
    """

    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report's lines for this hook, indented by two spaces (none by default)."""
        return []

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the record, with its type's name under ``"kind"``."""
        d = asdict(self)
        d["kind"] = type(self).__name__
        return d


@dataclass
class MappingReport(HookReport):
    """The record of a hook whose :meth:`~DefenseHook.report` returns a plain dict."""

    name: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        if not self.values:
            return []
        shown = ", ".join(f"{k}={_short(v)}" for k, v in self.values.items())
        return [f"  {self.name}: {shown}."]


@dataclass
class OffReport(HookReport):
    """The record of a built-in defense this guard did not build (its section is off): its
    ``name`` (the key it would have had) and the report's ``line`` for it."""

    name: str = ""
    line: str = ""

    def lines(self) -> list[str]:
        return [self.line]


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class DefenseHook:
    """Base class of a defense plugged into :class:`~abd_plugin.ABDGuard`. All callbacks are
    no-ops; override the ones you need."""

    #: short name used in reports
    name: str = "defense"

    @property
    def state_key(self) -> str:
        """Key of this hook's state in :meth:`ABDGuard.state_dict`: the class's qualified name.
        Override it (e.g. with a distinguishing setting) when one guard holds two instances of a
        class; keys that still collide get a suffix by registration order: ``"Key"``,
        ``"Key[1]"``, ..."""
        return type(self).__qualname__

    def on_guard_enter(self, ctx: GuardContext) -> None:
        """The guard's ``with`` block starts (or ``guard.attach()`` was called)."""

    def on_guard_exit(self, ctx: GuardContext) -> None:
        """The guard's block ends, normally or by exception."""

    def on_teacher_input(self, ctx: GuardContext, x: Tensor) -> Tensor | None:
        """The teacher is about to run on ``x`` (B, ...), any forward inside the guard (with or
        without gradients). Return a tensor of the same shape to make the teacher run on it
        instead (the trigger eraser's repair), or ``None``. Hooks chain in registration order."""
        return None

    def on_teacher_output(
        self, ctx: GuardContext, x: Tensor, teacher_logits: Tensor
    ) -> Tensor | None:
        """The teacher ran on ``x`` (the input after every hook's :meth:`on_teacher_input`) and
        gave ``teacher_logits`` (B, C), any forward inside the guard (with or without
        gradients). Return logits of the same shape to hand the loop instead (they replace the
        logits inside the teacher's output container), or ``None``. Hooks chain in
        registration order; loss terms (:meth:`on_teacher_forward`) see the replaced logits."""
        return None

    def on_teacher_forward(
        self, ctx: GuardContext, x: Tensor, teacher_logits: Tensor
    ) -> Tensor | None:
        """Teacher ran on a synthesis batch ``x`` (B, ...) giving ``teacher_logits`` (B, C), both
        still in the autograd graph. Return a scalar loss term to add, or ``None``."""
        return None

    def on_student_forward(self, ctx: GuardContext, x: Tensor, student_logits: Tensor) -> None:
        """Student ran on ``x``."""

    def on_before_student_step(
        self, ctx: GuardContext, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Gradients of the student are ready; add gradient terms to ``p.grad`` here."""

    def on_after_student_step(
        self, ctx: GuardContext, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """The optimizer stepped the student."""

    def view_input(self, x: Tensor) -> Tensor:
        """``x`` as this hook makes the teacher see it, without learning or counting anything
        (differentiable in ``x``). Hooks whose :meth:`on_teacher_input` changes teacher inputs
        override it with the same transform; :meth:`GuardContext.teacher_view` chains them."""
        return x

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def report(self) -> HookReport | dict[str, Any]:
        """What the hook did: a :class:`HookReport` record (or a plain dict, shown as a
        :class:`MappingReport`). The guard fills its ``seconds``."""
        return HookReport()
