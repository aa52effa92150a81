"""The built-in defenses as one list of factories: how a guard builds its hooks from the config.

:class:`~abd_plugin.ABDGuard` imports no defense itself. It asks :func:`build_defenses` for the
hooks of a config, in this order, and registers the user's own hooks after them exactly as it
registers these:

1. :class:`~abd_plugin.audit.TeacherAudit` (section ``audit``): audits the teacher at its first
   batch and publishes the verdict on the hook context (``ctx.audit``).
2. :class:`~abd_plugin.eraser.TriggerEraser` (section ``erase``): gated by that verdict.
3. :class:`~abd_plugin.vaccine.ShufflingVaccine` (section ``vaccine``).
4. :class:`~abd_plugin.retrospection.SelfRetrospection` (section ``retrospection``).
5. :class:`~abd_plugin.gradient_alignment.InputGradientAlignment` (section ``alignment``).

The default config builds the first two; :meth:`ABDConfig.classic` builds 3 and 4 instead. A
factory returns None when its section is off; the report then shows the defense's ``off_line``.
This is the one module that reads every section: each factory hands its defense only its own
section and the general fields (``seed``, ``logits_fn``, ``target``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ._replica import TeacherReplica
from .audit import TeacherAudit
from .config import ABDConfig
from .eraser import TriggerEraser
from .gradient_alignment import InputGradientAlignment
from .hooks import DefenseHook, OffReport
from .retrospection import SelfRetrospection
from .schedule import SRSchedule
from .vaccine import ShufflingVaccine


@dataclass
class Parts:
    """What a factory may use: the two models, the config, the guard's frozen teacher copy and
    SR schedule, and the loss-scale callable under AMP."""

    teacher: nn.Module
    student: nn.Module
    config: ABDConfig
    replica: TeacherReplica
    schedule: SRSchedule
    loss_scale: Callable[[], float] | None = None


@dataclass(frozen=True)
class Defense:
    """A built-in defense: ``build`` makes its hook (None when its section is off); ``key``
    names it in the report when it is off, where ``off_line`` (if any) is printed."""

    key: str
    build: Callable[[Parts], DefenseHook | None]
    off_line: str | None = None


def _audit(p: Parts) -> DefenseHook | None:
    c = p.config
    if not c.audit.enabled:
        return None
    return TeacherAudit(p.teacher, c.audit, seed=c.seed, logits_fn=c.logits_fn,
                        replica=p.replica)


def _eraser(p: Parts) -> DefenseHook | None:
    c = p.config
    if not c.erase.enabled:
        return None
    # the re-audit searches like the audit (its settings), for the config's target or the
    # audit's suspect
    return TriggerEraser(p.teacher, c.erase, target=c.target, audit_settings=c.audit,
                         seed=c.seed, logits_fn=c.logits_fn, replica=p.replica)


def _vaccine(p: Parts) -> DefenseHook | None:
    c = p.config
    if not c.vaccine.enabled:
        return None
    return ShufflingVaccine(p.teacher, c.vaccine, seed=c.seed, logits_fn=c.logits_fn,
                            replica=p.replica)


def _retrospection(p: Parts) -> DefenseHook | None:
    c = p.config
    if not c.retrospection.enabled:
        return None
    return SelfRetrospection(p.student, p.teacher, c.retrospection, seed=c.seed,
                             logits_fn=c.logits_fn, replica=p.replica, schedule=p.schedule)


def _alignment(p: Parts) -> DefenseHook | None:
    c = p.config
    if not c.alignment.enabled:
        return None
    return InputGradientAlignment.from_settings(p.student, p.teacher, c.alignment,
                                                loss_scale=p.loss_scale,
                                                logits_fn=c.logits_fn, replica=p.replica)


#: the built-in defenses, in registration order
BUILTIN_DEFENSES: tuple[Defense, ...] = (
    Defense("TeacherAudit", _audit, "  Teacher audit: not run (audit=False)"),
    Defense("TriggerEraser", _eraser, "  Trigger eraser: off (erase=False)."),
    Defense("ShufflingVaccine", _vaccine, "  Shuffling Vaccine: off."),
    Defense("SelfRetrospection", _retrospection, "  Self-Retrospection: did not run."),
    Defense("InputGradientAlignment", _alignment),
)


def schedule_for(config: ABDConfig) -> SRSchedule:
    """The SR window of ``config`` (the guard's :attr:`~abd_plugin.ABDGuard.sr_schedule`)."""
    return config.retrospection.schedule()


def build_defenses(parts: Parts, defenses: Sequence[Defense] = BUILTIN_DEFENSES
                   ) -> list[DefenseHook | OffReport]:
    """The hooks ``parts.config`` asks for, in order; an :class:`~abd_plugin.hooks.OffReport`
    in the place of each defense that is off and has a line to say so."""
    out: list[DefenseHook | OffReport] = []
    for d in defenses:
        hook = d.build(parts)
        if hook is not None:
            out.append(hook)
        elif d.off_line is not None:
            out.append(OffReport(name=d.key, line=d.off_line))
    return out


__all__ = ["Parts", "Defense", "BUILTIN_DEFENSES", "build_defenses", "schedule_for"]
