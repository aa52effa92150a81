"""Self-Retrospection (SR): synthesise the universal perturbation that moves the model most, then
unlearn it in the student with an implicit hypergradient (I-BAU style).

One SR step on a student batch ``x`` (B, ...):

(A) ``delta`` (1, ...) maximises ``KL(p_M(x) || p_M(x + delta)) - l2 * ||delta||^2`` for
    ``sr_inner_rounds`` Adam steps (lr ``sr_pert_lr``); M is the teacher (a frozen hook-free
    replica, so the teacher gets no gradient) or the student. Optionally warm-started from the
    previous SR step and projected on an L2 ball.
(B) With ``L_in(delta, theta) = -KL(p_S(x).detach() || p_S(x + delta)) + l2_in ||delta||^2`` and
    the fixed-point map ``Phi = delta - eta * grad_delta L_in``, the outer loss
    ``L_out = KL(p_S(x).detach() || p_S(x + m * delta))`` (m: a random ``sr_outer_portion`` of the
    rows carry delta; ``sr_outer_target="teacher"`` uses the teacher's clean prediction p_T(x)
    instead of the student's) is differentiated through ``delta*(theta)`` with
    :func:`~abd_plugin.hypergrad.fixed_point_hypergradient` (K = ``sr_fixed_point_iters``).
(C) ``sr_scale`` times that gradient is **added** to the student's ``.grad``; the user's KD
    gradient already there is kept, so the optimizer steps on KD + SR, as in the paper.

Precision: every forward runs the batch in the dtype of the model it goes through (a float32
student batch is cast for a float64 or bfloat16 teacher); inside a guard, SR also re-enters the
autocast state of the student's last training forward.

Non-finite values: a batch with NaN/Inf raises ``ValueError`` (nothing is written). An SR gradient
that comes out NaN/Inf (an overflow in the perturbation search or the hypergradient) is *not*
added: the step is skipped, counted in the report (``sr_skipped["non_finite_gradient"]``) and
warned about once, and training goes on with the user's own gradient.

The student's BatchNorm running statistics are restored after SR's extra forwards (the official
code lets them drift), and nothing is ever accumulated into the teacher.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._amp import as_input_of
from ._replica import (
    TeacherReplica,
    accumulate_grads,
    average_over_ranks,
    preserved_buffers,
    unwrap_model,
)
from .hooks import DefenseHook, GuardContext, HookReport, warn_once
from .hypergrad import fixed_point_hypergradient
from .outputs import check_input, extract_logits
from .schedule import SRSchedule
from .validation import Bool, Choice, Int, Num, Optional, Section, section_or_default, spec


@dataclass(frozen=True)
class RetrospectionSettings(Section):
    """Self-Retrospection's section of :class:`~abd_plugin.ABDConfig`
    (``ABDConfig(retrospection=...)``; flat keyword ``sr`` for ``enabled``, ``sr_<field>`` for
    the others, ``total_steps`` as it is)."""

    switch: ClassVar[str] = "sr"
    flat_prefix: ClassVar[str] = "sr_"

    enabled: bool = spec(
        False, Bool(),
        """Enable Self-Retrospection. It only runs inside its window (below). Off by default (on
        the benchmark it traded accuracy for ASR); ``paper()`` and ``classic()`` turn it on.""")
    start_step: int | None = spec(
        None, Optional(Int(0)),
        """First student optimizer step (0-based, counted by the guard) at which SR runs.""")
    start_fraction: float | None = spec(
        None, Optional(Num(0, 1)),
        """Or: SR starts at ``int(start_fraction * total_steps)`` (the paper resumes at
        99.3-99.5 % of ZSKT training; the last 1-2 of 200 epochs for CMI).""")
    total_steps: int | None = spec(
        None, Optional(Int(1)),
        """Total student optimizer steps of the run, needed by ``start_fraction``.""",
        flat="total_steps")
    lr: float | None = spec(
        None, Optional(Num(0, lo_open=True)),
        """Learning rate of the student optimizer's steps inside the SR window. The paper resumes SR
        from a late checkpoint with a fresh optimizer at 5e-4 or 1e-4, while a cosine schedule has
        almost reached zero there; the optimizer's own value is put back after every step, so its
        scheduler is unaffected. ``None``: leave the optimizer alone.""")
    every: int = spec(
        1, Int(1),
        """Run SR on every ``every``-th student step inside the window.""")
    inner_rounds: int = spec(
        10, Int(0),
        """Adam steps synthesising the universal perturbation per SR step (paper sweeps: 10,
        20).""")
    pert_lr: float = spec(
        0.1, Num(0, 1e3, lo_open=True),
        """Adam learning rate of the perturbation synthesis (paper: 0.1).""")
    pert_model: str = spec(
        "teacher", Choice("teacher", "student"),
        """Model whose deviation the perturbation maximises: ``"teacher"`` (paper sweeps) or
        ``"student"``.""")
    pert_l2: float = spec(
        1e-3, Num(0),
        """L2 penalty on the perturbation during synthesis (ZSKT: 1e-3; CMI: 0).""")
    epsilon: float | None = spec(
        None, Optional(Num(0, lo_open=True)),
        """Project the perturbation onto an L2 ball of this radius (the poster's C_eps; the official
        code never projects). ``None``: no projection.""")
    epsilon_rms: float | None = spec(
        None, Optional(Num(0, lo_open=True)),
        """Or: the L2 radius as a root-mean-square per element, ``eps = epsilon_rms *
        sqrt(numel(delta))`` (resolution independent; a 3x3 white patch on a 32x32 grey image has
        an RMS of about 0.09).""")
    warm_start: bool = spec(
        False, Bool(),
        """Carry the perturbation (and its Adam state) from one SR step to the next instead of
        restarting from zero (off in the paper).""")
    init_std: float = spec(
        1e-3, Num(0, 1e3),
        """Std of the seeded Gaussian start of the perturbation (zero, the official start, is a
        stationary point of the deviation objective).""")
    fixed_point_iters: int = spec(
        5, Int(0),
        """Truncated Neumann iterations K of the implicit hypergradient (paper: 5).""")
    inner_step: float = spec(
        0.1, Num(0, 1e3, lo_open=True),
        """Step size eta of the fixed-point map ``delta - eta * grad L_in`` (paper: 0.1).""")
    inner_l2: float = spec(
        1e-3, Num(0),
        """L2 penalty inside ``L_in`` (paper: 1e-3).""")
    outer_portion: float = spec(
        0.02, Num(0, 1, lo_open=True),
        """Fraction of the batch that carries the perturbation in the outer loss (paper: 0.02;
        at least one sample).""")
    outer_target: str = spec(
        "student", Choice("student", "teacher"),
        """What the perturbed samples are pulled towards in the outer loss: ``"student"`` (the
        student's own clean prediction, detached: the paper) or ``"teacher"`` (the teacher's
        prediction on the clean input: the unlearning then also distills, which keeps accuracy).""")
    scale: float = spec(
        1.0, Num(0, 1e4),
        """Multiplier of the SR gradient added to the student's ``.grad``.""")
    temperature: float = spec(
        1.0, Num(0.01, 100),
        """Softmax temperature of the SR divergences.""")

    def check(self) -> None:
        if self.epsilon is not None and self.epsilon_rms is not None:
            raise ValueError(f"{type(self).__name__}: give epsilon or epsilon_rms, not both")

    def schedule(self) -> SRSchedule:
        """A fresh :class:`~abd_plugin.schedule.SRSchedule` with this section's window."""
        return SRSchedule(start_step=self.start_step, start_fraction=self.start_fraction,
                          total_steps=self.total_steps, every=self.every, lr=self.lr)


@dataclass
class RetrospectionReport(HookReport):
    """Self-Retrospection's part of the guard's report.

    Attributes:
        steps: SR steps that added a gradient; ``start``: the window's first step (None: only
            ``guard.retrospection()`` opens it).
        last_delta_norm, last_outer_loss, last_grad_norm: of the last step.
        skipped: steps that did nothing, by reason (:data:`SKIP_REASONS`).
    """

    steps: int = 0
    start: int | None = None
    last_delta_norm: float = 0.0
    last_outer_loss: float = 0.0
    last_grad_norm: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        if self.steps or self.start is not None or self.seconds:
            return [f"  Self-Retrospection: {self.steps} step(s) (window starts at step "
                    f"{self.start}), {self.seconds:.2f}s."]
        return ["  Self-Retrospection: did not run."]


def _kl(clean_logits: Tensor, pert_logits: Tensor, temperature: float) -> Tensor:
    """``KL(p_clean || p_pert)`` averaged over the batch (sum over classes)."""
    t = temperature
    if clean_logits.dtype != pert_logits.dtype:  # e.g. a float64 teacher's target, float32 student
        clean_logits = clean_logits.to(pert_logits.dtype)
    return F.kl_div(
        F.log_softmax(pert_logits / t, dim=1), F.log_softmax(clean_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    )


#: why an SR step did nothing (keys of ``report()["sr_skipped"]``) and what to do about it
SKIP_REASONS = {
    "student_in_eval_mode": "the student ran in eval() mode, so no training batch was kept "
    "(call student.train(), or pass the batch: guard.retrospect(x))",
    "no_student_batch": "no student training forward came before the optimizer step",
    "non_finite_gradient": "the SR gradient was NaN/Inf (the perturbation search or the "
    "hypergradient overflowed); nothing was added, the student kept its own gradient",
    "explicit_call_in_automatic_window": "guard.retrospect() was called while the guard's "
    "automatic SR window was open; the automatic SR runs at the optimizer step, so the explicit "
    "call did nothing (SR runs once per step)",
}


class SelfRetrospection(DefenseHook):
    """Self-Retrospection as a :class:`DefenseHook`; usable on its own::

        sr = SelfRetrospection(student, teacher)
        loss_kd.backward()
        sr.retrospect(x)          # adds SR gradients to student .grad
        optimizer.step()

    As a hook it runs at the student steps its ``schedule`` (by default built from the
    settings; a guard passes its own) opens, at the schedule's learning rate if it has one.

    Args:
        student: the student (may be DDP-wrapped: the gradients are averaged over ranks).
        teacher: the teacher (needed when ``pert_model="teacher"``); a frozen replica runs.
        settings: the :class:`RetrospectionSettings` section.
        seed: the guard's seed (SR draws from ``seed + 1``).
        logits_fn: how to find the logits in a model's output.
        replica: share the guard's frozen copy of the teacher.
        schedule: the SR window (default: ``settings.schedule()``).
    """

    name = "sr"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        settings: RetrospectionSettings | None = None,
        *,
        seed: int = 0,
        logits_fn: Callable[[Any], Tensor] | None = None,
        replica: TeacherReplica | None = None,
        schedule: SRSchedule | None = None,
    ) -> None:
        self.settings = section_or_default(settings, RetrospectionSettings, "SelfRetrospection",
                                           "retrospection")
        self.logits_fn = logits_fn
        self.schedule = schedule or self.settings.schedule()
        if self.settings.pert_model == "teacher" and teacher is None and replica is None:
            raise ValueError(
                "sr_pert_model='teacher' needs the teacher: SelfRetrospection(student, teacher)"
            )
        self.student = student
        self._replica = replica or (TeacherReplica(teacher) if teacher is not None else None)
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._delta: Tensor | None = None
        self._delta_opt_state: dict[str, Any] | None = None
        self._cache: tuple[Tensor, Tensor] | None = None
        self.steps = 0
        self.last_delta_norm = 0.0
        self.last_outer_loss = 0.0
        self.last_grad_norm = 0.0
        self._saved_lrs: tuple[torch.optim.Optimizer, list[tuple[Any, float]]] | None = None
        #: SR steps that did not happen, by reason (see :data:`SKIP_REASONS`)
        self.skipped: dict[str, int] = {}

    # ------------------------------------------------------------------ pieces
    def _pert_model(self, x: Tensor) -> nn.Module:
        if self.settings.pert_model == "teacher":
            assert self._replica is not None
            return self._replica.to_device_of(x)
        return unwrap_model(self.student)

    def synthesize(self, x: Tensor) -> Tensor:
        """(A): the universal perturbation (1, *x.shape[1:]) maximising the model's deviation."""
        cfg = self.settings
        cache_ok = cfg.pert_model == "teacher" and not cfg.warm_start
        if (
            cache_ok
            and self._cache is not None
            and self._cache[0].shape == x.shape
            and torch.equal(self._cache[0], x)
        ):
            # the frozen teacher on the same batch gives the same perturbation (ZSKT runs several
            # student steps per synthetic batch)
            return self._cache[1]
        model = self._pert_model(x)
        shape = (1,) + tuple(x.shape[1:])
        if cfg.warm_start and self._delta is not None and tuple(self._delta.shape) == shape:
            delta = self._delta.detach().to(x.device, x.dtype).clone().requires_grad_(True)
        else:
            # delta = 0 is a stationary point of KL(p(x) || p(x + delta)) (zero gradient), where the
            # official code starts; start from small seeded noise instead
            init = torch.randn(shape, generator=self._gen, dtype=torch.float64) * cfg.init_std
            delta = init.to(x.device, x.dtype).requires_grad_(True)
            self._delta_opt_state = None
        opt = torch.optim.Adam([delta], lr=cfg.pert_lr)
        if cfg.warm_start and self._delta_opt_state is not None:
            try:
                opt.load_state_dict(self._delta_opt_state)
            except (ValueError, KeyError):
                pass
        eps = cfg.epsilon
        if cfg.epsilon_rms is not None:
            eps = cfg.epsilon_rms * delta.numel() ** 0.5
        if cfg.inner_rounds > 0:
            with torch.no_grad():
                clean = extract_logits(model(as_input_of(model, x)), self.logits_fn).detach()
            for _ in range(cfg.inner_rounds):
                pert = extract_logits(model(as_input_of(model, x + delta)), self.logits_fn)
                loss = -_kl(clean, pert, cfg.temperature) + cfg.pert_l2 * delta.pow(2).sum()
                (g,) = torch.autograd.grad(loss, delta)
                delta.grad = g
                opt.step()
                delta.grad = None
                if eps is not None:
                    with torch.no_grad():
                        n = delta.norm()
                        if n > eps:
                            delta.mul_(eps / n)
        if cfg.warm_start:
            self._delta = delta.detach().clone()
            self._delta_opt_state = opt.state_dict()
        out = delta.detach()
        if cache_ok:
            self._cache = (x.detach().clone(), out)
        return out

    def gradients(self, x: Tensor, delta: Tensor | None = None) -> list[Tensor]:
        """(B): SR hypergradient for each trainable student parameter (not written anywhere)."""
        cfg = self.settings
        student = unwrap_model(self.student)
        params = [p for p in student.parameters() if p.requires_grad]
        if delta is None:
            delta = self.synthesize(x)
        b = x.shape[0]
        n_out = max(1, int(cfg.outer_portion * b))
        rows = torch.randperm(b, generator=self._gen)[:n_out].to(x.device)
        mask = torch.zeros((b,) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        mask[rows] = 1
        t = cfg.temperature

        def logits(inp: Tensor) -> Tensor:
            return extract_logits(student(as_input_of(student, inp)), self.logits_fn)

        clean = logits(x).detach()

        def l_in(d: Tensor) -> Tensor:
            return -_kl(clean, logits(x + d), t) + cfg.inner_l2 * d.pow(2).sum()

        def fp_map(inner: list[Tensor], _p: Any) -> list[Tensor]:
            d = inner[0]
            (g,) = torch.autograd.grad(l_in(d), d, create_graph=True)
            return [d - cfg.inner_step * g]

        target = clean
        if cfg.outer_target == "teacher":
            if self._replica is None:
                raise ValueError("sr_outer_target='teacher' needs the teacher")
            with torch.no_grad():
                rep = self._replica.to_device_of(x)
                target = extract_logits(rep(as_input_of(rep, x)), self.logits_fn).detach()

        def outer(inner: list[Tensor], _p: Any) -> Tensor:
            loss = _kl(target, logits(x + mask * inner[0]), t)
            self.last_outer_loss = float(loss.detach())
            return loss

        return fixed_point_hypergradient(params, [delta], fp_map, outer, cfg.fixed_point_iters)

    def retrospect(self, x: Tensor, *, scale: float | None = None) -> dict[str, float]:
        """One SR step on batch ``x``: add the SR gradient to the student's ``.grad``.

        Returns ``delta_norm``, ``outer_loss``, ``grad_norm`` and ``skipped`` (1.0 when nothing was
        added). A non-finite ``x`` raises ``ValueError``; a non-finite SR gradient is skipped
        and reported (module docstring)."""
        check_input(x, "student batch")
        x = x.detach()
        student = unwrap_model(self.student)
        outer_before = self.last_outer_loss
        with torch.enable_grad(), preserved_buffers(student):
            delta = self.synthesize(x)
            grads = self.gradients(x, delta)
        grads = self._all_reduce(grads)
        s = self.settings.scale if scale is None else scale
        params = [p for p in student.parameters() if p.requires_grad]
        with torch.no_grad():
            scaled = [g.to(p.dtype) * s for p, g in zip(params, grads, strict=True)]
            finite = not scaled or bool(
                torch.stack([torch.isfinite(g).all() for g in scaled]).all())
        if not finite:
            # the same on every DDP rank (the gradients were all-reduced first)
            self.last_outer_loss = outer_before
            self._delta = self._delta_opt_state = self._cache = None  # no NaN warm start
            self.skip("non_finite_gradient")
            return self.skipped_result()
        grad_norm = accumulate_grads(params, scaled)
        self.steps += 1
        self.last_delta_norm = float(delta.norm())
        self.last_grad_norm = grad_norm
        return {"delta_norm": self.last_delta_norm, "outer_loss": self.last_outer_loss,
                "grad_norm": self.last_grad_norm, "skipped": 0.0}

    def skip(self, reason: str) -> None:
        """Count an SR step that did nothing (``reason``: a key of :data:`SKIP_REASONS`) and warn
        the first time."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        warn_once(self, reason, f"abd-plugin: SR skipped a step: {SKIP_REASONS[reason]}")

    @staticmethod
    def skipped_result() -> dict[str, float]:
        return {"delta_norm": 0.0, "outer_loss": 0.0, "grad_norm": 0.0, "skipped": 1.0}

    def _all_reduce(self, grads: list[Tensor]) -> list[Tensor]:
        """Average SR gradients over ranks: DDP all-reduces only what ``backward`` produced."""
        return average_over_ranks(self.student, grads)

    # ------------------------------------------------------------------ DefenseHook
    def on_before_student_step(
        self, ctx: GuardContext, optimizer: torch.optim.Optimizer | None
    ) -> None:
        sched = self.schedule
        if not sched.auto or not sched.active(ctx.step):
            return
        if sched.lr is not None and optimizer is not None:
            # the paper's "resume with a small LR"; put back after the step
            self._saved_lrs = (optimizer, [(g, g["lr"]) for g in optimizer.param_groups])
            for g in optimizer.param_groups:
                g["lr"] = sched.lr
        x = ctx.last_student_batch
        if x is None:
            training = unwrap_model(self.student).training
            self.skip("no_student_batch" if training else "student_in_eval_mode")
            return
        with ctx.suspended():
            self.retrospect(x)

    def on_after_student_step(
        self, ctx: GuardContext, optimizer: torch.optim.Optimizer | None
    ) -> None:
        if self._saved_lrs is not None and self._saved_lrs[0] is optimizer:
            self._restore_lrs()

    def on_guard_exit(self, ctx: GuardContext) -> None:
        self._restore_lrs()  # a step that raised between the two hooks

    def _restore_lrs(self) -> None:
        if self._saved_lrs is not None:
            for g, lr in self._saved_lrs[1]:
                g["lr"] = lr
            self._saved_lrs = None

    def report(self) -> RetrospectionReport:
        return RetrospectionReport(
            steps=self.steps, start=self.schedule.start, last_delta_norm=self.last_delta_norm,
            last_outer_loss=self.last_outer_loss, last_grad_norm=self.last_grad_norm,
            skipped=dict(self.skipped),
            warnings=[f"SR skipped {n} step(s): {SKIP_REASONS[k]}"
                      for k, n in self.skipped.items()])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "rng": self._gen.get_state(),
                "delta": None if self._delta is None else self._delta.detach().cpu().clone(),
                "delta_opt": self._delta_opt_state, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.skipped = dict(state.get("skipped", {}))
        self._gen.set_state(state["rng"])
        self._delta = state["delta"]
        self._delta_opt_state = state["delta_opt"]
