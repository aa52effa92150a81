"""The gate's measurements: what the eraser's probation checks see on clean and poisoned teachers
inside real data-free loops, and what the default does with it.

Two modes, one kit teacher and loop per cell (``arch:trigger:teacher_seed:method:seed``;
``trigger`` ``none`` is a clean teacher):

* ``--mode probe``: the default guard, except that the probation never ends and never confirms:
  every 10 mask updates (from update 10) both checks of :class:`abd_plugin.repair.Probation` are
  recorded (the re-audit's target and median control ratio, the transplant's share and control),
  and the teacher's inputs are never changed, so the student is the vanilla student (the mask
  learning and the audit use their own generators and a frozen copy). Rows give the thresholds'
  evidence and the vanilla ACC/ASR.
* ``--mode default``: the bare default guard (``ABDConfig()``).
* ``--mode vanilla``: no guard (the cost reference, in the same run).
* ``--mode immediate``: the default without the probation (``erase_confirm=0``: the mask acts
  from its first update, the behaviour before the probation existed), for comparison.

Teachers: the kit's recipe (mnist5k, 10 % poison), with the backdoor target drawn from a fixed
scramble of the classes per trigger and teacher seed (so class 0 is not special); the same
``TeacherSpec`` hits the same cache entry in every script. Single-threaded; a cell takes about a
minute of one CPU core for 300 iterations. Usage::

    python benchmarks/gate_probe.py --out runs/gate/probe.jsonl --mode probe \
        lenet5_bn:none:2:dfad:0 lenet5:square_in:0:dfad:0
    python benchmarks/gate_probe.py --out runs/gate/probe.jsonl --summary

Rows are appended as JSON lines (the run resumes); ``--summary`` prints the table of the checks
and which update each rule of the default would have confirmed at.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from abd_plugin import ABDConfig
from abd_plugin.eraser import EraserReport, EraseSettings
from abd_plugin.kit.bench import STUDENTS
from abd_plugin.kit.datasets import load_dataset
from abd_plugin.kit.loops import DistillConfig, distill
from abd_plugin.kit.metrics import accuracy, attack_success_rate
from abd_plugin.kit.poison import TeacherSpec, build_model, train_teacher
from abd_plugin.kit.triggers import get_trigger
from abd_plugin.repair import Probation

#: triggers in a fixed order and a scramble of the classes: target = TARGETS[(3 i + seed) % 10]
ORDER = ["badnet_grid", "l0_inv", "trojan_3x3", "trojan_wm", "square_in", "blend", "sig",
         "wanet", "sig_canonical"]
TARGETS = [3, 7, 0, 5, 9, 2, 8, 1, 6, 4]


def target_for(trigger: str, seed: int) -> int:
    i = ORDER.index(trigger) if trigger in ORDER else 0
    return TARGETS[(3 * i + seed) % 10]


def _probe_mode(records: list[dict[str, Any]]) -> None:
    """Make every probation check record its numbers and decide nothing (see the docstring)."""
    check = Probation.check

    def recording(self: Probation, *args: Any, **kwargs: Any) -> dict[str, Any]:
        rec = check(self, *args, **kwargs)
        records.append(dict(rec))
        rec["confirmed"] = rec["ended"] = False
        self.checks[-1] = rec
        return rec

    Probation.check = recording  # type: ignore[method-assign]


def run_cell(cell: str, mode: str, iterations: int, records: list[dict[str, Any]]
             ) -> dict[str, Any]:
    arch, trigger, tseed, method, seed = cell.split(":")
    clean = trigger == "none"
    spec = TeacherSpec(dataset="mnist5k", arch=arch, trigger=None if clean else trigger,
                       seed=int(tseed), **({} if clean else {"target": target_for(trigger,
                                                                                   int(tseed))}))
    teacher, meta = train_teacher(spec)
    target = None if clean else spec.target
    xte, yte = load_dataset("mnist5k", "test").tensors
    trig = get_trigger("badnet_grid" if clean else trigger)
    torch.manual_seed(int(seed))
    student = build_model(STUDENTS.get(arch, arch), "mnist5k")
    cfg = {"probe": ABDConfig(erase=EraseSettings(confirm=10, confirm_max=10**6)),
           "default": ABDConfig(), "vanilla": None,
           "immediate": ABDConfig(erase=EraseSettings(confirm=0))}[mode]
    records.clear()
    t0 = time.perf_counter()
    res = distill(method, teacher, student, img_shape=(1, 32, 32), num_classes=10,
                  config=DistillConfig(iterations=iterations, seed=int(seed)), abd=cfg)
    seconds = time.perf_counter() - t0
    row = {"cell": cell, "arch": arch, "trigger": trigger, "teacher_seed": int(tseed),
           "method": method, "seed": int(seed), "mode": mode, "iterations": iterations,
           "target": target, "teacher_acc": meta["acc"], "acc": accuracy(student, xte, yte),
           "asr": attack_success_rate(student, xte, yte, trig, 0 if target is None else target),
           "seconds": round(seconds, 1)}
    if res.report is None:
        return row
    assert res.report.audit is not None
    a = res.report.audit.audit
    er = res.report.get(EraserReport)
    assert a is not None and er is not None
    return {**row, "verdict": a.verdict, "suspect": a.suspect, "margin_suspect": a.margin_suspect,
            "universal_class": a.universal_class, "universal_z": a.universal_z,
            "p": a.p_value, "eraser": er.status, "eraser_reason": er.reason,
            "pixels": er.pixels,
            "checks": [{k: v for k, v in r.items() if k != "statistic"} for r in records]}


def confirmed_at(row: dict[str, Any], gap: float, transplant: float, every: int = 20,
                 max_updates: int = 100) -> int | None:
    """The update at which the default's rule would have confirmed this probe row's mask."""
    for r in row["checks"]:
        u = r["update"]
        if u > max_updates:
            break
        due = u >= max_updates or (u % every == 0 and r.get("pixels", 1) > 0)
        if due and (r["control_ratio"] - r["target_ratio"] >= gap
                    or r["carried"] - r["carried_control"] >= transplant):
            return int(u)
    return None


def summary(rows: list[dict[str, Any]]) -> str:
    d = EraseSettings()
    out = ["| teacher | loop | target | audit | vanilla ACC/ASR | re-audit gap at 20/40/60/80/100 "
           "| transplant at 20/40/60/80/100 | default would confirm at |", "|---" * 8 + "|"]
    for r in rows:
        if r["mode"] != "probe" or "checks" not in r:
            continue
        by = {c["update"]: c for c in r["checks"]}
        gaps = "/".join(f"{by[u]['control_ratio'] - by[u]['target_ratio']:.2f}" if u in by
                        else "-" for u in (20, 40, 60, 80, 100))
        tr = "/".join(f"{by[u]['carried'] - by[u]['carried_control']:.2f}" if u in by
                      else "-" for u in (20, 40, 60, 80, 100))
        at = confirmed_at(r, d.confirm_gap, d.confirm_transplant, d.confirm, d.confirm_max)
        out.append(f"| {r['arch']} {r['trigger']} s{r['teacher_seed']} | {r['method']} | "
                   f"{r['target']} | {r['verdict']}->{r['suspect']} | {r['acc']:.1f}/"
                   f"{r['asr']:.1f} | {gaps} | {tr} | {at if at is not None else 'never'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cells", nargs="*", help="arch:trigger:teacher_seed:method:seed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=("probe", "default", "immediate", "vanilla"),
                    default="probe")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = ([json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
            if args.out.exists() else [])
    if args.summary:
        print(summary(rows))
        return
    done = {(r["cell"], r["mode"], r["iterations"]) for r in rows}
    records: list[dict[str, Any]] = []
    if args.mode == "probe":
        _probe_mode(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for cell in args.cells:
        if (cell, args.mode, args.iterations) in done:
            continue
        row = run_cell(cell, args.mode, args.iterations, records)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{cell} {args.mode}: ACC {row['acc']:.1f} ASR {row['asr']:.1f} audit "
              f"{row.get('verdict')}->{row.get('suspect')} eraser {row.get('eraser')} "
              f"({row['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
