"""The probation of a repair learned on a suspicion: it acts only once it has shown, on the
teacher itself, that it takes the suspected class's shortcut away and nothing else.

A verdict is a guess. The audit's statistics call some clean teachers ``poisoned`` or
``unsure`` (a class that is naturally easy to reach, as an "8" on digits), and a mask learned
for such a class still "works" on a generator's fragile samples: a few positions flip most of
them. Erasing those positions from every teacher input then costs a clean teacher accuracy.

So the mask is learned as usual but the teacher's inputs stay unchanged until a check passes.
Every ``every`` updates, once the mask covers at least one position, two tests compare what
the mask does for the suspect ``t`` with a control:

* **Re-audit, every class** (:meth:`~abd_plugin.repair.ReauditController.specificity`): the
  audit's margin search for every class on the teacher seen through the mask. A mask over a
  trigger takes away ``t``'s shortcut: ``t``'s maximum margin falls to a fraction ``r_t`` of
  its first value while the other classes keep theirs. The control is the median ratio among
  the other classes; the test passes when ``median_{c != t} r_c - r_t >= gap``. A
  natural-feature mask lowers ``t`` about as much as it lowers the classes it was not learned
  for. A mask that also lowers the other classes (their median ratio below ``others_kept``)
  erases generic content, a digit's strokes, and its larger cut on ``t`` then counts only when
  its region also carries ``t`` a little (the transplant below, by at least ``others_carry``
  over its control): a trigger's mask leaves the other classes' margins about where they were
  (median ratio 0.95-1.01 measured on patch triggers), a watermark's wide mask lowers them but
  carries the class (18-24 points over the control), and the masks a clean teacher got
  confirmed with before this rule did neither (0.91-0.93, 1-5 points).
* **Transplant** (:meth:`~abd_plugin.repair.MaskErasure.transplant`): the masked region of the
  recent samples the teacher calls ``t``, copied onto samples it calls something else. A trigger
  region *carries* the class: the pasted samples go to ``t``; the same region moved elsewhere
  (equal area, ``controls`` random offsets) does not. The test passes when the share sent to
  ``t`` exceeds the best control's by at least ``transplant``. This catches triggers the margin
  search can rebuild elsewhere (a patch that works at any position of a pooled CNN), which the
  re-audit misses.

A repair without a region (the spectral gain, :mod:`abd_plugin.repair.spectral`) is checked
with two other tests, the same in spirit:

* **Universal re-audit**: the audit's universal blend statistic
  (:mod:`abd_plugin.universal`) again, through the repair. A repair of a spread trigger takes
  the suspect's universal shortcut away: its statistic drops (in units of the first audit's
  spread among the other classes) at least ``universal_gap`` more than the other classes'
  median drop.
* **Residual transplant**: what the repair removes from recent target-class samples, added to
  other samples, sends them to ``t`` at least ``transplant`` more often than what it removes
  from other-class samples does.

A check of the spectral gain also passes when both of its tests reach a fraction ``joint`` of
their own thresholds (the eraser's ``confirm_joint``, 0.6): two independent tests each part of
the way. A sinusoid under ZSKT reached residual shares of 0.25-0.52 and universal gaps of
2.9-4.3 at every check but never one test twice in a row; the 404 spectral checks recorded on
clean teachers reached one or the other, never both (gaps of up to 3.8 with shares of at most
0.2; a share of 0.42 with gaps of at most 2.1; a ResNet-8's gap of 5.3 with a share of 0.27).

A check of the spectral gain also passes when, at ``sustain_checks`` (3) checks in a row, this
one included, the residual moved at least ``transplant`` of the other samples to the suspect
and at least ``sustain`` (the eraser's ``confirm_sustain``, 0.25) more than its control: a
transfer that holds. A sinusoid teacher whose universal statistic favours the target only
weakly (z 3.3; clean teachers reach 4.0) cannot pass the universal re-audit, whose 4.5 spreads
are more than its whole excess, and its residual stayed 0.26-0.47 over the control (57-98 % of
the samples moved) from the second check on; no clean teacher's stayed 0.2 over it for three
checks in a row, and over real images (where a confirmed gain costs a class) the residual moved
at most 30 %. The universal re-audit is then not run (``reaudit_skipped``; ``sustained`` in the
record).

Either test passing confirms the mask (it acts from then on), after a ``poisoned`` verdict. After
an ``unsure`` one the audit's own evidence is weak, so the repair must show more: two passing
checks in a row (``repeat_unsure``), or one whose region also carries the suspect (the
transplant's share over its control at least ``others_carry``, below the transplant test's own
threshold). The masks confirmed on clean LeNet-5 teachers the audit was unsure about passed the
re-audit once, carried 1-5 points, and failed the next check (gaps 0.112, 0.114); the masks over
poisoned teachers' triggers after an ``unsure`` verdict (a watermark, a square, a ResNet-8 corner
grid) carried 11-24 points. The spectral gain follows the same rule (one passing check after
``poisoned``, two after ``unsure``; it has no region to carry the suspect), except that it needs
two whatever the verdict while a mask with a region of its own is still on probation beside it
(``repeat_rival``): the mask, checked first at the same update, keeps its chance to win the
race. A streak in progress when the probation ends runs on until it
confirms or a check fails. The transplant runs first: when it
passes, the re-audit (seconds, against milliseconds) cannot change the decision and is skipped
(``reaudit_skipped``; its numbers are NaN in the record). Both re-audits then start with the
suspect alone: when the repair took less than half the needed gap off the suspect's own
statistic (the mask: ``r_t > 1 - gap / 2``; the gain: a drop below ``universal_gap / 2``), the
check fails there (``staged``; the other classes' numbers are NaN), since passing would need
the other classes' median to move *against* the suspect by more than half the gap, which a
repair of the suspect's shortcut does not do. On a clean teacher wrongly suspected most checks
end at this stage and cost one class's search instead of one per class.

After ``max_updates`` updates without a confirmation the probation ends: the repair stays off
for the run, and the student's targets were never changed. On a clean teacher wrongly
suspected the run is then bit-identical to an unguarded one (the checks use their own random
generators and a frozen copy).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import _amp, _dist
from ..outputs import extract_logits
from .base import InputRepair

if TYPE_CHECKING:  # pragma: no cover
    from ..audit import AuditReport
    from .reaudit import ReauditController


class Probation:
    """Decides when a repair on probation is checked and whether it is confirmed (see the
    module docstring).

    Args:
        every: updates between checks (0: no probation; the repair acts at once).
        max_updates: the probation ends unconfirmed after this many updates.
        gap, transplant: the two tests' thresholds.
        others_kept, others_carry: the re-audit's second half (module docstring): below an
            other-class median ratio of ``others_kept`` the gap counts only with a transplant
            difference of at least ``others_carry`` (the defaults, 0: no second half).
        repeat: consecutive checks that must pass before the repair is confirmed (the
            eraser asks 2 of the spectral gain: the mask keeps one more check to win the race,
            and one passing check on a clean teacher is not enough).
        repeat_unsure: the same after an ``unsure`` verdict, when larger than ``repeat`` (0:
            as ``repeat``), unless the passing check's region also carries the suspect (the
            transplant's share over its control at least ``others_carry``, when that is
            above 0): then ``repeat`` suffices. A streak in progress at ``max_updates`` runs
            on, one check every ``every`` updates, until it confirms or a check fails.
        repeat_rival: passing checks in a row needed at least, whatever the verdict, while a
            rival repair with a region of its own is still on probation (the spectral gain beside
            a mask that covers positions: the mask, checked first, keeps its chance to win the
            race); :meth:`check`'s ``rival`` says so (0: no such floor).
        joint: a repair without a region (the spectral gain) also passes a check when both
            of its tests reach this fraction of their thresholds (0: off): the residual
            transplant ``joint * transplant`` and the universal re-audit ``joint *
            universal_gap`` (after its first stage). The record's ``joint`` says it passed so.
        sustain, sustain_checks: a repair without a region also passes a check when, at this
            check and the ``sustain_checks - 1`` before it, the residual moved at least
            ``transplant`` of the other samples and at least ``sustain`` more than its control
            (0: off); the record's ``sustained`` says it passed so.
        searches: the mask's re-audit searches the suspect that many times and uses the
            median (:meth:`~abd_plugin.repair.ReauditController.specificity`).
        controls: random offsets of the transplant's control regions.
        keep: recent teacher batches kept for the transplant test.
        seed: the controls' offsets are drawn from ``seed + update``.
        logits_fn: how to find the logits in the teacher's output.

    Attributes:
        checks: one record per check (``update``, the re-audit's ``target_ratio`` and
            ``control_ratio``, the transplant's ``carried`` and ``carried_control``,
            ``passed``, ``streak`` (passing checks in a row), ``corroborated`` (the mask's
            region also carries the suspect by ``others_carry``), ``joint`` (a repair without a
            region: the check passed on both tests together), ``sustained`` (a repair without
            a region: the check passed on its residual held over ``sustain_checks`` checks),
            ``needed`` (the streak that confirms after this verdict), ``confirmed``,
            ``ended``).
    """

    def __init__(self, *, every: int, max_updates: int, gap: float, transplant: float,
                 universal_gap: float = 4.5, repeat: int = 1, controls: int = 8, keep: int = 4,
                 seed: int = 0, logits_fn: Callable[[Any], Tensor] | None = None,
                 others_kept: float = 0.0, others_carry: float = 0.0,
                 repeat_unsure: int = 0, searches: int = 1, joint: float = 0.0,
                 repeat_rival: int = 0, sustain: float = 0.0, sustain_checks: int = 3) -> None:
        self.joint = float(joint)
        self.sustain, self.sustain_checks = float(sustain), max(1, int(sustain_checks))
        self.repeat_rival = int(repeat_rival)
        self.searches = max(1, int(searches))
        self.repeat = max(1, int(repeat))
        self.repeat_unsure = max(self.repeat, int(repeat_unsure))
        self.every, self.max_updates = int(every), int(max_updates)
        self.gap, self.transplant_margin = float(gap), float(transplant)
        self.others_kept, self.others_carry = float(others_kept), float(others_carry)
        self.universal_gap = float(universal_gap)
        self.controls, self.keep, self.seed = int(controls), int(keep), int(seed)
        self.logits_fn = logits_fn
        self.checks: list[dict[str, Any]] = []
        self._recent: list[Tensor] = []

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def remember(self, x: Tensor, *, copy: bool = True) -> None:
        """Keep a detached copy of a recent teacher batch (the transplant test's samples);
        ``copy=False``: ``x`` is a copy already (shared by two probations)."""
        self._recent = (self._recent + [x.detach().clone() if copy else x])[-self.keep:]

    def forget(self) -> None:
        self._recent = []

    @property
    def ended(self) -> bool:
        """The last check ended the probation (confirmed or not)."""
        return bool(self.checks and self.checks[-1]["ended"])

    def due(self, updates: int, repair: InputRepair) -> bool:
        """A check after update ``updates``: on schedule, with a repair that changes
        something, or at the end of the probation whatever the repair."""
        if (not self.enabled or self.ended
                or (self.checks and self.checks[-1]["update"] == updates)):
            return False
        if self.checks and self.checks[-1]["update"] >= self.max_updates:  # a streak runs on
            return updates >= self.checks[-1]["update"] + self.every
        if updates >= self.max_updates:
            return True
        return updates % self.every == 0 and repair.changed() > 0

    def needed(self, audit: AuditReport, corroborated: bool = False, rival: bool = False
               ) -> int:
        """Passing checks in a row that confirm the repair after ``audit``'s verdict;
        ``corroborated``: the passing check's region also carries the suspect; ``rival``: a
        rival repair with a region is still on probation (``repeat_rival``)."""
        n = self.repeat_unsure if audit.verdict == "unsure" and not corroborated else self.repeat
        return max(n, self.repeat_rival) if rival else n

    def check(self, model: nn.Module, repair: InputRepair, audit: AuditReport, target: int,
              updates: int, controller: ReauditController, *, distributed: bool = False,
              rival: bool = False) -> dict[str, Any]:
        """Run both tests now; returns the record (``confirmed``, and ``ended``: the probation is
        over, confirmed or not). ``distributed``: rank 0 measures, every rank takes the same
        decision. ``rival``: a rival repair with a region is still on probation
        (``repeat_rival``; the record's ``rival``)."""
        rec = None
        if not distributed or _dist.rank() == 0:
            # the transplant first: when it passes, the check passes whatever the re-audit
            # says, so the re-audit (the costly test, seconds) is skipped (NaN fields)
            moved = self._transplant(model, repair, target, updates)
            share = moved["carried"] - moved["carried_control"]  # over the control regions
            carries = share >= self.transplant_margin
            sustained = not repair.has_region and self._sustained(moved)
            if carries or sustained:
                rec = self._skipped(repair, updates)
                passed = False
            elif repair.has_region:
                rec = controller.specificity(model, repair, audit, target, updates,
                                             gap=self.gap, searches=self.searches)
                passed = rec["control_ratio"] - rec["target_ratio"] >= self.gap
                # a mask that lowers every class must also carry the suspect a little
                rec["others_lowered"] = bool(rec["control_ratio"] < self.others_kept)
                if passed and rec["others_lowered"]:
                    passed = share >= self.others_carry
            else:
                rec = self._universal(model, repair, audit, target, updates, controller)
                passed = rec["universal_gap"] >= self.universal_gap
                # both tests part of the way: each clean teacher's checks reached one or the
                # other, never both (module docstring)
                rec["joint"] = bool(not passed and self.joint > 0
                                    and share >= self.joint * self.transplant_margin
                                    and rec["universal_gap"] >= self.joint * self.universal_gap)
                passed = passed or rec["joint"]
            rec["reaudit_skipped"] = carries or sustained
            rec["sustained"] = bool(sustained and not carries)
            rec.update(moved)
            rec["pixels"] = repair.changed()
            rec["passed"] = bool(passed or carries or sustained)
            last = self.checks[-1].get("streak", int(self.checks[-1]["confirmed"])) if (
                self.checks) else 0
            rec["streak"] = last + 1 if rec["passed"] else 0
            rec["corroborated"] = bool(repair.has_region and self.others_carry > 0
                                       and share >= self.others_carry)
            rec["rival"] = bool(rival)
            rec["needed"] = self.needed(audit, rec["corroborated"], rival)
            rec["confirmed"] = rec["streak"] >= rec["needed"]
            rec["ended"] = rec["confirmed"] or (updates >= self.max_updates
                                                and not rec["passed"])
        if distributed:
            rec = _dist.broadcast(rec)
        assert rec is not None
        self.checks.append(rec)
        if rec["ended"]:
            self.forget()
        return rec

    def _sustained(self, moved: dict[str, Any]) -> bool:
        """At this check and the ``sustain_checks - 1`` checks before it, the residual moved at
        least ``transplant`` of the other samples to the suspect and at least ``sustain`` more
        than its control (off when ``sustain`` is 0)."""
        n = self.sustain_checks - 1
        if self.sustain <= 0 or len(self.checks) < n:
            return False
        return all(r["carried"] >= self.transplant_margin
                   and r["carried"] - r["carried_control"] >= self.sustain
                   for r in [*self.checks[len(self.checks) - n:], moved])

    @staticmethod
    def _skipped(repair: InputRepair, updates: int) -> dict[str, Any]:
        """A re-audit's record with nothing measured (its numbers NaN)."""
        nan = float("nan")
        if repair.has_region:
            return {"update": updates, "ratios": [], "target_ratio": nan, "control_ratio": nan,
                    "statistic": [], "p_value": nan}
        return {"update": updates, "universal_gap": nan, "target_drop": nan, "control_drop": nan,
                "joint": False}

    def _universal(self, model: nn.Module, repair: InputRepair, a: AuditReport, t: int,
                   updates: int, controller: ReauditController) -> dict[str, Any]:
        """The audit's universal blend statistic again, on ``model`` seen through ``repair``:
        how far each class's statistic dropped, in units of the first audit's spread among the
        other classes; ``universal_gap`` is the suspect's drop minus the median drop of the
        others (what the same repair does to classes it was not learned for).

        In two stages on one base: the suspect's head first; when its own drop is below half
        of ``universal_gap`` the repair fails without the others' heads (``control_drop`` and
        ``universal_gap`` NaN, ``staged`` True): passing would need the other classes' median
        statistic to *rise* by more than half the gap, which a repair of the suspect's
        shortcut does not do. The check then costs about one head instead of one per class."""
        from .._replica import ViewedModel
        from ..audit import _base, universal_statistic

        out = self._skipped(repair, updates)
        out["staged"] = False
        if a.universal is None:
            return out
        first = torch.tensor(a.universal, dtype=torch.float64)
        k = len(first)
        view = ViewedModel(model, repair.apply)
        shape = tuple(a.input_shape)
        low = torch.tensor(a.input_range[0], dtype=torch.float64)
        high = torch.tensor(a.input_range[1], dtype=torch.float64)
        base = _base(view, shape, k, low, high, seed=controller.seed, logits_fn=self.logits_fn)

        def heads(classes: list[int]) -> Tensor:
            return universal_statistic(view, shape, k, low, high, controller.audit_settings,
                                       seed=controller.seed, logits_fn=self.logits_fn,
                                       base=base, classes=classes)

        others = [c for c in range(k) if c != t]
        sd = max(float(first[others].std()), 1e-6)
        out["target_drop"] = float((first[t] - heads([t])[t]) / sd)
        if out["target_drop"] < self.universal_gap / 2:
            out["staged"] = True
            return out
        drop = (first - heads(others)) / sd
        out["control_drop"] = float(drop[others].median())
        out["universal_gap"] = out["target_drop"] - out["control_drop"]
        return out

    @torch.no_grad()
    def _transplant(self, model: nn.Module, repair: InputRepair, t: int, updates: int
                    ) -> dict[str, Any]:
        out: dict[str, Any] = {"carried": 0.0, "carried_control": 0.0, "n_target": 0,
                               "n_other": 0}
        if not self._recent:
            return out
        x = torch.cat([b.to(self._recent[-1].device) for b in self._recent])
        x = _amp.cast_to_model(model, x)
        with torch.autocast(x.device.type, enabled=False):
            pred = extract_logits(model(x), self.logits_fn).argmax(1)
            ts, os_ = x[pred == t], x[pred != t]
            out.update(n_target=int(len(ts)), n_other=int(len(os_)))
            if not len(ts) or not len(os_):
                return out
            g = torch.Generator().manual_seed(self.seed + 7919 + updates)
            n = min(256, len(os_))
            into, source = os_[:n], ts[torch.randint(len(ts), (n,), generator=g).to(ts.device)]

            def carried(shift: tuple[int, ...], src: Tensor = source) -> float:
                z = extract_logits(model(repair.transplant(into, src, shift)), self.logits_fn)
                return float((z.argmax(1) == t).float().mean())

            if not repair.has_region:  # the control: what it removes from other classes
                other = os_[torch.randint(len(os_), (n,), generator=g).to(os_.device)]
                out["carried"] = carried(())
                out["carried_control"] = carried((), other)
                return out

            sizes = tuple(int(v) for v in (x.shape[2:] if x.dim() >= 3 else x.shape[1:]))
            shifts = [tuple(int(torch.randint(max(1, s // 4), max(2, s - s // 4), (1,),
                                              generator=g)) for s in sizes)
                      for _ in range(self.controls)]
            out["carried"] = carried(())
            out["carried_control"] = max(carried(s) for s in shifts) if shifts else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"probation_checks": [dict(r) for r in self.checks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = [dict(r) for r in state.get("probation_checks", [])]
        self._recent = []


__all__ = ["Probation"]
