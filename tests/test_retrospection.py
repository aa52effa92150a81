"""Self-Retrospection: gradients are added (never replaced), BN statistics and the teacher are
untouched, perturbation synthesis increases the deviation, dtype-agnostic."""
from __future__ import annotations

import copy

import pytest
import torch

from abd_plugin import SelfRetrospection
from abd_plugin.retrospection import RetrospectionSettings as RS
from abd_plugin.retrospection import _kl
from abd_testutils import make_pair


def test_retrospect_adds_to_existing_grad_and_keeps_bn_stats():
    teacher, student = make_pair()
    cfg = RS(inner_rounds=3)
    x = torch.rand(16, 1, 8, 8)
    # reference gradients from a twin
    twin = SelfRetrospection(copy.deepcopy(student), teacher, cfg, seed=1)
    ref = twin.gradients(x)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    bufs = [b.clone() for b in student.buffers()]
    sr = SelfRetrospection(student, teacher, cfg, seed=1)
    stats = sr.retrospect(x)
    for p, g in zip(student.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, torch.ones_like(p) + g, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(bufs, student.buffers(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    assert stats["grad_norm"] > 0 and sr.steps == 1


def test_synthesized_perturbation_moves_the_model(poisoned_digits):
    teacher, x, _ = poisoned_digits
    _, student = make_pair()
    x = x[:32]
    sr = SelfRetrospection(student, teacher, RS(inner_rounds=10))
    delta = sr.synthesize(x)
    assert delta.shape == (1, 1, 16, 16)
    with torch.no_grad():
        dev = _kl(teacher(x), teacher(x + delta), 1.0)
        g = torch.Generator().manual_seed(0)
        noise = torch.stack(
            [  # random directions of the same norm, seeded
                _kl(
                    teacher(x),
                    teacher(
                        x + (r := torch.randn(delta.shape, generator=g)) * delta.norm() / r.norm()
                    ),
                    1.0,
                )
                for _ in range(8)
            ]
        ).mean()
    assert dev > 0.1 and dev > 3 * noise
    assert sr.synthesize(x) is delta  # same batch, frozen teacher: cached


def test_epsilon_ball_projection(poisoned_digits):
    teacher, x, _ = poisoned_digits
    _, student = make_pair()
    sr = SelfRetrospection(student, teacher, RS(inner_rounds=5, epsilon=0.05))
    assert sr.synthesize(x[:8]).norm() <= 0.05 + 1e-6
    sr = SelfRetrospection(student, teacher, RS(inner_rounds=5, epsilon_rms=0.01))
    assert sr.synthesize(x[:8]).norm() <= 0.01 * 16 + 1e-6  # 1x16x16 elements


def test_warm_start_carries_the_perturbation(poisoned_digits):
    teacher, x, _ = poisoned_digits
    _, student = make_pair()
    x = x[:16]
    sr = SelfRetrospection(student, teacher, RS(inner_rounds=2, warm_start=True))
    d1 = sr.synthesize(x)
    d2 = sr.synthesize(x)
    cold = SelfRetrospection(student, teacher, RS(inner_rounds=4))
    d4 = cold.synthesize(x)
    assert not torch.equal(d1, d2)
    torch.testing.assert_close(d2, d4)  # 2 + 2 warm rounds == 4 rounds from the same start


def test_student_as_perturbation_model_needs_no_teacher():
    _, student = make_pair()
    sr = SelfRetrospection(student, None, RS(pert_model="student", inner_rounds=1))
    sr.retrospect(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="needs the teacher"):
        SelfRetrospection(student, None, RS())


def test_float64_models():
    teacher, student = make_pair()
    teacher, student = teacher.double(), student.double()
    sr = SelfRetrospection(student, teacher, RS(inner_rounds=1))
    sr.retrospect(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    assert all(p.grad.dtype == torch.float64 for p in student.parameters())


def test_sr_lowers_a_backdoored_students_trigger_sensitivity(poisoned_digits):
    """SR on a poisoned model with its own clean-ish inputs lowers the attack success rate."""
    from abd_testutils import stamp

    model, x, y = poisoned_digits
    student = copy.deepcopy(model).train()
    for m in student.modules():  # keep BN statistics fixed: only SR moves the weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    xs = x[y != 0]
    with torch.no_grad():
        asr0 = (model(stamp(xs)).argmax(1) == 0).float().mean().item()
    sr = SelfRetrospection(student, model, RS(inner_rounds=10))  # paper recipe
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        b = x[torch.randint(len(x), (64,), generator=g)]
        opt.zero_grad()
        with torch.no_grad():
            t = model(b)
        _kl(t, student(b), 1.0).backward()
        sr.retrospect(b)
        opt.step()
    student.eval()
    with torch.no_grad():
        asr1 = (student(stamp(xs)).argmax(1) == 0).float().mean().item()
        acc1 = (student(xs).argmax(1) == y[y != 0]).float().mean().item()
    assert asr0 > 0.9
    assert asr1 < asr0 - 0.2, (asr0, asr1)
    assert acc1 > 0.9
