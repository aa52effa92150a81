"""Shared machinery of the host adapters: signature checks, a reversible patch handle, and a
guard *session* (one :class:`~abd_plugin.ABDGuard` per teacher, attached only while host code
runs, with its SR window resolved from the host's own step count).

Nothing here imports a host; adapters bind to host objects by name at run time.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from abd_plugin import ABDConfig, ABDGuard

_MISSING = object()


class HostMismatchError(RuntimeError):
    """The host code does not have the classes, methods or signatures the adapter binds to."""


def load_module(obj: Any, default: str, host: str, supported: str) -> Any:
    """``obj`` if it is a module-like object, else import ``obj`` (a dotted name) or ``default``."""
    if obj is not None and not isinstance(obj, str):
        return obj
    name = obj or default
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"{host}: cannot import {name!r} ({err}); run from the host checkout ({supported}) or "
            f"pass the module object"
        ) from err


def require(owner: Any, name: str, params: Sequence[str], host: str, supported: str) -> Any:
    """Return ``owner.<name>`` after checking it is callable and its parameters start with
    ``params`` (names, in order). Raise :class:`HostMismatchError` naming ``supported`` if not."""
    where = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
    fn = getattr(owner, name, _MISSING)
    if fn is _MISSING or not callable(fn):
        raise HostMismatchError(
            f"{host}: expected {where} to exist; this adapter supports {supported}. "
            "Update the fork or pin the adapter to a matching abd-plugin release."
        )
    target: Any = fn
    if isinstance(fn, type):
        target = target.__init__  # keep "self" in the names
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins: nothing to check
        return fn
    names = [p.name for p in sig.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if names[: len(params)] != list(params):
        raise HostMismatchError(
            f"{host}: {where}{sig} does not match the expected parameters "
            f"({', '.join(params)}, ...) of {supported}; the adapter binds to that commit's "
            "call structure."
        )
    return fn


def split_config(config: ABDConfig | None, sr_start_fraction: float | None,
                 overrides: dict[str, Any]) -> tuple[ABDConfig, float | None]:
    """Merge ``config`` and ``overrides``; keep ``sr_start_fraction`` aside when the host will
    supply the number of student steps (``ABDConfig`` needs ``total_steps`` next to it)."""
    cfg = config or ABDConfig()
    if overrides:
        cfg = cfg.replace(**overrides)
    if sr_start_fraction is not None:
        if not 0.0 <= sr_start_fraction <= 1.0:
            raise ValueError(f"sr_start_fraction must be in [0, 1], got {sr_start_fraction}")
        if cfg.sr_start_step is not None:
            raise ValueError("pass either sr_start_fraction or sr_start_step, not both")
    return cfg, sr_start_fraction


class _NoStudent(nn.Module):
    """Stand-in student for synthesis-only hosts (DeepInversion): SV runs, SR is off."""


class _OncePerStep:
    """Let the guard see only the first synthesis forward of the teacher per optimizer step.

    CMI runs the teacher on a global and a local view, and Fast-Datafree's generative synthesizer
    is built with ``student=teacher``; ABD adds SV once, on the first (global) view. Later grad
    forwards before the next optimizer step run inside ``guard.loss_terms_suspended()`` (no SV
    term; the eraser still erases their inputs). Installed after the
    guard attaches, so its forward hook runs after the guard's.
    """

    def __init__(self, guard: ABDGuard) -> None:
        self.guard = guard
        self.fired = False
        self._stack: list[Any] = []
        self._handles: list[Any] = []

    def install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        core = self.guard.teacher_module
        self.fired = False
        self._handles = [
            core.register_forward_pre_hook(self._pre),
            core.register_forward_hook(self._post, always_call=True),
            register_optimizer_step_post_hook(self._reset),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        while self._stack:
            ctx = self._stack.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def _pre(self, _m: nn.Module, args: Any) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        synthesis = torch.is_grad_enabled() and x is not None and x.requires_grad
        ctx = None
        if synthesis and self.fired:
            ctx = self.guard.loss_terms_suspended()
            ctx.__enter__()
        self._stack.append(ctx)
        self.fired = self.fired or synthesis

    def _post(self, _m: nn.Module, _args: Any, _out: Any) -> None:
        ctx = self._stack.pop() if self._stack else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def _reset(self, *_: Any) -> None:
        self.fired = False


class GuardSession:
    """One guard for one teacher/student pair; attached while host code runs (re-entrant)."""

    def __init__(self, teacher: nn.Module, student: nn.Module | None, config: ABDConfig,
                 sr_start_fraction: float | None) -> None:
        if student is None:
            student = _NoStudent()
            config = config.replace(sr=False)
        self.guard = ABDGuard(teacher, student, config=config)
        self.sr_start_fraction = sr_start_fraction
        self._gate = _OncePerStep(self.guard)
        self._depth = 0

    def set_total_steps(self, total_steps: int) -> None:
        """Resolve the SR window once the host's number of student steps is known (once)."""
        if self.guard.sr_schedule.total_steps is not None and self.sr_start_fraction is None:
            return
        frac, self.sr_start_fraction = self.sr_start_fraction, None
        self.guard.set_schedule(int(total_steps), sr_start_fraction=frac)

    @contextmanager
    def active(self) -> Iterator[ABDGuard]:
        if self._depth == 0:
            self.guard.attach()
            self._gate.install()
        self._depth += 1
        try:
            yield self.guard
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.close()

    def open(self) -> None:
        """Attach until :meth:`close` (for hosts without a call to scope to)."""
        if self._depth == 0:
            self.guard.attach()
            self._gate.install()
        self._depth += 1

    def close(self) -> None:
        self._depth = 0
        self._gate.remove()
        if self.guard.active:
            self.guard.detach()


class PatchHandle:
    """What ``patch(...)`` returns: undo with :meth:`unpatch`, or use as a context manager.

    Attributes:
        host: the host's name.
        sessions: one :class:`GuardSession` per teacher seen so far.
    """

    def __init__(self, host: str, config: ABDConfig, sr_start_fraction: float | None) -> None:
        self.host = host
        self.config = config
        self.sr_start_fraction = sr_start_fraction
        self.sessions: dict[int, GuardSession] = {}
        self._undo: list[Callable[[], None]] = []
        self._patched = True

    # -------------------------------------------------------------- guards
    @property
    def guard(self) -> ABDGuard:
        """The guard of the (single) teacher distilled so far."""
        if not self.sessions:
            raise RuntimeError(f"{self.host}: no guard yet; it is built when the host first runs")
        return list(self.sessions.values())[-1].guard

    @property
    def guards(self) -> list[ABDGuard]:
        return [s.guard for s in self.sessions.values()]

    def session(self, teacher: nn.Module, student: nn.Module | None) -> GuardSession:
        """The session for ``teacher``, built on first use (``student=None``: SV only)."""
        key = id(teacher)
        sess = self.sessions.get(key)
        if sess is None:
            sess = GuardSession(teacher, student, self.config, self.sr_start_fraction)
            self.sessions[key] = sess
        return sess

    def find_session(self, teacher: nn.Module) -> GuardSession | None:
        return self.sessions.get(id(teacher))

    # -------------------------------------------------------------- reversible edits
    def set_attr(self, owner: Any, name: str, value: Any) -> None:
        """``setattr`` that :meth:`unpatch` undoes exactly (own attribute or inherited)."""
        had_own = name in vars(owner)
        old = vars(owner)[name] if had_own else None

        def undo() -> None:
            if had_own:
                setattr(owner, name, old)
            else:
                delattr(owner, name)

        setattr(owner, name, value)
        self._undo.append(undo)

    def on_unpatch(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def unpatch(self) -> None:
        """Restore the host and detach every guard (idempotent)."""
        if not self._patched:
            return
        self._patched = False
        try:
            for sess in self.sessions.values():
                sess.close()
        finally:
            while self._undo:
                self._undo.pop()()

    @property
    def patched(self) -> bool:
        return self._patched

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()


def wraps_host(orig: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """Copy name, doc and signature so host introspection still sees the original."""
    import functools

    out = functools.wraps(orig)(wrapper)
    out.__abd_wrapped__ = orig  # type: ignore[attr-defined]
    return out


def bind_args(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
