"""The gate: a mask learned on an audit's suspicion acts only once it has shown, on the teacher
itself, that it takes that class's shortcut away and nothing else (the eraser's probation).
A clean teacher wrongly suspected keeps a bit-identical run; a planted shortcut is confirmed."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDConfig, ABDGuard, ABDWarning
from abd_plugin.eraser import EraserReport
from abd_testutils import (
    _blend_digits_cnn,
    _clean_digits_cnn,
    _poisoned_digits_cnn,
    blend_noise,
    record_of,
    stamp,
)

#: small, fast audits (the toy CNN is on 16x16 digits); a mask update per batch, checks every
#: 10 updates, the probation over after 40
FAST = dict(audit_steps=40, audit_starts=4, audit_universal_steps=30, erase_every=1,
            erase_confirm=10, erase_confirm_max=40)
STEPS = 48


def _distill(teacher: nn.Module, xs: torch.Tensor, guard_cfg: ABDConfig | None,
             stamped: bool, steps: int = STEPS, trigger=stamp, at_end=None, l1: bool = False,
             seed: int = 0, hidden: int = 0):
    """A small KD loop on fixed batches (half stamped when ``stamped``), KL on the logits (an
    L1 with ``l1``); returns the student and the guard's report (None without a guard).
    ``at_end(guard)`` runs inside the guard after the last step. ``seed`` seeds the student and
    the batches; ``hidden`` > 0 puts a hidden linear layer with a ReLU before the student's
    logits (as in a LeNet's head)."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                            nn.Flatten())
    student.extend([nn.Linear(128, hidden), nn.ReLU(), nn.Linear(hidden, 10)] if hidden else
                   [nn.Linear(128, 10)])
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed + 1)

    def run() -> None:
        for _ in range(steps):
            x = xs[torch.randint(len(xs), (32,), generator=g)]
            if stamped:
                x[:16] = trigger(x[:16])
            with torch.no_grad():
                t = teacher(x)
            loss = (F.l1_loss(student(x), t) if l1 else
                    F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(t, 1),
                             log_target=True, reduction="batchmean"))
            opt.zero_grad()
            loss.backward()
            opt.step()

    if guard_cfg is None:
        run()
        return student, None
    with ABDGuard(teacher, student, config=guard_cfg) as guard:
        run()
        if at_end is not None:
            at_end(guard)
    return student, guard.report()


def test_a_clean_teacher_wrongly_suspected_keeps_a_bit_identical_run():
    teacher, xte, _ = _clean_digits_cnn()
    # the default gate: on this clean BatchNorm CNN both audit statistics favour class 8 (an
    # "8" is easy to reach from anywhere), so the audit flags it, as it does some clean
    # LeNet-5-BN teachers
    cfg = ABDConfig(**FAST)
    s_guard, rep = _distill(teacher, xte, cfg, stamped=False)
    assert rep is not None and rep.audit is not None and rep.audit.audit is not None
    assert rep.audit.audit.verdict != "clean" and rep.audit.audit.suspect == 8
    s_plain, _ = _distill(teacher, xte, None, stamped=False)
    er = record_of(rep, EraserReport)
    assert er.status == "off-unconfirmed", er.reason
    assert er.confirmation is not None and not er.confirmation["confirmed"]
    assert er.confirmation["update"] == 40 and er.batches == 0  # learned, never erased
    # the default calls this clean teacher poisoned: the unrepaired verdict is said, with
    # the possibility that the verdict is wrong (an `unsure` one would be quiet)
    assert rep.audit.audit.verdict == "poisoned" and len(er.warnings) == 1
    assert "either the verdict is wrong" in er.warnings[0] and er.warnings[0] in str(rep)
    for a, b in zip(s_guard.state_dict().values(), s_plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert "not confirmed" in str(rep)


def test_a_planted_shortcut_is_confirmed_and_then_erased():
    teacher, xte, yte = _poisoned_digits_cnn()
    cfg = ABDConfig(**FAST)
    _, rep = _distill(teacher, xte, cfg, stamped=True)
    er = record_of(rep, EraserReport)
    assert rep.audit is not None and rep.audit.audit is not None
    assert rep.audit.audit.suspect == 0
    assert er.status == "on" and er.target == 0 and er.family == "mask", er.reason
    conf = er.confirmation
    assert conf is not None and conf["confirmed"] and conf["update"] < 40
    # a patch that works anywhere under the CNN's pooling: the margin search rebuilds it away
    # from the mask, but the masked region of the stamped samples carries class 0
    assert conf["carried"] - conf["carried_control"] >= 0.5
    # the transplant decided the check: the every-class re-audit (seconds) was not run
    assert conf["reaudit_skipped"] and conf["target_ratio"] != conf["target_ratio"]
    assert "was not needed" in er.reason
    # erased from the batch whose update confirmed it on
    assert er.batches == STEPS - conf["update"] + 1 and "confirmed" in er.reason


def test_a_confirmed_mask_learns_on_every_every_on_th_batch_once_it_acts():
    teacher, xte, _ = _poisoned_digits_cnn()
    reps = {k: _distill(teacher, xte, ABDConfig(**FAST, erase_every_on=k), stamped=True)[1]
            for k in (1, 2, 3)}
    ers = {k: record_of(r, EraserReport) for k, r in reps.items()}
    conf = ers[1].confirmation
    assert conf is not None and conf["confirmed"]
    after = STEPS - conf["update"]  # learning batches after the confirming one
    for k, er in ers.items():
        assert er.status == "on" and er.family == "mask"
        # the same probation whatever every_on (NaN-aware: the skipped re-audit's fields)
        assert json.dumps(er.confirmation, sort_keys=True) == json.dumps(conf, sort_keys=True)
        assert er.batches == after + 1  # erased from the confirming batch on, every batch
        assert er.updates == conf["update"] + (after + k - 1) // k


def test_a_poisoned_verdict_on_a_clean_teacher_waits_too_unless_told_not_to():
    teacher, xte, _ = _clean_digits_cnn()
    # audit_alpha=0.5: the margin statistic's p for class 8 (about 0.1) counts as significant
    # and the universal statistic agrees: the verdict is "poisoned", wrongly
    cfg = ABDConfig(**FAST, audit_alpha=0.5, audit_clean_alpha=0.5)
    with pytest.warns(ABDWarning, match="no repair was confirmed"):
        s_guard, rep = _distill(teacher, xte, cfg, stamped=False)
    s_plain, _ = _distill(teacher, xte, None, stamped=False)
    assert rep is not None and rep.audit is not None and rep.audit.audit is not None
    assert rep.audit.audit.verdict == "poisoned"
    er = record_of(rep, EraserReport)
    assert er.status == "off-unconfirmed" and er.batches == 0, er.reason
    # a poisoned verdict left unrepaired is said loudly: a warning and the report's last lines
    assert [w for w in rep.warnings if "poisoned towards class 8" in w] == er.warnings
    assert "WARNING: the audit called the teacher poisoned" in str(rep)
    for a, b in zip(s_guard.state_dict().values(), s_plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # erase_confirm_poisoned="never": the mask acts from the first batch, unchecked
    _, rep2 = _distill(teacher, xte, ABDConfig(**FAST, audit_alpha=0.5, audit_clean_alpha=0.5,
                                               erase_confirm_poisoned="never"), stamped=False)
    er2 = record_of(rep2, EraserReport)
    assert er2.status == "on" and er2.batches == STEPS and er2.confirmation is None


def test_probation_state_survives_a_save_and_resume():
    teacher, xte, _ = _poisoned_digits_cnn()
    student = nn.Linear(4, 4)
    cfg = ABDConfig(**{**FAST, "erase_confirm": 10, "erase_confirm_max": 50,
                       "erase_confirm_gap": 10.0, "erase_confirm_transplant": 1.0,
                       "erase_confirm_residual": 1.0, "erase_confirm_universal": 1e6})
    g = torch.Generator().manual_seed(0)

    def feed(n: int) -> None:
        for _ in range(n):
            x = xte[torch.randint(len(xte), (32,), generator=g)]
            x[:16] = stamp(x[:16])
            teacher(x)

    with ABDGuard(teacher, student, config=cfg) as guard, torch.no_grad():
        feed(30)
        state = guard.state_dict()
    er = guard.eraser
    assert er is not None and er.status.value == "probation" and er.updates == 30
    checks = [dict(c) for c in er.probation.checks]
    assert len(checks) >= 1 and not checks[-1]["confirmed"]  # unreachable thresholds
    g2 = ABDGuard(teacher, student, config=cfg)
    g2.load_state_dict(state)
    er2 = g2.eraser
    assert er2 is not None and er2.status.value == "probation"
    assert er2.updates == 30 and er2.target == er.target and er2.probation.checks == checks
    assert er2.spectral_probation.checks == er.spectral_probation.checks
    assert torch.equal(er2.spectral.apply(xte[:4]), er.spectral.apply(xte[:4]))
    with g2, torch.no_grad():  # the resumed probation goes on checking on schedule
        feed(10)
    assert er2.probation.checks[-1]["update"] == 40
    assert er2.spectral_probation.checks[-1]["update"] == 40
    assert "on probation" in str(guard.report())


def _asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger, target: int) -> float:
    with torch.no_grad():
        keep = y != target
        return float((model(trigger(x[keep])).argmax(1) == target).float().mean())


def test_the_bare_default_un_blends_a_blend_teacher_with_the_spectral_gain():
    """A trigger spread over the whole input (a fixed noise image mixed in at 0.2): the audit
    names its target, no sparse mask takes it away, the spectral gain learned beside the mask
    is confirmed on probation and acts; the student learns far less of the backdoor than the
    unguarded one."""
    teacher, xte, yte, trig = _blend_digits_cnn()
    assert trig is blend_noise
    s_guard, rep = _distill(teacher, xte, ABDConfig(**FAST), stamped=True, trigger=trig)
    s_plain, _ = _distill(teacher, xte, None, stamped=True, trigger=trig)
    assert rep is not None and rep.audit is not None and rep.audit.audit is not None
    assert rep.audit.audit.suspect == 3 and rep.audit.audit.verdict != "clean"
    er = record_of(rep, EraserReport)
    assert er.status == "on" and er.family == "spectral" and er.target == 3, er.reason
    conf = er.spectral_confirmation
    assert conf is not None and conf["confirmed"] and conf["update"] <= 40
    # after a poisoned verdict, with no mask region racing it, one passing check acts
    # (erase_confirm_spectral = 1); two with the setting at 2, as before it existed
    assert rep.audit.audit.verdict == "poisoned"
    assert conf["streak"] == conf["needed"] == 1 and not conf["rival"]
    _, rep2 = _distill(teacher, xte, ABDConfig(**FAST, erase_confirm_spectral=2),
                       stamped=True, trigger=trig)
    conf2 = record_of(rep2, EraserReport).spectral_confirmation
    assert conf2 is not None and conf2["confirmed"] and conf2["streak"] == conf2["needed"] == 2
    assert conf2["update"] > conf["update"]
    assert er.batches == STEPS - conf["update"] + 1
    assert "spectral gain" in str(rep)
    # once it acts, the gain learns on every second of its learning batches (the default
    # spectral_every_on = 2): the batches after the confirming one, halved
    after = STEPS - conf["update"]
    assert er.updates == conf["update"] + (after + 1) // 2
    # a KL loss: the loop gets the view's own logits (the raw scale is for value losses)
    assert er.rescaled == 0 and "raw teacher's scale" not in str(rep)
    plain, guarded = _asr(s_plain, xte, yte, trig, 3), _asr(s_guard, xte, yte, trig, 3)
    print(f"student ASR unguarded {plain:.3f} guarded {guarded:.3f}")
    assert plain >= 0.5 and guarded <= plain - 0.3
    _, rep1 = _distill(teacher, xte, ABDConfig(**FAST, erase_spectral_every_on=1),
                       stamped=True, trigger=trig)
    er1 = record_of(rep1, EraserReport)
    # NaN-aware: a check the residual test passed skips the universal re-audit (NaN fields)
    assert json.dumps(er1.spectral_confirmation, sort_keys=True) == json.dumps(conf,
                                                                               sort_keys=True)
    # every batch after the confirming one, less those the learner skips (no class-3 sample, or
    # under 5 % others: how many depends on the machine's last bits; 1 of 28 on one CPU)
    assert conf["update"] + after - 3 <= er1.updates <= conf["update"] + after
    assert er1.updates > er.updates


def test_under_an_l1_loss_the_acting_gain_hands_the_loop_its_labels_at_the_raw_scale():
    """What an L1 loop receives from the teacher while the spectral gain acts: on the rows the
    raw teacher calls the target, the view's logits (its labels, its ranking) rescaled to the
    raw teacher's spread and row means; on the other rows the raw teacher's logits, the
    target's capped at the rescaled view's plus the rows' median gap
    (``erase_spectral_raw_others``, ``erase_spectral_cap_shift``), with the view's gradient.
    With the raw-others setting off, every row is the rescaled view; with
    ``erase_spectral_rescale=False`` the view's logits as they are."""
    from abd_plugin.repair import rescale_logits

    teacher, xte, _, trig = _blend_digits_cnn()
    x = xte[:32].clone()
    x[:16] = trig(x[:16])
    got = {}

    def probe(key):
        def at_end(guard):
            with torch.no_grad():
                got[key] = teacher(x)
                with guard.suspended():
                    got[key + "_view"] = teacher(guard.teacher_view(x))
                    got[key + "_raw"] = teacher(x)
            xg = x.clone().requires_grad_(True)
            teacher(xg).sum().backward()  # the gradient the loop's generator would read
            with guard.suspended():
                xv = x.clone().requires_grad_(True)
                view = teacher(guard.teacher_view(xv))
                rescale_logits(view, got[key + "_raw"])[0].sum().backward()
            got[key + "_grad"], got[key + "_view_grad"] = xg.grad, xv.grad
        return at_end

    reports = {}
    for key, kw in (("on", {}), ("all", dict(erase_spectral_raw_others=False)),
                    ("off", dict(erase_spectral_rescale=False))):
        _, rep = _distill(teacher, xte, ABDConfig(**FAST, **kw), stamped=True, trigger=trig,
                          at_end=probe(key), l1=True)
        er = record_of(rep, EraserReport)
        assert er.status == "on" and er.family == "spectral", er.reason
        on = key != "off"
        assert er.rescaled == (er.batches if on else 0), (er.rescaled, er.batches)
        assert ("raw teacher's scale" in str(rep)) is on
        reports[key] = (er, str(rep))
    expected, factor = rescale_logits(got["all_view"], got["all_raw"])
    assert torch.allclose(got["all"], expected, atol=1e-5)
    assert torch.equal(got["all"].argmax(1), got["all_view"].argmax(1))
    assert float(factor) > 1.1  # the view is the flatter teacher here (1.23 measured)
    assert torch.equal(got["off"], got["off_view"])
    # the default: the raw teacher's values where it does not call the target (3), there the
    # target's value capped at the rescaled view's plus the median gap of those rows; the
    # rescaled view where it does; every row's gradient is the rescaled view's
    raw, view = got["on_raw"], got["on_view"]
    others = raw.argmax(1) != 3
    assert 0 < int(others.sum()) < len(x)
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    assert torch.allclose(got["on"][others][:, keep], raw[others][:, keep], atol=1e-5)
    rescaled = rescale_logits(view, raw)[0]
    rv = rescaled[:, 3]
    gap = (raw[:, 3] - rv)[others].median().clamp_min(0)  # the batch's common gap
    assert float(gap) > 0
    capped = torch.minimum(raw[:, 3], rv + gap)
    assert torch.allclose(got["on"][others][:, 3], capped[others], atol=1e-5)
    assert bool((capped[others] < raw[others][:, 3] - 1e-3).any())  # the cap acted on a row
    assert torch.equal(got["on"][others].argmax(1), raw[others].argmax(1))
    assert torch.allclose(got["on"][~others], rescaled[~others], atol=1e-5)
    assert torch.equal(got["on"][~others].argmax(1), view[~others].argmax(1))
    assert torch.allclose(got["on_grad"], got["on_view_grad"], atol=1e-6)
    er, text = reports["on"]
    assert 0 < er.raw_rows < er.rescaled_rows and reports["all"][0].raw_rows == 0
    assert f"{er.raw_rows} of {er.rescaled_rows} row(s)" in text
    assert "plus the batch's median gap" in text
    assert "did not call class" in text and "did not call class" not in reports["all"][1]


def test_an_l1_student_keeps_its_accuracy_while_the_spectral_gain_acts():
    """Survival under a loss on the logits' values (L1, as DFAD-style loops use): while the
    spectral gain acts on a blend teacher, a student with a ReLU head learns at least the
    accuracy the unguarded student does and far less of the backdoor, and does not collapse
    onto a few classes. (An earlier release's gain handed such loops logits about 4x flatter than
    the teacher's and their students' last ReLU layer died; the raw scale fixed that.)

    Measured on one CPU, 200 steps, seeds 0-4, clean test accuracy / ASR: unguarded 25.2 / 100,
    19.1 / 100, 34.0 / 100, 38.8 / 100, 56.7 / 100; the default 41.6 / 4.0, 50.9 / 0.0,
    53.1 / 2.0, 47.1 / 0.0, 56.7 / 0.6. The test runs seeds 0 and 1. With the handed logits
    made 4x flatter once the gain acts (the old failure, patched in by hand), seed 0's guarded
    student fell to 13.1 % (18.6 % at 10x flatter) and this test failed."""
    teacher, xte, yte, trig = _blend_digits_cnn()
    for seed in (0, 1):
        kw = dict(stamped=True, trigger=trig, l1=True, steps=200, seed=seed, hidden=32)
        s_plain, _ = _distill(teacher, xte, None, **kw)
        s_guard, rep = _distill(teacher, xte, ABDConfig(**FAST), **kw)
        er = record_of(rep, EraserReport)
        assert er.status == "on" and er.family == "spectral", er.reason
        assert 0 < er.raw_rows < er.rescaled_rows == 32 * er.batches
        with torch.no_grad():
            pred_plain, pred_guard = s_plain(xte).argmax(1), s_guard(xte).argmax(1)
        acc_plain = float((pred_plain == yte).float().mean())
        acc_guard = float((pred_guard == yte).float().mean())
        asr_plain, asr_guard = (_asr(s_plain, xte, yte, trig, 3),
                                _asr(s_guard, xte, yte, trig, 3))
        print(f"seed {seed}: unguarded {acc_plain:.3f} / {asr_plain:.3f}, "
              f"guarded {acc_guard:.3f} / {asr_guard:.3f}")
        assert asr_plain >= 0.9 and asr_guard <= 0.1
        assert acc_guard >= acc_plain - 0.03, (acc_guard, acc_plain)
        assert len(pred_guard.unique()) >= 7  # not collapsed onto a few classes


class _Carrier:
    """A stand-in repair whose 'region' carries class 1 (``carries``) or nothing."""

    def __init__(self, *, region: bool, carries: bool) -> None:
        self.has_region, self.carries = region, carries

    def changed(self) -> int:
        return 4

    def transplant(self, into: torch.Tensor, src: torch.Tensor, shift: tuple[int, ...]
                   ) -> torch.Tensor:
        return src if self.carries and shift == () and src.mean() > 0 else into


class _Controller:
    def __init__(self) -> None:
        self.calls = 0

    def specificity(self, model, repair, audit, t, updates, *, gap=None,  # noqa: ANN001
                    searches=1):  # noqa: ANN201
        self.calls += 1
        return {"update": updates, "ratios": [1.0, 0.2], "target_ratio": 0.2,
                "control_ratio": 1.0, "statistic": [1.0, 1.0], "p_value": 0.5}


class _Flat(_Controller):
    """A re-audit under which every class keeps its margin (the gap test never passes)."""

    def specificity(self, model, repair, audit, t, updates, *, gap=None,  # noqa: ANN001
                    searches=1):  # noqa: ANN201
        return {**super().specificity(model, repair, audit, t, updates), "target_ratio": 1.0}


def test_a_check_the_transplant_passes_skips_the_costly_re_audit():
    """The transplant runs first; when it passes, the check passes whatever the re-audit says,
    so the re-audit is not run (NaN fields, ``reaudit_skipped``); when it fails, the re-audit
    decides."""
    from abd_plugin.repair import Probation

    class Sign(nn.Module):  # class 1 when the input's mean is positive
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([-m, m], 1)

    x = torch.cat([torch.ones(8, 1, 4, 4), -torch.ones(8, 1, 4, 4)])
    audit = _verdict("poisoned")
    for region in (True, False):
        for carries in (True, False):
            ctl, pr = _Controller(), Probation(every=1, max_updates=10, gap=0.17,
                                               transplant=0.5)
            pr.remember(x)
            rec = pr.check(Sign(), _Carrier(region=region, carries=carries), audit, 1, 1,
                           ctl)  # type: ignore[arg-type]
            assert rec["reaudit_skipped"] is carries
            assert rec["carried"] == (1.0 if carries else 0.0)
            assert ctl.calls == (1 if region and not carries else 0)
            # region: the re-audit's gap (0.8) passes on its own; no region and no audit
            # statistic: only the transplant can pass
            assert rec["passed"] is (carries or region)
            key = "target_ratio" if region else "universal_gap"
            assert (rec[key] != rec[key]) is (carries or not region)  # NaN: not measured


class _Lowering:
    """A stand-in controller whose mask takes the suspect's margin to ``target`` of its first
    value and the other classes' (median) to ``control``."""

    def __init__(self, target: float, control: float) -> None:
        self.target, self.control = target, control

    def specificity(self, model, repair, audit, t, updates, *, gap=None,  # noqa: ANN001
                    searches=1):  # noqa: ANN201
        return {"update": updates, "ratios": [self.control, self.target],
                "target_ratio": self.target, "control_ratio": self.control,
                "statistic": [1.0, 1.0], "p_value": 0.5}


def test_a_mask_that_lowers_every_class_must_also_carry_the_suspect():
    """The re-audit's gap counts on its own only while the other classes keep their margins
    (median ratio >= ``others_kept``); a mask that lowers them too (a digit's strokes on a clean
    teacher) passes only when its region carries the suspect by ``others_carry`` over the
    control (a watermark's wide mask); the defaults of ``Probation`` (0) keep the old test."""
    from abd_plugin.repair import Probation

    audit = _verdict("poisoned")
    cases = [  # control ratio, transplant (carried, control), the eraser's rule: passes?
        (0.99, (0.03, 0.02), True),    # a patch's mask: the others kept, nothing carried
        (0.91, (0.03, 0.02), False),   # a clean teacher's stroke mask: gap 0.21 alone
        (0.91, (0.25, 0.07), True),    # a watermark's wide mask: carries 18 points
        (0.91, (0.09, 0.02), False),   # carries 7 points: not enough
    ]
    for control, (carried, ctl), expected in cases:
        for kept, carry, want in ((0.94, 0.1, expected), (0.0, 0.0, True)):
            pr = Probation(every=1, max_updates=10, gap=0.17, transplant=0.5,
                           others_kept=kept, others_carry=carry)
            pr._transplant = lambda *a, c=carried, k=ctl: {  # type: ignore[method-assign]
                "carried": c, "carried_control": k, "n_target": 4, "n_other": 4}
            rec = pr.check(nn.Identity(), _Carrier(region=True, carries=False), audit, 1, 1,
                           _Lowering(0.7, control))  # type: ignore[arg-type]
            assert rec["passed"] is want, (control, carried, ctl, kept)
            assert rec["others_lowered"] is (control < kept)
    # a gap that fails stays failed whatever the region carries (under the transplant's own
    # threshold)
    pr = Probation(every=1, max_updates=10, gap=0.17, transplant=0.5, others_kept=0.94,
                   others_carry=0.1)
    pr._transplant = lambda *a: {"carried": 0.4, "carried_control": 0.0,  # type: ignore
                                 "n_target": 4, "n_other": 4}
    rec = pr.check(nn.Identity(), _Carrier(region=True, carries=False), audit, 1, 1,
                   _Lowering(0.85, 0.91))  # type: ignore[arg-type]
    assert rec["passed"] is False


def test_the_eraser_reason_says_when_the_mask_lowered_every_class():
    """The eraser's settings reach its mask's probation (not the gain's, which has no region),
    and the reason text says why a gap that would have passed did not."""
    from abd_plugin.eraser import EraseSettings, TriggerEraser

    teacher = nn.Linear(2, 2)
    er = TriggerEraser(teacher, EraseSettings())
    assert (er.probation.others_kept, er.probation.others_carry) == (0.94, 0.1)
    assert er.spectral_probation.others_kept == 0.0
    assert TriggerEraser(teacher, EraseSettings(confirm_others_kept=0.0)).probation.others_kept == 0
    er.audit = type("A", (), {"verdict": "unsure"})()  # type: ignore[assignment]
    er.target = 1
    rec = {"update": 40, "target_ratio": 0.73, "control_ratio": 0.91, "others_lowered": True,
           "staged": False, "reaudit_skipped": False, "carried": 0.03, "carried_control": 0.02,
           "passed": False, "streak": 0, "confirmed": False, "ended": True}
    er.probation.check = lambda *a, **k: rec  # type: ignore[method-assign]
    er.confirm_now()
    assert er.status.value == "off-unconfirmed"
    assert "the gap was met, but the mask also lowered the other classes (below 94 %" in er.reason
    assert "carry class 1 by 10 points" in er.reason
    rec.update(target_ratio=0.85)  # the gap itself failed: nothing to say about the others
    er.confirm_now()
    assert "also lowered" not in er.reason


def test_an_unconfirmed_repair_warns_after_poisoned_and_stays_quiet_after_unsure():
    """A ``poisoned`` verdict whose repair the probation never confirmed: the guard found a
    backdoor and left it in place; an ABDWarning (once) and the report's warnings say so, the
    latter from the state a save and resume restores (status and verdict). After ``unsure``
    the same end is the gate working: no warning."""
    import warnings

    from abd_plugin.eraser import EraseSettings, TriggerEraser

    teacher = nn.Linear(2, 2)
    rec = {"update": 100, "target_ratio": 0.95, "control_ratio": 0.96, "others_lowered": False,
           "staged": False, "reaudit_skipped": False, "carried": 0.03, "carried_control": 0.02,
           "passed": False, "streak": 0, "confirmed": False, "ended": True}
    for verdict in ("poisoned", "unsure"):
        er = TriggerEraser(teacher, EraseSettings())
        er.audit = _verdict(verdict)  # type: ignore[assignment]
        er.target = 1
        er.probation.check = lambda *a, **k: rec  # type: ignore[method-assign]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            er.confirm_now()
            er.confirm_now()  # a second unconfirmed check: no second warning
        ours = [str(w.message) for w in caught if issubclass(w.category, ABDWarning)]
        assert er.status.value == "off-unconfirmed"
        if verdict == "poisoned":
            assert len(ours) == 1 and "poisoned towards class 1" in ours[0]
            assert "may have learned a backdoor" in ours[0]
            assert er.report().warnings == [ours[0].removeprefix("abd-plugin: ")]
            # the report's warning comes from the saved state (status and verdict), not from
            # the moment the warning was issued
            er2 = TriggerEraser(teacher, EraseSettings())
            er2.status, er2.audit, er2.target = er.status, er.audit, er.target
            assert er2.report().warnings == er.report().warnings
        else:
            assert ours == [] and er.report().warnings == []


def _verdict(v: str):  # noqa: ANN202
    return type("A", (), {"universal": None, "verdict": v})()


def test_an_unsure_verdict_needs_two_passing_checks_in_a_row():
    """After ``unsure`` the mask is confirmed only by ``repeat_unsure`` passing checks in a row
    (after ``poisoned``: ``repeat``), unless the passing check's region also carries the
    suspect (``others_carry``); a failing check resets the streak; a streak in progress at
    ``max_updates`` runs on, one check every ``every`` updates, until it confirms or fails."""
    from abd_plugin.repair import Probation

    def run(verdict: str, gaps: list[bool], every: int = 10, end: int = 30,
            carried: float = 0.08) -> list[dict]:
        pr = Probation(every=every, max_updates=end, gap=0.17, transplant=0.5,
                       repeat_unsure=2, others_carry=0.1)
        pr._transplant = lambda *a: {"carried": carried, "carried_control": 0.0,  # type: ignore
                                     "n_target": 4, "n_other": 4}
        rep, audit, out = _Carrier(region=True, carries=False), _verdict(verdict), []
        for u in range(1, 100):
            if not pr.due(u, rep):  # type: ignore[arg-type]
                continue
            ok = gaps[len(out)]
            out.append(pr.check(nn.Identity(), rep, audit, 1, u,  # type: ignore[arg-type]
                                _Lowering(0.7 if ok else 0.95, 1.0)))
            if out[-1]["ended"]:
                break
        return out

    # poisoned: the first passing check confirms
    recs = run("poisoned", [False, True])
    assert [r["update"] for r in recs] == [10, 20] and recs[-1]["confirmed"]
    assert recs[-1]["needed"] == 1
    # unsure: a pass, a fail (streak reset), then two passes
    recs = run("unsure", [True, False, True, True, True])
    assert [(r["update"], r["streak"], r["confirmed"]) for r in recs] == [
        (10, 1, False), (20, 0, False), (30, 1, False), (40, 2, True)]
    assert all(r["needed"] == 2 for r in recs)
    # the pass at max_updates (30) runs on to update 40, not to the next update
    assert not recs[2]["ended"]
    # ... and a failing check there ends the probation unconfirmed
    recs = run("unsure", [False, False, True, False])
    assert [(r["update"], r["confirmed"], r["ended"]) for r in recs] == [
        (10, False, False), (20, False, False), (30, False, False), (40, False, True)]
    # a failing check at max_updates ends it at once
    recs = run("unsure", [False, False, False])
    assert recs[-1]["update"] == 30 and recs[-1]["ended"]
    # unsure, but the passing check's region also carries the suspect (12 points over the
    # control, against others_carry = 0.1): one check suffices, as after poisoned
    recs = run("unsure", [False, True], carried=0.12)
    assert [(r["update"], r["corroborated"], r["confirmed"]) for r in recs] == [
        (10, True, False), (20, True, True)]
    assert recs[-1]["needed"] == 1
    # repeat_unsure below repeat: repeat wins
    assert Probation(every=1, max_updates=1, gap=0.1, transplant=0.5, repeat=2,
                     repeat_unsure=1).needed(_verdict("unsure")) == 2


def test_the_spectral_gain_acts_on_one_check_after_poisoned_unless_a_mask_races_it():
    """After ``poisoned`` one passing check confirms the spectral gain (``repeat``); after
    ``unsure`` two (``repeat_unsure``); and two whatever the verdict while a rival repair with a
    region is still on probation (``rival``, ``repeat_rival``). The eraser says ``rival`` while
    its mask covers positions and its probation has not ended."""
    from abd_plugin.eraser import EraseSettings, TriggerEraser
    from abd_plugin.repair import Probation

    def run(verdict: str, rival: bool) -> list[dict]:
        pr = Probation(every=10, max_updates=30, gap=0.17, transplant=0.5, repeat=1,
                       repeat_unsure=2, repeat_rival=2)
        pr._transplant = lambda *a: {"carried": 0.9, "carried_control": 0.0,  # type: ignore
                                     "n_target": 4, "n_other": 4}
        out: list[dict] = []
        for u in (10, 20, 30):
            out.append(pr.check(nn.Identity(), _Carrier(region=False, carries=False),  # type: ignore
                                _verdict(verdict), 1, u, None, rival=rival))  # type: ignore
            if out[-1]["ended"]:
                break
        return out

    def summary(recs: list[dict]) -> list[tuple]:
        return [(r["update"], r["streak"], r["needed"], r["rival"], r["confirmed"])
                for r in recs]

    assert summary(run("poisoned", False)) == [(10, 1, 1, False, True)]
    assert summary(run("poisoned", True)) == [(10, 1, 2, True, False), (20, 2, 2, True, True)]
    assert summary(run("unsure", False)) == [(10, 1, 2, False, False), (20, 2, 2, False, True)]

    er = TriggerEraser(nn.Linear(2, 2), EraseSettings())
    er.audit = _verdict("poisoned")  # type: ignore[assignment]
    er.target = 0
    rec = {"update": 20, "universal_gap": float("nan"), "target_drop": float("nan"),
           "control_drop": float("nan"), "staged": False, "joint": False,
           "reaudit_skipped": True, "carried": 0.9, "carried_control": 0.0, "passed": True,
           "streak": 1, "needed": 2, "rival": True, "confirmed": False, "ended": False}
    seen: list[bool] = []

    def fake_check(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append(k["rival"])
        return rec

    er.spectral_probation.check = fake_check  # type: ignore[method-assign]
    er.confirm_now(family="spectral")  # the mask covers no position yet
    er.repair.changed = lambda: 5  # type: ignore[method-assign]
    er.confirm_now(family="spectral")  # a mask region on probation: a rival
    er.probation.checks = [{"update": 100, "passed": False, "confirmed": False, "ended": True}]
    er.confirm_now(family="spectral")  # its probation is over: no rival
    assert seen == [False, True, False]
    assert er.status.value != "on"


def test_a_spectral_check_passes_when_both_its_tests_reach_the_joint_fraction():
    """A repair without a region passes a check on either test alone (residual share >=
    ``transplant``, universal gap >= ``universal_gap``), or, with ``joint`` > 0, when both reach
    that fraction of their thresholds; one test high and the other low does not pass, and
    ``joint=0`` keeps the two separate tests."""
    from abd_plugin.repair import Probation

    def check(share: float, gap: float, joint: float = 0.6) -> dict:
        pr = Probation(every=1, max_updates=10, gap=0.17, transplant=0.5, universal_gap=4.5,
                       joint=joint)
        pr._transplant = lambda *a: {"carried": share, "carried_control": 0.0,  # type: ignore
                                     "n_target": 4, "n_other": 4}
        pr._universal = lambda *a: {"update": 1, "universal_gap": gap,  # type: ignore
                                    "target_drop": gap, "control_drop": 0.0, "staged": False}
        return pr.check(nn.Identity(), _Carrier(region=False, carries=False),  # type: ignore
                        _verdict("poisoned"), 1, 1, None)  # type: ignore[arg-type]

    both = check(0.35, 3.0)  # 70 % and 67 % of the thresholds
    assert both["passed"] and both["joint"] and both["streak"] == 1
    for share, gap in ((0.35, 2.0), (0.2, 4.0), (0.29, 2.69)):  # one or both short of 60 %
        rec = check(share, gap)
        assert not rec["passed"] and not rec["joint"], (share, gap)
    alone = check(0.1, 4.6)  # the universal test alone, as before
    assert alone["passed"] and not alone["joint"]
    carried = check(0.6, float("nan"))  # the residual alone: the re-audit is skipped
    assert carried["passed"] and carried["reaudit_skipped"] and not carried["joint"]
    assert not check(0.35, 3.0, joint=0.0)["passed"]
    assert not check(0.35, float("nan"))["passed"]  # staged re-audit: no universal gap


def test_a_spectral_check_passes_when_its_residual_share_holds_over_several_checks():
    """With ``sustain`` > 0 a repair without a region also passes a check when, at this check
    and the ``sustain_checks - 1`` before it, its residual moved at least ``transplant`` of the
    other samples to the suspect and at least ``sustain`` more than its control (the universal
    re-audit then is not run); a dip of either breaks the run, an ``unsure`` verdict still
    needs a second passing check, and a mask (a region) never passes this way."""
    from abd_plugin.repair import Probation

    def run(shares: list[float], verdict: str = "poisoned", region: bool = False,
            sustain: float = 0.25, control: float = 0.4) -> list[dict]:
        pr = Probation(every=1, max_updates=100, gap=0.17, transplant=0.5, universal_gap=4.5,
                       repeat=1, repeat_unsure=2, sustain=sustain, sustain_checks=3)
        it = iter(shares)
        pr._transplant = lambda *a: {"carried": control + next(it),  # type: ignore
                                     "carried_control": control, "n_target": 4, "n_other": 4}
        audits: list[int] = []

        def universal(*a):  # noqa: ANN002, ANN202
            audits.append(a[4])
            return {"update": a[4], "universal_gap": 1.0, "target_drop": 1.0,
                    "control_drop": 0.0, "staged": False}

        pr._universal = universal  # type: ignore[method-assign]
        out: list[dict] = []
        ctl = _Flat()
        for u in range(1, len(shares) + 1):
            out.append(pr.check(nn.Identity(), _Carrier(region=region, carries=False),  # type: ignore
                                _verdict(verdict), 1, u, ctl))  # type: ignore[arg-type]
            out[-1]["audited"] = u in audits
            if out[-1]["confirmed"]:
                break
        return out

    recs = run([0.21, 0.46, 0.46, 0.38, 0.33])
    assert [r["sustained"] for r in recs] == [False, False, False, True]
    assert recs[-1]["confirmed"] and recs[-1]["reaudit_skipped"] and not recs[-1]["audited"]
    assert [r["audited"] for r in recs[:3]] == [True, True, True]
    dipped = run([0.3, 0.3, 0.2, 0.3, 0.3, 0.3])  # the dip at the third check restarts the run
    assert [r["passed"] for r in dipped] == [False] * 5 + [True]
    unsure = run([0.3, 0.3, 0.3, 0.3], verdict="unsure")  # two passing checks in a row
    assert [(r["passed"], r["confirmed"]) for r in unsure] == [
        (False, False), (False, False), (True, False), (True, True)]
    assert not any(r["passed"] for r in run([0.3] * 5, sustain=0.0))  # off
    # the same margins over a control of 0.1: the residual moves only 40 % of the samples
    assert not any(r["passed"] for r in run([0.3] * 5, control=0.1))
    lifted = run([0.3, 0.3, 0.3], control=0.25)  # 55 % moved: passes at the third check
    assert [r["passed"] for r in lifted] == [False, False, True]
    assert not any(r["passed"] or r["sustained"] for r in run([0.3] * 5, region=True))


def test_the_eraser_says_when_the_spectral_gain_passed_on_a_held_share():
    """``confirm_sustain`` reaches the spectral probation only (the mask has a region), 0 turns
    it off, and a confirmation through it says so in the reason."""
    from abd_plugin.eraser import EraseSettings, TriggerEraser

    teacher = nn.Linear(2, 2)
    er = TriggerEraser(teacher, EraseSettings())
    assert (er.spectral_probation.sustain, er.spectral_probation.sustain_checks) == (0.25, 3)
    assert er.probation.sustain == 0.0
    off = TriggerEraser(teacher, EraseSettings(confirm_sustain=0.0))
    assert off.spectral_probation.sustain == 0
    assert ABDConfig(erase_confirm_sustain_checks=4).erase.confirm_sustain_checks == 4
    er.audit = _verdict("poisoned")  # type: ignore[assignment]
    er.target = 0
    rec = {"update": 80, "universal_gap": float("nan"), "target_drop": float("nan"),
           "control_drop": float("nan"), "staged": False, "joint": False, "sustained": True,
           "reaudit_skipped": True, "carried": 0.85, "carried_control": 0.47, "passed": True,
           "streak": 1, "needed": 1, "confirmed": True, "ended": True}
    er.spectral_probation.check = lambda *a, **k: rec  # type: ignore[method-assign]
    er.confirm_now(family="spectral")
    assert er.status.value == "on" and er.family == "spectral"
    assert "sent 85 % of other samples to class 0" in er.reason
    assert ("at 3 checks in a row it sent at least 50 % of them, 25 points more than the "
            "control, which passes the check") in er.reason


def test_the_eraser_asks_an_unsure_mask_for_two_checks_and_says_so():
    from abd_plugin.eraser import EraseSettings, TriggerEraser

    teacher = nn.Linear(2, 2)
    er = TriggerEraser(teacher, EraseSettings())
    assert er.probation.needed(_verdict("unsure")) == 2
    assert er.probation.needed(_verdict("poisoned")) == 1
    # the spectral gain: one check after poisoned, two after unsure, and two whatever the
    # verdict while a mask with a region is still racing it (the mask keeps its chance)
    assert er.spectral_probation.needed(_verdict("poisoned")) == 1
    assert er.spectral_probation.needed(_verdict("unsure")) == 2
    assert er.spectral_probation.needed(_verdict("poisoned"), rival=True) == 2
    assert TriggerEraser(teacher, EraseSettings(confirm_spectral=2)).spectral_probation.needed(
        _verdict("poisoned")) == 2
    assert ABDConfig(erase_confirm_spectral=3).erase.confirm_spectral == 3
    assert TriggerEraser(teacher, EraseSettings(confirm_unsure=3)).spectral_probation.needed(
        _verdict("unsure")) == 3
    one = TriggerEraser(teacher, EraseSettings(confirm_unsure=1))
    assert one.probation.needed(_verdict("unsure")) == 1
    assert ABDConfig(erase_confirm_unsure=3).erase.confirm_unsure == 3
    er.audit = _verdict("unsure")  # type: ignore[assignment]
    er.target = 1
    rec = {"update": 60, "target_ratio": 0.7, "control_ratio": 0.99, "others_lowered": False,
           "staged": False, "reaudit_skipped": False, "carried": 0.03, "carried_control": 0.02,
           "passed": True, "streak": 2, "needed": 2, "confirmed": True, "ended": True}
    er.probation.check = lambda *a, **k: rec  # type: ignore[method-assign]
    er.confirm_now()
    assert er.status.value == "on" and "(2 passing checks in a row)" in er.reason
    rec.update(streak=1, needed=1, corroborated=True, carried=0.25, carried_control=0.05)
    er.status = er.status.__class__("probation")
    er.confirm_now()
    assert er.status.value == "on"
    assert "one passing check suffices after an unsure verdict" in er.reason
    assert "carries class 1 by 10 points" in er.reason


def test_the_eraser_says_when_the_spectral_gain_passed_on_both_tests_together():
    """The eraser's spectral probation gets ``confirm_joint``, and a confirmation through the
    joint rule says so in the reason, with both tests' numbers."""
    from abd_plugin.eraser import EraseSettings, TriggerEraser

    teacher = nn.Linear(2, 2)
    er = TriggerEraser(teacher, EraseSettings())
    assert er.spectral_probation.joint == 0.6 and er.probation.joint == 0.0
    assert TriggerEraser(teacher, EraseSettings(confirm_joint=0.0)).spectral_probation.joint == 0
    assert ABDConfig(erase_confirm_joint=0.8).erase.confirm_joint == 0.8
    er.audit = _verdict("poisoned")  # type: ignore[assignment]
    er.target = 0
    rec = {"update": 80, "universal_gap": 4.3, "target_drop": 2.8, "control_drop": -1.5,
           "staged": False, "joint": True, "reaudit_skipped": False, "carried": 0.71,
           "carried_control": 0.29, "passed": True, "streak": 2, "needed": 2,
           "confirmed": True, "ended": True}
    er.spectral_probation.check = lambda *a, **k: rec  # type: ignore[method-assign]
    er.confirm_now(family="spectral")
    assert er.status.value == "on" and er.family == "spectral"
    assert "dropped by 2.8 and the other classes' by -1.5" in er.reason
    assert "sent 71 % of other samples to class 0" in er.reason
    assert ("both tests reached at least 60 % of their thresholds (a gap of 4.3 of 4.5, 42 of "
            "50 points)") in er.reason
    assert "(2 passing checks in a row)" in er.reason
