"""Issue 10: no crash when SR opens (dtypes, autocast), a bounded reweighting, a policy for NaN,
and no silent no-op behind a reassuring report. Each test failed on the code before the fix."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDConfig, ABDGuard, ABDWarning, DefenseHook, ShufflingVaccine
from abd_plugin.retrospection import RetrospectionReport
from abd_plugin.vaccine import VaccineReport, VaccineSettings
from abd_testutils import TinyCNN, TinyGenerator, make_pair, record_of, stamp

#: SV + SR as published (the suite's SV/SR tests; the default is the audit + eraser)
CLASSIC = ABDConfig.classic()


def _kl(t, s):
    return F.kl_div(F.log_softmax(s.float(), 1), F.log_softmax(t.float(), 1),
                    reduction="batchmean", log_target=True)


def _abd_warnings(record, needle):
    return [w for w in record if issubclass(w.category, ABDWarning) and needle in str(w.message)]


# ------------------------------------------------------------------ crashes
class _AmpProbe(DefenseHook):
    """Records the autocast state each student step's hooks run under."""

    name = "probe"

    def __init__(self):
        self.seen = []

    def on_before_student_step(self, ctx, optimizer):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))


def _mixed_loop(teacher, student, *, autocast: bool, steps: int = 2, **cfg):
    """A ZSKT-style loop; the teacher gets its batch in its own dtype, as a user would write."""
    gen = TinyGenerator()
    og = torch.optim.Adam(gen.parameters(), 1e-2)
    os_ = torch.optim.Adam(student.parameters(), 1e-2)
    tdt = next(teacher.parameters()).dtype
    probe = _AmpProbe()
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
           else torch.autocast("cpu", enabled=False))
    with ABDGuard(teacher, student, config=CLASSIC,
                  hooks=[probe], verify=False, shuffle_layers=1, sv_coef=1.0,
                  sr_start_step=0, sr_inner_rounds=2, **cfg) as guard:
        for _ in range(steps):
            z = torch.randn(8, gen.z_dim)
            with amp:
                x = gen(z)
                loss_g = -_kl(teacher(x.to(tdt)), student(x))
            og.zero_grad()
            loss_g.backward()
            og.step()
            with amp:
                xs = gen(z).detach()
                with torch.no_grad():
                    t = teacher(xs.to(tdt))
                loss_s = _kl(t, student(xs))
            os_.zero_grad()
            loss_s.backward()
            os_.step()
    return guard, probe


@pytest.mark.parametrize("case", ["autocast_bf16", "float64_teacher", "bf16_teacher"])
def test_sr_and_sv_run_in_the_dtype_and_autocast_of_the_users_forward(case):
    torch.manual_seed(0)
    teacher, student = make_pair()
    if case == "float64_teacher":
        teacher = teacher.double()
    elif case == "bf16_teacher":
        teacher = teacher.bfloat16()
    guard, probe = _mixed_loop(teacher, student, autocast=case == "autocast_bf16")
    rep = guard.report()
    sv, sr = record_of(rep, VaccineReport), record_of(rep, RetrospectionReport)
    assert sr.steps == 2 and sv.calls == 2 and not rep.warnings, rep
    assert all(torch.isfinite(p).all() for p in student.parameters())
    # every hook ran in the autocast state of the user's student forward
    want = (True, torch.bfloat16) if case == "autocast_bf16" else (False,)
    assert all(s[: len(want)] == want for s in probe.seen), probe.seen


def test_explicit_sv_calls_take_a_batch_in_another_dtype_than_the_teacher():
    teacher, student = make_pair()
    teacher = teacher.double()
    guard = ABDGuard(teacher, student, config=CLASSIC, verify=True, verify_batches=1, verify_skip=0,
                     shuffle_layers=1, tail_ratio_threshold=-1.0, sr=False)
    x = torch.rand(8, 1, 8, 8, requires_grad=True)  # float32, the student's dtype
    t = teacher(x.double())
    guard.observe(x, t)  # verification forwards the float32 pool through a float64 replica
    assert guard.sv.status == "enabled"
    assert guard.suspicious(x, t).shape == (8,)
    pen = guard.vaccine_penalty(x, t)
    assert torch.isfinite(pen)


def _digits_task(teacher, x, y, *, coef, cap=None, steps=300):
    """Fixed transfer set (digits with 6/64 triggered), reweighted KD into a small MLP."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(student.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    kw = {} if cap is None else {"sv_reweight_cap": cap}
    losses = []
    with ABDGuard(teacher, student, config=CLASSIC,
                  verify=False, shuffle_layers=1, sv_coef=coef, sr=False,
                  **kw) as guard:
        for _ in range(steps):
            b = x[torch.randint(len(x), (64,), generator=g)].clone()
            b[:6] = stamp(b[:6])
            with torch.no_grad():
                t = teacher(b)
            per = F.kl_div(F.log_softmax(student(b), 1), F.log_softmax(t, 1), reduction="none",
                           log_target=True).sum(1)
            loss = guard.reweight(per, guard.suspicious(b, t))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    student.eval()
    with torch.no_grad():
        acc = (student(x).argmax(1) == y).float().mean().item()
        asr = (student(stamp(x[y != 0])).argmax(1) == 0).float().mean().item()
    return losses, acc, asr


def test_reweight_on_a_fixed_transfer_set_stays_bounded_at_coefficient_1(poisoned_digits):
    """Before: the loss ran to about -1e5 and accuracy to 11 % (chance)."""
    teacher, x, y = poisoned_digits
    losses, acc, asr = _digits_task(teacher, x, y, coef=1.0)
    assert acc > 0.75, acc
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses) >= -1.0 * 5.0 - 1e-5, min(losses)  # -coef * the default cap
    _, acc0, asr0 = _digits_task(teacher, x, y, coef=0.0)  # vanilla KD on the same set
    assert asr < asr0 - 0.2, (asr, asr0)  # the bounded anti-distillation still acts
    assert acc0 > 0.9


def test_reweight_changes_only_where_the_cap_is_hit():
    teacher, _ = make_pair()
    sv = ShufflingVaccine(teacher, VaccineSettings(verify=False, coef=0.5, reweight_cap=2.0))
    loss = torch.tensor([1.0, 1.5, 3.0, 9.0], requires_grad=True)
    mask = torch.tensor([False, True, False, True])
    out = sv.reweight(loss, mask)
    assert out.item() == pytest.approx(2.0 - 0.5 * (1.5 + 2.0) / 2)  # 9.0 counts as the cap
    out.backward()
    assert loss.grad.tolist() == pytest.approx([0.5, -0.25, 0.5, 0.0])  # no push past the cap
    with pytest.raises(ValueError, match="NaN"):
        sv.reweight(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]))


def test_non_finite_batch_to_retrospect_is_refused_and_writes_nothing():
    teacher, student = make_pair()
    guard = ABDGuard(teacher, student, config=CLASSIC, sv=False, sr_inner_rounds=1)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.rand(4, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        guard.retrospect(x)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        guard.sr.retrospect(x)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in student.parameters())


def test_non_finite_sr_gradient_is_skipped_and_reported_once(monkeypatch):
    teacher, student = make_pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.rand(8, 1, 8, 8)
    with ABDGuard(teacher, student, config=CLASSIC,
                  sv=False, sr_start_step=0, sr_inner_rounds=1) as guard:
        real = guard.sr.gradients
        monkeypatch.setattr(guard.sr, "gradients", lambda xb, d=None: [
            torch.full_like(g, float("nan")) for g in real(xb, d)])
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                _kl(teacher(x), student(x)).backward()
                own = [p.grad.clone() for p in student.parameters()]
                opt.step()
                # the student stepped on its own gradient only: finite, unchanged by SR
                assert all(torch.isfinite(p).all() for p in student.parameters())
                assert all(torch.equal(a, p.grad) for a, p in
                           zip(own, student.parameters(), strict=True))
    rep = guard.report()
    sr = record_of(rep, RetrospectionReport)
    assert sr.steps == 0 and sr.skipped == {"non_finite_gradient": 3}
    assert len(_abd_warnings(rec, "NaN/Inf")) == 1
    assert any("NaN/Inf" in w for w in rep.warnings) and "WARNING" in str(rep)


# ------------------------------------------------------------------ silent no-ops
def test_student_in_eval_mode_is_reported_not_silent():
    teacher, student = make_pair()
    student.eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.rand(8, 1, 8, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ABDGuard(teacher, student, config=CLASSIC,
                      sv=False, sr_start_step=0, sr_inner_rounds=1) as guard:
            for _ in range(4):
                opt.zero_grad()
                _kl(teacher(x), student(x)).backward()
                opt.step()
    rep = guard.report()
    sr = record_of(rep, RetrospectionReport)
    assert sr.steps == 0 and sr.skipped == {"student_in_eval_mode": 4}
    assert len(_abd_warnings(rec, "eval() mode")) == 1  # once per guard, not per step
    assert any("eval() mode" in w for w in rep.warnings)


def _dfad_like(detach: bool, steps: int = 3):
    teacher, student = make_pair()
    gen = TinyGenerator()
    og = torch.optim.Adam(gen.parameters(), 1e-2)
    os_ = torch.optim.Adam(student.parameters(), 1e-2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ABDGuard(teacher, student, config=CLASSIC, verify=False, shuffle_layers=1, sv_coef=1.0,
                      sr=False) as guard:
            for _ in range(steps):
                z = torch.randn(8, gen.z_dim)
                x = gen(z)
                t = teacher(x)
                loss_g = -F.l1_loss(student(x), t.detach() if detach else t)
                og.zero_grad()
                loss_g.backward()
                og.step()
                xs = gen(z).detach()
                with torch.no_grad():
                    ts = teacher(xs)
                os_.zero_grad()
                F.l1_loss(student(xs), ts).backward()
                os_.step()
    return guard.report(), rec


def test_detached_teacher_logits_in_the_generator_loss_are_reported():
    rep, rec = _dfad_like(detach=True)
    assert rep.loss_terms_attached == 3 and rep.loss_terms_backpropagated == 0
    assert "never reached a backward" in record_of(rep, VaccineReport).message
    assert any("teacher(x).detach()" in w for w in rep.warnings)
    assert len(_abd_warnings(rec, "none was back-propagated")) == 1
    ok, rec = _dfad_like(detach=False)
    assert ok.loss_terms_attached == ok.loss_terms_backpropagated == 3
    assert not ok.warnings and not _abd_warnings(rec, "")


def test_generator_output_without_grad_reports_that_sv_never_ran():
    teacher, student = make_pair()
    gen = TinyGenerator()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ABDGuard(teacher, student, config=CLASSIC, verify=False, sr=False) as guard:
            for _ in range(3):
                x = gen(torch.randn(8, gen.z_dim)).detach()  # not in the graph
                (-_kl(teacher(x), student(x))).backward()
    rep = guard.report()
    sv = record_of(rep, VaccineReport)
    assert sv.calls == 0
    assert "never ran" in sv.message and "0 shuffled layer(s)" not in sv.message
    assert any("SV never ran" in w for w in rep.warnings)
    assert len(_abd_warnings(rec, "SV never ran")) == 1


def test_a_second_active_guard_on_the_same_student_is_refused():
    teacher, student = make_pair()
    first = ABDGuard(teacher, student, config=CLASSIC, sv=False, sr=False)
    second = ABDGuard(teacher, nn.DataParallel(student), config=CLASSIC,
                      sv=False, sr=False)  # same student
    with first:
        with pytest.raises(RuntimeError, match="another ABDGuard is already active"):
            second.attach()
        assert not second.active
    with second:  # the first one left: fine
        pass
    with pytest.raises(KeyError):
        with first:
            raise KeyError("boom")
    with second:  # the registry was cleaned after the exception too
        assert second.active
    other_teacher, other_student = make_pair(seed=1)
    with first, ABDGuard(other_teacher, other_student, config=CLASSIC, sv=False, sr=False):
        pass  # guards on different students coexist


def test_explicit_retrospect_inside_the_automatic_window_is_a_no_op_with_a_warning():
    teacher, student = make_pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.rand(8, 1, 8, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ABDGuard(teacher, student, config=CLASSIC,
                      sv=False, sr_start_step=2, sr_inner_rounds=1) as guard:
            results = []
            for _ in range(4):
                opt.zero_grad()
                _kl(teacher(x), student(x)).backward()
                results.append(guard.retrospect()["skipped"])
                opt.step()
    # steps 0, 1: explicit SR ran; steps 2, 3: the automatic window was open, SR ran there once
    assert results == [0.0, 0.0, 1.0, 1.0]
    rep = guard.report()
    sr = record_of(rep, RetrospectionReport)
    assert sr.steps == 4 and sr.skipped == {"explicit_call_in_automatic_window": 2}
    assert len(_abd_warnings(rec, "automatic SR window")) == 1


def test_backward_twice_through_the_same_teacher_logits_applies_sv_once(poisoned_digits):
    teacher = poisoned_digits[0]  # a trained teacher: the SV gradient is not negligible here
    student = TinyCNN(4)
    torch.manual_seed(0)
    gen = TinyGenerator(size=16)
    z = torch.randn(8, gen.z_dim)
    cfg = dict(verify=False, shuffle_layers=2, sv_coef=1.0, sr=False)

    def gen_grad():
        out = torch.cat([p.grad.flatten() for p in gen.parameters()])
        for p in gen.parameters():
            p.grad = None
        return out

    guard = ABDGuard(teacher, student, config=CLASSIC, **cfg)
    with guard:
        x = gen(z)
        loss = -_kl(teacher(x), student(x))
        loss.backward(retain_graph=True)
        loss.backward()
    got = gen_grad()
    assert guard.report().loss_terms_backpropagated == 1
    x = gen(z)
    (-_kl(teacher(x), student(x))).backward()
    user = gen_grad()
    x = gen(z)
    ABDGuard(teacher, student, config=CLASSIC, **cfg).vaccine_penalty(x, teacher(x)).backward()
    sv = gen_grad()
    assert sv.norm() > 0.05
    torch.testing.assert_close(got, 2 * user + sv)  # the user's loss twice, the SV term once


def test_the_report_counts_shuffles_as_max_shuffle_trials_does():
    torch.manual_seed(0)
    teacher = TinyCNN(8).eval()  # auto candidates: conv2, conv3, fc
    cfg = VaccineSettings(verify_batches=2, verify_skip=0, max_shuffle_trials=8,
                          tail_ratio_threshold=0.99)
    sv = ShufflingVaccine(teacher, cfg)
    for _ in range(2):
        x = torch.rand(16, 1, 8, 8)
        with torch.no_grad():
            sv.observe(x, teacher(x))
    assert sv.status == "disabled"
    assert [t["kind"] for t in sv.trials] == ["depth"] * 3 + ["reshuffle"] * 7
    assert sv.shuffles_tried == 8
    assert "after 8 shuffle(s)" in sv.message and "3 depth(s) scored first" in sv.message


# ------------------------------------------------------------------ shapes and entry checks
def test_logits_with_the_wrong_number_of_classes_name_both_shapes():
    teacher, student = make_pair()  # 10 classes
    guard = ABDGuard(teacher, student, config=CLASSIC, verify=False, shuffle_layers=1, sr=False)
    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(8, 5\).*10"):
        guard.suspicious(x, torch.randn(8, 5))
    guard.suspicious(x, teacher(x))  # built now
    for call in (guard.suspicious, guard.vaccine_penalty, guard.observe):
        with pytest.raises(ValueError, match=r"shape \(8, 5\): 5 classes.*has 10"):
            call(x, torch.randn(8, 5))
    # before the vaccine is built: the first logits given are checked against the teacher's
    sv = ShufflingVaccine(teacher, VaccineSettings(verify_batches=1, verify_skip=0))
    with pytest.raises(ValueError, match=r"shape \(8, 5\): 5 classes.*has 10"):
        sv.observe(x, torch.randn(8, 5))
    sv.observe(x, teacher(x))  # the right logits are taken afterwards
    assert sv.status != "collecting"


def test_observe_checks_its_inputs_like_the_other_entry_points():
    teacher, student = make_pair()
    guard = ABDGuard(teacher, student, config=CLASSIC, sr=False)
    x = torch.rand(8, 1, 8, 8)
    t = teacher(x).detach()
    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        guard.observe(x, bad)
    with pytest.raises(TypeError, match="integer dtype"):
        guard.observe((x * 255).to(torch.uint8), t)
    nan_x = x.clone()
    nan_x[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        guard.observe(nan_x, t)
    assert guard.sv.observed == 0  # nothing was pooled
