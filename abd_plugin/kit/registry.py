"""A tiny name -> factory registry shared by the kit (triggers, datasets, models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(KeyError, ValueError):
    """Raised by :meth:`Registry.get` for a name that was never registered.

    Subclasses both ``KeyError`` and ``ValueError`` so either ``except`` clause catches it.
    """

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to factories (classes or functions returning ``T``).

    Args:
        kind: what is registered, e.g. ``"trigger"``; used in error messages.
        list_hint: how a user lists the known names, e.g.
            ``"abd_plugin.kit.triggers.list_triggers()"``.

    Example:
        >>> models = Registry("model")
        >>> @models.register("tiny")
        ... def tiny(**kw): return object()
        >>> models.names()
        ['tiny']
    """

    def __init__(self, kind: str, list_hint: str | None = None) -> None:
        self.kind = kind
        self.list_hint = list_hint or f"{kind} registry .names()"
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a duplicate name raises ``ValueError``."""

        def decorator(fn: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            self._factories[name] = fn
            return fn

        return decorator

    def factory(self, name: str) -> Callable[..., T]:
        """The registered factory itself (raises :class:`UnknownNameError` for unknown names)."""
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {known}. "
                f"List them with {self.list_hint}."
            ) from None

    def get(self, name: str, **kwargs: Any) -> T:
        """Build the object registered as ``name``, passing ``kwargs`` to its factory."""
        return self.factory(name)(**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __len__(self) -> int:
        return len(self._factories)
