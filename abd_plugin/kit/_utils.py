"""Small helpers shared by the kit modules (not public API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from abd_plugin._replica import model_device as model_device  # one definition: the core's
from abd_plugin.outputs import extract_logits

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
