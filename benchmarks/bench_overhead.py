"""ABD's overhead: per-step time and peak memory, and whole ZSKT runs, vanilla vs ABDGuard.

    python benchmarks/bench_overhead.py --device cuda                      # full suite on a GPU
    python benchmarks/bench_overhead.py --device cuda --reference ~/ABD    # + the official code
    python benchmarks/bench_overhead.py --device cpu --tiny                # smoke run (CI)

What is timed (random inputs; the numbers are speed, not accuracy):

* generator step (``gen/*``): ZSKT's generator step, vanilla; inside ``ABDGuard(teacher, student,
  verify=False, shuffle_layers=k, sr=False)`` (automatic mode: the SV term joins the generator's
  loss through the guard's teacher hook) for k = 1 and the paper's 5; with the official
  ``BackdoorSuspectLoss`` (k = 5) when ``--reference`` is given.
* student step (``student/*``): no-grad teacher forward + KD forward/backward + clip + Adam step,
  vanilla; inside ``ABDGuard(..., sv=False, sr_start_step=0)`` (SR on every step, 10 synthesis
  rounds as in the paper); the same with ``sr_warm_start=True, sr_inner_rounds=5`` ("tuned");
  the official ``UnlearnOptimizer(KLDiv(T=1), inner_round=10).step`` when ``--reference`` is given.
  SR keeps its perturbation while the batch is unchanged (teacher as perturbation model, no warm
  start), so ``student/sr``, ``student/sr_tuned`` and ``student/official_sr`` get a new random
  batch on every call (= the first student step of a ZSKT pseudo batch), while
  ``student/sr_repeat`` calls on one batch (= the other steps, cache hits); the derived
  ``student/sr amortized over n steps per batch`` = (first + (n - 1) x repeat) / n, n =
  ``--n-student-iter`` (ZSKT: 10), is what a ZSKT SR step costs on average.
* whole run (``run/*``): ``--run-iters`` ZSKT pseudo batches (1 generator + 10 student steps each),
  vanilla vs ABD with SV on from the first step (the paper's CIFAR-10 sweeps skip verification)
  and SR in the last ``--sr-fraction`` of the student steps (paper: the last 0.5-0.75 %), and vs
  the default guard's trigger eraser (``run/eraser``: armed from the first batch, ``target=0``;
  the audit's one-off seconds are timed separately, ``audit_seconds``).
  The ratio is also projected to a full 80k-pseudo-batch ZSKT run from the per-step medians.

SV and SR are off in the default ``ABDConfig()``; their cases use ``ABDConfig.classic()``.

Every case owns its own copy of the models, so guards never see another case's forwards. Cases
of a group are warmed up, then timed round-robin; ratios are medians of the same run. Results go
to ``<out>/<device>-<date>.json`` and ``.md``. Nothing is asserted: the targets are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import io
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_name, median, peak_memory_mib, time_once, time_round_robin  # noqa: E402
from zskt import ZSKTLoop  # noqa: E402

from abd_plugin import ABDConfig, ABDGuard  # noqa: E402
from abd_plugin.audit import audit  # noqa: E402
from abd_plugin.retrospection import RetrospectionReport  # noqa: E402
from abd_plugin.vaccine import VaccineReport  # noqa: E402

#: SV + SR as published (off in the default config, which is the audit + the trigger eraser)
CLASSIC = ABDConfig.classic()
from abd_plugin.kit.models import get_model  # noqa: E402

# (teacher, student, image side, batch sizes)
FULL_PAIRS = [
    ("wrn16_2", "wrn16_1", 32, [128, 256]),
    ("resnet34", "resnet18", 32, [128]),
]
# a CPU cannot run the GPU batch sizes in minutes (one official-size SR step of WRN-16-2 at batch
# 128 takes about a minute on 2 cores): the same pairs at smaller batches; ratios barely depend
# on the batch on a CPU, whose throughput is already saturated at these sizes
CPU_PAIRS = [
    ("wrn16_2", "wrn16_1", 32, [32, 64]),
    ("resnet34", "resnet18", 32, [8]),
]
TINY_PAIRS = [("cnn5:8", "cnn5:4", 16, [8])]
TARGETS = {"sv_gen_step": 1.15, "sr_vs_official": 0.5, "whole_run": 1.02, "eraser_run": 1.3}
PAPER_ZSKT_ITERS = 80_000  # ZSKT CIFAR-10 pseudo batches (the ABD code's default)



def _sr_steps(guard: ABDGuard) -> int:
    sr = guard.report().get(RetrospectionReport)
    return 0 if sr is None else sr.steps

def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a busy shared CPU makes every timing noisier."""
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def build(name: str, device: torch.device, **kw: Any) -> torch.nn.Module:
    """``get_model`` with ``name:width`` shorthand for the tiny CNNs."""
    if ":" in name:
        base, width = name.split(":")
        kw["width"] = int(width)
        name = base
    return get_model(name, **kw).to(device)


class Pair:
    """Base models of one (teacher, student, image size, batch) configuration; ``loop()`` hands
    out independent copies."""

    def __init__(self, teacher: str, student: str, img: int, batch: int, device: torch.device,
                 n_student_iter: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.names = (teacher, student)
        self.img, self.batch, self.device, self.n_student_iter = img, batch, device, n_student_iter
        self.teacher = build(teacher, device).eval().requires_grad_(False)
        self.student = build(student, device).train()
        self.generator = build("generator_zskt", device, z_dim=100, img_size=img, out="bn").train()
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.rand(batch, 3, img, img, generator=g).to(device)  # student-step batch
        self._fresh_gen = torch.Generator().manual_seed(seed + 2)

    def fresh_batches(self, n: int) -> Callable[[], torch.Tensor]:
        """A callable returning one of ``n`` distinct random batches per call, in turn (drawn up
        front, off the clock). ``n`` >= 2 suffices to defeat SR's one-batch cache; with ``n`` >= the
        number of calls no batch is ever seen twice."""
        pool = [
            torch.rand(self.batch, 3, self.img, self.img, generator=self._fresh_gen).to(self.device)
            for _ in range(max(2, n))
        ]
        state = {"i": -1}

        def nxt() -> torch.Tensor:
            state["i"] = (state["i"] + 1) % len(pool)
            return pool[state["i"]]
        return nxt

    def loop(self) -> ZSKTLoop:
        return ZSKTLoop(
            copy.deepcopy(self.teacher),
            copy.deepcopy(self.student),
            copy.deepcopy(self.generator),
            self.batch,
            n_student_iter=self.n_student_iter,
        )


def _quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """The official code prints on construction and on some calls."""
    def run() -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    return run


def _summ(times: dict[str, list[float]], peaks: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {k: {"median_s": median(v), "min_s": min(v), "times_s": v, "peak_mib": peaks.get(k)}
            for k, v in times.items()}


def bench_generator(pair: Pair, args: argparse.Namespace, official: Any) -> dict[str, Any]:
    cases: dict[str, Callable[[], Any]] = {}
    guards: dict[str, ABDGuard] = {}
    v = pair.loop()
    cases["gen/vanilla"] = v.generator_step
    for k in args.sv_layers:
        lp = pair.loop()
        g = ABDGuard(lp.teacher, lp.student, config=CLASSIC, verify=False, shuffle_layers=k,
                     sr=False).attach()
        guards[f"gen/sv_k{k}"] = g
        cases[f"gen/sv_k{k}"] = lp.generator_step
    if official is not None:
        lp = pair.loop()
        sv = _quiet(lambda: official.BackdoorSuspectLoss(
            lp.teacher, coef=0.1, n_shuf_ens=3, n_shuf_layer=5, device=pair.device,
            batch_size=pair.batch, pseudo_test_batches=0))()
        cases["gen/official_sv_k5"] = _quiet(
            lambda lp=lp, sv=sv: lp.generator_step(extra_loss=sv.loss)
        )
    try:
        times = time_round_robin(cases, pair.device, warmup=args.warmup, repeats=args.repeats)
        peaks = (
            {k: peak_memory_mib(fn, pair.device) for k, fn in cases.items()} if args.memory else {}
        )
        out = {"cases": _summ(times, peaks), "sv": {}}
        for name, g in guards.items():
            sv = g.report().get(VaccineReport)
            assert sv is not None
            out["sv"][name] = {
                "trunk_module": sv.trunk_module,
                "shuffled_layers": sv.layers,
                "status": sv.status,
                "calls": sv.calls,
            }
    finally:
        for g in guards.values():
            g.detach()
    return out


def bench_student(pair: Pair, args: argparse.Namespace, official: Any) -> dict[str, Any]:
    cases: dict[str, Callable[[], Any]] = {}
    guards: dict[str, ABDGuard] = {}
    x = pair.x
    reps = max(2, args.repeats // 2) if not args.tiny else args.repeats  # SR steps are long
    n_calls = args.warmup + reps + 1  # + the peak-memory call: every fresh case sees new batches
    v = pair.loop()
    cases["student/vanilla"] = lambda: v.student_step(x)
    # SR caches its perturbation while the batch is unchanged (teacher as perturbation model, no
    # warm start): a new batch per call times the first student step of a ZSKT pseudo batch
    variants = {"student/sr": {}, "student/sr_tuned": {"sr_warm_start": True, "sr_inner_rounds": 5}}
    for name, kw in variants.items():
        lp = pair.loop()
        guards[name] = ABDGuard(lp.teacher, lp.student, config=CLASSIC, sv=False, sr_start_step=0,
                                **kw).attach()
        nxt = pair.fresh_batches(n_calls)
        cases[name] = lambda lp=lp, nxt=nxt: lp.student_step(nxt())
    # the same batch on every call: the other n - 1 steps of a pseudo batch (cache hits)
    lp = pair.loop()
    guards["student/sr_repeat"] = ABDGuard(
        lp.teacher, lp.student, config=CLASSIC, sv=False, sr_start_step=0
    ).attach()
    cases["student/sr_repeat"] = lambda lp=lp: lp.student_step(x)
    cases["student/sr_repeat"]()  # fill the cache off the clock, whatever --warmup is
    if official is not None:
        from official import kl_div_criterion

        lp = pair.loop()
        crit = kl_div_criterion(1.0)
        ul = official.UnlearnOptimizer(crit, inner_round=10)  # no cache: new batches for symmetry
        nxt = pair.fresh_batches(n_calls)
        cases["student/official_sr"] = lambda lp=lp, ul=ul, nxt=nxt: ul.step(
            lp.student, lp.teacher, lp.opt_s, nxt(), crit)
    try:
        times = time_round_robin(cases, pair.device, warmup=args.warmup, repeats=reps)
        peaks = (
            {k: peak_memory_mib(fn, pair.device) for k, fn in cases.items()} if args.memory else {}
        )
        cache = getattr(guards["student/sr_repeat"].sr, "_cache", None)
        out = {"cases": _summ(times, peaks),
               "sr_steps": {n: _sr_steps(g) for n, g in guards.items()},
               # the repeat case's SR holds the perturbation of its batch (its calls were hits)
               "sr_repeat_cached": bool(cache is not None and torch.equal(cache[0], x))}
        med = {k: v["median_s"] for k, v in out["cases"].items()}
        n = args.sr_amortize_steps
        out["derived"] = {
            "steps_per_batch": n,
            f"student/sr amortized over {n} steps per batch":
                (med["student/sr"] + (n - 1) * med["student/sr_repeat"]) / n,
        }
    finally:
        for g in guards.values():
            g.detach()
    return out


def bench_run(pair: Pair, args: argparse.Namespace) -> dict[str, Any]:
    """Whole ZSKT runs of ``--run-iters`` pseudo batches, vanilla vs ABD, alternated."""
    n_iter = args.run_iters
    total = n_iter * pair.n_student_iter
    sr_start = min(total - 1, int(round((1.0 - args.sr_fraction) * total)))
    settings = {
        "run/abd": dict(config=CLASSIC, verify=False, shuffle_layers=5, sr_start_step=sr_start),
        "run/abd_tuned": dict(config=CLASSIC, verify=False, shuffle_layers=1,
                              sr_start_step=sr_start, sr_warm_start=True, sr_inner_rounds=5),
        # the default guard once the audit has flagged the teacher: the eraser from batch one
        "run/eraser": dict(audit=False, target=0),
    }
    times: dict[str, list[float]] = {"run/vanilla": [], **{k: [] for k in settings}}
    sr_steps: dict[str, int] = {}
    for _ in range(args.run_repeats):
        for name in times:
            lp = pair.loop()
            lp.iteration()  # warm-up pseudo batch, outside the guard and the clock
            guard = None
            if name in settings:
                guard = ABDGuard(lp.teacher, lp.student, **settings[name]).attach()

            def run(lp: ZSKTLoop = lp) -> None:
                for _ in range(n_iter):
                    lp.iteration()
            try:
                times[name].append(time_once(run, pair.device))
            finally:
                if guard is not None:
                    sr_steps[name] = _sr_steps(guard)
                    guard.detach()
    lp = pair.loop()  # the default guard's one-off audit of this teacher (its own clock)
    x = pair.x
    audit_s = time_once(lambda: audit(lp.teacher, tuple(x.shape[1:])), pair.device)
    return {
        "iters": n_iter,
        "student_steps": total,
        "sr_start_step": sr_start,
        "sr_steps": sr_steps,
        "audit_seconds": audit_s,
        "settings": {k: {kk: (repr(vv) if kk == "config" else vv) for kk, vv in v.items()}
                     for k, v in settings.items()},
        "cases": _summ(times, {}),
    }


def ratios(res: dict[str, Any], pair: Pair, args: argparse.Namespace) -> dict[str, Any]:
    g = {k: v["median_s"] for k, v in res["generator_step"]["cases"].items()}
    s = {k: v["median_s"] for k, v in res["student_step"]["cases"].items()}
    r: dict[str, Any] = {}
    for k in g:
        if k != "gen/vanilla":
            r[f"{k} / gen/vanilla"] = g[k] / g["gen/vanilla"]
    for k in list(s):
        if k != "student/vanilla":
            r[f"{k} / student/vanilla"] = s[k] / s["student/vanilla"]
    # ZSKT: n student steps per pseudo batch, 1 synthesis (student/sr) and n - 1 cache hits
    amort = amortized_key(res)
    s[amort] = res["student_step"]["derived"][amort]
    r[f"{amort} / student/vanilla"] = s[amort] / s["student/vanilla"]
    if "student/official_sr" in s:
        r["student/sr / student/official_sr"] = s["student/sr"] / s["student/official_sr"]
        r["student/sr_tuned / student/official_sr"] = (
            s["student/sr_tuned"] / s["student/official_sr"]
        )
        r[f"{amort} / student/official_sr"] = s[amort] / s["student/official_sr"]
    if "gen/official_sv_k5" in g:
        r["gen/sv_k5 / gen/official_sv_k5"] = g["gen/sv_k5"] / g["gen/official_sv_k5"]
    if "whole_run" in res:
        rc = {k: v["median_s"] for k, v in res["whole_run"]["cases"].items()}
        for k in rc:
            if k != "run/vanilla":
                r[f"{k} / run/vanilla (measured)"] = rc[k] / rc["run/vanilla"]
        # projection to a full-length run: SV on every generator step, SR in the last
        # sr_fraction of the student steps, per-iteration vanilla time from the measured run;
        # plain SR at its amortized cost (the cache), tuned SR (warm start: no cache) per step
        it_v = rc["run/vanilla"] / res["whole_run"]["iters"]
        f, n = args.sr_fraction, pair.n_student_iter
        for key, sv, sr in (
            ("abd", "gen/sv_k5", amort),
            ("abd_tuned", "gen/sv_k1", "student/sr_tuned"),
        ):
            if sv in g:
                extra = (g[sv] - g["gen/vanilla"]) + f * n * (s[sr] - s["student/vanilla"])
                r[f"run/{key} / run/vanilla (projected {PAPER_ZSKT_ITERS} iters)"] = (
                    it_v + extra
                ) / it_v
                r[f"run/{key} / run/vanilla (projected, SR share only)"] = (
                    it_v + f * n * (s[sr] - s["student/vanilla"])
                ) / it_v
    return r


def amortized_key(cfg: dict[str, Any]) -> str:
    """``student/sr amortized over n steps per batch`` for this config's n."""
    n = cfg["student_step"]["derived"]["steps_per_batch"]
    return f"student/sr amortized over {n} steps per batch"


def to_markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        f"# ABD overhead benchmark ({m['device']})",
        "",
        f"- device: {m['device_name']}",
        f"- torch {m['torch']}, Python {m['python']}",
        f"- date: {m['date']}",
        f"- command: `{m['command']}`",
        f"- load average (1/5/15 min) at start {m.get('load_average_at_start')}, "
        f"at end {m.get('load_average_at_end')}",
        f"- warm-up {m['args']['warmup']}, repeats {m['args']['repeats']} (student/SR cases: "
        f"{m['student_repeats']}), whole runs {m['args']['run_iters']} pseudo batches x "
        f"{m['args']['run_repeats']}, SR window = last {100 * m['args']['sr_fraction']:.2f} % "
        "of student steps",
        "- official code: "
        + (
            f"`{m['official']['root']}`; "
            f"run-time rewrites: {'; '.join(m['official']['patches']) or 'none'}; "
            f"stubs: {', '.join(m['official']['stubs']) or 'none'}"
            if m.get("official")
            else "not loaded (pass --reference PATH)"
        ),
        "",
    ]
    for cfg in report["configs"]:
        lines += [
            f"## {cfg['teacher']} -> {cfg['student']}, {cfg['img']}x{cfg['img']}, "
            f"batch {cfg['batch']}",
            "",
            "| case | median (ms) | min (ms) | peak extra memory (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for part in ("generator_step", "student_step", "whole_run"):
            for k, v in cfg.get(part, {}).get("cases", {}).items():
                peak = "" if v.get("peak_mib") is None else f"{v['peak_mib']:.1f}"
                lines.append(
                    f"| {k} | {1000 * v['median_s']:.1f} | {1000 * v['min_s']:.1f} | {peak} |"
                )
            if part == "student_step":
                for k, v in cfg[part].get("derived", {}).items():
                    if k != "steps_per_batch":
                        lines.append(f"| {k} (derived from medians) | {1000 * v:.1f} | | |")
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in cfg["ratios"].items()]
        sv = cfg["generator_step"].get("sv", {})
        if sv:
            lines += [
                "",
                "Shared trunk (``guard.sv.ensemble.trunk_module``): "
                + "; ".join(
                    f"{k}: `{v['trunk_module']}` (shuffled {len(v['shuffled_layers'])}: "
                    f"{', '.join(v['shuffled_layers'])})"
                    for k, v in sv.items()
                ),
            ]
        if "whole_run" in cfg:
            rr = cfg["whole_run"]
            lines += [
                "",
                f"Whole run: {rr['iters']} pseudo batches = {rr['student_steps']} student steps; "
                "SR from step "
                f"{rr['sr_start_step']} ({rr['sr_steps']} SR steps). The default guard's "
                f"one-off audit of this teacher: {rr.get('audit_seconds', float('nan')):.2f}s "
                "(not in run/eraser, which arms the eraser from the first batch).",
            ]
        lines.append("")
    lines += ["## Targets", "", "| target | limit | measured | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        val = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['name']} | <= {t['limit']} | {val} | {met} |")
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cfg in report["configs"]:
        tag = f"{cfg['teacher']}->{cfg['student']} b{cfg['batch']}"
        r = cfg["ratios"]
        amort = amortized_key(cfg)
        n = cfg["student_step"]["derived"]["steps_per_batch"]
        for key, limit, name in (
            (
                "gen/sv_k5 / gen/vanilla",
                TARGETS["sv_gen_step"],
                "SV generator step (k=5) / vanilla",
            ),
            (
                "gen/sv_k1 / gen/vanilla",
                TARGETS["sv_gen_step"],
                "SV generator step (k=1) / vanilla",
            ),
            (
                "student/sr / student/official_sr",
                TARGETS["sr_vs_official"],
                "SR student step, new batch (first step of a pseudo batch) / official SR step",
            ),
            (
                f"{amort} / student/official_sr",
                TARGETS["sr_vs_official"],
                f"SR student step amortized over {n} steps per batch (perturbation cache) / "
                "official SR step",
            ),
            (
                "student/sr_tuned / student/official_sr",
                TARGETS["sr_vs_official"],
                "SR tuned step / official SR step",
            ),
            (
                "run/abd / run/vanilla (measured)",
                TARGETS["whole_run"],
                "whole run ABD (k=5, SR 10 rounds) / vanilla, measured",
            ),
            (
                f"run/abd / run/vanilla (projected {PAPER_ZSKT_ITERS} iters)",
                TARGETS["whole_run"],
                "whole run ABD / vanilla, projected",
            ),
            (
                "run/abd_tuned / run/vanilla (measured)",
                TARGETS["whole_run"],
                "whole run ABD tuned (k=1, SR warm 5 rounds) / vanilla, measured",
            ),
            (
                "run/eraser / run/vanilla (measured)",
                TARGETS["eraser_run"],
                "whole run, default guard's trigger eraser / vanilla, measured (audit apart)",
            ),
            (
                f"run/abd_tuned / run/vanilla (projected {PAPER_ZSKT_ITERS} iters)",
                TARGETS["whole_run"],
                "whole run ABD tuned / vanilla, projected",
            ),
        ):
            val = r.get(key)
            out.append({"name": f"{name} [{tag}]", "limit": limit, "value": val,
                        "met": None if val is None else bool(val <= limit)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tiny", action="store_true", help="smoke mode: tiny CNNs, 16x16, batch 8, one repeat"
    )
    p.add_argument(
        "--reference", default=None, help="checkout of illidanlab/ABD: time its SV and SR too"
    )
    p.add_argument(
        "--pairs",
        default=None,
        help="comma list teacher-student[@b1+b2] "
        "(e.g. wrn16_2-wrn16_1@128+256,resnet34-resnet18@128)",
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--run-iters", type=int, default=None, help="pseudo batches per whole run (0: skip)"
    )
    p.add_argument("--run-repeats", type=int, default=None)
    p.add_argument(
        "--n-student-iter", type=int, default=10, help="student steps per pseudo batch (ZSKT: 10)"
    )
    p.add_argument(
        "--sr-fraction", type=float, default=0.005, help="SR window: last fraction of student steps"
    )
    p.add_argument("--sv-layers", default="1,5", help="shuffle depths k timed for SV")
    p.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); tiny: 1"
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default=None, help="file name stem (default <device>-<date>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is None and args.tiny:
        args.threads = 1  # a smoke run on a shared CI box: do not oversubscribe
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gpu = device.type == "cuda"
    defaults = (dict(warmup=1, repeats=1, run_iters=1, run_repeats=1) if args.tiny else
                dict(warmup=3, repeats=9, run_iters=200, run_repeats=2) if gpu else
                dict(warmup=1, repeats=5, run_iters=20, run_repeats=1))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.sr_amortize_steps = args.n_student_iter  # ZSKT's pseudo batch, also in --tiny
    if args.tiny:
        args.n_student_iter = min(args.n_student_iter, 2)
    args.sv_layers = [int(k) for k in str(args.sv_layers).split(",") if k]

    pairs = TINY_PAIRS if args.tiny else FULL_PAIRS if gpu else CPU_PAIRS
    if args.pairs:
        pairs = []
        for item in args.pairs.split(","):
            names, _, b = item.partition("@")
            t, s = names.split("-")
            pairs.append((t, s, 32, [int(b) for b in b.split("+")] if b else [128]))

    official = None
    if args.reference:
        from official import load_official

        official = load_official(args.reference, device)

    date = _dt.datetime.now(_dt.timezone.utc)
    report: dict[str, Any] = {
        "meta": {
            "device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": date.isoformat(timespec="seconds"),
            "load_average_at_start": _loadavg(),
            "command": " ".join(
                ["python", "benchmarks/bench_overhead.py"]
                + (argv if argv is not None else sys.argv[1:])
            ),
            "args": {k: v for k, v in vars(args).items()},
            "student_repeats": args.repeats if args.tiny else max(2, args.repeats // 2),
            "official": None
            if official is None
            else {"root": str(official.root), "patches": official.patches, "stubs": official.stubs},
            "notes": [
                "teacher frozen (requires_grad False), eval mode; student and generator train mode",
                "student step = no-grad teacher forward + KD (KL, T=1) forward/backward + clip 5 "
                "+ Adam",
                "student/sr, student/sr_tuned, student/official_sr: a new random batch per call "
                "(SR's perturbation cache misses); student/sr_repeat: one batch (hits after a "
                "priming call)",
                "CPU peak memory: torch.profiler allocator events (tensors only)",
            ],
        },
        "configs": [],
    }

    for teacher, student, img, batches in pairs:
        for batch in batches:
            pair = Pair(teacher, student, img, batch, device, args.n_student_iter)
            cfg: dict[str, Any] = {
                "teacher": teacher,
                "student": student,
                "img": img,
                "batch": batch,
            }
            # results live under "generator_step", "student_step", "whole_run"
            print(f"[bench] {teacher} -> {student} {img}x{img} batch {batch}", flush=True)
            cfg["generator_step"] = bench_generator(pair, args, official)
            cfg["student_step"] = bench_student(pair, args, official)
            if args.run_iters > 0 and (
                args.tiny or gpu or teacher.startswith("wrn") and batch == min(batches)
            ):
                cfg["whole_run"] = bench_run(pair, args)
            cfg["ratios"] = ratios(cfg, pair, args)
            for k, v in cfg["ratios"].items():
                print(f"    {k}: {v:.3f}", flush=True)
            report["configs"].append(cfg)
            del pair
            if gpu:
                torch.cuda.empty_cache()
    report["targets"] = targets(report)
    report["meta"]["load_average_at_end"] = _loadavg()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"{device.type}-{date.strftime('%Y-%m-%d')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(report))
    print(f"[bench] wrote {out / (stem + '.json')} and {out / (stem + '.md')}", flush=True)
    return report


if __name__ == "__main__":
    main()
