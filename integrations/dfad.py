"""ABD for VainF/Data-Free-Adversarial-Distillation (DFAD): ``DFAD_cifar.py``/``DFAD_mnist.py``.

A fork adds, in a launcher (``DFAD_cifar`` builds a visdom client when imported)::

    import DFAD_cifar
    from abd_plugin.integrations import dfad as abd
    with abd.patch(DFAD_cifar, sr_start_fraction=0.99):
        DFAD_cifar.main()

What changes in the host: the module-level ``train`` (called by global name from ``main``) runs
with a guard around its ``teacher``/``student``.

* Generator step: ``fake = generator(z)`` has gradient, so the teacher's logits carry the SV
  term into ``loss_G`` and ``loss_G.backward()`` also back-propagates SV into the generator.
  Student steps feed a detached ``fake``, so they get no SV.
* Student steps: inside the SR window SR gradients are added between ``loss_S.backward()`` and
  ``optimizer_S.step()`` on the student's last (detached) batch. ``sr_start_fraction`` is
  resolved against ``epochs * epoch_itrs * 5`` student steps (5 is the host's inner loop).
"""
from __future__ import annotations

from typing import Any

from abd_plugin import ABDConfig

from ._common import PatchHandle, bind_args, load_module, require, split_config, wraps_host

HOST = "dfad"
SUPPORTED = "VainF/Data-Free-Adversarial-Distillation@c161591aae4c13e53943dcb61c162876421aad7a"
TRAIN_PARAMS = ("args", "teacher", "student", "generator", "device", "optimizer", "epoch")
#: student steps per ``epoch_itrs`` iteration, hard-coded in the host's ``train``
STUDENT_STEPS_PER_ITER = 5


def student_steps(args: Any) -> int:
    return int(args.epochs) * int(args.epoch_itrs) * STUDENT_STEPS_PER_ITER


def check(module: Any) -> None:
    require(module, "train", TRAIN_PARAMS, HOST, SUPPORTED)
    if getattr(module.train, "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: {module.__name__}.train is already patched; unpatch first")


def patch(module: Any = None, *, config: ABDConfig | None = None,
          sr_start_fraction: float | None = None, **overrides: Any) -> PatchHandle:
    """Add ABD to a DFAD script module (default: ``import DFAD_cifar``)."""
    mod = load_module(module, "DFAD_cifar", HOST, SUPPORTED)
    check(mod)
    cfg, frac = split_config(config, sr_start_fraction, overrides)
    handle = PatchHandle(HOST, cfg, frac)
    orig_train = mod.train

    def train(*args: Any, **kwargs: Any) -> Any:
        a = bind_args(orig_train, args, kwargs)
        sess = handle.session(a["teacher"], a["student"])
        sess.set_total_steps(student_steps(a["args"]))
        with sess.active():
            return orig_train(*args, **kwargs)

    handle.set_attr(mod, "train", wraps_host(orig_train, train))
    return handle


__all__ = ["patch", "check", "student_steps", "SUPPORTED"]
