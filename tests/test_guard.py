"""ABDGuard: call-order contract, the teacher is untouched, a disabled guard is a no-op, hooks
are removed on exceptions, model output containers, closures, explicit API."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDConfig, ABDGuard, DefenseHook
from abd_plugin.retrospection import RetrospectionReport
from abd_plugin.vaccine import VaccineReport
from abd_testutils import TinyGenerator, make_pair, record_of

#: SV + SR as published (the suite's SV/SR tests; the default is the audit + eraser)
CLASSIC = ABDConfig.classic()


def kl(t, s):
    from abd_plugin import extract_logits
    t, s = extract_logits(t), extract_logits(s)
    return F.kl_div(
        F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True
    )


def zskt_loop(
    teacher, student, generator, iterations=4, n_student=2, guard=None, events=None, seed=0
):
    """A hand-written ZSKT-style loop; ``events`` records the loop's own calls."""
    torch.manual_seed(seed)
    og = torch.optim.Adam(generator.parameters(), 1e-2)
    os_ = torch.optim.Adam(student.parameters(), 1e-2)
    log = events if events is not None else []
    for _ in range(iterations):
        z = torch.randn(8, generator.z_dim)
        x = generator(z)
        loss_g = -kl(teacher(x), student(x))
        log.append(("loss_g", loss_g))
        og.zero_grad()
        loss_g.backward()
        log.append(("backward_g", None))
        og.step()
        for _ in range(n_student):
            xs = generator(z).detach()
            with torch.no_grad():
                t = teacher(xs)
            loss_s = kl(t, student(xs))
            os_.zero_grad()
            loss_s.backward()
            log.append(("backward_s", None))
            os_.step()
            log.append(("step_s", None))
    return log


class Recorder(DefenseHook):
    """Records every hook call; checks what is in the graph / in .grad at each point."""

    name = "recorder"

    def __init__(self, student):
        self.calls = []
        self.student = student

    def on_guard_enter(self, guard):
        self.calls.append("enter")

    def on_teacher_forward(self, guard, x, logits):
        self.calls.append("teacher_forward")
        assert x.requires_grad and logits.requires_grad
        return None

    def on_student_forward(self, guard, x, logits):
        self.calls.append("student_forward")

    def on_before_student_step(self, guard, optimizer):
        assert all(p.grad is not None for p in self.student.parameters())  # after backward
        self.calls.append("before_step")

    def on_after_student_step(self, guard, optimizer):
        self.calls.append("after_step")

    def on_guard_exit(self, guard):
        self.calls.append("exit")


def test_call_order_contract():
    teacher, student = make_pair()
    gen = TinyGenerator()
    rec = Recorder(student)
    with ABDGuard(teacher, student, config=CLASSIC, hooks=[rec], sv=False, sr=False) as guard:
        zskt_loop(teacher, student, gen, iterations=2, n_student=2)
    per_iter = (["teacher_forward", "student_forward"]            # generator step
                + ["student_forward", "before_step", "after_step"] * 2)  # student steps
    assert rec.calls == ["enter"] + per_iter * 2 + ["exit"]
    assert guard.step == 4


def test_sv_term_is_in_the_graph_before_backward_and_sr_lands_between_backward_and_step(
    monkeypatch,
):
    teacher, student = make_pair()
    gen = TinyGenerator()
    order = []
    guard = ABDGuard(teacher, student, config=CLASSIC,
                     verify=False, shuffle_layers=1, sv_coef=1.0, sr_start_step=0)
    sv_pen = guard.sv.penalty

    def spy_pen(x, t, **kw):
        p = sv_pen(x, t, **kw)
        order.append(("sv_term", p.requires_grad))
        return p

    monkeypatch.setattr(guard.sv, "penalty", spy_pen)
    sr_ret = guard.sr.retrospect

    def spy_sr(x, **kw):
        grads_before = [p.grad.clone() for p in student.parameters()]
        out = sr_ret(x, **kw)
        changed = any(
            not torch.equal(a, p.grad)
            for a, p in zip(grads_before, student.parameters(), strict=True)
        )
        order.append(("sr", changed))
        return out

    monkeypatch.setattr(guard.sr, "retrospect", spy_sr)
    events = []
    with guard:
        zskt_loop(teacher, student, gen, iterations=1, n_student=1, events=events)
    # merge: the SV term exists before the generator's backward, SR after the student backward
    assert order[0] == ("sv_term", True)
    assert order[1] == ("sr", True)
    assert [e[0] for e in events] == ["loss_g", "backward_g", "backward_s", "step_s"]


def test_sv_gradient_reaches_the_generator_exactly_once():
    teacher, student = make_pair()
    gen = TinyGenerator()
    guard = ABDGuard(teacher, student, config=CLASSIC,
                     verify=False, shuffle_layers=1, sv_coef=2.0, sr=False)
    z = torch.randn(8, gen.z_dim)
    with guard:
        x = gen(z)
        t = teacher(x)
        loss = -kl(t, student(x))
        loss.backward()
    got = [p.grad.clone() for p in gen.parameters()]
    # the same by hand: explicit penalty added to the loss
    for p in gen.parameters():
        p.grad = None
    x = gen(z)
    t = teacher(x)
    guard2 = ABDGuard(teacher, student, config=CLASSIC,
                      verify=False, shuffle_layers=1, sv_coef=2.0, sr=False)
    (-kl(t, student(x)) + guard2.vaccine_penalty(x, t)).backward()
    for a, p in zip(got, gen.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_teacher_is_bit_identical_after_a_guarded_run():
    teacher, student = make_pair()
    before = copy.deepcopy(teacher.state_dict())
    flags = [p.requires_grad for p in teacher.parameters()]
    modes = [m.training for m in teacher.modules()]
    with ABDGuard(teacher, student, config=CLASSIC,
                  verify=False, shuffle_layers=1, sv_coef=1.0, sr_start_step=2,
                  sr_inner_rounds=2):
        zskt_loop(teacher, student, TinyGenerator(), iterations=3)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert [m.training for m in teacher.modules()] == modes
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_disabled_guard_gives_a_bit_identical_student():
    def run(guarded):
        teacher, student = make_pair(seed=1)
        gen = TinyGenerator()
        if guarded:
            with ABDGuard(teacher, student, config=CLASSIC, sv=False, sr=False):
                zskt_loop(teacher, student, gen, seed=3)
        else:
            zskt_loop(teacher, student, gen, seed=3)
        return student.state_dict()

    a, b = run(False), run(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sv_on_but_unverified_changes_nothing_either():
    def run(guarded):
        teacher, student = make_pair(seed=1)
        gen = TinyGenerator()
        if guarded:
            with ABDGuard(teacher, student, config=CLASSIC, sr=False, verify_batches=1000):
                zskt_loop(teacher, student, gen, seed=3)
        else:
            zskt_loop(teacher, student, gen, seed=3)
        return student.state_dict()

    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _hook_count(*models):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for mod in models for m in mod.modules()
    )


def test_hooks_are_removed_after_an_exception():
    from torch.optim import optimizer as optmod

    teacher, student = make_pair()
    n_pre, n_post = (
        len(optmod._global_optimizer_pre_hooks),
        len(optmod._global_optimizer_post_hooks),
    )
    grads_before = [None for _ in teacher.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with ABDGuard(teacher, student, config=CLASSIC,
                      verify=False, shuffle_layers=1, sr_start_step=0):
            zskt_loop(teacher, student, TinyGenerator(), iterations=1)
            raise RuntimeError("boom")
    assert _hook_count(teacher, student) == 0
    assert len(optmod._global_optimizer_pre_hooks) == n_pre
    assert len(optmod._global_optimizer_post_hooks) == n_post
    assert [p.grad for p in teacher.parameters()] == grads_before


@pytest.mark.parametrize("mode", ["tuple", "dict"])
def test_tuple_and_dict_outputs(mode):
    teacher, student = make_pair(mode=mode)
    gen = TinyGenerator()
    with ABDGuard(teacher, student, config=CLASSIC,
                  verify=False, shuffle_layers=1, sv_coef=1.0, sr_start_step=0,
                  sr_inner_rounds=1) as guard:
        x = gen(torch.randn(4, gen.z_dim))
        out = teacher(x)
        assert type(out) is (tuple if mode == "tuple" else dict)
        logits = out[0] if mode == "tuple" else out["logits"]
        assert logits.shape == (4, 10)
        zskt_loop(teacher, student, gen, iterations=1, n_student=1)
    rep = guard.report()
    assert record_of(rep, VaccineReport).calls >= 1
    assert record_of(rep, RetrospectionReport).steps == 1


def test_closure_steps_get_sr_after_the_closure_ran():
    teacher, student = make_pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.rand(8, 1, 8, 8)
    seen = []

    class Probe(DefenseHook):
        def on_before_student_step(self, guard, optimizer):
            seen.append(all(p.grad is not None for p in student.parameters()))

    with ABDGuard(teacher, student, config=CLASSIC, sv=False, sr=False, hooks=[Probe()]):
        def closure():
            opt.zero_grad()
            with torch.no_grad():
                t = teacher(x)
            loss = kl(t, student(x))
            loss.backward()
            return loss

        opt.step(closure)
    assert seen == [True]


def test_optimizers_of_other_models_are_ignored():
    teacher, student = make_pair()
    gen = TinyGenerator()
    with ABDGuard(teacher, student, config=CLASSIC,
                  sv=False, sr_start_step=0, sr_inner_rounds=1) as guard:
        og = torch.optim.SGD(gen.parameters(), lr=0.1)
        gen(torch.randn(2, gen.z_dim)).sum().backward()
        og.step()
        assert guard.step == 0 and guard.sr.steps == 0


def test_retrospection_block_opens_the_window():
    teacher, student = make_pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.rand(8, 1, 8, 8)
    with ABDGuard(teacher, student, config=CLASSIC, sv=False, sr_inner_rounds=1) as guard:
        for i in range(3):
            opt.zero_grad()
            kl(teacher(x), student(x)).backward()
            if i == 1:
                with guard.retrospection():
                    opt.step()
            else:
                opt.step()
    assert guard.sr.steps == 1 and guard.step == 3


def test_bad_configuration_errors():
    teacher, student = make_pair()
    with pytest.raises(ValueError, match="total_steps"):
        ABDGuard(teacher, student, config=CLASSIC, sr_start_fraction=0.9)
    with pytest.raises(TypeError, match="unknown ABDConfig field"):
        ABDGuard(teacher, student, config=CLASSIC, not_a_field=1)
    with pytest.raises(ValueError, match="same module"):
        ABDGuard(teacher, teacher, config=CLASSIC)
    with pytest.raises(ValueError, match="sr_pert_model"):
        ABDConfig(sr_pert_model="nobody")
    guard = ABDGuard(teacher, student, config=CLASSIC, sv=False, sr=False)
    with pytest.raises(RuntimeError, match="sv=False"):
        guard.vaccine_penalty(torch.rand(2, 1, 8, 8), torch.rand(2, 10))
    with guard:
        with pytest.raises(RuntimeError, match="already active"):
            guard.attach()


def test_integer_input_to_teacher_in_guard_is_left_alone():
    # integer inputs cannot carry gradient: they are not synthesis batches, the guard ignores them
    teacher = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3)).eval()
    student = nn.Sequential(nn.Embedding(10, 2), nn.Flatten(), nn.Linear(4, 3))
    with ABDGuard(teacher, student, config=CLASSIC, verify=False):
        assert teacher(torch.tensor([[1, 2]])).shape == (1, 3)


def test_sr_lr_applies_inside_the_window_and_is_restored():
    teacher, student = make_pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    x = torch.rand(8, 1, 8, 8)
    seen = []

    class Probe(DefenseHook):
        def on_before_student_step(self, guard, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    with ABDGuard(teacher, student, config=CLASSIC,
                  sv=False, sr_start_step=1, sr_inner_rounds=1, sr_lr=0.01,
                  hooks=[Probe()]):
        for _ in range(3):
            before = [p.detach().clone() for p in student.parameters()]
            opt.zero_grad()
            kl(teacher(x), student(x)).backward()
            opt.step()
            moved = any(
                not torch.equal(a, p) for a, p in zip(before, student.parameters(), strict=True)
            )
            seen.append(moved)
            assert opt.param_groups[0]["lr"] == 0.0  # the user's value is back after every step
    assert seen == [0.0, False, 0.01, True, 0.01, True]


def test_depth_change_at_verification_inside_a_teacher_forward(monkeypatch):
    """Verification can pick another depth (and shared-trunk module) in the middle of the
    teacher's forward; the activation captured for the old module must not be used."""
    from abd_plugin.ensemble import ShuffledEnsemble
    from abd_plugin.vaccine import ShufflingVaccine

    teacher, student = make_pair()
    gen = TinyGenerator()
    scores = {1: 0.0, 2: 0.5}

    def fake_score(self):
        return scores.get(self.ensemble.depth, 0.0), 0.5, 64

    monkeypatch.setattr(ShufflingVaccine, "_score", fake_score)
    tails = []
    real_tail = ShuffledEnsemble.tail

    def spy_tail(self, x, trunk, at):
        if torch.is_grad_enabled():
            with torch.no_grad():
                tails.append(torch.allclose(trunk, self.trunk_input(x, at), atol=1e-6))
        return real_tail(self, x, trunk, at)

    monkeypatch.setattr(ShuffledEnsemble, "tail", spy_tail)
    with ABDGuard(
        teacher, student, config=CLASSIC, verify_batches=2, verify_skip=0, sv_coef=1.0, sr=False
    ) as guard:
        zskt_loop(teacher, student, gen, iterations=4, n_student=1)
    assert guard.sv.status == "enabled" and guard.sv.ensemble.depth == 2
    assert tails and all(tails)  # every shared-trunk pass used the input of its own module
    assert record_of(guard.report(), VaccineReport).calls >= 2


def test_one_schedule_object_answers_guard_and_sr():
    teacher, student = make_pair()
    guard = ABDGuard(teacher, student, config=CLASSIC, sv=False, sr_every=2)
    assert guard.sr.schedule is guard.sr_schedule and guard.sr_schedule.start is None
    guard.set_schedule(10, sr_start_fraction=0.5)  # what an adapter does once the host runs
    assert record_of(guard.report(), RetrospectionReport).start == 5
    assert [guard.sr_schedule.active(s) for s in range(4, 9)] == [False, True, False, True, False]
    with guard.retrospection():
        assert guard.in_sr_window() and guard.sr_schedule.active(0)
    assert not guard.in_sr_window()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        guard.set_schedule(sr_start_fraction=1.5)


def _trained_in_guard(loss_fn, *, steps: int = 2) -> ABDGuard:
    """A student trained ``steps`` steps inside a guard with ``loss_fn(student_logits,
    teacher_logits)``; returns the guard (closed)."""
    teacher, student = make_pair()
    opt = torch.optim.SGD(student.parameters(), 0.01)
    torch.manual_seed(0)
    x = TinyGenerator()(torch.randn(8, TinyGenerator().z_dim)).detach()
    with ABDGuard(teacher, student, audit=False, erase=False, sv=False, sr=False) as guard:
        for _ in range(steps):
            with torch.no_grad():
                t = teacher(x)
            loss = loss_fn(student(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return guard


def test_the_guard_tells_a_softmax_loss_from_a_loss_on_logit_values():
    def kl(s, t):
        return F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), log_target=True,
                        reduction="batchmean")

    def ce(s, t):
        return F.cross_entropy(s, t.argmax(1))

    assert _trained_in_guard(kl).student_loss_kind == "softmax"
    assert _trained_in_guard(ce).student_loss_kind == "softmax"
    assert _trained_in_guard(F.l1_loss).student_loss_kind == "values"
    assert _trained_in_guard(F.mse_loss).student_loss_kind == "values"
    assert _trained_in_guard(kl, steps=0).student_loss_kind is None  # no backward seen yet
    g, g2 = _trained_in_guard(F.l1_loss), _trained_in_guard(kl, steps=0)
    g2.load_state_dict(g.state_dict())  # it survives a save and resume
    assert g2.student_loss_kind == "values"
