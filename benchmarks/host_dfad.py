"""A defended run through DFAD's own MNIST training script (``DFAD_mnist.py`` of
VainF/Data-Free-Adversarial-Distillation at the commit ``abd_plugin.integrations.dfad`` supports).

Nothing of the host is copied: the launcher imports ``DFAD_mnist`` from the checkout you pass and
runs the host's own ``main()`` (its argument parser, models, generator, optimizers, ``train`` and
``test``), once as it is ("none") and once inside ``abd.patch(DFAD_mnist)`` with no settings
("default": the bare default guard). At run time, by name, and undone after each run:

- ``DFAD_mnist.get_dataloader`` (the host's loaders download MNIST) returns loaders over the kit's
  offline digits (``load_dataset("mnist5k", ...)``: 4 000 / 1 000 real MNIST digits, 28x28
  zero-padded to 32x32), normalised with the host's MNIST mean/std (0.1307, 0.3081): the host's
  LeNet-5 takes 32x32 inputs in those units. (The host resizes 28 -> 32; the kit pads, as the
  teacher was trained.) DFAD is data-free: only the host's per-epoch ``test`` reads them;
- ``DFAD_mnist.train`` and ``DFAD_mnist.test`` are wrapped to keep the student the host trained
  and to score it after every epoch with the kit's ACC/ASR metrics (triggers stamped in [0, 1]
  image space, then normalised).

The teacher is a kit-poisoned LeNet-5 (``abd_plugin.kit.poison.train_teacher``, cached). The
kit's LeNet-5 and the host's ``network.lenet.LeNet5`` have the same layers in the same order
(conv 1->6, 6->16, 16->120 at 5x5, fc 120->84->10; the kit names them ``features.*`` and
``classifier.*``, the host ``conv1..3``, ``fc1..2``): the state_dict is mapped in order, shapes
checked, and the host's input normalisation is folded into the first convolution (exact, it has
no padding). The mapped file is what the host's own ``--ckpt`` loads; the launcher checks that the
host's LeNet-5 on normalised digits gives the kit teacher's logits.

Usage (single-threaded; about 15 minutes per run with the default budget on a shared CPU core)::

    git clone https://github.com/VainF/Data-Free-Adversarial-Distillation /path/to/dfad
    git -C /path/to/dfad checkout c161591aae4c13e53943dcb61c162876421aad7a
    python benchmarks/host_dfad.py --host /path/to/dfad --seeds 0,1,2 --out runs/host-dfad

The host's budget is reduced with its own flags (default: ``--batch_size 64 --epochs 4
--epoch_itrs 50`` = 200 generator steps and 1 000 student steps, instead of 512 / 40 / 50);
``--host-arg`` passes any other host flag. Rows go to ``OUT/rows.jsonl`` (the run resumes),
the table to ``OUT/table.md``, the host's own files (``checkpoint/``, ``log/``) and the guard's
report to ``OUT/runs/<defense>-s<seed>/``. ``visdom`` and ``torchvision.models.utils`` (imported
by host modules that the MNIST script does not use) are stubbed when missing.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from abd_plugin.eraser import EraserReport
from abd_plugin.integrations import dfad as abd
from abd_plugin.kit.datasets import load_dataset
from abd_plugin.kit.metrics import accuracy, attack_success_rate
from abd_plugin.kit.poison import TeacherSpec, train_teacher
from abd_plugin.kit.triggers import get_trigger

#: the normalisation of the host's MNIST loaders (``dataloader.get_dataloader``)
HOST_MEAN, HOST_STD = (0.1307,), (0.3081,)
HOST_SCRIPT = "DFAD_mnist"
DEFENSES = ("none", "default")
#: the host's budget flags the launcher sets (the host's defaults: 512 / 40 / 50)
BUDGET = {"batch_size": 64, "epochs": 4, "epoch_itrs": 50}


# ---------------------------------------------------------------------- the host checkout
def _stub_visdom() -> types.ModuleType:
    mod = types.ModuleType("visdom")

    class Visdom:  # DFAD_mnist never builds one; a host module imports the name
        def __init__(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("visdom is stubbed by benchmarks/host_dfad.py")

    mod.Visdom = Visdom  # type: ignore[attr-defined]
    return mod


def _stub_tv_utils() -> types.ModuleType:
    # torchvision >= 0.13 moved ``torchvision.models.utils.load_state_dict_from_url`` to torch.hub
    mod = types.ModuleType("torchvision.models.utils")
    mod.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
    return mod


@contextlib.contextmanager
def host_script(root: str | os.PathLike, name: str = HOST_SCRIPT) -> Iterator[Any]:
    """Import the host's ``name`` module from ``root`` (first on ``sys.path``), stubbing the
    missing imports it does not use; afterwards forget every module loaded from ``root``."""
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, f"{name}.py")):
        raise SystemExit(f"host_dfad: no {name}.py in {root}; pass --host <checkout of "
                         f"{abd.SUPPORTED}>")
    saved_path, saved = list(sys.path), set(sys.modules)
    stubs = {"visdom": _stub_visdom, "torchvision.models.utils": _stub_tv_utils}
    added = []
    for mod_name, make in stubs.items():
        try:
            __import__(mod_name)
        except ImportError:
            sys.modules[mod_name] = make()
            added.append(mod_name)
    sys.path.insert(0, root)
    try:
        yield __import__(name)
    finally:
        sys.path[:] = saved_path
        for mod_name in list(sys.modules):
            if mod_name in saved:
                continue
            f = getattr(sys.modules[mod_name], "__file__", None) or ""
            if mod_name in added or os.path.abspath(f).startswith(root + os.sep):
                del sys.modules[mod_name]


def host_commit(root: str | os.PathLike) -> str | None:
    """The checkout's HEAD commit, or None when ``root`` is not the top of a git checkout (an
    archive inside another repository must not report that repository's commit)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2:
        return None
    top, head = lines
    return head if os.path.realpath(top) == os.path.realpath(root) else None


# ---------------------------------------------------------------------- the teacher
class Normalized(nn.Module):
    """``model`` fed host-normalised inputs, taking [0, 1] images (for the kit's metrics)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...] = HOST_MEAN,
                 std: tuple[float, ...] = HOST_STD) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Any:
        return self.model((x - self.mean) / self.std)


def host_state_dict(kit_model: nn.Module, host_model: nn.Module,
                    mean: tuple[float, ...] = HOST_MEAN,
                    std: tuple[float, ...] = HOST_STD) -> dict[str, Tensor]:
    """The kit model's weights under the host model's state_dict keys (matched in order, shapes
    checked), with ``x -> (x - mean) / std`` folded into the first convolution: the host model
    on normalised inputs computes what the kit model computes on [0, 1] inputs."""
    kit_sd, host_sd = kit_model.state_dict(), host_model.state_dict()
    if len(kit_sd) != len(host_sd):
        raise ValueError(f"the kit model has {len(kit_sd)} tensors, the host model "
                         f"{len(host_sd)}: not the same architecture")
    out: dict[str, Tensor] = {}
    for (kk, kv), (hk, hv) in zip(kit_sd.items(), host_sd.items(), strict=True):
        if kv.shape != hv.shape:
            raise ValueError(f"kit {kk} {tuple(kv.shape)} does not fit host {hk} "
                             f"{tuple(hv.shape)}: not the same architecture")
        out[hk] = kv.detach().clone()
    first = next((m for m in kit_model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.padding != (0, 0):
        raise ValueError("the first layer is not an unpadded convolution: the normalisation "
                         "cannot be folded into it")
    keys = list(host_sd)
    i = next(i for i, v in enumerate(kit_sd.values()) if v.dim() == 4)  # first conv's weight
    wkey, bkey = keys[i], keys[i + 1] if i + 1 < len(keys) else ""
    if not bkey.endswith("bias") or out[bkey].shape != out[wkey].shape[:1]:
        raise ValueError(f"the first convolution ({wkey}) has no bias to fold the mean into")
    w = out[wkey]
    m = torch.tensor(mean, dtype=w.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=w.dtype).view(1, -1, 1, 1)
    # conv(x) = W * (s * xn + m) + b = (s W) * xn + (b + sum W m)
    out[bkey] = out[bkey] + (w * m).sum(dim=(1, 2, 3))
    out[wkey] = w * s
    return out


# ---------------------------------------------------------------------- one run
def _offline_dataloader(mean: tuple[float, ...], std: tuple[float, ...]
                        ) -> Callable[[Any], tuple[DataLoader, DataLoader]]:
    """A stand-in for the host's ``get_dataloader(args)``: the kit's offline MNIST digits,
    normalised as the host's loaders normalise (shuffled, ``args.batch_size``, as the host)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def get_dataloader(args: Any) -> tuple[DataLoader, DataLoader]:
        loaders = []
        for split in ("train", "test"):
            x, y = load_dataset("mnist5k", split).tensors
            loaders.append(DataLoader(TensorDataset((x - m) / s, y),
                                      batch_size=args.batch_size, shuffle=True))
        return loaders[0], loaders[1]

    return get_dataloader


class _Patches:
    """setattr on module attributes, undone in reverse order by :meth:`undo`."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._undo:
            owner, name, old = self._undo.pop()
            setattr(owner, name, old)


def _bound(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
           ) -> dict[str, Any]:
    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


def run_host(host: Any, host_argv: list[str], defense: str, run_dir: Path, *,
             x_test: Tensor, y_test: Tensor, trigger: Any, target: int,
             mean: tuple[float, ...] = HOST_MEAN, std: tuple[float, ...] = HOST_STD
             ) -> dict[str, Any]:
    """Run the host's ``main()`` once with ``host_argv`` (in ``run_dir``), vanilla or inside
    ``abd.patch(host)`` with no settings; return the final student's ACC/ASR, the per-epoch
    history and the guard's report."""
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, got {defense!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    patches = _Patches()
    orig_train, orig_test = host.train, host.test

    @functools.wraps(orig_train)
    def train(*args: Any, **kwargs: Any) -> Any:
        seen["student"] = _bound(orig_train, args, kwargs)["student"]
        return orig_train(*args, **kwargs)

    @functools.wraps(orig_test)
    def test(*args: Any, **kwargs: Any) -> Any:
        host_acc = orig_test(*args, **kwargs)
        a = _bound(orig_test, args, kwargs)
        s = Normalized(a["student"], mean, std).eval()
        history.append({"epoch": int(a.get("epoch", 0)), "host_acc": 100.0 * float(host_acc),
                        "acc": accuracy(s, x_test, y_test),
                        "asr": attack_success_rate(s, x_test, y_test, trigger, target)})
        return host_acc

    saved_argv, saved_cwd = list(sys.argv), os.getcwd()
    report, fill = None, None
    t0 = time.perf_counter()
    try:
        patches.set(host, "get_dataloader", _offline_dataloader(mean, std))
        patches.set(host, "train", train)
        patches.set(host, "test", test)
        sys.argv = [f"{HOST_SCRIPT}.py", *host_argv]
        os.chdir(run_dir)
        if defense == "default":
            with abd.patch(host) as handle:  # no settings: the bare default guard
                host.main()
            report = handle.guard.report()
            er_hook = handle.guard.eraser
            fill = None if er_hook is None else er_hook.repair.fill
        else:
            host.main()
    finally:
        seconds = time.perf_counter() - t0
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        patches.undo()
    if "student" not in seen:
        raise RuntimeError("the host's main() never called train(): nothing was distilled")
    student = Normalized(seen["student"], mean, std).eval()
    row: dict[str, Any] = {
        "defense": defense, "host_argv": host_argv, "seconds": seconds,
        "acc": accuracy(student, x_test, y_test),
        "asr": attack_success_rate(student, x_test, y_test, trigger, target),
        "history": history,
    }
    if report is not None:
        (run_dir / "guard_report.txt").write_text(str(report) + "\n")
        row["report"] = str(report)
        a, er = report.audit, report.get(EraserReport)
        audit = None if a is None else a.audit
        row.update(
            audit_verdict="off" if a is None else a.state,
            audit_target=None if audit is None else audit.target,
            audit_p_value=None if audit is None else audit.p_value,
            audit_seconds=None if audit is None else audit.seconds,
            audit_input_range=None if audit is None else audit.input_range,  # from the domain
            student_steps=report.student_steps)
        if er is not None:
            row.update(erase_status=er.status, erase_reason=er.reason, erase_target=er.target,
                       erase_pixels=er.pixels, erase_fraction=er.fraction,
                       erase_updates=er.updates, erase_flip=er.flip, erase_keep=er.kept,
                       erase_price=er.price, erase_seconds=er.seconds,
                       erase_rechecks=len(er.rechecks))
        row["erase_fill"] = None if fill is None else torch.as_tensor(fill).flatten().tolist()
    return row


# ---------------------------------------------------------------------- the grid
def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _eraser(r: dict[str, Any]) -> str:
    if r.get("erase_status") != "on":
        return f"{r.get('erase_status', '-')}"
    rech = f", {r['erase_rechecks']} re-audit(s), price {r['erase_price']:g}"
    return (f"on for {r['erase_target']}: {r['erase_pixels']} px ({100 * r['erase_fraction']:.1f}"
            f" %), {r['erase_updates']} updates{rech}")


def write_table(rows: list[dict[str, Any]], path: Path) -> str:
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["defense"]): r for r in rows}
    lines = ["| seed | teacher ACC / ASR | vanilla ACC / ASR | defended ACC / ASR | audit "
             "(verdict -> target, p) | eraser | wall s (vanilla / defended) |",
             "|---|---|---|---|---|---|---|"]

    def pair(r: dict[str, Any] | None) -> str:
        return "-" if r is None else f"{r['acc']:.1f} / {r['asr']:.1f}"

    for s in seeds:
        v, d = by.get((s, "none")), by.get((s, "default"))
        t = v or d
        assert t is not None
        audit = "-" if d is None else (f"{d['audit_verdict']} -> {d['audit_target']}, "
                                       f"p {d['audit_p_value']:.2g}")
        wall = " / ".join("-" if r is None else f"{r['seconds']:.0f}" for r in (v, d))
        lines.append(f"| {s} | {t['teacher_acc']:.1f} / {t['teacher_asr']:.1f} | {pair(v)} "
                     f"| {pair(d)} | {audit} | {'-' if d is None else _eraser(d)} | {wall} |")
    if len(seeds) > 1:
        cells = []
        for key in ("none", "default"):
            rs = [by[(s, key)] for s in seeds if (s, key) in by]
            cells.append("-" if not rs else
                         f"{_ms([r['acc'] for r in rs])} / {_ms([r['asr'] for r in rs])}")
        ts = [by.get((s, "none")) or by[(s, "default")] for s in seeds]
        walls = " / ".join(_ms([r["seconds"] for r in rows if r["defense"] == k]) if any(
            r["defense"] == k for r in rows) else "-" for k in ("none", "default"))
        lines.append(f"| mean ± std | {_ms([t['teacher_acc'] for t in ts])} / "
                     f"{_ms([t['teacher_asr'] for t in ts])} | {cells[0]} | {cells[1]} | | "
                     f"| {walls} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", required=True,
                   help=f"checkout of {abd.SUPPORTED} (the folder with DFAD_mnist.py)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated host --seed values")
    p.add_argument("--out", default="runs/host-dfad", help="output folder")
    p.add_argument("--trigger", default="badnet_grid", help="kit trigger of the teacher")
    p.add_argument("--teacher-seed", type=int, default=0, help="training seed of the teacher")
    p.add_argument("--defenses", default="none,default",
                   help="comma-separated: none (the host as it is), default (abd.patch())")
    p.add_argument("--batch-size", type=int, default=BUDGET["batch_size"],
                   help="host --batch_size (host default 512)")
    p.add_argument("--epochs", type=int, default=BUDGET["epochs"],
                   help="host --epochs (host default 40)")
    p.add_argument("--epoch-itrs", type=int, default=BUDGET["epoch_itrs"],
                   help="host --epoch_itrs, generator steps per epoch (host default 50)")
    p.add_argument("--host-arg", action="append", default=[],
                   help="one more host flag, passed as it is (repeat; e.g. --host-arg=--lr_S=0.1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = p.parse_args(argv)
    defenses = [d.strip() for d in a.defenses.split(",") if d.strip()]
    bad = [d for d in defenses if d not in DEFENSES]
    if bad:
        p.error(f"--defenses: unknown {bad}; known: {', '.join(DEFENSES)}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    torch.set_num_threads(a.threads)
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    host_root = Path(a.host).absolute()
    commit = host_commit(host_root)
    supported = abd.SUPPORTED.split("@")[1]
    if commit is not None and commit != supported:
        print(f"host_dfad: WARNING: {host_root} is at {commit}, the adapter supports {supported}",
              file=sys.stderr)

    spec = TeacherSpec(dataset="mnist5k", arch="lenet5", trigger=a.trigger, seed=a.teacher_seed)
    kit_teacher, meta = train_teacher(spec, progress=lambda m: print(m, file=sys.stderr))
    kit_teacher.eval()
    trigger = get_trigger(a.trigger, seed=spec.seed)
    x_test, y_test = load_dataset("mnist5k", "test").tensors

    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["seed"], r["defense"]) for r in rows}
    with host_script(host_root) as host:
        ckpt = out / f"teacher-{a.trigger}-s{a.teacher_seed}-host-lenet5.pt"
        host_teacher = host.network.lenet.LeNet5()
        host_teacher.load_state_dict(host_state_dict(kit_teacher, host_teacher))
        torch.save(host_teacher.state_dict(), ckpt)
        wrapped = Normalized(host_teacher.eval()).eval()
        with torch.no_grad():
            fold_err = float((wrapped(x_test) - kit_teacher(x_test)).abs().max())
        if fold_err > 1e-3:
            raise SystemExit(f"host_dfad: the mapped teacher differs from the kit's by {fold_err}")
        t_acc = accuracy(wrapped, x_test, y_test)
        t_asr = attack_success_rate(wrapped, x_test, y_test, trigger, spec.target)
        print(f"teacher ({a.trigger}, kit seed {a.teacher_seed}) in the host's LeNet5: ACC "
              f"{t_acc:.1f} ASR {t_asr:.1f} (max |logit diff| vs the kit's {fold_err:.1e})",
              flush=True)
        for seed in seeds:
            for defense in defenses:
                if (seed, defense) in done:
                    continue
                host_argv = ["--batch_size", str(a.batch_size), "--epochs", str(a.epochs),
                             "--epoch_itrs", str(a.epoch_itrs), "--seed", str(seed),
                             "--ckpt", str(ckpt), "--no-cuda", *a.host_arg]
                row = run_host(host, host_argv, defense, out / "runs" / f"{defense}-s{seed}",
                               x_test=x_test, y_test=y_test, trigger=trigger,
                               target=spec.target)
                row.update(seed=seed, trigger=a.trigger, teacher_seed=a.teacher_seed,
                           teacher_acc=t_acc, teacher_asr=t_asr, fold_max_abs_diff=fold_err,
                           host=str(host_root), host_commit=commit, torch=torch.__version__,
                           threads=a.threads)
                print(f"seed {seed} {defense}: ACC {row['acc']:.1f} ASR {row['asr']:.1f} "
                      f"({row['seconds']:.0f}s)" + (f"; audit {row['audit_verdict']} -> "
                      f"{row['audit_target']}" if defense == "default" else ""), flush=True)
                rows.append(row)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(write_table(rows, out / "table.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
