"""Value specifications: what a setting accepts, checked in one place and described in words.

:class:`~abd_plugin.ABDConfig` declares one spec per field (``spec(default, Num(0, 1), doc)``)
and checks every field against it when a config is made; the evaluation kit's command line
reuses the same specs for its numeric flags. A spec raises ``TypeError`` for a value of the wrong
kind and ``ValueError`` for one out of range; both messages name the setting, say what it
accepts and show what it got::

    >>> Num(0, 1, lo_open=True).validate("ABDConfig.sr_outer_portion", 1.5)
    Traceback (most recent call last):
    ValueError: ABDConfig.sr_outer_portion must be a finite number in (0, 1], got 1.5

Numbers must be finite (NaN and infinities are refused); bools are not numbers here (``True``
is not an accepted ``int``), and an integer setting refuses floats (``2.5``, also ``2.0``).
"""
from __future__ import annotations

import inspect
import math
import numbers
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, ClassVar


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


class Spec:
    """Base class: :meth:`describe` says what is accepted, :meth:`problem` finds what is wrong."""

    def describe(self) -> str:  # pragma: no cover - every spec overrides it
        raise NotImplementedError

    def problem(self, value: Any) -> type[Exception] | None:
        """``TypeError``/``ValueError`` (the class) when ``value`` is not accepted, else None."""
        raise NotImplementedError  # pragma: no cover

    def validate(self, name: str, value: Any) -> None:
        """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is accepted."""
        err = self.problem(value)
        if err is not None:
            raise err(f"{name} must be {self.describe()}, got {value!r}")


class Bool(Spec):
    """``True`` or ``False`` (a real bool: ``"no"``, ``0`` and ``1`` are refused)."""

    def describe(self) -> str:
        return "True or False"

    def problem(self, value: Any) -> type[Exception] | None:
        return None if isinstance(value, bool) else TypeError


class _Range(Spec):
    def __init__(self, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return (f"in {'(' if self.lo_open else '['}{_fmt(lo)}, {_fmt(hi)}"
                    f"{')' if self.hi_open else ']'}")
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {_fmt(lo)}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {_fmt(hi)}"
        return ""

    def _in_range(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True


class Int(_Range):
    """An integer (Python or numpy; not a bool, not a float) in a range."""

    def describe(self) -> str:
        return f"an integer {self._range()}".rstrip()

    def problem(self, value: Any) -> type[Exception] | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return TypeError
        return None if self._in_range(int(value)) else ValueError


class Num(_Range):
    """A finite real number (ints accepted; bools, NaN and infinities refused) in a range."""

    def describe(self) -> str:
        return f"a finite number {self._range()}".rstrip()

    def problem(self, value: Any) -> type[Exception] | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return TypeError
        v = float(value)
        if not math.isfinite(v):
            return ValueError
        return None if self._in_range(v) else ValueError


class NumPair(Spec):
    """Two finite numbers ``(low, high)`` with ``lo < low <= high <= hi``."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def describe(self) -> str:
        return (f"a pair (low, high) of finite numbers with {_fmt(self.lo)} < low <= high <= "
                f"{_fmt(self.hi)}")

    def problem(self, value: Any) -> type[Exception] | None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            return TypeError
        num = Num(self.lo, self.hi, lo_open=True)
        for v in value:
            err = num.problem(v)
            if err is not None:
                return err
        return None if float(value[0]) <= float(value[1]) else ValueError


class Choice(Spec):
    """One of a fixed set of strings."""

    def __init__(self, *values: str) -> None:
        self.values = values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def problem(self, value: Any) -> type[Exception] | None:
        if not isinstance(value, str):
            return TypeError
        return None if value in self.values else ValueError


class Optional(Spec):
    """``None``, or what ``inner`` accepts."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def describe(self) -> str:
        return f"None or {self.inner.describe()}"

    def problem(self, value: Any) -> type[Exception] | None:
        return None if value is None else self.inner.problem(value)


class IsCallable(Spec):
    """A callable."""

    def describe(self) -> str:
        return "a callable"

    def problem(self, value: Any) -> type[Exception] | None:
        return None if callable(value) else TypeError


def spec(default: Any, check: Spec, doc: str, *, flat: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its accepted values (``check``) and its meaning (``doc``), read by
    the class's validation and its generated docstring. In a :class:`Section`, ``flat`` is the
    field's name among :class:`~abd_plugin.ABDConfig`'s flat keywords when it is not the
    section's prefix plus the field's name (``erase.price`` is ``erase_price``; the vaccine's
    ``n_models`` is ``n_shuffle_models``)."""
    meta: dict[str, Any] = {"check": check, "doc": doc}
    if flat is not None:
        meta["flat"] = flat
    return field(default=default, metadata=meta, **kw)


def field_specs(cls: Any) -> dict[str, tuple[Spec, str]]:
    """``{name: (spec, doc)}`` of a dataclass declared with :func:`spec`; raises ``TypeError``
    naming a field declared without one (every field must say what it accepts)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        check, doc = f.metadata.get("check"), f.metadata.get("doc")
        if not isinstance(check, Spec) or not doc:
            raise TypeError(
                f"{cls.__name__}.{f.name} is declared without a spec: declare it as "
                f"`{f.name}: T = spec(default, <Spec>, \"what it means\")` "
                "(abd_plugin.validation)")
        out[f.name] = (check, doc)
    return out


def validate_fields(obj: Any, specs: dict[str, tuple[Spec, str]]) -> None:
    """Check every field of the dataclass instance ``obj`` against its spec."""
    cls = type(obj).__name__
    for name, (check, _) in specs.items():
        check.validate(f"{cls}.{name}", getattr(obj, name))


def field_docs(cls: Any, title: Callable[[Any], str] | None = None) -> str:
    """The field list of a spec-declared dataclass in words: one entry per field with its
    default, what it accepts and what it means (``help()`` shows it). ``title(field)`` names a
    field's entry (default: ``name = default``)."""
    import dataclasses

    specs = field_specs(cls)
    parts = []
    for f in dataclasses.fields(cls):
        check, doc = specs[f.name]
        head = title(f) if title is not None else f"{f.name} = {f.default!r}"
        parts.append(f"{head}\n    accepts {check.describe()}\n"
                     + textwrap.indent(inspect.cleandoc(doc), "    "))
    return "\n\n".join(parts)


_SECTION_SPECS: dict[type, dict[str, tuple[Spec, str]]] = {}


class Section:
    """Base of a settings section of :class:`~abd_plugin.ABDConfig`: a frozen dataclass whose
    fields are declared with :func:`spec`, defined next to the code that reads it (the audit's
    in ``audit.py``, the eraser's in ``eraser.py``, ...). Every field is checked against its spec
    when a section is made (also by :meth:`replace`); :meth:`check` adds the rules that tie
    fields together, in one place.

    Subclasses set :attr:`switch` (the flat keyword that turns the section's defense on or off,
    e.g. ``"sv"``, mapped to the ``enabled`` field) and :attr:`flat_prefix` (flat keyword =
    prefix + field name unless the field's spec names another)."""

    switch: ClassVar[str] = ""
    flat_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        cls = type(self)
        specs = _SECTION_SPECS.get(cls)
        if specs is None:
            specs = _SECTION_SPECS[cls] = field_specs(cls)
        validate_fields(self, specs)
        self.check()

    def check(self) -> None:
        """Rules between fields (raise ``ValueError`` naming the fields); none by default."""

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (unknown names raise a clear error)."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s) {sorted(unknown)}; it has "
                            f"{sorted(names)}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def flat_names(cls) -> dict[str, str]:
        """``{flat keyword: field}`` of this section (``ABDConfig``'s compatibility layer)."""
        import dataclasses

        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == "enabled" and cls.switch:
                out[cls.switch] = f.name
            else:
                out[f.metadata.get("flat", cls.flat_prefix + f.name)] = f.name
        return out


def section_or_default(value: Any, cls: type, owner: str, attr: str) -> Any:
    """``value`` when it is a ``cls`` section, ``cls()`` for None; a clear ``TypeError`` naming the
    fix otherwise (an ``ABDConfig`` passed where its section belongs)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    hint = (f"; pass its section, {owner}(..., config.{attr}, seed=config.seed, "
            "logits_fn=config.logits_fn)" if hasattr(value, attr) else "")
    raise TypeError(f"{owner} takes a {cls.__name__}, got {type(value).__name__}{hint}")


__all__ = ["Spec", "Bool", "Int", "Num", "NumPair", "Choice", "Optional", "IsCallable", "spec",
           "field_specs", "validate_fields", "field_docs", "Section", "section_or_default"]
