"""Load the official ABD implementation's SV and SR classes from a user's checkout, at run time.

Nothing of illidanlab/ABD is vendored here: :func:`load_official` reads the files of a checkout
(``git clone https://github.com/illidanlab/ABD``) and executes them in fresh module objects:

* ``BackdoorSuspectLoss`` from ``cmi/datafree/synthesis/syn_vaccine.py`` (SV),
* ``UnlearnOptimizer`` from ``cmi/datafree/unlearn.py`` (SR), with its ``utils.hypergrad``,
* ``cmi/utils/utils.py`` (``PseudoDatapool``, ``sigmoid``), which ``syn_vaccine.py`` imports.

The package ``__init__`` files are bypassed (they import the whole CMI stack). What is stubbed, only
while these files load and only when missing: ``matplotlib.pyplot`` (imported at module level by
``cmi/utils/utils.py``) and ``sklearn.metrics`` (used only by the diagnostics that need real test
data, never by the timed calls). ``sys.modules`` is restored afterwards.

The official SR hard-codes ``'cuda'`` (``device='cuda'``, ``.cuda()``). On any other device the
source text is rewritten before it runs: ``device='cuda'`` -> ``device=<bench device>`` and
``.cuda()`` -> ``.to(<bench device>)``; the rewrites made are listed in ``Official.patches``.
"""
from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_DEVICE_GLOBAL = "__abd_bench_device__"

FILES = {
    "utils": "cmi/utils/utils.py",
    "hypergrad": "cmi/utils/hypergrad.py",
    "syn_vaccine": "cmi/datafree/synthesis/syn_vaccine.py",
    "unlearn": "cmi/datafree/unlearn.py",
}


@dataclass
class Official:
    """The loaded classes and what had to be done to load them."""

    root: Path
    BackdoorSuspectLoss: Any
    UnlearnOptimizer: Any
    patches: list[str] = field(default_factory=list)
    stubs: list[str] = field(default_factory=list)


def find_root(path: str) -> Path:
    """Accept the checkout's root or its ``cmi/`` folder."""
    p = Path(path).expanduser().resolve()
    for root in (p, p.parent):
        if all((root / f).is_file() for f in FILES.values()):
            return root
    missing = [f for f in FILES.values() if not (p / f).is_file()]
    raise FileNotFoundError(
        f"--reference {path}: not a checkout of illidanlab/ABD (missing {missing}); "
        "pass the folder "
        "made by `git clone https://github.com/illidanlab/ABD`"
    )


def _stub_module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__dict__["__abd_bench_stub__"] = True
    return mod


def _missing(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _rewrite_cuda(src: str, fname: str, patches: list[str]) -> str:
    rules = [(r"device\s*=\s*['\"]cuda['\"]", f"device={_DEVICE_GLOBAL}", "device='cuda'"),
             (r"\.cuda\(\)", f".to({_DEVICE_GLOBAL})", ".cuda()")]
    for pattern, repl, label in rules:
        src, n = re.subn(pattern, repl, src)
        if n:
            patches.append(f"{fname}: {label} -> bench device ({n}x)")
    return src


def _exec_file(name: str, path: Path, device: torch.device, patches: list[str]) -> types.ModuleType:
    src = path.read_text()
    if device.type != "cuda":
        src = _rewrite_cuda(src, path.name, patches)
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    mod.__dict__[_DEVICE_GLOBAL] = device
    sys.modules[name] = mod
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod


def load_official(path: str, device: torch.device) -> Official:
    """Load ``BackdoorSuspectLoss`` and ``UnlearnOptimizer`` from a checkout at ``path``."""
    root = find_root(path)
    patches: list[str] = []
    stubs: list[str] = []
    touched = ["utils", "utils.utils", "utils.hypergrad", "_abd_official_syn_vaccine",
               "_abd_official_unlearn"]
    fake: dict[str, types.ModuleType] = {}
    if _missing("matplotlib"):
        plt = _stub_module("matplotlib.pyplot")
        fake["matplotlib"] = _stub_module("matplotlib", pyplot=plt)
        fake["matplotlib.pyplot"] = plt
    if _missing("sklearn"):
        def _unavailable(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError("sklearn is stubbed by the benchmark; only diagnostics use it")

        metrics = _stub_module(
            "sklearn.metrics", accuracy_score=_unavailable, roc_auc_score=_unavailable
        )
        fake["sklearn"] = _stub_module("sklearn", metrics=metrics)
        fake["sklearn.metrics"] = metrics
    stubs.extend(sorted(fake))
    saved: dict[str, types.ModuleType | None] = {
        n: sys.modules.get(n) for n in touched + list(fake)
    }
    try:
        sys.modules.update(fake)
        pkg = _stub_module("utils")
        pkg.__path__ = []  # a namespace-like package so `import utils.x` resolves from sys.modules
        sys.modules["utils"] = pkg
        pkg.utils = _exec_file("utils.utils", root / FILES["utils"], device, patches)
        pkg.hypergrad = _exec_file("utils.hypergrad", root / FILES["hypergrad"], device, patches)
        sv = _exec_file("_abd_official_syn_vaccine", root / FILES["syn_vaccine"], device, patches)
        sr = _exec_file("_abd_official_unlearn", root / FILES["unlearn"], device, patches)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return Official(root=root, BackdoorSuspectLoss=sv.BackdoorSuspectLoss,
                    UnlearnOptimizer=sr.UnlearnOptimizer, patches=patches, stubs=stubs)


def kl_div_criterion(temperature: float = 1.0) -> Any:
    """The CMI code's ``criterions.KLDiv(T)`` (batchmean KL times T^2), as its SR expects."""
    def kldiv(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = temperature
        return F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(targets / t, dim=1),
                        reduction="batchmean") * (t * t)

    return kldiv
