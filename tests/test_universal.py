"""The universal blend statistic: it names the target of a trigger blended over the whole input,
where the margin statistic favours a natural class; the audit combines the two and says how."""
from __future__ import annotations

import torch
from torch import nn

from abd_plugin.audit import audit
from abd_plugin.universal import leave_one_out_z, universal_blend_statistic
from abd_testutils import _blend_digits_cnn

FAST = dict(steps=40, starts=4, universal_steps=40)


def test_the_audit_names_a_blend_triggers_target_that_the_margin_statistic_misses():
    model, xte, yte, trig = _blend_digits_cnn()
    assert float((model(trig(xte[yte != 3])).argmax(1) == 3).float().mean()) > 0.9
    rep = audit(model, (1, 16, 16), **FAST)
    assert rep.margin_suspect != 3  # the margin statistic alone: a natural class, "clean"
    assert rep.universal_class == 3 and rep.universal_z is not None and rep.universal_z >= 4.0
    # the universal z alone is far beyond its null (calibrated p ~ 1e-4): poisoned, for class 3
    assert rep.suspect == 3 and rep.target == 3 and rep.verdict == "poisoned"
    assert rep.universal_p is not None and 2 * rep.universal_p < rep.alpha
    assert "universal blend statistic favours class 3" in rep.reason
    assert "universal" in str(rep)  # the table's column
    off = audit(model, (1, 16, 16), **FAST, universal=False)
    assert off.universal is None and off.suspect == off.margin_suspect != 3


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
