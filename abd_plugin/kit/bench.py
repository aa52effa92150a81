"""The ACC/ASR benchmark: poisoned teacher -> data-free KD with and without ABD -> metrics.

A *cell* is (dataset, method, trigger, defense, seed, arch, iterations, teacher_seed, teacher,
target, poison_ratio). Images stay in image space; what the models are fed (teacher training,
the KD loops, ACC/ASR after stamping the trigger) goes through the dataset's
:func:`~abd_plugin.kit.datasets.to_model_input` (normalised for ``tinted32``, unchanged for the
[0, 1] datasets).
``run_bench`` runs a grid of cells, appending one JSON line per finished cell to
``DIR/cells.jsonl`` (so an interrupted run resumes where it stopped), and then writes
``results.csv``, ``results.json``, ``table.md`` (with a cost table) and ``plot.png``. Rows added
automatically: ``clean`` (KD on real training data, the reference) and clean-teacher rows
(``trigger=none``, one clean teacher per seed) with and without the defenses, which measure what a
defense costs when there is no backdoor; with ``default`` in the grid also ``erase_forced`` on
the clean teachers (what a false alarm of the audit would cost).

Defense presets (:data:`DEFENSES`):

* ``none``: vanilla KD.
* ``default``: ``ABDConfig()``, what ``with ABDGuard(teacher, student):`` runs: the data-free
  audit, and the trigger eraser when the audit flags the teacher (``abd`` is the same).
* ``erase_forced``: the default with the eraser run whatever the audit says (``erase_on="always"``).
* ``erase_fixed``: the default without the eraser's re-audit (``erase_recheck=0``: the mask's
  price stays ``erase_price``).
* ``sv_paper``, ``sr_paper``, ``abd_paper``: the official code's recipe (5 shuffled convs,
  coefficient 0.1, verification on, SR with 10 rounds in the last 0.5 % of student steps).
* ``sv_tuned``, ``sr_tuned``, ``abd_tuned``: the previous release's SV/SR recipe
  (:meth:`ABDConfig.tuned`).

Hook defenses (:data:`HOOK_DEFENSES`, extra :class:`~abd_plugin.DefenseHook` objects in the same
guard), optionally parametrised (``iga:gamma=3``) and combined with one preset by ``+``
(``default+iga``; a hook alone runs in a guard with audit, eraser, SV and SR off):

* ``iga``: :class:`~abd_plugin.InputGradientAlignment` at the FGSM point of radius
  ``fgsm_eps`` (default: the teacher's adversarial-training eps, else 0.2), ``gamma`` per loop
  from :data:`IGA_GAMMA` (the README's seed-0 sweep) unless given.
* ``iga_plain``: the same aligned at the batch itself (no FGSM point).

Teacher kinds (the cell's ``teacher``; :mod:`abd_plugin.kit.teachers`): ``standard`` (poisoned by
the trigger or clean), ``pgd`` (adversarially trained; cells then also report the PGD robust
accuracy ``racc`` at the teacher's eps), ``nasty`` (Nasty Teacher). A method may carry
:class:`~abd_plugin.kit.loops.DistillConfig` overrides the same way (``clean:temperature=4``).
"""
from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from abd_plugin import ABDConfig, DefenseHook, GuardReport, InputGradientAlignment
from abd_plugin.audit import AuditRecord
from abd_plugin.eraser import EraserReport
from abd_plugin.hooks import OffReport
from abd_plugin.retrospection import RetrospectionReport
from abd_plugin.vaccine import VaccineReport
from abd_plugin.validation import Int, Num, Spec

from ._utils import check_options, parse_options
from .datasets import dataset_info, load_dataset, model_input_range
from .loops import DistillConfig, distill, list_loops
from .metrics import accuracy, attack_success_rate, robust_accuracy, robust_accuracy_pgd
from .poison import TeacherSpec, build_model
from .teachers import build_teacher
from .triggers import get_trigger

PAPER_SR_FRACTION = 0.995


def _paper(**kw: Any) -> ABDConfig:
    return ABDConfig.paper(sr_start_fraction=PAPER_SR_FRACTION, **kw)


DEFENSES: dict[str, Callable[[], ABDConfig | None]] = {
    "none": lambda: None,
    "default": lambda: ABDConfig(),
    "abd": lambda: ABDConfig(),
    "erase_forced": lambda: ABDConfig(erase_on="always"),
    "erase_fixed": lambda: ABDConfig(erase_recheck=0),  # the default without the re-audit
    "sv_paper": lambda: _paper(sr=False),
    "sr_paper": lambda: _paper(sv=False),
    "abd_paper": lambda: _paper(),
    "sv_tuned": lambda: ABDConfig.tuned(sr=False),
    "sr_tuned": lambda: ABDConfig.tuned(sv=False),
    "abd_tuned": lambda: ABDConfig.tuned(),
}

#: ``gamma`` of the ``iga`` defense per KD loop: the largest robust accuracy at <= 3 points of
#: clean ACC in a seed-0 sweep on mnist5k (README "Beyond backdoors"); other loops use the
#: untuned ``"default"``
IGA_GAMMA: dict[str, float] = {"clean": 1.5, "zskt": 10.0, "dfad": 10.0, "default": 3.0}
#: FGSM radius of ``iga`` when the teacher has no adversarial-training eps
IGA_FGSM_EPS = 0.2
#: PGD steps of the robust-accuracy evaluation
RACC_STEPS = 20

HookFactory = Callable[["Cell", torch.nn.Module, torch.nn.Module, dict[str, Any],
                        dict[str, Any]], DefenseHook]


def _iga(fgsm: bool) -> HookFactory:
    def make(cell: Cell, teacher: torch.nn.Module, student: torch.nn.Module,
             tmeta: dict[str, Any], opts: dict[str, Any]) -> DefenseHook:
        kw = dict(opts)
        method = parse_method(cell.method)[0]
        kw.setdefault("gamma", IGA_GAMMA.get(method, IGA_GAMMA["default"]))
        if fgsm:
            kw.setdefault("fgsm_eps", tmeta.get("eps", IGA_FGSM_EPS))
            lo, hi = model_input_range(cell.dataset)  # in the model's units: (0, 1) unnormalised
            kw.setdefault("clamp", (min(lo), max(hi)))
        return InputGradientAlignment(student, teacher, **kw)

    return make


HOOK_DEFENSES: dict[str, HookFactory] = {"iga": _iga(True), "iga_plain": _iga(False)}
#: the ``:key=value`` options of each hook defense (:class:`~abd_plugin.InputGradientAlignment`)
HOOK_OPTIONS: dict[str, dict[str, Spec]] = {
    "iga": {"gamma": Num(0), "every": Int(1), "fgsm_eps": Num(0, lo_open=True)},
    "iga_plain": {"gamma": Num(0), "every": Int(1)},
}

#: the student trained against each teacher architecture (the standard data-free KD pairs)
STUDENTS = {"lenet5": "lenet5_half", "lenet5_bn": "lenet5_half", "cnn5": "cnn5",
            "wrn16_2": "wrn16_1", "wrn40_2": "wrn16_1", "resnet34": "resnet18",
            "resnet8": "cnn3"}


@dataclass(frozen=True)
class Cell:
    dataset: str = "mnist5k"
    method: str = "zskt"
    trigger: str = "badnet_grid"  # "none": clean teacher
    defense: str = "none"
    seed: int = 0
    arch: str = "lenet5"
    iterations: int = 400
    teacher_seed: int = 0  # the teacher's training seed (clean-teacher rows vary it)
    teacher: str = "standard"
    """Teacher kind (:mod:`abd_plugin.kit.teachers`): ``standard``, ``pgd[:opts]``,
    ``nasty[:opts]``."""
    target: int = 0
    """The backdoor's target class (the teacher's ``TeacherSpec.target``; ASR is measured for
    it, also for clean teachers)."""
    poison_ratio: float = 0.1
    """Fraction of the training set poisoned (``TeacherSpec.poison_ratio``; clean-label
    triggers: at most every target-class image)."""

    def key(self) -> str:
        vals = list(asdict(self).items())
        # fields added later are left out at their defaults, from the end: the keys of runs made
        # before they existed stay valid
        while vals and vals[-1][0] in _LATER_FIELDS and vals[-1][1] == _LATER_FIELDS[vals[-1][0]]:
            vals.pop()
        return "|".join(str(v) for _, v in vals)


#: Cell fields added after the first runs, with the default their keys leave out
_LATER_FIELDS: dict[str, Any] = {"teacher": "standard", "target": 0, "poison_ratio": 0.1}


def parse_defense(name: str) -> tuple[ABDConfig | None, list[tuple[str, dict[str, Any]]]]:
    """``name`` -> (ABD configuration or None, [(hook defense, options)]). ``name`` is one
    :data:`DEFENSES` preset and/or :data:`HOOK_DEFENSES` joined by ``+`` (``default+iga:gamma=3``);
    hook options are checked against :data:`HOOK_OPTIONS` (``ValueError``/``TypeError``)."""
    cfg: ABDConfig | None = None
    presets: list[str] = []
    hooks: list[tuple[str, dict[str, Any]]] = []
    for part in name.split("+"):
        base, opts = parse_options(part)
        if base in HOOK_DEFENSES:
            hooks.append((base, check_options(f"defense {base!r}", opts, HOOK_OPTIONS[base])))
        elif base in DEFENSES and not opts:
            presets.append(base)
            cfg = DEFENSES[base]()
        else:
            raise ValueError(f"unknown defense {part!r}; choose from {sorted(DEFENSES)}, "
                             f"hooks {sorted(HOOK_DEFENSES)} (with :key=value options), joined "
                             "by '+'")
    if len(presets) > 1:
        raise ValueError(f"defense {name!r} combines presets {presets}; use at most one")
    return cfg, hooks


def parse_method(name: str) -> tuple[str, dict[str, Any]]:
    """``method[:key=value...]`` -> (loop name, :class:`~abd_plugin.kit.loops.DistillConfig`
    overrides), checked: a registered loop, known fields (not ``iterations``/``seed``, which the
    cell sets), integers >= 1 for integer fields and numbers > 0 for the others."""
    method, opts = parse_options(name)
    if method not in list_loops():
        raise ValueError(f"unknown method {method!r}; choose from {list_loops()}")
    specs: dict[str, Spec] = {
        f.name: Int(1) if isinstance(f.default, int) else Num(0, lo_open=True)
        for f in fields(DistillConfig) if f.name not in ("iterations", "seed")}
    return method, check_options(f"method {method!r}", opts, specs)


def resolve_defense(name: str) -> ABDConfig | None:
    """The ABD configuration of defense ``name`` (None: no ABD; hook parts are validated)."""
    return parse_defense(name)[0]


def make_hooks(cell: Cell, teacher: torch.nn.Module, student: torch.nn.Module,
               tmeta: dict[str, Any]) -> list[DefenseHook]:
    """The :class:`~abd_plugin.DefenseHook` objects of ``cell.defense``."""
    return [HOOK_DEFENSES[h](cell, teacher, student, tmeta, opts)
            for h, opts in parse_defense(cell.defense)[1]]


def run_cell(cell: Cell, *, progress: Callable[[int, int, str], None] | None = None,
             eval_every: int = 0, abd: ABDConfig | None = None) -> dict[str, Any]:
    """Run one cell and return its metrics (ACC/ASR/RA in percent). ``abd`` overrides the
    cell's named defense with an explicit configuration."""
    trig_name = None if cell.trigger == "none" else cell.trigger
    spec = TeacherSpec(dataset=cell.dataset, arch=cell.arch, trigger=trig_name,
                       seed=cell.teacher_seed, target=cell.target,
                       poison_ratio=cell.poison_ratio)
    teacher, tmeta = build_teacher(cell.teacher, spec)
    racc_eps = tmeta.get("eps")  # an adversarially trained teacher: report PGD robust accuracy
    # ``method[:key=value...]``: DistillConfig overrides, e.g. ``clean:temperature=4``
    method, method_opts = parse_method(cell.method)
    info = dataset_info(cell.dataset)
    xte, yte = load_dataset(cell.dataset, "test", size=spec.size).tensors
    # ASR of a clean teacher is still measured with the benchmark's reference trigger
    trig = get_trigger(trig_name or "badnet_grid")

    norm = info.normalize  # stamp in image space, then normalise (None: [0, 1] inputs)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        out = {
            "acc": accuracy(model, xte, yte, normalize=norm),
            "asr": attack_success_rate(model, xte, yte, trig, spec.target, normalize=norm),
            "ra": robust_accuracy(model, xte, yte, trig, spec.target, normalize=norm),
        }
        if racc_eps is not None:
            out["racc"] = robust_accuracy_pgd(model, xte, yte, racc_eps, RACC_STEPS)
        return out

    torch.manual_seed(cell.seed)
    student = build_model(STUDENTS.get(cell.arch, cell.arch), cell.dataset, spec.width)
    hooks: list[DefenseHook] = []
    if abd is None:  # the cell's named defense (an explicit ``abd`` runs alone)
        abd = resolve_defense(cell.defense)
        hooks = make_hooks(cell, teacher, student, tmeta)
    real = None
    if method == "clean":
        x_real, y_real = load_dataset(cell.dataset, "train", size=spec.size).tensors
        real = (x_real, y_real)
    c = info.channels
    h = spec.size or info.size
    t0, c0 = time.perf_counter(), time.process_time()
    result = distill(
        method,
        teacher,
        student,
        img_shape=(c, h, h),
        num_classes=info.num_classes,
        config=DistillConfig(iterations=cell.iterations, seed=cell.seed, **method_opts),
        abd=abd,
        real_data=real,
        progress=progress,
        eval_fn=evaluate if eval_every else None,
        eval_every=eval_every,
        hooks=hooks,
        normalize=norm,
    )
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0  # this process's CPU time: comparable on a shared box
    row: dict[str, Any] = {**asdict(cell), **evaluate(student), "seconds": round(seconds, 1),
                           "cpu_seconds": round(cpu_seconds, 1),
                           "teacher_acc": tmeta["acc"], "teacher_asr": evaluate(teacher)["asr"],
                           "history": result.history}
    if racc_eps is not None:
        row.update(racc_eps=racc_eps, teacher_racc=robust_accuracy_pgd(
            teacher, xte, yte, racc_eps, RACC_STEPS))
    if result.report is not None:
        row.update(report_columns(result.report, seconds))
    return row


def report_columns(rep: GuardReport, seconds: float) -> dict[str, Any]:
    """A bench row's columns from the guard's report records (the audit's, the eraser's, SV's,
    SR's; every other hook's numbers as ``hook.<key>.<field>``). A defense that did not run
    gives the same neutral values as before the records existed."""
    a, er = rep.get(AuditRecord), rep.get(EraserReport)
    sv, sr = rep.get(VaccineReport), rep.get(RetrospectionReport)
    audit = a.audit if a is not None else None
    audit_seconds = audit.seconds if audit is not None else 0.0
    nan = float("nan")
    row: dict[str, Any] = dict(
        audit_verdict="off" if a is None else a.state,
        audit_suspect=None if audit is None else audit.suspect,
        audit_p_value=nan if audit is None else audit.p_value,
        audit_patch_z=nan if audit is None or audit.patch_z is None else audit.patch_z,
        audit_seconds=round(audit_seconds, 2),
        ensemble_class=None if a is None else a.ensemble_class,
        erase_status="off" if er is None else er.status,
        erase_target=None if er is None else er.target,
        erase_pixels=0 if er is None else er.pixels,
        erase_family="off" if er is None or er.status != "on" else er.family,
        erase_flip=nan if er is None else er.flip,
        erase_keep=nan if er is None else er.kept,
        erase_seconds=0.0 if er is None else round(er.seconds, 1),
        erase_price=nan if er is None else er.price,
        erase_rechecks=[] if er is None else [[r["update"], round(r["p_value"], 4), r["price"]]
                                              for r in er.rechecks],
        seconds_without_audit=round(seconds - audit_seconds, 1),
        sv_status="off" if sv is None else sv.status,
        shuffle_depth=0 if sv is None else sv.depth,
        shuffled_layers=[] if sv is None else list(sv.layers),
        suspicious_fraction=nan if sv is None else sv.suspicious_fraction,
        sv_coef=0.0 if sv is None else sv.coef,
        sr_steps=0 if sr is None else sr.steps,
        sv_seconds=0.0 if sv is None else round(sv.seconds, 1),
        sr_seconds=0.0 if sr is None else round(sr.seconds, 1),
    )
    builtin = (AuditRecord, EraserReport, VaccineReport, RetrospectionReport, OffReport)
    for key, rec in rep.records.items():  # hook defenses: steps, last loss, seconds
        if isinstance(rec, builtin):
            continue
        for k, v in rec.as_dict().items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"hook.{key}.{k}"] = round(v, 4) if isinstance(v, float) else v
    return row


def grid(
    dataset: str,
    methods: Sequence[str],
    triggers: Sequence[str],
    defenses: Sequence[str],
    seeds: Sequence[int],
    *,
    arch: str = "lenet5",
    iterations: int = 400,
    clean_rows: bool = True,
    teachers: Sequence[str] = ("standard",),
    target: int = 0,
    poison_ratio: float = 0.1,
) -> list[Cell]:
    """Every (method, trigger, defense, seed) cell for every teacher kind; ``clean_rows`` adds
    clean KD on real data per trigger and (standard teachers) clean-teacher rows, one clean
    teacher per seed. Every cell has backdoor target class ``target`` and ``poison_ratio``."""
    tp: dict[str, Any] = {"target": target, "poison_ratio": poison_ratio}
    cells = [
        Cell(dataset, m, t, d, s, arch, iterations, teacher=k, **tp)
        for k in teachers
        for m in methods
        for t in triggers
        for d in defenses
        for s in seeds
    ]
    for k in teachers:
        if k != "standard" and clean_rows:
            cells += [Cell(dataset, "clean", t, "none", s, arch, iterations, teacher=k, **tp)
                      for t in triggers for s in seeds]
    if clean_rows and "standard" in teachers:
        for t in triggers:  # clean KD on real data: the reference the targets compare against
            if t != "none":
                cells += [Cell(dataset, "clean", t, "none", s, arch, iterations, **tp)
                          for s in seeds]
        extra = ["erase_forced"] if "default" in defenses else []
        for m in methods:  # clean teachers (one per seed): what a defense costs without backdoor
            cells += [
                Cell(dataset, m, "none", d, s, arch, iterations, teacher_seed=s, **tp)
                for d in dict.fromkeys(["none", *defenses, *extra])
                for s in seeds
            ]
    return list(dict.fromkeys(cells))


def run_bench(cells: Iterable[Cell], out: Path, *, log: Callable[[str], None] = print,
              progress_factory: Callable[[Cell], Any] | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out/cells.jsonl``; then write the summary files."""
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "cells.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                known = {k: r[k] for k in Cell.__dataclass_fields__ if k in r}
                rows[Cell(**known).key()] = r
    cells = list(cells)
    for i, cell in enumerate(cells):
        if cell.key() in rows:
            log(f"[{i + 1}/{len(cells)}] skip (done) {cell.key()}")
            continue
        log(f"[{i + 1}/{len(cells)}] {cell.key()}")
        prog = progress_factory(cell) if progress_factory else None
        row = run_cell(cell, progress=prog)
        if prog is not None and hasattr(prog, "close"):
            prog.close()
        rows[cell.key()] = row
        with done_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        extra = f"  robust ACC {row['racc']:.1f}" if "racc" in row else ""
        log(f"    ACC {row['acc']:.1f}  ASR {row['asr']:.1f}{extra}  ({row['seconds']:.0f}s)")
    wanted = [rows[c.key()] for c in cells if c.key() in rows]
    write_summary(wanted, out)
    return wanted


def _mean_std(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def _verdicts(rs: list[dict[str, Any]]) -> str:
    """Audit verdicts of a group's cells, e.g. ``poisoned->0 x3`` (verdict -> suspect class)."""
    seen: dict[str, int] = {}
    for r in rs:
        if "audit_verdict" not in r:
            continue
        v = r["audit_verdict"]
        k = f"{v}->{r['audit_suspect']}" if r.get("audit_suspect") is not None else v
        seen[k] = seen.get(k, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in seen.items()) or "-"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["dataset"], r.get("arch", "lenet5"), r.get("teacher", "standard"), r["method"],
               r["trigger"], r["defense"], r.get("target", 0), r.get("poison_ratio", 0.1))
        groups.setdefault(key, []).append(r)
    out = []
    for (ds, arch, k, m, t, d, tgt, ratio), rs in groups.items():
        # rows of the defaults (target 0, 10 % poisoned) read as before
        if ratio != 0.1 and t != "none":
            t = f"{t} @{ratio:g}"
        if tgt != 0:
            t = f"{t}→{tgt}"
        erased = [r["erase_pixels"] for r in rs if r.get("erase_status") == "on"]
        racc: dict[str, Any] = {}
        if all("racc" in r for r in rs):
            racc = {"racc": statistics.mean(r["racc"] for r in rs),
                    "racc_txt": _mean_std([r["racc"] for r in rs]),
                    "teacher_racc": rs[0]["teacher_racc"]}
        out.append(
            {
                "dataset": ds,
                "arch": arch,
                "teacher_kind": k,
                "method": m,
                "trigger": t,
                "defense": d,
                "n": len(rs),
                "acc": statistics.mean(r["acc"] for r in rs),
                "asr": statistics.mean(r["asr"] for r in rs),
                "ra": statistics.mean(r["ra"] for r in rs),
                "acc_txt": _mean_std([r["acc"] for r in rs]),
                "asr_txt": _mean_std([r["asr"] for r in rs]),
                "teacher": "; ".join(dict.fromkeys(
                    f"{r['teacher_acc']:.1f}/{r['teacher_asr']:.1f}" for r in rs)),
                "sv_status": ",".join(sorted({str(r.get("sv_status", "-")) for r in rs})),
                "audit": _verdicts(rs),
                "eraser": (f"on x{len(erased)}, {statistics.mean(erased):.0f} px" if erased
                           else "-"),
                "seconds": statistics.mean(r["seconds"] for r in rs),
                **racc,
            }
        )
    return out


def cost_rows(rows: list[dict[str, Any]], defense: str = "default") -> list[dict[str, Any]]:
    """Run time of ``defense`` over the undefended run of the same cell (same arch, method,
    trigger, seed, teacher), without the audit's one-off seconds, which are given beside it."""
    def key(r: dict[str, Any]) -> tuple:
        return (r.get("arch"), r["method"], r["trigger"], r["seed"], r.get("teacher_seed", 0),
                r.get("teacher", "standard"), r.get("target", 0), r.get("poison_ratio", 0.1))

    base = {key(r): r for r in rows if r["defense"] == "none" and r["method"] != "clean"}
    out = []
    for r in rows:
        k = key(r)
        if r["defense"] != defense or k not in base or "seconds_without_audit" not in r:
            continue
        out.append({"arch": k[0], "method": k[1], "trigger": k[2], "seed": k[3],
                    "ratio": r["seconds_without_audit"] / max(base[k]["seconds"], 1e-9),
                    "audit_seconds": r["audit_seconds"], "erase": r.get("erase_status"),
                    "none_seconds": base[k]["seconds"], "seconds": r["seconds"]})
    return out


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    flat = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    if flat:
        keys = list(dict.fromkeys(k for r in flat for k in r))
        with (out / "results.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(flat)
    summ = summarize(rows)
    if any(s["teacher_kind"] != "standard" or "racc" in s for s in summ):
        (out / "table.md").write_text(_kind_table(summ))
    else:
        (out / "table.md").write_text(_table(summ, rows))
    try:
        plot_summary(summ, out / "plot.png")
    except ImportError:  # matplotlib is in the bench extra
        pass


def _kind_table(summ: list[dict[str, Any]]) -> str:
    """The table with the teacher kind and, where measured, PGD robust accuracy."""
    lines = [
        "| dataset | teacher | method | trigger | defense | seeds | teacher ACC/ASR | ACC | ASR "
        "| robust ACC (PGD) | teacher robust ACC | audit (verdict->suspect) | eraser |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summ:
        racc = s.get("racc_txt", "-")
        t_racc = f"{s['teacher_racc']:.1f}" if "teacher_racc" in s else "-"
        lines.append(
            f"| {s['dataset']} | {s['teacher_kind']} | {s['method']} | {s['trigger']} "
            f"| {s['defense']} | {s['n']} | {s['teacher']} | {s['acc_txt']} | {s['asr_txt']} "
            f"| {racc} | {t_racc} | {s['audit']} | {s['eraser']} |"
        )
    return "\n".join(lines) + "\n"


def _table(summ: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arch | method | trigger | defense | seeds | teacher ACC/ASR | ACC | ASR | RA "
        "| audit (verdict->suspect) | eraser |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summ:
        lines.append(
            f"| {s['arch']} | {s['method']} | {s['trigger']} | {s['defense']} | {s['n']} "
            f"| {s['teacher']} | {s['acc_txt']} | {s['asr_txt']} | {s['ra']:.1f} "
            f"| {s['audit']} | {s['eraser']} |"
        )
    cost = cost_rows(rows)
    if cost:
        lines += ["", "Run time of the default guard over the undefended run (same cell), "
                  "without the audit's one-off seconds:", "",
                  "| arch | method | cells | time ratio | audit seconds | eraser on in |",
                  "|---|---|---|---|---|---|"]
        by: dict[tuple, list[dict[str, Any]]] = {}
        for c in cost:
            by.setdefault((c["arch"], c["method"]), []).append(c)
        for (arch, m), cs in by.items():
            ratios = [c["ratio"] for c in cs]
            on = [c for c in cs if c["erase"] == "on"]
            lines.append(f"| {arch} | {m} | {len(cs)} | {_mean_std(ratios)} (on: "
                         f"{_mean_std([c['ratio'] for c in on]) if on else '-'}) "
                         f"| {_mean_std([c['audit_seconds'] for c in cs])} | {len(on)} |")
    return "\n".join(lines) + "\n"


def plot_summary(summ: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['method']}\n{s['trigger']}\n{s['defense']}"
              + ("" if s["teacher_kind"] == "standard" else f"\n{s['teacher_kind']}")
              for s in summ]
    x = list(range(len(summ)))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(summ)), 4))
    ax.bar([i - 0.2 for i in x], [s["acc"] for s in summ], width=0.4, label="ACC")
    ax.bar([i + 0.2 for i in x], [s["asr"] for s in summ], width=0.4, label="ASR")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
