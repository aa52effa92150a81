"""The guard's report as loggable numbers: a flat ``{name: float}`` dict under an ``abd/`` prefix,
for a host's logger (Lightning's ``log_dict``, torchdistill's ``logging`` lines).

:func:`report_metrics` turns a :class:`~abd_plugin.GuardReport` into that dict, record by record:
each record's numeric fields (ints, floats, bools as 1/0, and one level of a dict of numbers as
``<field>/<key>``), plus the few figures a record holds in a string or a nested object. Only
finite numbers are kept: NaN (a record that has no data yet, e.g. the eraser's ``flip`` before
its first update), ``None``, strings and lists are left out. Wall times (fields named
``seconds`` or ``*_seconds``, which only ``guard.report()`` fills) are not logged, except the
audit's own duration.

Names (``P`` is the prefix, ``abd`` by default):

* audit (:class:`~abd_plugin.audit.AuditRecord`, once the audit ran):
  ``P/audit/verdict`` (encoded: 0 clean, 1 unsure, 2 poisoned), ``P/audit/poisoned`` (1 when the
  verdict is poisoned, else 0), ``P/audit/p_value`` and ``P/audit/z_score`` (of the suspect
  class), ``P/audit/statistic`` (its maximum margin), ``P/audit/suspect``, ``P/audit/target``
  (absent when the verdict is clean: there is none), ``P/audit/seconds`` (the audit's duration),
  and, when the report computed it, ``P/audit/ensemble_class`` and ``P/audit/agree`` (1/0).
* trigger eraser (:class:`~abd_plugin.eraser.EraserReport`): ``P/erase/on`` (1 while erasing),
  ``P/erase/target``, ``P/erase/pixels``, ``P/erase/mass``, ``P/erase/fraction`` (the mask's mean
  over the input), ``P/erase/updates``, ``P/erase/batches``, ``P/erase/flip``, ``P/erase/kept``,
  ``P/erase/target_fraction``, ``P/erase/price``, ``P/erase/coefficients`` (frequency
  coefficients the spectral gain changes, when it acts), ``P/erase/rescaled`` (batches whose
  logits went on at the raw teacher's scale), ``P/erase/rescaled_rows`` and ``P/erase/raw_rows``
  (their rows, and of them those handed the raw teacher's values), ``P/erase/rechecks``
  (re-audits so far) and, after one, ``P/erase/recheck_p_value`` and
  ``P/erase/recheck_stands_out`` (1/0) of the last.
* Shuffling Vaccine (:class:`~abd_plugin.vaccine.VaccineReport`): ``P/sv/enabled`` (1 once the SV
  term is on), ``P/sv/coef``, ``P/sv/depth``, ``P/sv/trials``, ``P/sv/suspicious_fraction``,
  ``P/sv/last_suspicious_fraction``, ``P/sv/last_penalty``, ``P/sv/calls``.
* Self-Retrospection (:class:`~abd_plugin.retrospection.RetrospectionReport`): ``P/sr/steps``,
  ``P/sr/start`` (when the window has one), ``P/sr/last_delta_norm``, ``P/sr/last_outer_loss``,
  ``P/sr/last_grad_norm``, ``P/sr/skipped/<reason>``.
* KDIGA (:class:`~abd_plugin.gradient_alignment.AlignmentReport`): ``P/iga/steps``,
  ``P/iga/last_loss``, ``P/iga/last_grad_norm``.
* any other record (a user's hook, or a second record of a built-in type) under its key in
  ``report.records`` (the hook's ``state_key``): ``P/<key>/<field>`` for its numeric fields; a
  hook whose ``report()`` returns a plain dict (:class:`~abd_plugin.hooks.MappingReport`):
  ``P/<key>/<dict key>`` for its numbers (0-d tensors included).
* a built-in defense that is off (:class:`~abd_plugin.hooks.OffReport`): nothing.

:func:`live_report` builds a report from the hooks' own records without the work
``guard.report()`` adds (the audit's shuffled-ensemble class, a forward of a frozen teacher
copy), and :class:`MetricsFeed` hands a host's logger the audit's figures once and the rest at
each call: what the adapters use at their logging frequency.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from torch import Tensor

from abd_plugin import ABDGuard, GuardReport, HookReport
from abd_plugin.audit import AuditRecord
from abd_plugin.eraser import EraserReport
from abd_plugin.gradient_alignment import AlignmentReport
from abd_plugin.hooks import MappingReport, OffReport
from abd_plugin.retrospection import RetrospectionReport
from abd_plugin.vaccine import VaccineReport

PREFIX = "abd"

#: the audit's verdict as a number (``P/audit/verdict``)
VERDICT_CODE = {"clean": 0.0, "unsure": 1.0, "poisoned": 2.0}

#: the short name of each built-in record type (its first record in a report)
SHORT_NAMES: dict[type[HookReport], str] = {
    AuditRecord: "audit",
    EraserReport: "erase",
    VaccineReport: "sv",
    RetrospectionReport: "sr",
    AlignmentReport: "iga",
}

#: fields of every record that are not logged: the wall time only ``guard.report()`` fills, and
#: the words (``warnings``)
_SKIPPED_FIELDS = {"seconds", "warnings"}


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None (NaN/inf, strings, lists, None, tensors of more than one
    element)."""
    if isinstance(v, Tensor):
        if v.numel() != 1 or v.is_complex():
            return None
        v = v.item()
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _put(out: dict[str, float], name: str, v: Any) -> None:
    f = _number(v)
    if f is not None:
        out[name] = f


def _numeric_items(items: dict[str, Any], base: str, out: dict[str, float]) -> None:
    """The numbers of ``items`` under ``base/<key>``; one level of a dict of numbers as
    ``base/<key>/<inner key>``."""
    for k, v in items.items():
        if isinstance(v, dict):
            for ik, iv in v.items():
                _put(out, f"{base}/{k}/{ik}", iv)
        else:
            _put(out, f"{base}/{k}", v)


def _fields(record: HookReport) -> dict[str, Any]:
    """A record's own fields (not deep-copied), less wall times and words."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
            if f.name not in _SKIPPED_FIELDS and not f.name.endswith("_seconds")}


def record_metrics(record: HookReport, base: str) -> dict[str, float]:
    """One record's numbers under ``base`` (e.g. ``"abd/erase"``); see the module docstring."""
    out: dict[str, float] = {}
    if isinstance(record, OffReport):
        return out
    if isinstance(record, AuditRecord):
        a = record.audit
        if a is None:  # not run yet
            return out
        _put(out, f"{base}/verdict", VERDICT_CODE.get(a.verdict))
        _put(out, f"{base}/poisoned", a.verdict == "poisoned")
        _put(out, f"{base}/p_value", a.p_value)
        _put(out, f"{base}/z_score", a.z_score)
        _put(out, f"{base}/statistic", a.statistic[a.suspect])
        _put(out, f"{base}/suspect", a.suspect)
        _put(out, f"{base}/target", a.target)
        _put(out, f"{base}/seconds", a.seconds)
        ens = record.ensemble_class if record.ensemble_class is not None else a.ensemble_class
        if ens is not None:
            _put(out, f"{base}/ensemble_class", ens)
            _put(out, f"{base}/agree", ens == a.suspect)
        return out
    if isinstance(record, MappingReport):
        _numeric_items(record.values, base, out)
        return out
    fields = _fields(record)
    tail: dict[str, float] = {}
    if isinstance(record, EraserReport):
        out[f"{base}/on"] = 1.0 if record.status == "on" else 0.0
        out[f"{base}/probation"] = 1.0 if record.status == "probation" else 0.0
        conf = fields.pop("confirmation")
        checks = fields.pop("probation_checks")
        if checks:
            tail[f"{base}/probation_checks"] = float(checks)
        if conf:
            _put(tail, f"{base}/confirm_gap", conf["control_ratio"] - conf["target_ratio"])
            _put(tail, f"{base}/confirm_transplant", conf["carried"] - conf["carried_control"])
        rechecks = fields.pop("rechecks")
        tail[f"{base}/rechecks"] = float(len(rechecks))
        if rechecks:
            _put(tail, f"{base}/recheck_p_value", rechecks[-1].get("p_value"))
            _put(tail, f"{base}/recheck_stands_out", rechecks[-1].get("stands_out"))
    elif isinstance(record, VaccineReport):
        out[f"{base}/enabled"] = 1.0 if record.status == "enabled" else 0.0
        tail[f"{base}/trials"] = float(len(fields.pop("trials")))
    _numeric_items(fields, base, out)
    out.update(tail)
    return out


def record_names(report: GuardReport, prefix: str = PREFIX) -> dict[str, str]:
    """``{key in report.records: base name}``: a built-in type's first record under its short
    name (``abd/erase``), any other record under its key (``abd/<state_key>``)."""
    names: dict[str, str] = {}
    taken: set[type[HookReport]] = set()
    for key, rec in report.records.items():
        short = next((n for t, n in SHORT_NAMES.items() if type(rec) is t), None)
        if short is not None and type(rec) not in taken:
            taken.add(type(rec))
            names[key] = f"{prefix}/{short}"
        else:
            names[key] = f"{prefix}/{key}"
    return names


def report_metrics(report: GuardReport, prefix: str = PREFIX) -> dict[str, float]:
    """The report's loggable numbers, ``{name: float}`` (names in the module docstring)."""
    out: dict[str, float] = {}
    for key, base in record_names(report, prefix).items():
        out.update(record_metrics(report.records[key], base))
    return out


def _report_keys(guard: ABDGuard) -> list[str]:
    """Each hook's key in the guard's report: its ``state_key``, a repeated one with a suffix by
    order (``"K"``, ``"K[1]"``), as :meth:`ABDGuard.report` keys them."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    for h in guard.hooks:
        n = seen.get(h.state_key, 0)
        seen[h.state_key] = n + 1
        keys.append(h.state_key if n == 0 else f"{h.state_key}[{n}]")
    return keys


def live_report(guard: ABDGuard) -> GuardReport:
    """The guard's report from its hooks' own records, cheaply: the audit's record is built from
    ``guard.audit_report`` (fixed once the audit ran) without the shuffled-ensemble class that
    ``guard.report()`` computes by running a frozen copy of the teacher; nothing runs the teacher
    or the student, and no counter of the guard changes. Built-in defenses that are off and the
    records' wall times (``seconds``) are left out; the warnings are not gathered."""
    audit_hook = guard.hook_named("audit")
    records: dict[str, HookReport] = {}
    audit_key = None
    for key, h in zip(_report_keys(guard), guard.hooks, strict=True):
        if h is audit_hook:
            a = guard.audit_report
            records[key] = AuditRecord() if a is None else AuditRecord(state=a.verdict, audit=a)
            audit_key = key
            continue
        rec = h.report()
        if not isinstance(rec, HookReport):
            rec = MappingReport(name=h.name, values=dict(rec))
        records[key] = rec
    return GuardReport(records=records, audit_key=audit_key, student_steps=guard.step)


class MetricsFeed:
    """A guard's numbers for a host's logger. :meth:`take` returns the audit's figures once (the
    first call after the audit ran: they do not change after) and, with ``rest=True``, every other
    record's numbers; :meth:`reset` makes the next call include the audit's figures again (a new
    run's logs)."""

    def __init__(self, guard: ABDGuard, prefix: str = PREFIX) -> None:
        self.guard = guard
        self.prefix = prefix
        self.audit_sent = False

    def reset(self) -> None:
        self.audit_sent = False

    def audit_pending(self) -> bool:
        """Whether the audit ran and its figures were not taken yet."""
        return not self.audit_sent and self.guard.audit_report is not None

    def take(self, rest: bool = True) -> dict[str, float]:
        """The audit's figures if :meth:`audit_pending`, plus (``rest``) the other records'
        numbers; ``{}`` when there is nothing to log. Reads records only (:func:`live_report`)."""
        audit, others = self.take_parts(rest)
        return {**audit, **others}

    def take_parts(self, rest: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        """:meth:`take` as two dicts: the audit's figures (or ``{}``), the others'."""
        audit: dict[str, float] = {}
        if self.audit_pending():
            a = self.guard.audit_report
            assert a is not None
            audit = record_metrics(AuditRecord(state=a.verdict, audit=a),
                                   f"{self.prefix}/{SHORT_NAMES[AuditRecord]}")
            self.audit_sent = True
        others: dict[str, float] = {}
        if rest:
            report = live_report(self.guard)
            for key, base in record_names(report, self.prefix).items():
                if key != report.audit_key:
                    others.update(record_metrics(report.records[key], base))
        return audit, others


def format_metrics(metrics: dict[str, float], delimiter: str = "  ") -> str:
    """``name: value`` pairs (6 significant digits) joined by ``delimiter``: torchdistill's
    ``MetricLogger`` line style."""
    return delimiter.join(f"{k}: {v:.6g}" for k, v in metrics.items())


__all__ = ["PREFIX", "VERDICT_CODE", "SHORT_NAMES", "record_metrics", "record_names",
           "report_metrics", "live_report", "MetricsFeed", "format_metrics"]
