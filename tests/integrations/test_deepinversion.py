import pytest
import torch
import torch.nn as nn

from abd_fakes import deepinversion as host
from abd_fakes.common import TinyNet
from abd_plugin.integrations import deepinversion as adapter
from abd_plugin.integrations._common import HostMismatchError
from conftest import assert_call_order, assert_restored, global_hook_counts, module_hooks, snapshot


def test_imagenet_engine_call_order_and_restore(events, fast_cfg):
    teacher, verifier = TinyNet(), TinyNet()
    snap, hooks0 = snapshot(host.DeepInversionClass), global_hook_counts()
    with adapter.patch(host.DeepInversionClass, **fast_cfg) as h:
        engine = host.DeepInversionClass(bs=4, net_teacher=teacher, criterion=nn.CrossEntropyLoss())
        engine.generate_batch(net_student=verifier)
    assert_call_order(events, sr=False)
    assert events.count("sv_in_graph:G") == events.count("backward:G") == 3
    assert h.guard.sr is None
    assert_restored(snap)
    assert global_hook_counts() == hooks0 and module_hooks(teacher, verifier) == 0


def test_cifar_get_images(events, fast_cfg):
    teacher = TinyNet()
    snap = snapshot(host.cifar)
    with adapter.patch_cifar(host.cifar, **fast_cfg):
        inputs = torch.randn(4, 3, 8, 8, requires_grad=True)
        host.cifar.get_images(
            net=teacher, bs=4, epochs=2, optimizer=torch.optim.Adam([inputs], 0.1), inputs=inputs
        )
    assert_call_order(events, sr=False)
    assert events.count("sv_in_graph:G") == 2  # the final no-grad net(best_inputs) adds nothing
    assert_restored(snap)


def test_mismatch_names_commit():
    class Engine:
        def __init__(self, bs=84, use_fp16=True, net_teacher=None):
            pass

        def get_images(self, student=None, targets=None):
            pass

        def generate_batch(self, net_student=None, targets=None):
            pass

    with pytest.raises(HostMismatchError, match="2413af1"):
        adapter.patch(Engine)
