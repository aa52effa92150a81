"""ABDCallback against the real Lightning package, on a module shaped like
yukimasano/single-img-extrapolating's ``ImgDistill`` (fixed transfer set, ``kd_loss_fn``)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from abd_fakes import common  # noqa: E402
from abd_fakes.common import TinyNet  # noqa: E402
from abd_plugin.integrations.lightning import ABDCallback  # noqa: E402
from abd_plugin.vaccine import VaccineReport  # noqa: E402
from conftest import global_hook_counts, module_hooks  # noqa: E402


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
