"""Input-gradient alignment (KDIGA): carry a teacher's adversarial robustness into its student.

Plain KD matches the teacher's *outputs*; it does not pass on the teacher's adversarial
robustness, which lives in how the output changes with the *input*. KDIGA (Shao, Yi, Chen, Hsieh,
"How and When Adversarial Robustness Transfers in Knowledge Distillation?", arXiv 2110.12072)
adds a term that aligns the two models' input gradients of the cross-entropy on the label:

    L_IGA = gamma * mean_i || grad_x CE(S(x_i), y_i) - grad_x CE(T(x_i), y_i) ||_2

* ``g_T = grad_x CE(T(x), y)`` is a constant (no gradient reaches the teacher); it is computed on
  a frozen, hook-free replica of the teacher, so the user's teacher never receives ``.grad`` and
  its own forward hooks (DeepInversion's BatchNorm hooks, ...) never see these forwards.
* ``g_S`` keeps its graph (``create_graph=True``): the term's gradient w.r.t. the student's
  parameters is second order (a double backward through the student).
* Per-sample gradients: each CE is summed over the batch before differentiating w.r.t. ``x``
  (``reduction="sum"``), so ``g_S[i]`` is the gradient of sample i's own loss and does not shrink
  with the batch size; the per-sample L2 norms are then averaged. ``gamma`` therefore does not
  depend on the batch size (the author code's variants use mean-reduced CE and a whole-batch norm
  with ``gamma / B``; their ``gamma`` values are not comparable with this one).
* ``y`` is the teacher's pseudo-label (argmax of ``T(x)``) unless labels are given: data-free
  KD has none.
* The norm is a *safe* norm: its value and gradient are 0 where the two gradients agree exactly
  (the plain norm's gradient is undefined there and gives NaN).
* Optional alignment at an FGSM point (``fgsm_eps``; the "fast" variant of the author code):
  the term is evaluated at ``x + fgsm_eps * sign(grad_x CE(S(x), y))`` (the student's own
  worst-case direction, no graph), clamped to ``clamp`` when given, instead of at ``x``.

Two ways to use it:

* automatic, as a :class:`~abd_plugin.DefenseHook` in :class:`~abd_plugin.ABDGuard` (alone or
  next to SV/SR)::

      iga = InputGradientAlignment(student, teacher, gamma=1.0)
      with ABDGuard(teacher, student, sv=False, sr=False, audit=False, erase=False,
                    hooks=[iga]):
          ...   # unchanged loop: the term's gradient joins .grad between backward() and step()

  or without a guard: ``loss.backward(); iga.align(x); optimizer.step()``.
* explicit, as a loss term: ``loss = kd_loss + iga_loss(student, teacher, x)``.

What to expect (mnist5k, PGD-trained LeNet-5 teacher with 87 % robust accuracy at L_inf
eps = 0.2, LeNet-5-half student, 2 000 student steps, 3 seeds; the project README has the
tables): plain KD passes on 0-2 % robust accuracy; with ``fgsm_eps=0.2`` the student keeps 62 %
of the teacher's robust accuracy on KD with real data (``gamma=1.5``, KL at T = 1, -2.3 ACC
points), 73 % on ZSKT and 59 % on DFAD (``gamma=10``; clean accuracy even rises). Aligned at
``x`` only (no FGSM point) the students stayed at 2-13 %. ``gamma`` was tuned over 0.3-30.

Caution: with a **poisoned** teacher the alignment carries the trigger's sensitivity too (same
setting, ZSKT, a BadNets teacher: attack success 42 % -> 86 %). Align only with a teacher you
trust, or next to a backdoor defense in the same guard.

Cost: a teacher forward + backward (cached while the batch does not change) and a student forward
+ double backward: about 3x a plain student step at ``x``, 4-5.5x with ``fgsm_eps`` (CPU,
``benchmarks/bench_iga.py``); ``every=k`` runs the term on every k-th student step only.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._replica import (
    TeacherReplica,
    ViewedModel,
    accumulate_grads,
    average_over_ranks,
    preserved_buffers,
    unwrap_model,
)
from .hooks import DefenseHook, GuardContext, HookReport
from .outputs import LogitsFn, check_input, extract_logits
from .validation import Bool, Int, Num, NumPair, Optional, Section, spec

__all__ = [
    "AlignmentSettings",
    "AlignmentReport",
    "InputGradientAlignment",
    "iga_loss",
    "input_gradient",
    "safe_norm",
]


@dataclass(frozen=True)
class AlignmentSettings(Section):
    """KDIGA's section of :class:`~abd_plugin.ABDConfig` (``ABDConfig(alignment=...)``; flat
    keyword ``iga`` for ``enabled``, ``iga_<field>`` for the others). When enabled, the guard
    adds an :class:`InputGradientAlignment` hook after its other defenses."""

    switch: ClassVar[str] = "iga"
    flat_prefix: ClassVar[str] = "iga_"

    enabled: bool = spec(
        False, Bool(),
        """Align the student's input gradients with the teacher's (KDIGA: carries a robust
        teacher's adversarial robustness into the student; with a poisoned teacher it carries the
        trigger's sensitivity too, so keep the audit and the eraser on beside it).""")
    gamma: float = spec(
        1.0, Num(0, 1e6),
        """Weight of the term (independent of the batch size); on MNIST 1.5 suited KD on real
        data and 10 the data-free loops.""")
    every: int = spec(
        1, Int(1, 1_000_000),
        """Run the term on every ``every``-th student step only.""")
    fgsm_eps: float | None = spec(
        None, Optional(Num(0, 1e6, lo_open=True)),
        """Align at the student's FGSM point of this radius instead of at the batch (``None``: at
        the batch). The students kept 59-73 % of the teacher's robust accuracy with it, 2-13 %
        without.""")
    clamp: tuple[float, float] | None = spec(
        None, Optional(NumPair(-1e9, 1e9)),
        """``(low, high)`` the FGSM point is clamped to (e.g. ``(0, 1)`` for images in [0, 1]);
        ``None``: no clamp.""")

    def check(self) -> None:
        if self.clamp is not None and not self.clamp[0] < self.clamp[1]:
            raise ValueError(f"{type(self).__name__}.clamp must be (low, high) with low < high, "
                             f"got {self.clamp}")


@dataclass
class AlignmentReport(HookReport):
    """KDIGA's part of the guard's report: steps aligned, the last term and its gradient's norm,
    and the hook's own time (``align_seconds``)."""

    steps: int = 0
    last_loss: float = float("nan")
    last_grad_norm: float = 0.0
    align_seconds: float = 0.0

    def lines(self) -> list[str]:
        return [f"  Input-gradient alignment (KDIGA): {self.steps} step(s), last term "
                f"{self.last_loss:.3g}, {self.seconds:.2f}s."]


def safe_norm(v: Tensor) -> Tensor:
    """Per-row L2 norm of ``v`` (B, ...) -> (B,), with value **and gradient** 0 at a zero row
    (the plain norm's gradient there is 0/0). Exact elsewhere, no epsilon bias."""
    sq = v.flatten(1).pow(2).sum(1)
    pos = sq > 0
    root = torch.where(pos, sq, torch.ones_like(sq)).sqrt()  # never sqrt(0): finite gradient
    return torch.where(pos, root, torch.zeros_like(sq))


def input_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    create_graph: bool = False,
    logits_fn: LogitsFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample input gradients ``grad_x CE(model(x), y)`` (same shape as ``x``) and the labels
    used (``y``, or the model's argmax when ``y`` is None).

    The CE is summed over the batch (``reduction="sum"``), so row i is the gradient of sample i's
    own loss. Only ``x`` is differentiated: no parameter's ``.grad`` is written. With
    ``create_graph=True`` the result stays differentiable w.r.t. the model's parameters.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = extract_logits(model(x), logits_fn)
        if y is None:
            y = logits.detach().argmax(1)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return g, y


@torch.no_grad()
def _pseudo_labels(model: nn.Module, x: Tensor, logits_fn: LogitsFn | None) -> Tensor:
    return extract_logits(model(x), logits_fn).argmax(1)


def _fgsm_point(
    student: nn.Module, x: Tensor, y: Tensor, eps: float,
    clamp: tuple[float, float] | None, logits_fn: LogitsFn | None,
) -> Tensor:
    g, _ = input_gradient(student, x, y, logits_fn=logits_fn)
    x_adv = x.detach() + eps * g.sign()
    if clamp is not None:
        x_adv = x_adv.clamp(*clamp)
    return x_adv.detach()


def _alignment(
    student: nn.Module, g_t: Tensor, x: Tensor, y: Tensor, logits_fn: LogitsFn | None
) -> Tensor:
    """``mean_i ||g_S(x_i) - g_T_i||_2`` with the student's graph kept (no gamma)."""
    g_s, _ = input_gradient(student, x, y, create_graph=True, logits_fn=logits_fn)
    return safe_norm(g_s - g_t.to(g_s.dtype)).mean()


def iga_loss(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    gamma: float = 1.0,
    fgsm_eps: float | None = None,
    clamp: tuple[float, float] | None = None,
    logits_fn: LogitsFn | None = None,
) -> Tensor:
    """The KDIGA term ``gamma * mean_i ||grad_x CE(S(x_i), y_i) - grad_x CE(T(x_i), y_i)||_2``
    as a scalar to add to the student's loss (differentiable w.r.t. the student's parameters,
    second order).

    Args:
        student, teacher: the two classifiers. ``teacher`` runs **as given**: in its current
            mode (keep it in ``eval()``), with its forward hooks; only ``x`` is differentiated
            through it, so its ``.grad`` is never written, and its buffers are restored.
            :class:`InputGradientAlignment` runs a hook-free frozen replica instead.
        x: the student's batch (B, ...). It is detached first.
        y: labels (B,); default: the teacher's pseudo-labels ``T(x).argmax(1)``.
        gamma: weight of the term (independent of the batch size, see the module doc).
        fgsm_eps: align at the FGSM point ``x + fgsm_eps * sign(grad_x CE(S(x), y))`` instead
            of at ``x`` (y: the labels at the clean ``x``).
        clamp: (low, high) range the FGSM point is clamped to (e.g. ``(0, 1)`` for images in
            [0, 1]); None: no clamp.
        logits_fn: how to find the logits in a model's output (default: the core's rule).

    The student runs in its current mode; its buffers (BatchNorm running statistics) are
    restored after these extra forwards.
    """
    check_input(x, "iga batch")
    x = x.detach()
    s = unwrap_model(student)
    with preserved_buffers(teacher), preserved_buffers(s):
        if fgsm_eps is not None:  # labels at the clean x, gradients at the FGSM point
            if y is None:
                y = _pseudo_labels(teacher, x, logits_fn)
            x = _fgsm_point(s, x, y, fgsm_eps, clamp, logits_fn)
        g_t, y = input_gradient(teacher, x, y, logits_fn=logits_fn)
        return gamma * _alignment(s, g_t.detach(), x, y, logits_fn)


class InputGradientAlignment(DefenseHook):
    """KDIGA as a :class:`~abd_plugin.DefenseHook`: on every ``every``-th student optimizer step
    it adds the gradient of ``gamma * mean_i ||grad_x CE(S(x_i), y_i) - grad_x CE(T(x_i),
    y_i)||_2`` (on the student's last training batch) to the student's ``.grad``, between the
    user's ``backward()`` and ``step()``. See the module documentation for the term.

    Args:
        student: the student (may be DDP-wrapped; the term's gradients are then averaged over
            ranks).
        teacher: the teacher; only a frozen, hook-free replica of it runs (made lazily, follows
            the batch's device).
        gamma: weight (independent of the batch size). The author code sweeps it over orders of
            magnitude; on MNIST 1.5 suited KD on real data and 10 the data-free loops (module
            doc).
        every: run on every ``every``-th student step only (steps 0, k, 2k, ... as the guard
            counts them). The term is not multiplied by ``every``; pass a larger ``gamma`` for
            the same average pull.
        fgsm_eps, clamp: align at the student's FGSM point instead of at the batch (see
            :func:`iga_loss`).
        loss_scale: under AMP, a callable giving the current loss scale (``scaler.get_scale``):
            the term's gradient is multiplied by it, like the scaled gradients already in
            ``.grad``.
        logits_fn: how to find the logits in a model's output.

    Labels: the teacher's pseudo-labels by default; :meth:`set_labels` gives the true labels of
    the next aligned batch. Without a guard call :meth:`align` between ``backward()`` and
    ``step()``; :meth:`loss` returns the term itself for a loss line.
    """

    name = "iga"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        gamma: float = 1.0,
        every: int = 1,
        fgsm_eps: float | None = None,
        clamp: tuple[float, float] | None = None,
        loss_scale: Callable[[], float] | None = None,
        logits_fn: LogitsFn | None = None,
        replica: TeacherReplica | None = None,
    ) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if int(every) != every or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every}")
        if fgsm_eps is not None and not fgsm_eps > 0:
            raise ValueError(f"fgsm_eps must be > 0 (or None), got {fgsm_eps}")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")
        self.student = student
        self.gamma = float(gamma)
        self.every = int(every)
        self.fgsm_eps = fgsm_eps
        self.clamp = clamp
        self.loss_scale = loss_scale
        self.logits_fn = logits_fn
        self._replica = replica or TeacherReplica(teacher)
        self._view: Callable[[Tensor], Tensor] | None = None
        self._labels: Tensor | None = None
        # (x, pseudo-labels, g_T at x or None): a frozen teacher on the same batch gives the same
        # labels and gradient (ZSKT/DFAD run several student steps per synthetic batch)
        self._cache: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.steps = 0
        self.last_loss = float("nan")
        self.last_grad_norm = 0.0
        self.seconds = 0.0

    # ------------------------------------------------------------------ pieces
    def set_labels(self, y: Tensor | None) -> None:
        """True labels (B,) for the next aligned batch (used once, then pseudo-labels again)."""
        self._labels = None if y is None else y.detach()

    def _cached(self, x: Tensor) -> tuple[Tensor, Tensor | None] | None:
        c = self._cache
        if (c is not None and c[0].shape == x.shape and c[0].device == x.device
                and torch.equal(c[0], x)):
            return c[1], c[2]
        return None

    def _teacher(self, x: Tensor) -> nn.Module:
        """The frozen teacher copy, seen through the guard's view of teacher inputs (the
        eraser's mask) while a guard calls this hook."""
        teacher = self._replica.to_device_of(x)
        return teacher if self._view is None else ViewedModel(teacher, self._view)

    def _teacher_labels(self, x: Tensor) -> Tensor:
        """The teacher's pseudo-labels of ``x`` (a no-grad forward, cached per batch)."""
        hit = self._cached(x)
        if hit is not None:
            return hit[0]
        y = _pseudo_labels(self._teacher(x), x, self.logits_fn)
        self._cache = (x.detach().clone(), y, None)
        return y

    def _teacher_gradient(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """``grad_x CE(T(x), y)`` and the labels (cached per batch when they are the teacher's
        own)."""
        hit = self._cached(x) if y is None else None
        if hit is not None and hit[1] is not None:
            return hit[1], hit[0]
        g_t, y_used = input_gradient(self._teacher(x), x, y, logits_fn=self.logits_fn)
        g_t = g_t.detach()
        if y is None:
            self._cache = (x.detach().clone(), y_used, g_t)
        return g_t, y_used

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The term ``gamma * mean_i ||g_S - g_T||`` for batch ``x`` (graph kept through the
        student); the student's buffers are restored after its extra forwards."""
        check_input(x, "iga batch")
        x = x.detach()
        student = unwrap_model(self.student)
        with preserved_buffers(student):
            if self.fgsm_eps is None:
                g_t, y = self._teacher_gradient(x, y)
            else:  # labels at the clean x (cached), the teacher's gradient at the FGSM point
                if y is None:
                    y = self._teacher_labels(x)
                x = _fgsm_point(student, x, y, self.fgsm_eps, self.clamp, self.logits_fn)
                g_t, _ = input_gradient(self._teacher(x), x, y, logits_fn=self.logits_fn)
            return self.gamma * _alignment(student, g_t.detach(), x, y, self.logits_fn)

    def align(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """Add the term's gradient for batch ``x`` to the student's ``.grad`` (call it between
        ``backward()`` and ``step()``); returns ``{"loss", "grad_norm"}``."""
        t0 = time.perf_counter()
        if y is None and self._labels is not None:
            y, self._labels = self._labels, None
            if len(y) != len(x):
                raise ValueError(f"set_labels gave {len(y)} labels for a batch of {len(x)}")
            y = y.to(x.device)
        student = unwrap_model(self.student)
        params = [p for p in student.parameters() if p.requires_grad]
        with torch.enable_grad():
            term = self.loss(x, y)
            grads = torch.autograd.grad(term, params, allow_unused=True)
        full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        full = average_over_ranks(self.student, full)
        scale = float(self.loss_scale()) if self.loss_scale is not None else 1.0
        with torch.no_grad():
            scaled = [g.to(p.dtype) * scale for p, g in zip(params, full, strict=True)]
        self.steps += 1
        self.last_loss = float(term.detach())
        self.last_grad_norm = accumulate_grads(params, scaled)
        self.seconds += time.perf_counter() - t0
        return {"loss": self.last_loss, "grad_norm": self.last_grad_norm}

    # ------------------------------------------------------------------ DefenseHook
    def on_before_student_step(
        self, ctx: GuardContext, optimizer: torch.optim.Optimizer | None
    ) -> None:
        if ctx.step % self.every != 0 or self.gamma == 0:
            return
        x = ctx.last_student_batch
        if x is None:
            return
        probe = x[:1]
        erasing = ctx.teacher_view(probe) is not probe  # one sample, to learn if a mask applies
        self._view = ctx.teacher_view if erasing else None
        try:
            with ctx.suspended():
                self.align(x)
        finally:
            if erasing:  # the mask changes between steps: nothing cached under it stays valid
                self._cache = None
            self._view = None

    def on_guard_exit(self, ctx: GuardContext) -> None:
        self._cache = None
        self._labels = None

    @classmethod
    def from_settings(cls, student: nn.Module, teacher: nn.Module, settings: AlignmentSettings,
                      **kw: Any) -> InputGradientAlignment:
        """The hook an :class:`AlignmentSettings` section asks for (``kw``: ``loss_scale``,
        ``logits_fn``, ``replica``)."""
        return cls(student, teacher, gamma=settings.gamma, every=settings.every,
                   fgsm_eps=settings.fgsm_eps, clamp=settings.clamp, **kw)

    def report(self) -> AlignmentReport:
        return AlignmentReport(steps=self.steps, last_loss=self.last_loss,
                               last_grad_norm=self.last_grad_norm, align_seconds=self.seconds)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "last_loss": self.last_loss,
                "last_grad_norm": self.last_grad_norm, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_loss = float(state["last_loss"])
        self.last_grad_norm = float(state["last_grad_norm"])
        self.seconds = float(state["seconds"])
