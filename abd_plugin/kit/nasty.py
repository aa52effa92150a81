"""Nasty Teacher (Ma et al., ICLR 2021, "Undistillable: Making A Nasty Teacher That CANNOT teach
students"): a teacher that keeps its own accuracy while its soft labels mislead a student.

It is trained from scratch to minimise

    CE(N(x), y) - omega * tau^2 * KL(softmax(N(x) / tau) || softmax(A(x) / tau))

where A is a normally trained, frozen network (here: the kit's clean teacher of the same
dataset and, by default, architecture). The first term keeps N accurate; the second pushes N's
temperature-``tau`` distribution away from a normal network's, which makes it multi-peaked and
misleading for KD at that temperature. The paper's CIFAR-10 ResNet-18 setting is tau = 4,
omega = 0.04 (CIFAR-100: tau = 20, omega = 0.005); :class:`NastySpec`'s defaults (tau = 4,
omega = 0.05, the poisoned teachers' optimiser and 15 epochs) are this kit's mnist5k/LeNet-5
scaling (README, "Beyond backdoors"). For a KD defense it is bad supervision
without a trigger: nothing to unlearn, only a student-accuracy drop. The model is cached under
``$ABD_CACHE`` by a hash of the spec (the adversary A is cached as an ordinary clean teacher).

    abd-plugin train --nasty --omega 0.05 --tau 4
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

from ._utils import eval_mode
from .datasets import load_dataset, to_model_input
from .metrics import accuracy
from .poison import TeacherSpec, _train, build_model, cached_model, train_teacher


def _clean_base() -> TeacherSpec:
    return TeacherSpec(trigger=None)


@dataclass(frozen=True)
class NastySpec:
    """Everything that determines a nasty teacher (its hash is the cache key)."""

    base: TeacherSpec = field(default_factory=_clean_base)
    """The nasty teacher's dataset, architecture, optimiser, epochs and seed (its trigger must
    be None)."""
    adversary: TeacherSpec | None = None
    """The normally trained network A; None: ``base`` itself (a clean teacher, cached)."""
    omega: float = 0.05
    """Weight of the KL term (the paper's CIFAR-10 value is 0.04; on mnist5k/LeNet-5 0.05 keeps
    the teacher within 1.5 points of a normal one, 0.1 already costs it 37 points)."""
    tau: float = 4.0

    def __post_init__(self) -> None:
        if self.base.trigger is not None:
            raise ValueError("a nasty teacher is trained on clean data: base.trigger must be None")
        if not self.omega >= 0 or not self.tau > 0:
            raise ValueError(f"omega must be >= 0 and tau > 0, got {self.omega}, {self.tau}")

    @property
    def adversary_spec(self) -> TeacherSpec:
        return self.adversary if self.adversary is not None else self.base

    def key(self) -> str:
        blob = json.dumps({"kind": "nasty", **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def nasty_loss(
    nasty_logits: Tensor, adversary_logits: Tensor, y: Tensor, omega: float, tau: float
) -> Tensor:
    """``CE(N, y) - omega * tau^2 * KL(softmax(N / tau) || softmax(A / tau))`` (batch mean)."""
    kl = F.kl_div(F.log_softmax(adversary_logits.detach() / tau, 1),
                  F.log_softmax(nasty_logits / tau, 1), reduction="batchmean", log_target=True)
    return F.cross_entropy(nasty_logits, y) - omega * tau * tau * kl


@torch.no_grad()
def soft_label_divergence(a: nn.Module, b: nn.Module, x: Tensor, tau: float) -> float:
    """Mean ``KL(softmax(a(x) / tau) || softmax(b(x) / tau))`` over ``x`` (both in eval mode)."""
    with eval_mode(a), eval_mode(b):
        return float(F.kl_div(F.log_softmax(b(x) / tau, 1), F.log_softmax(a(x) / tau, 1),
                              reduction="batchmean", log_target=True))


def train_nasty(
    spec: NastySpec, *, cache: bool = True, progress: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from cache) the nasty teacher of ``spec``; returns (model in eval mode,
    metrics: ``acc``, ``adversary_acc``, ``kl_to_adversary`` (soft-label KL at ``tau`` on the
    test split), ``spec``)."""
    base = spec.base
    adversary, ameta = train_teacher(spec.adversary_spec, cache=cache)
    adversary.eval().requires_grad_(False)

    def objective(model: nn.Module, x: Tensor, y: Tensor, _epoch: int) -> Tensor:
        with torch.no_grad():
            a = adversary(x)
        return nasty_loss(model(x), a, y, spec.omega, spec.tau)

    def fit(model: nn.Module) -> dict[str, Any]:
        torch.manual_seed(base.seed)
        model.load_state_dict(build_model(base.arch, base.dataset, base.width).state_dict())
        xtr, ytr = load_dataset(base.dataset, "train", size=base.size).tensors
        _train(model, xtr, ytr, base, progress, loss_fn=objective)
        model.eval()
        xte, yte = load_dataset(base.dataset, "test", size=base.size).tensors
        return {"acc": accuracy(model, xte, yte, normalize=base.dataset),
                "adversary_acc": ameta["acc"],
                "kl_to_adversary": soft_label_divergence(
                    model, adversary, to_model_input(xte, base.dataset), spec.tau),
                "spec": {"kind": "nasty", **asdict(spec)}}

    model = build_model(base.arch, base.dataset, base.width)
    return cached_model(f"teacher-nasty-{spec.key()}", model, fit, cache=cache)
