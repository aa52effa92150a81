"""``benchmarks/host_dfad.py``: DFAD's own MNIST script run vanilla and inside ``abd.patch()``.

The wiring runs against a fake checkout (``abd_fakes/dfad_mnist_host``, written from the seams,
no host code); the same launcher against the real host runs only when ``ABD_HOST_DFAD`` points at
a checkout of the supported commit (as in ``test_real_hosts.py``).
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FAKE_HOST = Path(__file__).resolve().parent / "abd_fakes" / "dfad_mnist_host"
TINY = ["--epochs", "1", "--epoch-itrs", "2", "--batch-size", "8"]


def _launcher():
    spec = importlib.util.spec_from_file_location("abd_host_dfad", ROOT / "benchmarks" /
                                                  "host_dfad.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(out):
    return [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]


def test_launcher_wiring_against_the_fake_host(tmp_path):
    launcher = _launcher()
    path0, cwd0, argv0 = list(sys.path), os.getcwd(), list(sys.argv)
    out = tmp_path / "out"
    assert launcher.main(["--host", str(FAKE_HOST), "--seeds", "0,1", "--out", str(out),
                          *TINY]) == 0
    # the launcher left no trace: host modules forgotten, path, cwd and argv restored
    assert "DFAD_mnist" not in sys.modules and "network" not in sys.modules
    assert sys.path == path0 and os.getcwd() == cwd0 and sys.argv == argv0
    rows = _rows(out)
    assert [(r["seed"], r["defense"]) for r in rows] == [
        (0, "none"), (0, "default"), (1, "none"), (1, "default")]
    for r in rows:
        # the kit teacher mapped into the host's LeNet5 (normalisation folded) is the same model
        assert r["fold_max_abs_diff"] < 1e-3 and r["teacher_asr"] > 80
        assert "--epochs" in r["host_argv"] and r["host_argv"][r["host_argv"].index("--seed")
                                                                + 1] == str(r["seed"])
        # the host's own test ran once per epoch (on the offline digits), the student was scored
        assert [h["epoch"] for h in r["history"]] == [1]
        assert 0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100
        run_dir = out / "runs" / f"{r['defense']}-s{r['seed']}"
        assert (run_dir / "checkpoint" / "student").is_dir()  # the host wrote in its run folder
    guarded = [r for r in rows if r["defense"] == "default"]
    for r in guarded:
        # the bare default guard ran inside the host's train: audit at its first batch, SR off
        assert r["audit_verdict"] in ("poisoned", "unsure", "clean")
        assert r["student_steps"] == 1 * 2 * 5
        assert "Teacher audit" in r["report"]
        assert len(r["audit_input_range"]) == 2  # read off the host generator's first batch
        assert (out / "runs" / f"default-s{r['seed']}" / "guard_report.txt").is_file()
    assert all("audit_verdict" not in r for r in rows if r["defense"] == "none")
    table = (out / "table.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "| mean ± std |" in table
    # resumable: a second call finds every row done
    assert launcher.main(["--host", str(FAKE_HOST), "--seeds", "0,1", "--out", str(out),
                          *TINY]) == 0
    assert len(_rows(out)) == 4


def test_the_host_state_dict_is_the_kit_model_with_the_normalisation_folded_in():
    launcher = _launcher()
    from abd_plugin.kit.models import LeNet5

    sys.path.insert(0, str(FAKE_HOST))
    try:
        from network.lenet import LeNet5 as HostLeNet5
    finally:
        sys.path.remove(str(FAKE_HOST))
        for name in [n for n in sys.modules if n == "network" or n.startswith("network.")]:
            del sys.modules[name]
    torch.manual_seed(0)
    kit, host = LeNet5(in_channels=1).eval(), HostLeNet5().eval()
    host.load_state_dict(launcher.host_state_dict(kit, host))
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(launcher.Normalized(host)(x), kit(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not the same architecture"):
        launcher.host_state_dict(LeNet5(in_channels=1, widths=(8, 16, 120, 84)), host)


def test_launcher_against_the_real_host(tmp_path):
    root = os.environ.get("ABD_HOST_DFAD")
    if not root:
        pytest.skip("set ABD_HOST_DFAD=/path/to/checkout to run against the real host")
    launcher = _launcher()
    out = tmp_path / "out"
    assert launcher.main(["--host", root, "--seeds", "0", "--out", str(out),
                          "--epochs", "1", "--epoch-itrs", "2", "--batch-size", "16"]) == 0
    rows = _rows(out)
    assert [r["defense"] for r in rows] == ["none", "default"]
    assert rows[0]["fold_max_abs_diff"] < 1e-3 and rows[0]["teacher_asr"] > 80
    d = rows[1]
    assert d["audit_verdict"] == "poisoned" and d["audit_target"] == 0
    assert d["student_steps"] == 1 * 2 * 5 and d["erase_status"] == "on"
    assert "DFAD_mnist" not in sys.modules
