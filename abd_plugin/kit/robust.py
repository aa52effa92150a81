"""Adversarially robust teachers: PGD adversarial training (Madry et al. 2018) on the kit's
datasets, cached like the poisoned teachers.

An :class:`AdversarialSpec` is a :class:`~abd_plugin.kit.poison.TeacherSpec` (dataset,
architecture, optimiser, epochs, seed; a trigger poisons the training set first, as for the
poisoned teachers) plus the attack trained against. Every training batch is replaced by its
PGD-``steps`` adversarial examples in the L_inf ball of radius ``eps`` (random start, step
``2.5 * eps / steps`` unless given; ``eps_warmup_epochs`` ramps eps up linearly over the first
epochs, which helps small networks start learning), and the model minimises the cross-entropy
on them. The model is cached under ``$ABD_CACHE`` by a hash of the whole spec; its metrics are
clean ACC and PGD robust accuracy (``eval_steps`` steps, random start) at the training ``eps`` on
the test split.

    abd-plugin train --adversarial pgd --eps 0.2 --steps 10      # mnist5k, LeNet-5
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import pgd_attack
from .datasets import dataset_info, load_dataset
from .metrics import accuracy, attack_success_rate, robust_accuracy_pgd
from .poison import TeacherSpec, _train, build_model, cached_model, poison_dataset
from .triggers import get_trigger

ATTACKS = ("pgd",)


def _clean_base() -> TeacherSpec:
    return TeacherSpec(trigger=None)


@dataclass(frozen=True)
class AdversarialSpec:
    """Everything that determines an adversarially trained teacher (its hash is the cache key)."""

    base: TeacherSpec = field(default_factory=_clean_base)
    """Dataset, architecture, optimiser, epochs and seed (``trigger``: poison first; None:
    a clean training set)."""
    attack: str = "pgd"
    eps: float = 0.2
    """L_inf radius in pixel units of [0, 1] images."""
    steps: int = 10
    step_size: float | None = None
    """PGD step; None: ``2.5 * eps / steps``."""
    eps_warmup_epochs: int = 5
    """Ramp eps linearly from eps / n to eps over the first n epochs (0: full eps at once)."""
    eval_steps: int = 20
    """PGD steps of the robust-accuracy evaluation saved with the teacher."""

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown adversarial training attack {self.attack!r}; "
                             f"choose from {list(ATTACKS)}")
        if not self.eps > 0 or self.steps < 1 or self.eval_steps < 1:
            raise ValueError("eps must be > 0, steps and eval_steps >= 1")
        if self.base.trigger == "cl":
            raise ValueError("the label-consistent trigger 'cl' is not supported with "
                             "adversarial training")
        if dataset_info(self.base.dataset).normalize is not None:
            raise ValueError(f"adversarial training on {self.base.dataset!r} (normalised model "
                             "inputs) is not supported: eps and the PGD clamp are in [0, 1] "
                             "pixel units of unnormalised datasets")

    def key(self) -> str:
        blob = json.dumps({"kind": "adversarial", **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def adversarial_loss(spec: AdversarialSpec, generator: torch.Generator) -> Callable[
        [nn.Module, Tensor, Tensor, int], Tensor]:
    """The training objective of ``spec``: CE on the batch's PGD examples."""

    def loss(model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> Tensor:
        eps = spec.eps
        if spec.eps_warmup_epochs > 0:
            eps *= min(1.0, (epoch + 1) / spec.eps_warmup_epochs)
        step = None if spec.step_size is None else spec.step_size * eps / spec.eps
        x_adv = pgd_attack(model, x, y, eps=eps, steps=spec.steps, step_size=step,
                           random_start=True, generator=generator)
        return F.cross_entropy(model(x_adv), y)

    return loss


def train_robust_teacher(
    spec: AdversarialSpec, *, cache: bool = True, progress: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from cache) the adversarially trained teacher of ``spec``; returns (model
    in eval mode, metrics: ``acc``, ``racc`` (PGD robust accuracy at ``eps``), ``eps``,
    ``asr`` when poisoned, ``spec``)."""
    base = spec.base

    def fit(model: nn.Module) -> dict[str, Any]:
        torch.manual_seed(base.seed)
        model.load_state_dict(build_model(base.arch, base.dataset, base.width).state_dict())
        xtr, ytr = load_dataset(base.dataset, "train", size=base.size).tensors
        xp, yp, _ = poison_dataset(xtr, ytr, base)
        g = torch.Generator().manual_seed(base.seed + 2)
        _train(model, xp, yp, base, progress, loss_fn=adversarial_loss(spec, g))
        model.eval()
        xte, yte = load_dataset(base.dataset, "test", size=base.size).tensors
        meta: dict[str, Any] = {
            "acc": accuracy(model, xte, yte),
            "racc": robust_accuracy_pgd(model, xte, yte, spec.eps, spec.eval_steps),
            "eps": spec.eps,
        }
        if base.trigger is not None:
            meta["asr"] = attack_success_rate(
                model, xte, yte, get_trigger(base.trigger, seed=base.seed), base.target)
        meta["spec"] = {"kind": "adversarial", **asdict(spec)}
        return meta

    model = build_model(base.arch, base.dataset, base.width)
    return cached_model(f"teacher-adv-{spec.key()}", model, fit, cache=cache)
