"""A resumed guard continues exactly like an uninterrupted one."""
from __future__ import annotations

import io

import pytest
import torch

from abd_plugin import ABDConfig, ABDGuard, DefenseHook
from abd_testutils import TinyGenerator, make_pair
from test_guard import kl

#: SV + SR as published (the suite's SV/SR tests; the default is the audit + eraser)
CLASSIC = ABDConfig.classic()

CFG = dict(verify_batches=3, verify_skip=1, sv_coef=1.0, sr_start_step=4, sr_inner_rounds=2,
           sr_warm_start=True, tail_ratio_threshold=-1.0)  # always accept


def _iteration(teacher, student, gen, og, os_, z):
    x = gen(z)
    loss_g = -kl(teacher(x), student(x))
    og.zero_grad()
    loss_g.backward()
    og.step()
    xs = gen(z).detach()
    with torch.no_grad():
        t = teacher(xs)
    loss_s = kl(t, student(xs))
    os_.zero_grad()
    loss_s.backward()
    os_.step()
    return [p.grad.clone() for p in student.parameters()], [
        p.grad.clone() for p in gen.parameters()
    ]


def _fresh():
    teacher, student = make_pair(seed=5)
    torch.manual_seed(6)
    gen = TinyGenerator()
    og = torch.optim.SGD(gen.parameters(), lr=0.05)
    os_ = torch.optim.SGD(student.parameters(), lr=0.05)
    return teacher, student, gen, og, os_


def test_state_round_trip_equals_uninterrupted_run():
    zs = [torch.randn(8, 8, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    # uninterrupted
    teacher, student, gen, og, os_ = _fresh()
    with ABDGuard(teacher, student, config=CLASSIC, **CFG) as guard:
        ref = [_iteration(teacher, student, gen, og, os_, z) for z in zs]
    assert guard.sv.status == "enabled" and guard.sr.steps == 6
    # interrupted after 5 iterations (mid-verification is done by then; SR has started)
    teacher, student, gen, og, os_ = _fresh()
    with ABDGuard(teacher, student, config=CLASSIC, **CFG) as guard:
        first = [_iteration(teacher, student, gen, og, os_, z) for z in zs[:5]]
        buf = io.BytesIO()
        torch.save(
            {
                "guard": guard.state_dict(),
                "student": student.state_dict(),
                "gen": gen.state_dict(),
                "og": og.state_dict(),
                "os": os_.state_dict(),
            },
            buf,
        )
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    teacher, student, gen, og, os_ = _fresh()
    student.load_state_dict(ck["student"])
    gen.load_state_dict(ck["gen"])
    og.load_state_dict(ck["og"])
    os_.load_state_dict(ck["os"])
    guard = ABDGuard(teacher, student, config=CLASSIC, **CFG)
    guard.load_state_dict(ck["guard"])
    with guard:
        second = [_iteration(teacher, student, gen, og, os_, z) for z in zs[5:]]
    for (rs, rg), (gs, gg) in zip(ref, first + second, strict=True):
        for a, b in zip(rs + rg, gs + gg, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert guard.step == 10 and guard.sr.steps == 6


def test_state_round_trip_while_still_collecting():
    teacher, student, gen, og, os_ = _fresh()
    cfg = dict(CFG, verify_batches=50)
    with ABDGuard(teacher, student, config=CLASSIC, **cfg) as guard:
        _iteration(teacher, student, gen, og, os_, torch.randn(8, 8))
        _iteration(teacher, student, gen, og, os_, torch.randn(8, 8))
        state = guard.state_dict()
    g2 = ABDGuard(teacher, student, config=CLASSIC, **cfg)
    g2.load_state_dict(state)
    assert g2.sv.status == "collecting" and g2.sv.observed == 2 and len(g2.sv._pool_x) == 1


class Counter(DefenseHook):
    """Counts student steps; its state is the count."""

    def __init__(self) -> None:
        self.n = 0

    def on_after_student_step(self, ctx, optimizer):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_state_is_keyed_per_hook_instance():
    teacher, student = make_pair()
    a, b = Counter(), Counter()
    a.n, b.n = 3, 7
    state = ABDGuard(teacher, student, config=CLASSIC, hooks=[a, b]).state_dict()
    assert list(state["hooks"]) == ["ShufflingVaccine", "SelfRetrospection", "Counter",
                                    "Counter[1]"]
    c, d = Counter(), Counter()
    ABDGuard(teacher, student, config=CLASSIC, hooks=[c, d]).load_state_dict(state)
    assert (c.n, d.n) == (3, 7)  # two hooks of one class no longer overwrite each other
    with pytest.raises(ValueError, match="registered twice"):
        ABDGuard(teacher, student, config=CLASSIC, hooks=[a, a])
    with pytest.raises(ValueError, match="state version"):
        ABDGuard(teacher, student, config=CLASSIC).load_state_dict(dict(state, version=1))


def test_a_state_saved_by_the_previous_layout_resumes_the_default_guard():
    """Layout 2 kept the audit at the top level and no input domain: it loads, the audit reaches
    the eraser's gate, and the run continues like one resumed from the current layout."""
    from abd_plugin.eraser import EraserReport
    from abd_testutils import record_of

    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 8, 8, generator=g) for _ in range(8)]

    def resumed(old_layout: bool) -> tuple[torch.Tensor, str]:
        teacher, student = make_pair()
        with torch.no_grad():
            target = int(teacher(torch.cat(batches)).argmax(1).mode().values)
        cfg = ABDConfig(target=target, erase_every=1, audit_steps=3, audit_starts=2)
        guard = ABDGuard(teacher, student, config=cfg)
        with guard, torch.no_grad():
            for x in batches[:4]:
                teacher(x)
        state = guard.state_dict()
        assert state["version"] == 3 and state["domain"]["source"].startswith("read off")
        if old_layout:
            state = dict(state, version=2, audit=state["hooks"]["TeacherAudit"]["audit"],
                         hooks={k: v for k, v in state["hooks"].items() if k != "TeacherAudit"})
            del state["domain"]
        guard = ABDGuard(teacher, student, config=cfg)
        guard.load_state_dict(state)
        with guard, torch.no_grad():
            assert guard.audit_report is not None  # published before the first batch
            for x in batches[4:]:
                teacher(x)
        er = guard.eraser
        assert er is not None and er.updates == 8
        assert record_of(guard.report(), EraserReport).status == "on"
        m = er.mask()
        assert m is not None
        return m, guard.report().audit.state  # type: ignore[union-attr]

    new, old = resumed(False), resumed(True)
    assert torch.equal(new[0], old[0]) and new[1] == old[1]
    with pytest.raises(ValueError, match="state version 1"):
        ABDGuard(*make_pair()).load_state_dict({"version": 1})
