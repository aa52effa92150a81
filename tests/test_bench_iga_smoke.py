"""The KDIGA cost benchmark runs and writes its files (timings are never asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_iga_cost_run_writes_json_and_markdown(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_iga.py"), "--device", "cpu", "--tiny",
         "--out", str(tmp_path), "--tag", "smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    cfg = report["configs"][0]
    assert {"student/vanilla", "student/iga", "student/iga_repeat", "student/iga_fgsm"} <= set(
        cfg["times_s"])
    assert all(r > 0 for r in cfg["ratios"].values())
    assert "KDIGA" in (tmp_path / "smoke.md").read_text()
