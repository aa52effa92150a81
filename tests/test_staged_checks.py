"""The probation's re-audits start with the suspect: when the repair did not take at least half
the needed gap off the suspect's own statistic, the check fails there, without searching (or
training heads for) the other classes; otherwise every class is measured as before."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from abd_plugin.audit import AuditSettings, audit
from abd_plugin.repair import Probation, ReauditController
from abd_plugin.universal import universal_blend_statistic
from abd_testutils import _blend_digits_cnn, _poisoned_digits_cnn

SHAPE = (1, 16, 16)
SETTINGS = AuditSettings(steps=40, starts=4, universal_steps=30)


class _View:
    """A stand-in repair: ``apply`` is ``fn``."""

    ready = True

    def __init__(self, fn, *, region: bool = True) -> None:
        self.fn, self.has_region = fn, region

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def changed(self) -> int:
        return 9


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _erase_corner(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., -3:, -3:] = 0.0
    return x


def test_a_subset_of_universal_heads_is_what_the_full_run_gives_when_every_class_is_asked():
    model = _frozen(_poisoned_digits_cnn()[0])
    lo, hi = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    full = universal_blend_statistic(model, SHAPE, 10, lo, hi, steps=10)
    assert torch.equal(full, universal_blend_statistic(model, SHAPE, 10, lo, hi, steps=10,
                                                       classes=range(10)))
    one = universal_blend_statistic(model, SHAPE, 10, lo, hi, steps=10, classes=[4])
    assert math.isfinite(float(one[4])) and bool(torch.isnan(one[torch.arange(10) != 4]).all())
    for bad in ([], [10], [-1]):
        with pytest.raises(ValueError, match="classes must be non-empty"):
            universal_blend_statistic(model, SHAPE, 10, lo, hi, steps=1, classes=bad)


def test_the_every_class_re_audit_stops_at_a_suspect_whose_margin_did_not_fall():
    model = _frozen(_poisoned_digits_cnn()[0])
    a = audit(model, SHAPE, settings=SETTINGS)
    assert a.suspect == 0
    ctl = ReauditController(every=0, price=2.5, price_low=1.0, audit_settings=SETTINGS)
    searched: list[list[int] | None] = []
    real = ctl._repaired_statistic

    def spy(model, repair, a, classes, seed):  # noqa: ANN001, ANN202
        searched.append(None if classes is None else list(classes))
        return real(model, repair, a, classes, seed)

    ctl._repaired_statistic = spy  # type: ignore[method-assign]
    nothing = _View(lambda x: x)
    rec = ctl.specificity(model, nothing, a, 0, 20, gap=0.17)
    assert rec["staged"] and searched == [[0]]
    assert rec["target_ratio"] > 1 - 0.17 / 2
    assert math.isnan(rec["control_ratio"]) and math.isnan(rec["p_value"])
    assert sum(not math.isnan(r) for r in rec["ratios"]) == 1

    searched.clear()  # without a gap (the re-audit's old contract): every class, no stop
    rec = ctl.specificity(model, nothing, a, 0, 20)
    assert not rec["staged"] and searched == [[0], list(range(1, 10))]
    assert all(math.isfinite(r) for r in rec["ratios"]) and math.isfinite(rec["p_value"])

    searched.clear()  # the trigger's corner erased: the suspect's margin falls, all measured
    rec = ctl.specificity(model, _View(_erase_corner), a, 0, 20, gap=0.17)
    assert rec["target_ratio"] <= 1 - 0.17 / 2
    assert not rec["staged"] and searched == [[0], list(range(1, 10))]
    assert all(math.isfinite(r) for r in rec["ratios"]) and math.isfinite(rec["control_ratio"])


def test_the_universal_re_audit_trains_one_head_when_the_suspects_drop_is_small(monkeypatch):
    teacher, _, _, _ = _blend_digits_cnn()
    model = _frozen(teacher)
    a = audit(model, SHAPE, settings=SETTINGS)
    t = a.suspect
    ctl = ReauditController(every=0, price=2.5, price_low=1.0, audit_settings=SETTINGS)
    pr = Probation(every=1, max_updates=10, gap=0.17, transplant=0.5, universal_gap=4.5)
    import abd_plugin.audit as audit_mod

    asked: list[list[int] | None] = []
    real = audit_mod.universal_statistic

    def spy(*args, classes=None, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        asked.append(None if classes is None else list(classes))
        return real(*args, classes=classes, **kw)

    monkeypatch.setattr(audit_mod, "universal_statistic", spy)
    rec = pr._universal(model, _View(lambda x: x, region=False), a, t, 20, ctl)
    assert rec["staged"] and asked == [[t]]
    assert rec["target_drop"] < 4.5 / 2
    assert math.isnan(rec["control_drop"]) and math.isnan(rec["universal_gap"])

    asked.clear()  # inverted inputs lower the suspect's statistic by more than half of a
    # smaller gap: every class is measured
    pr = Probation(every=1, max_updates=10, gap=0.17, transplant=0.5, universal_gap=1.0)
    rec = pr._universal(model, _View(lambda x: 1.0 - x, region=False), a, t, 20, ctl)
    assert not rec["staged"] and asked == [[t], [c for c in range(10) if c != t]]
    assert rec["target_drop"] >= 1.0 / 2 and math.isfinite(rec["control_drop"])
    assert rec["universal_gap"] == pytest.approx(rec["target_drop"] - rec["control_drop"])


def test_the_suspect_can_be_searched_several_times_and_its_median_counts(monkeypatch):
    """``searches``: the suspect's repaired statistic is the median of that many searches from
    other random starts (the gap's noise is mostly the suspect's own search); 1: one search,
    the check's own seed."""
    k, t = 4, 2
    a = type("A", (), {"statistic": [1.0] * k, "input_shape": SHAPE, "input_range": (0.0, 1.0),
                       "alpha": 0.05})()
    ctl = ReauditController(every=0, price=2.5, price_low=1.0, audit_settings=SETTINGS, seed=3)
    base = 3 + 1000 + 20  # the check's own seed at update 20
    values = {base: 0.5, base + 7919: 0.9, base + 2 * 7919: 0.7, base + 3 * 7919: 0.2,
              base + 4 * 7919: 0.8}
    asked: list[int] = []

    def fake(model, repair, a_, classes, seed):  # noqa: ANN001, ANN202
        asked.append(seed)
        out = torch.ones(k, dtype=torch.float64)
        if classes == [t]:
            out[t] = values[seed]
        return out

    monkeypatch.setattr(ctl, "_repaired_statistic", fake)
    view = _View(lambda x: x)
    for searches, ratio in ((1, 0.5), (3, 0.7), (5, 0.7)):
        asked.clear()
        rec = ctl.specificity(None, view, a, t, 20, gap=0.17, searches=searches)  # type: ignore
        assert rec["target_ratio"] == pytest.approx(ratio)
        assert asked[:searches] == [base + 7919 * j for j in range(searches)]
        assert rec["control_ratio"] == pytest.approx(1.0)  # the others: one search, as before
    # the probation passes its setting on, and the eraser its own
    seen: dict = {}

    class Spy:
        def specificity(self, *args, **kw):  # noqa: ANN002, ANN003, ANN202
            seen.update(kw)
            return {"update": 20, "ratios": [], "target_ratio": 0.7, "control_ratio": 1.0,
                    "statistic": [], "p_value": 0.5}

    pr = Probation(every=1, max_updates=10, gap=0.17, transplant=0.5, searches=5)
    pr.check(None, view, type("V", (), {"verdict": "poisoned"})(), t, 20, Spy())  # type: ignore
    assert seen["searches"] == 5
    from abd_plugin.eraser import EraseSettings, TriggerEraser
    assert TriggerEraser(torch.nn.Linear(2, 2), EraseSettings(confirm_searches=3)
                         ).probation.searches == 3
