"""Train (poisoned or clean) teachers on offline data; cached by a config hash.

The recipe follows how ABD's teachers were poisoned, scaled to a CPU: a fixed fraction
``poison_ratio`` of the training set is stamped with the trigger and relabelled to the target
(dirty-label triggers: the first N non-target images of a seeded permutation; clean-label
triggers ``sig``/``cl``: target-class images only, labels kept). Each epoch re-shuffles; no
augmentation beyond the poisoning. Triggers are stamped in image space ([0, 1]); the model is
trained and evaluated on :func:`~abd_plugin.kit.datasets.to_model_input` of the (poisoned)
images, i.e. normalised where the dataset says so (``tinted32``), unchanged otherwise. The
result is cached under ``$ABD_CACHE`` (default ``~/.cache/abd-plugin``) keyed by a hash of every
setting, so benchmarks and the demo reuse it. The hash holds the trigger's *name* only: a
trigger's parameters are part of its registered name, never changed under it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .datasets import dataset_info, load_dataset, to_model_input
from .metrics import accuracy, attack_success_rate
from .models import get_model
from .triggers import get_trigger


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines a teacher (its hash is the cache key)."""

    dataset: str = "mnist5k"
    arch: str = "lenet5"
    width: int | None = None
    """``width`` of the architecture when it takes one (cnn5), else ignored."""
    size: int | None = None
    """Image side (None: the dataset's default)."""
    trigger: str | None = "badnet_grid"  # None: a clean teacher
    target: int = 0
    poison_ratio: float = 0.1
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 5e-4
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("ABD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "abd-plugin"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def poison_dataset(
    x: Tensor, y: Tensor, spec: TeacherSpec, model: nn.Module | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (images, labels, poisoned-mask) with ``poison_ratio`` of the set poisoned."""
    if spec.trigger is None or spec.poison_ratio <= 0:
        return x.clone(), y.clone(), torch.zeros(len(y), dtype=torch.bool)
    trig = get_trigger(spec.trigger, seed=spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(y), generator=g)
    n = int(spec.poison_ratio * len(y))
    if trig.clean_label:
        pool = order[y[order] == spec.target]
    else:
        pool = order[y[order] != spec.target]
    idx = pool[:n]
    x, y = x.clone(), y.clone()
    x[idx] = trig.poison_train(x[idx], y[idx], model=model)
    if not trig.clean_label:
        y[idx] = spec.target
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    return x, y, mask


#: a training objective ``loss_fn(model, x_batch, y_batch, epoch) -> scalar`` (default: CE);
#: ``x_batch`` is what the model is fed (:func:`~abd_plugin.kit.datasets.to_model_input`)
LossFn = Callable[[nn.Module, Tensor, Tensor, int], Tensor]


class ImageSpaceModel(nn.Module):
    """``model`` taking image-space inputs: ``model(to_model_input(x, dataset))``. For attacks
    that work on pixels in [0, 1] (the ``cl`` trigger's PGD); the kit's models themselves are
    fed normalised inputs from outside."""

    def __init__(self, model: nn.Module, dataset: str) -> None:
        super().__init__()
        self.model, self.dataset = model, dataset

    def forward(self, x: Tensor) -> Tensor:
        return self.model(to_model_input(x, self.dataset))


def _train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: TeacherSpec,
    progress: Callable[[str], None] | None = None,
    loss_fn: LossFn | None = None,
) -> None:
    """Adam + cosine schedule for ``spec.epochs`` over (x, y), minimising ``loss_fn`` (default
    cross-entropy); the teachers of every kind share it. ``x`` is in image space; the model (and
    ``loss_fn``) get ``to_model_input(x, spec.dataset)``."""
    x = to_model_input(x, spec.dataset)  # once; x itself where the dataset is not normalised
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps = spec.epochs * ((len(y) + spec.batch_size - 1) // spec.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(spec.seed + 1)
    model.train()
    for ep in range(spec.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), spec.batch_size):
            b = perm[i:i + spec.batch_size]
            if loss_fn is None:
                loss = F.cross_entropy(model(x[b]), y[b])
            else:
                loss = loss_fn(model, x[b], y[b], ep)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(f"teacher epoch {ep + 1}/{spec.epochs} loss {loss.item():.3f}")
    model.eval()


def build_model(arch: str, dataset: str, width: int | None = None) -> nn.Module:
    """An architecture for ``dataset`` (classes and channels from the dataset's info)."""
    info = dataset_info(dataset)
    kw = {"width": width} if (width is not None and arch.startswith("cnn")) else {}
    return get_model(arch, num_classes=info.num_classes, in_channels=info.channels, **kw)


def cached_model(
    stem: str,
    model: nn.Module,
    fit: Callable[[nn.Module], dict[str, Any]],
    *,
    cache: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``<cache_dir>/<stem>.pt`` (+ ``.json`` metrics) into ``model`` when both exist, else
    run ``fit(model)`` (returns the metrics) and save both. The teacher kinds built on
    :class:`TeacherSpec` (adversarially trained, nasty) cache themselves through this, under a
    stem holding their own spec hash."""
    path = cache_dir() / f"{stem}.pt"
    meta_path = path.with_suffix(".json")
    if cache and path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), json.loads(meta_path.read_text())
    meta = fit(model)
    model.eval()
    if cache:
        torch.save(model.state_dict(), path)
        meta_path.write_text(json.dumps(meta))
    return model, meta


def train_teacher(
    spec: TeacherSpec, *, cache: bool = True, progress: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict]:
    """Train (or load from cache) the teacher of ``spec``; returns (model in eval mode, metrics)."""
    model = build_model(spec.arch, spec.dataset, spec.width)
    path = cache_dir() / f"teacher-{spec.key()}.pt"
    meta_path = path.with_suffix(".json")
    if cache and path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), json.loads(meta_path.read_text())
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, spec.dataset, spec.width)
    xtr, ytr = load_dataset(spec.dataset, "train", size=spec.size).tensors
    helper = None
    if spec.trigger == "cl":  # label-consistent: PGD against a clean model first
        helper = build_model(spec.arch, spec.dataset, spec.width)
        _train(helper, xtr, ytr, TeacherSpec(**{**asdict(spec), "trigger": None}))
        if dataset_info(spec.dataset).normalize is not None:  # its PGD works on pixels
            helper = ImageSpaceModel(helper, spec.dataset)
    xp, yp, _ = poison_dataset(xtr, ytr, spec, helper)
    _train(model, xp, yp, spec, progress)
    xte, yte = load_dataset(spec.dataset, "test", size=spec.size).tensors
    metrics: dict[str, Any] = {"acc": accuracy(model, xte, yte, normalize=spec.dataset)}
    if spec.trigger is not None:
        metrics["asr"] = attack_success_rate(
            model, xte, yte, get_trigger(spec.trigger, seed=spec.seed), spec.target,
            normalize=spec.dataset,
        )
    metrics["spec"] = asdict(spec)
    if cache:
        torch.save(model.state_dict(), path)
        meta_path.write_text(json.dumps(metrics))
    return model, metrics
