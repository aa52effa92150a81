"""Small helpers shared by the kit modules (not public API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from abd_plugin._replica import model_device as model_device  # one definition: the core's
from abd_plugin.outputs import extract_logits
from abd_plugin.validation import Spec

# one rule for finding logits, the core's (tensor, tuple/list with logits first, dict, .logits)
_logits = extract_logits


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every sub-module's own train/eval flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in flags:
            module.training = was_training


def _option_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value:key=value"`` -> ``("name", {key: value})`` (values: int, float, bool,
    None or str). Used for parametrised teacher kinds and defenses on the command line, e.g.
    ``pgd:eps=0.2:steps=10`` or ``iga:gamma=10`` (``:`` because ``,`` separates list items)."""
    name, *parts = text.split(":")
    opts: dict[str, Any] = {}
    for part in parts:
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise ValueError(f"option {part!r} in {text!r} is not key=value")
        opts[key.strip()] = _option_value(val.strip())
    return name.strip(), opts


def check_options(what: str, opts: dict[str, Any], specs: dict[str, Spec]) -> dict[str, Any]:
    """Check ``:key=value`` options of ``what`` (e.g. ``teacher kind 'pgd'``) against ``specs``
    (the settings it accepts, :mod:`abd_plugin.validation`); returns ``opts``. An unknown key
    raises ``ValueError`` listing the known ones; a bad value ``TypeError``/``ValueError`` naming
    the option and what it accepts."""
    unknown = sorted(set(opts) - set(specs))
    if unknown:
        known = ", ".join(sorted(specs)) or "none"
        raise ValueError(f"unknown option(s) {unknown} for {what}; known: {known}")
    for key, value in opts.items():
        specs[key].validate(f"option {key} of {what}", value)
    return opts
