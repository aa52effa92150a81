"""ABD for zju-vipa/Fast-Datafree and zju-vipa/CMI (the ``datafree`` package + ``datafree_kd.py``).

A fork adds, in a launcher next to ``datafree_kd.py``::

    import datafree_kd
    from abd_plugin.integrations import datafree as abd
    with abd.patch(datafree_kd, sr_start_fraction=0.99):
        datafree_kd.main()

What changes in the host:

* ``synthesize`` of ``CMISynthesizer``, ``DeepInvSyntheiszer``, ``GenerativeSynthesizer`` (and
  ``FastSynthesizer``/``FastMetaSynthesizer`` in Fast-Datafree) runs with the guard attached: the
  first grad-enabled teacher forward of every generator/pixel step (CMI's global view) carries
  the SV loss term, so the host's ``loss.backward()`` also back-propagates SV. The local view and
  a ``student=teacher`` second call are not vaccinated twice.
* ``datafree_kd.train`` (looked up by global name in ``main_worker``) runs with the guard
  attached: inside the SR window SR gradients are added to the student's ``.grad`` between
  ``loss_s.backward()`` and ``optimizer.step()``. The window counts student steps from the first
  ``train`` call; ``sr_start_fraction`` is resolved against
  ``(epochs - max(start_epoch, warmup)) * (ep_steps // kd_steps) * kd_steps``.
* Fast-Datafree builds ``GenerativeSynthesizer`` with ``student=teacher``; its guard is made at
  the first ``train`` call, so the very first generator step of such a run has no SV.
"""
from __future__ import annotations

from typing import Any

from abd_plugin import ABDConfig

from ._common import HostMismatchError, PatchHandle, load_module, require, split_config, wraps_host

HOST = "datafree"
SUPPORTED = ("zju-vipa/Fast-Datafree@0dcecbc178b87048bedf730acb577045b3c0b57a or "
             "zju-vipa/CMI@9e79fa9e2328205f26dbdb226878f3a28f3bf4cc")

#: synthesizer class -> leading ``__init__`` parameters at the supported commits
SYNTHESIZERS = {
    "CMISynthesizer": ("self", "teacher", "student", "generator", "nz", "num_classes", "img_size"),
    "DeepInvSyntheiszer": ("self", "teacher", "student", "num_classes", "img_size"),
    "GenerativeSynthesizer": ("self", "teacher", "student", "generator", "nz", "img_size"),
    "FastSynthesizer": ("self", "teacher", "student", "generator", "nz", "num_classes", "img_size"),
    "FastMetaSynthesizer": ("self", "teacher", "student", "generator", "nz", "num_classes",
                            "img_size"),
}
#: present only in Fast-Datafree
FAST_ONLY = ("FastSynthesizer", "FastMetaSynthesizer")
TRAIN_PARAMS = ("synthesizer", "model", "criterion", "optimizer", "args")


def student_steps(args: Any) -> int:
    """Student optimizer steps ``datafree_kd.main_worker`` will take from now on."""
    start = max(int(getattr(args, "start_epoch", 0)), int(getattr(args, "warmup", 0)))
    epochs = max(0, int(args.epochs) - start)
    return epochs * (int(args.ep_steps) // int(args.kd_steps)) * int(args.kd_steps)


def check(datafree_kd: Any, synthesis: Any) -> list:
    """Check the host; return the synthesizer classes found."""
    require(datafree_kd, "train", TRAIN_PARAMS, HOST, SUPPORTED)
    fast = hasattr(synthesis, "FastSynthesizer")
    classes = []
    for name, params in SYNTHESIZERS.items():
        if name in FAST_ONLY and not fast:
            continue
        cls = require(synthesis, name, params, HOST, SUPPORTED)
        require(cls, "synthesize", ("self",), HOST, SUPPORTED)
        if getattr(cls.synthesize, "__abd_wrapped__", None) is not None:
            raise RuntimeError(f"{HOST}: {name}.synthesize is already patched; unpatch first")
        classes.append(cls)
    return classes


def patch(datafree_kd: Any = None, *, synthesis: Any = None, config: ABDConfig | None = None,
          sr_start_fraction: float | None = None, **overrides: Any) -> PatchHandle:
    """Add ABD to a Fast-Datafree/CMI run.

    Args:
        datafree_kd: the host script module (default: ``import datafree_kd``).
        synthesis: the ``datafree.synthesis`` module (default: imported by name).
        config: an :class:`~abd_plugin.ABDConfig`; keyword ``overrides`` replace its fields.
        sr_start_fraction: SR starts at this fraction of the run's student steps (computed from
            the host's ``args``).
    Returns a :class:`PatchHandle` (``handle.guard`` once the host ran; ``handle.unpatch()``).
    Raises :class:`HostMismatchError` if the host differs from the supported commits.
    """
    kd = load_module(datafree_kd, "datafree_kd", HOST, SUPPORTED)
    syn = load_module(synthesis, "datafree.synthesis", HOST, SUPPORTED)
    classes = check(kd, syn)
    if getattr(kd.train, "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: datafree_kd.train is already patched; unpatch first")
    cfg, frac = split_config(config, sr_start_fraction, overrides)
    handle = PatchHandle(HOST, cfg, frac)

    for cls in classes:
        orig_synth = cls.synthesize

        def synthesize(self: Any, *args: Any, __orig: Any = orig_synth, **kwargs: Any) -> Any:
            student = None if self.student is self.teacher else self.student
            sess = handle.find_session(self.teacher)
            if sess is None and student is not None:
                sess = handle.session(self.teacher, student)
            if sess is None:  # Fast-Datafree generative: guard made at the first train()
                return __orig(self, *args, **kwargs)
            with sess.active():
                return __orig(self, *args, **kwargs)

        handle.set_attr(cls, "synthesize", wraps_host(orig_synth, synthesize))

    orig_train = kd.train

    def train(synthesizer: Any, model: Any, criterion: Any, optimizer: Any, args: Any) -> Any:
        student, teacher = model
        sess = handle.session(teacher, student)
        if sess.guard.student is not student:
            raise HostMismatchError(f"{HOST}: train() got a different student than the guard's")
        sess.set_total_steps(student_steps(args))
        with sess.active():
            return orig_train(synthesizer, model, criterion, optimizer, args)

    handle.set_attr(kd, "train", wraps_host(orig_train, train))
    return handle


__all__ = ["patch", "check", "student_steps", "HostMismatchError", "SUPPORTED"]
