"""Host adapters: ABD dropped into public data-free KD code bases with a few lines.

Each adapter is one module, ``abd_plugin.integrations.<name>``, imported on demand; importing this
package imports no host and nothing heavy. See ``integrations/README.md`` for the lines a fork adds.
"""
from __future__ import annotations

from fnmatch import fnmatch

#: adapter module -> the host(s) it binds to
ADAPTERS: dict[str, str] = {
    "datafree": "zju-vipa/Fast-Datafree and zju-vipa/CMI: CMI, DeepInversion, Fast, FastMeta, "
                "Generative synthesizers; datafree_kd.train",
    "zskt": "polo5/ZeroShotKnowledgeTransfer: ZeroShotKTSolver",
    "dfad": "VainF/Data-Free-Adversarial-Distillation: DFAD_cifar/DFAD_mnist train",
    "deepinversion": "NVlabs/DeepInversion: DeepInversionClass and the CIFAR get_images (SV only)",
    "lightning": "PyTorch Lightning: ABDCallback (incl. yukimasano/single-img-extrapolating in1k)",
    "torchdistill": "torchdistill: registered post-forward process + forward hooks",
}


def list_adapters(filter: str = "*") -> list[str]:
    """Names of the adapters (``abd_plugin.integrations.<name>``), optionally fnmatch-filtered."""
    return sorted(n for n in ADAPTERS if fnmatch(n, filter))


__all__ = ["ADAPTERS", "list_adapters"]
