"""ABD's Shuffling Vaccine for NVlabs/DeepInversion (NVIDIA Source Code License-NC: this adapter
binds by name only; using DeepInversion stays non-commercial).

A fork adds, ImageNet (``imagenet_inversion.py``, before ``DeepInversionClass`` is used)::

    from abd_plugin.integrations import deepinversion as abd
    abd.patch()

CIFAR (``cifar10/deepinversion_cifar10.py``, inside ``if __name__ == "__main__":`` before the
loop)::

    import sys
    from abd_plugin.integrations import deepinversion as abd
    abd.patch_cifar(sys.modules[__name__])

What changes in the host: ``DeepInversionClass.get_images`` (ImageNet) or the module function
``get_images`` (CIFAR) runs with an SV-only guard on the teacher. Every pixel-optimisation step's
teacher forward on the jittered batch carries the SV term into ``loss`` and its ``backward``.
The ADI verifier ``net_student`` is a fixed network, not a student: SR does not apply. Distil the
saved images with a loop that has a student (e.g. ``abd_plugin.integrations.datafree`` or the
core's ``ABDGuard``) to get SR.
"""
from __future__ import annotations

from typing import Any

from abd_plugin import ABDConfig

from ._common import PatchHandle, bind_args, load_module, require, split_config, wraps_host

HOST = "deepinversion"
SUPPORTED = "NVlabs/DeepInversion@2413af1f97f6c73c4dcb47b6a44266aad458ff28"
ENGINE_METHODS = {
    "__init__": ("self", "bs", "use_fp16", "net_teacher"),
    "get_images": ("self", "net_student", "targets"),
    "generate_batch": ("self", "net_student", "targets"),
}
CIFAR_PARAMS = ("net", "bs", "epochs", "idx", "var_scale", "net_student")


def check(engine_cls: Any) -> None:
    for name, params in ENGINE_METHODS.items():
        require(engine_cls, name, params, HOST, SUPPORTED)
    if getattr(engine_cls.get_images, "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: get_images is already patched; unpatch first")


def check_cifar(module: Any) -> None:
    require(module, "get_images", CIFAR_PARAMS, HOST, SUPPORTED)
    if getattr(module.get_images, "__abd_wrapped__", None) is not None:
        raise RuntimeError(f"{HOST}: get_images is already patched; unpatch first")


def patch(engine_cls: Any = None, *, config: ABDConfig | None = None,
          **overrides: Any) -> PatchHandle:
    """SV for ``DeepInversionClass`` (default: ``deepinversion.DeepInversionClass``)."""
    if engine_cls is None:
        engine_cls = load_module(None, "deepinversion", HOST, SUPPORTED).DeepInversionClass
    check(engine_cls)
    cfg, _ = split_config(config, None, overrides)
    handle = PatchHandle(HOST, cfg, None)
    orig = engine_cls.get_images

    def get_images(self: Any, *args: Any, **kwargs: Any) -> Any:
        with handle.session(self.net_teacher, None).active():
            return orig(self, *args, **kwargs)

    handle.set_attr(engine_cls, "get_images", wraps_host(orig, get_images))
    return handle


def patch_cifar(module: Any = None, *, config: ABDConfig | None = None,
                **overrides: Any) -> PatchHandle:
    """SV for the CIFAR script's module-level ``get_images(net, ...)``."""
    mod = load_module(module, "deepinversion_cifar10", HOST, SUPPORTED)
    check_cifar(mod)
    cfg, _ = split_config(config, None, overrides)
    handle = PatchHandle(HOST, cfg, None)
    orig = mod.get_images

    def get_images(*args: Any, **kwargs: Any) -> Any:
        net = bind_args(orig, args, kwargs)["net"]
        with handle.session(net, None).active():
            return orig(*args, **kwargs)

    handle.set_attr(mod, "get_images", wraps_host(orig, get_images))
    return handle


__all__ = ["patch", "patch_cifar", "check", "check_cifar", "SUPPORTED"]
