"""Where the teacher's inputs live (abd_plugin.domain): evidence from the teacher itself (a
Normalize at its front, its first BatchNorm, a BatchNorm after its first convolution) before a
batch of unknown scale, the range said in words in the guard's report, a warning when the range
was only guessed, and the domain kept with the guard's state."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDConfig, ABDGuard, ABDWarning
from abd_plugin.domain import (
    K_SIGMA,
    KNOWN_SCALE_STD,
    InputDomain,
    infer_input_range,
    resolve_domain,
    teacher_domain_hint,
)

TINT = torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=1)
def _tinted_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled 8x8 digits, upsampled to 3x32x32, tinted (red, green and blue are one image
    times 1, 0.6 and 0.3: perfectly correlated channels, the hardest case for the estimate) and
    normalised ``(x - 0.5) / 0.25`` outside the model: red spans exactly [-2, 2]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * TINT - 0.5) / 0.25
    return x, torch.tensor(d.target)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.double().mean((0, 2, 3)), x.double().std((0, 2, 3))


def _set_running_stats(bn: nn.BatchNorm2d, h: torch.Tensor) -> None:
    """The BatchNorm's running statistics from data, as training leaves them (one pass over all
    of ``h`` in train mode: mean and unbiased variance)."""
    bn.reset_running_stats()
    bn.momentum = 1.0
    bn.train()
    with torch.no_grad():
        bn(h)
    bn.eval()


def _conv_bn_teacher(seed: int, sgd_steps: int = 0, width: int = 16) -> nn.Sequential:
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear, optionally a few SGD steps on
    the tinted digits; the first BatchNorm's statistics are then those of the whole data."""
    x, y = _tinted_digits()
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(sgd_steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _set_running_stats(net[1], net[0](x))
    return net.eval()


def _raw_conv_bn_teacher() -> nn.Sequential:
    """:func:`_conv_bn_teacher` (seed 0) as if trained on the raw [0, 1] images: its first
    BatchNorm holds their statistics."""
    x, _ = _tinted_digits()
    teacher = _conv_bn_teacher(0)
    with torch.no_grad():
        _set_running_stats(teacher[1], teacher[0](x * 0.25 + 0.5))
    return teacher


def _dark(x: torch.Tensor) -> torch.Tensor:
    """A dark first batch, as an untrained generator makes: the images at 30 % brightness,
    normalised like the real ones (red in about [-2, -0.8])."""
    raw = (x[:64] * 0.25 + 0.5) * 0.3
    return (raw - 0.5) / 0.25


class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _guard(teacher: nn.Module, **kw) -> ABDGuard:
    return ABDGuard(teacher, _Student(), audit=False, erase=False, **kw)


# ---------------------------------------------------------------------- a Normalize at the front
class _Normalize(nn.Module):
    """Duck-typed normalisation: ``mean`` and ``std`` buffers, no torchvision."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def test_a_normalize_at_the_teachers_front_gives_raw_image_ranges():
    body = _conv_bn_teacher(0)
    teacher = nn.Sequential(_Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]), body).eval()
    g = torch.Generator().manual_seed(0)
    # a generator batch of unknown scale: the teacher says it takes raw images in [0, 1]
    x = torch.randn(8, 3, 32, 32, generator=g) * 3
    d = resolve_domain(x, teacher=teacher)
    assert d.range == ((0.0,) * 3, (1.0,) * 3) and d.floor == (0.0,) * 3
    assert "_Normalize at its front" in d.source and not d.guessed
    # the batch clearly in [-1, 1] or in [0, 255]; means in 0..255 units
    assert resolve_domain(torch.rand(8, 3, 32, 32) * 2 - 1, teacher=teacher).high == (1.0,) * 3
    assert resolve_domain(torch.rand(8, 3, 32, 32) * 2 - 1, teacher=teacher).low == (-1.0,) * 3
    assert resolve_domain(torch.rand(8, 3, 32, 32) * 255, teacher=teacher).high == (255.0,) * 3
    t255 = nn.Sequential(_Normalize([123.7, 116.3, 103.5], [58.4, 57.1, 57.4]), body)
    assert resolve_domain(x, teacher=t255).range == ((0.0,) * 3, (255.0,) * 3)
    # the stated range still wins
    assert resolve_domain(x, (-3.0, 3.0), teacher).range == ((-3.0,) * 3, (3.0,) * 3)


def test_torchvision_normalize_and_a_normalising_root_module():
    transforms = pytest.importorskip("torchvision.transforms")
    body = _conv_bn_teacher(0)
    teacher = nn.Sequential(transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                            body).eval()
    x = torch.randn(8, 3, 32, 32) * 3
    d = resolve_domain(x, teacher=teacher)
    assert d.range == ((0.0,) * 3, (1.0,) * 3)
    assert d.describe() == ("inputs in [0, 1] in every channel (from the teacher's own Normalize "
                            "at its front: it takes raw images in [0, 1])")

    class Wrapped(nn.Module):  # normalises in its own forward, with mean/std attributes
        def __init__(self) -> None:
            super().__init__()
            self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
            self.net = body

        def forward(self, x):
            return self.net((x - torch.tensor(self.mean).view(1, 3, 1, 1)) / 0.25)

    assert resolve_domain(x, teacher=Wrapped()).range == ((0.0,) * 3, (1.0,) * 3)


# ---------------------------------------------------------------------- the first BatchNorm
def test_a_first_batchnorm_gives_mean_plus_minus_k_std_of_the_data():
    x, _ = _tinted_digits()
    bn = nn.BatchNorm2d(3)
    _set_running_stats(bn, x)
    teacher = nn.Sequential(bn, nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(8, 10)).eval()
    hint = teacher_domain_hint(teacher, (3, 32, 32))
    assert hint is not None and hint.kind == "batchnorm"
    mean, std = _stats(x)
    torch.testing.assert_close(torch.tensor(hint.mean, dtype=torch.float64), mean, rtol=0,
                               atol=1e-4)
    torch.testing.assert_close(torch.tensor(hint.std, dtype=torch.float64), std, rtol=1e-4,
                               atol=1e-5)
    dark = _dark(x)
    d = resolve_domain(dark, teacher=teacher)
    lo, hi = dark.amin((0, 2, 3)).double(), dark.amax((0, 2, 3)).double()
    want_lo = torch.minimum(mean - K_SIGMA * std, lo)
    want_hi = torch.maximum(mean + K_SIGMA * std, hi)
    torch.testing.assert_close(torch.tensor(d.low, dtype=torch.float64), want_lo)
    torch.testing.assert_close(torch.tensor(d.high, dtype=torch.float64), want_hi)
    assert "estimated from the teacher's first BatchNorm" in d.source and not d.guessed
    # the floor stays the batch's own minimum (black)
    torch.testing.assert_close(torch.tensor(d.floor, dtype=torch.float64), lo)


def test_an_untrained_or_unrelated_batchnorm_is_no_evidence():
    assert teacher_domain_hint(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)),
                               (3, 8, 8)) is None  # initial statistics: never trained
    teacher = _conv_bn_teacher(0)
    relu_between = nn.Sequential(teacher[0], nn.ReLU(), teacher[1])
    assert teacher_domain_hint(relu_between, (3, 32, 32)) is None
    grouped = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), teacher[1])
    assert teacher_domain_hint(grouped, (3, 32, 32)) is None
    assert teacher_domain_hint(teacher, (1, 32, 32)) is None  # other channel count
    assert teacher_domain_hint(nn.Sequential(nn.Linear(5, 3)), (5,)) is None


# ---------------------------------------------------------------------- BatchNorm after a conv
#: measured on these data (seeds 0-3, random and 30-step SGD-trained first convolutions of 16
#: or 64 filters): means within 0.032 of the data's (their range is 4 wide), the brightest (red)
#: channel's std within -2 %..+5 %, every std at most 10 % low (the dim channels err high, up to
#: +46 %); the tolerances are about twice that
MEAN_TOL, RED_STD_TOL, STD_LOW_TOL = 0.06, 0.1, 0.2


@pytest.mark.parametrize("seed,sgd_steps", [(0, 0), (1, 30), (2, 30)])
def test_a_batchnorm_after_the_first_conv_recovers_the_inputs_statistics(seed, sgd_steps):
    x, _ = _tinted_digits()
    teacher = _conv_bn_teacher(seed, sgd_steps)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    hint = teacher_domain_hint(teacher, (3, 32, 32))
    assert hint is not None and hint.kind == "conv_batchnorm"
    mean, std = _stats(x)
    est_mean = torch.tensor(hint.mean, dtype=torch.float64)
    est_std = torch.tensor(hint.std, dtype=torch.float64)
    assert (est_mean - mean).abs().max() < MEAN_TOL, (est_mean, mean)
    assert abs(float(est_std[0] / std[0]) - 1) < RED_STD_TOL, (est_std, std)
    assert bool((est_std > (1 - STD_LOW_TOL) * std).all()), (est_std, std)
    # the teacher is unchanged (nothing ran it, nothing was written)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_dark_first_batch_gets_the_real_range_from_a_conv_bn_teacher():
    x, _ = _tinted_digits()
    dark = _dark(x)
    true_lo, true_hi = x.amin((0, 2, 3)), x.amax((0, 2, 3))  # red: [-2, 2]
    assert float(dark[:, 0].max()) < -0.5  # the batch alone says little
    # the batch-only rule: red never reaches the trigger's 2.0 (nor 1.5)
    assert infer_input_range(dark)[1][0] < 1.5
    assert resolve_domain(dark).high[0] < 1.5
    teacher = _conv_bn_teacher(1, sgd_steps=30)
    d = resolve_domain(dark, teacher=teacher)
    assert d.high[0] >= 2.0 and not d.guessed
    assert all(lo <= float(t) for lo, t in zip(d.low, true_lo, strict=True))
    assert all(hi >= float(t) for hi, t in zip(d.high, true_hi, strict=True))
    # through the guard: the same range, said in the report
    guard = _guard(teacher)
    with warnings.catch_warnings(record=True) as rec, guard, torch.no_grad():
        warnings.simplefilter("always")
        teacher(dark)
    assert guard.domain == d
    assert not [w for w in rec if issubclass(w.category, ABDWarning)]
    line = str(guard.report()).split("\n")[1]
    assert line.startswith("  Input domain: inputs per channel in [")
    assert "estimated from the teacher's first BatchNorm, through its first convolution" in line


def test_a_known_scale_batch_keeps_its_range_when_the_batchnorm_agrees():
    """A teacher trained on [0, 1] images (the same net, its first BatchNorm's statistics those
    of the raw digits): a [0, 1] batch keeps [0, 1], and so does a [-1, 1] batch (the
    estimate's spread fits in either box)."""
    teacher = _raw_conv_bn_teacher()
    hint = teacher_domain_hint(teacher, (3, 32, 32))
    assert hint is not None and max(hint.std) < KNOWN_SCALE_STD * 0.5
    d = resolve_domain(torch.rand(8, 3, 32, 32), teacher=teacher)
    assert d.range == ((0.0,) * 3, (1.0,) * 3) and d.source.startswith("read off the first batch")
    d = resolve_domain(torch.rand(8, 3, 32, 32) * 2 - 1, teacher=teacher)
    assert d.range == ((-1.0,) * 3, (1.0,) * 3)


@pytest.mark.parametrize("scale", ["[0, 1]", "[-1, 1]"])
def test_a_known_scale_batch_of_a_normalised_teacher_gets_the_batchnorm_range(scale):
    """The teacher saw normalised inputs (red in [-2, 2], standard deviation above 1); a first
    batch that happens to lie inside [-1, 1] (a quiet generator: the real images at 45 %
    amplitude) or [0, 1] (the same, shifted) must not cap the domain there: the audit could
    never make the trigger's values. The BatchNorm's range is used, and the report says why."""
    x, _ = _tinted_digits()
    quiet = x[:64] * 0.45
    if scale == "[0, 1]":
        quiet = (quiet - quiet.min()) / (quiet.max() - quiet.min())
    assert infer_input_range(quiet)[1][0] == 1.0  # the batch alone: a known scale
    teacher = _conv_bn_teacher(1, sgd_steps=30)
    d = resolve_domain(quiet, teacher=teacher)
    assert d.high[0] >= 2.0 and d.low[0] <= -2.0 and not d.guessed
    assert "first BatchNorm" in d.source
    assert f"the first batch lay in {scale}, but a standard deviation of" in d.source


# ---------------------------------------------------------------------- report, warning, state
def test_describe_says_the_range_per_channel_with_its_floor_and_source():
    d = InputDomain((3, 4, 4), (-2.0, -1.0, 0.0), (2.0, 1.0, 1.0), (-2.0, -1.0, 0.0), "given")
    assert d.describe() == "inputs per channel in [-2, 2], [-1, 1], [0, 1] (given)"
    d = InputDomain((3, 4, 4), (-3.0,) * 3, (2.5,) * 3, (-2.0,) * 3, "s")
    assert d.describe() == "inputs in [-3, 2.5] in every channel; floor -2 (s)"
    d = InputDomain((6,), tuple(float(-i) for i in range(6)), (1.0,) * 6, (0.0,) * 6, "s")
    assert d.describe() == ("inputs per feature in [0, 1], [-1, 1], [-2, 1], ... (6 in all); "
                            "floor 0 (s)")


def test_the_report_has_a_domain_line_and_the_record():
    teacher = _raw_conv_bn_teacher()
    guard = _guard(teacher)
    assert str(guard.report()).split("\n")[1] == (
        "  Input domain: not resolved (no floating-point teacher batch seen).")
    with guard, torch.no_grad():
        teacher(torch.rand(4, 3, 32, 32))
    report = guard.report()
    assert report.domain == guard.domain
    assert str(report).split("\n")[1] == (
        "  Input domain: inputs in [0, 1] in every channel (read off the first batch: values in "
        "[0, 1]).")
    assert report.as_dict()["domain"] == guard.domain.as_dict()


def _abd(rec, needle="input range was guessed"):
    return [w for w in rec if issubclass(w.category, ABDWarning) and needle in str(w.message)]


def test_a_guessed_range_warns_once_and_names_the_fix():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(8, 3, 16, 16) * 2  # unknown scale, an untrained BatchNorm: a guess
    guard = _guard(teacher)
    with warnings.catch_warnings(record=True) as rec, guard, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            teacher(x)
    ours = _abd(rec)
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "input_range=(low, high)" in msg and "ABDConfig(input_range=" in msg
    assert guard.domain is not None and guard.domain.guessed
    assert any("input range was guessed" in w for w in guard.report().warnings)
    # stated, or with evidence, or a known scale: no warning
    for kw, batch, t in (({"input_range": (-6.0, 6.0)}, x, teacher),
                         ({"config": ABDConfig(input_range=(-6.0, 6.0))}, x, teacher),
                         ({}, torch.rand(8, 3, 16, 16), teacher),
                         ({}, _dark(_tinted_digits()[0])[:8], _conv_bn_teacher(0))):
        g = _guard(t, **kw)
        with warnings.catch_warnings(record=True) as rec, g, torch.no_grad():
            warnings.simplefilter("always")
            t(batch)
        assert not _abd(rec) and not g.domain.guessed
        assert not any("guessed" in w for w in g.report().warnings)


def test_the_domain_round_trips_through_the_guards_state():
    x, _ = _tinted_digits()
    teacher = _conv_bn_teacher(1, sgd_steps=30)
    guard = _guard(teacher)
    with guard, torch.no_grad():
        teacher(_dark(x))
    state = guard.state_dict()
    assert state["version"] == 3 and state["domain"]["guessed"] is False
    resumed = _guard(teacher)
    resumed.load_state_dict(state)
    assert resumed.domain == guard.domain
    with resumed, torch.no_grad():  # kept, not resolved again from another batch
        teacher(torch.rand(4, 3, 32, 32))
    assert resumed.domain == guard.domain
    # a state saved before ``guessed`` existed (same version 3): inferred from the source
    old = dict(state, domain={k: v for k, v in state["domain"].items() if k != "guessed"})
    g2 = _guard(teacher)
    g2.load_state_dict(old)
    assert g2.domain == guard.domain
    guessed = InputDomain((3,), (-1.0,), (1.0,), (0.0,),
                          "read off the first batch (unknown scale: its range widened by a "
                          "quarter)", guessed=True)
    legacy = guessed.as_dict()
    del legacy["guessed"]
    assert InputDomain.from_dict(legacy) == guessed
    assert InputDomain.from_dict(guessed.as_dict()) == guessed
