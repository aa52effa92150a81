"""Trigger eraser: the default defense. Once the audit names a target class, learn which input
region makes the teacher's samples go to that class, and erase it from every input the teacher
sees inside the guard.

Shape of the defense
--------------------
* **A soft mask, learned online.** ``m = sigmoid(a)`` has one value per input position (shared by
  the channels). Erasing sets ``x_e = (1 - m) * x + m * fill``. On every ``erase_every``-th
  distinct batch the teacher is fed (a generator's samples, inverted pixels, a transfer set), the
  mask takes ``erase_steps`` Adam steps on a frozen copy of the teacher:

      L(m) = mean_{i: T(x_i) = t} p_t(T(x_e,i))              flip the target-class samples
           + erase_price * mean(m)                            with as little area as possible
           + erase_keep * KL(T(x_j) || T(x_e,j)), T(x_j) != t  and leave the other samples alone

  A backdoor's trigger is a small region that sends any input to ``t``: erasing it flips most
  target samples at little price and changes no other class, so the mask converges onto the
  region where the teacher reacts to the trigger. A natural target-class sample needs a large,
  class-specific region to flip, which the price and the keep term make too expensive.
* **The teacher sees erased inputs everywhere in the loop.** A forward pre-hook on the teacher
  (event ``on_teacher_input``) replaces each input by its erased version, so the student's
  targets and the generator's loss come from the same repaired teacher: an adversarial generator
  has no gap between two teachers to chase, and the student learns that the erased region does
  not decide the class. The erasure is one multiply-add per input; the cost is the mask's own
  updates. Gradients still reach a generator through the pixels that are not erased.
* **Gated by the audit.** The eraser runs only when the guard's audit flags the teacher
  (``erase_on``), or when the user names the ``target``. A teacher the audit calls clean gets
  nothing: the pre-hook returns the input untouched and no update ever runs.
* **Checked, and widened when it misses.** Every ``erase_recheck`` updates (the first check after
  twice that many, once the mask has settled) the eraser audits the
  *erased* teacher for the target class alone (the same margin search, through the mask) and
  compares the target's statistic with the other classes' statistics from the first audit. A
  mask that covers the trigger brings the target back among the others; a mask that covers only
  part of a spread trigger (a watermark of thin strokes) leaves it an outlier: the price then
  drops to ``erase_price_low`` so the mask can grow, and the checks stop. They also stop after
  two checks in a row find the target back among the others. Each check is in the report.
* ``erase_only_target=True`` erases only the inputs the teacher calls the target (one extra
  forward of the frozen copy per batch to find them).

The teacher itself is never modified: the pre-hook changes what this forward receives, the mask
is learned on a frozen copy, and every hook is removed when the guard exits.
"""

from __future__ import annotations

import enum
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _amp
from ._replica import TeacherReplica
from .audit import (
    AuditReport,
    AuditSettings,
    infer_input_range,
    max_margin_statistic,
    order_pvalues,
)
from .config import ABDConfig
from .hooks import DefenseHook, GuardContext
from .outputs import check_logits, extract_logits


class EraserStatus(str, enum.Enum):
    """Where the eraser stands."""

    WAITING = "waiting"  # no teacher batch (hence no audit) yet
    ON = "on"  # erasing
    OFF_CLEAN = "off-clean"  # the audit found no backdoor (or not enough evidence for erase_on)
    OFF_NO_AUDIT = "off-no-audit"  # audit disabled and no target given


class TriggerEraser(DefenseHook):
    """Learn and erase the trigger region of the target class (see the module docstring).

    Args:
        teacher: the (possibly poisoned) teacher; never modified.
        config: reads the ``erase_*`` fields, ``target`` and ``logits_fn``.
        replica: share the guard's frozen copy of the teacher.

    Standalone use (without a guard) is possible: call :meth:`arm` with the target, then
    :meth:`learn` on batches and :meth:`erase` on the teacher's inputs.
    """

    name = "erase"

    def __init__(self, teacher: nn.Module, config: ABDConfig | None = None, *,
                 replica: TeacherReplica | None = None) -> None:
        self.config = config or ABDConfig()
        self._replica = replica or TeacherReplica(teacher)
        self.status = EraserStatus.WAITING
        self.target: int | None = None
        self.reason = "no teacher batch seen yet"
        self._logits: Tensor | None = None  # the mask's logits, (1, 1, *spatial) or (1, F)
        self._opt: torch.optim.Adam | None = None
        self._opt_state: dict[str, Any] | None = None  # loaded before the mask exists
        self._last_key: tuple[Any, ...] | None = None
        self.distinct_batches = 0
        self.updates = 0
        self.erased_batches = 0
        self.last_flip = float("nan")  # target samples the erased teacher moves off the target
        self.last_keep = float("nan")  # other samples whose class the erasure keeps
        self.last_target_fraction = float("nan")  # samples the teacher calls the target
        self.price = float(self.config.erase_price)  # lowered by the re-audit (erase_recheck)
        self.audit: AuditReport | None = None  # the audit that armed the eraser (for re-audits)
        self.rechecks: list[dict[str, Any]] = []  # update, statistic, p-value, price after
        self._fill: Tensor | None = None  # per channel (erase_fill=None), fixed at the first batch

    # ------------------------------------------------------------------ gating
    def arm(self, target: int, reason: str = "") -> None:
        """Start erasing for class ``target``."""
        self.target = int(target)
        self.status = EraserStatus.ON
        self.reason = reason or f"target class {self.target} given"

    def decide(self, audit: AuditReport | None) -> None:
        """Arm or stay off from the audit's verdict (and ``config.target`` / ``erase_on``)."""
        cfg = self.config
        if cfg.target is not None:
            self.audit = audit
            self.arm(cfg.target, f"target class {cfg.target} given in the config")
            return
        if audit is None:
            self.status = EraserStatus.OFF_NO_AUDIT
            self.reason = "no audit ran (audit=False) and no target was given"
            return
        flagged = {"poisoned": audit.verdict == "poisoned",
                   "flagged": audit.verdict in ("poisoned", "unsure"),
                   "always": True}[cfg.erase_on]
        self.audit = audit
        if flagged:
            self.arm(audit.suspect, f"audit verdict {audit.verdict} (erase_on={cfg.erase_on!r})")
        else:
            self.status = EraserStatus.OFF_CLEAN
            self.reason = f"audit verdict {audit.verdict} (erase_on={cfg.erase_on!r})"

    # ------------------------------------------------------------------ the mask
    def _ensure_mask(self, x: Tensor) -> Tensor:
        shape = (1, 1) + tuple(x.shape[2:]) if x.dim() >= 3 else (1,) + tuple(x.shape[1:])
        if self._logits is None or tuple(self._logits.shape) != shape:
            if self._logits is not None:
                raise ValueError(
                    f"the trigger eraser learned a mask of shape {tuple(self._logits.shape)} but "
                    f"the teacher now gets inputs of shape {tuple(x.shape[1:])}; one guard "
                    "serves one input size (use a guard per resolution)")
            self._logits = torch.full(shape, -4.0, device=x.device).requires_grad_(True)
            self._opt = torch.optim.Adam([self._logits], lr=self.config.erase_lr)
            if self._opt_state is not None:
                self._opt.load_state_dict(self._opt_state)
                self._opt_state = None
        elif self._logits.device != x.device:
            with torch.no_grad():
                moved = self._logits.detach().to(x.device).requires_grad_(True)
            state = self._opt.state_dict() if self._opt is not None else None
            self._logits = moved
            self._opt = torch.optim.Adam([self._logits], lr=self.config.erase_lr)
            if state is not None:
                self._opt.load_state_dict(state)
        return self._logits

    def fill(self, x: Tensor) -> Tensor:
        """The value erased positions take, shaped to broadcast over ``x`` (see
        ``ABDConfig.erase_fill``); resolved once, on the first batch, and kept."""
        if self._fill is None:
            self._fill = resolve_fill(self.config, x)
        return self._fill.to(device=x.device, dtype=x.dtype)

    def mask(self) -> Tensor | None:
        """The current soft mask in [0, 1] (detached), or None before the first batch."""
        return None if self._logits is None else torch.sigmoid(self._logits.detach())

    def erase(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(1 - m) * x + m * fill`` with the current mask (differentiable in ``x``)."""
        m = self.mask() if mask is None else mask
        if m is None:
            return x
        m = m.to(device=x.device, dtype=x.dtype)
        return _blend(x, m, self.fill(x))

    # ------------------------------------------------------------------ learning
    def learn(self, x: Tensor) -> None:
        """``erase_steps`` Adam steps of the mask on batch ``x`` (detached; frozen teacher)."""
        assert self.target is not None, "arm() first"
        cfg = self.config
        logits_param = self._ensure_mask(x)
        model = self._replica.to_device_of(x)
        xd = x.detach()
        if xd.is_inference():  # made under torch.inference_mode(): autograd needs a copy
            xd = xd.clone()
        xd = _amp.as_input_of(model, xd)
        t = self.target
        with torch.enable_grad(), torch.autocast(xd.device.type, enabled=False):
            with torch.no_grad():
                z0 = extract_logits(model(xd), cfg.logits_fn)
            check_logits(z0, xd.shape[0], "teacher logits")
            if not 0 <= t < z0.shape[1]:
                raise ValueError(f"target class {t} is out of range for a teacher with "
                                 f"{z0.shape[1]} classes")
            pred = z0.argmax(1)
            tgt = pred == t
            self.last_target_fraction = float(tgt.float().mean())
            if not bool(tgt.any()):
                return
            other = ~tgt
            logp0 = F.log_softmax(z0.float(), dim=1)
            assert self._opt is not None
            fill = self.fill(xd)
            for _ in range(cfg.erase_steps):
                m = torch.sigmoid(logits_param).to(xd.dtype)
                z = extract_logits(model(_blend(xd, m, fill)), cfg.logits_fn).float()
                loss = F.softmax(z[tgt], dim=1)[:, t].mean() + self.price * m.float().mean()
                if bool(other.any()) and cfg.erase_keep > 0:
                    loss = loss + cfg.erase_keep * F.kl_div(
                        F.log_softmax(z[other], dim=1), logp0[other], log_target=True,
                        reduction="batchmean")
                self._opt.zero_grad(set_to_none=True)
                (g,) = torch.autograd.grad(loss, [logits_param])
                logits_param.grad = g
                self._opt.step()
                logits_param.grad = None
            with torch.no_grad():  # the last step's outputs, one step behind: no extra forward
                pz = z.argmax(1)
                self.last_flip = float((pz[tgt] != t).float().mean())
                self.last_keep = (float((pz[other] == pred[other]).float().mean())
                                  if bool(other.any()) else 1.0)
        self.updates += 1

    def recheck(self) -> dict[str, Any] | None:
        """Re-audit the erased teacher for the target class (see the module docstring); lower
        the price when the target still stands out. Returns the check's record, or None when
        there is nothing to compare with (no audit, no mask yet)."""
        a, m, t = self.audit, self.mask(), self.target
        if a is None or m is None or t is None or len(a.statistic) < 3 or self._fill is None:
            return None
        cfg = self.config
        model = self._replica.module
        settings = AuditSettings.from_config(cfg, seed=cfg.seed + 1 + len(self.rechecks))
        erased = _Erased(model, m, self._fill)
        stat = max_margin_statistic(erased, a.input_shape, len(a.statistic),
                                    input_range=a.input_range, settings=settings,
                                    logits_fn=cfg.logits_fn, classes=[t])
        mixed = torch.tensor(a.statistic, dtype=torch.float64)
        mixed[t] = stat[t]
        p = float(order_pvalues(mixed)[t])
        stands_out = p < a.alpha
        if stands_out and self.price > cfg.erase_price_low:
            self.price = cfg.erase_price_low
        rec = {"update": self.updates, "statistic": float(stat[t]), "p_value": p,
               "stands_out": stands_out, "price": self.price}
        self.rechecks.append(rec)
        return rec

    def rechecks_done(self) -> bool:
        """No more re-audits: the price was lowered, or the last two found the target back
        among the other classes (the mask covers the trigger, and its price does not change)."""
        last = self.rechecks[-2:]
        return (self.price <= self.config.erase_price_low
                or (len(last) == 2 and not any(r["stands_out"] for r in last)))

    def _recheck_due(self) -> bool:
        cfg = self.config
        # the first check after two periods: the mask starts near zero and needs time to settle
        return (cfg.erase_recheck > 0 and self.updates >= 2 * cfg.erase_recheck
                and self.updates % cfg.erase_recheck == 0 and self.audit is not None
                and not self.rechecks_done()
                and (not self.rechecks or self.rechecks[-1]["update"] != self.updates))

    def _new_batch(self, x: Tensor) -> bool:
        key = (x.data_ptr(), x._version, tuple(x.shape), x.device)
        if key == self._last_key:
            return False
        self._last_key = key
        return True

    # ------------------------------------------------------------------ DefenseHook
    def on_teacher_input(self, ctx: GuardContext, x: Tensor) -> Tensor | None:
        if self.status is EraserStatus.WAITING:
            self.decide(ctx.audit)
        if self.status is not EraserStatus.ON:
            return None
        if self._new_batch(x):
            self.distinct_batches += 1
            if (self.distinct_batches - 1) % self.config.erase_every == 0:
                with ctx.suspended():
                    self.learn(x)
                    if self._recheck_due():
                        self.recheck()
        self._ensure_mask(x)
        self.erased_batches += 1
        if not self.config.erase_only_target:
            return self.erase(x)
        assert self.target is not None
        with ctx.suspended(), torch.no_grad():
            model = self._replica.to_device_of(x)
            pred = extract_logits(model(_amp.as_input_of(model, x.detach())),
                                  self.config.logits_fn).argmax(1)
        rows = pred.eq(self.target).view((-1,) + (1,) * (x.dim() - 1))
        return torch.where(rows, self.erase(x), x)

    def on_guard_exit(self, ctx: GuardContext) -> None:
        self._last_key = None

    # ------------------------------------------------------------------ report and state
    def report(self) -> dict[str, Any]:
        m = self.mask()
        return {
            "erase_status": self.status.value,
            "erase_reason": self.reason,
            "erase_target": self.target,
            "erase_pixels": 0 if m is None else int((m > 0.5).sum()),
            "erase_mass": 0.0 if m is None else float(m.sum()),
            "erase_fraction": 0.0 if m is None else float(m.mean()),
            "erase_updates": self.updates,
            "erase_batches": self.erased_batches,
            "erase_flip": self.last_flip,
            "erase_keep": self.last_keep,
            "erase_target_fraction": self.last_target_fraction,
            "erase_price": self.price,
            "erase_rechecks": [dict(r) for r in self.rechecks],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value, "target": self.target, "reason": self.reason,
            "mask_logits": None if self._logits is None else self._logits.detach().cpu().clone(),
            "optimizer": None if self._opt is None else self._opt.state_dict(),
            "counters": {"distinct_batches": self.distinct_batches, "updates": self.updates,
                         "erased_batches": self.erased_batches, "last_flip": self.last_flip,
                         "last_keep": self.last_keep,
                         "last_target_fraction": self.last_target_fraction},
            "price": self.price, "rechecks": [dict(r) for r in self.rechecks],
            "fill": None if self._fill is None else self._fill.detach().cpu().clone(),
            "audit": None if self.audit is None else asdict(self.audit),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.status = EraserStatus(state["status"])
        self.target = state["target"]
        self.reason = state["reason"]
        logits = state["mask_logits"]
        self._logits = None if logits is None else logits.clone().requires_grad_(True)
        self._opt = None
        self._opt_state = state["optimizer"]
        if self._logits is not None:
            self._opt = torch.optim.Adam([self._logits], lr=self.config.erase_lr)
            if self._opt_state is not None:
                self._opt.load_state_dict(self._opt_state)
                self._opt_state = None
        c = state["counters"]
        self.distinct_batches, self.updates = int(c["distinct_batches"]), int(c["updates"])
        self.erased_batches = int(c["erased_batches"])
        self.last_flip, self.last_keep = float(c["last_flip"]), float(c["last_keep"])
        self.last_target_fraction = float(c["last_target_fraction"])
        # states saved before the re-audit existed resume at the configured price
        self.price = float(state.get("price", self.config.erase_price))
        self.rechecks = [dict(r) for r in state.get("rechecks", [])]
        audit = state.get("audit")
        self.audit = None if audit is None else AuditReport(**audit)
        fill = state.get("fill")
        self._fill = None if fill is None else fill.clone()
        self._last_key = None


def _blend(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    """The erasure: ``(1 - m) * x + m * fill`` (one formula for the hook, the mask's learning and
    the re-audit)."""
    return x * (1 - m) + fill * m


def resolve_fill(config: ABDConfig, x: Tensor) -> Tensor:
    """``config.erase_fill`` as a tensor that broadcasts over batches like ``x``: the number
    itself, or (``None``) the low end of the input range per channel (see ``ABDConfig``)."""
    if config.erase_fill is not None:
        return torch.tensor(float(config.erase_fill), dtype=torch.float64)
    if config.input_range is not None:
        return torch.tensor(float(config.input_range[0]), dtype=torch.float64)
    low_r, high_r = infer_input_range(x)
    known = max(high_r) <= 1.0 and min(low_r) >= -1.0  # [0, 1] or [-1, 1]
    if x.dim() < 3:  # feature vectors: no channels; the known range's low end, else 0
        return torch.tensor(low_r[0] if known else 0.0, dtype=torch.float64)
    channels = x.shape[1]
    if known:
        low = torch.tensor(low_r, dtype=torch.float64)
    else:  # each channel's minimum over this batch (black, for normalised images)
        low = x.detach().double().transpose(0, 1).reshape(channels, -1).min(dim=1).values.cpu()
    return low.reshape((1, channels) + (1,) * (x.dim() - 2))


class _Erased(nn.Module):
    """``model`` fed erased inputs (the re-audit's view of the teacher inside the guard)."""

    def __init__(self, model: nn.Module, mask: Tensor, fill: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask.detach().clone())
        self.register_buffer("fill", fill.detach().clone())

    def forward(self, x: Tensor) -> Any:
        m = self.get_buffer("mask").to(device=x.device, dtype=x.dtype)
        f = self.get_buffer("fill").to(device=x.device, dtype=x.dtype)
        return self.model(_blend(x, m, f))
