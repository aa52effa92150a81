import os
import sys

import pytest
import torch
from torch.optim import optimizer as optim_mod

sys.path.insert(0, os.path.dirname(__file__))

from abd_fakes import common  # noqa: E402
from abd_plugin import SelfRetrospection, ShufflingVaccine  # noqa: E402

#: small, fast ABD settings: SV on from the first batch, SR from the first student step (the
#: adapters' call-order contract is about SV and SR; the default audit + eraser is off here)
FAST = dict(sv=True, sr=True, audit=False, erase=False, verify=False, shuffle_layers=1,
            n_shuffle_models=2, sr_start_step=0, sr_inner_rounds=1, sr_fixed_point_iters=1)


@pytest.fixture
def fast_cfg():
    return dict(FAST)


@pytest.fixture
def events(monkeypatch):
    """Record SV penalties, SR steps, host traces and optimizer steps (tagged S for optimizers
    holding a registered student's parameters, else G) in one list."""
    common.EVENTS.clear()
    students = []
    orig_pen, orig_sr = ShufflingVaccine.penalty, SelfRetrospection.retrospect

    def penalty(self, x, t, **kw):
        common.EVENTS.append("sv")
        return orig_pen(self, x, t, **kw)

    inside_sr = []

    def retrospect(self, x, **kw):
        common.EVENTS.append("sr")
        inside_sr.append(1)
        try:
            return orig_sr(self, x, **kw)
        finally:
            inside_sr.pop()

    monkeypatch.setattr(ShufflingVaccine, "penalty", penalty)
    monkeypatch.setattr(SelfRetrospection, "retrospect", retrospect)

    def post(opt, args, kwargs):
        if inside_sr:  # SR's own perturbation optimizer
            return
        ids = {id(p) for s in students for p in s.parameters()}
        tag = "S" if any(id(p) in ids for g in opt.param_groups for p in g["params"]) else "G"
        common.EVENTS.append("step:" + tag)

    h = optim_mod.register_optimizer_step_post_hook(post)
    common.EVENTS.students = students  # type: ignore[attr-defined]
    yield common.EVENTS
    h.remove()


def global_hook_counts():
    return (len(optim_mod._global_optimizer_pre_hooks), len(optim_mod._global_optimizer_post_hooks))


def module_hooks(*models):
    n = 0
    for model in models:
        for m in model.modules():
            n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


def state_differences(a, b, path=""):
    """Where two (guard) states differ, as paths; wall times (``seconds`` keys) aside (two NaN
    floats, e.g. the counters of a repair that never learned, are the same)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [path]
        return [d for k in a if k != "seconds"
                for d in state_differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in state_differences(x, y, f"{path}/{i}")]
    both_nan = isinstance(a, float) and isinstance(b, float) and a != a and b != b
    return [] if a == b or both_nan else [path]


def snapshot(*owners):
    return [(o, dict(vars(o))) for o in owners]


def assert_restored(snap, ignore=()):
    """Every attribute of the patched owners is the same object as before (``ignore``: state the
    host itself mutates, e.g. Fast-Datafree's ``time_cost`` counter)."""
    for owner, before in snap:
        after = dict(vars(owner))
        assert after.keys() == before.keys(), (owner, set(after) ^ set(before))
        for k in set(before) - set(ignore):
            assert after[k] is before[k], (owner, k)


def assert_call_order(ev, sr=True):
    """The contract: every generator step has the SV term in its loss graph before backward and
    before its step; every SR runs after a student backward and before the student step."""
    assert "sv" in ev and ("sr" in ev) == sr, ev
    for i, e in enumerate(ev):
        if e == "sr":
            prev = [x for x in ev[:i] if x.startswith(("backward:", "step:"))]
            assert prev and prev[-1] == "backward:S", ev[max(0, i - 6):i + 2]
            nxt = [x for x in ev[i + 1:] if x.startswith(("backward:", "step:"))]
            assert nxt and nxt[0] == "step:S", ev[i:i + 6]
        if e == "sv_in_graph:G":
            assert ev[i + 1] == "loss:G" and ev[i + 2] == "backward:G" and ev[i + 3] == "step:G", (
                ev[i : i + 4]
            )
            before = [x for x in ev[:i] if x in ("sv", "backward:G")]
            assert before and before[-1] == "sv", ev[max(0, i - 6):i + 1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU models: one intra-op thread is several times faster than two here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
