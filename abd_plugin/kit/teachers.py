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

from ._utils import parse_options
from .nasty import NastySpec, train_nasty
from .poison import TeacherSpec, train_teacher
from .robust import AdversarialSpec, train_robust_teacher

TEACHER_KINDS = ("standard", "pgd", "nasty")


def _split(opts: dict[str, Any], fields: set[str], kind: str) -> dict[str, Any]:
    unknown = set(opts) - fields
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for teacher kind {kind!r}; "
                         f"known: {sorted(fields)}")
    return opts


def build_teacher(
    kind: str, base: TeacherSpec, *, progress: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from the cache) the teacher of ``kind`` (see the module doc) on ``base``'s
    dataset, architecture and trigger; returns (model in eval mode, metrics). An adversarially
    trained teacher's metrics hold ``eps`` and ``racc`` (PGD robust accuracy at ``eps``)."""
    name, opts = parse_options(kind)
    if name == "standard":
        _split(opts, set(), name)
        return train_teacher(base, progress=progress)
    epochs = opts.pop("epochs", None)
    if epochs is not None:
        base = dataclasses.replace(base, epochs=int(epochs))
    if name == "pgd":
        fields = {f.name for f in dataclasses.fields(AdversarialSpec)} - {"base", "attack"}
        return train_robust_teacher(
            AdversarialSpec(base=base, **_split(opts, fields, name)), progress=progress)
    if name == "nasty":
        if base.trigger is not None:
            raise ValueError("the nasty teacher has no trigger: use trigger 'none'")
        fields = {"omega", "tau"}
        return train_nasty(NastySpec(base=base, **_split(opts, fields, name)), progress=progress)
    raise ValueError(f"unknown teacher kind {name!r}; choose from {list(TEACHER_KINDS)}")
