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
in ``eval()`` mode, SV term never back-propagated, no synthesis batch seen, SR gradient NaN), the
report says so (``warnings``, ``sr_skipped``) and an :class:`~abd_plugin.hooks.ABDWarning` is
issued once per guard.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _amp
from ._replica import TeacherReplica, unwrap_model
from .audit import AuditReport, AuditSettings, ensemble_favourite, infer_input_range
from .audit import audit as run_audit
from .config import ABDConfig
from .eraser import EraserStatus, TriggerEraser
from .hooks import DefenseHook, GuardContext, warn_once
from .outputs import check_input, check_logits, extract_logits, replace_logits
from .retrospection import SelfRetrospection
from .schedule import SRSchedule
from .vaccine import ShufflingVaccine


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
    """What the guard did (a plain, printable record; ``print(report)`` says it in words)."""

    #: the data-free teacher audit (:class:`~abd_plugin.audit.AuditReport` as a dict), or None
    audit: dict[str, Any] | None = None
    audit_verdict: str = "not run"
    audit_target: int | None = None
    audit_p_value: float = float("nan")
    audit_seconds: float = 0.0
    #: the class a channel-shuffled teacher ensemble predicts most on recent teacher inputs
    ensemble_class: int | None = None
    erase_status: str = "off"
    erase_reason: str = "erase=False"
    erase_target: int | None = None
    #: mask positions above 0.5, the mask's sum, and its mean over the input
    erase_pixels: int = 0
    erase_mass: float = 0.0
    erase_fraction: float = 0.0
    erase_updates: int = 0
    erase_batches: int = 0
    #: at the last update: target-class samples the erased teacher moves off the target, other
    #: samples whose class it keeps, and the fraction the teacher called the target
    erase_flip: float = float("nan")
    erase_keep: float = float("nan")
    erase_target_fraction: float = float("nan")
    #: the mask's price now (``erase_price`` unless a re-audit lowered it)
    erase_price: float = float("nan")
    #: the erased teacher's re-audits: update, target statistic, p-value, stands_out, price after
    erase_rechecks: list[dict[str, Any]] = field(default_factory=list)
    erase_seconds: float = 0.0
    sv_status: str = "off"
    sv_message: str = "SV: off"
    sv_coef: float = 0.0
    shuffle_depth: int = 0
    shuffled_layers: list[str] = field(default_factory=list)
    trunk_module: str | None = None
    verification_trials: list[dict[str, Any]] = field(default_factory=list)
    suspicious_fraction: float = float("nan")
    last_suspicious_fraction: float = float("nan")
    last_penalty: float = 0.0
    sv_calls: int = 0
    sv_seconds: float = 0.0
    sr_steps: int = 0
    sr_seconds: float = 0.0
    sr_last_delta_norm: float = 0.0
    sr_last_outer_loss: float = 0.0
    sr_last_grad_norm: float = 0.0
    student_steps: int = 0
    sr_start: int | None = None
    #: SV loss terms attached to teacher logits / back-propagated (once each at most)
    sv_terms_attached: int = 0
    sv_terms_backpropagated: int = 0
    #: SR steps that did nothing, by reason (``abd_plugin.retrospection.SKIP_REASONS``)
    sr_skipped: dict[str, int] = field(default_factory=dict)
    #: what a defense could not do, in words (each also issued once as an ``ABDWarning``)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = ["abd-plugin guard report"]
        a = self.audit
        if a is None:
            lines.append("  Teacher audit: not run" + (" (audit=False)" if self.audit_verdict ==
                                                        "off" else " (no teacher batch seen)"))
        else:
            s = a["suspect"]
            stat = (f"class {s}'s maximum margin {a['statistic'][s]:.3g}, p = {a['p_value']:.2g}, "
                    f"robust z = {a['z_score']:.1f}; {a['seconds']:.1f}s")
            word = {"poisoned": f"the teacher looks BACKDOORED towards class {s}",
                    "unsure": f"the teacher MAY be backdoored towards class {s} (not significant)",
                    "clean": "no backdoor found"}[a["verdict"]]
            lines.append(f"  Teacher audit: {word} ({stat}).")
            if self.ensemble_class is not None:
                agree = "agrees" if self.ensemble_class == s else "does not agree"
                lines.append(f"    The shuffled-teacher ensemble favours class "
                             f"{self.ensemble_class} on the inputs seen ({agree}).")
        if self.erase_status == "on":
            pct = 100 * self.erase_fraction
            lines.append(
                f"  Trigger eraser: ON for class {self.erase_target} ({self.erase_reason}). The "
                f"teacher saw every input with {self.erase_pixels} position(s) erased (mask "
                f"{pct:.1f} % of the input), learned in {self.erase_updates} update(s), "
                f"{self.erase_seconds:.1f}s.")
            if self.erase_updates:
                lines.append(
                    f"    At the last update the erasure moved {100 * self.erase_flip:.0f} % of "
                    f"the samples the teacher called class {self.erase_target} "
                    f"({100 * self.erase_target_fraction:.0f} % of the batch) to other classes "
                    f"and kept {100 * self.erase_keep:.0f} % of the others' classes.")
            if self.erase_rechecks:
                last = self.erase_rechecks[-1]
                lowered = [r for r in self.erase_rechecks if r["stands_out"]]
                still = "still stands out" if last["stands_out"] else "no longer stands out"
                lines.append(
                    f"    Re-audited the erased teacher {len(self.erase_rechecks)} time(s); at "
                    f"update {last['update']} class {self.erase_target}'s maximum margin was "
                    f"{last['statistic']:.3g} (p = {last['p_value']:.2g} against the other "
                    f"classes: {still})." + (f" The mask missed part of the trigger at update "
                                             f"{lowered[0]['update']}: its price was lowered to "
                                             f"{self.erase_price:.3g} (larger masks)."
                                             if lowered else ""))
        else:
            lines.append(f"  Trigger eraser: off ({self.erase_reason}).")
        if self.sv_status != "off" or self.sv_calls:
            lines.append(f"  {self.sv_message}; suspicious fraction "
                         f"{self.suspicious_fraction:.3f} over {self.sv_calls} synthesis "
                         f"batches, {self.sv_seconds:.2f}s")
        else:
            lines.append("  Shuffling Vaccine: off.")
        if self.sr_steps or self.sr_start is not None or self.sr_seconds:
            lines.append(f"  Self-Retrospection: {self.sr_steps} step(s) (window starts at "
                         f"step {self.sr_start}), {self.sr_seconds:.2f}s.")
        else:
            lines.append("  Self-Retrospection: did not run.")
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

    def teacher_view(self, x: Tensor) -> Tensor:
        return self._guard.teacher_view(x)


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
        config: an :class:`ABDConfig`; keyword ``overrides`` replace its fields.
        hooks: extra :class:`DefenseHook` objects run after SV and SR.
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
        if cfg.sr and cfg.sr_start_fraction is not None and cfg.total_steps is None:
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
        self.sr_schedule = SRSchedule.from_config(cfg)
        self.eraser: TriggerEraser | None = (
            TriggerEraser(teacher, cfg, replica=self._replica) if cfg.erase else None)
        self.sv: ShufflingVaccine | None = (
            ShufflingVaccine(teacher, cfg, replica=self._replica) if cfg.sv else None)
        self.sr: SelfRetrospection | None = (
            SelfRetrospection(student, teacher, cfg, replica=self._replica,
                              schedule=self.sr_schedule) if cfg.sr else None)
        self.hooks: list[DefenseHook] = [
            h for h in (self.eraser, self.sv, self.sr) if h is not None]
        for h in hooks:
            if not isinstance(h, DefenseHook):
                raise TypeError(f"hooks must be DefenseHook instances, got {type(h).__name__}")
            if any(h is g for g in self.hooks):
                raise ValueError(f"hook {h!r} is registered twice")
            self.hooks.append(h)
        self._state_keys = _state_keys(self.hooks)
        self._ctx: GuardContext = _HookContext(self)
        self._seconds = dict.fromkeys(self._state_keys, 0.0)  # per hook, all its calls
        self._student_forward_seen = any(
            type(h).on_student_forward is not DefenseHook.on_student_forward for h in self.hooks)
        self.loss_scale = loss_scale
        self.step = 0
        #: the data-free audit of the teacher (runs at the first teacher batch; None before)
        self.audit_report: AuditReport | None = None
        self._recent_inputs: Tensor | None = None  # a few teacher inputs, for the report
        self._teacher_batches = 0
        self.last_student_batch: Tensor | None = None
        self._student_amp: _amp.AutocastState | None = None  # autocast of that batch's forward
        self._terms = _TermCounter()
        self._plain_teacher_forwards = 0  # grad-enabled teacher forwards on a no-grad input
        self._handles: list[Any] = []
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
        """``x`` as the teacher sees it inside this guard: erased by the trigger eraser's current
        mask when it is on, else ``x`` (no learning, no counters)."""
        er = self.eraser
        if er is None or er.status is not EraserStatus.ON or er.mask() is None:
            return x
        return er.erase(x)

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

    def _run_audit(self, x: Tensor) -> None:
        """The data-free audit, on the first float batch the teacher is fed (its shape and,
        unless ``input_range`` is given, its value range say where inputs live)."""
        cfg = self.config
        rng = cfg.input_range if cfg.input_range is not None else infer_input_range(x)
        settings = AuditSettings.from_config(cfg)
        self._replica.to_device_of(x)
        with self.suspended():
            try:
                self.audit_report = run_audit(self.teacher, tuple(x.shape[1:]), input_range=rng,
                                              settings=settings, logits_fn=cfg.logits_fn,
                                              replica=self._replica)
            except Exception as e:
                raise RuntimeError(
                    f"abd-plugin: the data-free teacher audit failed on inputs of shape "
                    f"{tuple(x.shape[1:])} ({type(e).__name__}: {e}); pass input_range=(low, high) "
                    "if the range read off the first batch is wrong, or audit=False (then name "
                    "the backdoor's target=... for the eraser)") from e

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
        if self.config.audit and self.audit_report is None:
            self._run_audit(x)
        self._teacher_batches += 1
        if self._teacher_batches % 20 == 1:  # a few inputs for the report's ensemble check
            self._recent_inputs = x.detach()[:128].clone()  # on its device: no sync
        new = x
        for key, h in zip(self._state_keys, self.hooks, strict=True):
            out = self._call(key, h, "on_teacher_input", new)
            if out is not None:
                if not isinstance(out, Tensor) or out.shape != new.shape:
                    raise RuntimeError(
                        f"{type(h).__name__}.on_teacher_input returned "
                        f"{getattr(out, 'shape', type(out).__name__)} for an input of shape "
                        f"{tuple(new.shape)}; return a tensor of the same shape or None")
                new = out
        if new is x:
            return None
        return (new,) + tuple(args[1:])

    def _teacher_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._suspended or self._terms_suspended or not torch.is_grad_enabled():
            return None
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None or not x.requires_grad:
            if x is not None and torch.is_floating_point(x):
                self._plain_teacher_forwards += 1
            return None
        check_input(x, "teacher input")
        logits = extract_logits(output, self.config.logits_fn)
        check_logits(logits, x.shape[0], "teacher logits")
        total: Tensor | None = None
        for term in self._dispatch("on_teacher_forward", x, logits):
            if term is not None:
                total = term if total is None else total + term
        if total is None:
            return None
        scale = float(self.loss_scale()) if self.loss_scale is not None else 1.0
        return replace_logits(output, _AddLossTerm.apply(logits, total, scale, self._terms))

    def _student_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._suspended:
            return
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None:
            return
        if module.training and torch.is_floating_point(x):
            self.last_student_batch = x.detach()
            self._student_amp = _amp.capture(x.device.type)
        if self._student_forward_seen:  # only then are the logits worth extracting
            self._dispatch("on_student_forward", x, extract_logits(output, self.config.logits_fn))

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
        ``final``: the run is over (or reported), so one unused SV term, or no synthesis batch
        at all, is already telling; during the run (after each student step) only two or more
        SV terms none of which was back-propagated are."""
        out = {}
        attached, fired = self._terms.attached, self._terms.fired
        if fired == 0 and attached >= (1 if final else 2):
            out["sv_term_never_backpropagated"] = (
                f"the SV loss term was attached to {attached} teacher forward(s) but none was "
                "back-propagated: the synthesizer's loss does not go through the teacher's logits "
                "(teacher(x).detach()?), so SV changed nothing. Keep the teacher's logits in the "
                "graph, or add guard.vaccine_penalty(x, t) to that loss yourself")
        sv = self.sv
        if (final and sv is not None and self._plain_teacher_forwards and sv.stats.calls == 0
                and sv.observed == 0):
            out["sv_never_ran"] = (
                f"SV never ran: the teacher ran {self._plain_teacher_forwards} time(s) with "
                "gradients on, but never on an input that requires grad, so no synthesis batch "
                "reached the vaccine (a generator output made under no_grad or detached?). Keep "
                "the synthesizer's output in the graph, or call guard.vaccine_penalty(x, t)")
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

    def _ensemble_class(self) -> int | None:
        """The shuffled-teacher ensemble's favourite class on recent teacher inputs (a second
        hint of the target; None when it cannot be computed for this teacher)."""
        x = self._recent_inputs
        if x is None:
            return None
        try:
            with self.suspended():
                model = self._replica.to_device_of(x)
                return ensemble_favourite(self._replica, _amp.as_input_of(model, x),
                                          logits_fn=self.config.logits_fn, seed=self.config.seed)
        except (ValueError, TypeError, RuntimeError):
            return None

    # ------------------------------------------------------------------ state and report
    #: version of :meth:`state_dict`'s layout (2: hooks keyed by ``state_key``, the vaccine's
    #: ``stats`` a dict, the hooks' time kept by the guard)
    STATE_VERSION = 2

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "step": self.step,
            "hooks": {k: h.state_dict() for k, h in zip(self._state_keys, self.hooks, strict=True)},
            "seconds": dict(self._seconds),
            "sv_terms": [self._terms.attached, self._terms.fired],
            "plain_teacher_forwards": self._plain_teacher_forwards,
            "audit": None if self.audit_report is None else asdict(self.audit_report),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != self.STATE_VERSION:
            raise ValueError(
                f"ABDGuard state version {version!r}, expected {self.STATE_VERSION}: saved by "
                "another abd-plugin release (or not by abd-plugin); resume with that release")
        self.step = int(state["step"])
        self._terms = _TermCounter(*state.get("sv_terms", (0, 0)))
        self._plain_teacher_forwards = int(state.get("plain_teacher_forwards", 0))
        audit = state.get("audit")
        self.audit_report = None if audit is None else AuditReport(**audit)
        for key, h in zip(self._state_keys, self.hooks, strict=True):
            if key in state["hooks"]:
                h.load_state_dict(state["hooks"][key])
            self._seconds[key] = float(state.get("seconds", {}).get(key, 0.0))

    def report(self) -> GuardReport:
        rep = GuardReport(student_steps=self.step, sr_start=self.sr_schedule.start,
                          sv_terms_attached=self._terms.attached,
                          sv_terms_backpropagated=self._terms.fired)
        a = self.audit_report
        if a is not None:
            rep.audit = a.as_dict()
            rep.audit_verdict, rep.audit_target = a.verdict, a.target
            rep.audit_p_value, rep.audit_seconds = a.p_value, a.seconds
            rep.ensemble_class = self._ensemble_class()
            if rep.ensemble_class is not None:
                rep.audit["ensemble_class"] = rep.ensemble_class
                rep.audit["agree"] = rep.ensemble_class == a.suspect
        elif not self.config.audit:
            rep.audit_verdict = "off"
        known = set(GuardReport.__dataclass_fields__)
        for key, h in zip(self._state_keys, self.hooks, strict=True):
            for k, v in h.report().items():
                if k == "warnings":
                    rep.warnings += list(v)
                elif k in known:
                    setattr(rep, k, v)
                else:
                    rep.extra[f"{h.name}.{k}"] = v
            # the time the guard measured: sv_seconds, sr_seconds, else extra["<name>.seconds"]
            if f"{h.name}_seconds" in known:
                setattr(rep, f"{h.name}_seconds", self._seconds[key])
            else:
                rep.extra[f"{h.name}.seconds"] = self._seconds[key]
        no_ops = self._no_ops(final=True)
        if "sv_term_never_backpropagated" in no_ops:
            rep.sv_message += " - but its loss term never reached a backward (see warnings)"
        rep.warnings = list(no_ops.values()) + rep.warnings
        return rep
