"""A held-out check of the bare default guard on a loop the defaults were never tuned on.

The kit's reference loops (``abd_plugin.kit.loops``) are the ones the defaults were measured on.
This file is a DFAD-style loop written separately, the way a new user would write one, that
differs from them on purpose:

- the user's inputs live in [-1, 1] (a tanh generator); the downloaded teacher expects [0, 1],
  so the user wraps it (``InRange``) and hands the *wrapper* to the guard (the audit must infer
  the range -1..1 by itself);
- its own generator (linear + two upsampling convs with BatchNorm), its own student (a small
  three-conv CNN, not the kit's LeNet-5-half), an L1 loss on logits for both players, Adam for
  the generator and SGD with momentum and a cosine schedule for the student, batch 128;
- the guard is used with no argument at all: ``with ABDGuard(teacher, student):``.

A second setting, ``--setting tinted32``: colour digits (the kit's ``tinted32``, 3 x 32 x 32)
and the kit's ResNet-8 teacher (BatchNorm, residual blocks), which was trained on inputs
normalised ``(x - 0.5) / 0.25``. This user normalises **outside the model**: the generator makes
[-1, 1] images, the loop maps them to [0, 1] and normalises them with a ``Normalize`` of its own,
and both the bare teacher and the student take the normalised tensor (valid inputs [-2, 2]); the
guard is handed the bare teacher, so it must find the range without a ``Normalize`` to read.

Only the teacher (poisoned by the kit, cached), the test images and the ACC/ASR metrics come from
the kit. Usage (single-threaded, about a minute per run on a CPU core for the digits, several
for tinted32)::

    python benchmarks/new_user_loop.py --trigger badnet_grid,trojan_3x3 --seeds 0,1,2 \
        --out runs/new-user
    python benchmarks/new_user_loop.py --setting tinted32 --trigger none,red_square \
        --seeds 0 --out runs/new-user-tinted

Rows go to ``OUT/rows.jsonl`` (the run resumes), the summary to ``OUT/table.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDGuard
from abd_plugin.kit.datasets import dataset_info, load_dataset
from abd_plugin.kit.metrics import accuracy, attack_success_rate
from abd_plugin.kit.poison import TeacherSpec, train_teacher
from abd_plugin.kit.triggers import get_trigger


class InRange(nn.Module):
    """The downloaded teacher expects [0, 1]; this user's pipeline works in [-1, 1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x + 1) / 2)


class Generator(nn.Module):
    """[-1, 1] images: a 28 x 28 digit area padded to 32 x 32 (one channel), or a full
    32 x 32 canvas (``channels=3``, ``pad=False``)."""

    def __init__(self, nz: int = 64, channels: int = 1, pad: bool = True) -> None:
        super().__init__()
        self.side = 7 if pad else 8
        self.pad = pad
        self.fc = nn.Linear(nz, 64 * self.side * self.side)
        self.net = nn.Sequential(
            nn.BatchNorm2d(64), nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 3, padding=1),
            nn.BatchNorm2d(32), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.LeakyReLU(0.2),
            nn.Conv2d(16, channels, 3, padding=1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(self.fc(z).view(-1, 64, self.side, self.side))
        if not self.pad:
            return x
        return F.pad(x, (2, 2, 2, 2), value=-1.0)  # 28x28 digit area inside a 32x32 canvas


class Student(nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def distill(teacher: nn.Module, seed: int, *, guard: bool, iterations: int, batch: int,
            student_steps: int = 5, setting: str = "mnist"
            ) -> tuple[nn.Module, str | None, float]:
    torch.manual_seed(seed)
    gen: nn.Module
    if setting == "tinted32":
        student, gen = Student(3), _Normalized(Generator(channels=3, pad=False))
    else:
        student, gen = Student(), Generator()
    opt_s = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, iterations)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    start = time.perf_counter()

    def loop() -> None:
        for _ in range(iterations):
            student.train()
            for _ in range(student_steps):
                with torch.no_grad():
                    x = gen(torch.randn(batch, 64))
                    t = teacher(x)
                loss_s = F.l1_loss(student(x), t)
                opt_s.zero_grad()
                loss_s.backward()
                opt_s.step()
            x = gen(torch.randn(batch, 64))
            loss_g = -F.l1_loss(student(x), teacher(x))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            sched.step()

    report = None
    if guard:
        with ABDGuard(teacher, student) as g:
            loop()
        report = str(g.report())
    else:
        loop()
    return student.eval(), report, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trigger", default="badnet_grid,trojan_3x3",
                   help="comma-separated kit triggers (default: badnet_grid,trojan_3x3); "
                        "'none' = a clean teacher")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--iterations", type=int, default=300, help="generator steps (default: 300)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--out", default="runs/new-user", help="output folder (default: runs/new-user)")
    p.add_argument("--setting", default="mnist", choices=("mnist", "tinted32"),
                   help="mnist: LeNet-5 on digits, [-1, 1] inputs through a wrapper (default); "
                        "tinted32: ResNet-8 on colour digits, normalised outside the model")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["trigger"], r["seed"], r["guard"]) for r in rows}
    tinted = a.setting == "tinted32"
    dataset = "tinted32" if tinted else "mnist5k"
    norm = dataset_info(dataset).normalize
    xte, yte = load_dataset(dataset, "test").tensors
    for trig in a.trigger.split(","):
        trigger = None if trig == "none" else trig
        spec = (TeacherSpec(dataset=dataset, arch="resnet8", trigger=trigger) if tinted
                else TeacherSpec(trigger=trigger))
        base, meta = train_teacher(spec)
        # tinted32: the bare teacher takes the normalised tensor the loop makes
        teacher = base.eval() if tinted else InRange(base).eval()
        asr_trig = get_trigger("badnet_grid" if trig == "none" else trig, seed=spec.seed)
        for seed in [int(s) for s in a.seeds.split(",")]:
            for guard in (False, True):
                if (trig, seed, guard) in done:
                    continue
                student, report, secs = distill(teacher, seed, guard=guard,
                                                iterations=a.iterations, batch=a.batch,
                                                setting=a.setting)
                # the student takes what the teacher takes: [-1, 1] digits, or normalised colour
                s_in = student if tinted else nn.Sequential(_To11(), student)
                row = {"trigger": trig, "seed": seed, "guard": guard,
                       "acc": accuracy(s_in, xte, yte, normalize=norm),
                       "asr": attack_success_rate(s_in, xte, yte, asr_trig, spec.target,
                                                  normalize=norm),
                       "seconds": secs, "report": report}
                if tinted:
                    row["setting"] = a.setting
                    row["teacher_acc"], row["teacher_asr"] = meta.get("acc"), meta.get("asr")
                print(f"{trig} seed {seed} {'default guard' if guard else 'no guard'}: "
                      f"ACC {row['acc']:.1f} ASR {row['asr']:.1f} ({secs:.0f}s)", flush=True)
                rows.append(row)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    lines = ["| trigger | guard | seeds | ACC | ASR | per seed (ACC/ASR) |",
             "|---|---|---|---|---|---|"]
    for trig in dict.fromkeys(r["trigger"] for r in rows):
        for guard in (False, True):
            rs = [r for r in rows if r["trigger"] == trig and r["guard"] == guard]
            if not rs:
                continue
            ms = [_ms([r[k] for r in rs]) for k in ("acc", "asr")]
            per = ", ".join(f"{r['acc']:.1f}/{r['asr']:.1f}" for r in rs)
            lines.append(f"| {trig} | {'default' if guard else 'none'} | {len(rs)} | {ms[0]} "
                         f"| {ms[1]} | {per} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


class _Normalized(nn.Module):
    """This user's own normalisation, outside the teacher: [-1, 1] -> [0, 1] ->
    ``(x - 0.5) / 0.25`` (tinted32's statistics)."""

    def __init__(self, gen: nn.Module) -> None:
        super().__init__()
        self.gen = gen
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.gen(z) + 1) / 2 - self.mean) / self.std


class _To11(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 - 1


def _ms(v: list[float]) -> str:
    return f"{v[0]:.1f}" if len(v) == 1 else f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


if __name__ == "__main__":
    main()
