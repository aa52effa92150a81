"""The spectral gain (abd_plugin.repair.spectral): the repair family for triggers spread over
the whole input, learned by the same RepairLearner as the mask."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from abd_plugin._replica import TeacherReplica
from abd_plugin.repair import RepairLearner, SpectralGain
from abd_plugin.repair.spectral import dct_matrix
from abd_testutils import _blend_digits_cnn


def _box(c: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((1, c, 1, 1), lo), torch.full((1, c, 1, 1), hi)


def test_dct_matrix_is_orthonormal():
    for n in (4, 7, 16):
        d = dct_matrix(n, dtype=torch.float64)
        assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_a_fresh_repair_barely_changes_the_input_and_keeps_it_in_each_channels_box():
    lo, hi = torch.tensor([-2.0, -1.0, 0.0]).view(1, 3, 1, 1), torch.tensor([2.0, 1.0, 3.0]).view(
        1, 3, 1, 1)
    sg = SpectralGain(lo, hi)
    x = lo + torch.rand(5, 3, 12, 20) * (hi - lo)  # not square
    assert not sg.ready and torch.equal(sg.apply(x), x)
    sg.prepare(x)
    y = sg.apply(x)
    assert y.shape == x.shape
    # the starting gains are 1 - sigmoid(-4) + 2 sigmoid(-4) (about 1.02): a near-identity
    assert float(((y - x).abs() / (hi - lo)).max()) < 0.05
    big = x * 10
    z = sg.apply(big)
    assert bool((z >= lo - 1e-6).all()) and bool((z <= hi + 1e-6).all())
    assert sg.changed() == 0 and sg.summary()["coefficients"] == 0


def test_inputs_that_are_not_images_get_an_error_that_says_so():
    sg = SpectralGain(*_box(1, 0, 1))
    assert not SpectralGain.applicable(torch.zeros(4, 10))
    with pytest.raises(ValueError, match="image batches"):
        sg.prepare(torch.zeros(4, 10))
    sg.prepare(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="one input size"):
        sg.prepare(torch.zeros(2, 1, 16, 16))


def test_the_spectral_gain_un_blends_a_blend_teacher_and_keeps_most_clean_accuracy():
    """Learned on the loop's batches (half carry the blend) for the class the audit names, the
    gain takes the blend's shortcut away from the teacher on held-out inputs."""
    torch.manual_seed(0)
    teacher, xte, yte, trig = _blend_digits_cnn()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    sg = SpectralGain(*_box(1, 0, 1))
    learner = RepairLearner(sg, TeacherReplica(teacher), steps=2, every=1, lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        x = xte[torch.randint(len(xte), (32,), generator=g)].clone()
        x[:16] = trig(x[:16])
        learner.learn(x, 3, 1.0)
    keep = yte != 3
    with torch.no_grad():
        asr0 = float((teacher(trig(xte[keep])).argmax(1) == 3).float().mean())
        asr = float((teacher(sg.apply(trig(xte[keep]))).argmax(1) == 3).float().mean())
        acc0 = float((teacher(xte).argmax(1) == yte).float().mean())
        acc = float((teacher(sg.apply(xte)).argmax(1) == yte).float().mean())
    assert learner.updates == 30 and sg.changed() > 0
    assert asr0 > 0.95 and asr < 0.1, (asr0, asr)
    # measured: 99.2 % -> 79.1 % clean accuracy through the repair on this 16x16 toy (the gain
    # also dims fine strokes); the bound leaves room for platform noise
    assert acc > acc0 - 0.3, (acc0, acc)
    for k, v in teacher.state_dict().items():  # the teacher is never modified
        assert torch.equal(v, before[k])
    # the state round-trips: the same view after loading into a fresh repair
    sg2 = SpectralGain()
    sg2.load_state_dict(sg.state_dict())
    assert torch.equal(sg2.apply(xte[:8]), sg.apply(xte[:8]))


def test_the_residual_transplant_adds_what_the_repair_removes():
    sg = SpectralGain(*_box(1, 0, 1))
    x = torch.rand(4, 1, 8, 8)
    sg.prepare(x)
    with torch.no_grad():
        assert sg.d is not None
        sg.d.fill_(4.0)  # remove (nearly) everything but DC
    into, src = torch.rand(4, 1, 8, 8) * 0.5, torch.rand(4, 1, 8, 8) * 0.5
    out = sg.transplant(into, src)
    assert torch.allclose(out, (into + src - sg.apply(src)).clamp(0, 1))


def test_the_learner_is_untouched_by_a_model_that_is_not_a_cnn():
    """The mask's path (a repair with no second stage) is unchanged: before_update does
    nothing and learning_input is the input."""
    from abd_plugin.repair import MaskErasure

    m = MaskErasure(torch.tensor(0.0))
    x = torch.rand(2, 6)
    assert m.learning_input(x) is x
    assert m.before_update(nn.Linear(6, 3), x, 0, updates=0, last_flip=float("nan")) is False


def test_a_larger_keep_weight_keeps_more_clean_accuracy_and_still_un_blends():
    """``erase_spectral_keep`` (default 2) reaches the spectral gain's learner, not the mask's;
    on the blend toy a larger weight keeps more of the teacher's clean accuracy through the
    learned gain (measured 79.1 % at 1, 85.4 % at 2) and the blend stays removed."""
    from abd_plugin import ABDConfig
    from abd_plugin.eraser import TriggerEraser

    teacher, xte, yte, trig = _blend_digits_cnn()
    er = TriggerEraser(teacher, ABDConfig(erase_keep=0.5).erase)
    assert er.spectral_learner.keep_weight == 2.0 and er.learner.keep_weight == 0.5
    keep = yte != 3
    acc = {}
    for kw in (1.0, 2.0):
        torch.manual_seed(0)
        sg = SpectralGain(*_box(1, 0, 1))
        learner = RepairLearner(sg, TeacherReplica(teacher), steps=2, every=1, lr=0.1,
                                keep_weight=kw)
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            x = xte[torch.randint(len(xte), (32,), generator=g)].clone()
            x[:16] = trig(x[:16])
            learner.learn(x, 3, 1.0)
        with torch.no_grad():
            asr = float((teacher(sg.apply(trig(xte[keep]))).argmax(1) == 3).float().mean())
            acc[kw] = float((teacher(sg.apply(xte)).argmax(1) == yte).float().mean())
        assert asr < 0.1, (kw, asr)
    assert acc[2.0] > acc[1.0] + 0.02, acc


def test_rescaled_logits_keep_the_views_order_and_take_the_raw_teachers_scale():
    from abd_plugin.repair import rescale_logits

    g = torch.Generator().manual_seed(0)
    view = (torch.randn(16, 10, generator=g) * 0.7).requires_grad_(True)
    raw = torch.randn(16, 10, generator=g) * 3 + 1
    out, factor = rescale_logits(view, raw)
    assert torch.equal(out.argsort(1), view.argsort(1))  # every row's ranking is the view's
    assert torch.allclose(out.std(1).mean(), raw.std(1).mean(), rtol=1e-5)
    assert torch.allclose(out.mean(1), raw.mean(1), atol=1e-5)
    assert float(factor) > 1  # the view was the flatter one
    out.sum().backward()  # gradients reach the view; the factor is a constant
    assert view.grad is not None and torch.isfinite(view.grad).all()
    flat = torch.zeros(4, 10)
    same, one = rescale_logits(flat, raw[:4])
    assert torch.equal(same, flat) and float(one) == 1.0  # no spread: nothing to scale
    single = torch.randn(4, 1)
    assert rescale_logits(single, raw[:4, :1])[0] is single


def test_the_raw_rows_cap_cuts_a_rows_excess_over_the_batchs_gap_not_the_gap():
    """``cap_target``: the view's target logit sits a common 3 below the raw teacher's on
    every row; a row whose raw target logit stands 5 higher still (the backdoor's soft signal)
    is cut back to the common gap, the others keep their raw value. Rows outside ``rows`` and
    other columns are untouched; no shift gives the view's value itself (the old cap)."""
    from abd_plugin.repair import cap_target

    g = torch.Generator().manual_seed(0)
    view = torch.randn(9, 4, generator=g)
    raw = view.clone()
    raw[:, 2] += 3.0  # the common gap
    raw[4, 2] += 5.0  # one row's excess
    rows = torch.ones(9, dtype=torch.bool)
    rows[8] = False  # a row the raw teacher calls the target: the view's own value stays
    value = torch.where(rows.unsqueeze(1), raw, view)
    out = cap_target(value, raw, view, 2, rows)
    assert torch.equal(out[:, [0, 1, 3]], value[:, [0, 1, 3]])
    keep = rows.clone()
    keep[4] = False
    assert torch.allclose(out[keep, 2], raw[keep, 2])  # at the common gap: not cut
    assert out[4, 2].item() == pytest.approx(view[4, 2].item() + 3.0, abs=1e-5)
    assert out[8, 2] == value[8, 2]
    assert torch.equal(value[4], torch.where(rows.unsqueeze(1), raw, view)[4])  # not in place
    plain = cap_target(value, raw, view, 2, rows, shift=False)
    assert torch.allclose(plain[rows, 2], view[rows, 2])  # every raw row down to the view's
    low = torch.where(rows.unsqueeze(1), view - 1, view)  # the raw teacher below the view:
    below = cap_target(low, view - 1, view, 2, rows)  # the gap counts as 0, nothing to cut
    assert torch.equal(below, low)
    none = cap_target(value, raw, view, 2, torch.zeros(9, dtype=torch.bool))
    assert torch.equal(none, value)  # no raw rows: nothing capped (and no NaN)


def test_the_rescales_count_and_mean_factor_survive_a_save_and_resume():
    from abd_plugin.eraser import TriggerEraser
    from abd_plugin.repair import rescale_logits

    teacher, *_ = _blend_digits_cnn()
    er = TriggerEraser(teacher)
    _, factor = rescale_logits(torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
                               torch.tensor([[0.0, 3.0], [3.0, 0.0]]))
    for _ in range(2):  # what on_teacher_output accumulates
        er._scale_sum = factor if er._scale_sum is None else er._scale_sum + factor
        er.scale_batches += 1
        er.scale_rows += 2
        n = torch.tensor(1)  # rows handed the raw teacher's values (spectral_raw_others)
        er._raw_rows = n if er._raw_rows is None else er._raw_rows + n
    state = er.state_dict()
    er2 = TriggerEraser(teacher)
    er2.load_state_dict(state)
    assert er2.scale_batches == 2 and er2.scale_sum == pytest.approx(6.0)
    assert er2.report().rescaled == 2 and er2.report().scale == pytest.approx(3.0)
    assert (er2.raw_rows, er2.scale_rows) == (2, 4)
    assert (er2.report().raw_rows, er2.report().rescaled_rows) == (2, 4)
    del state["scale"], state["raw_rows"]  # a state saved before the rescale existed
    er3 = TriggerEraser(teacher)
    er3.load_state_dict(state)
    assert er3.scale_batches == 0 and er3.scale_sum == 0.0
    assert er3.raw_rows == 0 and er3.scale_rows == 0
