"""ABD for PyTorch Lightning: :class:`ABDCallback` for any LightningModule that distils.

A fork adds::

    from abd_plugin.integrations.lightning import ABDCallback
    trainer = pl.Trainer(..., callbacks=[ABDCallback("teacher", "student", sr_start_fraction=0.99)])

Covers yukimasano/single-img-extrapolating's ``in1k/distiller.py: ImgDistill`` (a fixed transfer
set: its ``kd_loss_fn(outputs, teacher_outputs)`` is reweighted per sample).

What changes in the module while ``fit`` runs (all undone at the end of ``fit``):

* SV, synthesis (a generator trained in ``training_step``): a teacher forward on an input that
  requires grad carries the SV term into the loss the module back-propagates.
* SV, fixed transfer set (``reweight="kd_loss_fn"``, the default when the module has that
  method): the instance gets its own ``kd_loss_fn`` that computes the host's loss per sample
  and returns ``mean(kept) - coef * mean(suspicious)`` (:meth:`ABDGuard.reweight`); suspicious
  samples are those the shuffled teacher ensemble still classifies like the teacher on the
  teacher's own input. While the vaccine is being verified the loss is the host's.
* SR: in ``on_before_optimizer_step`` (after ``backward``, before ``optimizer.step``) for
  optimizers holding student parameters, at the steps the guard's ``sr_schedule`` opens.
  Lightning runs ``training_step`` and ``backward`` inside ``optimizer.step(closure)``, after
  torch's step pre-hooks, so the schedule's automatic mode is switched off
  (``sr_schedule.auto = False``) and the callback runs SR itself.

What it logs (``log=True``, the default) to the trainer's loggers (TensorBoard, CSV, ...; each
logger's ``log_metrics``, at the step Lightning logs the batch under, as Lightning's
``LearningRateMonitor`` does): the audit's figures once, at the end of the first training batch
after the audit ran (``abd/audit/verdict`` (0 clean, 1 unsure, 2 poisoned), ``abd/audit/poisoned``
(1/0), ``abd/audit/p_value``, ``abd/audit/z_score``, ``abd/audit/statistic``,
``abd/audit/suspect``, ``abd/audit/target`` (not when clean), ``abd/audit/seconds``), and at the
steps Lightning writes logs (every ``Trainer(log_every_n_steps=...)``) the other defenses'
figures: the trigger eraser's ``abd/erase/on``, ``.../target``, ``.../fraction`` (mask area),
``.../pixels``, ``.../mass``, ``.../flip``, ``.../kept``, ``.../target_fraction``,
``.../price``, ``.../updates``, ``.../batches``, ``.../rechecks``; SV's ``abd/sv/...``
(``enabled``, ``coef``, ``depth``, ``trials``, ``suspicious_fraction``, ...), SR's ``abd/sr/...``
(``steps``, ``start``, ``last_delta_norm``, ...), KDIGA's ``abd/iga/...`` (``steps``,
``last_loss``, ``last_grad_norm``) when they are on, and a user hook's numbers under
``abd/<state_key>/...`` (the full list: :mod:`abd_plugin.integrations._metrics`). A figure with
no data yet (NaN, e.g. ``flip`` before the eraser's first update) is left out. The numbers are
read off the hooks' records (:func:`abd_plugin.integrations._metrics.live_report`): logging runs
neither the teacher nor the student (nor a copy of the teacher) and changes no counter of the
guard. ``Trainer(log_every_n_steps=0)`` or no logger: nothing is logged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from abd_plugin import ABDConfig, ABDGuard

from ._common import HostMismatchError, _OncePerStep, split_config
from ._metrics import MetricsFeed

try:  # Lightning 2.x
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning import Callback  # type: ignore[assignment]

HOST = "lightning"
SUPPORTED = "lightning>=2.0 (tested 2.6.6); yukimasano/single-img-extrapolating@befd4bd (in1k)"
ModuleRef = str | nn.Module
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


class ABDCallback(Callback):
    """ABD around a LightningModule's teacher and student.

    Args:
        teacher: attribute name on the LightningModule (default ``"teacher"``) or the module.
        student: likewise (default ``"student"``).
        config, overrides: the :class:`~abd_plugin.ABDConfig`.
        sr_start_fraction: SR starts at this fraction of ``trainer.estimated_stepping_batches``.
        reweight: name of the module's KD-loss method ``(student_logits, teacher_logits) ->
            scalar`` to reweight per sample on a fixed transfer set; ``"auto"`` picks
            ``kd_loss_fn`` if present; ``None`` disables.
        per_sample_loss: fast per-sample version of that loss ``(s, t) -> (B,)``; default calls
            the host's method on each sample.
        log: log the defenses' figures under ``abd/`` to the trainer's loggers at
            ``log_every_n_steps`` (the module docstring lists the names); ``False``: log nothing.
    """

    def __init__(self, teacher: ModuleRef = "teacher", student: ModuleRef = "student", *,
                 config: ABDConfig | None = None, sr_start_fraction: float | None = None,
                 reweight: str | None = "auto", per_sample_loss: PerSampleLoss | None = None,
                 log: bool = True, **overrides: Any) -> None:
        self.config, self._frac = split_config(config, sr_start_fraction, overrides)
        self.teacher_ref, self.student_ref = teacher, student
        self.reweight = reweight
        self.per_sample_loss = per_sample_loss
        # not ``self.log``: Lightning sets ``callback.log``/``log_dict`` to the module's at fit
        self.log_figures = log
        self._feed: MetricsFeed | None = None
        self.guard: ABDGuard | None = None
        self._gate: _OncePerStep | None = None
        self._handles: list = []
        self._last_teacher: tuple | None = None
        self._patched_method: str | None = None
        self._pending_state: dict[str, Any] | None = None
        self.sr_calls = 0
        self._module: nn.Module | None = None

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _resolve(pl_module: nn.Module, ref: ModuleRef, role: str) -> nn.Module:
        mod = getattr(pl_module, ref, None) if isinstance(ref, str) else ref
        if not isinstance(mod, nn.Module):
            raise HostMismatchError(
                f"{HOST}: the LightningModule has no {role} module {ref!r}; pass "
                f"ABDCallback({role}=<attribute name or module>)")
        return mod

    def in_sr_window(self) -> bool:
        return self.guard is not None and self.guard.in_sr_window()

    # ---------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._module = pl_module
        teacher = self._resolve(pl_module, self.teacher_ref, "teacher")
        student = self._resolve(pl_module, self.student_ref, "student")
        if self.guard is None:
            self.guard = ABDGuard(teacher, student, config=self.config)
            self.guard.sr_schedule.auto = False  # SR runs in on_before_optimizer_step
            if self._pending_state is not None:
                self.guard.load_state_dict(self._pending_state)
                self._pending_state = None
        if self._frac is not None:
            self.guard.set_schedule(int(trainer.estimated_stepping_batches),
                                    sr_start_fraction=self._frac)
        if self._feed is None or self._feed.guard is not self.guard:
            self._feed = MetricsFeed(self.guard)
        self._feed.reset()  # each fit's logs get the audit's figures once
        self.guard.attach()
        self._gate = _OncePerStep(self.guard)
        self._gate.install()
        self._handles.append(teacher.register_forward_hook(self._remember_teacher))
        name = self.reweight
        if name == "auto":
            name = "kd_loss_fn" if callable(getattr(pl_module, "kd_loss_fn", None)) else None
        if name is not None:
            orig = getattr(pl_module, name, None)
            if not callable(orig):
                raise HostMismatchError(f"{HOST}: the LightningModule has no method {name!r} to "
                                        "reweight; pass reweight=None or the KD-loss method name")
            setattr(pl_module, name, self._reweighted(orig))  # instance attribute, removed later
            self._patched_method = name

    def _remember_teacher(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.guard is None or not args or not isinstance(args[0], Tensor):
            return
        from abd_plugin import extract_logits

        self._last_teacher = (
            args[0].detach(),
            extract_logits(output, self.config.logits_fn).detach(),
        )

    def _reweighted(
        self, orig: Callable[[Tensor, Tensor], Tensor]
    ) -> Callable[[Tensor, Tensor], Tensor]:
        def kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
            guard, seen = self.guard, self._last_teacher
            if (guard is None or guard.sv is None or seen is None or not guard.student.training
                    or seen[0].shape[0] != student_logits.shape[0]):
                return orig(student_logits, teacher_logits)
            x, t = seen
            if guard.sv.verifying:
                guard.observe(x, t)
                return orig(student_logits, teacher_logits)
            mask = guard.suspicious(x, t)
            if self.per_sample_loss is not None:
                per = self.per_sample_loss(student_logits, teacher_logits)
            else:
                per = torch.stack(
                    [
                        orig(student_logits[i : i + 1], teacher_logits[i : i + 1]).reshape(())
                        for i in range(student_logits.shape[0])
                    ]
                )
            return guard.reweight(per, mask)

        kd_loss.__abd_wrapped__ = orig  # type: ignore[attr-defined]
        return kd_loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        guard = self.guard
        if guard is None or not self.in_sr_window() or guard.last_student_batch is None:
            return
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        if not guard.updates_student(opt):
            return
        guard.retrospect()
        self.sr_calls += 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        feed = self._feed
        if (not self.log_figures or feed is None or not trainer.loggers
                or not trainer.log_every_n_steps):
            return
        log_step = _log_step(trainer)
        if not (log_step or feed.audit_pending()):
            return
        metrics = feed.take(rest=log_step)
        if not metrics:
            return
        # straight to the loggers, at the step Lightning writes this batch's metrics under (as
        # LearningRateMonitor does): pl_module.log_dict would repeat the audit's figures in
        # every later row of the epoch (on-step values stay in Lightning's results until then)
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _restore(self, pl_module: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._gate is not None:
            self._gate.remove()
            self._gate = None
        if self.guard is not None and self.guard.active:
            self.guard.detach()
        if self._patched_method is not None:
            pl_module.__dict__.pop(self._patched_method, None)
            self._patched_method = None
        self._last_teacher = None

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._restore(pl_module)

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._restore(pl_module)

    def unpatch(self) -> None:
        """Undo what the callback changed now (``fit`` ending does the same)."""
        if self._module is not None:
            self._restore(self._module)

    def __enter__(self) -> ABDCallback:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict() if self.guard is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        st = state_dict.get("guard")
        if st is None:
            return
        if self.guard is not None:
            self.guard.load_state_dict(st)
        else:
            self._pending_state = st


def _log_step(trainer: Any) -> bool:
    """Whether Lightning writes this training batch's logged metrics: what Lightning's own
    monitors ask (``LearningRateMonitor``, ``DeviceStatsMonitor``: every ``log_every_n_steps``
    optimizer steps, and at the last), less the batches that only accumulate gradients (Lightning
    writes the row of the batch that steps)."""
    loop = getattr(trainer, "fit_loop", None)
    accumulating = getattr(loop, "_should_accumulate", None)
    if callable(accumulating) and accumulating():
        return False
    should = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    if isinstance(should, bool):
        return should
    n = int(getattr(trainer, "log_every_n_steps", 50) or 0)  # pragma: no cover - other layouts
    return n > 0 and int(trainer.global_step) % n == 0  # pragma: no cover


def patch(*args: Any, **kwargs: Any) -> ABDCallback:
    """Same as ``ABDCallback(*args, **kwargs)``: Lightning's own callback list is the patch; the
    callback undoes its changes when ``fit`` ends."""
    return ABDCallback(*args, **kwargs)


__all__ = ["ABDCallback", "patch", "SUPPORTED"]
