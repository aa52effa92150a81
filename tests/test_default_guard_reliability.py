"""The default guard (audit + trigger eraser) in the settings real loops use: autocast and other
dtypes, a teacher whose output is not its logits, a teacher left in train() mode."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDGuard, ABDWarning
from abd_plugin.eraser import EraserReport
from abd_testutils import TinyCNN, TinyGenerator, make_pair, record_of


def _out(y):
    return (y[1] if isinstance(y, tuple) else y).float()


def _loop(teacher, student, gen, n=6, dtype=None, autocast=False):
    """A ZSKT-style loop: a generator step through the teacher, then a student step."""
    og = torch.optim.Adam(gen.parameters(), 1e-2)
    os_ = torch.optim.Adam(student.parameters(), 1e-2)
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
           else torch.autocast("cpu", enabled=False))
    for i in range(n):
        z = torch.randn(16, gen.z_dim, generator=torch.Generator().manual_seed(i))
        with ctx:
            x = gen(z)
            xt = x if dtype is None else x.to(dtype)
            loss_g = -F.l1_loss(student(x).float(), _out(teacher(xt)))
        og.zero_grad()
        loss_g.backward()
        og.step()
        with ctx:
            x = gen(z).detach()
            xt = x if dtype is None else x.to(dtype)
            with torch.no_grad():
                t = _out(teacher(xt))
            loss_s = F.l1_loss(student(x).float(), t)
        os_.zero_grad()
        loss_s.backward()
        os_.step()


@pytest.mark.parametrize("case", ["autocast_bf16", "bf16_teacher", "float64_teacher"])
def test_the_eraser_learns_and_re_audits_in_any_dtype_and_autocast(case):
    teacher, student = make_pair()
    dtype = {"bf16_teacher": torch.bfloat16, "float64_teacher": torch.float64}.get(case)
    if dtype is not None:
        teacher = teacher.to(dtype)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    gen = TinyGenerator()
    with torch.no_grad():  # a class the teacher gives to some of the generator's samples
        x0 = gen(torch.randn(64, gen.z_dim, generator=torch.Generator().manual_seed(0)))
        target = int(teacher(x0 if dtype is None else x0.to(dtype)).argmax(1).mode().values)
    with ABDGuard(teacher, student, target=target, erase_every=1, erase_recheck=2,
                  audit_steps=4, audit_starts=2) as guard:
        _loop(teacher, student, gen, dtype=dtype, autocast=case == "autocast_bf16")
    er = record_of(guard.report(), EraserReport)
    assert er.status == "on" and er.updates == 12 and len(er.rechecks) >= 1  # 2 batches/it
    assert guard.audit_report is not None and guard.audit_report.verdict in (
        "poisoned", "unsure", "clean")
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


class _FeaturesFirst(nn.Module):
    """A teacher returning ``(features, logits)``: the default rule reads 32 'classes'."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN(8, classes=32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def test_a_teacher_whose_first_output_is_not_its_logits_is_refused_before_the_audit():
    torch.manual_seed(0)
    teacher, student = _FeaturesFirst().eval(), TinyCNN(4)
    gen = TinyGenerator()
    guard = ABDGuard(teacher, student)
    with pytest.raises(ValueError, match=r"teacher's output gives 32 classes but the student's "
                                         r"gives 10.*logits_fn="):
        with guard:
            _loop(teacher, student, gen, n=1)
    assert guard.audit_report is None  # refused before the audit's seconds were spent
    assert not teacher._forward_pre_hooks and not teacher._forward_hooks
    # said where the logits are, it runs
    with ABDGuard(teacher, student, logits_fn=lambda out: out[1] if isinstance(out, tuple)
                  else out, audit_steps=3, audit_starts=2) as guard:
        _loop(teacher, student, gen, n=2)
    assert guard.audit_report is not None and len(guard.audit_report.statistic) == 10


def test_a_teacher_in_train_mode_is_warned_about_and_the_guard_adds_no_forward_to_it():
    teacher, student = make_pair()
    teacher.train()
    gen = TinyGenerator()
    with torch.no_grad():
        x0 = gen(torch.randn(64, gen.z_dim, generator=torch.Generator().manual_seed(0)))
        target = int(teacher.eval()(x0).argmax(1).mode().values)
    teacher.train()
    tracked = teacher.bn1.num_batches_tracked.clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ABDGuard(teacher, student, target=target, erase_every=1, audit_steps=3,
                      audit_starts=2) as guard:
            _loop(teacher, student, gen, n=3)
    # the loop's own 6 teacher calls (3 generator steps, 3 student targets), not one more
    assert int(teacher.bn1.num_batches_tracked - tracked) == 6
    assert guard.eraser is not None and guard.eraser.updates == 6  # the guard did work
    ours = [w for w in rec if issubclass(w.category, ABDWarning) and "train() mode" in
            str(w.message)]
    assert len(ours) == 1
    assert any("teacher.eval()" in w for w in guard.report().warnings)
    # an eval-mode teacher: no such warning
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ABDGuard(teacher.eval(), student, audit_steps=3, audit_starts=2):
            _loop(teacher, student, gen, n=1)
    assert not [w for w in rec if "train() mode" in str(w.message)]
