"""The universal blend statistic: it names the target of a trigger blended over the whole input,
where the margin statistic favours a natural class; the audit combines the two and says how."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

from abd_plugin.audit import audit, audit_report_from_dict
from abd_plugin.universal import (
    leave_one_out_z,
    universal_blend_statistic,
    universal_patch_statistic,
)
from abd_testutils import _blend_digits_cnn, _clean_digits_cnn, _poisoned_digits_cnn

FAST = dict(steps=40, starts=4, universal_steps=40)


def test_the_audit_names_a_blend_triggers_target_that_the_margin_statistic_misses():
    model, xte, yte, trig = _blend_digits_cnn()
    assert float((model(trig(xte[yte != 3])).argmax(1) == 3).float().mean()) > 0.9
    rep = audit(model, (1, 16, 16), **FAST)
    assert rep.universal_class == 3 and rep.universal_z is not None and rep.universal_z >= 4.0
    # the universal z alone is far beyond its null (calibrated p ~ 1e-4): poisoned, for class 3
    assert rep.suspect == 3 and rep.target == 3 and rep.verdict == "poisoned"
    assert rep.universal_p is not None and 2 * rep.universal_p < rep.alpha
    assert "universal blend statistic favours class 3" in rep.reason
    assert "universal" in str(rep)  # the table's column
    # the margin statistic alone misses it: "clean" (its favourite is a natural class on the
    # first recording CPU; on an AMD EPYC, whose fixture teacher differs in its last bits, it
    # is class 3 at p = 0.63: either way far from a verdict)
    off = audit(model, (1, 16, 16), **FAST, universal=False, patch=False)
    assert off.universal is None and off.suspect == off.margin_suspect
    assert off.verdict == "clean"
    # without the blend statistic, the patch statistic's look before "clean" still finds it
    # (z 4.2 on this tiny model; the default threshold is set for the kit's teachers)
    no_blend = audit(model, (1, 16, 16), **FAST, universal=False, patch_flag_z=4.0)
    assert no_blend.verdict == "unsure" and no_blend.suspect == no_blend.patch_class == 3


def test_universal_statistic_leaves_model_and_global_rng_alone_and_takes_channel_ranges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    low = torch.tensor([-2.0, -1.0, 0.0]).view(1, 3, 1, 1)
    high = torch.tensor([2.0, 1.0, 1.0]).view(1, 3, 1, 1)
    u = universal_blend_statistic(model, (3, 8, 8), 5, low, high, steps=5, batch_size=40)
    assert u.shape == (5,) and u.dtype == torch.float64 and bool(torch.isfinite(u).all())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    t, z = leave_one_out_z(torch.tensor([0.0, 1.0, 0.0, 1.0, 10.0]))
    assert t == 4 and z > 10


def test_the_patch_statistic_names_a_patch_triggers_target_and_not_a_clean_twins_class():
    # the 16x16 digits CNN poisoned with a 3x3 white corner patch -> class 0, and its clean twin
    # (same data, same seed): measured z 5.6 for class 0, and 2.7 for the twin's favourite (on
    # an AMD EPYC CPU, whose fixture teachers differ in their last bits: 4.46 and 3.55)
    lo, hi = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    poisoned = _poisoned_digits_cnn()[0]
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in poisoned.state_dict().items()}
    stat = universal_patch_statistic(poisoned, (1, 16, 16), 10, lo, hi)
    assert stat.shape == (10,) and stat.dtype == torch.float64
    c, z = leave_one_out_z(stat)
    assert c == 0 and z > 4.0
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in poisoned.state_dict().items():
        assert torch.equal(v, before[k]), k
    _, z_clean = leave_one_out_z(universal_patch_statistic(_clean_digits_cnn()[0], (1, 16, 16),
                                                           10, lo, hi))
    assert z_clean < 4.0 < z
    # the same base and seed give the same statistic
    assert torch.equal(stat, universal_patch_statistic(poisoned, (1, 16, 16), 10, lo, hi))


def test_the_patch_statistic_refuses_a_bad_budget_and_inputs_without_two_spatial_axes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    lo, hi = torch.zeros(1, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="budget"):
        universal_patch_statistic(model, (1, 2, 2), 3, lo, hi, budget=0.0)
    with pytest.raises(ValueError, match="spatial"):
        universal_patch_statistic(model, (4,), 3, lo, hi)


def test_the_patch_vote_turns_a_clean_verdict_into_unsure_for_its_class_and_says_why():
    model = _poisoned_digits_cnn()[0]
    # thresholds that make the margin and blend statistics call this poisoned teacher clean,
    # so the patch statistic has the last word
    # (its patch z, 5.6, is below the default threshold, set on the kit's teachers: 4 here)
    lax = dict(FAST, alpha=1e-9, clean_alpha=1e-9, flag_z=1e6, patch_flag_z=4.0)
    rep = audit(model, (1, 16, 16), **lax)
    assert rep.verdict == "unsure" and rep.suspect == 0 and rep.target == 0
    assert rep.patch is not None and rep.patch_class == 0 and rep.patch_z is not None
    assert rep.patch_z >= 4.0
    assert "universal patch statistic favours class 0" in rep.reason and "unsure" in rep.reason
    assert "patch" in str(rep)  # the table's column
    # a saved guard state keeps the patch vote (the audit's record goes through asdict)
    assert audit_report_from_dict(asdict(rep)) == rep
    off = audit(model, (1, 16, 16), **lax, patch=False)
    assert off.verdict == "clean" and off.patch is None
    high = audit(model, (1, 16, 16), **dict(lax, patch_flag_z=1e6))  # below it: clean
    assert high.verdict == "clean" and high.patch_class == 0 and "below patch_flag_z" in high.reason
    # a verdict that is not clean never pays for it
    default = audit(model, (1, 16, 16), **FAST)
    assert default.verdict == "poisoned" and default.patch is None

