"""Load an untrusted teacher checkpoint without executing code from it.

A downloaded teacher is untrusted by definition: ``torch.load`` with full unpickling can run
arbitrary code. :func:`load_teacher` only ever uses ``weights_only=True`` (or safetensors).
The format is recognised by the file's first bytes, not by its name: a safetensors file called
``teacher.pt`` loads, and an empty, truncated or foreign file raises one
:class:`CheckpointReadError` naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "teacher", "weights")


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint needs full unpickling (it may carry code) and was refused."""


class CheckpointReadError(ValueError):
    """The file is empty, truncated, or not a PyTorch / safetensors checkpoint."""


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length n, then n bytes of JSON (``{...``)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 1 << 30  # a header past the end of the file is reported as truncation


def _sniff(path: str) -> str:
    """``"safetensors"``, ``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save) or
    ``"unknown"``, from the first bytes; raises :class:`CheckpointReadError` for an empty file."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointReadError(f"teacher checkpoint {path} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _is_safetensors(head, size):
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _pickle_with_code(path: str) -> bool:
    """Whether the file parses as a pickle that imports or calls something (the opcodes that
    run code); any parse failure says no."""
    import pickletools

    code_ops = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    try:
        return any(op.name in code_ops for op, _, _ in pickletools.genops(data))
    except Exception:
        return False


def _truncated_pickles(path: str) -> bool:
    """Whether one of the leading pickles of a legacy ``torch.save`` file (5 of them, then raw
    storage bytes) stops at the end of the file: a cut download, not a refused instruction."""
    import io
    import pickletools

    with open(path, "rb") as fh:
        data = fh.read(1 << 26)
    f = io.BytesIO(data)
    for _ in range(5):
        if f.tell() >= len(data):
            return False
        try:
            for _op in pickletools.genops(f):
                pass
        except Exception:
            return f.tell() >= len(data)
    return False


def _unreadable(path: str, kind: str, exc: BaseException) -> CheckpointReadError:
    size = os.path.getsize(path)
    what = {"zip": "a PyTorch (zip) checkpoint", "pickle": "a legacy PyTorch checkpoint",
            "safetensors": "a safetensors file"}.get(kind)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if what is None:
        return CheckpointReadError(
            f"cannot read teacher checkpoint {path} ({size} bytes): it is neither a torch.save "
            "file nor a safetensors file (by its first bytes)")
    return CheckpointReadError(
        f"cannot read teacher checkpoint {path} ({size} bytes, {what}): it is truncated or "
        f"corrupted ({first[:200]}); download it again")


def _load_safetensors(path: str, map_location: Any) -> Any:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
    try:
        meta = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise _unreadable(path, "safetensors", exc) from exc
    if len(header) < n or 8 + n + end > os.path.getsize(path):
        raise _unreadable(path, "safetensors", EOFError(
            f"the header announces {8 + n + end} bytes"))
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError(
            "reading safetensors files needs the safetensors package: pip install safetensors"
        ) from exc
    try:
        return load_file(path, device=str(map_location or "cpu"))
    except Exception as exc:  # SafetensorError and friends: a damaged file
        raise _unreadable(path, "safetensors", exc) from exc


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
        path: a ``torch.save`` file (read with ``torch.load(weights_only=True)``) or a safetensors
            file (needs the ``safetensors`` package); told apart by content, not by extension.
        model: the architecture, already built.
        map_location: where tensors are loaded (default CPU).
        strict: passed to ``load_state_dict``.
        key: the key of the state dict inside the checkpoint, if not one of the usual ones.

    A ``module.`` prefix (DataParallel/DDP) is stripped. A pickle that carries code raises
    :class:`UnsafeCheckpointError`; nothing in it is executed. An empty, truncated or foreign file
    raises :class:`CheckpointReadError` (a ``ValueError``) naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointReadError(f"teacher checkpoint {path} is a directory, not a file")
    kind = _sniff(path)
    raw: Any
    if kind == "safetensors":
        raw = _load_safetensors(path, map_location)
    else:
        try:
            with open(path, "rb") as fh:  # a file object: torch.load goes by content too
                raw = torch.load(fh, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            # the weights-only unpickler refused an instruction: code, unless the file is not a
            # pickle at all (then it is just not a checkpoint)
            truncated = kind == "pickle" and _truncated_pickles(path)
            if not truncated and (kind != "unknown" or _pickle_with_code(path)):
                raise UnsafeCheckpointError(
                    f"refusing to load {path}: it is not a plain-weights checkpoint (unpickling "
                    "it could run code). Ask the publisher for a state_dict saved with "
                    "torch.save(model.state_dict(), ...) or a .safetensors file."
                ) from exc
            raise _unreadable(path, kind, exc) from exc
        except Exception as exc:  # EOFError, RuntimeError (zip), KeyError (garbage), OSError...
            raise _unreadable(path, kind, exc) from exc
    state = _unwrap_state(raw[key] if key is not None else raw)
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
    return model.eval()
