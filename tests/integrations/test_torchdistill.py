"""The torchdistill adapter against the real package (a real DistillationBox, CPU)."""
import logging
import warnings

import pytest
import torch

pytest.importorskip("torchdistill")

from abd_fakes import common  # noqa: E402
from abd_fakes.common import TinyNet  # noqa: E402
from abd_plugin.eraser import EraserReport  # noqa: E402
from abd_plugin.integrations import torchdistill as adapter  # noqa: E402
from conftest import global_hook_counts, module_hooks, state_differences  # noqa: E402


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


# ------------------------------------------------------------------ logging
#: the default guard (audit, then eraser) with a small audit; the eraser on for class 0
LOGGED = dict(target=0, audit_steps=5, audit_starts=2, erase_every=1)


def _logged(caplog):
    """The adapter's lines as (header, {name: value})."""
    out = []
    for r in caplog.records:
        if r.name == adapter.LOGGER.name:
            head, *pairs = r.getMessage().split("  ")
            out.append((head, {k: float(v) for k, v in (p.split(": ") for p in pairs)}))
    return out


def _run(caplog, epochs=1, yaml=False, **kw):
    """Train ``epochs`` epochs of a box guarded through ``patch(box)`` (or, ``yaml``, the
    registry key); return the adapter's lines, the guard's report and state, the student."""
    torch.manual_seed(0)
    teacher, student = TinyNet().eval(), TinyNet()  # torchdistill leaves the teacher's mode
    teacher0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=adapter.LOGGER.name):
        box = None if yaml else _box(teacher, student)
        with adapter.patch(box, **LOGGED, **kw) as h:
            if yaml:
                box = _box(teacher, student, post=adapter.KEY)
            for _ in range(epochs):
                _train_epoch(box)
            report, state = h.guard.report(), h.guard.state_dict()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k  # the teacher stays bit-identical
    return _logged(caplog), report, state, student


def test_figures_logged_through_logging(caplog):
    hooks0 = global_hook_counts()
    lines, report, _, _ = _run(caplog, epochs=2, log_every=2)  # 3 steps an epoch
    audit, eraser = report.audit.audit, report.get(EraserReport)
    heads = [h for h, _ in lines]
    # the audit's figures once, after the first step (the audit ran at its teacher batch); the
    # rest at steps 0 and 2 of each epoch (MetricLogger.log_every's batches 0, log_freq, ...)
    assert heads == [f"abd audit: {audit.verdict}", "abd [step 0]", "abd [step 2]",
                     "abd [step 3]", "abd [step 5]"]
    figures = lines[0][1]
    assert figures["abd/audit/p_value"] == pytest.approx(audit.p_value, rel=1e-5)
    assert figures["abd/audit/verdict"] == {"clean": 0, "unsure": 1, "poisoned": 2}[audit.verdict]
    assert figures["abd/audit/suspect"] == audit.suspect
    last = lines[-1][1]
    assert not any(k.startswith("abd/audit/") for _, d in lines[1:] for k in d)
    for name in ("fraction", "target", "updates", "flip", "kept", "price"):
        assert last[f"abd/erase/{name}"] == pytest.approx(float(getattr(eraser, name)),
                                                          rel=1e-5), name
    assert last["abd/erase/on"] == 1.0 and last["abd/erase/updates"] == 6
    assert global_hook_counts() == hooks0  # the logging hook is gone with the patch


def test_yaml_route_logs_too(caplog):
    lines, report, _, _ = _run(caplog, yaml=True, log_every=1)
    # the guard is built at the first post-forward call: the audit runs at the second batch
    assert [h for h, _ in lines] == ["abd [step 0]", f"abd audit: {report.audit.verdict}",
                                     "abd [step 1]", "abd [step 2]"]
    assert lines[-1][1]["abd/erase/fraction"] == pytest.approx(
        report.get(EraserReport).fraction, rel=1e-5)


def test_log_false_logs_nothing_and_logging_changes_nothing(caplog):
    quiet, _, state_q, student_q = _run(caplog, log=False)
    loud, _, state_l, student_l = _run(caplog, log_every=1)
    assert quiet == [] and len(loud) == 4
    assert state_q["step"] == state_l["step"] == 3
    assert state_differences(state_q, state_l) == []
    for k, v in student_l.state_dict().items():
        assert torch.equal(v, student_q.state_dict()[k]), k
    with pytest.raises(ValueError, match="log_every"):
        adapter.patch(log_every=0)
