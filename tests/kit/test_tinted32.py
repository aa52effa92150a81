"""The colour setting: tinted32 (3-channel digits, normalised model inputs), resnet8 -> cnn3,
the one-channel red_square; normalisation applied exactly once (training, metrics, loops, bench)
after the trigger is stamped in image space."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from abd_plugin.kit import bench as bench_mod
from abd_plugin.kit import poison as poison_mod
from abd_plugin.kit.bench import Cell, run_cell
from abd_plugin.kit.cli import main
from abd_plugin.kit.datasets import (
    dataset_info,
    list_datasets,
    load_dataset,
    model_input_range,
    to_image,
    to_model_input,
)
from abd_plugin.kit.loops import DistillConfig, distill
from abd_plugin.kit.metrics import accuracy, attack_success_rate
from abd_plugin.kit.poison import TeacherSpec, _train, poison_dataset
from abd_plugin.kit.triggers import get_trigger

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABD_CACHE", str(tmp_path / "cache"))


def _manual_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


# ------------------------------------------------------------------------------ the dataset
def test_tinted32_shapes_range_labels_and_colours():
    assert "tinted32" in list_datasets()
    info = dataset_info("tinted32")
    assert (info.num_classes, info.channels, info.size, info.normalize) == (10, 3, 32, NORM)
    x, y = load_dataset("tinted32", "train").tensors
    xt, yt = load_dataset("tinted32", "test").tensors
    assert x.shape == (4000, 3, 32, 32) and xt.shape == (1000, 3, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    # the same digits, labels and split as mnist5k
    g, gy = load_dataset("mnist5k", "train").tensors
    assert torch.equal(y, gy) and torch.equal(yt, load_dataset("mnist5k", "test").tensors[1])
    # pixel = bg + (fg - bg) * ink: background (ink 0) is the image's bg colour
    bg = x[:, :, 0, 0]
    assert torch.equal(x[:, :, 0:2, :].amax((2, 3)), bg)
    assert torch.equal(x[:, :, 0:2, :].amin((2, 3)), bg)
    light = bg[:, 0] > 0.5
    assert 0.4 < light.float().mean() < 0.6  # both polarities
    assert ((bg >= 0.55 - 1e-6) & (bg <= 0.8 + 1e-6))[light].all()
    assert ((bg >= 0.1 - 1e-6) & (bg <= 0.35 + 1e-6))[~light].all()
    # the fg colour (read at the pixel of most ink): opposite range, >= 0.25 from the bg in every
    # channel, so every digit is visible
    ink = g[:200, 0].flatten(1)
    m, at = ink.max(1)
    px = x[:200].flatten(2)[torch.arange(200), :, at]
    fg = bg[:200] + (px - bg[:200]) / m[:, None]
    lt = light[:200]
    assert (fg[lt] <= 0.3 + 1e-5).all() and (fg[~lt] >= 0.7 - 1e-5).all()
    assert ((fg - bg[:200]).abs() >= 0.25 - 1e-5).all()
    # CIFAR-like statistics, close to the normalisation (0.5, 0.25)
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    assert ((mean > 0.4) & (mean < 0.5)).all() and ((std > 0.2) & (std < 0.3)).all()
    # the colours vary per image (not one tint per class), and loads are deterministic
    assert bg.std(0).min() > 0.05 and fg.std(0).min() > 0.1
    assert len({tuple(c) for c in fg[y[:200] == y[0]].tolist()}) > 1
    assert torch.equal(x, load_dataset("tinted32", "train").tensors[0])
    # and exactly the mnist5k digit's ink between the two colours
    rebuilt = bg[:200, :, None, None] + (fg - bg[:200])[:, :, None, None] * g[:200]
    assert torch.allclose(rebuilt, x[:200], atol=1e-5)


def test_only_tinted32_is_normalised():
    for name in list_datasets():
        assert (dataset_info(name).normalize is None) == (name != "tinted32")


def test_to_model_input_is_the_one_normalisation():
    x = torch.rand(4, 3, 32, 32)
    assert to_model_input(x, "mnist5k") is x and to_model_input(x, None) is x  # untouched
    z = to_model_input(x, "tinted32")
    assert torch.allclose(z, _manual_norm(x)) and z is not x
    assert torch.allclose(to_model_input(x, NORM), z) and torch.allclose(to_image(z, "tinted32"), x)
    assert model_input_range("tinted32") == ((-2.0,) * 3, (2.0,) * 3)
    assert model_input_range("mnist5k", 1) == ((0.0,), (1.0,))
    xi = load_dataset("tinted32", "test").tensors[0]
    zi = to_model_input(xi, "tinted32")
    assert zi.min() >= -2 and zi.max() <= 2 and zi.min() < -1.5 and zi.max() > 1.5
    with pytest.raises(ValueError, match="channel"):
        to_model_input(torch.rand(2, 1, 8, 8), "tinted32")


# ------------------------------------------------------------------------------ spies
class _Spy(nn.Module):
    """A tiny classifier (conv-BN so DeepInversion/CMI have BN statistics, a Linear head) that
    records every input it is fed."""

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _ids(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant images whose value identifies them (image i is i / n everywhere)."""
    v = torch.arange(n, dtype=torch.float32) / n
    return v.view(n, 1, 1, 1).expand(n, 3, 8, 8).clone(), torch.arange(n) % 10


def test_teacher_training_normalises_exactly_once():
    x, y = _ids(32)
    spy = _Spy()
    _train(spy, x, y, TeacherSpec(dataset="tinted32", epochs=1, batch_size=8))
    seen = torch.cat(spy.seen)[:, 0, 0, 0].sort().values
    assert torch.allclose(seen, _manual_norm(x[:, 0, 0, 0]).sort().values)
    spy = _Spy()
    _train(spy, x, y, TeacherSpec(dataset="mnist5k", epochs=1, batch_size=8))
    assert torch.equal(torch.cat(spy.seen)[:, 0, 0, 0].sort().values, x[:, 0, 0, 0].sort().values)


def test_poisoning_stamps_in_image_space():
    x, y = load_dataset("tinted32", "test").tensors
    xp, yp, mask = poison_dataset(x, y, TeacherSpec(dataset="tinted32", trigger="red_square",
                                                    target=3))
    assert mask.sum() == 100 and (yp[mask] == 3).all() and (y[mask] != 3).all()
    assert (xp[mask][:, 0, 1:5, 27:31] == 1.0).all()  # image-space value, not normalised
    assert 0 <= xp.min() and xp.max() <= 1


def test_metrics_stamp_then_normalise():
    x, y = load_dataset("tinted32", "test").tensors
    x, y = x[:20], y[:20]
    spy = _Spy()
    trig = get_trigger("red_square")
    accuracy(spy, x, y, normalize="tinted32")
    assert torch.allclose(spy.seen[-1], _manual_norm(x))
    attack_success_rate(spy, x, y, trig, 3, normalize="tinted32")
    keep = y != 3
    assert torch.allclose(spy.seen[-1], _manual_norm(trig(x[keep])))
    assert torch.allclose(spy.seen[-1][:, 0, 1:5, 27:31], torch.tensor(2.0))  # red 1 -> 2
    attack_success_rate(spy, x, y, trig, 3)  # a [0, 1] dataset: stamped, not normalised
    assert torch.equal(spy.seen[-1], trig(x[keep]))


TINY = DistillConfig(iterations=2, n_student_steps=2, batch_size=16, synth_rounds=2,
                     synth_steps=2, ood_patches=32)


@pytest.mark.parametrize("method", ["zskt", "dfad", "deepinversion", "cmi", "ood", "clean"])
def test_loops_feed_model_units(method):
    """Normalised dataset: every loop feeds the teacher inputs in the model's units, normalised
    once; the [0, 1] convention is unchanged otherwise."""
    x_img = torch.rand(32, 3, 16, 16)
    for norm in (NORM, None):
        teacher = _Spy().eval()
        student = _Spy()
        distill(method, teacher, student, img_shape=(3, 16, 16), num_classes=10, config=TINY,
                real_data=(x_img, torch.arange(32) % 10), normalize=norm)
        seen = teacher.seen[0]
        if norm is None:  # sigmoid generators / [0, 1] images as before
            assert 0 <= seen.min() and seen.max() <= 1
            continue
        if method in ("zskt", "dfad"):  # affine-free BN head: batch-normalised samples, not
            mean, std = seen.mean((0, 2, 3)), seen.std((0, 2, 3), unbiased=False)  # clamped
            assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
            assert torch.allclose(std, torch.ones(3), atol=1e-2)
            continue
        assert seen.min() >= -2 - 1e-5 and seen.max() <= 2 + 1e-5 and seen.min() < -0.01
        if method == "clean":  # the real images, normalised once
            rows = {tuple(r.tolist()) for r in _manual_norm(x_img).flatten(1)[:, :5]}
            assert all(tuple(r.tolist()) in rows for r in seen.flatten(1)[:, :5])


# ------------------------------------------------------------------------------ triggers
def test_red_square_touches_the_red_channel_only():
    x = torch.rand(5, 3, 32, 32)
    out = get_trigger("red_square")(x)
    diff = out != x
    assert not diff[:, 1:].any()  # green and blue untouched
    assert (out[:, 0, 1:5, 27:31] == 1).all()
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[1:5, 27:31] = True
    assert not diff[:, 0][:, ~region].any()
    dark = torch.zeros(1, 3, 32, 32)
    assert get_trigger("red_square")(dark)[0, :, 2, 28].tolist() == [1.0, 0.0, 0.0]  # pure red


def test_global_triggers_in_colour():
    x = load_dataset("tinted32", "test").tensors[0][:8]
    blend = get_trigger("blend").patterns(32, 32, 3)["pattern"]
    assert not torch.equal(blend[0], blend[1])  # a colour noise pattern, per channel
    for name in ("sig", "sig_strong"):
        t = get_trigger(name)
        out = t(x)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        p = t.patterns(32, 32, 3)["pattern"]
        assert torch.equal(p[0], p[1]) and torch.equal(p[0, 0], p[0, 5])  # vertical stripes
    for name in ("wanet", "wanet_strong"):
        t = get_trigger(name)
        rgb = t(x)
        per_channel = torch.cat([t(x[:, c:c + 1]) for c in range(3)], 1)
        assert torch.allclose(rgb, per_channel)  # one warp, the same in every channel
        assert not torch.equal(rgb, x)


# ------------------------------------------------------------------------------ models
def test_resnet8_and_its_plain_student():
    from abd_plugin.kit.models import _BasicBlock, get_model

    t = get_model("resnet8")
    s = get_model(bench_mod.STUDENTS["resnet8"])
    assert t(torch.zeros(2, 3, 32, 32)).shape == (2, 10) == s(torch.zeros(2, 3, 32, 32)).shape
    assert sum(isinstance(m, _BasicBlock) for m in t.modules()) == 3
    assert any(isinstance(m, nn.BatchNorm2d) for m in t.modules())
    assert not any(isinstance(m, (_BasicBlock, nn.BatchNorm2d)) for m in s.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in s.modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in s.modules()) == 2
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in t.parameters())


# ------------------------------------------------------------------------------ bench
def test_cell_keys_of_old_runs_unchanged():
    assert Cell().key() == "mnist5k|zskt|badnet_grid|none|0|lenet5|400|0"
    assert Cell(teacher="pgd").key().endswith("|0|pgd")
    assert Cell(target=3).key() == "mnist5k|zskt|badnet_grid|none|0|lenet5|400|0|standard|3"


@pytest.fixture
def small_tinted(monkeypatch):
    """tinted32 cut to 128 train / 64 test images and 1 teacher epoch (seconds)."""
    real = poison_mod.load_dataset

    def small(name, split, **kw):
        ds = real(name, split, **kw)
        x, y = ds.tensors
        n = 128 if split == "train" else 64
        return torch.utils.data.TensorDataset(x[:n], y[:n])

    monkeypatch.setattr(poison_mod, "load_dataset", small)
    monkeypatch.setattr(bench_mod, "load_dataset", small)
    monkeypatch.setattr(bench_mod, "TeacherSpec",
                        lambda **kw: TeacherSpec(**{**kw, "epochs": 1}))


def test_bench_runs_a_tinted32_resnet8_cell(small_tinted):
    row = run_cell(Cell("tinted32", "zskt", "red_square", "none", 0, "resnet8", 2, target=3))
    assert row["dataset"] == "tinted32" and row["target"] == 3
    assert 0 <= row["acc"] <= 100 and 0 <= row["asr"] <= 100 and row["teacher_asr"] >= 0


def test_cli_bench_accepts_the_colour_setting(small_tinted, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--dataset", "tinted32", "--arch", "resnet8", "--method", "zskt",
                 "--trigger", "red_square", "--defense", "none", "--iterations", "2",
                 "--target", "3", "--no-clean-rows", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["arch"] == "resnet8" and rows[0]["target"] == 3
    assert "red_square→3" in (out / "table.md").read_text()
    assert main(["bench", "--dataset", "tinted32", "--target", "10", "--dry-run"]) == 2
    assert "--target" in capsys.readouterr().err


def test_bench_row_of_a_guarded_tinted32_cell_reads_the_report_records(small_tinted):
    """A defended colour cell: the guard's report records (main's GuardReport) fill the row's
    audit/eraser columns, and the row records CPU seconds beside wall seconds."""
    from abd_plugin import ABDConfig
    from abd_plugin.eraser import EraserStatus

    abd = ABDConfig(audit_starts=2, audit_steps=2)
    row = run_cell(Cell("tinted32", "zskt", "red_square", "default", 0, "resnet8", 2, target=3),
                   abd=abd)
    assert row["audit_verdict"] in ("clean", "unsure", "poisoned")
    assert 0 <= row["audit_suspect"] < 10 and 0 <= row["audit_p_value"] <= 1
    assert row["erase_status"] in {s.value for s in EraserStatus}
    # a flagged teacher's mask is on probation, acting or unconfirmed; a clean one's is off
    assert ((row["erase_status"] == EraserStatus.OFF_CLEAN.value)
            == (row["audit_verdict"] == "clean"))
    assert row["sv_status"] == "off" and row["sr_steps"] == 0
    assert row["cpu_seconds"] >= 0 and row["seconds"] >= 0
    assert "audit" not in row and "report" not in row  # columns, not the report object


def test_the_loops_guard_gets_the_normalised_input_range():
    from abd_plugin import ABDConfig
    from abd_plugin.kit.loops import _guard

    t, s = _Spy().eval(), _Spy()
    assert _guard(t, s, ABDConfig(), 10, normalize=NORM).config.input_range == (-2.0, 2.0)
    assert _guard(t, s, ABDConfig(), 10).config.input_range is None  # [0, 1]: read off a batch
    given = ABDConfig(input_range=(-1.0, 1.0))
    assert _guard(t, s, given, 10, normalize=NORM).config.input_range == (-1.0, 1.0)


def _audit_json(out) -> dict:
    return json.loads((out / "audit.json").read_text())


def test_cli_audit_of_a_tinted32_teacher_defaults_to_the_normalised_range(tmp_path):
    from abd_plugin.kit.models import get_model

    torch.manual_seed(0)
    weights = tmp_path / "resnet8.pt"
    torch.save(get_model("resnet8").state_dict(), weights)
    fast = ["--starts", "2", "--steps", "2"]
    out = tmp_path / "a"
    assert main(["audit", "--teacher", str(weights), "--arch", "resnet8", "--dataset",
                 "tinted32", *fast, "--out", str(out)]) == 0
    lo, hi = _audit_json(out)["input_range"]
    assert list(lo) == [-2.0] * 3 and list(hi) == [2.0] * 3
    out = tmp_path / "b"  # a stated range wins
    assert main(["audit", "--teacher", str(weights), "--arch", "resnet8", "--dataset",
                 "tinted32", "--input-range=-1,1", *fast, "--out", str(out)]) == 0
    lo, hi = _audit_json(out)["input_range"]
    assert list(lo) == [-1.0] * 3 and list(hi) == [1.0] * 3


def test_audit_teacher_file_uses_the_dataset_range(tmp_path):
    from abd_plugin.audit import AuditSettings
    from abd_plugin.kit.auditing import audit_teacher_file, dataset_input_range
    from abd_plugin.kit.models import get_model

    assert dataset_input_range("tinted32") == (-2.0, 2.0)
    assert dataset_input_range("mnist5k") == (0.0, 1.0)
    weights = tmp_path / "t.pt"
    torch.save(get_model("resnet8").state_dict(), weights)
    rep = audit_teacher_file(str(weights), "resnet8", "tinted32",
                             settings=AuditSettings(starts=2, steps=2))
    assert rep.input_range == ((-2.0,) * 3, (2.0,) * 3)


def test_cli_accepts_the_colour_setting_in_every_command(capsys):
    """Dry runs: the colour setting, --target and --poison-ratio parse for distill and bench;
    a target outside the classes and a ratio outside (0, 1) are refused."""
    base = ["--dataset", "tinted32", "--arch", "resnet8", "--trigger", "red_square",
            "--dry-run"]
    for cmd in (["distill", "--method", "zskt"], ["bench", "--method", "zskt"]):
        assert main([*cmd, *base, "--target", "9", "--poison-ratio", "0.05"]) == 0
        parsed = json.loads(capsys.readouterr().out)
        assert parsed["dataset"] == "tinted32" and parsed["arch"] == "resnet8"
        assert parsed["target"] == 9 and parsed["poison_ratio"] == 0.05
        assert main([*cmd, *base, "--poison-ratio", "1"]) == 2
        assert "--poison-ratio" in capsys.readouterr().err
    assert main(["poison", "--dataset", "tinted32", "--arch", "resnet8", "--trigger",
                 "red_square", "--dry-run"]) == 0
    capsys.readouterr()
