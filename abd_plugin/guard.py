"""ABDGuard: wrap an unchanged data-free KD loop with the ABD defenses.

Automatic mode::

    with ABDGuard(teacher, student, total_steps=n_steps, sr_start_fraction=0.99) as guard:
        for it in range(n_steps):
            x = generator(z)                       # synthesis batch (in the graph)
            loss_g = -kl(teacher(x), student(x))   # SV term joins this loss's gradient
            loss_g.backward(); opt_g.step()
            ...
            loss_s.backward(); opt_s.step()        # SR gradient added just before this step
    print(guard.report())

What the guard installs while active, and removes on exit (also on an exception):

* a forward hook on the teacher. When the teacher runs with gradients on an input that requires
  grad (a synthesis batch), every :class:`DefenseHook`'s ``on_teacher_forward`` may return a loss
  term. The returned logits are the teacher's own values; they carry an autograd node that, when
  the user back-propagates through them, also back-propagates the loss terms once (gradient 1):
  a second ``backward()`` through the same logits (``retain_graph=True``) adds nothing more.
* whatever the defenses install themselves in ``on_guard_enter`` (the vaccine: a pre-hook that
  reads the input of the teacher module where its ensemble shares the trunk), removed in
  ``on_guard_exit``.
* a forward hook on the student that remembers the last training batch (detached).
* process-wide optimizer step pre/post hooks (``torch.optim.optimizer``) filtered to optimizers
  that hold student parameters: ``on_before_student_step`` runs between ``backward`` and
  ``step``. Only this guard's handles are registered and removed.

The teacher is never modified: the defenses run a frozen hook-free replica; the teacher's
``.grad`` is restored on exit (the SV term back-propagates through the teacher's own forward).

Explicit mode (no hooks needed): :meth:`vaccine_penalty`, :meth:`suspicious`, :meth:`reweight`,
:meth:`observe`, :meth:`retrospect`.

Mixed precision: the SV term enters the backward with gradient 1, so a loss scaled by a
``GradScaler`` sees it un-scaled; pass ``loss_scale=scaler.get_scale`` to the guard. The work done
at the optimizer step (SR) re-enters the autocast state of the student's last training forward,
and every extra forward casts its batch to the dtype of the model it runs (a float64 or bfloat16
teacher with a float32 student).

One guard per student: a second guard attached to a student that an active guard already wraps
raises ``RuntimeError`` (SR would run twice per step). When a defense cannot do its job (student
in ``eval()`` mode, SV term never back-propagated, no synthesis batch seen, SR gradient NaN, an
input range only guessed from a batch of unknown scale), the report says so (``warnings``; SR's
record counts ``skipped`` steps) and an :class:`~abd_plugin.hooks.ABDWarning` is issued once per
guard. The report's second line says which input range the defenses used and where it came from
(:mod:`abd_plugin.domain`).

The guard imports no defense: it builds them from the config's sections through
:mod:`abd_plugin.defenses` (the default: the audit, then the trigger eraser), registers the
user's ``hooks`` after them, and treats all alike. Its report is the hooks' records in that
order (:class:`GuardReport`).
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from . import _amp, _dist
from ._replica import TeacherReplica, hook_free_copy, unwrap_model
from .config import ABDConfig
from .defenses import Parts, build_defenses, schedule_for
from .domain import InputDomain, resolve_domain
from .hooks import DefenseHook, GuardContext, HookReport, MappingReport, OffReport, warn_once
from .outputs import check_input, check_logits, extract_logits, replace_logits
from .schedule import SRSchedule

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditRecord, AuditReport
    from .eraser import TriggerEraser
    from .retrospection import SelfRetrospection
    from .vaccine import ShufflingVaccine

R = TypeVar("R", bound=HookReport)


class _TermCounter:
    """Loss terms attached to teacher logits, and how many of them were back-propagated."""

    __slots__ = ("attached", "fired")

    def __init__(self, attached: int = 0, fired: int = 0) -> None:
        self.attached, self.fired = attached, fired


class _AddLossTerm(torch.autograd.Function):
    """Identity on ``logits``; the first backward through it also back-propagates ``term`` (with
    gradient ``scale``) and counts it in ``counter``; later backwards through the same node (a
    retained graph) pass only the logits' gradient: the term is applied once per forward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, term: Tensor, scale: float,
                counter: _TermCounter) -> Tensor:
        ctx.term_shape = term.shape
        ctx.term_dtype = term.dtype
        ctx.scale = scale
        ctx.counter = counter
        ctx.fired = False
        counter.attached += 1
        return logits.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        if ctx.fired:
            return grad, None, None, None
        ctx.fired = True
        ctx.counter.fired += 1
        return (
            grad,
            torch.full(ctx.term_shape, ctx.scale, dtype=ctx.term_dtype, device=grad.device),
            None,
            None,
        )


#: students wrapped by an active guard: id(student module) -> that guard (weakly)
_ACTIVE_STUDENTS: dict[int, weakref.ReferenceType[ABDGuard]] = {}


@dataclass
class GuardReport:
    """What the guard did: the audit's record plus one record per hook, in registration order
    (``print(report)`` says it in words).

    Attributes:
        records: ``{key: record}``: each hook's :class:`~abd_plugin.hooks.HookReport` under its
            ``state_key`` (the audit's :class:`~abd_plugin.audit.AuditRecord`, the eraser's
            :class:`~abd_plugin.eraser.EraserReport`, ...; a user's hook likewise, a plain dict
            as a :class:`~abd_plugin.hooks.MappingReport`), and an
            :class:`~abd_plugin.hooks.OffReport` for each built-in defense that is off.
        student_steps: student optimizer steps seen.
        loss_terms_attached, loss_terms_backpropagated: loss terms (the vaccine's) attached to
            teacher logits, and how many were back-propagated (once each at most).
        warnings: what a defense could not do, in words (each also issued once as an
            ``ABDWarning``).
        domain: where the teacher's inputs live (:class:`~abd_plugin.domain.InputDomain`, the
            range the audit searched and the eraser's floor); the printed report's first line
            after its title says it in words (:meth:`domain_line`).

    ``report.get(EraserReport)`` returns the first record of a type (None when there is none);
    ``report.audit`` the audit's record.
    """

    records: dict[str, HookReport] = field(default_factory=dict)
    #: the key of the audit's record in ``records`` (None: the guard has no audit)
    audit_key: str | None = None
    student_steps: int = 0
    loss_terms_attached: int = 0
    loss_terms_backpropagated: int = 0
    warnings: list[str] = field(default_factory=list)
    #: where the teacher's inputs live (None: no floating-point teacher batch seen yet)
    domain: InputDomain | None = None

    def get(self, kind: type[R]) -> R | None:
        """The first record of type ``kind``, or None."""
        for rec in self.records.values():
            if isinstance(rec, kind):
                return rec
        return None

    @property
    def audit(self) -> AuditRecord | None:
        """The audit's record (None when the guard has no audit)."""
        if self.audit_key is None:
            return None
        return self.records[self.audit_key]  # type: ignore[return-value]

    def as_dict(self) -> dict[str, Any]:
        return {"records": {k: r.as_dict() for k, r in self.records.items()},
                "audit_key": self.audit_key, "student_steps": self.student_steps,
                "loss_terms_attached": self.loss_terms_attached,
                "loss_terms_backpropagated": self.loss_terms_backpropagated,
                "warnings": list(self.warnings),
                "domain": None if self.domain is None else self.domain.as_dict()}

    def domain_line(self) -> str:
        """The report's line on the input domain (:meth:`InputDomain.describe`)."""
        if self.domain is None:
            return "  Input domain: not resolved (no floating-point teacher batch seen)."
        return f"  Input domain: {self.domain.describe()}."

    def __str__(self) -> str:
        lines = ["abd-plugin guard report", self.domain_line()]
        for rec in self.records.values():
            lines += rec.lines()
        lines.append(f"  Student optimizer steps seen: {self.student_steps}.")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


class _HookContext:
    """The :class:`~abd_plugin.hooks.GuardContext` a guard hands its hooks: a view, not the
    guard."""

    __slots__ = ("_guard",)

    def __init__(self, guard: ABDGuard) -> None:
        self._guard = guard

    @property
    def step(self) -> int:
        return self._guard.step

    @property
    def last_student_batch(self) -> Tensor | None:
        return self._guard.last_student_batch

    def suspended(self) -> AbstractContextManager[None]:
        return self._guard.suspended()

    @property
    def audit(self) -> AuditReport | None:
        return self._guard.audit_report

    def publish_audit(self, report: AuditReport) -> None:
        self._guard.audit_report = report

    @property
    def domain(self) -> InputDomain | None:
        return self._guard.domain

    @property
    def loss_terms(self) -> tuple[int, int]:
        terms = self._guard._terms
        return terms.attached, terms.fired

    @property
    def plain_teacher_forwards(self) -> int:
        return self._guard._plain_teacher_forwards

    @property
    def distributed(self) -> bool:
        return self._guard.distributed

    @property
    def student_loss_kind(self) -> str | None:
        return self._guard.student_loss_kind

    def teacher_view(self, x: Tensor) -> Tensor:
        return self._guard.teacher_view(x)


#: student training forwards whose logits' gradients say what the loss reads (a few: each
#: costs one reduction and, on a GPU, a sync)
_LOSS_PROBES = 8


def _state_keys(hooks: Sequence[DefenseHook]) -> list[str]:
    """Each hook's ``state_key``; a key met again gets a suffix by order (``"K"``, ``"K[1]"``)."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    for h in hooks:
        key = h.state_key
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys.append(key if n == 0 else f"{key}[{n}]")
    if len(set(keys)) != len(keys):
        raise ValueError(f"hooks have colliding state_key values {keys}; override state_key")
    return keys


class ABDGuard:
    """ABD around a teacher/student pair. A context manager and a plain object.

    Args:
        teacher: the untrusted teacher (never modified).
        student: the student being distilled (may be DDP-wrapped).
        config: an :class:`ABDConfig`; keyword ``overrides`` replace its fields (sections or
            flat keywords, e.g. ``erase_price=1.0``).
        hooks: extra :class:`DefenseHook` objects, registered after the built-in defenses.
        loss_scale: a callable giving the current loss scale (``scaler.get_scale``) under AMP.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        config: ABDConfig | None = None,
        hooks: Sequence[DefenseHook] = (),
        loss_scale: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError("ABDGuard(teacher, student) takes two torch.nn.Module objects")
        if unwrap_model(teacher) is unwrap_model(student):
            raise ValueError("teacher and student are the same module; pass two models")
        cfg = config or ABDConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        sr = cfg.retrospection
        if sr.enabled and sr.start_fraction is not None and sr.total_steps is None:
            raise ValueError("sr_start_fraction needs total_steps=<number of student optimizer "
                             "steps in the run>; pass ABDGuard(..., total_steps=N)")
        self.config = cfg
        self.teacher = teacher
        self.student = student
        self._teacher_core = unwrap_model(teacher)
        self._student_core = unwrap_model(student)
        self._replica = TeacherReplica(teacher)
        #: when SR runs; :meth:`set_schedule` updates it (``self.config`` keeps the values the
        #: guard was built with)
        self.sr_schedule: SRSchedule = schedule_for(cfg)
        built = build_defenses(Parts(teacher, student, cfg, self._replica, self.sr_schedule,
                                     loss_scale))
        #: the hooks in registration order: the built-in defenses the config asks for, then
        #: ``hooks``
        self.hooks: list[DefenseHook] = [h for h in built if isinstance(h, DefenseHook)]
        self._off: list[OffReport] = [h for h in built if isinstance(h, OffReport)]
        self._order: list[DefenseHook | OffReport] = list(built)
        for h in hooks:
            if not isinstance(h, DefenseHook):
                raise TypeError(f"hooks must be DefenseHook instances, got {type(h).__name__}")
            if any(h is g for g in self.hooks):
                raise ValueError(f"hook {h!r} is registered twice")
            self.hooks.append(h)
            self._order.append(h)
        self._state_keys = _state_keys(self.hooks)
        self._ctx: GuardContext = _HookContext(self)
        self._seconds = dict.fromkeys(self._state_keys, 0.0)  # per hook, all its calls
        self._student_forward_seen = any(
            type(h).on_student_forward is not DefenseHook.on_student_forward for h in self.hooks)
        self.loss_scale = loss_scale
        self.step = 0
        #: the data-free audit of the teacher (the audit hook publishes it at the first teacher
        #: batch; None before, or without an audit)
        self.audit_report: AuditReport | None = None
        #: where the teacher's inputs live (resolved at the first floating-point teacher batch)
        self.domain: InputDomain | None = None
        self.last_student_batch: Tensor | None = None
        self._student_amp: _amp.AutocastState | None = None  # autocast of that batch's forward
        self._terms = _TermCounter()
        self._plain_teacher_forwards = 0  # grad-enabled teacher forwards on a no-grad input
        self._handles: list[Any] = []
        self._first_batch_checked = False
        self._output_due = False  # the teacher forward under way had its input dispatched
        self._loss_probes = 0  # student logits whose gradient is watched (_LOSS_PROBES)
        self._loss_votes = [0, 0]  # of the gradients seen: rows summing to zero, the others
        self._teacher_classes: int | None = None  # the teacher's logits width (first batch)
        self._student_classes_checked = False
        self._notes: dict[str, str] = {}  # what the guard noticed about the loop (report)
        self._attached = False
        self._suspended = 0
        self._terms_suspended = 0
        self._teacher_grads: list[Any] = []
        self._student_param_ids = {id(p) for p in self._student_core.parameters()}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ABDGuard:
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def attach(self) -> ABDGuard:
        """Install the hooks (what ``with`` does on entry)."""
        if self._attached:
            raise RuntimeError(
                "this ABDGuard is already active; a guard cannot be nested in itself"
            )
        key = id(self._student_core)
        ref = _ACTIVE_STUDENTS.get(key)
        other = ref() if ref is not None else None
        if other is not None and other is not self and other.active:
            raise RuntimeError(
                "another ABDGuard is already active on this student; two guards would run SR "
                "twice per step (and SV twice per synthesis batch). Use one guard, or leave the "
                "first one's `with` block (guard.detach()) before attaching a second")
        self._teacher_grads = [(p, None if p.grad is None else p.grad.detach().clone())
                               for p in self._teacher_core.parameters()]
        try:
            _ACTIVE_STUDENTS[key] = weakref.ref(self)
            self._handles.append(
                self._teacher_core.register_forward_pre_hook(self._teacher_pre_hook))
            self._handles.append(self._teacher_core.register_forward_hook(self._teacher_hook))
            self._handles.append(self._student_core.register_forward_hook(self._student_hook))
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )
            self._handles.append(register_optimizer_step_pre_hook(self._pre_step))
            self._handles.append(register_optimizer_step_post_hook(self._post_step))
            self._attached = True
            self._dispatch("on_guard_enter")
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook and restore the teacher's ``.grad`` (what ``with`` does on exit)."""
        try:
            if self._attached:
                self._check_no_ops(final=True)
                self._dispatch("on_guard_exit")
        finally:
            ref = _ACTIVE_STUDENTS.get(id(self._student_core))
            if ref is not None and ref() in (self, None):
                del _ACTIVE_STUDENTS[id(self._student_core)]
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for p, g in self._teacher_grads:
                p.grad = g
            self._teacher_grads = []
            self._attached = False
            self.last_student_batch = None

    @property
    def active(self) -> bool:
        return self._attached

    @property
    def distributed(self) -> bool:
        """The student trains data-parallel over several ranks (DDP-wrapped, world > 1): the
        hooks then take their decisions collectively (the same domain, audit, mask and
        re-audits on every rank)."""
        return _dist.data_parallel(self.student)

    @property
    def teacher_module(self) -> nn.Module:
        """The teacher without DDP/``torch.compile`` wrappers: the module whose forward the guard
        hooks (an adapter that hooks the teacher as well hooks this one)."""
        return self._teacher_core

    def set_schedule(self, total_steps: int | None = None, *, sr_start_step: int | None = None,
                     sr_start_fraction: float | None = None) -> None:
        """Set the SR window once the host knows its length (adapters call this); updates
        :attr:`sr_schedule`, which the SR hook asks."""
        self.sr_schedule.update(total_steps, start_step=sr_start_step,
                                start_fraction=sr_start_fraction)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Forwards inside this block are not seen by the guard's hooks."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def teacher_view(self, x: Tensor) -> Tensor:
        """``x`` as the teacher sees it inside this guard: every hook's
        :meth:`~abd_plugin.DefenseHook.view_input` in registration order (the trigger eraser's
        current mask when it is on); ``x`` itself when no hook changes it (no learning, no
        counters)."""
        for h in self.hooks:
            x = h.view_input(x)
        return x

    def hook_named(self, name: str) -> DefenseHook | None:
        """The first registered hook whose :attr:`~abd_plugin.DefenseHook.name` is ``name``."""
        return next((h for h in self.hooks if h.name == name), None)

    @property
    def eraser(self) -> TriggerEraser | None:
        """The trigger eraser hook, when the config built one."""
        return self.hook_named("erase")  # type: ignore[return-value]

    @property
    def sv(self) -> ShufflingVaccine | None:
        """The Shuffling Vaccine hook, when the config built one."""
        return self.hook_named("sv")  # type: ignore[return-value]

    @property
    def sr(self) -> SelfRetrospection | None:
        """The Self-Retrospection hook, when the config built one."""
        return self.hook_named("sr")  # type: ignore[return-value]

    @contextmanager
    def loss_terms_suspended(self) -> Iterator[None]:
        """Teacher forwards inside this block get no loss term (the vaccine's) but still pass
        through the other hooks: the eraser still erases their inputs. For hosts that call the
        teacher on a second view of the same synthesis batch (CMI's local view)."""
        self._terms_suspended += 1
        try:
            yield
        finally:
            self._terms_suspended -= 1

    @contextmanager
    def retrospection(self) -> Iterator[None]:
        """Open the SR window for the student optimizer steps inside the block."""
        if self.sr is None:
            raise RuntimeError("SR is disabled in this guard's config (sr=False)")
        with self.sr_schedule.forced():
            yield

    def in_sr_window(self) -> bool:
        """Whether SR runs at the current student step (:attr:`sr_schedule`)."""
        return self.sr is not None and self.sr_schedule.active(self.step)

    # ------------------------------------------------------------------ hooks
    def _dispatch(self, event: str, *args: Any) -> list[Any]:
        """Call ``event`` (a :class:`DefenseHook` callback) on every hook, in registration order,
        with the hook context and ``args``; return the results. Every event goes through here,
        which adds each call's wall time to its hook's seconds (``sv_seconds``, ``sr_seconds``
        in the report). A new event is a method on ``DefenseHook`` plus one call of this."""
        return [self._call(key, h, event, *args)
                for key, h in zip(self._state_keys, self.hooks, strict=True)]

    def _call(self, key: str, hook: DefenseHook, event: str, *args: Any) -> Any:
        """One hook's callback, timed into its seconds."""
        t0 = time.perf_counter()
        try:
            return getattr(hook, event)(self._ctx, *args)
        finally:
            self._seconds[key] += time.perf_counter() - t0

    @contextmanager
    def _explicit(self, hook: DefenseHook) -> Iterator[None]:
        """A hook's work through the explicit API: hidden from the guard's hooks, timed like a
        dispatched call."""
        key = self._state_keys[self.hooks.index(hook)]
        t0 = time.perf_counter()
        try:
            with self.suspended():
                yield
        finally:
            self._seconds[key] += time.perf_counter() - t0

    def _teacher_pre_hook(self, module: nn.Module, args: Any) -> Any:
        if self._suspended:
            return None
        if torch.is_inference_mode_enabled():
            # a teacher called under torch.inference_mode(): the audit and the eraser's mask
            # need autograd, which inference mode cannot give; they run outside it
            with torch.inference_mode(False):
                return self._teacher_input(args)
        return self._teacher_input(args)

    def _teacher_input(self, args: Any) -> Any:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None or not torch.is_floating_point(x) or x.dim() < 2:
            return None
        if not self._first_batch_checked:
            self._first_batch_checked = True
            self._check_first_batch(x)
        if self.domain is None:  # where inputs live: resolved once, read by every hook
            self._resolve_domain(x)
        self._output_due = True
        new = self._chain("on_teacher_input", "an input", x)
        if new is x:
            return None
        return (new,) + tuple(args[1:])

    def _chain(self, event: str, what: str, value: Tensor, *lead: Tensor) -> Tensor:
        """Every hook's ``event(*lead, value)`` in registration order, each one's tensor (of
        ``value``'s shape) replacing ``value`` for the next; ``value`` itself when none did."""
        new = value
        for key, h in zip(self._state_keys, self.hooks, strict=True):
            out = self._call(key, h, event, *lead, new)
            if out is not None:
                if not isinstance(out, Tensor) or out.shape != new.shape:
                    raise RuntimeError(
                        f"{type(h).__name__}.{event} returned "
                        f"{getattr(out, 'shape', type(out).__name__)} for {what} of shape "
                        f"{tuple(new.shape)}; return a tensor of the same shape or None")
                new = out
        return new

    def _resolve_domain(self, x: Tensor) -> None:
        """Where the teacher's inputs live (:func:`~abd_plugin.domain.resolve_domain`: the
        user's ``input_range``, else the teacher's own evidence and this batch); a range only
        guessed from a batch of unknown scale is worth a warning that names the fix."""
        domain = resolve_domain(x, self.config.input_range, self._teacher_core)
        self.domain = _dist.broadcast(domain) if self.distributed else domain
        if self.domain.guessed:
            msg = (f"the teacher's input range was guessed from the first batch it was fed "
                   f"({self.domain.describe()}): the batch is neither in [0, 1] nor in [-1, 1], "
                   "and the teacher shows no normalisation or trained BatchNorm at its front. A "
                   "generator's first batch says little about where real inputs live, and the "
                   "audit searches (and the eraser fills) inside this range; state it: "
                   "ABDGuard(..., input_range=(low, high)) or ABDConfig(input_range=(low, "
                   "high)), in the units the teacher receives")
            self._notes["input_range_guessed"] = msg
            warn_once(self, "input_range_guessed", f"abd-plugin: {msg}")

    def _check_first_batch(self, x: Tensor) -> None:
        """Before any defense runs on the first teacher batch: the teacher in train() mode is
        worth a warning, and a teacher whose output the logits rule reads as another number of
        classes than the student's (a ``(features, logits)`` tuple) is a clear error."""
        if self._teacher_core.training:
            msg = ("the teacher is in train() mode inside the guard: every batch your loop feeds "
                   "it updates its BatchNorm running statistics (and dropout is active), so the "
                   "teacher drifts during distillation; call teacher.eval() before the loop (the "
                   "guard's own forwards run a frozen eval-mode copy and add nothing to it)")
            self._notes["teacher_in_train_mode"] = msg
            warn_once(self, "teacher_in_train_mode", f"abd-plugin: {msg}")
        teacher_classes = student_classes = None
        probe = x.detach()[:2]
        with self.suspended(), torch.no_grad():
            try:
                model = self._replica.to_device_of(probe)
                teacher_classes = extract_logits(model(_amp.as_input_of(model, probe)),
                                                 self.config.logits_fn).shape[-1]
                student = hook_free_copy(self._student_core).to(probe.device)  # eval, no hooks
                student_classes = extract_logits(student(_amp.as_input_of(student, probe)),
                                                 self.config.logits_fn).shape[-1]
                del student
            except Exception:  # a student that takes other inputs: checked at its forward
                student_classes = None
        self._teacher_classes = teacher_classes
        self._check_classes(student_classes)

    def _check_classes(self, student_classes: int | None) -> None:
        t = self._teacher_classes
        if t is None or student_classes is None or t == student_classes:
            return
        raise ValueError(
            f"abd-plugin: the teacher's output gives {t} classes but the student's gives "
            f"{student_classes} (the default rule takes a tensor output as it is, a tuple's "
            "first element, a dict's 'logits' or an object's .logits): is one of them returning "
            "features first? Pass logits_fn= to the guard to say where the logits are, e.g. "
            "ABDGuard(teacher, student, logits_fn=lambda out: out[1])")

    def _teacher_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._suspended:
            return None
        replaced = self._teacher_output(args, output)
        if replaced is not None:
            output = replaced
        if self._terms_suspended or not torch.is_grad_enabled():
            return replaced
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None or not x.requires_grad:
            if x is not None and torch.is_floating_point(x):
                self._plain_teacher_forwards += 1
            return replaced
        check_input(x, "teacher input")
        logits = extract_logits(output, self.config.logits_fn)
        check_logits(logits, x.shape[0], "teacher logits")
        total: Tensor | None = None
        for term in self._dispatch("on_teacher_forward", x, logits):
            if term is not None:
                total = term if total is None else total + term
        if total is None:
            return replaced
        scale = float(self.loss_scale()) if self.loss_scale is not None else 1.0
        return replace_logits(output, _AddLossTerm.apply(logits, total, scale, self._terms))

    def _teacher_output(self, args: Any, output: Any) -> Any:
        """``on_teacher_output`` for a forward whose input the hooks saw: the output with the
        hooks' logits, or None when none replaced them."""
        if not self._output_due:
            return None
        self._output_due = False
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None:
            return None
        logits = extract_logits(output, self.config.logits_fn)
        new = self._chain("on_teacher_output", "logits", logits, x)
        return None if new is logits else replace_logits(output, new)

    def _student_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._suspended:
            return
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None:
            return
        if module.training and torch.is_floating_point(x):
            self.last_student_batch = x.detach()
            self._student_amp = _amp.capture(x.device.type)
        if (module.training and self._loss_probes < _LOSS_PROBES
                and torch.is_grad_enabled() and torch.is_floating_point(x)):
            logits = extract_logits(output, self.config.logits_fn)
            if logits.requires_grad and logits.dim() == 2 and logits.shape[1] > 1:
                self._loss_probes += 1
                logits.register_hook(self._watch_loss)
        if not self._student_classes_checked and self._teacher_classes is not None:
            self._student_classes_checked = True
            self._check_classes(extract_logits(output, self.config.logits_fn).shape[-1])
        if self._student_forward_seen:  # only then are the logits worth extracting
            self._dispatch("on_student_forward", x, extract_logits(output, self.config.logits_fn))

    def _watch_loss(self, grad: Tensor) -> None:
        """A gradient of the student's logits: whether its rows sum to zero (a softmax loss,
        shift-invariant) or not (a loss on the logits' values)."""
        g = grad.detach().float()
        size = g.abs().sum(1)
        rows = size > 0
        if not bool(rows.any()):
            return
        off = (g.sum(1).abs()[rows] > 1e-3 * size[rows]).float().mean()
        self._loss_votes[int(float(off) > 0.5)] += 1

    @property
    def student_loss_kind(self) -> str | None:
        """See :attr:`~abd_plugin.hooks.GuardContext.student_loss_kind`: the majority of the
        gradients seen (a tie reads as ``"values"``)."""
        shift_free, values = self._loss_votes
        if shift_free + values == 0:
            return None
        return "values" if values >= shift_free else "softmax"

    def updates_student(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` holds any of the student's parameters."""
        return any(id(p) in self._student_param_ids
                   for g in optimizer.param_groups for p in g["params"])

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if self._suspended or not self.updates_student(optimizer):
            return None
        # torch passes args with the optimizer itself first: (optimizer, [closure])
        rest = tuple(args[1:]) if args and args[0] is optimizer else tuple(args)
        closure = kwargs.get("closure") if kwargs else None
        if closure is None and rest:
            closure = rest[0]
        if closure is None:
            with _amp.replay(self._student_amp):
                self._dispatch("on_before_student_step", optimizer)
            return None

        # step(closure): gradients exist only after the closure ran; add SR terms then
        def wrapped() -> Any:
            loss = closure()
            with _amp.replay(self._student_amp):
                self._dispatch("on_before_student_step", optimizer)
            return loss

        head = (optimizer,) if args and args[0] is optimizer else ()
        if kwargs and "closure" in kwargs:
            return head + rest, {**kwargs, "closure": wrapped}
        return head + (wrapped,) + rest[1:], dict(kwargs or {})

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._suspended or not self.updates_student(optimizer):
            return
        self.step += 1
        with _amp.replay(self._student_amp):
            self._dispatch("on_after_student_step", optimizer)
        self._check_no_ops(final=False)

    # ------------------------------------------------------------------ silent no-ops
    def _no_ops(self, final: bool) -> dict[str, str]:
        """What the guard's own bookkeeping shows a defense could not do: {key: message}.
        ``final``: the run is over (or reported), so one unused loss term is already telling;
        during the run (after each student step) only two or more terms none of which was
        back-propagated are. (A hook reports what only it can see in its own record.)"""
        out = dict(self._notes)
        attached, fired = self._terms.attached, self._terms.fired
        if fired == 0 and attached >= (1 if final else 2):
            out["sv_term_never_backpropagated"] = (
                f"the SV loss term was attached to {attached} teacher forward(s) but none was "
                "back-propagated: the synthesizer's loss does not go through the teacher's logits "
                "(teacher(x).detach()?), so SV changed nothing. Keep the teacher's logits in the "
                "graph, or add guard.vaccine_penalty(x, t) to that loss yourself")
        return out

    def _check_no_ops(self, final: bool) -> None:
        for key, msg in self._no_ops(final).items():
            warn_once(self, key, f"abd-plugin: {msg}")

    # ------------------------------------------------------------------ explicit API
    def _need_vaccine(self) -> ShufflingVaccine:
        if self.sv is None:
            raise RuntimeError("SV is disabled in this guard's config (sv=False)")
        return self.sv

    def vaccine_penalty(self, x: Tensor, teacher_logits: Tensor) -> Tensor:
        """SV loss term for a synthesis batch; add it to the synthesizer's loss."""
        sv = self._need_vaccine()
        with self._explicit(sv):
            return sv.penalty(x, teacher_logits)

    def suspicious(self, x: Tensor, teacher_logits: Tensor) -> Tensor:
        """Boolean mask (B,) of samples the shuffled ensemble still classifies like the teacher."""
        sv = self._need_vaccine()
        with self._explicit(sv):
            return sv.suspicious(x, teacher_logits)

    def reweight(self, per_sample_loss: Tensor, mask: Tensor) -> Tensor:
        """Fixed transfer set: ``mean(loss[~mask]) - coef * mean(min(loss[mask], cap))`` with
        ``cap = config.sv_reweight_cap``: finite always, and ``>= -coef * cap`` for a
        non-negative loss (the anti-distillation cannot run away; see
        :meth:`ShufflingVaccine.reweight`)."""
        return self._need_vaccine().reweight(per_sample_loss, mask)

    def observe(self, x: Tensor, teacher_logits: Tensor) -> None:
        """Feed a synthetic batch to the vaccine's verification pool."""
        sv = self._need_vaccine()
        with self._explicit(sv):
            sv.observe(x, teacher_logits)

    def retrospect(
        self, x: Tensor | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, float]:
        """Add the SR gradient for batch ``x`` (default: the student's last batch, under the
        autocast state of its forward) to ``.grad``. ``optimizer`` is accepted for symmetry with
        hosts; the gradient goes to the student's parameters, which it must hold.

        Inside an active guard whose automatic SR window is open at this step, the call does
        nothing (the automatic SR runs at the optimizer step; SR runs once per step): it returns
        ``skipped=1.0``, counts ``sr_skipped["explicit_call_in_automatic_window"]`` and warns
        once. A non-finite ``x`` raises ``ValueError``."""
        if self.sr is None:
            raise RuntimeError("SR is disabled in this guard's config (sr=False)")
        if optimizer is not None and not self.updates_student(optimizer):
            raise ValueError("this optimizer does not hold the student's parameters")
        amp = self._student_amp if x is None else None
        x = self.last_student_batch if x is None else x
        if x is None:
            raise ValueError("no batch: pass x, or run the student on a batch first")
        sched = self.sr_schedule
        if self._attached and sched.auto and sched.active(self.step):
            self.sr.skip("explicit_call_in_automatic_window")
            return self.sr.skipped_result()
        with self._explicit(self.sr), _amp.replay(amp):
            return self.sr.retrospect(x)

    # ------------------------------------------------------------------ state and report
    #: version of :meth:`state_dict`'s layout (3: the input domain and the audit (as the audit
    #: hook's state) saved; 2: hooks keyed by ``state_key``, the audit at the top level)
    STATE_VERSION = 3

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "step": self.step,
            "hooks": {k: h.state_dict() for k, h in zip(self._state_keys, self.hooks, strict=True)},
            "seconds": dict(self._seconds),
            "sv_terms": [self._terms.attached, self._terms.fired],
            "plain_teacher_forwards": self._plain_teacher_forwards,
            "domain": None if self.domain is None else self.domain.as_dict(),
            "loss_votes": list(self._loss_votes), "loss_probes": self._loss_probes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version == 2:  # the audit at the top level: it is the audit hook's state now
            state = dict(state, hooks={"TeacherAudit": {"audit": state.get("audit")},
                                       **state["hooks"]})
        elif version != self.STATE_VERSION:
            raise ValueError(
                f"ABDGuard state version {version!r}, expected {self.STATE_VERSION}: saved by "
                "another abd-plugin release (or not by abd-plugin); resume with that release")
        self.step = int(state["step"])
        self._terms = _TermCounter(*state.get("sv_terms", (0, 0)))
        self._plain_teacher_forwards = int(state.get("plain_teacher_forwards", 0))
        domain = state.get("domain")
        self.domain = None if domain is None else InputDomain.from_dict(domain)
        self._loss_votes = [int(v) for v in state.get("loss_votes", (0, 0))]
        self._loss_probes = int(state.get("loss_probes", 0))
        for key, h in zip(self._state_keys, self.hooks, strict=True):
            if key in state["hooks"]:
                h.load_state_dict(state["hooks"][key])
            self._seconds[key] = float(state.get("seconds", {}).get(key, 0.0))

    def report(self) -> GuardReport:
        """What every hook did (their records, in registration order) and the guard's own
        counts."""
        records: dict[str, HookReport] = {}
        keys = dict(zip(map(id, self.hooks), self._state_keys, strict=True))
        for item in self._order:
            if isinstance(item, OffReport):
                records[item.name] = item
                continue
            key = keys[id(item)]
            rec = item.report()
            if not isinstance(rec, HookReport):  # a plain dict (the hook API before records)
                rec = MappingReport(name=item.name, values=dict(rec))
            rec.seconds = self._seconds[key]
            records[key] = rec
        warnings = list(self._no_ops(final=True).values())
        for rec in records.values():
            warnings += rec.warnings
        audit = self.hook_named("audit")
        return GuardReport(records=records, audit_key=None if audit is None else keys[id(audit)],
                           student_steps=self.step,
                           loss_terms_attached=self._terms.attached,
                           loss_terms_backpropagated=self._terms.fired, warnings=warnings,
                           domain=self.domain)
