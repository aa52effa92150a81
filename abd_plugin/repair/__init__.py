"""Repairs of the teacher's input: what the trigger eraser learns and applies.

Four parts, each usable on its own:

* :mod:`.base` / :mod:`.mask` — a **repair**: a learnable transform of the teacher's input that
  undoes one family of triggers (:class:`InputRepair`; :class:`MaskErasure`, a soft mask over
  input positions filled with the domain's floor, for triggers that occupy a small region). The
  same ``apply`` is used by the guard's teacher pre-hook, the learning, the re-audit and
  ``ctx.teacher_view``.
* :mod:`.learner` — :class:`RepairLearner`: learns any :class:`InputRepair` online, on the
  batches the teacher is fed, so that the teacher's target-class samples leave the target while
  the others keep their class, at a price on how much of the input the repair changes.
* :mod:`.reaudit` — :class:`ReauditController`: every so many updates, audits the *repaired*
  teacher for the target class and, when the target still stands out, lowers the price so the
  repair may grow.
* :mod:`.probation` — :class:`Probation`: a repair learned on a suspicion acts only once two
  checks on the teacher itself confirm it (the suspect's margin falls more than the other
  classes', or the repaired region carries the class when transplanted); a clean teacher
  wrongly suspected keeps a bit-identical run.

* :mod:`.spectral` — :class:`SpectralGain`, the second family: a per-frequency gain over the
  image for triggers spread over the whole input (a blend, a sinusoid, a warp). The eraser
  learns it beside the mask while on probation; the first one confirmed acts. While it acts,
  :func:`rescale_logits` hands the loop its logits at the raw teacher's scale (and
  :func:`cap_target` caps the raw rows' target value under an L1 loss).

A new repair family is a subclass of :class:`InputRepair` (its parameters, ``apply`` and
``cost``); the learner's loop and the controller work with it unchanged.
"""
from .base import InputRepair
from .learner import RepairLearner
from .mask import MaskErasure
from .probation import Probation
from .reaudit import ReauditController
from .spectral import SpectralGain, cap_target, rescale_logits

__all__ = ["InputRepair", "MaskErasure", "Probation", "RepairLearner", "ReauditController",
           "SpectralGain", "cap_target", "rescale_logits"]
