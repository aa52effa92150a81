"""The benchmark suite runs and writes its files (timings are never asserted)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_overhead.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check_outputs(out: Path, stem: str) -> dict:
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    assert js.is_file() and md.is_file()
    report = json.loads(js.read_text())
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["date"]
    cfg = report["configs"][0]
    for part in ("generator_step", "student_step", "whole_run"):
        assert cfg[part]["cases"], part
    assert "gen/vanilla" in cfg["generator_step"]["cases"]
    assert "student/sr" in cfg["student_step"]["cases"]
    assert cfg["student_step"]["sr_steps"]["student/sr"] > 0  # SR really ran in the guard
    # new batches per call for student/sr; one batch, hence SR's perturbation cache, for sr_repeat
    assert "student/sr_repeat" in cfg["student_step"]["cases"]
    assert cfg["student_step"]["sr_repeat_cached"] is True
    derived = cfg["student_step"]["derived"]
    n = derived["steps_per_batch"]
    assert n == 10  # ZSKT's student steps per pseudo batch, also in --tiny
    assert derived[f"student/sr amortized over {n} steps per batch"] > 0
    assert report["targets"]
    assert "# ABD overhead benchmark" in md.read_text()
    return report


def test_tiny_cpu_run_writes_json_and_markdown(tmp_path: Path) -> None:
    proc = _run("--device", "cpu", "--tiny", "--out", str(tmp_path), "--tag", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(tmp_path, "smoke")


def _fake_checkout(root: Path) -> None:
    """Files shaped like illidanlab/ABD's (same paths, same hard-coded 'cuda'), tiny bodies."""
    files = {
        "cmi/utils/utils.py": """
            import matplotlib.pyplot as plt
            def sigmoid(x):
                return x
            class PseudoDatapool(list):
                def add_batch(self, x, y):
                    self.append((x, y))
        """,
        "cmi/utils/hypergrad.py": """
            def fixed_point(*a, **k):
                return 'fixed_point'
        """,
        "cmi/datafree/synthesis/syn_vaccine.py": """
            import torch
            from sklearn.metrics import accuracy_score, roc_auc_score
            from utils.utils import sigmoid, PseudoDatapool
            class BackdoorSuspectLoss:
                def __init__(self, model, device='cuda'):
                    self.device = device
        """,
        "cmi/datafree/unlearn.py": """
            import torch
            import utils.hypergrad as hg
            class UnlearnOptimizer:
                def where(self, x):
                    return torch.zeros_like(x, device='cuda'), x.cuda(), hg.fixed_point()
        """,
    }
    for rel, body in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(body))


def test_official_loader_rewrites_cuda_and_restores_modules(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from official import load_official
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    _fake_checkout(tmp_path)
    before = {n: sys.modules.get(n) for n in ("utils", "utils.utils", "utils.hypergrad")}
    off = load_official(str(tmp_path / "cmi"), torch.device("cpu"))  # the cmi/ folder works too
    assert {n: sys.modules.get(n) for n in before} == before
    assert off.BackdoorSuspectLoss(None).device == torch.device("cpu")
    z, moved, fp = off.UnlearnOptimizer().where(torch.ones(2))
    assert z.device.type == moved.device.type == "cpu" and fp == "fixed_point"
    assert any("unlearn.py" in p and ".cuda()" in p for p in off.patches)
    with pytest.raises(FileNotFoundError, match="illidanlab/ABD"):
        load_official(str(tmp_path / "cmi" / "datafree"), torch.device("cpu"))


@pytest.mark.skipif(
    not os.environ.get("ABD_REFERENCE"), reason="set ABD_REFERENCE=<checkout of illidanlab/ABD>"
)
def test_tiny_run_with_the_official_code(tmp_path: Path) -> None:
    proc = _run("--device", "cpu", "--tiny", "--reference", os.environ["ABD_REFERENCE"],
                "--out", str(tmp_path), "--tag", "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _check_outputs(tmp_path, "ref")
    cases = report["configs"][0]
    assert "student/official_sr" in cases["student_step"]["cases"]
    assert "gen/official_sv_k5" in cases["generator_step"]["cases"]


@pytest.mark.slow
def test_the_new_user_loop_runs_the_bare_guard_and_writes_its_table(tmp_path):
    """benchmarks/new_user_loop.py (the held-out loop): a tiny run writes one row per guard
    setting; the guarded row carries the guard's report, with the audit's verdict."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import new_user_loop
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    torch_threads = torch.get_num_threads()
    try:
        new_user_loop.main(["--trigger", "l0_inv", "--seeds", "0", "--iterations", "3",
                            "--batch", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(torch_threads)
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["guard"] for r in rows] == [False, True]
    assert rows[0]["report"] is None and "Teacher audit" in rows[1]["report"]
    assert all(0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100 for r in rows)
    assert "| l0_inv | default | 1 |" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_the_new_user_loop_has_a_colour_setting_normalised_outside_the_model(tmp_path,
                                                                             monkeypatch):
    """``--setting tinted32``: the bare ResNet-8 teacher takes the loop's normalised tensor (the
    user normalises outside the model), the student takes the same; the guarded row's report
    says where the input range came from (the teacher's BatchNorm, not a guess), and ACC / ASR
    are measured on normalised test images (a one-epoch teacher keeps the test short)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import new_user_loop
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setenv("ABD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(new_user_loop, "TeacherSpec",
                        functools.partial(new_user_loop.TeacherSpec, epochs=1))
    torch_threads = torch.get_num_threads()
    try:
        new_user_loop.main(["--setting", "tinted32", "--trigger", "none", "--seeds", "0",
                            "--iterations", "2", "--batch", "16", "--out", str(tmp_path / "o")])
    finally:
        torch.set_num_threads(torch_threads)
    rows = [json.loads(x) for x in (tmp_path / "o" / "rows.jsonl").read_text().splitlines()]
    assert [r["guard"] for r in rows] == [False, True]
    assert all(r["setting"] == "tinted32" for r in rows)
    assert rows[0]["teacher_acc"] > 50  # the normalised test images reach the teacher right
    domain = next(line for line in rows[1]["report"].splitlines() if "Input domain" in line)
    assert "first BatchNorm" in domain, domain
    assert all(0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100 for r in rows)
