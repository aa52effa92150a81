"""The guard's report as loggable numbers (``integrations/_metrics.py``): names from the records,
only finite numbers, the audit's figures once, and reading them runs no model."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from abd_fakes.common import TinyNet
from abd_plugin import ABDGuard, DefenseHook, GuardReport, HookReport
from abd_plugin.eraser import EraserReport
from abd_plugin.gradient_alignment import AlignmentReport
from abd_plugin.hooks import OffReport
from abd_plugin.integrations._metrics import (
    MetricsFeed,
    format_metrics,
    live_report,
    record_metrics,
    report_metrics,
)

#: a small audit, and the eraser on for class 0 from the first batch
ERASE = dict(target=0, audit_steps=5, audit_starts=2, erase_every=1, erase_recheck=0)


@dataclasses.dataclass
class CountReport(HookReport):
    batches: int = 0
    ratio: float = float("nan")
    label: str = "x"
    history: list = dataclasses.field(default_factory=list)
    flag: bool = True


class Counting(DefenseHook):
    """A user's hook with a record of its own."""

    name = "counting"

    def __init__(self):
        self.batches = 0

    def on_teacher_input(self, ctx, x):
        self.batches += 1

    def report(self):
        return CountReport(batches=self.batches)


class Plain(DefenseHook):
    """A user's hook that reports a plain dict."""

    name = "plain"

    def report(self):
        return {"loss": torch.tensor(0.25), "n": 3, "bad": float("nan"), "word": "w",
                "by": {"a": 1.5, "b": "no"}, "vec": torch.ones(2)}


def _distil(guard, teacher, student, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        with torch.no_grad():
            t = teacher(x)
        loss = F.kl_div(F.log_softmax(student(x), 1), F.softmax(t, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()


def _forward_counter(*models):
    calls = [0]
    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for model in models for m in model.modules()]
    return calls, handles


def test_names_come_from_the_records():
    torch.manual_seed(0)
    teacher, student = TinyNet().eval(), TinyNet()
    with ABDGuard(teacher, student, hooks=[Counting(), Plain()], **ERASE) as guard:
        before = report_metrics(guard.report())
        _distil(guard, teacher, student)
        report = guard.report()
    assert before == {"abd/erase/on": 0.0, "abd/erase/probation": 0.0,
                      "abd/erase/pixels": 0.0, "abd/erase/mass": 0.0,
                      "abd/erase/fraction": 0.0, "abd/erase/updates": 0.0,
                      "abd/erase/batches": 0.0, "abd/erase/price": 2.5,
                      "abd/erase/rechecks": 0.0, "abd/erase/coefficients": 0.0,
                      "abd/erase/rescaled": 0.0, "abd/erase/rescaled_rows": 0.0,
                      "abd/erase/raw_rows": 0.0, "abd/Counting/batches": 0.0,
                      "abd/Counting/flag": 1.0, "abd/Plain/loss": 0.25, "abd/Plain/n": 3.0,
                      "abd/Plain/by/a": 1.5}  # the audit has not run: no abd/audit/, no NaN
    m = report_metrics(report)
    a, e = report.audit.audit, report.get(EraserReport)
    assert m["abd/audit/p_value"] == a.p_value and m["abd/audit/z_score"] == a.z_score
    assert m["abd/audit/suspect"] == a.suspect
    assert m["abd/audit/statistic"] == a.statistic[a.suspect]
    assert m["abd/audit/verdict"] == {"clean": 0, "unsure": 1, "poisoned": 2}[a.verdict]
    assert m["abd/audit/poisoned"] == float(a.verdict == "poisoned")
    assert m["abd/audit/ensemble_class"] == report.audit.ensemble_class
    assert ("abd/audit/target" in m) == (a.target is not None)
    for name in ("fraction", "pixels", "mass", "flip", "kept", "updates", "batches", "price",
                 "target", "target_fraction"):
        assert m[f"abd/erase/{name}"] == float(getattr(e, name)), name
    assert m["abd/erase/on"] == 1.0 and m["abd/erase/updates"] == 3
    assert m["abd/Counting/batches"] == 3.0  # a user's record: its numeric fields
    assert not any(k.startswith(("abd/sv", "abd/sr", "abd/iga")) for k in m)  # off: nothing
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert not any(k.endswith("seconds") and k != "abd/audit/seconds" for k in m)


def test_only_finite_numbers():
    rec = CountReport(batches=2, ratio=float("inf"))
    assert record_metrics(rec, "abd/c") == {"abd/c/batches": 2.0, "abd/c/flag": 1.0}
    assert record_metrics(EraserReport(), "abd/erase")["abd/erase/on"] == 0.0
    assert "abd/erase/flip" not in record_metrics(EraserReport(), "abd/erase")  # NaN: no data
    assert format_metrics({"abd/x": 0.123456789, "abd/y": 2.0}) == "abd/x: 0.123457  abd/y: 2"


def test_names_by_record_type():
    report = GuardReport(records={
        "TeacherAudit": OffReport(name="TeacherAudit", line="off"),
        "InputGradientAlignment": AlignmentReport(steps=2, last_loss=0.5, last_grad_norm=1.0,
                                                  align_seconds=3.0, seconds=4.0),
        "TriggerEraser": EraserReport(status="on", target=3, fraction=0.1, flip=0.9,
                                      rechecks=[{"p_value": 0.3, "stands_out": False}]),
        "MyEraser": EraserReport(status="off-clean"),  # a second record of a built-in type
    })
    assert report_metrics(report) == {
        "abd/iga/steps": 2.0, "abd/iga/last_loss": 0.5, "abd/iga/last_grad_norm": 1.0,
        "abd/erase/on": 1.0, "abd/erase/probation": 0.0, "abd/erase/target": 3.0,
        "abd/erase/pixels": 0.0,
        "abd/erase/mass": 0.0, "abd/erase/fraction": 0.1, "abd/erase/updates": 0.0,
        "abd/erase/batches": 0.0, "abd/erase/flip": 0.9, "abd/erase/rechecks": 1.0,
        "abd/erase/recheck_p_value": 0.3, "abd/erase/recheck_stands_out": 0.0,
        "abd/MyEraser/on": 0.0, "abd/MyEraser/probation": 0.0, "abd/MyEraser/pixels": 0.0,
        "abd/MyEraser/mass": 0.0,
        "abd/MyEraser/fraction": 0.0, "abd/MyEraser/updates": 0.0, "abd/MyEraser/batches": 0.0,
        "abd/MyEraser/rechecks": 0.0, "abd/erase/coefficients": 0.0,
        "abd/MyEraser/coefficients": 0.0, "abd/erase/rescaled": 0.0,
        "abd/MyEraser/rescaled": 0.0, "abd/erase/rescaled_rows": 0.0,
        "abd/erase/raw_rows": 0.0, "abd/MyEraser/rescaled_rows": 0.0,
        "abd/MyEraser/raw_rows": 0.0}
    # a probation's last check: its two contrasts
    rec = EraserReport(status="probation", probation_checks=2, confirmation={
        "control_ratio": 0.9, "target_ratio": 0.8, "carried": 0.25, "carried_control": 0.05})
    m = record_metrics(rec, "abd/erase")
    assert m["abd/erase/probation"] == 1.0 and m["abd/erase/probation_checks"] == 2.0
    assert m["abd/erase/confirm_gap"] == pytest.approx(0.1)
    assert m["abd/erase/confirm_transplant"] == pytest.approx(0.2)


def test_sv_sr_figures_when_on():
    torch.manual_seed(0)
    teacher, student = TinyNet().eval(), TinyNet()
    cfg = dict(audit=False, erase=False, sv=True, sr=True, verify=False, shuffle_layers=1,
               n_shuffle_models=2, sr_start_step=0, sr_inner_rounds=1, sr_fixed_point_iters=1)
    with ABDGuard(teacher, student, **cfg) as guard:
        _distil(guard, teacher, student, steps=2)
        m = report_metrics(guard.report())
    assert m["abd/sv/enabled"] == 1.0 and m["abd/sv/coef"] > 0 and "abd/sv/trials" in m
    assert m["abd/sr/steps"] == 2.0 and m["abd/sr/start"] == 0.0
    assert math.isfinite(m["abd/sr/last_grad_norm"])
    assert not any(k.startswith(("abd/audit", "abd/erase")) for k in m)


def test_live_report_matches_and_runs_no_model():
    torch.manual_seed(0)
    teacher, student = TinyNet().eval(), TinyNet()
    with ABDGuard(teacher, student, hooks=[Counting()], **ERASE) as guard:
        _distil(guard, teacher, student)
        replica = guard._replica.module
        hooks = sum(len(m._forward_pre_hooks) for m in replica.modules())
        calls, handles = _forward_counter(teacher, student, replica)
        state = str(guard.state_dict())
        try:
            live = report_metrics(live_report(guard))
            feed = MetricsFeed(guard)
            first, second = feed.take(), feed.take()
        finally:
            for h in handles:
                h.remove()
        assert calls == [0] and guard.step == 3 and str(guard.state_dict()) == state
        assert sum(len(m._forward_pre_hooks) for m in replica.modules()) == hooks  # none left
        full = report_metrics(guard.report())  # adds the shuffled ensemble's class
    assert {k: v for k, v in full.items() if k not in ("abd/audit/ensemble_class",
                                                      "abd/audit/agree")} == live
    assert first == live  # the audit's figures the first time
    assert second == {k: v for k, v in live.items() if not k.startswith("abd/audit/")}


def test_feed_audit_once_then_reset():
    torch.manual_seed(0)
    teacher, student = TinyNet().eval(), TinyNet()
    with ABDGuard(teacher, student, **ERASE) as guard:
        feed = MetricsFeed(guard)
        assert not feed.audit_pending() and feed.take(rest=False) == {}
        _distil(guard, teacher, student, steps=1)
        assert feed.audit_pending()
        audit, others = feed.take_parts(rest=False)
        assert set(audit) >= {"abd/audit/p_value", "abd/audit/verdict"} and others == {}
        assert not feed.audit_pending() and feed.take(rest=False) == {}
        feed.reset()
        assert feed.take(rest=False) == audit


def test_prefix_and_no_audit():
    torch.manual_seed(0)
    teacher, student = TinyNet().eval(), TinyNet()
    with ABDGuard(teacher, student, audit=False, target=0) as guard:
        m = report_metrics(guard.report(), "guard")
    assert m and all(k.startswith("guard/erase/") for k in m)
