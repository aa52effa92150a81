"""The torchdistill adapter against the real package (a real DistillationBox, CPU)."""
import warnings

import pytest
import torch

pytest.importorskip("torchdistill")

from abd_fakes import common  # noqa: E402
from abd_fakes.common import TinyNet  # noqa: E402
from abd_plugin.integrations import torchdistill as adapter  # noqa: E402
from conftest import global_hook_counts, module_hooks  # noqa: E402


def _config(post=None):
    cfg = {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": {}},
            "kwargs": {"batch_size": 4},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.01}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "temperature": 4.0,
                                "alpha": 1.0,
                                "reduction": "batchmean",
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }
    if post:
        cfg["post_forward_process"] = post
    return cfg


def _box(teacher, student, post=None):
    from torchdistill.core.distillation import get_distillation_box

    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_distillation_box(teacher, student, {"train": data}, _config(post),
                                    torch.device("cpu"), None, False, 1.0)


def _train_epoch(box):
    box.pre_epoch_process(epoch=0)
    for x, y, *_ in box.train_data_loader:
        common.trace("forward:S")
        loss = box.forward_process(x, y, supp_dict=None)
        box.post_forward_process(loss=loss)


def test_box_call_order_and_restore(events, fast_cfg):
    from torchdistill.core.interfaces import registry

    teacher, student = TinyNet(), TinyNet()
    events.students.append(student)
    keys0, hooks0 = set(registry.POST_FORWARD_PROC_FUNC_DICT), global_hook_counts()
    box = _box(teacher, student)
    with adapter.patch(box, **fast_cfg) as h:
        assert adapter.KEY in registry.POST_FORWARD_PROC_FUNC_DICT
        _train_epoch(box)
    assert [e for e in events] == ["forward:S", "sr", "step:S"] * 3
    assert h.guard.step == 3 and h.guard.sr_schedule.total_steps == 3
    assert set(registry.POST_FORWARD_PROC_FUNC_DICT) == keys0
    assert global_hook_counts() == hooks0 and module_hooks(teacher, student) == 0


def test_registry_key_selected_from_config(events, fast_cfg):
    teacher, student = TinyNet(), TinyNet()
    events.students.append(student)
    with adapter.patch(**fast_cfg) as h:  # YAML route: the key builds the guard lazily
        box = _box(teacher, student, post=adapter.KEY)
        _train_epoch(box)
        assert h.guard.student is box.student_model
    # the first step has no remembered batch yet; SR runs on the later two
    assert events.count("sr") == 2 and events.count("step:S") == 3
