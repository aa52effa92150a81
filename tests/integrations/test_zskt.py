import pytest

from abd_fakes import zskt_solver as host
from abd_plugin.integrations import zskt as adapter
from abd_plugin.integrations._common import HostMismatchError
from conftest import assert_call_order, assert_restored, global_hook_counts, module_hooks, snapshot


def test_call_order_and_restore(events, fast_cfg):
    snap, hooks0 = snapshot(host.ZeroShotKTSolver), global_hook_counts()
    with adapter.patch(host.ZeroShotKTSolver, **fast_cfg) as h:
        solver = host.ZeroShotKTSolver(host.make_args())
        events.students.append(solver.student)
        solver.run()
    assert_call_order(events)
    assert events.count("sv_in_graph:G") == events.count("backward:G") == 3
    assert events.count("sr") == events.count("step:S") == h.guard.step == 6
    assert_restored(snap)
    assert global_hook_counts() == hooks0
    assert module_hooks(solver.teacher, solver.student) == 0


def test_sr_window_fraction(events, fast_cfg):
    fast_cfg.pop("sr_start_step")
    with adapter.patch(host.ZeroShotKTSolver, sr_start_fraction=0.5, **fast_cfg) as h:
        host.ZeroShotKTSolver(host.make_args(total_n_pseudo_batches=4)).run()
    assert h.guard.sr_schedule.start == 4 and events.count("sr") == 4


def test_mismatch_names_commit():
    class Fork(host.ZeroShotKTSolver):
        def KT_loss_generator(self, s_logits, t_logits):  # renamed parameters
            return super().KT_loss_generator(s_logits, t_logits)

    with pytest.raises(HostMismatchError, match="e24915d"):
        adapter.patch(Fork)
