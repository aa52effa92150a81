"""ABDGuard under DistributedDataParallel: 2 processes, gloo, CPU, launched with torchrun.

The test runs this file as the worker script (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_ddp.py --worker OUT``). Every rank trains a DDP-wrapped student and
a DDP-wrapped generator in a small ZSKT loop on its own random data, with the guard in automatic
mode (verification with automatic depth, then SV; SR in a late window), and saves what the checks
need. The test then asserts, across ranks:

* the same shuffle layers, permutations and verification trials/decision (SV's statistics are
  summed over ranks, so every rank takes the same decision);
* SR's local gradients differ (different data) but the gradients added to ``.grad`` are the same
  on every rank and equal the mean of the local ones (``SelfRetrospection._all_reduce``: DDP
  all-reduces only what ``backward`` produced);
* the student and generator parameters stay identical, and the guard counted every student step.

A second guarded run, the default guard (the audit, and the eraser armed for a given target)
on inputs of a rank-dependent, unknown scale, checks that every rank takes the same decisions:
the same input domain, audit verdict and target, the same mask after every update, and the same
re-audits.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

N_ITER = 6  # pseudo batches
N_STUDENT = 2  # student steps per pseudo batch
SR_START = 8  # SR runs on student steps 8..11
BATCH = 8


def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from abd_plugin import ABDConfig, ABDGuard
    from abd_plugin.kit.models import get_model
    from abd_plugin.retrospection import RetrospectionReport
    from abd_plugin.vaccine import VaccineReport

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # identical initial models on every rank
        teacher = get_model("cnn5", width=8).eval().requires_grad_(False)
        student = DDP(get_model("cnn5", width=4))
        generator = DDP(get_model("generator_zskt", z_dim=16, img_size=16))
        opt_s = torch.optim.Adam(student.parameters(), lr=2e-3)
        opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
        data = torch.Generator().manual_seed(1000 + rank)  # each rank sees its own data

        guard = ABDGuard(
            teacher,
            student,
            config=ABDConfig.classic(),  # SV + SR: the default audit + eraser is off here
            verify=True,
            verify_skip=1,
            verify_batches=3,
            shuffle_layers="auto",
            auto_max_depth=2,
            max_shuffle_trials=2,
            tail_ratio_threshold=-1.0,  # always accept: SV runs
            sr_start_step=SR_START,
            sr_inner_rounds=2,
            sr_fixed_point_iters=2,
            seed=0,
        )
        assert guard.sr is not None
        local: list[torch.Tensor] = []
        reduced: list[torch.Tensor] = []
        all_reduce = guard.sr._all_reduce

        def spy(grads: list[torch.Tensor]) -> list[torch.Tensor]:
            local.append(torch.cat([g.detach().reshape(-1) for g in grads]).clone())
            out = all_reduce(grads)
            reduced.append(torch.cat([g.detach().reshape(-1) for g in out]).clone())
            return out

        guard.sr._all_reduce = spy  # type: ignore[method-assign]

        def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")

        with guard:
            for _ in range(N_ITER):
                x = generator(torch.randn(BATCH, 16, generator=data))
                loss_g = -kl(student(x), teacher(x))
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                x = x.detach()
                with torch.no_grad():
                    t = teacher(x)
                for _ in range(N_STUDENT):
                    loss_s = kl(student(x), t)
                    opt_s.zero_grad()
                    loss_s.backward()
                    opt_s.step()
        sv = guard.sv
        assert sv is not None
        rep = guard.report()
        default = _default_guard_run(teacher, student, generator, opt_s, rank)
        torch.save({
            **default,
            "rank": rank, "world": world,
            "layers": list(sv.ensemble.layers),
            "perms": {k: v.clone() for k, v in sv.ensemble.perms.items()},
            "status": sv.status, "trials": list(sv.trials),
            "sv_calls": rep.get(VaccineReport).calls,
            "trunk_module": sv.ensemble.trunk_module,
            "sr_local": local, "sr_reduced": reduced,
            "sr_steps": rep.get(RetrospectionReport).steps, "steps": guard.step,
            "student": torch.cat([p.detach().reshape(-1) for p in student.parameters()]),
            "generator": torch.cat([p.detach().reshape(-1) for p in generator.parameters()]),
        }, Path(out_dir) / f"rank{rank}.pt")
        # Teardown: the DDP reducers hold the process group; drop them before destroying it so
        # that gloo's worker threads end here, not during interpreter finalization (where an
        # in-flight tensor's destructor can abort the process: pytorch/pytorch#179291).
        del guard, student, generator, opt_s, opt_g
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.done").touch()


def _default_guard_run(teacher: Any, student: Any, generator: Any, opt_s: Any,
                       rank: int) -> dict[str, Any]:
    """The default guard (audit on; the eraser armed for the teacher's favourite class, so it
    learns on every rank) on each rank's own batches, scaled differently per rank (an unknown
    input range: the domain is read off the first batch)."""
    import torch.nn.functional as F

    from abd_plugin import ABDGuard

    with torch.no_grad():  # the same on every rank
        probe = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        target = int(teacher(probe).argmax(1).mode().values)
    data = torch.Generator().manual_seed(2000 + rank)
    guard = ABDGuard(teacher, student, target=target, erase_every=1, erase_recheck=2,
                     audit_steps=5, audit_starts=2)
    masks = []
    with guard:
        for _ in range(N_ITER):
            with torch.no_grad():
                x = generator(torch.randn(BATCH, 16, generator=data)) * (3 + rank) + 0.5
                t = teacher(x)
            loss_s = F.kl_div(F.log_softmax(student(x), 1), F.softmax(t, 1),
                              reduction="batchmean")
            opt_s.zero_grad()
            loss_s.backward()
            opt_s.step()
            er = guard.eraser
            assert er is not None and er.mask() is not None
            masks.append(er.mask().clone())
    er = guard.eraser
    assert er is not None and guard.audit_report is not None and guard.domain is not None
    a = guard.audit_report
    return {"default_masks": masks, "default_updates": er.updates,
            "default_rechecks": [dict(r) for r in er.rechecks],
            "default_audit": (a.verdict, a.suspect, a.statistic),
            "default_domain": guard.domain, "default_fill": er.repair.fill}


def _launch(out_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", str(out_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # One relaunch if the first run dies: a worker killed by a signal at shutdown was seen once
    # in CI (gloo teardown, not reproduced in 27 local runs). A deterministic failure fails both.
    failures = []
    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"ddp{attempt}")
        proc = _launch(out)
        if proc.returncode == 0:
            break
        failures.append(f"attempt {attempt}: rc {proc.returncode}, finished ranks "
                        f"{sorted(p.name for p in out.glob('*.done'))}\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, "torchrun failed twice:\n" + "\n".join(failures)
    if failures:
        warnings.warn("DDP worker failed once, passed on relaunch:\n" + failures[0], stacklevel=1)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_same_vaccine_and_decision_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks
    assert a["status"] == b["status"] == "enabled"
    assert a["layers"] == b["layers"] and a["perms"].keys() == b["perms"].keys()
    for name in a["perms"]:
        assert torch.equal(a["perms"][name], b["perms"][name]), name
    assert a["trials"] == b["trials"] and len(a["trials"]) >= 2  # every auto depth scored alike
    assert a["trunk_module"] == b["trunk_module"]
    assert a["sv_calls"] > 0 and a["sv_calls"] == b["sv_calls"]  # SV ran after verification


def test_sr_gradients_all_reduced(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks
    n_sr = N_ITER * N_STUDENT - SR_START
    assert a["sr_steps"] == b["sr_steps"] == n_sr
    assert len(a["sr_reduced"]) == len(b["sr_reduced"]) == n_sr
    # the first SR step starts from identical students, so the local gradients differ only
    # because the data differ; the added gradients are their mean on both ranks
    la, lb = a["sr_local"][0], b["sr_local"][0]
    assert not torch.allclose(la, lb)
    mean = (la + lb) / 2
    for r in (a, b):
        torch.testing.assert_close(r["sr_reduced"][0], mean, rtol=1e-5, atol=1e-7)
    for ga, gb in zip(a["sr_reduced"], b["sr_reduced"], strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_ddp_student_in_automatic_mode_stays_in_sync(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks
    assert a["steps"] == b["steps"] == N_ITER * N_STUDENT
    torch.testing.assert_close(a["student"], b["student"], rtol=0, atol=0)
    torch.testing.assert_close(a["generator"], b["generator"], rtol=0, atol=0)


def test_the_default_guard_decides_alike_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks
    assert a["default_domain"] == b["default_domain"]  # read off rank 0's first batch
    torch.testing.assert_close(a["default_fill"], b["default_fill"], rtol=0, atol=0)
    assert a["default_audit"] == b["default_audit"]
    assert a["default_updates"] == b["default_updates"] > 0
    for ma, mb in zip(a["default_masks"], b["default_masks"], strict=True):
        torch.testing.assert_close(ma, mb, rtol=0, atol=0)  # the same erasure of every input
    assert not torch.equal(a["default_masks"][-1], a["default_masks"][0])  # it learned
    assert a["default_rechecks"] == b["default_rechecks"] and len(a["default_rechecks"]) >= 1


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
