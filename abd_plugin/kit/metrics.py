"""Clean accuracy, attack success rate (ASR), robust accuracy (RA) and DER; adversarial
(PGD) robust accuracy.

Conventions (following ABD and BackdoorBench):

* ACC: top-1 accuracy on the clean test set.
* ASR: triggered test images whose true label is **not** the target, predicted as the target
  (``include_target_class=True`` reproduces I-BAU/BackdoorBox, which keep them).
* RA: on the same triggered non-target images, predicted as their **true** label.
* Adversarial robustness (not a backdoor metric): :func:`robust_accuracy_pgd`, accuracy under an
  L_inf PGD attack with random start (``RA`` above is BackdoorBench's name for a different
  quantity, hence the longer name).
* All are percentages in [0, 100]. Models run in eval mode without gradients; every
  sub-module's train/eval flag is restored afterwards.
* Images are given in image space ([0, 1]); ``normalize`` (a dataset name, its
  :class:`~abd_plugin.kit.datasets.DatasetInfo` or a ``(mean, std)`` pair; None: none) is applied
  by :func:`~abd_plugin.kit.datasets.to_model_input` right before the model, after the trigger
  was stamped: stamp, then normalise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import _logits, eval_mode, model_device
from .attacks import pgd_attack
from .datasets import DatasetInfo, Normalization, to_model_input

__all__ = [
    "accuracy",
    "attack_success_rate",
    "robust_accuracy",
    "robust_accuracy_pgd",
    "defense_effectiveness_rating",
    "predict",
]

TriggerLike = Any | Callable[[Tensor], Tensor]  # a kit Trigger (has .apply) or x -> x'
NormalizeLike = str | DatasetInfo | Normalization | None


def _as_fn(trigger: TriggerLike) -> Callable[[Tensor], Tensor]:
    if hasattr(trigger, "apply") and callable(trigger.apply):
        return trigger.apply
    if callable(trigger):
        return trigger
    raise TypeError(
        f"trigger must be a Trigger or a callable x -> x', got {type(trigger).__name__}"
    )


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, transform: Callable[[Tensor], Tensor] | None = None,
            batch_size: int = 512, normalize: NormalizeLike = None) -> Tensor:
    """Top-1 predictions (int64, on ``x``'s device) of ``model`` on
    ``to_model_input(transform(x), normalize)`` in batches."""
    device = model_device(model, x.device)
    preds = []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            if transform is not None:
                xb = transform(xb)
            xb = to_model_input(xb, normalize)
            preds.append(_logits(model(xb.to(device))).argmax(dim=1).to(x.device))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)


def _percent(hits: Tensor) -> float:
    if hits.numel() == 0:
        raise ValueError(
            "no samples to evaluate (empty input, or every sample has the target label)"
        )
    return 100.0 * hits.float().mean().item()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512, *,
             normalize: NormalizeLike = None) -> float:
    """Top-1 accuracy in percent of ``model`` on images ``x`` (N, C, H, W), labels ``y`` (N,)."""
    y = torch.as_tensor(y, device=x.device)
    return _percent(predict(model, x, batch_size=batch_size, normalize=normalize) == y)


def _triggered_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    trigger: TriggerLike,
    target: int,
    include_target_class: bool,
    batch_size: int,
    normalize: NormalizeLike = None,
) -> tuple[Tensor, Tensor]:
    y = torch.as_tensor(y, device=x.device)
    keep = torch.ones_like(y, dtype=torch.bool) if include_target_class else y != target
    xs, ys = x[keep], y[keep]
    return predict(model, xs, transform=_as_fn(trigger), batch_size=batch_size,
                   normalize=normalize), ys


def attack_success_rate(model: nn.Module, x: Tensor, y: Tensor, trigger: TriggerLike, target: int,
                        include_target_class: bool = False, batch_size: int = 512, *,
                        normalize: NormalizeLike = None) -> float:
    """Percent of triggered test images predicted as ``target``.

    Args:
        model: classifier (returns logits, or a tuple/dict/object holding them).
        x, y: clean test images in [0, 1] (N, C, H, W) and their true labels (N,).
        trigger: a kit ``Trigger`` (its test-time ``apply`` is used) or any callable ``x -> x'``,
            applied in image space.
        target: the attack's target class.
        include_target_class: keep test images whose true label is ``target`` (default: drop them).
        normalize: applied after the trigger, before the model (see the module doc).
    """
    preds, _ = _triggered_predictions(
        model, x, y, trigger, target, include_target_class, batch_size, normalize
    )
    return _percent(preds == target)


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, trigger: TriggerLike, target: int,
                    batch_size: int = 512, *, normalize: NormalizeLike = None) -> float:
    """Percent of triggered non-target test images predicted as their **true** label
    (BackdoorBench RA)."""
    preds, ys = _triggered_predictions(model, x, y, trigger, target, False, batch_size,
                                       normalize)
    return _percent(preds == ys)


def defense_effectiveness_rating(
    asr_before: float, asr_after: float, acc_before: float, acc_after: float, scale: float = 100.0
) -> float:
    """DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2, in [0, 1].

    The documented BackdoorBench formula (its code adds the accuracy drop, a sign bug we do not
    copy).
    Inputs are percentages as returned by this module; pass ``scale=1.0`` for fractions.
    0.5 = no effect, 1 = ASR removed at no accuracy cost.
    """
    delta_asr = max(0.0, (asr_before - asr_after) / scale)
    delta_acc = max(0.0, (acc_before - acc_after) / scale)
    return (delta_asr - delta_acc + 1.0) / 2.0


def robust_accuracy_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    *,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """Percent of test images still classified correctly after an L_inf PGD-``steps`` attack of
    radius ``eps`` (uniform random start when ``random_start``, step ``step_size``, default
    ``2.5 * eps / steps``; images clamped to ``clamp``), in eval mode. The random start is seeded
    (``seed``), so the number is reproducible. Report it beside :func:`accuracy`."""
    y = torch.as_tensor(y, device=x.device)
    device = model_device(model, x.device)
    g = torch.Generator().manual_seed(seed)
    hits = []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            xa = pgd_attack(model, xb, yb, eps=eps, steps=steps, step_size=step_size,
                            random_start=random_start, clamp=clamp, generator=g)
            with torch.no_grad():
                hits.append((_logits(model(xa)).argmax(1) == yb).to(x.device))
    return _percent(torch.cat(hits) if hits else torch.empty(0, dtype=torch.bool))
