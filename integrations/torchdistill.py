"""ABD for torchdistill (PyPI ``torchdistill``; tested 1.1.5) through its registry, without
editing its classes.

A script adds, after ``get_distillation_box(...)``::

    from abd_plugin.integrations import torchdistill as abd
    handle = abd.patch(training_box, sr_start_fraction=0.99)
    ...train as usual...
    handle.unpatch()

A YAML-only user instead calls ``abd.patch()`` once (e.g. from a module named in
``dependencies``) and selects ``post_forward_process: abd_post_forward_process`` under ``train``;
the guard is then built at the first post-forward call of each box.

What changes: a guard is attached to the box's ``teacher_model``/``student_model`` (forward
hooks only). In ``default_post_forward_process`` the SR gradients are added between
``loss.backward()`` (after gradient clipping) and ``optimizer.step()`` inside the SR window, on
the batch the student last saw. ``sr_start_fraction`` is resolved against
``num_epochs * ceil(len(train_data_loader) / grad_accum_step)`` optimizer steps. torchdistill has
no synthesis step, so SV has nothing to vaccinate here.
"""
from __future__ import annotations

import math
from typing import Any

from abd_plugin import ABDConfig

from ._common import GuardSession, PatchHandle, load_module, require, split_config

HOST = "torchdistill"
SUPPORTED = "torchdistill==1.1.5"
KEY = "abd_post_forward_process"


def optimizer_steps(box: Any) -> int | None:
    loader = getattr(box, "train_data_loader", None)
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    accum = int(getattr(box, "grad_accum_step", 1) or 1)
    return int(box.num_epochs) * math.ceil(n / accum)


def check() -> tuple:
    dist = load_module(None, "torchdistill.core.distillation", HOST, SUPPORTED)
    pfp = load_module(None, "torchdistill.core.interfaces.post_forward_proc", HOST, SUPPORTED)
    reg = load_module(None, "torchdistill.core.interfaces.registry", HOST, SUPPORTED)
    require(
        dist.DistillationBox,
        "forward_process",
        ("self", "sample_batch", "targets", "supp_dict"),
        HOST,
        SUPPORTED,
    )
    require(pfp, "default_post_forward_process", ("self", "loss", "metrics"), HOST, SUPPORTED)
    require(reg, "get_post_forward_proc_func", ("key",), HOST, SUPPORTED)
    if not isinstance(getattr(reg, "POST_FORWARD_PROC_FUNC_DICT", None), dict):
        from ._common import HostMismatchError
        raise HostMismatchError(f"{HOST}: registry.POST_FORWARD_PROC_FUNC_DICT missing; "
                                f"this adapter supports {SUPPORTED}")
    return pfp.default_post_forward_process, reg.POST_FORWARD_PROC_FUNC_DICT


def patch(box: Any = None, *, config: ABDConfig | None = None,
          sr_start_fraction: float | None = None, key: str = KEY,
          **overrides: Any) -> PatchHandle:
    """Register ``key`` as a post-forward process and, with ``box``, guard that box now.

    Args:
        box: a ``DistillationBox``/``TrainingBox``-like object with ``teacher_model`` and
            ``student_model`` (optional).
        config, overrides: the :class:`~abd_plugin.ABDConfig`.
        sr_start_fraction: SR starts at this fraction of the box's optimizer steps.
        key: the registry key of the post-forward process.
    """
    default_pfp, registry = check()
    if key in registry and getattr(registry[key], "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: {key!r} is already registered by abd-plugin; unpatch first")
    cfg, frac = split_config(config, sr_start_fraction, overrides)
    handle = PatchHandle(HOST, cfg, frac)

    def box_session(b: Any) -> GuardSession:
        sess = handle.find_session(b.teacher_model)
        if sess is None:
            sess = handle.session(b.teacher_model, b.student_model)
            steps = optimizer_steps(b)
            if steps is not None:
                sess.set_total_steps(steps)
            sess.open()  # stays attached until unpatch
        return sess

    def abd_post_forward_process(self: Any, loss: Any, metrics: Any = None, **kwargs: Any) -> Any:
        box_session(self)
        return default_pfp(self, loss, metrics=metrics, **kwargs)

    abd_post_forward_process.__abd_wrapped__ = default_pfp  # type: ignore[attr-defined]
    had, old = key in registry, registry.get(key)
    registry[key] = abd_post_forward_process

    def unregister() -> None:
        if had:
            registry[key] = old
        else:
            registry.pop(key, None)

    handle.on_unpatch(unregister)
    if box is not None:
        box_session(box)
    return handle


__all__ = ["patch", "check", "optimizer_steps", "KEY", "SUPPORTED"]
