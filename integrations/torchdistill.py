"""ABD for torchdistill (PyPI ``torchdistill``; tested 1.1.5) through its registry, without
editing its classes.

A script adds, after ``get_distillation_box(...)``::

    from abd_plugin.integrations import torchdistill as abd
    handle = abd.patch(training_box, sr_start_fraction=0.99)
    ...train as usual...
    handle.unpatch()

A YAML-only user instead calls ``abd.patch()`` once (e.g. from a module named in
``dependencies``) and selects ``post_forward_process: abd_post_forward_process`` under ``train``;
the guard is then built at the first post-forward call of each box.

What changes: a guard is attached to the box's ``teacher_model``/``student_model`` (forward
hooks only). In ``default_post_forward_process`` the SR gradients are added between
``loss.backward()`` (after gradient clipping) and ``optimizer.step()`` inside the SR window, on
the batch the student last saw. ``sr_start_fraction`` is resolved against
``num_epochs * ceil(len(train_data_loader) / grad_accum_step)`` optimizer steps. torchdistill has
no synthesis step, so SV has nothing to vaccinate here.

What it logs (``log=True``, the default): torchdistill's training box holds no logger (its
``MetricLogger`` and tracker live in the user's script), so the figures go through python
``logging`` (logger :data:`LOGGER`, ``abd_plugin.integrations.torchdistill``; it propagates to the
root logger that torchdistill's ``set_basic_log_config``/``setup_log_file`` set up, so the lines
land in the run's log next to torchdistill's own), at INFO, after the student's optimizer step:

* once, after the first step the audit ran in: ``abd audit: <verdict>  abd/audit/p_value: ...``
  (the audit's figures: ``abd/audit/verdict`` (0 clean, 1 unsure, 2 poisoned),
  ``abd/audit/poisoned``, ``abd/audit/p_value``, ``abd/audit/z_score``, ``abd/audit/statistic``,
  ``abd/audit/suspect``, ``abd/audit/target`` (not when clean), ``abd/audit/seconds``);
* every ``log_every`` student optimizer steps of an epoch (steps 0, ``log_every``, ... of each
  epoch, as ``MetricLogger.log_every(loader, log_freq)`` counts its batches; pass the config's
  ``train.log_freq``): ``abd [step N]  abd/erase/fraction: ...`` with the trigger eraser's
  ``abd/erase/...`` (``on``, ``target``, ``fraction``, ``pixels``, ``mass``, ``flip``, ``kept``,
  ``target_fraction``, ``price``, ``updates``, ``batches``, ``rechecks``) and, when on, SR's
  ``abd/sr/...``, KDIGA's ``abd/iga/...`` and SV's ``abd/sv/...`` (the names:
  :mod:`abd_plugin.integrations._metrics`).

The numbers are read off the hooks' records: logging runs neither model and changes no counter of
the guard.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from abd_plugin import ABDConfig, ABDGuard

from ._common import GuardSession, PatchHandle, load_module, require, split_config
from ._metrics import MetricsFeed, format_metrics

HOST = "torchdistill"
SUPPORTED = "torchdistill==1.1.5"
KEY = "abd_post_forward_process"
#: where the figures are logged (propagates to torchdistill's root logger)
LOGGER = logging.getLogger(__name__)
#: the default of ``patch(log_every=...)``: torchdistill's example configs' ``log_freq``
LOG_EVERY = 1000


def steps_per_epoch(box: Any) -> int | None:
    """Student optimizer steps in one epoch of ``box``: ``ceil(len(train_data_loader) /
    grad_accum_step)`` (None when the loader has no length)."""
    try:
        n = len(getattr(box, "train_data_loader", None))  # type: ignore[arg-type]
    except TypeError:
        return None
    return math.ceil(n / int(getattr(box, "grad_accum_step", 1) or 1))


def optimizer_steps(box: Any) -> int | None:
    """Student optimizer steps in the whole run of ``box`` (None when the loader has no length)."""
    per_epoch = steps_per_epoch(box)
    return None if per_epoch is None else int(box.num_epochs) * per_epoch


class _BoxLog:
    """The figures of one box's guard as ``logging`` lines, after the student's optimizer steps:
    the audit's once, the rest at steps 0, ``every``, ... of each epoch."""

    def __init__(self, guard: ABDGuard, box: Any, every: int) -> None:
        self.feed = MetricsFeed(guard)
        self.box = box
        self.every = every
        self.steps = 0

    def after_step(self) -> None:
        i = self.steps
        self.steps += 1
        per_epoch = steps_per_epoch(self.box)
        if per_epoch:
            i %= per_epoch
        rest = i % self.every == 0
        if not (rest or self.feed.audit_pending()):
            return
        audit, others = self.feed.take_parts(rest=rest)
        report = self.feed.guard.audit_report
        if audit and report is not None:
            LOGGER.info("abd audit: %s  %s", report.verdict, format_metrics(audit))
        if others:
            LOGGER.info("abd [step %d]  %s", self.steps - 1, format_metrics(others))


def check() -> tuple:
    dist = load_module(None, "torchdistill.core.distillation", HOST, SUPPORTED)
    pfp = load_module(None, "torchdistill.core.interfaces.post_forward_proc", HOST, SUPPORTED)
    reg = load_module(None, "torchdistill.core.interfaces.registry", HOST, SUPPORTED)
    require(
        dist.DistillationBox,
        "forward_process",
        ("self", "sample_batch", "targets", "supp_dict"),
        HOST,
        SUPPORTED,
    )
    require(pfp, "default_post_forward_process", ("self", "loss", "metrics"), HOST, SUPPORTED)
    require(reg, "get_post_forward_proc_func", ("key",), HOST, SUPPORTED)
    if not isinstance(getattr(reg, "POST_FORWARD_PROC_FUNC_DICT", None), dict):
        from ._common import HostMismatchError
        raise HostMismatchError(f"{HOST}: registry.POST_FORWARD_PROC_FUNC_DICT missing; "
                                f"this adapter supports {SUPPORTED}")
    return pfp.default_post_forward_process, reg.POST_FORWARD_PROC_FUNC_DICT


def patch(box: Any = None, *, config: ABDConfig | None = None,
          sr_start_fraction: float | None = None, key: str = KEY, log: bool = True,
          log_every: int = LOG_EVERY, **overrides: Any) -> PatchHandle:
    """Register ``key`` as a post-forward process and, with ``box``, guard that box now.

    Args:
        box: a ``DistillationBox``/``TrainingBox``-like object with ``teacher_model`` and
            ``student_model`` (optional).
        config, overrides: the :class:`~abd_plugin.ABDConfig`.
        sr_start_fraction: SR starts at this fraction of the box's optimizer steps.
        key: the registry key of the post-forward process.
        log: log the defenses' figures through :data:`LOGGER` (the module docstring says what and
            when); ``False``: log nothing.
        log_every: log every this many student optimizer steps of an epoch (torchdistill's
            ``train.log_freq``).
    """
    default_pfp, registry = check()
    if key in registry and getattr(registry[key], "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: {key!r} is already registered by abd-plugin; unpatch first")
    if log and int(log_every) < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    cfg, frac = split_config(config, sr_start_fraction, overrides)
    handle = PatchHandle(HOST, cfg, frac)
    logs: dict[int, _BoxLog] = {}  # id(session) -> its lines

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        for box_log in logs.values():
            guard = box_log.feed.guard
            if guard.active and guard.updates_student(optimizer):
                box_log.after_step()

    def box_session(b: Any) -> GuardSession:
        sess = handle.find_session(b.teacher_model)
        if sess is None:
            sess = handle.session(b.teacher_model, b.student_model)
            steps = optimizer_steps(b)
            if steps is not None:
                sess.set_total_steps(steps)
            sess.open()  # stays attached until unpatch
            if log:
                if not logs:  # after the guard's own step hook: its step is counted by then
                    from torch.optim.optimizer import register_optimizer_step_post_hook

                    handle.on_unpatch(register_optimizer_step_post_hook(after_step).remove)
                logs[id(sess)] = _BoxLog(sess.guard, b, int(log_every))
        return sess

    def abd_post_forward_process(self: Any, loss: Any, metrics: Any = None, **kwargs: Any) -> Any:
        box_session(self)
        return default_pfp(self, loss, metrics=metrics, **kwargs)

    abd_post_forward_process.__abd_wrapped__ = default_pfp  # type: ignore[attr-defined]
    had, old = key in registry, registry.get(key)
    registry[key] = abd_post_forward_process

    def unregister() -> None:
        if had:
            registry[key] = old
        else:
            registry.pop(key, None)

    handle.on_unpatch(unregister)
    if box is not None:
        box_session(box)
    return handle


__all__ = ["patch", "check", "optimizer_steps", "steps_per_epoch", "KEY", "SUPPORTED", "LOGGER",
           "LOG_EVERY"]
