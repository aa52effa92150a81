"""Command line: ``abd-plugin`` (also ``python -m abd_plugin``).

    abd-plugin demo  [--out out] [--trigger badnet_grid] [--iterations 400]
    abd-plugin bench --dataset mnist5k --method zskt,dfad --trigger badnet_grid,trojan_wm \\
                     --defense none,abd_paper,abd --seeds 0,1,2 --out runs/bench
    abd-plugin poison --trigger badnet_grid --out teacher.pt
    abd-plugin distill --method zskt --trigger badnet_grid --defense abd
    abd-plugin list
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _Bar:
    """A tqdm progress bar when tqdm is installed, a quiet counter otherwise."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def __call__(self, step: int, total: int, msg: str) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, desc=self.desc, leave=False, mininterval=1.0, file=sys.stderr
                )
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(1)
            if step % 50 == 0:
                self.bar.set_postfix_str(msg)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def cmd_list(_: argparse.Namespace) -> int:
    from abd_plugin.integrations import list_adapters

    from .bench import DEFENSES
    from .datasets import list_datasets
    from .loops import list_loops
    from .models import list_models
    from .triggers import list_triggers

    for name, items in [
        ("datasets", list_datasets()),
        ("triggers", list_triggers()),
        ("models", list_models()),
        ("methods", list_loops()),
        ("defenses", sorted(DEFENSES)),
        ("adapters", list_adapters()),
    ]:
        print(f"{name}: {', '.join(items)}")
    return 0


def cmd_poison(args: argparse.Namespace) -> int:
    from .poison import TeacherSpec, train_teacher

    spec = TeacherSpec(
        dataset=args.dataset,
        arch=args.arch,
        trigger=None if args.trigger == "none" else args.trigger,
        target=args.target,
        poison_ratio=args.ratio,
        epochs=args.epochs,
        seed=args.seed,
    )
    model, meta = train_teacher(spec, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps({k: v for k, v in meta.items() if k != "spec"}))
    if args.out:
        torch.save(model.state_dict(), args.out)
        print(f"saved state_dict to {args.out} (load it with abd_plugin.load_teacher)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from abd_plugin import ABDConfig

    from .bench import Cell, run_cell

    abd = None
    if args.abd:  # an explicit configuration, e.g. '{"sr": false, "shuffle_layers": 1}'
        fields: dict[str, Any] = json.loads(args.abd)
        kw: dict[str, Any] = {k: tuple(v) if k == "sv_coef_bounds" else v
                              for k, v in fields.items()}
        abd = ABDConfig(**kw)
    name = "custom" if abd is not None else args.defense
    cell = Cell(
        args.dataset, args.method, args.trigger, name, args.seed, args.arch, args.iterations
    )
    bar = _Bar(f"{args.method}/{name}")
    row = run_cell(cell, progress=bar, abd=abd)
    bar.close()
    print(json.dumps({k: v for k, v in row.items() if k != "history"}, indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import grid, run_bench

    cells = grid(args.dataset, _csv(args.method), _csv(args.trigger), _csv(args.defense),
                 [int(s) for s in _csv(args.seeds)], arch=args.arch, iterations=args.iterations,
                 clean_rows=not args.no_clean_rows)
    rows = run_bench(
        cells,
        Path(args.out),
        progress_factory=lambda c: _Bar(f"{c.method}/{c.trigger}/{c.defense}/s{c.seed}"),
    )
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/results.csv, results.json, table.md, plot.png")
    return 0 if rows else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Poison a teacher on real MNIST, distill it data-free with and without ABD, print the
    ACC/ASR table and write a plot."""
    from .bench import Cell, run_cell

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(
        1
    )  # LeNet-sized work: no gain from threads, and the numbers match the bench cells
    t0 = time.perf_counter()
    defenses = _csv(args.defense)
    rows = {}
    for d in defenses:
        cell = Cell("mnist5k", "zskt", args.trigger, d, args.seed, "lenet5", args.iterations)
        print(f"distilling with defense={d} ...", file=sys.stderr)
        bar = _Bar(f"zskt/{d}")
        rows[d] = run_cell(cell, progress=bar, eval_every=max(1, args.iterations * 5 // 8))
        bar.close()
    clean = run_cell(
        Cell("mnist5k", "clean", args.trigger, "none", args.seed, "lenet5", args.iterations)
    )
    first = rows[defenses[0]]
    lines = [
        f"ABD demo: mnist5k (real MNIST digits), LeNet-5 teacher poisoned with {args.trigger} "
        "-> target 0,",
        f"data-free ZSKT into LeNet-5-half, {args.iterations} iterations x 5 student steps, "
        f"seed {args.seed}",
        "",
        f"{'model':<34}{'ACC %':>8}{'ASR %':>8}",
        f"{'teacher (poisoned)':<34}{first['teacher_acc']:>8.1f}{first['teacher_asr']:>8.1f}",
        f"{'clean KD on real data (reference)':<34}{clean['acc']:>8.1f}{clean['asr']:>8.1f}",
    ]
    names = {"none": "data-free KD, no defense", "abd": "data-free KD + ABD (tuned)",
             "abd_paper": "data-free KD + ABD (paper recipe)"}
    for d, r in rows.items():
        lines.append(f"{names.get(d, 'data-free KD + ' + d):<34}{r['acc']:>8.1f}{r['asr']:>8.1f}")
        if "sv_status" in r:
            lines.append(f"{'':<4}SV {r['sv_status']}, shuffled {r['shuffled_layers']}, suspicious "
                         f"{r['suspicious_fraction']:.2f}; SR steps {r['sr_steps']}")
    lines.append(f"\n(total {time.perf_counter() - t0:.0f}s)")
    text = "\n".join(lines)
    print(text)
    (out / "demo.txt").write_text(text + "\n")
    (out / "demo.json").write_text(json.dumps({"clean_kd": clean, **rows}, indent=1))
    try:
        _demo_plot(rows, clean, out / "demo.png")
        print(f"wrote {out / 'demo.png'}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'abd-plugin[bench]')")
    return 0


def _demo_plot(rows: dict, clean: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["teacher", "clean KD"] + list(rows)
    first = next(iter(rows.values()))
    acc = [first["teacher_acc"], clean["acc"]] + [r["acc"] for r in rows.values()]
    asr = [first["teacher_asr"], clean["asr"]] + [r["asr"] for r in rows.values()]
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], acc, 0.4, label="ACC")
    axes[0].bar([i + 0.2 for i in x], asr, 0.4, label="ASR")
    axes[0].set_xticks(list(x))
    axes[0].set_xticklabels(names, fontsize=8)
    axes[0].set_ylim(0, 105)
    axes[0].set_ylabel("%")
    axes[0].legend()
    axes[0].set_title("final student")
    for d, r in rows.items():
        h = r.get("history") or []
        if h:
            axes[1].plot(
                [p["step"] for p in h], [p["asr"] for p in h], marker="o", label=f"ASR {d}"
            )
            axes[1].plot(
                [p["step"] for p in h], [p["acc"] for p in h], ls="--", marker=".", label=f"ACC {d}"
            )
    axes[1].set_xlabel("student steps")
    axes[1].set_ylim(0, 105)
    axes[1].legend(fontsize=7)
    axes[1].set_title("during distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="abd-plugin", description="ABD: defend data-free KD against backdoored teachers"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the README's main job (about 5-6 minutes on 2 CPU cores)")
    d.add_argument("--out", default="out")
    d.add_argument("--trigger", default="l0_inv")
    d.add_argument("--defense", default="none,abd_paper,abd")
    d.add_argument("--iterations", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dataset", default="mnist5k")
        q.add_argument("--arch", default="lenet5")
        q.add_argument("--iterations", type=int, default=400)

    b = sub.add_parser("bench", help="grid of methods x triggers x defenses x seeds (resumable)")
    common(b)
    b.add_argument("--method", default="zskt")
    b.add_argument("--trigger", default="badnet_grid")
    b.add_argument("--defense", default="none,abd_paper,abd")
    b.add_argument("--seeds", default="0")
    b.add_argument("--out", default="runs/bench")
    b.add_argument(
        "--no-clean-rows", action="store_true", help="skip clean-KD and clean-teacher rows"
    )
    b.set_defaults(fn=cmd_bench)
    po = sub.add_parser("poison", help="train (or load from cache) a poisoned teacher")
    po.add_argument("--dataset", default="mnist5k")
    po.add_argument("--arch", default="lenet5")
    po.add_argument("--trigger", default="badnet_grid")
    po.add_argument("--target", type=int, default=0)
    po.add_argument("--ratio", type=float, default=0.1)
    po.add_argument("--epochs", type=int, default=15)
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--out", default=None)
    po.set_defaults(fn=cmd_poison)
    di = sub.add_parser("distill", help="one distillation cell")
    common(di)
    di.add_argument("--method", default="zskt")
    di.add_argument("--trigger", default="badnet_grid")
    di.add_argument("--defense", default="abd")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--abd", default=None, help="ABDConfig fields as JSON (overrides --defense)")
    di.set_defaults(fn=cmd_distill)
    sub.add_parser(
        "list", help="datasets, triggers, models, methods, defenses, adapters"
    ).set_defaults(fn=cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
