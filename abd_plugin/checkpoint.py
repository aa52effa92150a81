"""Load an untrusted teacher checkpoint without executing code from it.

A downloaded teacher is untrusted by definition: ``torch.load`` with full unpickling can run
arbitrary code. :func:`load_teacher` only ever uses ``weights_only=True`` (or safetensors).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "teacher", "weights")


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint needs full unpickling (it may carry code) and was refused."""


def _unwrap_state(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never returns modules
        return obj.state_dict()
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap_state(obj[key])
    raise ValueError(
        "checkpoint holds no state dict: expected a mapping of tensors, or one under one of the "
        f"keys {list(_WRAPPER_KEYS)}"
    )


def load_teacher(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    map_location: str | torch.device | None = "cpu",
    strict: bool = True,
    key: str | None = None,
) -> nn.Module:
    """Load weights from ``path`` into ``model`` and return it in ``eval()`` mode.

    Args:
        path: a ``.pt``/``.pth``/``.ckpt`` file (read with ``torch.load(weights_only=True)``) or a
            ``.safetensors`` file (needs the ``safetensors`` package).
        model: the architecture, already built.
        map_location: where tensors are loaded (default CPU).
        strict: passed to ``load_state_dict``.
        key: the key of the state dict inside the checkpoint, if not one of the usual ones.

    A ``module.`` prefix (DataParallel/DDP) is stripped. A pickle that carries code raises
    :class:`UnsafeCheckpointError`; nothing in it is executed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(
                "reading .safetensors needs the safetensors package: pip install safetensors"
            ) from exc
        raw: Any = load_file(path, device=str(map_location or "cpu"))
    else:
        try:
            raw = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it is not a plain-weights checkpoint (unpickling it "
                "could run code). Ask the publisher for a state_dict saved with "
                "torch.save(model.state_dict(), ...) or a .safetensors file."
            ) from exc
    state = _unwrap_state(raw[key] if key is not None else raw)
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
    return model.eval()
