"""Metrics on hand-made predictions: ACC, ASR (target-class exclusion), RA, DER."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from abd_plugin.kit._utils import _logits
from abd_plugin.kit.metrics import (
    accuracy,
    attack_success_rate,
    defense_effectiveness_rating,
    predict,
    robust_accuracy,
)
from abd_plugin.kit.triggers import get_trigger

TARGET = 0
# sample i carries its id in pixel (0, 1, 1); a "triggered" sample has pixel (0, 0, 0) == 1
Y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
CLEAN_PRED = torch.tensor([0, 1, 1, 1, 2, 0, 3, 3])  # 6/8 correct
TRIG_PRED = torch.tensor([0, 0, 0, 1, 0, 2, 0, 0])  # non-target (ids 2..7): target hits 2, 4, 6, 7


def images(n: int = 8) -> torch.Tensor:
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, 1, 1] = torch.arange(n) / 100.0
    return x


def stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, 0, 0, 0] = 1.0
    return x


class LookupModel(nn.Module):
    """Returns one-hot logits from fixed tables, wrapped as ``kind``; records its mode in
    forward."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.ones(()))
        self.inner = nn.BatchNorm2d(3)
        self.modes_seen: list[bool] = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        ids = torch.round(x[:, 0, 1, 1] * 100).long()
        triggered = x[:, 0, 0, 0] > 0.5
        pred = torch.where(triggered, TRIG_PRED[ids], CLEAN_PRED[ids])
        logits = nn.functional.one_hot(pred, 4).float() * self.scale
        if self.kind == "tuple":
            return logits, x
        if self.kind == "dict":
            return {"logits": logits, "features": x}
        if self.kind == "object":
            return SimpleNamespace(logits=logits)
        return logits


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "object"])
def test_metrics_on_fixed_predictions(kind):
    model = LookupModel(kind)
    x = images()
    assert accuracy(model, x, Y) == pytest.approx(75.0)
    assert attack_success_rate(model, x, Y, stamp, TARGET) == pytest.approx(100 * 4 / 6)
    assert attack_success_rate(
        model, x, Y, stamp, TARGET, include_target_class=True
    ) == pytest.approx(75.0)
    assert robust_accuracy(model, x, Y, stamp, TARGET) == pytest.approx(100 * 2 / 6)


def test_batch_size_does_not_change_results():
    model, x = LookupModel(), images()
    for bs in (1, 3, 8, 1000):
        assert attack_success_rate(model, x, Y, stamp, TARGET, batch_size=bs) == pytest.approx(
            100 * 4 / 6
        )
        assert accuracy(model, x, Y, batch_size=bs) == pytest.approx(75.0)


def test_target_class_only_changes_asr_when_included():
    model, x = LookupModel(), images()
    other_target = 3  # ids 6, 7 have label 3; with target 3 they are excluded
    preds = TRIG_PRED[Y != other_target]
    expected = 100 * (preds == other_target).float().mean().item()
    assert attack_success_rate(model, x, Y, stamp, other_target) == pytest.approx(expected)


def test_model_mode_is_eval_during_and_restored_after():
    model = LookupModel()
    model.train()
    model.inner.eval()  # a mixed configuration must survive too
    accuracy(model, images(), Y)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and not model.inner.training
    assert model.scale.grad is None


def test_accepts_a_kit_trigger():
    grid = get_trigger("badnet_grid")

    class CornerDetector(nn.Module):
        def forward(self, x):
            hit = (x[:, 0, 31, 31] > 0.99) & (x[:, 0, 29, 29] < 0.01) & (x[:, 0, 30, 30] > 0.99)
            return torch.stack(
                [hit.float(), (~hit).float()], dim=1
            )  # class 0 if the grid is present

    x = torch.full((6, 3, 32, 32), 0.5)
    y = torch.tensor([0, 1, 1, 1, 1, 1])
    model = CornerDetector()
    assert attack_success_rate(model, x, y, grid, target=0) == 100.0
    assert robust_accuracy(model, x, y, grid, target=0) == 0.0
    assert accuracy(model, x, y) == pytest.approx(100 * 5 / 6)


def test_no_samples_left_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        attack_success_rate(LookupModel(), images(2), torch.tensor([0, 0]), stamp, TARGET)


def test_predict_returns_labels():
    assert torch.equal(predict(LookupModel(), images()), CLEAN_PRED)


def test_logits_helper_rejects_unknown_outputs():
    t = torch.ones(2, 3)
    assert (
        _logits((t, 1)) is t
        and _logits({"logits": t}) is t
        and _logits(SimpleNamespace(logits=t)) is t
    )
    with pytest.raises(TypeError, match="cannot find logits"):
        _logits("not a tensor")


def test_defense_effectiveness_rating():
    assert defense_effectiveness_rating(100, 0, 90, 90) == pytest.approx(1.0)
    assert defense_effectiveness_rating(95, 95, 90, 90) == pytest.approx(0.5)
    # accuracy drop of 10 points is subtracted (BackdoorBench's code adds it: a bug)
    assert defense_effectiveness_rating(100, 0, 90, 80) == pytest.approx(0.95)
    # ASR going up and accuracy going up both count as zero change
    assert defense_effectiveness_rating(10, 50, 80, 85) == pytest.approx(0.5)
    assert defense_effectiveness_rating(1.0, 0.2, 0.9, 0.8, scale=1.0) == pytest.approx(
        (0.8 - 0.1 + 1) / 2
    )
