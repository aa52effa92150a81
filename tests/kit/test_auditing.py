"""The audit from the command line: one teacher file, and the table over kit teachers."""
from __future__ import annotations

import json

import torch

from abd_plugin.kit import cli
from abd_plugin.kit.poison import TeacherSpec, train_teacher


def test_audit_command_prints_the_verdict_and_writes_the_plot(tmp_path, capsys):
    torch.set_num_threads(1)
    model, _ = train_teacher(TeacherSpec(trigger="badnet_grid"))
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    assert cli.main(["audit", "--teacher", str(path), "--arch", "lenet5",
                     "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "audit: poisoned" in out and "<- suspect" in out
    rep = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert rep["verdict"] == "poisoned" and rep["suspect"] == 0
    assert (tmp_path / "out" / "audit.png").stat().st_size > 0


def test_audit_table_counts_targets_and_false_alarms(tmp_path, capsys):
    torch.set_num_threads(1)
    assert cli.main(["audit-table", "--arch", "lenet5", "--trigger", "none,badnet_grid",
                     "--seeds", "0", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "audit.md").read_text()
    assert "suspect = true target: 1" in md and "Clean teachers: 1; called poisoned: 0" in md
    rows = json.loads((tmp_path / "audit.json").read_text())
    assert [r["verdict"] for r in rows] == ["clean", "poisoned"]
    assert "Clean teachers' margin p-value below 0.05: calibrated 0 / 1, plug-in 0 / 1" in md
    assert len(rows[1]["statistic"]) == 10 and rows[1]["margin_raw_p"] <= rows[1]["margin_p"]
