import pytest

from abd_fakes import dfad_cifar as host
from abd_fakes.common import TinyNet
from abd_plugin.integrations import dfad as adapter
from abd_plugin.integrations._common import HostMismatchError
from conftest import assert_call_order, assert_restored, global_hook_counts, module_hooks, snapshot


def test_call_order_and_restore(events, fast_cfg):
    teacher, student = TinyNet(), TinyNet()
    events.students.append(student)
    snap, hooks0 = snapshot(host), global_hook_counts()
    with adapter.patch(host, **fast_cfg) as h:
        host.main(host.make_args(), teacher, student)
    assert_call_order(events)
    assert events.count("sv_in_graph:G") == events.count("backward:G") == 2
    assert events.count("sr") == events.count("step:S") == h.guard.step == 10
    assert h.guard.sr_schedule.total_steps == 10
    assert_restored(snap)
    assert global_hook_counts() == hooks0 and module_hooks(teacher, student) == 0


def test_mismatch_names_commit():
    class Mod:
        __name__ = "DFAD_other"

        @staticmethod
        def train(args, teacher, student, generator, optimizer, epoch):  # no device
            pass

    with pytest.raises(HostMismatchError, match="c161591"):
        adapter.patch(Mod)
