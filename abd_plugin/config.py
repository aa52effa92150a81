"""ABD configuration: a frozen record of settings sections, each defined next to the code that
reads it.

Shape::

    ABDConfig(
        audit=AuditSettings(...),                  # abd_plugin.audit: the data-free audit
        erase=EraseSettings(...),                  # abd_plugin.eraser: the trigger eraser
        vaccine=VaccineSettings(...),              # abd_plugin.vaccine: Shuffling Vaccine (SV)
        retrospection=RetrospectionSettings(...),  # abd_plugin.retrospection: SR
        alignment=AlignmentSettings(...),          # abd_plugin.gradient_alignment: KDIGA
        input_range=None, target=None, seed=0, logits_fn=None,   # read by every defense
    )

Each section is a frozen dataclass that checks its own fields and the rules between them when it
is made; every defense is given only its own section (plus the four general fields). The guard
builds its defenses from the sections through one list of factories
(:mod:`abd_plugin.defenses`).

**Flat keywords** keep working as a thin compatibility layer: ``ABDConfig(sv=True,
erase_price=1.0)``, ``ABDGuard(teacher, student, audit_steps=20)``, ``config.erase_price`` and
``config.replace(sr_lr=1e-3)`` name a section's field by its section's prefix (``audit_``,
``erase_``, ``sv_``, ``sr_``, ``iga_``) or its old name (``shuffle_layers``, ``total_steps``, ...);
a section's switch is ``audit``, ``erase``, ``sv``, ``sr`` or ``iga`` (a bool). ``help(ABDConfig)``
lists every field with its flat keyword.

The defaults are the recipe this project measured to defend without per-run knobs (README,
"Results"): the guard audits the teacher without data at its first batch (:mod:`abd_plugin.audit`)
and, when the audit flags it, the trigger eraser (:mod:`abd_plugin.eraser`) learns a small mask
over the suspected target's trigger region and blanks it in every teacher input. A teacher the
audit calls clean gets nothing. The paper's two parts, the Shuffling Vaccine and Self-Retrospection,
are off by default: :meth:`ABDConfig.classic` turns them on with the official code's settings,
:meth:`ABDConfig.paper` gives the literal paper recipe and :meth:`ABDConfig.tuned` the SV/SR
settings tuned on this project's grid (all three leave the audit and the eraser off, for
comparison).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .audit import AuditSettings
from .eraser import EraseSettings
from .gradient_alignment import AlignmentSettings
from .retrospection import RetrospectionSettings
from .vaccine import Layers, LayerSpec, VaccineSettings
from .validation import (
    Int,
    IsCallable,
    NumPair,
    Optional,
    Section,
    Spec,
    field_docs,
    field_specs,
    spec,
    validate_fields,
)

#: the sections: ABDConfig attribute -> section class
SECTIONS: dict[str, type[Section]] = {
    "audit": AuditSettings,
    "erase": EraseSettings,
    "vaccine": VaccineSettings,
    "retrospection": RetrospectionSettings,
    "alignment": AlignmentSettings,
}


class IsSection(Spec):
    """A section object of one class (a bool and a dict of its fields are accepted when a
    config is made, and turned into one)."""

    def __init__(self, cls: type[Section]) -> None:
        self.cls = cls

    def describe(self) -> str:
        return f"a {self.cls.__name__}"

    def problem(self, value: Any) -> type[Exception] | None:
        return None if isinstance(value, self.cls) else TypeError


def _flat_table() -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    for attr, cls in SECTIONS.items():
        for flat, name in cls.flat_names().items():
            if flat in table:  # pragma: no cover - a development error, caught at import
                raise TypeError(f"flat keyword {flat!r} of {cls.__name__}.{name} is also "
                                f"{table[flat]}")
            table[flat] = (attr, name)
    return table


#: flat keyword -> (section attribute, field)
FLAT: dict[str, tuple[str, str]] = _flat_table()


@dataclass(frozen=True, init=False)
class ABDConfig:
    """Every setting of the ABD defenses: five sections and four general fields (a frozen
    dataclass; :meth:`replace` makes changed copies).

    The field list with what each field means and accepts is generated below from the field
    declarations (``help(ABDConfig)`` shows it).
    """

    audit: AuditSettings = spec(
        AuditSettings(), IsSection(AuditSettings),
        """The data-free teacher audit (:class:`~abd_plugin.audit.AuditSettings`).""")
    erase: EraseSettings = spec(
        EraseSettings(), IsSection(EraseSettings),
        """The trigger eraser (:class:`~abd_plugin.eraser.EraseSettings`).""")
    vaccine: VaccineSettings = spec(
        VaccineSettings(), IsSection(VaccineSettings),
        """The Shuffling Vaccine (:class:`~abd_plugin.vaccine.VaccineSettings`).""")
    retrospection: RetrospectionSettings = spec(
        RetrospectionSettings(), IsSection(RetrospectionSettings),
        """Self-Retrospection (:class:`~abd_plugin.retrospection.RetrospectionSettings`).""")
    alignment: AlignmentSettings = spec(
        AlignmentSettings(), IsSection(AlignmentSettings),
        """Input-gradient alignment, KDIGA
        (:class:`~abd_plugin.gradient_alignment.AlignmentSettings`).""")
    input_range: tuple[float, float] | None = spec(
        None, Optional(NumPair(-1e9, 1e9)),
        """``(low, high)`` of valid teacher inputs, in the units the teacher receives (after
        your normalisation). ``None``: found at the first batch the teacher is fed, from the
        first of: a normalisation at the teacher's front (raw images: (0, 1)); the batch in
        [0, 1] or [-1, 1]; the teacher's first BatchNorm (its first layer, or after its first
        convolution: the inputs' mean +- 3 std per channel, widened to cover the batch); the
        batch's range widened by a quarter (a guess: the guard warns), see
        :func:`~abd_plugin.domain.resolve_domain`. The report's ``Input domain:`` line says
        which range was used and where it came from.""")
    target: int | None = spec(
        None, Optional(Int(0)),
        """The backdoor's target class if you know it: the eraser then runs for this class
        whatever the audit says (the audit still runs and is reported when it is on).""")
    seed: int = spec(
        0, Int(0, 2**63 - 2),
        """Seed of the guard's own random generators (the audit's starts, permutations, SR sample
        choice). The global RNG is never touched.""")
    logits_fn: Callable[[Any], Any] | None = spec(
        None, Optional(IsCallable()),
        """Extract logits from a model output; default handles tensors, tuples (logits first),
        dicts with ``"logits"`` and objects with ``.logits``.""", compare=False)

    def __init__(self, *, audit: Any = None, erase: Any = None, vaccine: Any = None,
                 retrospection: Any = None, alignment: Any = None,
                 input_range: tuple[float, float] | None = None, target: int | None = None,
                 seed: int = 0, logits_fn: Callable[[Any], Any] | None = None,
                 **flat: Any) -> None:
        given = {"audit": audit, "erase": erase, "vaccine": vaccine,
                 "retrospection": retrospection, "alignment": alignment}
        sections = {attr: _section(attr, value, None) for attr, value in given.items()}
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise TypeError(f"unknown ABDConfig field(s) {unknown}; see help(ABDConfig) for the "
                            "list")
        changes: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            attr, name = FLAT[key]
            check, _ = _SECTION_FIELD_SPECS[attr][name]
            check.validate(f"ABDConfig.{key}", value)  # the name the caller used
            changes.setdefault(attr, {})[name] = value
        for attr, fields in changes.items():
            try:
                sections[attr] = sections[attr].replace(**fields)
            except ValueError as err:  # a rule between fields: name them as the caller did
                names = ", ".join(k for k in flat if FLAT[k][0] == attr)
                raise ValueError(f"ABDConfig({names}): {err}") from None
        for attr, value in sections.items():
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "input_range", input_range)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "logits_fn", logits_fn)
        validate_fields(self, _SPECS)
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError(f"ABDConfig.input_range must be (low, high) with low < high, got "
                             f"{self.input_range}")

    def __getattr__(self, name: str) -> Any:
        # flat names (the compatibility layer): only reached when normal lookup fails
        where = FLAT.get(name)
        if where is None:
            raise AttributeError(f"'ABDConfig' object has no attribute {name!r}")
        return getattr(getattr(self, where[0]), where[1])

    def replace(self, **changes: Any) -> ABDConfig:
        """A copy with some fields changed: sections, general fields or flat keywords (unknown
        names raise a clear error). A bool or dict given for a section changes the current
        section (its ``enabled`` switch, or the fields named)."""
        kw: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        flat = {}
        for key, value in changes.items():
            if key in SECTIONS:
                kw[key] = _section(key, value, getattr(self, key))
            elif key in kw:
                kw[key] = value
            else:
                flat[key] = value
        return ABDConfig(**kw, **flat)

    @property
    def sr_start(self) -> int | None:
        """The first SR step resolved from the retrospection section's ``start_step`` /
        ``start_fraction``, or ``None`` when the SR window only opens through ``with
        guard.retrospection():`` (see :class:`~abd_plugin.schedule.SRSchedule`)."""
        return self.retrospection.schedule().start

    @classmethod
    def classic(cls, **overrides: Any) -> ABDConfig:
        """ABD as published, with this project's implementation defaults: SV (automatic depth,
        verified) and SR (in its window), no audit and no eraser."""
        base: dict = dict(sv=True, sr=True, audit=False, erase=False)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def paper(cls, **overrides: Any) -> ABDConfig:
        """The official code's recipe: 5 shuffled convs, coefficient 0.1, verification on, SR
        with 10 rounds at the student learning rate 5e-4 it resumes with (``sup_resume_lr``);
        no audit, no eraser."""
        base: dict = dict(sv=True, sr=True, audit=False, erase=False, shuffle_layers=5,
                          sr_lr=5e-4)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tuned(cls, **overrides: Any) -> ABDConfig:
        """The previous release's recipe for SV and SR (README, "Results"): SV with the
        automatic depth (verified, so it stays off where no vaccine separates), and SR over the
        last 10 % of student steps at learning rate 1e-3 with a quarter of each batch carrying an
        L2-bounded perturbation."""
        base: dict = dict(sv=True, sr=True, audit=False, erase=False, shuffle_layers="auto",
                          sr_start_fraction=0.9, sr_lr=1e-3, sr_outer_portion=0.25,
                          sr_epsilon_rms=0.3)
        base.update(overrides)
        return cls(**base)


def _section(attr: str, value: Any, current: Section | None) -> Section:
    """The section ``attr`` from what was given: a section object, a bool (its ``enabled``
    switch), a dict of its fields, or None (``current``, else the default)."""
    cls = SECTIONS[attr]
    base = current if current is not None else cls()
    if value is None:
        return base
    if isinstance(value, cls):
        return value
    if isinstance(value, bool):
        return base.replace(enabled=value)
    if isinstance(value, Mapping):
        return base.replace(**dict(value))
    raise TypeError(f"ABDConfig.{attr} must be a {cls.__name__}, True/False (its switch) or a "
                    f"dict of its fields, got {value!r}")


_SPECS = field_specs(ABDConfig)  # raises at import for a field declared without a spec
#: per section: field -> (spec, doc)
_SECTION_FIELD_SPECS = {attr: field_specs(cls) for attr, cls in SECTIONS.items()}


def _docs() -> str:
    general = [f for f in dataclasses.fields(ABDConfig) if f.name not in SECTIONS]
    parts = ["General fields (name = default):", ""]
    specs = _SPECS
    for f in general:
        check, doc = specs[f.name]
        parts.append(f"{f.name} = {f.default!r}\n    accepts {check.describe()}\n"
                     + "\n".join("    " + line for line in inspect.cleandoc(doc).splitlines()))
        parts.append("")
    for attr, cls in SECTIONS.items():
        flat = {name: key for key, name in cls.flat_names().items()}
        parts.append(f"Section {attr} = {cls.__name__}(...)  ({cls.__module__}):")
        parts.append("")
        def title(f: dataclasses.Field, a: str = attr, fl: dict[str, str] = flat) -> str:
            return f"{a}.{f.name} = {f.default!r}    (flat keyword: {fl[f.name]})"

        parts.append(field_docs(cls, title))
        parts.append("")
    return "\n".join(parts)


ABDConfig.__doc__ = (
    inspect.cleandoc(ABDConfig.__doc__ or "").split("\n\nThe field list")[0]
    + "\n\nA section can be given as a section object, as a bool (its ``enabled`` switch) or as a "
    "dict of its fields; every field can also be given by its flat keyword. Every field is "
    "checked when a config is made (also by ``replace``, ``paper()``, ``tuned()``): a value of "
    "the wrong type raises ``TypeError``, one out of range ``ValueError``, both naming the field "
    "and what it accepts; the rules between fields are checked by their section.\n\n" + _docs()
)

__all__ = ["ABDConfig", "SECTIONS", "FLAT", "Layers", "LayerSpec", "AuditSettings",
           "EraseSettings", "VaccineSettings", "RetrospectionSettings", "AlignmentSettings"]
