"""Learning a repair online, on the batches the teacher is fed."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _amp, _dist
from .._replica import TeacherReplica
from ..outputs import check_logits, extract_logits
from .base import InputRepair


class RepairLearner:
    """Learns an :class:`~abd_plugin.repair.InputRepair` ``R`` for a target class ``t`` on the
    loop's own teacher batches.

    On every ``every``-th *distinct* batch (a batch fed several times in a row, as ZSKT's student
    steps do, counts once) it takes ``steps`` Adam steps (learning rate ``lr``) on a frozen copy
    of the teacher ``T``:

        L(R) = mean_{i: T(x_i) = t} p_t(T(R(x_i)))            the target-class samples leave t
             + price * cost(R)                                with as little change as possible
             + keep_weight * KL(T(x_j) || T(R(x_j))), T(x_j) != t    the others keep their class

    A batch without a sample the teacher calls ``t`` is skipped (not an update). ``price`` is
    given per call (the re-audit may lower it during a run).

    Attributes:
        distinct_batches, updates: counters.
        last_flip: at the last update, the share of target samples the repaired teacher moves
            off the target; ``last_kept``: of the other samples whose class it keeps;
            ``last_target_fraction``: of the batch the teacher called the target.
    """

    def __init__(self, repair: InputRepair, replica: TeacherReplica, *, steps: int = 2,
                 every: int = 2, lr: float = 0.1, keep_weight: float = 1.0,
                 logits_fn: Callable[[Any], Tensor] | None = None) -> None:
        self.repair = repair
        self._replica = replica
        self.steps, self.every, self.lr = int(steps), int(every), float(lr)
        self.keep_weight = float(keep_weight)
        self.logits_fn = logits_fn
        self._opt: torch.optim.Adam | None = None
        self._opt_state: dict[str, Any] | None = None  # loaded before the parameters exist
        self._last_key: tuple[Any, ...] | None = None
        self.distinct_batches = 0
        self.updates = 0
        self.last_flip = float("nan")
        self.last_kept = float("nan")
        self.last_target_fraction = float("nan")

    # ------------------------------------------------------------------ schedule
    def new_batch(self, x: Tensor) -> bool:
        """Count ``x`` when it is not the batch seen last; True when it is due for an update."""
        key = (x.data_ptr(), x._version, tuple(x.shape), x.device)
        if key == self._last_key:
            return False
        self._last_key = key
        self.distinct_batches += 1
        return (self.distinct_batches - 1) % self.every == 0

    def forget_last_batch(self) -> None:
        """The next batch counts as new whatever it is (the guard's block ended)."""
        self._last_key = None

    # ------------------------------------------------------------------ the optimizer
    def prepare(self, x: Tensor) -> None:
        """Create or move the repair's parameters for inputs like ``x``, and (re)build the
        optimizer over them, carrying its state."""
        if self.repair.prepare(x) or self._opt is None:
            self._build_optimizer()

    def _build_optimizer(self) -> None:
        params = self.repair.parameters()
        if not params:
            return
        state = self._opt.state_dict() if self._opt is not None else self._opt_state
        self._opt = torch.optim.Adam(params, lr=self.lr)
        if state is not None:
            self._opt.load_state_dict(state)
        self._opt_state = None

    # ------------------------------------------------------------------ learning
    def learn(self, x: Tensor, target: int, price: float, *, distributed: bool = False) -> None:
        """``steps`` Adam steps of the repair on batch ``x`` (detached; frozen teacher).

        ``distributed``: every data-parallel rank calls this at the same update with its own
        batch; the decision to skip (no target sample on any rank) and every step's gradient
        are taken over all ranks, so all ranks hold the same repair (the flip term is the mean
        over all ranks' target samples)."""
        self.prepare(x)
        params = self.repair.parameters()
        model = self._replica.to_device_of(x)
        xd = x.detach()
        if xd.is_inference():  # made under torch.inference_mode(): autograd needs a copy
            xd = xd.clone()
        xd = _amp.cast_to_model(model, xd)  # autocast is off below: the model's own dtype
        t = target
        with torch.enable_grad(), torch.autocast(xd.device.type, enabled=False):
            if self.repair.before_update(model, xd, t, updates=self.updates,
                                         last_flip=self.last_flip, logits_fn=self.logits_fn,
                                         distributed=distributed):
                self._opt = None
                self._build_optimizer()
            xd = self.repair.learning_input(xd)
            with torch.no_grad():
                z0 = extract_logits(model(xd), self.logits_fn)
            check_logits(z0, xd.shape[0], "teacher logits")
            if not 0 <= t < z0.shape[1]:
                raise ValueError(f"target class {t} is out of range for a teacher with "
                                 f"{z0.shape[1]} classes")
            pred = z0.argmax(1)
            tgt = pred == t
            self.last_target_fraction = float(tgt.float().mean())
            n_targets = float(tgt.sum())
            if distributed:
                n_targets = float(_dist.all_reduce_sum(
                    torch.tensor([n_targets], dtype=torch.float64))[0])
            if n_targets == 0:
                return
            other = ~tgt
            need = self.repair.min_other_fraction
            if need > 0:  # a batch (nearly) all target: a step would only drift
                share = float(other.float().mean())
                if distributed:
                    share = float(_dist.all_reduce_sum(
                        torch.tensor([share], dtype=torch.float64))[0]) / _dist.world_size()
                if share < need:
                    return
            logp0 = F.log_softmax(z0.float(), dim=1)
            assert self._opt is not None
            log_flip = self.repair.flip_loss == "log"
            for _ in range(self.steps):
                xr, cost = self.repair.learning_view(xd)
                z = extract_logits(model(xr), self.logits_fn).float()
                pt = F.softmax(z, dim=1)[:, t]
                if log_flip:
                    pt = -torch.log1p(-pt.clamp(max=1 - 1e-6))
                if distributed:  # this rank's share of the mean over every rank's targets
                    flip = pt[tgt].sum() * (_dist.world_size() / n_targets)
                else:
                    flip = pt[tgt].mean()
                loss = flip + price * cost
                if bool(other.any()) and self.keep_weight > 0:
                    loss = loss + self.keep_weight * F.kl_div(
                        F.log_softmax(z[other], dim=1), logp0[other], log_target=True,
                        reduction="batchmean")
                self._opt.zero_grad(set_to_none=True)
                grads = list(torch.autograd.grad(loss, params))
                if distributed:
                    grads = _dist.all_reduce_mean(grads)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                self._opt.step()
                for p in params:
                    p.grad = None
            with torch.no_grad():  # the last step's outputs, one step behind: no extra forward
                pz = z.argmax(1)
                self.last_flip = (float((pz[tgt] != t).float().mean()) if bool(tgt.any())
                                  else float("nan"))
                self.last_kept = (float((pz[other] == pred[other]).float().mean())
                                  if bool(other.any()) else 1.0)
        self.updates += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": None if self._opt is None else self._opt.state_dict(),
                "counters": {"distinct_batches": self.distinct_batches, "updates": self.updates,
                             "last_flip": self.last_flip, "last_keep": self.last_kept,
                             "last_target_fraction": self.last_target_fraction}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._opt = None
        self._opt_state = state["optimizer"]
        if self.repair.ready:
            self._build_optimizer()
        c = state["counters"]
        self.distinct_batches, self.updates = int(c["distinct_batches"]), int(c["updates"])
        self.last_flip, self.last_kept = float(c["last_flip"]), float(c["last_keep"])
        self.last_target_fraction = float(c["last_target_fraction"])
        self._last_key = None
