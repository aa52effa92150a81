"""Input-gradient alignment (KDIGA): the term against a closed form, its double backward, the
teacher's isolation, the place of its gradient in the step, batch-size invariance, zero-gap
safety, buffers, schedule and state."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDGuard, InputGradientAlignment, iga_loss
from abd_plugin.gradient_alignment import AlignmentReport, input_gradient, safe_norm
from abd_testutils import TinyCNN


def _linear(d: int = 5, c: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def _reference(w_s, b_s, w_t, b_t, x, y, gamma):
    """Closed form for linear models: grad_x CE(Wx + b, y) = W^T (softmax(Wx + b) - e_y) per
    sample; the term is gamma * mean_i ||g_S,i - g_T,i||_2 (no second-order autograd needed)."""
    e = F.one_hot(y, w_s.shape[0]).to(x.dtype)
    g_s = (torch.softmax(x @ w_s.T + b_s, 1) - e) @ w_s
    g_t = (torch.softmax(x @ w_t.T + b_t, 1) - e) @ w_t
    return gamma * (g_s - g_t).norm(dim=1).mean()


def test_term_and_its_gradient_equal_the_closed_form():
    student, teacher = _linear(seed=0), _linear(seed=1)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(3, (7,))
    term = iga_loss(student, teacher, x, y, gamma=2.5)
    w, b = student.weight.detach().requires_grad_(True), student.bias.detach().requires_grad_(True)
    ref = _reference(w, b, teacher.weight.detach(), teacher.bias.detach(), x, y, 2.5)
    assert torch.allclose(term, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(term, [student.weight, student.bias])  # double backward
    want = torch.autograd.grad(ref, [w, b])
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_pseudo_labels_are_the_teachers_argmax():
    student, teacher = _linear(seed=0), _linear(seed=1)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = teacher(x).argmax(1)
    assert torch.equal(iga_loss(student, teacher, x), iga_loss(student, teacher, x, y))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_gradcheck_and_gradgradcheck_of_the_term_in_float64():
    torch.manual_seed(0)
    student, teacher = _MLP().double(), _MLP().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(3, (5,))
    names = [n for n, _ in student.named_parameters()]
    base = {n: p.detach().clone() for n, p in student.named_parameters()}

    def term(w1, w2):
        params = {**base, "fc1.weight": w1, "fc2.weight": w2}
        model = lambda inp: torch.func.functional_call(student, params, (inp,))  # noqa: E731
        g_s, _ = input_gradient(model, x, y, create_graph=True)  # type: ignore[arg-type]
        g_t, _ = input_gradient(teacher, x, y)
        return 0.7 * safe_norm(g_s - g_t).mean()

    w1 = base["fc1.weight"].clone().requires_grad_(True)
    w2 = base["fc2.weight"].clone().requires_grad_(True)
    assert names  # the functional call replaced real parameters
    assert torch.autograd.gradcheck(term, (w1, w2))
    assert torch.autograd.gradgradcheck(term, (w1, w2))
    # and the library function computes the same value and gradient as this functional form
    student.fc1.weight.data.copy_(w1)
    student.fc2.weight.data.copy_(w2)
    lib = iga_loss(student, teacher, x, y, gamma=0.7)
    own = term(w1, w2)
    assert torch.allclose(lib, own)
    g_lib = torch.autograd.grad(lib, [student.fc1.weight, student.fc2.weight])
    g_own = torch.autograd.grad(own, [w1, w2])
    for a, b in zip(g_lib, g_own, strict=True):
        assert torch.allclose(a, b)


def test_safe_norm_has_zero_gradient_at_zero():
    v = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(safe_norm(v).sum(), v)
    assert torch.equal(g, torch.zeros_like(g))
    u = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(safe_norm(u), u.norm(dim=1))


def test_identical_models_give_zero_term_and_finite_zero_gradient():
    torch.manual_seed(0)
    teacher = TinyCNN(4).eval()
    student = copy.deepcopy(teacher)
    x = torch.rand(4, 1, 8, 8)
    term = iga_loss(student, teacher, x)
    assert float(term.detach()) == 0.0
    grads = torch.autograd.grad(term, list(student.parameters()), allow_unused=True)
    assert all(g is None or (torch.isfinite(g).all() and not g.any()) for g in grads)


def test_gamma_does_not_depend_on_the_batch_size():
    """Duplicating the batch leaves the term and its gradient unchanged (per-sample gradients,
    batch mean), also with the student's BatchNorm in train mode."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(6).eval(), TinyCNN(4).train()
    x = torch.rand(5, 1, 8, 8)
    t1 = iga_loss(student, teacher, x, gamma=3.0)
    g1 = torch.autograd.grad(t1, list(student.parameters()))
    t2 = iga_loss(student, teacher, torch.cat([x, x]), gamma=3.0)
    g2 = torch.autograd.grad(t2, list(student.parameters()))
    assert torch.allclose(t1, t2, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _counting_teacher(seed: int = 0) -> tuple[nn.Module, list[int]]:
    torch.manual_seed(seed)
    teacher = TinyCNN(6).eval()
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    return teacher, calls


def _recording_sgd(params, lr: float) -> tuple[torch.optim.SGD, list[list[torch.Tensor]]]:
    """SGD that records every parameter's ``.grad`` as its update starts: a per-optimizer step
    pre-hook, which torch runs after the process-wide ones (the guard's). (A subclass whose
    ``step`` calls ``super().step()`` would pass through torch's step hooks twice once a plain
    SGD has been made in the process.)"""
    opt = torch.optim.SGD(params, lr=lr)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(
        [p.grad.detach().clone() for g in o.param_groups for p in g["params"]]))
    return opt, seen


def test_in_a_guard_the_term_enters_between_backward_and_step_and_the_teacher_is_untouched():
    teacher, calls = _counting_teacher()
    before = [p.detach().clone() for p in teacher.parameters()]
    torch.manual_seed(1)
    student = TinyCNN(4).train()
    ref_student = copy.deepcopy(student)
    opt, seen = _recording_sgd(student.parameters(), lr=0.1)
    iga = InputGradientAlignment(student, teacher, gamma=2.0)
    x = torch.rand(6, 1, 8, 8)
    with ABDGuard(teacher, student, sv=False, sr=False, audit=False, erase=False,
                  hooks=[iga]) as guard:
        with torch.no_grad():
            t = teacher(x)
        n_calls = len(calls)
        loss = F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(t, 1), reduction="batchmean",
                        log_target=True)
        opt.zero_grad()
        loss.backward()
        kd_grads = [p.grad.detach().clone() for p in student.parameters()]
        opt.step()
        assert len(calls) == n_calls  # the replica ran, not the teacher
    # what step() saw = the KD gradient + the term's gradient on the same (pre-step) student
    term = iga_loss(ref_student, teacher, x, gamma=2.0)
    term_grads = torch.autograd.grad(term, list(ref_student.parameters()))
    assert len(seen) == 1
    for at_step, kd, tg in zip(seen[0], kd_grads, term_grads, strict=True):
        assert torch.allclose(at_step, kd + tg, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, teacher.parameters(), strict=True))
    rep = guard.report()
    iga_rep = rep.get(AlignmentReport)
    assert iga_rep is not None and iga_rep.steps == 1 and iga_rep.last_loss > 0
    assert iga_rep.seconds >= iga_rep.align_seconds > 0
    assert "Input-gradient alignment (KDIGA): 1 step(s)" in str(rep)


def test_standalone_align_adds_the_gradient_and_keeps_batchnorm_buffers():
    teacher, calls = _counting_teacher()
    torch.manual_seed(1)
    student = TinyCNN(4).train()
    x = torch.rand(6, 1, 8, 8)
    student(x)  # the user's forward moved the running statistics once
    buffers = [b.clone() for b in student.buffers()]
    iga = InputGradientAlignment(student, teacher, gamma=1.0)
    out = iga.align(x)
    assert not calls and out["loss"] > 0 and out["grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(buffers, student.buffers(), strict=True))
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_explicit_term_backpropagates_after_its_buffers_were_restored():
    """``iga_loss`` restores the student's BatchNorm buffers without breaking the graph the user
    back-propagates later (train and eval mode)."""
    teacher, _ = _counting_teacher()
    torch.manual_seed(1)
    student = TinyCNN(4)
    x = torch.rand(6, 1, 8, 8)
    for mode in (True, False):
        student.train(mode)
        buffers = [b.clone() for b in student.buffers()]
        term = iga_loss(student, teacher, x)
        assert all(torch.equal(a, b) for a, b in zip(buffers, student.buffers(), strict=True))
        term.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_every_k_and_state_round_trip():
    teacher, _ = _counting_teacher()
    torch.manual_seed(1)
    student = TinyCNN(4).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    iga = InputGradientAlignment(student, teacher, every=3)
    with ABDGuard(teacher, student, sv=False, sr=False, audit=False, erase=False,
                  hooks=[iga]) as guard:
        for _ in range(7):
            x = torch.rand(4, 1, 8, 8)
            opt.zero_grad()
            student(x).logsumexp(1).mean().backward()
            opt.step()
        state = guard.state_dict()
    assert iga.steps == 3  # student steps 0, 3, 6
    fresh = InputGradientAlignment(student, teacher, every=3)
    guard2 = ABDGuard(teacher, student, sv=False, sr=False, audit=False, erase=False,
                      hooks=[fresh])
    guard2.load_state_dict(state)
    assert fresh.steps == 3 and fresh.last_loss == iga.last_loss


def test_teacher_gradient_is_cached_for_a_repeated_batch():
    teacher, _ = _counting_teacher()
    student = TinyCNN(4).train()
    iga = InputGradientAlignment(student, teacher)
    x = torch.rand(4, 1, 8, 8)
    iga.align(x)
    cached = iga._cache
    iga.align(x.clone())
    assert iga._cache is cached
    iga.align(torch.rand(4, 1, 8, 8))
    assert iga._cache is not cached


def test_fgsm_point_labels_and_validation():
    teacher, _ = _counting_teacher()
    torch.manual_seed(1)
    student = TinyCNN(4).eval()
    x = torch.rand(4, 1, 8, 8)
    plain = InputGradientAlignment(student, teacher).loss(x)
    fast = InputGradientAlignment(student, teacher, fgsm_eps=0.1, clamp=(0.0, 1.0)).loss(x)
    assert torch.isfinite(fast) and not torch.allclose(plain, fast)
    assert torch.allclose(fast, iga_loss(student, teacher, x, fgsm_eps=0.1, clamp=(0.0, 1.0)))
    y = torch.tensor([1, 2, 3, 4])
    iga = InputGradientAlignment(student, teacher)
    iga.set_labels(y)
    assert iga.align(x)["loss"] == pytest.approx(float(iga_loss(student, teacher, x, y).detach()))
    iga.set_labels(y[:2])
    with pytest.raises(ValueError, match="labels"):
        iga.align(x)
    for bad in ({"gamma": -1.0}, {"every": 0}, {"fgsm_eps": 0.0}, {"clamp": (1.0, 0.0)}):
        with pytest.raises(ValueError):
            InputGradientAlignment(student, teacher, **bad)  # type: ignore[arg-type]


def test_beside_the_eraser_the_term_aligns_with_the_repaired_teacher():
    """With the trigger eraser on, the guard's teacher sees erased inputs; the hook's teacher
    gradient is taken through the same erasure (``GuardContext.teacher_view``), so the student
    is aligned with the teacher the loop distills, not with the backdoored original."""
    teacher, _ = _counting_teacher()
    torch.manual_seed(1)
    student = TinyCNN(4).train()
    ref_student = copy.deepcopy(student)
    opt, seen = _recording_sgd(student.parameters(), lr=0.1)
    iga = InputGradientAlignment(student, teacher, gamma=2.0)
    x = torch.rand(6, 1, 8, 8)
    with ABDGuard(teacher, student, audit=False, target=0, hooks=[iga]) as guard:
        with torch.no_grad():
            t = teacher(x)  # the eraser learns its mask on this batch and erases it
        er = guard.eraser
        assert er is not None and er.mask() is not None
        state = er.state_dict()  # a mask over the left half, as if learned
        logits = torch.full_like(state["mask_logits"], -8.0)
        logits[..., :4] = 3.0
        er.load_state_dict({**state, "mask_logits": logits})
        mask = er.mask().clone()
        loss = F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(t, 1), reduction="batchmean",
                        log_target=True)
        opt.zero_grad()
        loss.backward()
        kd_grads = [p.grad.detach().clone() for p in student.parameters()]
        opt.step()

    class Erased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = teacher

        def forward(self, z):
            return self.t(z * (1 - mask))  # erase_fill = 0

    def step_grads(ref_teacher):
        term = iga_loss(ref_student, ref_teacher, x, gamma=2.0)
        return torch.autograd.grad(term, list(ref_student.parameters()))

    repaired, original = step_grads(Erased()), step_grads(teacher)
    for at_step, kd, tg in zip(seen[0], kd_grads, repaired, strict=True):
        assert torch.allclose(at_step, kd + tg, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5)
               for a, b in zip(repaired, original, strict=True))
    assert all(p.grad is None for p in teacher.parameters())
