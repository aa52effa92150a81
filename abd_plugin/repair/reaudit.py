"""Checking a repair against the audit, and widening it when it misses part of the trigger."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import _dist
from .._replica import ViewedModel
from .base import InputRepair

if TYPE_CHECKING:  # pragma: no cover
    from ..audit import AuditReport, AuditSettings


class ReauditController:
    """Every ``every`` repair updates (the first check after ``2 * every``, once the repair has
    settled) the controller runs the audit's margin search for the target class alone on the
    *repaired* teacher and compares the target's statistic with the other classes' statistics
    from the first audit. A repair that covers the trigger brings the target back among the
    others; one that covers only part of a spread trigger leaves it an outlier (p below the
    audit's ``alpha``): the price then drops to ``price_low`` so the repair can grow, and the
    checks stop. They also stop after two checks in a row find the target back among the others.

    Args:
        every: updates between checks (0: never check).
        price, price_low: the repair's price before and after a check finds the target still
            standing out.
        audit_settings: how hard the margin search works (the audit's own settings).
        seed: the checks' random starts are drawn from ``seed + 1 + checks so far``.
        logits_fn: how to find the logits in the teacher's output.

    Attributes:
        price: the price now.
        rechecks: one record per check: ``update``, ``statistic``, ``p_value``, ``stands_out``,
            ``price`` (after the check).
    """

    def __init__(self, *, every: int, price: float, price_low: float,
                 audit_settings: AuditSettings, seed: int = 0,
                 logits_fn: Callable[[Any], Tensor] | None = None) -> None:
        self.every = int(every)
        self.price = float(price)
        self.price_low = float(price_low)
        self.audit_settings = audit_settings
        self.seed = int(seed)
        self.logits_fn = logits_fn
        self.rechecks: list[dict[str, Any]] = []

    def done(self) -> bool:
        """No more checks: the price was lowered, or the last two found the target back among
        the other classes (the repair covers the trigger, and its price does not change)."""
        last = self.rechecks[-2:]
        return (self.price <= self.price_low
                or (len(last) == 2 and not any(r["stands_out"] for r in last)))

    def due(self, updates: int, audit: AuditReport | None) -> bool:
        """Whether a check runs after update number ``updates``."""
        return (self.every > 0 and updates >= 2 * self.every and updates % self.every == 0
                and audit is not None and not self.done()
                and (not self.rechecks or self.rechecks[-1]["update"] != updates))

    def check(self, model: nn.Module, repair: InputRepair, audit: AuditReport | None,
              target: int | None, updates: int, *, distributed: bool = False
              ) -> dict[str, Any] | None:
        """Re-audit ``model`` seen through ``repair`` for ``target``; lower the price when the
        target still stands out. Returns the check's record, or None when there is nothing to
        compare with (no audit, no repair yet). ``distributed``: every data-parallel rank calls
        it at the same update; rank 0 checks and every rank takes its decision."""
        a, t = audit, target
        if a is None or t is None or not repair.ready or len(a.statistic) < 3:
            return None
        rec = None
        if not distributed or _dist.rank() == 0:
            rec = self._measure(model, repair, a, t, updates)
        if distributed:
            rec = _dist.broadcast(rec)
        assert rec is not None
        if rec["stands_out"] and self.price > self.price_low:
            self.price = self.price_low
        rec["price"] = self.price
        self.rechecks.append(rec)
        return rec

    def _repaired_statistic(self, model: nn.Module, repair: InputRepair, a: AuditReport,
                            classes: list[int] | None, seed: int) -> Tensor:
        """The audit's margin search (its settings) on ``model`` seen through ``repair``."""
        from ..audit import max_margin_statistic

        return max_margin_statistic(ViewedModel(model, repair.apply), a.input_shape,
                                    len(a.statistic), input_range=a.input_range,
                                    settings=self.audit_settings, logits_fn=self.logits_fn,
                                    classes=classes, seed=seed)

    def _measure(self, model: nn.Module, repair: InputRepair, a: AuditReport, t: int,
                 updates: int) -> dict[str, Any]:
        from ..audit import order_pvalues

        stat = self._repaired_statistic(model, repair, a, [t], self.seed + 1 + len(self.rechecks))
        mixed = torch.tensor(a.statistic, dtype=torch.float64)
        mixed[t] = stat[t]
        p = float(order_pvalues(mixed)[t])
        return {"update": updates, "statistic": float(stat[t]), "p_value": p,
                "stands_out": p < a.alpha, "price": self.price}

    def specificity(self, model: nn.Module, repair: InputRepair, a: AuditReport, t: int,
                    updates: int, *, gap: float | None = None, searches: int = 1
                    ) -> dict[str, Any]:
        """How specifically ``repair`` takes class ``t``'s shortcut away: the audit's margin
        search for *every* class on ``model`` seen through the repair, compared class by class
        with the first audit's statistics. Returns ``ratios`` (per class, repaired statistic /
        first statistic), ``target_ratio``, ``control_ratio`` (the median ratio among the
        other classes: what the same repair does to classes it was not learned for),
        ``statistic`` (the repaired statistics) and ``p_value`` (the target's, against the
        repaired statistics of the other classes). The caller shares the record over ranks
        (:class:`~abd_plugin.repair.Probation`).

        The suspect is searched first, the other classes after it. With ``gap`` (the
        probation's test: ``control_ratio - target_ratio >= gap``), a suspect that kept more
        than ``1 - gap / 2`` of its margin ends the check there (``staged`` True; the other
        classes' ratios, ``control_ratio`` and ``p_value`` NaN): passing would need the other
        classes' median margin to *grow* by more than half the gap, which a mask over the
        suspect's trigger does not do. A check then costs one class's search, not K.

        ``searches``: the suspect is searched that many times, from other random starts, and
        its median statistic counts (the gap's noise is mostly the suspect's own search: the
        other classes' ratios enter through their median already). 1: one search."""
        from ..audit import order_pvalues

        k = len(a.statistic)
        seed = self.seed + 1000 + updates
        first = torch.tensor(a.statistic, dtype=torch.float64)
        stat = self._repaired_statistic(model, repair, a, [t], seed)
        if searches > 1:
            more = [self._repaired_statistic(model, repair, a, [t], seed + 7919 * j)[t]
                    for j in range(1, searches)]
            stat[t] = torch.stack([stat[t], *more]).median()
        # margins are positive after the search; a class the search could not lift above 0
        # counts with a floor of 1e-3 so ratios stay finite and ordered
        r_t = float(stat[t].clamp_min(1e-3) / first[t].clamp_min(1e-3))
        staged = gap is not None and r_t > 1 - gap / 2
        others = [c for c in range(k) if c != t]
        nan = float("nan")
        if staged:
            st, stat = stat[t], torch.full((k,), nan, dtype=torch.float64)
            stat[t] = st
            ratios = torch.full((k,), nan, dtype=torch.float64)
            ratios[t] = r_t
            control, p = nan, nan
        else:
            rest = self._repaired_statistic(model, repair, a, others, seed + 1)
            rest[t] = stat[t]
            stat = rest
            ratios = stat.clamp_min(1e-3) / first.clamp_min(1e-3)
            control = float(ratios[others].median())
            p = float(order_pvalues(stat)[t])
        return {"update": updates, "ratios": [float(r) for r in ratios],
                "target_ratio": r_t, "control_ratio": control,
                "statistic": [float(v) for v in stat], "p_value": p, "staged": staged}

    def state_dict(self) -> dict[str, Any]:
        return {"price": self.price, "rechecks": [dict(r) for r in self.rechecks]}

    def load_state_dict(self, state: dict[str, Any], default_price: float) -> None:
        # states saved before the re-audit existed resume at the configured price
        self.price = float(state.get("price", default_price))
        self.rechecks = [dict(r) for r in state.get("rechecks", [])]
