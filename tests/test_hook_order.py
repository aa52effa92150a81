"""The hook contract, generated from DefenseHook's members.

A recording hook gets one method per public callback of :class:`DefenseHook` (every ``on_*``
attribute), built by iterating over the base class, and runs through a tiny data-free KD loop
inside a guard. Every callback must be called, and in contract order. A callback added to
``DefenseHook`` without a dispatch call in the guard fails here; so does one whose place in the
contract is not written down in ``CONTRACT`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from abd_plugin import ABDGuard, DefenseHook
from abd_plugin.retrospection import RetrospectionReport
from abd_plugin.vaccine import VaccineReport
from abd_testutils import TinyGenerator, make_pair, record_of

Log = list[tuple[str, Any]]


def callbacks() -> list[str]:
    """DefenseHook's public callbacks, read off the class."""
    return sorted(n for n in dir(DefenseHook)
                  if n.startswith("on_") and callable(getattr(DefenseHook, n)))


def _kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean",
                    log_target=True)


def _respond(event: str, log: Log, ctx: Any, args: tuple[Any, ...]) -> Any:
    """What the recording hook does beyond recording, for callbacks whose contract says more
    than "called here": a loss term, and the gradients and parameters around the step."""
    if event == "on_teacher_input":
        log.append(("input_grad", bool(args[0].requires_grad)))
        log.append(("audit_seen", ctx.audit is not None))
        return None
    if event == "on_teacher_forward":
        x, logits = args
        assert x.requires_grad and logits.requires_grad  # both still in the graph
        term = 0.0 * logits.sum()
        term.register_hook(lambda g: log.append(("term_backward", None)))
        return term
    if event == "on_before_student_step":
        params = [p for g in args[0].param_groups for p in g["params"]]
        assert all(p.grad is not None for p in params)  # after the user's backward
        log.append(("params_before_step", [p.detach().clone() for p in params]))
    if event == "on_after_student_step":
        params = [p for g in args[0].param_groups for p in g["params"]]
        before = next(v for e, v in reversed(log) if e == "params_before_step")
        assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))  # stepped
    return None


def recording_hook(log: Log) -> DefenseHook:
    """An instance of a DefenseHook subclass whose every ``on_*`` callback records
    ``(event, step seen)`` and then behaves as :func:`_respond` says."""

    def method(event: str) -> Callable[..., Any]:
        def callback(self: DefenseHook, ctx: Any, *args: Any) -> Any:
            assert not isinstance(ctx, ABDGuard)  # hooks get the small context, not the guard
            log.append((event, ctx.step))
            return _respond(event, log, ctx, args)

        callback.__name__ = event
        return callback

    cls = type("Recording", (DefenseHook,), {e: method(e) for e in callbacks()})
    return cls()


def _loop(teacher: torch.nn.Module, student: torch.nn.Module, log: Log) -> None:
    """A ZSKT-style data-free KD loop (1 generator step, 2 student steps) that logs its own
    calls next to the hook's."""
    torch.manual_seed(0)
    gen = TinyGenerator()
    opt_g = torch.optim.Adam(gen.parameters(), 1e-2)
    opt_s = torch.optim.SGD(student.parameters(), 0.1)
    for _ in range(2):
        z = torch.randn(8, gen.z_dim)
        x = gen(z)
        log.append(("call_teacher", None))
        t = teacher(x)
        log.append(("call_student", None))
        loss_g = -_kl(t, student(x))
        opt_g.zero_grad()
        loss_g.backward()
        log.append(("backward_g", None))
        opt_g.step()
        log.append(("step_g", None))
        for _ in range(2):
            xs = gen(z).detach()
            log.append(("call_teacher_nograd", None))
            with torch.no_grad():
                t = teacher(xs)
            log.append(("call_student", None))
            loss_s = _kl(t, student(xs))
            opt_s.zero_grad()
            loss_s.backward()
            log.append(("backward_s", None))
            opt_s.step()
            log.append(("step_s", None))


def _names(log: Log) -> list[str]:
    return [e for e, _ in log if e not in ("params_before_step", "input_grad", "audit_seen")]


def _enter(log: Log) -> None:
    names = _names(log)
    assert names[0] == "on_guard_enter" and names.count("on_guard_enter") == 1


def _exit(log: Log) -> None:
    names = _names(log)
    assert names[-1] == "on_guard_exit" and names.count("on_guard_exit") == 1


def _teacher_forward(log: Log) -> None:
    # on every synthesis forward (input with gradient), inside it; its term is back-propagated
    # by the user's own backward, before that backward returns
    names = _names(log)
    starts = [i for i, e in enumerate(names) if e == "call_teacher"]
    assert names.count("on_teacher_forward") == len(starts) == 2
    assert names.count("term_backward") == len(starts)  # exactly once per forward
    for i in starts:
        after = names[i:]
        assert after[1:4] == ["on_teacher_input", "on_teacher_output", "on_teacher_forward"]
        assert after.index("term_backward") < after.index("backward_g")


def _teacher_input(log: Log) -> None:
    # before every teacher forward, with gradients or not, and before on_teacher_forward
    names = _names(log)
    calls = [i for i, e in enumerate(names) if e in ("call_teacher", "call_teacher_nograd")]
    assert names.count("on_teacher_input") == len(calls) == 6
    assert all(names[i + 1] == "on_teacher_input" for i in calls)
    grads = [g for e, g in log if e == "input_grad"]
    assert grads == [True, False, False] * 2
    # the guard's audit ran before the first teacher batch reached any hook
    assert all(seen for e, seen in log if e == "audit_seen")


def _teacher_output(log: Log) -> None:
    # after every teacher forward whose input the hooks saw (with gradients or not), right
    # after on_teacher_input and before any loss term
    names = _names(log)
    calls = [i for i, e in enumerate(names) if e in ("call_teacher", "call_teacher_nograd")]
    assert names.count("on_teacher_output") == len(calls) == 6
    assert all(names[i + 1:i + 3] == ["on_teacher_input", "on_teacher_output"] for i in calls)


def _student_forward(log: Log) -> None:
    names = _names(log)
    calls = [i for i, e in enumerate(names) if e == "call_student"]
    assert names.count("on_student_forward") == len(calls) == 6
    assert all(names[i + 1] == "on_student_forward" for i in calls)


def _student_step(log: Log) -> None:
    # between the user's backward and the optimizer's step, student optimizers only; the
    # guard's step count moves by one across the step
    names = _names(log)
    steps = [i for i, e in enumerate(names) if e == "step_s"]
    assert len(steps) == 4
    for i in steps:
        assert names[i - 3:i + 1] == ["backward_s", "on_before_student_step",
                                      "on_after_student_step", "step_s"]
    seen = [(e, s) for e, s in log if e in ("on_before_student_step", "on_after_student_step")]
    assert seen == [(e, s) for k in range(4) for e, s in (("on_before_student_step", k),
                                                          ("on_after_student_step", k + 1))]
    g = names.index("backward_g")
    assert names[g:g + 2] == ["backward_g", "step_g"]  # nothing on the generator's step


#: every DefenseHook callback and the check of where the guard calls it
CONTRACT: dict[str, Callable[[Log], None]] = {
    "on_guard_enter": _enter,
    "on_teacher_input": _teacher_input,
    "on_teacher_output": _teacher_output,
    "on_teacher_forward": _teacher_forward,
    "on_student_forward": _student_forward,
    "on_before_student_step": _student_step,
    "on_after_student_step": _student_step,
    "on_guard_exit": _exit,
}


def check_contract() -> None:
    events = callbacks()
    assert events, "DefenseHook has no on_* callbacks?"
    teacher, student = make_pair()
    log: Log = []
    with ABDGuard(teacher, student, hooks=[recording_hook(log)], sv=False, sr=False,
                  erase=False, audit_steps=2, audit_starts=2):
        _loop(teacher, student, log)
    called = {e for e, _ in log}
    missing = [e for e in events if e not in called]
    assert not missing, f"DefenseHook callbacks the guard never calls: {missing}"
    unwritten = [e for e in events if e not in CONTRACT]
    assert not unwritten, f"write the contract of {unwritten} into CONTRACT in this file"
    for event in events:
        CONTRACT[event](log)


def test_every_callback_is_called_in_contract_order():
    check_contract()


def test_a_callback_the_guard_does_not_call_fails_the_contract(monkeypatch):
    monkeypatch.setattr(DefenseHook, "on_something_new", lambda self, ctx: None, raising=False)
    with pytest.raises(AssertionError, match=r"never calls: \['on_something_new'\]"):
        check_contract()


def test_dispatch_times_every_hook():
    teacher, student = make_pair()
    log: Log = []
    with ABDGuard(teacher, student, hooks=[recording_hook(log)], verify=False, shuffle_layers=1,
                  sr_start_step=0, sr_inner_rounds=1, sv=True, sr=True, audit=False,
                  erase=False) as guard:
        _loop(teacher, student, log)
    rep = guard.report()
    sv, sr = record_of(rep, VaccineReport), record_of(rep, RetrospectionReport)
    assert sv.seconds > 0 and sr.seconds > 0
    assert sv.calls == 2 and sr.steps == 4


class _Doubler(DefenseHook):
    """Hands the loop twice the teacher's logits; records what the loss term saw."""

    def __init__(self, shape_error: bool = False) -> None:
        self.shape_error = shape_error
        self.term_logits: list[torch.Tensor] = []

    def on_teacher_output(self, ctx: Any, x: torch.Tensor, teacher_logits: torch.Tensor) -> Any:
        return teacher_logits[:, :3] if self.shape_error else teacher_logits * 2

    def on_teacher_forward(self, ctx: Any, x: torch.Tensor, teacher_logits: torch.Tensor) -> Any:
        self.term_logits.append(teacher_logits.detach().clone())
        return None


def test_logits_a_hook_returns_from_on_teacher_output_reach_the_loop_and_the_loss_terms():
    teacher, student = make_pair()
    x = TinyGenerator()(torch.randn(4, TinyGenerator().z_dim))
    with torch.no_grad():
        plain = teacher(x)
    hook = _Doubler()
    with ABDGuard(teacher, student, hooks=[hook], sv=False, sr=False, erase=False,
                  audit=False):
        with torch.no_grad():
            assert torch.equal(teacher(x), plain * 2)  # without gradients too
        out = teacher(x)  # a synthesis forward: the loss term sees the replaced logits
        assert torch.allclose(out, plain * 2)
    assert len(hook.term_logits) == 1 and torch.allclose(hook.term_logits[0], plain * 2)
    with torch.no_grad():
        assert torch.equal(teacher(x), plain)  # hooks removed


def test_on_teacher_output_of_another_shape_is_a_clear_error():
    teacher, student = make_pair()
    x = torch.rand(4, *TinyGenerator()(torch.randn(1, TinyGenerator().z_dim)).shape[1:])
    with ABDGuard(teacher, student, hooks=[_Doubler(shape_error=True)], sv=False, sr=False,
                  erase=False, audit=False):
        with pytest.raises(RuntimeError, match="on_teacher_output returned .* same shape"):
            teacher(x)
