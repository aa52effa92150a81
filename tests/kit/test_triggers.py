"""Triggers: generic contract for every trigger, then exact pixels against the doc's Table 1a."""

import math

import pytest
import torch
from torch import nn

from abd_plugin.kit.triggers import Trigger, get_trigger, list_triggers

ALL = list_triggers()
SEEDED = ["trojan_3x3", "trojan_8x8", "trojan_wm", "blend", "l2_inv", "wanet", "wanet_strong",
          "wanet_mid"]
U8 = 1 / 255


def test_registry_has_every_documented_trigger():
    expected = {"badnet_grid", "badnet_sq", "trojan_3x3", "trojan_8x8", "trojan_wm", "blend", "sig",
                "sig_canonical", "l0_inv", "l2_inv", "smooth", "cl", "wanet", "square_in",
                "red_square", "sig_strong", "wanet_strong", "sig_dirty", "wanet_mid"}
    assert set(ALL) == expected
    assert {n for n in ALL if get_trigger(n).clean_label} == {"sig", "sig_canonical", "cl",
                                                                "sig_strong"}
    assert all(get_trigger(n).name == n for n in ALL)
    assert {n for n in ALL if get_trigger(n).seeded} == set(SEEDED)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("hw", [(16, 16), (32, 32), (64, 64), (24, 40)])
def test_contract_shape_range_no_inplace(name, channels, hw):
    x = torch.rand(3, channels, *hw, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    out = get_trigger(name).apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before), "apply must not modify its input"
    assert out.data_ptr() != x.data_ptr()
    assert (out - x).abs().max() > 1e-3, "trigger must be visible at every resolution"


@pytest.mark.parametrize("name", ALL)
def test_dtype_single_image_and_determinism(name):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = get_trigger(name, seed=3).apply(x)
    assert out.dtype == torch.float64
    assert torch.equal(
        out, get_trigger(name, seed=3).apply(x)
    )  # fresh object, same seed, same result
    assert torch.allclose(get_trigger(name, seed=3).apply(x[0]), out[0])  # (C, H, W) accepted


@pytest.mark.parametrize("name", ALL)
def test_seed_changes_pattern_only_for_seeded_triggers(name):
    x = torch.full((1, 3, 32, 32), 0.3)
    a, b = get_trigger(name, seed=0).apply(x), get_trigger(name, seed=1).apply(x)
    if name in SEEDED:
        x = torch.rand(
            1, 3, 32, 32, generator=torch.Generator().manual_seed(0)
        )  # wanet needs texture
        a, b = get_trigger(name, seed=0).apply(x), get_trigger(name, seed=1).apply(x)
        assert not torch.allclose(a, b)
    else:
        assert torch.equal(a, b)


def test_bad_inputs_are_rejected():
    trig = get_trigger("badnet_grid")
    with pytest.raises(TypeError, match="float"):
        trig.apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="C in"):
        trig.apply(torch.zeros(1, 2, 32, 32))


def only_changed(out: torch.Tensor, x: torch.Tensor, rows, cols) -> bool:
    """True if out == x outside the given row/col ranges."""
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[..., rows, cols] = False
    return torch.equal(out[keep], x[keep])


# -- exact pixels at 32x32 (Table 1a) ---------------------------------------------------------
def test_badnet_grid_exact():
    x = torch.full((2, 3, 32, 32), 0.5)
    out = get_trigger("badnet_grid").apply(x)
    grid = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for c in range(3):
        assert torch.equal(out[:, c, 29:32, 29:32], grid.expand(2, 3, 3))
    assert only_changed(out, x, slice(29, 32), slice(29, 32))


def test_badnet_sq_exact_with_margin():
    x = torch.zeros(1, 3, 32, 32)
    out = get_trigger("badnet_sq").apply(x)
    assert torch.equal(out[..., 27:31, 27:31], torch.ones(1, 3, 4, 4))
    assert out[..., 31, :].sum() == 0 and out[..., :, 31].sum() == 0  # 1-px margin
    assert out.sum() == 3 * 16


def test_l0_inv_exact():
    rgb = [(0, 0, 0), (255, 0, 255), (0, 0, 255), (255, 255, 0), (255, 255, 255),
           (0, 255, 255), (0, 255, 255), (255, 0, 0), (255, 255, 255)]
    x = torch.full((1, 3, 32, 32), 0.5)
    out = get_trigger("l0_inv").apply(x)
    for k, colour in enumerate(rgb):
        assert out[0, :, 31, 23 + k].tolist() == [v / 255 for v in colour]
    assert only_changed(out, x, 31, slice(23, 32))


def sig_column(j: int) -> int:
    return int(20 * math.sin(0.8 * j)) % 256  # int() truncates toward zero; % 256 wraps like uint8


def test_sig_matches_abd_formula():
    x = torch.zeros(1, 3, 32, 32)
    out = get_trigger("sig").apply(x)
    expected = torch.tensor([0.2 * sig_column(j) / 255 for j in range(32)])
    assert torch.allclose(out[0], expected.expand(3, 32, 32), atol=1e-6)
    assert [sig_column(j) for j in range(6)] == [0, 14, 19, 13, 255, 241]  # wrap-around check
    # uint8 truncation as in ABD: 0.2 * 14 = 2.8 -> 2, 0.2 * 241 = 48.2 -> 48
    q = get_trigger("sig", quantize=True).apply(x)[0, 0, 0, :6] * 255
    assert torch.allclose(q, torch.tensor([0.0, 2, 3, 2, 51, 48]), atol=1e-4)
    gray = torch.full((1, 3, 32, 32), 0.5)  # blended, not additive: 80 % of the image remains
    assert torch.allclose(get_trigger("sig").apply(gray)[0, 0, 0], 0.4 + expected, atol=1e-6)


def test_sig_canonical_is_additive_sine():
    x = torch.full((1, 1, 32, 32), 0.5)
    out = get_trigger("sig_canonical").apply(x)
    j = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(
        out[0, 0], (0.5 + 20 / 255 * torch.sin(2 * math.pi * j * 6 / 32)).expand(32, 32), atol=1e-6
    )


def test_trojan_patches_are_additive_and_saturate():
    for name, lo, hi in (("trojan_3x3", 25, 28), ("trojan_8x8", 21, 29)):
        trig = get_trigger(name, seed=5)
        zero = torch.zeros(1, 3, 32, 32)
        patch = trig.apply(zero)
        assert only_changed(patch, zero, slice(lo, hi), slice(lo, hi))
        assert patch[..., lo:hi, lo:hi].max() > 0.5
        assert torch.allclose(patch * 255, (patch * 255).round(), atol=1e-4)  # uint8 values
        assert torch.equal(
            trig.apply(torch.ones(1, 3, 32, 32)), torch.ones(1, 3, 32, 32)
        )  # saturates
        gray = torch.full((1, 3, 32, 32), 0.25)
        assert torch.allclose(trig.apply(gray), (gray + patch).clamp(0, 1))
    assert (
        get_trigger("trojan_3x3", seed=5).apply(torch.zeros(1, 3, 32, 32)).max() <= 250 / 255 + 1e-6
    )


def test_trojan_wm_is_sparse_strokes():
    delta = get_trigger("trojan_wm", seed=0).apply(torch.zeros(1, 3, 32, 32))[0]
    lit = delta.amax(0) > 0
    assert 50 <= lit.sum() <= 130
    assert delta.amax(0)[lit].min() >= 100 / 255 - 1e-6
    rows = lit.nonzero()[:, 0]
    assert rows.float().mean() > 12  # mostly in the lower part of the image


def test_blend_and_l2_inv_statistics():
    zero = torch.zeros(1, 3, 32, 32)
    blend = get_trigger("blend", seed=0).apply(zero)
    assert blend.max() <= 0.2 + 1e-6 and blend.std() > 0.03  # 0.2 * uniform noise
    bright = get_trigger("blend", seed=0, bright=True).apply(zero)
    assert bright.min() >= 0.2 * 128 / 255 - 1e-6
    delta = get_trigger("l2_inv", seed=0).apply(zero)
    assert delta.norm().item() == pytest.approx(3.22, rel=1e-3)
    assert delta.max() <= 68 / 255 + 1e-6
    assert 0.4 < (delta > 0).float().mean() < 0.7


def test_smooth_renormalises_each_image():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    out = get_trigger("smooth").apply(x)
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6)
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(4), atol=1e-6)
    bump = get_trigger("smooth").apply(torch.zeros(1, 3, 32, 32))[0]
    assert bump[1].argmax().item() in {
        13 * 32 + 13,
        13 * 32 + 14,
        14 * 32 + 13,
        14 * 32 + 14,
    }  # green, centre 13.5
    assert bump[0].max() == 0 and bump[2].max() == 0
    gtsrb = get_trigger("smooth", dataset="gtsrb").apply(torch.zeros(1, 3, 32, 32))[0]
    assert gtsrb[0].max() > 0.9 and gtsrb[2].max() > 0.9 and gtsrb[1].max() == 0
    with pytest.raises(ValueError, match="dataset"):
        get_trigger("smooth", dataset="mnist")


def test_wanet_warps_texture_but_not_constants():
    const = torch.full((2, 3, 32, 32), 0.7)
    assert torch.allclose(get_trigger("wanet").apply(const), const, atol=1e-5)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (get_trigger("wanet").apply(x) - x).abs().mean() > 0.01
    assert torch.allclose(get_trigger("wanet", s=0.0).apply(x), x, atol=1e-5)  # s=0: identity warp


def test_strong_variants_and_unchanged_defaults():
    """sig_strong / wanet_strong are new names; sig and wanet keep their parameters (cached
    teachers are keyed by the trigger's name)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stripes = get_trigger("sig").patterns(32, 32, 3)["pattern"]
    assert get_trigger("sig").alpha == 0.2 and get_trigger("wanet").s == 0.5
    assert torch.allclose(get_trigger("sig_strong").apply(x), (0.4 * x + 0.6 * stripes).clamp(0, 1))
    strong = get_trigger("wanet_strong", seed=2)
    assert strong.s == 4.0 and torch.equal(strong.apply(x), get_trigger("wanet", seed=2, s=4.0)(x))
    weak = (get_trigger("wanet").apply(x) - x).abs().mean()
    assert (strong.apply(x) - x).abs().mean() > weak


def test_red_square_grey_is_the_mean_of_the_red_stamp():
    x = torch.full((1, 1, 32, 32), 0.3)
    out = get_trigger("red_square").apply(x)
    assert out[0, 0, 2, 28].item() == pytest.approx((1 + 0.3 + 0.3) / 3)
    assert only_changed(out, x, slice(1, 5), slice(27, 31))


# -- grayscale and resolution scaling --------------------------------------------------------
def test_grayscale_uses_channel_mean():
    x1, x3 = torch.full((1, 1, 32, 32), 0.5), torch.full((1, 3, 32, 32), 0.5)
    for name in ("l0_inv", "trojan_8x8", "blend", "badnet_grid"):
        rgb = get_trigger(name).patterns(32, 32, 3)
        grey = get_trigger(name).patterns(32, 32, 1)
        for key in rgb:
            if rgb[key].shape[0] == 3:
                assert torch.allclose(grey[key], rgb[key].mean(0, keepdim=True))
    out = get_trigger("l0_inv").apply(x1)
    assert out[0, 0, 31, 24].item() == pytest.approx(2 / 3)  # (255, 0, 255) -> mean 170/255
    assert torch.equal(
        get_trigger("badnet_grid").apply(x1)[0, 0], get_trigger("badnet_grid").apply(x3)[0, 0]
    )


def test_patches_scale_with_resolution():
    for size, lo, hi in ((64, 54, 62), (16, 13, 16)):
        out = get_trigger("badnet_sq").apply(torch.zeros(1, 3, size, size))
        lit = out[0, 0] > 0
        assert lit[lo:hi, lo:hi].all() and lit.sum() == (hi - lo) ** 2
    out = get_trigger("badnet_grid").apply(torch.zeros(1, 1, 64, 64))[0, 0]
    expected = (
        torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])
        .repeat_interleave(2, 0)
        .repeat_interleave(2, 1)
    )
    assert torch.equal(out[58:64, 58:64], expected) and out[:58].sum() == 0
    wide = get_trigger("l0_inv").apply(torch.zeros(1, 3, 32, 64))[0]
    assert wide[:, :31].sum() == 0 and (wide[:, 31, 46:64].amax(0) > 0).sum() > 0


def test_quantize_gives_uint8_grid():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = torch.floor(x * 255) / 255
    for name in ("blend", "smooth", "l2_inv"):
        out = get_trigger(name, quantize=True).apply(x) * 255
        assert torch.allclose(out, out.round(), atol=1e-4)


# -- clean-label: 4-corner grid at test time, PGD + grid at train time ------------------------
def test_cl_test_time_stamps_four_corners():
    x = torch.full((1, 3, 32, 32), 0.5)
    out = get_trigger("cl").apply(x)
    grid = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])  # translated, not mirrored
    for r in (0, 29):
        for c in (0, 29):
            assert torch.equal(out[0, 1, r:r + 3, c:c + 3], grid)
    assert (out != x).sum() == 3 * 4 * 9  # 3 channels x 4 corners x 9 cells; the rest is untouched


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))


def test_cl_poison_train_requires_model():
    with pytest.raises(ValueError, match="model=clean_model"):
        get_trigger("cl").poison_train(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))


def test_cl_poison_train_is_bounded_pgd_then_grid():
    model = tiny_model()
    model.train()
    # a seed other than the model's: with seed 0 the Linear weights correlate with x by construction
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(123)) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 3])
    trig = get_trigger("cl", steps=10)
    poisoned = trig.poison_train(x, y, model=model)
    assert poisoned.shape == x.shape and poisoned.min() >= 0 and poisoned.max() <= 1
    stamped = trig.apply(x)
    corners = stamped != x
    assert torch.equal(poisoned[corners], stamped[corners])  # grid on top of the perturbation
    delta = (poisoned - x)[~corners]
    assert delta.abs().max() <= 16 / 255 + 1e-6 and delta.abs().max() > 8 / 255
    ce = nn.functional.cross_entropy
    assert ce(model(trig.perturb(x, y, model)), y) > ce(model(x), y) + 0.1  # harder, not easier
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(trig.poison_train(x, y, model=model), poisoned)  # deterministic


def test_other_triggers_poison_train_equals_apply():
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    for name in ALL:
        if name != "cl":
            trig = get_trigger(name)
            assert torch.equal(trig.poison_train(x, y), trig.apply(x)), name
    assert isinstance(get_trigger("cl"), Trigger)
