"""ABD for polo5/ZeroShotKnowledgeTransfer (ZSKT) and forks shaped like it.

A fork adds, in ``main.py`` before the solver is built::

    from abd_plugin.integrations import zskt as abd
    abd.patch(sr_start_fraction=0.995)          # or: with abd.patch(...): solver.run()

What changes in the host:

* ``ZeroShotKTSolver.run`` runs with a guard around ``self.teacher``/``self.student``. In the
  generator step the teacher sees ``x_pseudo`` with gradient, so its logits carry the SV term
  into ``KT_loss_generator(student_logits, teacher_logits)`` and the generator's backward (ABD's
  fork adds the same term there). The models' ``(logits, *activations)`` tuples are kept.
* Inside the SR window the SR gradients are added to the student's ``.grad`` after the host's
  ``clip_grad_norm_(student, 5)`` and before ``optimizer_student.step()`` (unclipped, as in
  ABD's SR branch). ``sr_start_fraction`` is resolved against
  ``(total_n_pseudo_batches - n_pseudo_batches) * n_student_iter`` student steps.
"""
from __future__ import annotations

from typing import Any

from abd_plugin import ABDConfig

from ._common import PatchHandle, load_module, require, split_config, wraps_host

HOST = "zskt"
SUPPORTED = "polo5/ZeroShotKnowledgeTransfer@e24915d713672554800372c777c9014e3399e13b"

METHODS = {
    "__init__": ("self", "args"),
    "run": ("self",),
    "KT_loss_generator": ("self", "student_logits", "teacher_logits"),
    "KT_loss_student": ("self", "student_logits", "student_activations", "teacher_logits",
                        "teacher_activations"),
}


def student_steps(solver: Any) -> int:
    """Student optimizer steps ``run()`` will take from the solver's current position."""
    a = solver.args
    return max(0, int(a.total_n_pseudo_batches) - int(getattr(solver, "n_pseudo_batches", 0))) \
        * int(a.n_student_iter)


def check(solver_cls: Any) -> None:
    for name, params in METHODS.items():
        require(solver_cls, name, params, HOST, SUPPORTED)
    if getattr(solver_cls.run, "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: {solver_cls.__name__}.run is already patched; unpatch first")


def patch(solver_cls: Any = None, *, config: ABDConfig | None = None,
          sr_start_fraction: float | None = None, **overrides: Any) -> PatchHandle:
    """Add ABD to every ``ZeroShotKTSolver.run()``.

    Args:
        solver_cls: the solver class (default: ``solver.ZeroShotKTSolver`` imported by name); a
            fork's subclass works as long as it keeps the checked method signatures.
        config, overrides: the :class:`~abd_plugin.ABDConfig`.
        sr_start_fraction: SR starts at this fraction of the remaining student steps.
    """
    if solver_cls is None:
        solver_cls = load_module(None, "solver", HOST, SUPPORTED).ZeroShotKTSolver
    check(solver_cls)
    cfg, frac = split_config(config, sr_start_fraction, overrides)
    handle = PatchHandle(HOST, cfg, frac)
    orig_run = solver_cls.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        sess = handle.session(self.teacher, self.student)
        sess.set_total_steps(student_steps(self))
        with sess.active():
            return orig_run(self, *args, **kwargs)

    handle.set_attr(solver_cls, "run", wraps_host(orig_run, run))
    return handle


__all__ = ["patch", "check", "student_steps", "SUPPORTED"]
