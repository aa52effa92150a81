"""Teacher kinds of the benchmark: one name per way a teacher is trained.

* ``standard``: :func:`~abd_plugin.kit.poison.train_teacher` (poisoned by the cell's trigger, or
  clean with ``trigger=none``).
* ``pgd``: PGD adversarial training (:mod:`abd_plugin.kit.robust`), on the cell's (poisoned or
  clean) training set; options ``eps``, ``steps``, ``step_size``, ``eps_warmup_epochs``,
  ``epochs``, e.g. ``pgd:eps=0.1``.
* ``nasty``: a Nasty Teacher (:mod:`abd_plugin.kit.nasty`) against the clean teacher of the same
  architecture; options ``omega``, ``tau``, ``epochs``; the cell's trigger must be ``none``.

Options follow the name as ``:key=value`` (:func:`~abd_plugin.kit._utils.parse_options`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from abd_plugin.validation import Int, Num, Optional, Spec

from ._utils import check_options, parse_options
from .nasty import NastySpec, train_nasty
from .poison import TeacherSpec, train_teacher
from .robust import AdversarialSpec, train_robust_teacher

TEACHER_KINDS = ("standard", "pgd", "nasty")


#: the ``:key=value`` options each teacher kind accepts (what they mean: the module doc)
KIND_OPTIONS: dict[str, dict[str, Spec]] = {
    "standard": {},
    "pgd": {"eps": Num(0, 1, lo_open=True), "steps": Int(1),
            "step_size": Optional(Num(0, lo_open=True)), "eps_warmup_epochs": Int(0),
            "eval_steps": Int(1), "epochs": Int(1)},
    "nasty": {"omega": Num(0), "tau": Num(0, lo_open=True), "epochs": Int(1)},
}


def check_teacher_kind(kind: str, trigger: str | None = None) -> tuple[str, dict[str, Any]]:
    """``kind`` -> (name, options), checked without training anything: a known kind, known
    options with accepted values, and (``trigger``: the cell's trigger, None for a clean
    teacher) no trigger for a nasty teacher. Raises ``ValueError``/``TypeError``."""
    name, opts = parse_options(kind)
    if name not in KIND_OPTIONS:
        raise ValueError(f"unknown teacher kind {name!r}; choose from {list(TEACHER_KINDS)}")
    check_options(f"teacher kind {name!r}", opts, KIND_OPTIONS[name])
    if name == "nasty" and trigger is not None:
        raise ValueError("the nasty teacher has no trigger: use trigger 'none'")
    return name, opts


def build_teacher(
    kind: str, base: TeacherSpec, *, progress: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from the cache) the teacher of ``kind`` (see the module doc) on ``base``'s
    dataset, architecture and trigger; returns (model in eval mode, metrics). An adversarially
    trained teacher's metrics hold ``eps`` and ``racc`` (PGD robust accuracy at ``eps``)."""
    name, opts = check_teacher_kind(kind, base.trigger)
    if name == "standard":
        return train_teacher(base, progress=progress)
    opts = dict(opts)
    epochs = opts.pop("epochs", None)
    if epochs is not None:
        base = dataclasses.replace(base, epochs=int(epochs))
    if name == "pgd":
        return train_robust_teacher(AdversarialSpec(base=base, **opts), progress=progress)
    return train_nasty(NastySpec(base=base, **opts), progress=progress)
