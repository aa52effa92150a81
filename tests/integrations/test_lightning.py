"""ABDCallback against the real Lightning package, on a module shaped like
yukimasano/single-img-extrapolating's ``ImgDistill`` (fixed transfer set, ``kd_loss_fn``)."""
import csv
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from abd_fakes import common  # noqa: E402
from abd_fakes.common import TinyNet  # noqa: E402
from abd_plugin.eraser import EraserReport  # noqa: E402
from abd_plugin.integrations.lightning import ABDCallback  # noqa: E402
from abd_plugin.vaccine import VaccineReport  # noqa: E402
from conftest import global_hook_counts, module_hooks, state_differences  # noqa: E402


class Distill(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.teacher, self.student = TinyNet(), TinyNet()
        self.temperature = 4.0
        self.loss = torch.nn.KLDivLoss(reduction="batchmean")
        for p in self.teacher.parameters():
            p.requires_grad = False

    def kd_loss_fn(self, outputs, teacher_outputs):
        return self.loss(F.log_softmax(outputs / self.temperature, dim=1),
                         F.softmax(teacher_outputs / self.temperature, dim=1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        with torch.no_grad():
            t = self.teacher(x)
        return self.kd_loss_fn(self.student(x), t)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=1e-3)


class Recorder(pl.Callback):
    def on_before_backward(self, trainer, pl_module, loss):
        common.EVENTS.append("loss:S")

    def on_after_backward(self, trainer, pl_module):
        common.EVENTS.append("backward:S")


def _fit(module, cb, steps=4):
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.zeros(16))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Recorder(), cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer


def test_call_order_reweight_and_restore(events, fast_cfg):
    module = Distill()
    events.students.append(module.student)
    hooks0 = global_hook_counts()
    cb = ABDCallback("teacher", "student", **fast_cfg)
    _fit(module, cb)
    ev = [e for e in events if e != "sv"]
    assert ev == ["loss:S", "backward:S", "sr", "step:S"] * 4
    assert cb.sr_calls == 4 and cb.guard.step == 4
    assert cb.guard.report().get(VaccineReport).calls == 4  # one suspicion mask per batch
    assert "kd_loss_fn" not in vars(module)  # instance override removed
    assert global_hook_counts() == hooks0 and module_hooks(module) == 0


def test_reweight_is_kept_minus_coef_suspicious(fast_cfg):
    module = Distill()
    cb = ABDCallback(**fast_cfg)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False)
    cb.on_fit_start(trainer, module)
    try:
        x = torch.randn(6, 3, 8, 8)
        with torch.no_grad():
            t = module.teacher(x)
        s = module.student(x)
        got = module.kd_loss_fn(s, t)
        mask = cb.guard.suspicious(x, t)
        per = torch.stack([Distill.kd_loss_fn(module, s[i:i + 1], t[i:i + 1]) for i in range(6)])
        torch.testing.assert_close(got, cb.guard.reweight(per, mask))
    finally:
        cb.unpatch()
    assert "kd_loss_fn" not in vars(module) and module_hooks(module) == 0


def test_sr_window_from_estimated_steps(events, fast_cfg):
    fast_cfg.pop("sr_start_step")
    module = Distill()
    cb = ABDCallback(sr_start_fraction=0.5, reweight=None, **fast_cfg)
    _fit(module, cb, steps=4)
    assert cb.sr_calls == 2 and events.count("sr") == 2


def test_missing_module_is_named():
    from abd_plugin.integrations._common import HostMismatchError
    cb = ABDCallback("net_t", "student")
    with pytest.raises(HostMismatchError, match="net_t"):
        cb.on_fit_start(None, Distill())


# ------------------------------------------------------------------ logging to the trainer's logger
#: the default guard (audit, then eraser) with a small audit; the eraser on for class 0
LOGGED = dict(target=0, audit_steps=5, audit_starts=2, erase_every=1)


class LoggedDistill(Distill):
    def training_step(self, batch, batch_idx):
        self.teacher.eval()  # its BN statistics stay put: the teacher is compared bit for bit
        loss = super().training_step(batch, batch_idx)
        self.log("kd", loss)
        return loss


def _fit_csv(tmp_path, cb, steps=4, every=2):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = LoggedDistill()
    teacher0 = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.zeros(32))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(tmp_path),
                         log_every_n_steps=every, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k  # the teacher stays bit-identical
    path = f"{trainer.logger.log_dir}/metrics.csv"
    if not os.path.exists(path):  # nothing was logged
        return module, []
    with open(path, newline="") as f:
        return module, list(csv.DictReader(f))


def _column(rows, name):
    """(step, value) of the rows that hold ``name``."""
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


def test_csv_logger_gets_abd_figures(tmp_path):
    cb = ABDCallback(**LOGGED)
    _, rows = _fit_csv(tmp_path, cb, steps=4, every=2)
    report = cb.guard.report()
    audit, eraser = report.audit.audit, report.get(EraserReport)
    # the audit's figures once, at the end of the first batch (the audit ran in it)
    assert _column(rows, "abd/audit/p_value") == [(0, pytest.approx(audit.p_value, rel=1e-12))]
    assert _column(rows, "abd/audit/verdict") == [(0, {"clean": 0, "unsure": 1,
                                                       "poisoned": 2}[audit.verdict])]
    assert _column(rows, "abd/audit/poisoned") == [(0, float(audit.verdict == "poisoned"))]
    if audit.target is not None:
        assert _column(rows, "abd/audit/target") == [(0, audit.target)]
    # the eraser's at Lightning's logging steps (log_every_n_steps=2: steps 1 and 3), with
    # Lightning's own metric
    assert [s for s, _ in _column(rows, "kd")] == [1, 3]
    for name in ("fraction", "target", "updates", "flip", "kept", "price"):
        col = _column(rows, f"abd/erase/{name}")
        assert [s for s, _ in col] == [1, 3], name
        assert col[-1][1] == pytest.approx(float(getattr(eraser, name)), rel=1e-12)  # last: final
    assert _column(rows, "abd/erase/on") == [(1, 1.0), (3, 1.0)] and eraser.status == "on"
    assert [v for _, v in _column(rows, "abd/erase/updates")] == [2.0, 4.0]
    assert not any(k.startswith(("abd/sv", "abd/sr")) for k in rows[0])  # off: not logged


def test_csv_logger_gets_sv_sr_figures(tmp_path, fast_cfg):
    cb = ABDCallback(**fast_cfg)  # SV (reweighting kd_loss_fn) and SR, no audit, no eraser
    _, rows = _fit_csv(tmp_path, cb, steps=2, every=1)
    report = cb.guard.report()
    assert _column(rows, "abd/sr/steps") == [(0, 1.0), (1, 2.0)] and cb.sr_calls == 2
    assert _column(rows, "abd/sv/calls") == [(0, 1.0), (1, 2.0)]
    assert _column(rows, "abd/sv/coef")[-1][1] == report.get(VaccineReport).coef
    assert not any(k.startswith(("abd/audit", "abd/erase")) for k in rows[0])


def test_log_false_logs_nothing_and_logging_changes_nothing(tmp_path):
    quiet = ABDCallback(log=False, **LOGGED)
    module_q, rows_q = _fit_csv(tmp_path / "quiet", quiet, steps=3, every=1)
    assert rows_q and not any(k.startswith("abd/") for r in rows_q for k in r)
    assert [int(r["step"]) for r in rows_q] == [0, 1, 2]  # Lightning's own rows only
    loud = ABDCallback(**LOGGED)
    module_l, rows_l = _fit_csv(tmp_path / "loud", loud, steps=3, every=1)
    assert _column(rows_l, "abd/erase/fraction") and _column(rows_l, "abd/audit/p_value")
    # logging ran no model and moved no counter: the same guard state and student as without
    assert loud.guard.step == quiet.guard.step == 3
    assert state_differences(loud.guard.state_dict(), quiet.guard.state_dict()) == []
    for k, v in module_l.student.state_dict().items():
        assert torch.equal(v, module_q.student.state_dict()[k]), k


def test_no_logger_or_log_every_zero_logs_nothing(tmp_path, monkeypatch):
    from abd_plugin.integrations import _metrics

    taken = []
    monkeypatch.setattr(_metrics.MetricsFeed, "take_parts",
                        lambda self, rest=True: taken.append(rest) or ({}, {}))
    _fit(Distill(), ABDCallback(**LOGGED), steps=2)  # logger=False
    _fit_csv(tmp_path, ABDCallback(**LOGGED), steps=2, every=0)
    assert taken == []
