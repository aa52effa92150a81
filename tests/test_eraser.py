"""The trigger eraser: it finds the trigger region, runs inside the teacher's forward, never touches
the teacher, leaves a clean teacher's run bit-identical, and resumes exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDConfig, ABDGuard
from abd_plugin.audit import AuditSettings
from abd_plugin.eraser import EraserReport, EraseSettings, TriggerEraser
from abd_testutils import TinyGenerator, make_pair

#: a guard whose audit always says "clean" (any p-value is >= 1e-12): the eraser must stay off
CLEAN_GATE = dict(audit_alpha=1e-12, audit_clean_alpha=1e-12, audit_steps=5, audit_starts=2)


def _kit(trigger: str | None):
    from abd_plugin.kit.datasets import load_dataset
    from abd_plugin.kit.poison import TeacherSpec, train_teacher

    torch.set_num_threads(1)
    teacher, _ = train_teacher(TeacherSpec(dataset="mnist5k", arch="lenet5", trigger=trigger))
    xtr, _ = load_dataset("mnist5k", "train").tensors
    xte, yte = load_dataset("mnist5k", "test").tensors
    return teacher, xtr, xte, yte


def test_eraser_learns_the_trigger_region_of_a_poisoned_teacher():
    from abd_plugin.kit.metrics import accuracy, attack_success_rate
    from abd_plugin.kit.triggers import get_trigger

    teacher, xtr, xte, yte = _kit("badnet_grid")
    trig = get_trigger("badnet_grid")
    er = TriggerEraser(teacher)
    er.arm(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # batches in which the trigger turns up, as a generator's samples do
        x = xtr[torch.randint(len(xtr), (64,), generator=g)]
        x[:32] = trig.apply(x[:32])
        er.learn(x)
    m = er.mask()
    assert m is not None
    # the trigger's white pixels are erased (its black ones already equal the fill value 0:
    # erasing them changes nothing, so the mask is free to leave them), and little else
    white = trig.apply(torch.zeros(1, 1, 32, 32))[0, 0] > 0.5
    assert int(white.sum()) == 4 and bool((m[0, 0][white] > 0.5).all())
    assert int((m > 0.5).sum()) <= 64  # 6 % of the image
    erased = nn.Sequential()  # the teacher as the student would see it: erased inputs
    erased.forward = lambda x: teacher(er.erase(x))  # type: ignore[method-assign]
    assert attack_success_rate(erased, xte, yte, trig, 0) < 10.0  # teacher: 99 %
    assert accuracy(erased, xte, yte) >= accuracy(teacher, xte, yte) - 2.0
    assert er.last_flip > 0.8 and er.updates == 60


def _loop(teacher: nn.Module, student: nn.Module, steps: int = 3) -> nn.Module:
    gen = TinyGenerator()
    opt_g = torch.optim.Adam(gen.parameters(), 1e-2)
    opt_s = torch.optim.Adam(student.parameters(), 1e-2)
    for _ in range(steps):
        z = torch.randn(16, gen.z_dim)
        loss_g = -F.l1_loss(student(gen(z)), teacher(gen(z)))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        x = gen(z).detach()
        with torch.no_grad():
            t = teacher(x)
        loss_s = F.l1_loss(student(x), t)
        opt_s.zero_grad()
        loss_s.backward()
        opt_s.step()
    return student


def test_a_teacher_the_audit_calls_clean_gets_nothing():
    # the student's trajectory is bit-identical to the unguarded run: the audit uses its own RNG
    # and a frozen copy, and the eraser never arms
    teacher, student = make_pair()
    _, twin = make_pair()  # the same initial weights
    ref = [p.detach().clone() for p in student.parameters()]
    torch.manual_seed(1)
    plain = _loop(teacher, twin)
    torch.manual_seed(1)
    with ABDGuard(teacher, student, **CLEAN_GATE) as guard:
        guarded = _loop(teacher, student)
    assert any(not torch.equal(a, p) for a, p in zip(ref, guarded.parameters(), strict=True))
    for a, b in zip(plain.parameters(), guarded.parameters(), strict=True):
        assert torch.equal(a, b)
    rep = guard.report()
    er = rep.get(EraserReport)
    assert rep.audit is not None and rep.audit.verdict == "clean"
    assert er is not None and er.status == "off-clean" and er.updates == 0 and er.batches == 0
    assert "no backdoor found" in str(rep) and "Trigger eraser: off" in str(rep)


def test_the_eraser_runs_inside_the_teachers_forward_and_never_touches_the_teacher():
    teacher, student = make_pair()
    before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    gen = TinyGenerator()
    with ABDGuard(teacher, student, target=0, audit=False) as guard:
        x = gen(torch.randn(16, gen.z_dim))
        y = teacher(x)  # the forward inside the guard: erased input
        er = guard.eraser
        assert er is not None and er.distinct_batches == 1 and er.mask() is not None
        with guard.suspended():
            expected = teacher(er.erase(x))
        assert torch.allclose(y, expected)
        y.sum().backward()  # the generator still gets gradients (through unerased pixels)
        assert all(p.grad is not None for p in gen.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher._forward_pre_hooks and not teacher._forward_hooks
    rep = guard.report()
    er_rep = rep.get(EraserReport)
    assert er_rep is not None and er_rep.status == "on" and er_rep.target == 0
    assert "Trigger eraser: ON for class 0" in str(rep)


def test_erase_only_target_erases_only_the_target_rows():
    teacher, student = make_pair()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        pred = teacher(x).argmax(1)
    t = int(pred.mode().values)
    with ABDGuard(teacher, student, target=t, audit=False, erase_only_target=True) as guard:
        seen = []
        h = teacher.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        with torch.no_grad():
            teacher(x)
        h.remove()
    inp = seen[-1]
    rows = pred == t
    assert torch.equal(inp[~rows], x[~rows])  # the others reach the teacher unchanged
    assert guard.eraser is not None
    assert torch.allclose(inp[rows], guard.eraser.erase(x[rows]))


def test_eraser_state_round_trip_equals_an_uninterrupted_run():
    def run(split: bool) -> torch.Tensor:
        teacher, student = make_pair()
        g = torch.Generator().manual_seed(0)
        batches = [torch.rand(16, 1, 8, 8, generator=g) for _ in range(6)]
        with torch.no_grad():  # the class this random teacher gives most: every batch has some
            target = int(teacher(torch.cat(batches)).argmax(1).mode().values)
        cfg = ABDConfig(target=target, audit=False, erase_every=1)
        guard = ABDGuard(teacher, student, config=cfg)
        with guard, torch.no_grad():
            for x in batches[:3]:
                teacher(x)
        if split:  # resume in a new guard from the saved state
            state = guard.state_dict()
            guard = ABDGuard(teacher, student, config=cfg)
            guard.load_state_dict(state)
        with guard, torch.no_grad():
            for x in batches[3:]:
                teacher(x)
        assert guard.eraser is not None and guard.eraser.updates == 6
        m = guard.eraser.mask()
        assert m is not None
        return m

    assert torch.equal(run(False), run(True))


def test_a_batch_fed_twice_counts_once():
    teacher, student = make_pair()
    with ABDGuard(teacher, student, target=0, audit=False, erase_every=1) as guard, \
            torch.no_grad():
        x = torch.rand(8, 1, 8, 8)
        for _ in range(5):  # ZSKT's student steps feed the same batch again and again
            teacher(x)
        teacher(torch.rand(8, 1, 8, 8))
    assert guard.eraser is not None
    assert guard.eraser.distinct_batches == 2 and guard.eraser.erased_batches == 6


def test_no_audit_and_no_target_leaves_the_eraser_off():
    teacher, student = make_pair()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        plain = teacher(x)
    with ABDGuard(teacher, student, audit=False) as guard, torch.no_grad():
        assert torch.equal(teacher(x), plain)
    rep = guard.report()
    er = rep.get(EraserReport)
    assert er is not None and er.status == "off-no-audit" and rep.audit is None
    assert "Teacher audit: not run (audit=False)" in str(rep)


def test_a_new_input_size_is_refused_clearly():
    teacher, student = make_pair()
    with ABDGuard(teacher, student, target=0, audit=False) as guard, torch.no_grad():
        teacher(torch.rand(4, 1, 8, 8))
        with pytest.raises(ValueError, match="one input size"):
            teacher(torch.rand(4, 1, 12, 12))
    assert guard.eraser is not None


def test_target_out_of_range_is_refused():
    teacher, student = make_pair()
    with ABDGuard(teacher, student, target=12, audit=False), torch.no_grad():
        with pytest.raises(ValueError, match="out of range"):
            teacher(torch.rand(4, 1, 8, 8))


def test_a_teacher_called_under_inference_mode_is_audited_and_erased():
    """``with torch.inference_mode(): t = teacher(x)`` is a common way to get KD targets; the
    audit and the mask's updates need autograd and run outside inference mode."""
    teacher, student = make_pair()
    gen = TinyGenerator()
    x = gen(torch.randn(16, gen.z_dim)).detach()
    with ABDGuard(teacher, student, target=0, audit=True) as guard:
        with torch.inference_mode():
            y = teacher(x)
        er = guard.eraser
        assert guard.audit_report is not None
        assert er is not None and er.distinct_batches == 1 and er.mask() is not None
        with guard.suspended(), torch.no_grad():
            expected = teacher(er.erase(x))
        assert torch.allclose(y, expected)
    assert not teacher._forward_pre_hooks and not teacher._forward_hooks


class _Shortcut(nn.Module):
    """A linear 8x8 classifier with a planted shortcut: the ``trigger`` pixels push class 0."""

    def __init__(self, trigger: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = nn.Linear(64, 5)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(5, 64, generator=g) * 0.3)
            self.lin.weight[0] += 8.0 * trigger.flatten()
            self.lin.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def _spread_trigger() -> torch.Tensor:
    t = torch.zeros(1, 8, 8)
    t[0, ::2, ::3] = 1.0  # 12 scattered pixels
    return t


def _armed(teacher: nn.Module, **cfg) -> TriggerEraser:
    from abd_plugin.audit import audit

    cfg.setdefault("confirm", 0)  # these tests are about the mask once it acts
    er = TriggerEraser(teacher, EraseSettings(**cfg),
                       audit_settings=AuditSettings(steps=40, starts=4))
    rep = audit(teacher, (1, 8, 8), steps=40, starts=4, universal=False)
    assert rep.verdict == "poisoned" and rep.suspect == 0
    er.decide(rep)
    er.learner.prepare(torch.zeros(1, 1, 8, 8))
    er.fill(torch.zeros(1, 1, 8, 8))  # inputs in [0, 1]: erased positions are 0
    return er


def test_the_re_audit_lowers_the_price_while_the_erased_teacher_still_stands_out():
    trig = _spread_trigger()
    er = _armed(_Shortcut(trig))
    assert er.status.value == "on" and er.price == 2.5
    # a mask that misses the trigger (the initial, near-zero mask): the target still stands out
    rec = er.recheck()
    assert rec is not None and rec["stands_out"] and rec["p_value"] < 0.05
    assert er.price == 1.0 == er.settings.price_low
    assert er.controller.done()  # the guard checks no more
    er.recheck()  # called anyway: the price stays at the low price
    assert er.price == 1.0 and len(er.rechecks) == 2


def test_the_re_audit_keeps_the_price_once_the_mask_covers_the_trigger():
    trig = _spread_trigger()
    er = _armed(_Shortcut(trig))
    assert er.repair.logits is not None
    with torch.no_grad():  # a mask on exactly the trigger's pixels
        er.repair.logits.copy_(torch.where(trig.bool(), 8.0, -8.0).view(1, 1, 8, 8))
    rec = er.recheck()
    assert rec is not None and not rec["stands_out"] and rec["p_value"] >= 0.05
    assert er.price == 2.5
    assert rec["statistic"] < er.audit.statistic[0] / 2  # type: ignore[union-attr]
    assert not er.controller.done()
    er.recheck()  # a second check in a row that finds the trigger covered: no more checks
    assert er.price == 2.5 and er.controller.done()


def test_the_guard_re_audits_on_schedule_and_reports_it():
    trig = _spread_trigger()
    teacher = _Shortcut(trig)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    cfg = ABDConfig(audit_steps=40, audit_starts=4, erase_every=1, erase_recheck=2,
                    erase_confirm=0)
    g = torch.Generator().manual_seed(0)
    with ABDGuard(teacher, student, config=cfg) as guard, torch.no_grad():
        for _ in range(7):
            x = torch.rand(16, 1, 8, 8, generator=g)
            x[:8] = torch.maximum(x[:8], trig)  # stamped samples: the teacher calls them 0
            teacher(x)
    assert guard.eraser is not None and guard.eraser.updates == 7
    rep = guard.report()
    er = rep.get(EraserReport)
    assert er is not None
    # the first check after two periods (update 4), then every period until one lowers the price
    ups = [r["update"] for r in er.rechecks]
    assert ups[:1] == [4] and all(u % 2 == 0 for u in ups)
    lowered = [r["stands_out"] for r in er.rechecks]
    assert lowered.count(True) <= 1 and (True not in lowered[:-1])  # checks stop once lowered
    assert er.price == (1.0 if any(lowered) else 2.5)
    assert "Re-audited the erased teacher" in str(rep)
    # off: no re-audit
    with ABDGuard(teacher, student, config=cfg.replace(erase_recheck=0)) as guard2, \
            torch.no_grad():
        for _ in range(7):
            teacher(torch.rand(16, 1, 8, 8, generator=g))
    er2 = guard2.report().get(EraserReport)
    assert er2 is not None and er2.rechecks == [] and er2.price == 2.5


def test_the_re_audits_price_survives_a_save_and_resume():
    trig = _spread_trigger()
    er = _armed(_Shortcut(trig))
    er.recheck()
    state = er.state_dict()
    er2 = TriggerEraser(_Shortcut(trig), er.settings)
    er2.load_state_dict(state)
    assert er2.price == er.price == 1.0 and er2.rechecks == er.rechecks
    assert er2.audit == er.audit
    # a state saved before the re-audit existed resumes at the configured price
    for k in ("price", "rechecks", "audit"):
        state.pop(k)
    er3 = TriggerEraser(_Shortcut(trig), er.settings)
    er3.load_state_dict(state)
    assert er3.price == 2.5 and er3.rechecks == [] and er3.audit is None


def test_erased_positions_take_the_low_end_of_the_input_range():
    from abd_plugin.domain import resolve_domain

    def floor(x, input_range=None):
        return resolve_domain(x, input_range).floor_tensor()

    g = torch.Generator().manual_seed(0)
    x01 = torch.rand(8, 3, 4, 4, generator=g)
    assert torch.equal(floor(x01), torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    assert torch.equal(floor(x01 * 2 - 1), -torch.ones(1, 3, 1, 1, dtype=torch.float64))
    # normalised images (mean/std per channel): each channel's minimum, i.e. black
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    xn = (x01 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    fill = floor(xn)
    assert fill.shape == (1, 3, 1, 1)
    per_channel_min = xn.transpose(0, 1).reshape(3, -1).min(1).values.double()
    torch.testing.assert_close(fill.flatten(), per_channel_min)
    # a stated input range wins, and a stated fill value wins over the domain
    assert torch.equal(floor(xn, (-2.0, 2.0)).flatten(), torch.full((3,), -2.0).double())
    er = TriggerEraser(make_pair()[0], EraseSettings(fill=0.25))
    assert float(er.fill(xn)) == 0.25
    # feature vectors: no channels
    assert float(floor(torch.rand(8, 5, generator=g) * 2 - 1)) == -1.0
    assert float(floor(torch.rand(8, 5, generator=g) * 9 + 3)) == 0.0


def test_on_inputs_in_minus_one_one_the_teacher_sees_minus_one_where_erased():
    teacher, student = make_pair()
    seen: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)
    with ABDGuard(teacher, student, target=0, audit=False, erase_every=1) as guard, \
            torch.no_grad():
        for _ in range(3):
            teacher(torch.rand(16, 1, 8, 8, generator=g) * 2 - 1)
    er = guard.eraser
    assert er is not None and er.mask() is not None
    with torch.no_grad():  # a mask fully on at one position, off elsewhere
        er.repair.logits.fill_(-30.0)  # type: ignore[union-attr]
        er.repair.logits[0, 0, 2, 3] = 30.0  # type: ignore[index]
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    with guard, torch.no_grad():  # a pre-hook registered after the guard's sees its output
        spy = teacher.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
        teacher(x)
        spy.remove()
    assert torch.allclose(seen[-1][:, 0, 2, 3], torch.full((4,), -1.0))
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2, 3] = False
    torch.testing.assert_close(seen[-1][:, 0][:, keep], x[:, 0][:, keep])
    # the fill is saved with the eraser's state
    state = er.state_dict()
    assert torch.equal(state["fill"], -torch.ones(1, 1, 1, 1, dtype=torch.float64))
