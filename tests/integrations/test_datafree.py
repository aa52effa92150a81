import pytest
import torch

from abd_fakes import datafree_kd as kd
from abd_fakes import datafree_synthesis as syn
from abd_fakes.common import TinyNet
from abd_plugin.eraser import EraserReport
from abd_plugin.integrations import datafree as adapter
from abd_plugin.integrations._common import HostMismatchError
from conftest import assert_call_order, assert_restored, global_hook_counts, module_hooks, snapshot

CLASSES = [syn.CMISynthesizer, syn.DeepInvSyntheiszer, syn.GenerativeSynthesizer,
           syn.FastSynthesizer, syn.FastMetaSynthesizer]


@pytest.mark.parametrize("method", ["cmi", "deepinv", "fast", "fast_meta", "generative"])
def test_call_order_and_restore(method, events, fast_cfg):
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    events.students.append(student)
    snap = snapshot(kd, *CLASSES)
    hooks0 = global_hook_counts()
    with adapter.patch(kd, synthesis=syn, **fast_cfg) as h:
        kd.main_worker(kd.make_args(method=method), teacher, student)
        guard = h.guard
    assert_call_order(events)
    # one SV term per generator step (CMI's local view and student=teacher are not vaccinated)
    g_steps = events.count("step:G") - (events.count("step:G") // 2 if method == "cmi" else 0)
    assert events.count("sv_in_graph:G") == events.count("backward:G") - (
        1 if method == "generative" else 0
    )
    assert events.count("sv") == events.count("sv_in_graph:G")
    assert events.count("sr") == events.count("step:S") == guard.step == 8
    assert g_steps > 0
    assert_restored(snap)
    assert global_hook_counts() == hooks0
    assert module_hooks(student) == 0 and not guard.active


def test_sr_window_from_host_args(events, fast_cfg):
    fast_cfg.pop("sr_start_step")
    teacher, student = TinyNet(), TinyNet()
    args = kd.make_args(method="deepinv", epochs=4, warmup=1)  # 3 epochs x 4 steps = 12
    with adapter.patch(kd, synthesis=syn, sr_start_fraction=0.75, **fast_cfg) as h:
        kd.main_worker(args, teacher, student)
    assert h.guard.sr_schedule.total_steps == 12 and h.guard.sr_schedule.start == 9
    assert events.count("sr") == 3


def test_mismatch_names_commit():
    class Moved:  # a fork that renamed train's arguments
        @staticmethod
        def train(synth, models, criterion, optimizer, args):
            pass

    with pytest.raises(HostMismatchError, match="0dcecbc"):
        adapter.patch(Moved, synthesis=syn)

    class NoCMI:
        pass

    with pytest.raises(HostMismatchError, match="CMISynthesizer"):
        adapter.patch(kd, synthesis=NoCMI)


def test_double_patch_refused():
    with adapter.patch(kd, synthesis=syn):
        with pytest.raises(RuntimeError, match="already patched"):
            adapter.patch(kd, synthesis=syn)


@pytest.mark.parametrize("method", ["cmi", "generative"])
def test_the_eraser_sees_every_teacher_forward_including_second_views(method, fast_cfg):
    """CMI's local view and ``student=teacher`` get no SV term, but their inputs are erased like
    every other teacher input inside the guard."""
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    cfg = dict(fast_cfg, erase=True, target=0)
    seen = []
    handle = None

    def count(_m, args):
        if handle is not None and handle.sessions and handle.guard.active:
            seen.append(1)

    hk = teacher.register_forward_pre_hook(count)
    try:
        with adapter.patch(kd, synthesis=syn, **cfg) as handle:
            kd.main_worker(kd.make_args(method=method), teacher, student)
            guard = handle.guard
    finally:
        hk.remove()
    rep = guard.report()
    er = rep.get(EraserReport)
    assert er is not None and er.status == "on" and er.target == 0
    assert len(seen) > 0 and guard.eraser.erased_batches == len(seen)
    assert rep.loss_terms_attached > 0


def test_the_default_config_audits_the_teacher_inside_the_host(events):
    """``patch()`` with no settings is the bare default guard: the audit runs at the teacher's
    first batch inside the host and the report carries its verdict; every hook goes away."""
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    hooks0 = global_hook_counts()
    with adapter.patch(kd, synthesis=syn) as h:
        kd.main_worker(kd.make_args(method="deepinv"), teacher, student)
        guard = h.guard
    rep = guard.report()
    er = rep.get(EraserReport)
    assert rep.audit is not None and rep.audit.verdict in ("poisoned", "unsure", "clean")
    # a flagged teacher's mask is on probation until it is confirmed (a short host run)
    assert er is not None and er.status in ("on", "off-clean", "probation", "off-unconfirmed")
    assert global_hook_counts() == hooks0 and module_hooks(teacher) == 0
