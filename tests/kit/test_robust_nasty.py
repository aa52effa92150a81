"""Beyond backdoors: PGD attack and robust accuracy, adversarially trained and nasty teachers,
the IGA defense and the teacher kinds in the benchmark (tiny sizes: sklearn digits, CNN5)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from abd_plugin import InputGradientAlignment
from abd_plugin.kit._utils import parse_options
from abd_plugin.kit.attacks import pgd_attack
from abd_plugin.kit.bench import Cell, make_hooks, parse_defense, run_bench, run_cell
from abd_plugin.kit.cli import main
from abd_plugin.kit.datasets import load_dataset
from abd_plugin.kit.loops import DistillConfig, distill
from abd_plugin.kit.metrics import accuracy, robust_accuracy_pgd
from abd_plugin.kit.nasty import NastySpec, nasty_loss, train_nasty
from abd_plugin.kit.poison import TeacherSpec, build_model, train_teacher
from abd_plugin.kit.robust import AdversarialSpec, train_robust_teacher
from abd_plugin.kit.teachers import build_teacher


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add noise
    yield
    torch.set_num_threads(n)


DIGITS = TeacherSpec(dataset="digits", arch="cnn5", width=4, trigger=None, epochs=3)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()


def test_pgd_stays_in_the_ball_and_the_image_range_and_writes_no_grad():
    model = _tiny_model()
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(10, (8,))
    for random_start in (True, False):
        xa = pgd_attack(model, x, y, eps=0.1, steps=5, random_start=random_start)
        assert (xa - x).abs().max() <= 0.1 + 1e-6
        assert xa.min() >= 0 and xa.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(pgd_attack(model, x, y, eps=0.0, steps=5), x)
    # one step without random start, step eps = FGSM
    xa = pgd_attack(model, x, y, eps=0.05, steps=1, step_size=0.05, random_start=False, clamp=None)
    x_ = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_), y, reduction="sum"), x_)
    assert torch.allclose(xa, x + 0.05 * g.sign())


def test_robust_accuracy_pgd_is_at_most_accuracy_and_reproducible():
    model = _tiny_model()
    x, y = torch.rand(40, 1, 4, 4), torch.randint(10, (40,))
    model.train()
    r1 = robust_accuracy_pgd(model, x, y, 0.1, 5)
    assert model.training  # mode restored
    assert r1 == robust_accuracy_pgd(model, x, y, 0.1, 5)
    assert r1 <= accuracy(model, x, y)
    assert robust_accuracy_pgd(model, x, y, 0.0, 5) == accuracy(model, x, y)


def test_pgd_training_gives_higher_robust_accuracy_than_plain_training():
    x, y = load_dataset("digits", "test").tensors
    plain, pmeta = train_teacher(DIGITS, cache=False)
    spec = AdversarialSpec(base=DIGITS, eps=0.1, steps=3, eps_warmup_epochs=0, eval_steps=10)
    robust, rmeta = train_robust_teacher(spec, cache=False)
    plain_racc = robust_accuracy_pgd(plain, x, y, 0.1, 10)
    assert rmeta["racc"] == pytest.approx(robust_accuracy_pgd(robust, x, y, 0.1, 10))
    assert rmeta["racc"] > plain_racc + 20, (rmeta, plain_racc)


def test_robust_teacher_is_cached_by_its_spec():
    spec = AdversarialSpec(base=TeacherSpec(dataset="digits", arch="cnn5", width=4,
                                            trigger=None, epochs=1), eps=0.1, steps=1,
                           eps_warmup_epochs=0, eval_steps=2)
    m1, meta1 = train_robust_teacher(spec)
    m2, meta2 = train_robust_teacher(spec)
    assert meta1 == meta2 and meta1["spec"]["kind"] == "adversarial"
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                  m2.state_dict().values(), strict=True))
    assert AdversarialSpec(eps=0.1).key() != AdversarialSpec(eps=0.2).key()
    assert AdversarialSpec().key() != TeacherSpec(trigger=None).key()
    with pytest.raises(ValueError):
        AdversarialSpec(attack="cw")


def test_nasty_loss_is_ce_minus_weighted_kl():
    n, a = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(10, (4,))
    assert torch.allclose(nasty_loss(n, a, y, 0.0, 4.0), nn.functional.cross_entropy(n, y))
    kl = (torch.softmax(n / 4, 1) * (torch.log_softmax(n / 4, 1)
                                     - torch.log_softmax(a / 4, 1))).sum(1).mean()
    assert torch.allclose(nasty_loss(n, a, y, 0.5, 4.0),
                          nn.functional.cross_entropy(n, y) - 0.5 * 16 * kl, atol=1e-6)
    with pytest.raises(ValueError):
        NastySpec(base=TeacherSpec())  # poisoned base


def test_nasty_teacher_keeps_its_accuracy_but_teaches_worse_than_a_normal_one():
    base = TeacherSpec(dataset="digits", arch="cnn5", width=8, trigger=None, epochs=5)
    normal, _ = train_teacher(base, cache=False)
    nasty, meta = train_nasty(NastySpec(base=base, omega=0.2, tau=4.0), cache=False)
    xtr, ytr = load_dataset("digits", "train").tensors
    x, y = load_dataset("digits", "test").tensors
    assert meta["acc"] > 85 and meta["kl_to_adversary"] > 0.1
    cfg = DistillConfig(iterations=100, n_student_steps=1, temperature=4.0, lr_student=1e-2)
    accs = {}
    for name, teacher in (("normal", normal), ("nasty", nasty)):
        torch.manual_seed(0)
        student = build_model("cnn5", "digits", 4)
        distill("clean", teacher, student, img_shape=(1, 16, 16), num_classes=10, config=cfg,
                real_data=(xtr, ytr))
        accs[name] = accuracy(student, x, y)
    assert accs["nasty"] < accs["normal"] - 20, accs


def test_teacher_kinds_and_options():
    assert parse_options("pgd:eps=0.1:steps=3:step_size=none") == (
        "pgd", {"eps": 0.1, "steps": 3, "step_size": None})
    with pytest.raises(ValueError, match="key=value"):
        parse_options("pgd:eps")
    base = TeacherSpec(dataset="digits", arch="cnn5", width=4, trigger=None, epochs=1)
    _, meta = build_teacher("pgd:eps=0.1:steps=1:eval_steps=2", base)
    assert meta["eps"] == 0.1 and "racc" in meta
    for bad in ("magic", "standard:eps=1", "pgd:colour=red"):
        with pytest.raises(ValueError):
            build_teacher(bad, base)
    with pytest.raises(ValueError, match="trigger"):
        build_teacher("nasty", TeacherSpec(dataset="digits", arch="cnn5", width=4, epochs=1))


def test_iga_defense_parsing_and_hooks():
    assert parse_defense("none") == (None, [])
    cfg, hooks = parse_defense("abd+iga:gamma=2")
    assert cfg is not None and hooks == [("iga", {"gamma": 2})]
    for bad in ("abd+abd_paper", "iga_magic", "abd:gamma=1"):
        with pytest.raises(ValueError):
            parse_defense(bad)
    teacher, student = build_model("cnn5", "digits", 4), build_model("cnn5", "digits", 4)
    (h,) = make_hooks(Cell(method="zskt", defense="iga"), teacher, student, {"eps": 0.15})
    assert isinstance(h, InputGradientAlignment) and h.fgsm_eps == 0.15 and h.gamma > 0
    (h,) = make_hooks(Cell(method="clean:temperature=4", defense="iga_plain:gamma=0.5"),
                      teacher, student, {})
    assert h.fgsm_eps is None and h.gamma == 0.5


def test_cell_with_a_robust_teacher_reports_robust_accuracy_and_resumes(tmp_path, monkeypatch):
    import abd_plugin.kit.bench as bench_mod

    monkeypatch.setattr(bench_mod, "STUDENTS", {"cnn5": "cnn5"})
    monkeypatch.setattr(bench_mod, "RACC_STEPS", 2)
    kind = "pgd:eps=0.1:steps=1:eval_steps=2:epochs=1"
    cell = Cell(dataset="digits", method="zskt", trigger="none", defense="iga:gamma=1", seed=0,
                arch="cnn5", iterations=2, teacher=kind)
    assert cell.key().endswith(kind) and "standard" not in Cell().key()
    monkeypatch.setattr(bench_mod, "TeacherSpec",
                        lambda **kw: TeacherSpec(**{**kw, "width": 4, "epochs": 1}))
    row = run_cell(cell)
    assert {"racc", "teacher_racc", "racc_eps"} <= set(row)
    assert row["hook.InputGradientAlignment.steps"] == 2 * 5  # every student step, 2 iterations
    rows = run_bench([cell], tmp_path, log=lambda m: None)
    assert len(rows) == 1
    table = (tmp_path / "table.md").read_text()
    assert "robust ACC" in table and kind in table
    logged = []
    run_bench([cell], tmp_path, log=logged.append)  # resumed: nothing to run
    assert any("skip" in m for m in logged)
    old = json.loads((tmp_path / "cells.jsonl").read_text().splitlines()[0])
    del old["teacher"]  # a row written before the field existed reads as a standard teacher
    assert Cell(**{k: old[k] for k in Cell.__dataclass_fields__ if k in old}).teacher == "standard"


def test_cli_train_adversarial_and_nasty(capsys, tmp_path):
    args = ["train", "--dataset", "digits", "--arch", "cnn5", "--epochs", "1"]
    assert main(args + ["--adversarial", "pgd", "--eps", "0.1", "--steps", "1"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["eps"] == 0.1 and 0 <= out["racc"] <= out["acc"]
    assert main(args + ["--nasty", "--omega", "0.05", "--out", str(tmp_path / "n.pt")]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "kl_to_adversary" in out and (tmp_path / "n.pt").exists()
    assert main(args + ["--nasty", "--adversarial", "pgd"]) == 2  # a usage error, exit 2
    assert "not allowed with --adversarial" in capsys.readouterr().err
