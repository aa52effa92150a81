"""The abd-plugin command line: every flag documented with its default; every bad argument is one
line on stderr and exit code 2 (no traceback), found before any work; poison says when the
backdoor did not take. Property-based: random argument lists validate cleanly or are refused so."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from abd_plugin.kit import cli

ROOT = Path(__file__).resolve().parents[2]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_flag_has_help_text_that_shows_its_default():
    subs = _subparsers(cli.build_parser())
    assert set(subs) == {"demo", "bench", "poison", "train", "distill", "list", "audit",
                         "audit-table"}
    for name, sub in subs.items():
        text = sub.format_help()
        flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        for a in flags:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
            assert f"{a.help} (default: " in " ".join(text.split()), (name, a.dest)


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,needle", [
    (["poison", "--trigger", "nope"], "unknown trigger 'nope'"),
    (["bench", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["distill", "--arch", "nope"], "unknown arch 'nope'"),
    (["distill", "--arch", "generator_zskt"], "unknown arch"),
    (["bench", "--method", "zskt,nope"], "unknown method 'nope'"),
    (["bench", "--defense", "abd,nope"], "unknown defense 'nope'"),
    (["distill", "--abd", "{bad json"], "--abd: not valid JSON"),
    (["distill", "--abd", "[1, 2]"], "--abd: must be a JSON object"),
    (["distill", "--abd", '{"sr": "no"}'], "ABDConfig.sr must be True or False"),
    (["distill", "--abd", '{"sr_temperature": 0}'], "ABDConfig.sr_temperature must be"),
    (["distill", "--abd", '{"not_a_field": 1}'], "unknown ABDConfig field"),
    (["bench", "--seeds", "a,b"], "--seeds: must be an integer"),
    (["bench", "--seeds", ","], "--seeds: needs a comma-separated list"),
    (["poison", "--target", "12"], "--target: must be a class of mnist5k (0..9), got 12"),
    (["poison", "--target", "-1"], "--target: must be an integer >= 0"),
    (["poison", "--ratio", "1.5"], "--ratio: must be a finite number in (0, 1)"),
    (["poison", "--ratio", "0"], "--ratio: must be a finite number in (0, 1)"),
    (["poison", "--ratio", "nan"], "--ratio: must be a finite number in (0, 1)"),
    (["poison", "--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["bench", "--defense", "iga:nope=1"], "unknown option(s) ['nope'] for defense 'iga'"),
    (["bench", "--defense", "iga:gamma=-1"], "option gamma of defense 'iga' must be"),
    (["bench", "--defense", "default+abd_paper"], "use at most one"),
    (["bench", "--defense", "iga:gamma"], "is not key=value"),
    (["bench", "--method", "clean:temperature=0"], "option temperature of method 'clean'"),
    (["bench", "--method", "clean:colour=1"], "unknown option(s) ['colour']"),
    (["bench", "--teacher", "robust"], "unknown teacher kind 'robust'"),
    (["bench", "--teacher", "pgd:eps=2"], "option eps of teacher kind 'pgd' must be"),
    (["distill", "--teacher", "nasty"], "--teacher: a nasty teacher has no trigger"),
    (["bench", "--teacher", "pgd", "--trigger", "cl"], "--teacher: the label-consistent trigger"),
    (["train", "--nasty", "--adversarial", "pgd"], "--nasty: not allowed with --adversarial"),
    (["train", "--nasty", "--trigger", "badnet_grid"], "--trigger: a nasty teacher"),
    (["train", "--adversarial", "fgsm"], "invalid choice"),
    (["train", "--eps", "0"], "--eps: must be a finite number in (0, 1]"),
    (["train", "--steps", "0"], "--steps: must be an integer >= 1"),
    (["train", "--tau", "0"], "--tau: must be a finite number > 0"),
    (["train", "--omega", "nan"], "--omega: must be a finite number >= 0"),
    (["distill", "--iterations", "0"], "--iterations: must be an integer >= 1"),
    (["demo", "--iterations", "2.5"], "--iterations: must be an integer >= 1"),
    (["poison", "--dataset", "cifar10"], "needs a local copy"),
    (["poison", "--dataset", "digits"], "--arch lenet5 does not fit --dataset digits (1x16x16"),
    (["frobnicate"], "invalid choice"),
    ([], "required: COMMAND"),
    (["list", "extra"], "unrecognized arguments: extra"),
])
def test_bad_arguments_are_one_line_on_stderr_and_exit_code_2(capsys, monkeypatch, argv, needle):
    monkeypatch.delenv("ABD_DATA_ROOT", raising=False)
    monkeypatch.setattr(cli, "cmd_poison", lambda a: pytest.fail("ran despite bad input"))
    rc, out, err = _run(capsys, argv)
    assert rc == 2 and not out
    assert err.count("\n") == 1 and err.startswith("abd-plugin"), err
    assert needle in err and "Traceback" not in err


def test_out_must_be_writable(capsys, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    rc, _, err = _run(capsys, ["bench", "--out", str(afile / "sub")])
    assert rc == 2 and "--out: cannot write" in err
    rc, _, err = _run(capsys, ["poison", "--out", str(tmp_path)])
    assert rc == 2 and "is a directory" in err
    rc, out, _ = _run(capsys, ["bench", "--out", str(tmp_path / "new" / "dir"), "--dry-run"])
    assert rc == 0 and not (tmp_path / "new").exists()  # checked, not created


def test_dry_run_prints_the_checked_arguments(capsys):
    rc, out, err = _run(capsys, ["distill", "--dry-run", "--abd", '{"sr": false, '
                                 '"sv_coef_bounds": [0.5, 2]}', "--trigger", "none"])
    assert rc == 0 and not err
    got = json.loads(out)
    abd = got["abd"]
    assert abd["retrospection"]["enabled"] is False and abd["vaccine"]["coef_bounds"] == [0.5, 2]
    assert got["trigger"] == "none" and got["cmd"] == "distill"
    assert _run(capsys, ["distill", "--dataset", "digits", "--arch", "cnn5", "--dry-run"])[0] == 0


def _fake_teacher(asr):
    def train_teacher(spec, progress=None):
        return torch.nn.Linear(2, 2), {"acc": 97.0, "asr": asr, "spec": {}}
    return train_teacher


@pytest.mark.parametrize("asr,took", [(12.5, False), (99.0, True)])
def test_poison_says_loudly_when_the_backdoor_did_not_take(capsys, monkeypatch, tmp_path, asr,
                                                           took):
    import abd_plugin.kit.poison as poison

    monkeypatch.setattr(poison, "train_teacher", _fake_teacher(asr))
    rc, out, err = _run(capsys, ["poison", "--out", str(tmp_path / "t.pt")])
    assert rc == 0 and (tmp_path / "t.pt").exists()
    meta = json.loads(out.splitlines()[0])
    assert meta["backdoor_took"] is took
    if took:
        assert "warning" not in meta and "WARNING" not in err
    else:
        assert "did not take" in meta["warning"] and "ASR 12.5 % < 80 %" in meta["warning"]
        assert "WARNING: the backdoor did not take" in err
        assert "NOT a working backdoor" in out


# ------------------------------------------------------------------ property-based
SUBS = _subparsers(cli.build_parser())
TOKENS = ["0", "1", "9", "12", "-1", "0.5", "1.5", "2.5", "1e3", "nan", "inf", "abc", "", ",",
          "a,b", "0,1", "zskt", "zskt,dfad", "badnet_grid", "none", "mnist5k", "digits", "cifar10",
          "lenet5", "generator_zskt", "abd", "abd,none", "nope", "iga", "default+iga",
          "iga:gamma=3", "iga:gamma=-1", "iga:nope=1", "pgd", "pgd:eps=0.1", "nasty",
          "standard,nasty", "clean:temperature=4", '{"sr": false}', '{"sr": "no"}',
          '{"sv_coef": -1}', "{bad", "[1]", "/", "/nonexistent/dir/x", "--", "-x"]


@st.composite
def argv_lists(draw):
    sub = draw(st.sampled_from(sorted(SUBS) + ["frobnicate"]))
    flags = ([a.option_strings[0] for a in SUBS[sub]._actions
              if a.option_strings and a.dest not in ("help", "dry_run")] if sub in SUBS else [])
    argv = [sub]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 9))
        if flags and kind < 8:  # a known flag with a value (or, for a switch, alone)
            flag = draw(st.sampled_from(flags))
            argv.append(flag)
            if flag != "--no-clean-rows":
                argv.append(draw(st.sampled_from(TOKENS)))
        else:  # a stray token or an unknown flag
            argv.append(draw(st.sampled_from(TOKENS + ["--nope"])))
    return argv + ["--dry-run"]


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=argv_lists())
def test_random_argument_lists_validate_or_fail_cleanly(capsys, monkeypatch, argv):
    """Nothing runs (--dry-run); every list is either accepted (JSON on stdout) or refused with
    exit code 2 and one line on stderr naming the flag or command, never a traceback."""
    monkeypatch.delenv("ABD_DATA_ROOT", raising=False)
    rc, out, err = _run(capsys, argv)
    if rc == 0:
        json.loads(out)
        assert not err
        event("accepted")
    else:
        assert rc == 2, (argv, rc, err)
        assert err.count("\n") == 1 and err.startswith("abd-plugin"), (argv, err)
        assert "Traceback" not in err
        named = any(f.split("=")[0] in err for f in argv if f.startswith("--")) or any(
            w in err for w in ("invalid choice", "unrecognized arguments", "required"))
        assert named, (argv, err)
        event("refused (exit 2)")


# ------------------------------------------------------------------ real invocations
def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "abd_plugin", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_real_invocations_bad_input_and_help():
    r = _cli("poison", "--target", "12")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--target" in r.stderr and not r.stdout
    r = _cli("distill", "--abd", '{"n_shuffle_models": 2.5}')
    assert r.returncode == 2 and "ABDConfig.n_shuffle_models must be an integer" in r.stderr
    r = _cli("bench", "--help")
    assert r.returncode == 0 and "(default: runs/bench)" in " ".join(r.stdout.split())


def test_real_poison_run_reports_whether_the_backdoor_took(tmp_path):
    """One real, small training run (digits, 1 epoch, 1 % poisoned): the JSON says whether the
    backdoor took, and stderr warns when it did not."""
    env = {**os.environ, "ABD_CACHE": str(tmp_path / "cache")}
    r = _cli("poison", "--dataset", "digits", "--arch", "cnn5", "--epochs", "1", "--ratio",
             "0.01", "--out", str(tmp_path / "t.pt"), env=env)
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout.splitlines()[0])
    assert isinstance(meta["backdoor_took"], bool)
    assert (meta["asr"] >= 80) is meta["backdoor_took"]
    assert ("WARNING: the backdoor did not take" in r.stderr) is (not meta["backdoor_took"])
    assert (tmp_path / "t.pt").exists()
