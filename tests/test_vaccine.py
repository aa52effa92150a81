"""Shuffling Vaccine: the shuffle is what the paper defines, the mask/penalty/reweight semantics,
verification, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from abd_plugin import ShufflingVaccine
from abd_plugin.vaccine import VaccineSettings as VS
from abd_testutils import TinyCNN, make_pair, stamp


@settings(max_examples=40, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 4),
    out_per_group=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_input_permutation_equals_weight_permutation(groups, per_group, out_per_group, seed):
    """A conv with input-channel weights permuted (paper) == the conv on channel-permuted input
    (what the vaccine runs). Checked through the vaccine's own pre-hook on a one-conv model."""
    torch.manual_seed(seed)
    cin, cout = groups * per_group * 2, groups * out_per_group
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    model = nn.Sequential(nn.Identity(), conv, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, cin, 4, 4)
    model(x)
    model.eval()
    sv = ShufflingVaccine(
        model, VS(verify=False, layers=1, n_models=2), seed=seed
    )
    with torch.no_grad():
        got = sv.ensemble_logits(x)
        ref = []
        for j in range(2):
            m = copy.deepcopy(model)
            m[1].weight.data = m[1].weight.data[:, sv.ensemble.perms["1"][j]]
            ref.append(m(x))
    torch.testing.assert_close(got, torch.stack(ref).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_ensemble_matches_explicitly_shuffled_copies(depth):
    teacher, _ = make_pair()
    sv = ShufflingVaccine(teacher, VS(verify=False, layers=depth))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        got = sv.ensemble_logits(x)
        outs = []
        for j in range(3):
            m = copy.deepcopy(teacher)
            for name in sv.ensemble.layers:
                mod = dict(m.named_modules())[name]
                mod.weight.data = mod.weight.data[:, sv.ensemble.perms[name][j]]
            outs.append(m(x))
    assert (
        sv.ensemble.layers == ["conv2", "conv3"][-depth:]
    )  # forward order, counted from the output
    torch.testing.assert_close(got, torch.stack(outs).mean(0), rtol=1e-4, atol=1e-5)


class _Res(nn.Module):
    """A skip from the stem output crosses the shuffled conv: only the stem input can be shared."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(h.mean((2, 3)))


class _BatchFromInput(nn.Module):
    """Reads the input's batch size in forward: sharing must fall back to full passes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        b = x.shape[0]
        return self.fc(self.c2(self.act(self.c1(x))).reshape(b, -1))


@pytest.mark.parametrize("factory,expect", [(lambda: make_pair()[0], "bn2"), (_Res, "stem"),
                                            (_BatchFromInput, None)])
def test_shared_trunk_is_exact_or_falls_back(factory, expect):
    torch.manual_seed(0)
    model = factory().eval()
    sv = ShufflingVaccine(model, VS(verify=False, layers=1))
    x = torch.rand(6, 1, 4, 4) if isinstance(model, _BatchFromInput) else torch.rand(6, 1, 8, 8)
    sv.build(x)
    if expect is None:
        assert sv.ensemble.trunk_module is None
    else:
        assert sv.ensemble.trunk_module is not None
        assert sv.ensemble.trunk_module.startswith(expect)
    with torch.no_grad():
        torch.testing.assert_close(sv.ensemble_logits(x), sv.ensemble.full(x), rtol=1e-4, atol=1e-5)


def test_penalty_value_and_gradient():
    teacher, _ = make_pair()
    sv = ShufflingVaccine(teacher, VS(verify=False, layers=1, coef=0.5))
    x = torch.rand(16, 1, 8, 8, requires_grad=True)
    t = teacher(x)
    pen = sv.penalty(x, t)
    with torch.no_grad():
        z = sv.ensemble_logits(x)
        lp, lq = F.log_softmax(t, 1), F.log_softmax(z, 1)
        d = (lp.exp() * (lp - lq)).mean(1)
        m = z.argmax(1) == t.argmax(1)
    expected = -0.5 * d[m].mean() if m.any() else torch.tensor(0.0)
    torch.testing.assert_close(pen.detach(), expected)
    if m.any():
        pen.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in sv._replica.module.parameters())  # the replica is frozen


def test_reweight_semantics():
    teacher, _ = make_pair()
    sv = ShufflingVaccine(teacher, VS(verify=False, coef=0.1))
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mixed = torch.tensor([False, True, False, True])
    assert sv.reweight(loss, mixed).item() == pytest.approx(2.0 - 0.1 * 3.0)
    assert sv.reweight(loss, torch.zeros(4, dtype=torch.bool)).item() == pytest.approx(2.5)
    allm = sv.reweight(loss, torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(allm) and allm.item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="per-sample"):
        sv.reweight(loss.view(2, 2), mixed.view(2, 2))
    # while unverified the vaccine must not anti-distill
    sv2 = ShufflingVaccine(teacher, VS(verify=True))
    assert sv2.reweight(loss, mixed).item() == pytest.approx(2.0)


def test_suspicious_mask_is_argmax_agreement():
    teacher, _ = make_pair()
    sv = ShufflingVaccine(teacher, VS(verify=False, layers=1))
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        t = teacher(x)
        m = sv.suspicious(x, t)
        assert m.dtype == torch.bool and m.shape == (32,)
        assert torch.equal(m, sv.ensemble_logits(x).argmax(1) == t.argmax(1))


def _verify_on_mixed_pool(model, x, cfg, seed=0):
    """Feed the vaccine synthetic-like batches in which ~10 % of samples carry the trigger."""
    sv = ShufflingVaccine(model, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.verify_batches + cfg.verify_skip):
        b = x[torch.randint(len(x), (64,), generator=g)].clone()
        b[:6] = stamp(b[:6])
        with torch.no_grad():
            sv.observe(b, model(b))
    return sv


@pytest.mark.parametrize("seed", [0, 1])
def test_poisoned_cnn_flags_triggered_inputs(poisoned_digits, seed):
    """After verification (automatic depth) the mask flags triggered inputs >= 3x as often."""
    model, x, y = poisoned_digits
    x = x[y != 0]
    sv = _verify_on_mixed_pool(model, x, VS(verify_batches=6, verify_skip=1), seed=seed)
    assert sv.status == "enabled", sv.message
    with torch.no_grad():
        clean = sv.suspicious(x, model(x)).float().mean().item()
        trig = sv.suspicious(stamp(x), model(stamp(x))).float().mean().item()
    assert trig >= 3 * clean, (trig, clean)
    assert trig > 0.5


def test_auto_depth_scores_every_depth_and_keeps_the_best(poisoned_digits):
    model, x, y = poisoned_digits
    cfg = VS(verify_batches=6, verify_skip=1, max_shuffle_trials=1, tail_ratio_threshold=0.0)
    sv = _verify_on_mixed_pool(model, x[y != 0], cfg)
    depths = [t["depth"] for t in sv.trials]
    assert depths == list(range(1, min(cfg.auto_max_depth, len(sv.ensemble.candidates)) + 1))
    best = max(sv.trials, key=lambda t: t["tail_ratio"])
    ens = sv.ensemble
    assert ens.depth == best["depth"]
    assert ens.layers == ens.candidates[-ens.depth:]
    assert not sv._pool_x  # the pool is released after the decision


def test_verification_gives_up_and_says_so():
    torch.manual_seed(0)
    teacher = TinyCNN(8).eval()
    cfg = VS(verify_batches=3, verify_skip=0, layers=1, max_shuffle_trials=4,
             tail_ratio_threshold=0.99)
    sv = ShufflingVaccine(teacher, cfg)
    for _ in range(3):
        x = torch.rand(32, 1, 8, 8)
        with torch.no_grad():
            sv.observe(x, teacher(x))
    assert sv.status == "disabled"
    assert len(sv.trials) == 4
    assert "no vaccine found" in sv.message and "SR is still available" in sv.message
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    assert sv.penalty(x, teacher(x)).requires_grad is False


def test_errors_name_the_fix():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    sv = ShufflingVaccine(mlp, VS(verify=False, layers=1))
    with pytest.raises(ValueError, match="shuffle_layers="):
        sv.ensemble_logits(torch.rand(2, 1, 8, 8))
    teacher, _ = make_pair()
    sv = ShufflingVaccine(teacher, VS(verify=False))
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(TypeError, match=r"x.float\(\) / 255"):
        sv.penalty((x * 255).to(torch.uint8), teacher(x))
    with pytest.raises(ValueError, match="batch, num_classes"):
        sv.penalty(x, teacher(x)[:, :1])
    with pytest.raises(ValueError, match="rows for a batch"):
        sv.penalty(x, teacher(x)[:3])
    bad = teacher(x).detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sv.penalty(x, bad)
    with pytest.raises(ValueError, match="not modules of the teacher"):
        ShufflingVaccine(teacher, VS(verify=False, layers=["nope"])).build(x)
