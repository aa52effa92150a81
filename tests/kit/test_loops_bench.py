"""Reference loops, the poisoned-teacher trainer, the benchmark runner and the CLI (tiny sizes)."""
from __future__ import annotations

import json

import pytest
import torch

from abd_plugin import ABDConfig
from abd_plugin.eraser import EraserReport
from abd_plugin.kit import bench as bench_mod
from abd_plugin.kit.bench import Cell, grid, resolve_defense, run_bench
from abd_plugin.kit.cli import main
from abd_plugin.kit.loops import DistillConfig, distill, list_loops, ood_transfer_set
from abd_plugin.kit.poison import TeacherSpec, build_model, poison_dataset, train_teacher
from abd_plugin.retrospection import RetrospectionReport
from abd_plugin.vaccine import VaccineReport
from abd_testutils import record_of

TINY = DistillConfig(iterations=3, n_student_steps=2, batch_size=16, synth_rounds=2, synth_steps=2,
                     ood_patches=32)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABD_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("method", ["zskt", "dfad", "deepinversion", "cmi", "ood", "clean"])
def test_every_loop_runs_guarded_and_unguarded(method):
    teacher = build_model("cnn5", "mnist5k", 8).eval()
    x = torch.rand(64, 1, 16, 16)
    y = torch.randint(10, (64,))
    classic = ABDConfig.classic(verify=False, sr_start_step=0, sr_inner_rounds=1)
    eraser = ABDConfig(target=0, audit=False)  # the default's eraser, armed without the audit
    for abd in (None, classic, eraser):
        student = build_model("cnn5", "mnist5k", 4)
        before = [p.clone() for p in student.parameters()]
        res = distill(
            method,
            teacher,
            student,
            img_shape=(1, 16, 16),
            num_classes=10,
            config=TINY,
            abd=abd,
            real_data=(x, y),
        )
        assert res.student_steps == 6
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
        rep = res.report
        if abd is classic:
            assert rep is not None and record_of(rep, RetrospectionReport).steps == 6
            assert (record_of(rep, VaccineReport).calls > 0) == (method not in ("clean",))
        if abd is eraser:  # every loop feeds the teacher through the eraser
            assert rep is not None
            er = record_of(rep, EraserReport)
            assert er.status == "on" and er.batches > 0


def test_unknown_loop_names_the_choices():
    with pytest.raises(KeyError, match="zskt"):
        distill(
            "nope", torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), img_shape=(1, 2, 2), num_classes=2
        )
    assert set(list_loops()) >= {"zskt", "dfad", "deepinversion", "cmi", "ood", "clean"}


def test_poison_dataset_dirty_and_clean_label():
    x = torch.rand(100, 1, 32, 32)
    y = torch.arange(100) % 10
    xp, yp, m = poison_dataset(x, y, TeacherSpec(trigger="badnet_grid", poison_ratio=0.1))
    assert int(m.sum()) == 10 and (y[m] != 0).all() and (yp[m] == 0).all()
    assert torch.equal(xp[~m], x[~m]) and not torch.equal(xp[m], x[m])
    xs, ys, ms = poison_dataset(x, y, TeacherSpec(trigger="sig", poison_ratio=0.1))
    assert (y[ms] == 0).all() and torch.equal(ys, y)  # clean label: target images, labels kept
    xc, yc, mc = poison_dataset(x, y, TeacherSpec(trigger=None))
    assert not mc.any() and torch.equal(xc, x)


def test_teacher_training_is_cached(monkeypatch):
    spec = TeacherSpec(arch="cnn5", width=4, size=16, epochs=1)
    m1, meta1 = train_teacher(spec)
    monkeypatch.setattr("abd_plugin.kit.poison._train", lambda *a, **k: pytest.fail("retrained"))
    m2, meta2 = train_teacher(spec)
    assert meta1["acc"] == meta2["acc"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_ood_transfer_set_is_seeded_and_in_range():
    a = ood_transfer_set(8, (3, 16, 16), seed=1)
    b = ood_transfer_set(8, (3, 16, 16), seed=1)
    assert torch.equal(a, b) and a.shape == (8, 3, 16, 16) and 0 <= a.min() and a.max() <= 1


def test_grid_adds_clean_rows_and_defenses_resolve():
    cells = grid("mnist5k", ["zskt"], ["badnet_grid"], ["none", "abd"], [0, 1])
    kinds = {(c.method, c.trigger, c.defense) for c in cells}
    assert ("clean", "badnet_grid", "none") in kinds
    assert ("zskt", "none", "abd") in kinds and ("zskt", "none", "none") in kinds
    assert len(cells) == len(set(cells))
    assert resolve_defense("none") is None
    assert resolve_defense("abd_paper").shuffle_layers == 5
    with pytest.raises(ValueError, match="choose from"):
        resolve_defense("magic")


def test_bench_is_resumable(tmp_path, monkeypatch):
    calls = []

    def fake_run(cell, progress=None, eval_every=0):
        calls.append(cell)
        return {**cell.__dict__, "acc": 90.0 + cell.seed, "asr": 5.0, "ra": 80.0, "seconds": 0.1,
                "teacher_acc": 97.0, "teacher_asr": 99.0, "history": []}

    monkeypatch.setattr(bench_mod, "run_cell", fake_run)
    cells = [Cell(defense="none", seed=0), Cell(defense="none", seed=1)]
    run_bench(cells, tmp_path, log=lambda m: None)
    assert len(calls) == 2
    run_bench(cells + [Cell(defense="abd", seed=0)], tmp_path, log=lambda m: None)
    assert len(calls) == 3  # the two finished cells were skipped
    for name in ("results.csv", "results.json", "table.md", "plot.png"):
        assert (tmp_path / name).exists()
    table = (tmp_path / "table.md").read_text()
    assert "90.5 ± 0.7" in table


def test_cli_list_and_distill(capsys, monkeypatch):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "triggers:" in out and "zskt" in out and "abd_paper" in out
    monkeypatch.setattr(
        bench_mod,
        "TeacherSpec",
        lambda **kw: TeacherSpec(**{**kw, "arch": "cnn5", "width": 4, "size": 16, "epochs": 1}),
    )
    monkeypatch.setitem(bench_mod.STUDENTS, "cnn5", "cnn5")
    assert main(["distill", "--arch", "cnn5", "--iterations", "2", "--defense", "none"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert 0 <= row["acc"] <= 100 and 0 <= row["asr"] <= 100
