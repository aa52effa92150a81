"""``abd-plugin audit`` on a user's own model: ``--arch module.path:callable`` (a factory imported
from the current directory) or ``torchvision:NAME``, with ``--input-shape`` and ``--num-classes``;
every way it can go wrong (weights that do not fit, a factory that cannot be imported or does not
return a module, a bad shape) is one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from abd_plugin.kit import cli

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn


    class TinyCNN(nn.Module):
        def __init__(self, classes=10, width=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


    def make():
        return TinyCNN()


    def make_wide():
        return TinyCNN(width=6)


    def make_dict():
        return {"not": "a model"}


    def make_fails():
        raise RuntimeError("no GPU here")


    NOT_CALLABLE = 3
""")

FAST = ["--starts", "2", "--steps", "5"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """tmp_path as the current directory holding a factory module (a unique name, so no other
    test's import is reused) and weights saved from its ``make()``; ``sys.path`` and
    ``sys.modules`` are restored afterwards."""
    name = f"abd_user_net_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    (tmp_path / f"{name}_bad.py").write_text("import abd_missing_dependency_xyz  # noqa\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    ns: dict = {}
    exec(compile(FACTORY, name, "exec"), ns)
    torch.manual_seed(0)
    torch.save(ns["make"]().state_dict(), tmp_path / "weights.pt")
    torch.save(ns["make_wide"]().state_dict(), tmp_path / "wide.pt")
    yield tmp_path, name
    sys.modules.pop(name, None)


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _audit(name, *extra, teacher="weights.pt"):
    return ["audit", "--teacher", teacher, "--arch", f"{name}:make", "--input-shape", "1,16,16",
            "--num-classes", "10", *FAST, "--out", "out", *extra]


def _one_line(rc, out, err, needle):
    assert rc == 2 and not out, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("abd-plugin"), err
    assert "Traceback" not in err and needle in err, err


def test_factory_from_the_current_directory(user_dir, capsys):
    tmp, name = user_dir
    torch.set_num_threads(1)
    rc, out, err = _run(capsys, _audit(name))
    assert rc == 0, err
    assert out.startswith("audit: ") and "class  max margin" in out
    rep = json.loads((tmp / "out" / "audit.json").read_text())
    assert len(rep["statistic"]) == 10 and rep["verdict"] in ("clean", "unsure", "poisoned")
    assert rep["input_range"] == [[0.0], [1.0]]  # no --input-range, no kit dataset: 0,1
    assert str(tmp) in sys.path  # as ``python -m`` would: the cwd first


def _console_script() -> list[str]:
    """The installed ``abd-plugin`` script (its sys.path[0] is its own folder, not the cwd, so the
    CLI itself must add the cwd); ``python -m`` where it is not installed next to Python."""
    script = Path(sys.executable).with_name("abd-plugin")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "abd_plugin"]


def test_factory_from_the_current_directory_in_a_subprocess(user_dir):
    tmp, name = user_dir
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([*_console_script(), *_audit(name)], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp / "out" / "audit.json").read_text())["verdict"]
    r = subprocess.run([*_console_script(), *_audit(name, teacher="wide.pt")], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "does not fit" in r.stderr


def test_weights_that_do_not_fit_are_one_line(user_dir, capsys):
    _, name = user_dir
    rc, out, err = _run(capsys, _audit(name, teacher="wide.pt"))
    _one_line(rc, out, err, "argument --teacher: wide.pt does not fit --arch")
    assert "shape mismatch" in err and "conv.weight: file 6x1x3x3, model 4x1x3x3" in err
    assert "pass the --arch (and --num-classes) the weights were saved from" in err
    # a kit architecture with foreign weights: missing and unexpected keys, no traceback
    rc, out, err = _run(capsys, ["audit", "--teacher", "weights.pt", "--arch", "lenet5",
                                 "--out", "out"])
    _one_line(rc, out, err, "weights.pt does not fit --arch lenet5")
    assert "missing key(s) (features.0.weight" in err and "unexpected key(s) (conv.weight" in err


def test_prefixed_weights_name_the_prefix(user_dir, capsys):
    tmp, name = user_dir
    state = torch.load(tmp / "weights.pt")
    torch.save({f"model.{k}": v for k, v in state.items()}, tmp / "prefixed.pt")
    rc, out, err = _run(capsys, _audit(name, teacher="prefixed.pt"))
    _one_line(rc, out, err, "every key of the file starts with 'model.'")


def test_unreadable_weights_are_one_line(user_dir, capsys):
    tmp, name = user_dir
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    rc, out, err = _run(capsys, _audit(name, teacher="junk.pt"))
    _one_line(rc, out, err, "argument --teacher:")


@pytest.mark.parametrize("arch,extra,needle", [
    ("{m}:make", ["--input-shape", "1,16,16"], "argument --num-classes: required with --arch"),
    ("{m}:make", ["--num-classes", "10"], "argument --input-shape: required with --arch"),
    ("{m}:make", ["--input-shape", "1,16", "--num-classes", "10"],
     "argument --input-shape: must be C,H,W"),
    ("{m}:make", ["--input-shape", "1,0,16", "--num-classes", "10"],
     "argument --input-shape: must be C,H,W"),
    ("{m}:make", ["--input-shape", "3,16,16", "--num-classes", "10"],
     "the model of --arch {m}:make fails on an input of shape 1x3x16x16"),
    ("{m}:make", ["--input-shape", "1,16,16", "--num-classes", "5"],
     "argument --num-classes: the model of --arch {m}:make returns 10 logits, not 5"),
    ("{m}:make", ["--input-shape", "1,16,16", "--num-classes", "10", "--dataset", "mnist5k"],
     "argument --dataset: only for a kit --arch"),
    ("abd_no_such_module_xyz:make", ["--input-shape", "1,16,16", "--num-classes", "10"],
     "cannot import module 'abd_no_such_module_xyz'"),
    ("{m}_bad:make", ["--input-shape", "1,16,16", "--num-classes", "10"],
     "importing '{m}_bad' failed (ModuleNotFoundError: No module named "
     "'abd_missing_dependency_xyz'); install what it imports"),
    ("{m}:nope", ["--input-shape", "1,16,16", "--num-classes", "10"], "has no attribute 'nope'"),
    ("{m}:NOT_CALLABLE", ["--input-shape", "1,16,16", "--num-classes", "10"], "is not callable"),
    ("{m}:make_dict", ["--input-shape", "1,16,16", "--num-classes", "10"],
     "returned a dict, not a torch.nn.Module"),
    ("{m}:make_fails", ["--input-shape", "1,16,16", "--num-classes", "10"],
     "calling {m}:make_fails() failed (RuntimeError: no GPU here)"),
    ("{m}:make-it", ["--input-shape", "1,16,16", "--num-classes", "10"], "unknown arch"),
    ("lenet5", ["--num-classes", "10"], "argument --num-classes: only with --arch"),
    ("torchvision:resnet19", ["--input-shape", "3,32,32", "--num-classes", "10"],
     "torchvision has no classification model 'resnet19' (did you mean resnet18"),
])
def test_bad_factory_or_shape_is_one_line(user_dir, capsys, arch, extra, needle):
    _, name = user_dir
    argv = ["audit", "--teacher", "weights.pt", "--arch", arch.format(m=name), *extra,
            "--dry-run"]
    rc, out, err = _run(capsys, argv)
    _one_line(rc, out, err, needle.format(m=name))


def test_dry_run_checks_the_factory_and_the_weights(user_dir, capsys):
    _, name = user_dir
    rc, out, err = _run(capsys, _audit(name, "--dry-run"))
    assert rc == 0 and not err
    got = json.loads(out)
    assert got["input_shape"] == [1, 16, 16] and got["num_classes"] == 10
    assert not any(k.startswith("_") for k in got)


def test_torchvision_model_with_the_users_weights(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "tv.pt")
    argv = ["audit", "--teacher", str(tmp_path / "tv.pt"), "--arch",
            "torchvision:shufflenet_v2_x0_5", "--input-shape", "3,32,32", "--num-classes", "10",
            "--starts", "1", "--steps", "2", "--out", str(tmp_path / "out")]
    rc, out, err = _run(capsys, argv)
    assert rc == 0, err
    assert len(json.loads((tmp_path / "out" / "audit.json").read_text())["statistic"]) == 10
    # the same weights under another number of classes: one line, exit code 2
    argv[argv.index("--num-classes") + 1] = "7"
    rc, out, err = _run(capsys, argv)
    _one_line(rc, out, err, "tv.pt does not fit --arch torchvision:shufflenet_v2_x0_5")
    assert "fc.weight: file 10x1024, model 7x1024" in err
