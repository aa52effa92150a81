"""Cost of the input-gradient alignment hook (KDIGA) per student step, as a ratio to a plain step.

    python benchmarks/bench_iga.py --device cpu --threads 1         # the committed CPU numbers
    python benchmarks/bench_iga.py --device cuda                    # on a GPU
    python benchmarks/bench_iga.py --device cpu --tiny              # smoke run (CI, seconds)

A student step is ZSKT's (``zskt.ZSKTLoop.student_step``): no-grad teacher forward + KL
forward/backward + clip 5 + Adam. Cases (random inputs; speed, not accuracy):

* ``student/vanilla``: the plain step.
* ``student/iga``: inside ``ABDGuard(teacher, student, sv=False, sr=False, audit=False,
  erase=False, hooks=[InputGradientAlignment(student, teacher)])``, a new batch on every call
  (the teacher's input gradient is computed: the first student step of a pseudo batch).
* ``student/iga_repeat``: the same batch on every call (the teacher's gradient comes from the
  hook's cache: the other steps of a pseudo batch).
* ``student/iga_fgsm``: ``fgsm_eps=0.2``, new batch per call (the variant the README's rows use:
  the teacher's gradient is at the FGSM point, never cached; only its labels are).
* ``student/iga_fgsm_repeat``: the same on one batch (the teacher's pseudo-labels cached).
* derived: ``student/iga[_fgsm] amortized over n steps per batch`` = (first + (n - 1) x repeat)
  / n: what a step costs on average in the kit's ZSKT/DFAD (n = 5 student steps per batch).

Cases are warmed up and timed round-robin (``_timing``); ratios are medians of the same run.
Nothing is asserted. Results: ``<out>/iga-<device>-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import itertools
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_name, median, time_round_robin  # noqa: E402
from zskt import ZSKTLoop  # noqa: E402

from abd_plugin import ABDGuard, InputGradientAlignment  # noqa: E402
from abd_plugin.kit.models import get_model  # noqa: E402

# (teacher, student, channels, image side, batch): the README's mnist5k pair and the overhead
# suite's WRN pair at its CPU batch
PAIRS = [("lenet5", "lenet5_half", 1, 32, 64), ("wrn16_2", "wrn16_1", 3, 32, 32)]
TINY_PAIRS = [("lenet5", "lenet5_half", 1, 32, 8)]


def bench_pair(teacher_name: str, student_name: str, ch: int, img: int, batch: int,
               device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    teacher = get_model(teacher_name, in_channels=ch).to(device).eval().requires_grad_(False)
    student = get_model(student_name, in_channels=ch).to(device).train()
    generator = get_model("generator_zskt", in_channels=ch, channels=ch, z_dim=100,
                          img_size=img).to(device).train()
    g = torch.Generator().manual_seed(1)
    n_calls = args.warmup + args.repeats
    pool = [torch.rand(batch, ch, img, img, generator=g).to(device) for _ in range(n_calls + 1)]
    fixed = pool[0]

    def loop() -> ZSKTLoop:
        return ZSKTLoop(copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(generator),
                        batch, n_student_iter=args.steps_per_batch)

    def fresh() -> Callable[[], torch.Tensor]:
        """A new batch per call (never ``fixed``): the hook's teacher-gradient cache misses."""
        batches = itertools.cycle(pool[1:])
        return lambda: next(batches)

    cases: dict[str, Callable[[], Any]] = {}
    guards: list[ABDGuard] = []
    v = loop()
    cases["student/vanilla"] = lambda: v.student_step(fixed)
    fgsm = {"fgsm_eps": 0.2, "clamp": (0.0, 1.0)}
    for name, kw, same in (("student/iga", {}, False), ("student/iga_repeat", {}, True),
                           ("student/iga_fgsm", fgsm, False),
                           ("student/iga_fgsm_repeat", fgsm, True)):
        lp = loop()
        hook = InputGradientAlignment(lp.student, lp.teacher, gamma=1.0, **kw)
        guards.append(ABDGuard(lp.teacher, lp.student, sv=False, sr=False, audit=False,
                               erase=False, hooks=[hook]).attach())
        if same:
            cases[name] = lambda lp=lp: lp.student_step(fixed)
        else:
            nxt = fresh()
            cases[name] = lambda lp=lp, nxt=nxt: lp.student_step(nxt())
    try:
        times = time_round_robin(cases, device, warmup=args.warmup, repeats=args.repeats)
    finally:
        for gd in guards:
            gd.detach()
    med = {k: median(t) for k, t in times.items()}
    n = args.steps_per_batch
    for case in ("student/iga", "student/iga_fgsm"):
        med[f"{case} amortized over {n} steps per batch"] = (
            med[case] + (n - 1) * med[f"{case}_repeat"]) / n
    ratios = {f"{k} / student/vanilla": med[k] / med["student/vanilla"]
              for k in med if k != "student/vanilla"}
    for k, r in ratios.items():
        print(f"    {k}: {r:.2f}", flush=True)
    return {"teacher": teacher_name, "student": student_name, "img": img, "channels": ch,
            "batch": batch, "times_s": times, "median_s": med, "ratios": ratios}


def to_markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# Input-gradient alignment (KDIGA) cost per student step ({m['device']})", "",
             f"- device: {m['device_name']}", f"- torch {m['torch']}, Python {m['python']}",
             f"- date: {m['date']}", f"- command: `{m['command']}`",
             f"- warm-up {m['warmup']}, repeats {m['repeats']}, steps per pseudo batch "
             f"{m['steps_per_batch']}", "- timings on a shared machine: read ratios, not ms", ""]
    for c in report["configs"]:
        lines += [f"## {c['teacher']} -> {c['student']}, {c['channels']}x{c['img']}x{c['img']}, "
                  f"batch {c['batch']}", "", "| case | median (ms) |", "|---|---:|"]
        lines += [f"| {k} | {1000 * v:.1f} |" for k, v in c["median_s"].items()]
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in c["ratios"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    p.add_argument("--tiny", action="store_true", help="one small pair, 1 warm-up, 2 repeats")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps-per-batch", type=int, default=5, help="student steps per batch "
                   "(the kit's ZSKT/DFAD: 5)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.warmup, args.repeats = 1, 2
    device = torch.device(args.device)
    date = _dt.datetime.now(_dt.timezone.utc)
    report: dict[str, Any] = {"meta": {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "python": platform.python_version(), "date": date.isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv), "warmup": args.warmup,
        "repeats": args.repeats, "steps_per_batch": args.steps_per_batch}, "configs": []}
    for t, s, ch, img, batch in (TINY_PAIRS if args.tiny else PAIRS):
        print(f"[bench_iga] {t} -> {s} {ch}x{img}x{img} batch {batch}", flush=True)
        report["configs"].append(bench_pair(t, s, ch, img, batch, device, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"iga-{device.type}-{date.strftime('%Y-%m-%d')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(report))
    print(f"[bench_iga] wrote {out / (stem + '.json')} and {out / (stem + '.md')}", flush=True)
    return report


if __name__ == "__main__":
    main()
