"""A per-frequency gain over the image: the repair for triggers spread over the whole input (a
blended pattern, a sinusoid, a warp), which a sparse mask cannot cover without erasing the image.

Shape (2-D DCT over the last two axes, one gain per coefficient shared by the channels; inputs
are first scaled to the unit box of the input domain, ``u = (x - low) / (high - low)``)::

    R(x) = low + (high - low) * clamp(IDCT(G_keep * DCT(clamp(IDCT(G_inv * DCT(u))))))

Two gains, learned in two ways on the loop's own teacher batches:

* ``G_inv`` — **inversion**: a log-gain ``h`` (DC left alone) is trained to send inputs of the
  *other* classes to the suspect ``t`` (data-free class-balanced exemplars from
  :func:`~abd_plugin.universal.inversion_base` plus the batch's non-``t`` samples), with an L1
  price on ``h``: it finds the frequencies a trigger lives in (a blend noise's high band, a
  sinusoid's line, a warp's edge sharpening). The view applies its regularised inverse,
  ``min(exp(-h), gmax)``.
* ``G_keep = 1 - sigmoid(d) + boost * sigmoid(v)`` (``v`` without DC: never brighten) —
  **flip / keep**: the eraser's objective (:class:`~abd_plugin.repair.RepairLearner`): the
  teacher's ``t`` samples leave ``t`` through the view, the others keep their class, at a price
  on ``cost = (mean sigmoid(d) + mean sigmoid(v)) / 2``. At the first update, and every
  ``probe_every`` updates while the view flips fewer than half of them, a few canonical bands
  (remove DC / low / high frequencies, boost high ones) compete with the current gain on the
  batch; one that does clearly better is added to it. This escapes the flat start where no
  partial change flips anything (a BatchNorm teacher whose trigger is "any bright background").

Scratch measurements that chose this shape (ZSKT, LeNet-5, mnist5k, one seed, target given):
blend 29.9 / 58.2 -> 90.0 / 0.0 (ACC / ASR %), sinusoid 84.0 / 72.9 -> 80.2 / 0.8, WaNet 45.1 /
57.3 -> 86.1 / 0.3; LeNet-5-BN blend 10.0 / 100 -> 66.2 / 0.0; LeNet-5-BN WaNet not repaired.
The gain alone (no inversion) missed WaNet and both BatchNorm cells; a blend head, a soft DCT
mask and a fixed blur did worse. It is only used through the eraser's probation
(:mod:`abd_plugin.repair.probation`), which decides whether it acts.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _dist
from ..outputs import extract_logits
from .base import InputRepair


def dct_matrix(n: int, *, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``D @ D.T = I``): ``D @ x`` transforms the rows'
    axis."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    d[0] *= 1 / math.sqrt(2)
    d *= math.sqrt(2 / n)
    return d.to(device=device, dtype=dtype)


def _radius(h: int, w: int) -> Tensor:
    u = torch.arange(h, dtype=torch.float32).view(-1, 1) * (32.0 / max(h, 1))
    v = torch.arange(w, dtype=torch.float32).view(1, -1) * (32.0 / max(w, 1))
    return torch.sqrt(u ** 2 + v ** 2).view(1, 1, h, w)


def rescale_logits(view: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
    """``view``'s logits (B, C) at ``raw``'s scale: centred per row, times the batch's ratio of
    the mean per-row standard deviations (raw over view), plus ``raw``'s row mean. Each row's
    order of classes (its label, its ranking) is ``view``'s; gradients flow through ``view``
    (the factor is a constant). Flat logits (no spread) are returned as they are. Returns the
    logits and the factor (a 0-d tensor: no device sync here)."""
    if view.shape[1] < 2:
        return view, view.new_ones((), dtype=torch.float32)
    v, r = view.detach().float(), raw.detach().float()
    spread = v.std(1).mean()
    ok = torch.isfinite(spread) & (spread > 1e-6)
    factor = torch.where(ok, r.std(1).mean() / spread.clamp_min(1e-6), torch.ones_like(spread))
    shift = torch.where(ok, r.mean(1, keepdim=True), v.mean(1, keepdim=True))
    out = (view - view.mean(1, keepdim=True)) * factor.to(view.dtype) + shift.to(view.dtype)
    return out, factor


def cap_target(value: Tensor, raw: Tensor, view: Tensor, target: int, rows: Tensor,
               *, shift: bool = True) -> Tensor:
    """``value`` (B, C) with column ``target`` capped, on ``rows`` (a (B,) bool mask), at
    ``view``'s value there plus the batch's typical gap: the median of ``raw - view`` in that
    column over ``rows`` (at least 0; 0 when ``rows`` is empty). The view's target logit sits
    below the raw teacher's on *every* row (the gain is trained to move the target's samples
    off it): the median gap keeps that common level, and only a row's excess over it (the
    backdoor's soft signal on a trigger-laden row) is cut. ``shift=False``: the view's value
    itself. Returns a new tensor; no device sync."""
    v = view[:, target].detach().float()
    cap = v
    if shift:  # in float32 (half-precision logits under autocast)
        r = raw[:, target].detach().float()
        gap = torch.where(rows, r - v, torch.full_like(v, float("nan"))).nanmedian()
        cap = v + torch.nan_to_num(gap, nan=0.0).clamp_min(0)
    out = value.clone()
    col = value[:, target]
    out[:, target] = torch.where(rows, torch.minimum(col, cap.to(col.dtype)), col)
    return out


class SpectralGain(InputRepair):
    """See the module docstring.

    Args:
        low, high: the input domain's box per channel (broadcast over a batch); set later with
            :meth:`set_range`.
        gmax: the largest gain the inverse view gives a coefficient (2: it may sharpen what
            a warp smoothed). Measured with the default's two-check rule (LeNet-5, mnist5k, 3
            seeds, ``benchmarks/results/spectral-cpu-2026-12-05.md``): 1 (attenuate only) never
            got a ZSKT WaNet teacher confirmed, 2 removed it; on DFAD blend both cost a few ACC
            points.
        inv_lr, inv_price: the inversion's Adam learning rate and L1 price on ``h``.
        exemplars: data-free exemplars per class for the inversion.
        boost: the largest extra gain of ``G_keep``.
        probe_every, probe_margin: band probes (see the module docstring).
        seed: the exemplars' random start.
    """

    kind = "spectral"
    #: the learner's flip term: ``-log(1 - p_t)`` (does not saturate when p_t is near 1)
    flip_loss = "log"
    #: the learner skips a batch where fewer than this share of samples are not the target
    min_other_fraction = 0.05

    def __init__(self, low: Tensor | None = None, high: Tensor | None = None, *,
                 gmax: float = 2.0, inv_lr: float = 0.05, inv_price: float = 0.5,
                 exemplars: int = 4, boost: float = 2.0, probe_every: int = 50,
                 probe_margin: float = 0.05, seed: int = 0) -> None:
        self.low = None if low is None else low.detach().clone()
        self.high = None if high is None else high.detach().clone()
        self.gmax, self.inv_lr, self.inv_price = float(gmax), float(inv_lr), float(inv_price)
        self.exemplars, self.boost = int(exemplars), float(boost)
        self.probe_every, self.probe_margin = int(probe_every), float(probe_margin)
        self.seed = int(seed)
        self.h: Tensor | None = None      # inversion log-gain (1, 1, H, W)
        self.d: Tensor | None = None      # attenuation logits
        self.v: Tensor | None = None      # boost logits
        self._inv_opt: torch.optim.Adam | None = None
        self._inv_opt_state: dict[str, Any] | None = None
        self._ex: Tensor | None = None    # the inversion's exemplars (rebuilt after a resume)
        self.probes: list[dict[str, Any]] = []
        self._probed_at = -1
        self._dcts: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self.inv_hit = float("nan")

    def set_range(self, low: Tensor, high: Tensor) -> None:
        """The domain's box (kept from then on, and saved with the state)."""
        self.low, self.high = low.detach().clone(), high.detach().clone()

    @staticmethod
    def applicable(x: Tensor) -> bool:
        """Images with at least 4 x 4 positions (the DCT needs two spatial axes)."""
        return x.dim() == 4 and x.shape[-1] >= 4 and x.shape[-2] >= 4

    # ------------------------------------------------------------------ parameters
    def prepare(self, x: Tensor) -> bool:
        if not self.applicable(x):
            raise ValueError(f"the spectral repair needs image batches (B, C, H, W) with H, W "
                             f">= 4; got {tuple(x.shape)}")
        shape = (1, 1) + tuple(x.shape[-2:])
        if self.d is None:
            init = torch.full(shape, -4.0, device=x.device)
            self.h = torch.zeros(shape, device=x.device).requires_grad_(True)
            self.d = init.clone().requires_grad_(True)
            self.v = init.clone().requires_grad_(True)
            return True
        if tuple(self.d.shape) != shape:
            raise ValueError(
                f"the spectral repair learned gains for {tuple(self.d.shape[-2:])} inputs but "
                f"the teacher now gets {tuple(x.shape[-2:])}; one guard serves one input size")
        if self.d.device != x.device:
            assert self.h is not None and self.v is not None
            with torch.no_grad():
                self.h, self.d, self.v = (p.detach().to(x.device).requires_grad_(True)
                                          for p in (self.h, self.d, self.v))
            self._inv_opt = None
            self._ex = None
            return True
        return False

    def parameters(self) -> list[Tensor]:
        return [] if self.d is None else [self.d, self.v]  # type: ignore[list-item]

    @property
    def ready(self) -> bool:
        return self.d is not None

    # ------------------------------------------------------------------ the transform
    def _box(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.low is not None and self.high is not None, "set_range() first"
        lo = self.low.to(device=x.device, dtype=x.dtype)
        return lo, (self.high.to(device=x.device, dtype=x.dtype) - lo).clamp_min(1e-6)

    def _dct(self, n: int, like: Tensor) -> Tensor:
        """The DCT matrix for ``n`` points on ``like``'s device and dtype, built once."""
        key = (n, like.device, like.dtype)
        d = self._dcts.get(key)
        if d is None:
            d = self._dcts[key] = dct_matrix(n, device=like.device, dtype=like.dtype)
        return d

    def _filter(self, u: Tensor, gain: Tensor) -> Tensor:
        h, w = u.shape[-2:]
        dh, dw = self._dct(h, u), self._dct(w, u)
        return (dh.T @ (gain.to(u.dtype) * (dh @ u @ dw.T)) @ dw).clamp(0, 1)

    def _no_dc(self, ref: Tensor) -> Tensor:
        m = torch.ones_like(ref)
        m[..., 0, 0] = 0
        return m

    def inverse_gain(self) -> Tensor:
        """``min(exp(-h), gmax)`` with the DC coefficient's gain 1 (detached)."""
        assert self.h is not None
        h = self.h.detach() * self._no_dc(self.h)
        return torch.exp(-h).clamp(max=self.gmax)

    def _keep_gain(self, d: Tensor, v: Tensor) -> Tensor:
        return 1 - torch.sigmoid(d) + self.boost * torch.sigmoid(v) * self._no_dc(v)

    def _cost(self, d: Tensor, v: Tensor) -> Tensor:
        return (torch.sigmoid(d).mean() + (torch.sigmoid(v) * self._no_dc(v)).mean()) / 2

    def _invert(self, x: Tensor) -> Tensor:
        lo, span = self._box(x)
        return lo + span * self._filter((x - lo) / span, self.inverse_gain())

    def _keep(self, x: Tensor, d: Tensor, v: Tensor) -> Tensor:
        lo, span = self._box(x)
        return lo + span * self._filter((x - lo) / span, self._keep_gain(d, v))

    def learning_input(self, x: Tensor) -> Tensor:
        """The inverse view of ``x`` (detached): the flip/keep gain is learned on top of it."""
        if self.h is None:
            return x
        with torch.no_grad():
            return self._invert(x)

    def learning_view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The flip/keep gain on ``x`` (already through :meth:`learning_input`)."""
        assert self.d is not None and self.v is not None, "prepare() first"
        return self._keep(x, self.d, self.v), self._cost(self.d, self.v)

    def apply(self, x: Tensor) -> Tensor:
        if self.d is None or self.v is None:
            return x
        return self._keep(self._invert(x), self.d.detach(), self.v.detach())

    # ------------------------------------------------------------------ before each update
    def before_update(self, model: nn.Module, x: Tensor, target: int, *, updates: int,
                      last_flip: float, logits_fn: Callable[[Any], Tensor] | None = None,
                      distributed: bool = False) -> bool:
        """One inversion step, and the band probes (on the inverse view of ``x``) when due.
        Called by the learner before its steps (grad enabled, autocast off, ``model`` frozen).
        True when the flip/keep gains were replaced (the learner then resets its
        optimizer)."""
        self._invert_step(model, x, target, logits_fn, distributed)
        due = updates == 0 or (self.probe_every > 0 and updates % self.probe_every == 0
                               and not last_flip >= 0.5)
        if not due or self._probed_at == updates:  # a skipped batch does not probe again
            return False
        self._probed_at = updates
        replaced = None
        if not distributed or _dist.rank() == 0:
            replaced = self._probe(model, self.learning_input(x), target, logits_fn, updates)
        if distributed:
            replaced = _dist.broadcast(replaced)
        if replaced is None:
            return False
        with torch.no_grad():
            assert self.d is not None and self.v is not None
            self.d.copy_(replaced[0].to(self.d.device))
            self.v.copy_(replaced[1].to(self.v.device))
        return True

    def _exemplars(self, model: nn.Module, x: Tensor, target: int, k: int) -> Tensor:
        if self._ex is None or self._ex.device != x.device:
            from ..universal import inversion_base

            lo, span = self._box(x)
            base, lab = inversion_base(model, tuple(x.shape[1:]), k, lo[0], (lo + span)[0],
                                       per_class=self.exemplars, seed=self.seed + 313)
            self._ex = base[lab != target].to(x.device, x.dtype).detach()
        return self._ex

    def _invert_step(self, model: nn.Module, x: Tensor, t: int,
                     logits_fn: Callable[[Any], Tensor] | None, distributed: bool) -> None:
        assert self.h is not None
        with torch.no_grad():
            z0 = extract_logits(model(x), logits_fn)
        k = z0.shape[1]
        src = x[z0.argmax(1) != t]
        ex = self._exemplars(model, x, t, k)
        xs = torch.cat([ex, src]) if len(src) else ex
        if self._inv_opt is None:
            self._inv_opt = torch.optim.Adam([self.h], lr=self.inv_lr)
            if self._inv_opt_state is not None:
                self._inv_opt.load_state_dict(self._inv_opt_state)
                self._inv_opt_state = None
        lo, span = self._box(xs)
        h = self.h * self._no_dc(self.h)
        xh = lo + span * self._filter((xs - lo) / span, torch.exp(h))
        z = extract_logits(model(xh), logits_fn).float()
        loss = (F.cross_entropy(z, torch.full((len(xs),), t, device=z.device))
                + self.inv_price * h.abs().mean())
        grad = list(torch.autograd.grad(loss, [self.h]))
        if distributed:
            grad = _dist.all_reduce_mean(grad)
        self.h.grad = grad[0]
        self._inv_opt.step()
        self.h.grad = None
        self.inv_hit = float((z.argmax(1) == t).float().mean())

    def _bands(self, h: int, w: int) -> list[tuple[str, Tensor | None, Tensor | None]]:
        r = _radius(h, w)
        return [("dc", (r == 0).float(), None), ("low2", (r <= 2).float(), None),
                ("low4", (r <= 4).float(), None), ("high8", (r >= 8).float(), None),
                ("high16", (r >= 16).float(), None),
                ("dc+high16", ((r == 0) | (r >= 16)).float(), None),
                ("up8", None, (r >= 8).float()), ("up16", None, (r >= 16).float()),
                ("up4-16", None, ((r >= 4) & (r <= 16)).float())]

    @torch.no_grad()
    def _probe(self, model: nn.Module, x: Tensor, t: int,
               logits_fn: Callable[[Any], Tensor] | None, updates: int
               ) -> tuple[Tensor, Tensor] | None:
        assert self.d is not None and self.v is not None
        pred = extract_logits(model(x), logits_fn).argmax(1)
        tgt = pred == t
        if not bool(tgt.any()):
            return None
        d0, v0 = self.d.detach().clone(), self.v.detach().clone()

        def score(d: Tensor, v: Tensor) -> float:
            # lower is better: minus the share handled as wanted, plus the price of the size
            pz = extract_logits(model(self._keep(x, d, v)), logits_fn).argmax(1)
            good = torch.where(tgt, pz != t, pz == pred).float().mean()
            return float(-good + self._cost(d, v))

        cur = best = score(d0, v0)
        choice = None
        for name, down, up in self._bands(*x.shape[-2:]):
            d = d0 if down is None else torch.where(down.to(d0.device) > 0, d0.clamp(min=3.0), d0)
            v = v0 if up is None else torch.where(up.to(v0.device) > 0, v0.clamp(min=3.0), v0)
            s = score(d, v)
            if s < best - self.probe_margin:
                best, choice = s, (name, d, v)
        if choice is None:
            return None
        self.probes.append({"update": updates, "band": choice[0], "before": round(cur, 4),
                            "after": round(best, 4)})
        return choice[1], choice[2]

    def transplant(self, into: Tensor, source: Tensor, shift: tuple[int, ...] = ()
                   ) -> Tensor:
        """``into`` plus what the repair removes from ``source``, kept inside the domain's
        box (``shift`` is not used)."""
        lo, span = self._box(into)
        return torch.minimum(torch.maximum(into + (source - self.apply(source)), lo), lo + span)

    def changed(self) -> int:
        if self.d is None or self.v is None or self.h is None:
            return 0
        g = self.inverse_gain() * self._keep_gain(self.d.detach(), self.v.detach())
        return int(((g - 1).abs() > 1 / 3).sum())

    # ------------------------------------------------------------------ report and state
    def summary(self) -> dict[str, Any]:
        if self.d is None or self.v is None or self.h is None:
            return {"coefficients": 0, "attenuated": 0, "boosted": 0, "inverted": 0}
        g = self.inverse_gain() * self._keep_gain(self.d.detach(), self.v.detach())
        return {"coefficients": self.changed(),
                "attenuated": int((torch.sigmoid(self.d.detach()) > 0.5).sum()),
                "boosted": int((torch.sigmoid(self.v.detach()) * self._no_dc(self.v) > 0.5).sum()),
                "inverted": int(((self.inverse_gain() - 1).abs() > 1 / 3).sum()),
                "fraction": float(((g - 1).abs() > 1 / 3).float().mean())}

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"h": cpu(self.h), "d": cpu(self.d), "v": cpu(self.v), "low": cpu(self.low),
                "high": cpu(self.high), "probes": [dict(p) for p in self.probes],
                "inv_optimizer": (self._inv_opt.state_dict() if self._inv_opt is not None
                                  else self._inv_opt_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def leaf(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone().requires_grad_(True)

        self.h, self.d, self.v = leaf(state["h"]), leaf(state["d"]), leaf(state["v"])
        self.low = None if state["low"] is None else state["low"].clone()
        self.high = None if state["high"] is None else state["high"].clone()
        self.probes = [dict(p) for p in state.get("probes", [])]
        self._inv_opt, self._inv_opt_state = None, state.get("inv_optimizer")
        self._ex = None


__all__ = ["SpectralGain", "dct_matrix"]
