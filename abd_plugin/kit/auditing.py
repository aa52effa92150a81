"""The audit from the command line: one teacher (``abd-plugin audit``) and a table over many kit
teachers (``abd-plugin audit-table``), with plots. The audit itself is the core's
:func:`abd_plugin.audit.audit`."""
from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from abd_plugin.audit import AuditReport, AuditSettings, audit

from .datasets import dataset_info, model_input_range
from .poison import TeacherSpec, train_teacher


def plot_audit(rep: AuditReport, path: Path, title: str = "") -> None:
    """Bar plot of the per-class maximum margin, the suspect highlighted, p-values on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(rep.statistic)
    colors = ["tab:red" if (c == rep.suspect and rep.verdict != "clean") else "tab:blue"
              for c in range(k)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * k + 2), 3.6))
    ax.bar(range(k), rep.statistic, color=colors)
    for c, (r, p) in enumerate(zip(rep.statistic, rep.p_values, strict=True)):
        ax.text(c, r, f"p={p:.1g}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(k))
    ax.set_xlabel("class")
    ax.set_ylabel("maximum margin (data-free)")
    ax.set_title(title or f"audit: {rep.verdict}, suspect class {rep.suspect}", fontsize=9)
    ax.set_ylim(0, max(rep.statistic) * 1.35 if max(rep.statistic) > 0 else 1)
    with warnings.catch_warnings():  # the rotated p-value labels of tiny bars may not fit
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dataset_input_range(dataset: str) -> tuple[float, float]:
    """The range of the model inputs of ``dataset``: (0, 1), or the normalised image of [0, 1]."""
    lo, hi = model_input_range(dataset)
    return min(lo), max(hi)


def audit_teacher_file(path: str, arch: str, dataset: str, *, input_range: Any = None,
                       settings: AuditSettings | None = None, seed: int = 0) -> AuditReport:
    """Audit a state_dict file (``abd-plugin poison --out``, or your own) of a kit architecture
    (``input_range`` None: the dataset's model-input range, (0, 1) or (-2, 2) for tinted32)."""
    from abd_plugin import load_teacher

    from .poison import build_model

    info = dataset_info(dataset)
    if input_range is None:
        input_range = dataset_input_range(dataset)
    model = load_teacher(path, build_model(arch, dataset))
    return audit(model, (info.channels, info.size, info.size), input_range=input_range,
                 settings=settings or AuditSettings(), seed=seed)


def audit_table(archs: Sequence[str], triggers: Sequence[str], seeds: Sequence[int], *,
                dataset: str = "mnist5k", settings: AuditSettings | None = None,
                audit_seed: int = 0, out: Path | None = None, log: Callable[[str], None] = print
                ) -> list[dict[str, Any]]:
    """Audit every kit teacher (arch x trigger x training seed; ``"none"``: a clean teacher),
    training the ones not cached. Rows: verdict, suspect, p-value, z-score, seconds, and the
    teacher's own ACC/ASR (does its backdoor work at all?)."""
    from .metrics import attack_success_rate
    from .triggers import get_trigger

    info = dataset_info(dataset)
    settings = settings or AuditSettings()
    rows = []
    for arch in archs:
        for trig in triggers:
            for seed in seeds:
                spec = TeacherSpec(dataset=dataset, arch=arch,
                                   trigger=None if trig == "none" else trig, seed=seed)
                t0 = time.perf_counter()
                model, meta = train_teacher(spec)
                train_s = time.perf_counter() - t0
                rep = audit(model, (info.channels, info.size, info.size), settings=settings,
                            input_range=dataset_input_range(dataset), seed=audit_seed)
                asr = meta.get("asr")
                if asr is None:  # a clean teacher: its ASR with the benchmark's reference trigger
                    from .datasets import load_dataset

                    x, y = load_dataset(dataset, "test").tensors
                    asr = attack_success_rate(model, x, y, get_trigger("badnet_grid"),
                                              spec.target, normalize=dataset)
                row = {"arch": arch, "trigger": trig, "seed": seed, "poisoned": trig != "none",
                       "target": spec.target, "teacher_acc": meta["acc"], "teacher_asr": asr,
                       "verdict": rep.verdict, "suspect": rep.suspect,
                       "p_value": rep.p_value, "z_score": rep.z_score,
                       "margin_suspect": rep.margin_suspect,
                       "margin_p": rep.p_values[int(rep.margin_suspect or 0)],
                       "margin_raw_p": (None if rep.raw_p_values is None else
                                        rep.raw_p_values[int(rep.margin_suspect or 0)]),
                       "universal_class": rep.universal_class, "universal_z": rep.universal_z,
                       "universal_p": rep.universal_p, "statistic": list(rep.statistic),
                       "universal": None if rep.universal is None else list(rep.universal),
                       "seconds": rep.seconds, "train_seconds": train_s}
                rows.append(row)
                log(f"{arch} {trig} seed {seed}: {rep.verdict}, suspect {rep.suspect}, "
                    f"p {rep.p_value:.2g}, z {rep.z_score:.1f} ({rep.seconds:.1f}s)")
    if out is not None:
        write_audit_table(rows, out)
    return rows


def write_audit_table(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(rows, indent=1))
    lines = ["| arch | trigger | seed | teacher ACC/ASR | verdict | suspect | p-value | robust z "
             "| seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['trigger']} | {r['seed']} | {r['teacher_acc']:.1f}/"
                     f"{r['teacher_asr']:.1f} | {r['verdict']} | {r['suspect']} "
                     f"| {r['p_value']:.2g} | {r['z_score']:.1f} | {r['seconds']:.1f} |")
    poisoned = [r for r in rows if r["poisoned"] and r["teacher_asr"] >= 80]
    clean = [r for r in rows if not r["poisoned"]]
    if poisoned:
        hit = sum(r["suspect"] == r["target"] for r in poisoned)
        flagged = sum(r["verdict"] != "clean" and r["suspect"] == r["target"] for r in poisoned)
        called = sum(r["verdict"] == "poisoned" and r["suspect"] == r["target"] for r in poisoned)
        lines += ["", f"Poisoned teachers whose backdoor works (teacher ASR >= 80 %): "
                  f"{len(poisoned)}; suspect = true target: {hit}; flagged (poisoned or unsure) "
                  f"with the true target: {flagged}; called poisoned with it: {called}."]
    if clean:
        lines += [f"Clean teachers: {len(clean)}; called poisoned: "
                  f"{sum(r['verdict'] == 'poisoned' for r in clean)}; unsure: "
                  f"{sum(r['verdict'] == 'unsure' for r in clean)}."]
        cal = [r["margin_p"] for r in clean if r.get("margin_p") is not None]
        raw = [r["margin_raw_p"] for r in clean if r.get("margin_raw_p") is not None]
        if cal and raw:  # a calibrated null falls below 0.05 about 1 time in 20
            lines += [f"Clean teachers' margin p-value below 0.05: calibrated "
                      f"{sum(v < 0.05 for v in cal)} / {len(cal)}, plug-in "
                      f"{sum(v < 0.05 for v in raw)} / {len(raw)}; median calibrated "
                      f"{statistics.median(cal):.2f} (uniform: 0.5)."]
    secs = [r["seconds"] for r in rows]
    lines += [f"Audit seconds per teacher: {statistics.mean(secs):.1f} (max {max(secs):.1f})."]
    (out / "audit.md").write_text("\n".join(lines) + "\n")
