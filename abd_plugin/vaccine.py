"""Shuffling Vaccine (SV): flag synthetic samples on which a channel-shuffled teacher still agrees
with the teacher, and push the synthesizer away from them.

* **Ensemble** (:class:`~abd_plugin.ensemble.ShuffledEnsemble`): ``n_shuffle_models`` (k) copies
  of the teacher whose chosen layers read their input channels in a random order, one batched
  forward of a frozen replica that shares the unshuffled trunk where that is exact. Inside a guard
  the vaccine reads the trunk (the input of the ensemble's trunk module) from the teacher's own
  forward, through a pre-hook it installs in ``on_guard_enter``, instead of recomputing it.
* **Suspicion.** ``m_i = argmax ensemble_i == argmax teacher_i``;
  ``d_i = KL(p_T || p_ens)_i / C``; loss term ``R = -coef * sum_i m_i d_i / sum_i m_i``.
* **Verification** (on by default): pool ``verify_batches`` synthetic batches (detached, on CPU)
  after skipping ``verify_skip``; with ``s = log10 d`` the vaccine is accepted when
  ``mean(s < mean(s) - 3 std(s)) > 0.02``; otherwise the permutations are re-drawn, at most
  ``max_shuffle_trials`` shuffles in all, after which SV switches itself off and says so.
* **Automatic depth** (``shuffle_layers="auto"``): the candidates are the Conv *and* Linear layers
  in forward order; every depth 1..``auto_max_depth`` (counted from the output side) is scored on
  the verification pool by its tail ratio and the depth with the largest ratio wins (ties: the
  shallower). Too few shuffled layers leave every sample agreeing, too many destroy the trigger's
  shortcut as well; the separating depth is the one that makes the low-divergence tail stand out,
  and it depends on the architecture (the README's "Design" has the measurements).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dist import all_reduce_sum
from ._replica import TeacherReplica, unwrap_model
from .ensemble import ShuffledEnsemble, TrunkTap
from .hooks import DefenseHook, GuardContext, HookReport, warn_once
from .outputs import check_input, check_logits
from .validation import Bool, Int, Num, NumPair, Section, Spec, section_or_default, spec

LayerSpec = str | int | Sequence[str]


class Layers(Spec):
    """``layers``: ``"auto"``, an int >= 1, or a non-empty list of module names."""

    def describe(self) -> str:
        return "'auto', an integer >= 1, or a non-empty list of module names (str)"

    def problem(self, value: Any) -> type[Exception] | None:
        if isinstance(value, str):
            return None if value == "auto" else ValueError
        if isinstance(value, int) and not isinstance(value, bool):
            return None if value >= 1 else ValueError
        if isinstance(value, (list, tuple)):
            return None if value and all(isinstance(v, str) for v in value) else ValueError
        return TypeError


@dataclass(frozen=True)
class VaccineSettings(Section):
    """The Shuffling Vaccine's section of :class:`~abd_plugin.ABDConfig`
    (``ABDConfig(vaccine=...)``; flat keyword ``sv`` for ``enabled``, ``sv_<field>`` for most
    others)."""

    switch: ClassVar[str] = "sv"
    flat_prefix: ClassVar[str] = "sv_"

    enabled: bool = spec(
        False, Bool(),
        """Enable the Shuffling Vaccine (off by default: on the benchmark it did not cut the
        backdoor; ``ABDConfig.paper()`` and ``ABDConfig.classic()`` turn it on).""")
    coef: float = spec(
        0.1, Num(0, 1e4),
        """Weight of the SV loss term ``-coef * mean_{suspicious} KL(p_T || p_shuffled) / C``
        (paper: 0.1). On a fixed transfer set the same coefficient weights the anti-distillation of
        suspicious samples in :meth:`ABDGuard.reweight`.""")
    reweight_cap: float = spec(
        5.0, Num(0, lo_open=True),
        """Bound of the anti-distillation in :meth:`ABDGuard.reweight`: a suspicious sample's
        per-sample loss counts up to this value (in the loss's units; nats for a KL) and gives
        no gradient beyond it, so the reweighted loss stays ``>= -coef * reweight_cap``
        and cannot run away on a fixed transfer set (uncapped, it reached -1e5 and 11 % accuracy
        on the test suite's digits task at coefficient 1). 5 nats of ``KL(p_T || p_S)`` on a
        confidently classified sample means the student gives the teacher's class about
        ``e^-5``, under 1 %, of the teacher's probability: pushing further only costs accuracy.
        Below the cap the rule is the paper's, unchanged.""")
    adaptive: bool = spec(
        False, Bool(),
        """Adapt the coefficient online so that the suspicious fraction of synthetic batches is
        driven down to ``target_fraction`` (a multiplicative controller, see
        :class:`~abd_plugin.vaccine.ShufflingVaccine`). Off in the paper.""")
    target_fraction: float = spec(
        0.2, Num(0, 1, lo_open=True, hi_open=True),
        """Target suspicious fraction for ``adaptive``.""")
    adapt_rate: float = spec(
        0.05, Num(0, 1e3, lo_open=True),
        """Step of the log-coefficient controller per SV call (``adaptive``).""")
    coef_bounds: tuple[float, float] = spec(
        (1e-3, 1e3), NumPair(0, 1e6),
        """Clamp for the adaptive coefficient.""")
    n_models: int = spec(
        3, Int(1, 1024),
        """Number of channel-shuffled teacher copies averaged into the ensemble (paper: 3).""",
        flat="n_shuffle_models")
    layers: LayerSpec = spec(
        "auto", Layers(),
        """Which layers get their input channels permuted: ``"auto"`` (choose the depth per teacher
        from the verification pool), an int k (the last k conv layers in forward order; paper: 5),
        or a list of module names.""", flat="shuffle_layers")
    shuffle_linear: bool = spec(
        False, Bool(),
        """Also count ``nn.Linear`` layers when picking the last k layers (``"auto"`` always
        considers them).""", flat="shuffle_linear")
    auto_max_depth: int = spec(
        6, Int(1),
        """Largest depth tried by ``layers="auto"``.""", flat="auto_max_depth")
    grad_through_ensemble: bool = spec(
        True, Bool(),
        """Back-propagate the SV term through the shuffled ensemble as well as the teacher (paper:
        yes; ``--no_shuf_grad`` turns it off).""")
    verify: bool = spec(
        True, Bool(),
        """Verify the vaccine (tail-ratio test) before switching SV on.""", flat="verify")
    verify_batches: int = spec(
        50, Int(1),
        """Synthetic batches pooled for verification (paper: ``pseudo_test_batches``, 50).""",
        flat="verify_batches")
    verify_skip: int = spec(
        10, Int(0),
        """First synthetic batches ignored before pooling (paper: 10).""", flat="verify_skip")
    tail_sigma: float = spec(
        3.0, Num(0, 100),
        """A sample is in the low-divergence tail when ``log10 d < mean - tail_sigma * std``.""",
        flat="tail_sigma")
    tail_ratio_threshold: float = spec(
        0.02, Num(-1, 1, hi_open=True),
        """Accept the vaccine when the tail holds more than this fraction (paper: 0.02). A
        tail ratio lies in [0, 1]: 1 or more would never accept; a negative value accepts
        every shuffle (``"auto"`` still picks the best-scoring depth).""",
        flat="tail_ratio_threshold")
    max_shuffle_trials: int = spec(
        8, Int(1),
        """Shuffles tried (the first plus re-makes) before SV gives up (paper: 8).""",
        flat="max_shuffle_trials")


@dataclass
class VaccineReport(HookReport):
    """The Shuffling Vaccine's part of the guard's report.

    Attributes:
        status: ``collecting``/``enabled``/``disabled``; ``message``: what it did, in words.
        coef: the coefficient now; ``depth``, ``layers``, ``trunk_module``: the shuffle.
        trials: the verification trials (depth, tail ratio, agreement, samples, kind).
        suspicious_fraction: over all synthesis batches; ``last_suspicious_fraction``: the last.
        last_penalty: the last loss term; ``calls``: synthesis batches seen.
    """

    status: str = "collecting"
    message: str = ""
    coef: float = 0.0
    depth: int = 0
    layers: list[str] = field(default_factory=list)
    trunk_module: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    suspicious_fraction: float = float("nan")
    last_suspicious_fraction: float = float("nan")
    last_penalty: float = 0.0
    calls: int = 0

    def lines(self) -> list[str]:
        return [f"  {self.message}; suspicious fraction {self.suspicious_fraction:.3f} over "
                f"{self.calls} synthesis batches, {self.seconds:.2f}s"]


class SVStatus(str, enum.Enum):
    """Where the vaccine stands; compares equal to its value (``status == "enabled"``)."""

    COLLECTING = "collecting"  #: pooling synthetic batches for verification (SV term is 0)
    ENABLED = "enabled"  #: verified (or ``verify=False``): the SV term is on
    DISABLED = "disabled"  #: no shuffle passed verification: SV is off for the rest of the run

    def __str__(self) -> str:
        return self.value


@dataclass
class SVStats:
    """What the vaccine has seen: suspicion masks computed, samples flagged, the last term."""

    calls: int = 0
    sum_suspicious: float = 0.0
    sum_samples: int = 0
    last_fraction: float = float("nan")
    last_penalty: float = 0.0

    def record(self, mask: Tensor) -> None:
        self.calls += 1
        n = int(mask.numel())
        s = float(mask.sum())
        self.sum_suspicious += s
        self.sum_samples += n
        self.last_fraction = s / max(n, 1)


def divergence_and_mask(teacher_logits: Tensor, ensemble_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``KL(p_T || p_ens) / C`` and the suspicion mask ``argmax`` agreement."""
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    log_p_e = F.log_softmax(ensemble_logits, dim=1)
    d = (log_p_t.exp() * (log_p_t - log_p_e)).mean(dim=1)
    mask = ensemble_logits.argmax(1) == teacher_logits.argmax(1)
    return d, mask


def tail_ratio(d: Tensor, sigma: float) -> float:
    """Fraction of samples with ``log10 d < mean - sigma * std`` (the paper's verification test),
    pooled over DDP ranks (moments first, then the count): every rank takes the same decision."""
    s = torch.log10(d.double().clamp_min(1e-30))
    n_local = torch.tensor(float(s.numel()), dtype=torch.float64)
    mom = all_reduce_sum(torch.stack([s.sum(), s.pow(2).sum(), n_local]))
    n = float(mom[2])
    mean = float(mom[0]) / n
    var = max(float(mom[1]) / n - mean * mean, 0.0) * n / max(n - 1, 1.0)
    thr = mean - sigma * var**0.5
    return float(all_reduce_sum(torch.tensor([float((s < thr).sum())], dtype=torch.float64))[0]) / n


class ShufflingVaccine(DefenseHook):
    """The Shuffling Vaccine as a :class:`DefenseHook` that also works on its own.

    Standalone use::

        sv = ShufflingVaccine(teacher, VaccineSettings(verify=False))
        t = teacher(x)                        # x from the generator, in the graph
        loss_g = my_generator_loss(...) + sv.penalty(x, t)

    Args:
        teacher: the (possibly poisoned) teacher; never modified.
        settings: the :class:`VaccineSettings` section.
        seed: seed of the permutations.
        logits_fn: how to find the logits in the teacher's output.
        replica: share a :class:`~abd_plugin._replica.TeacherReplica` with other defenses.
    """

    name = "sv"

    def __init__(
        self,
        teacher: nn.Module,
        settings: VaccineSettings | None = None,
        *,
        seed: int = 0,
        logits_fn: Callable[[Any], Tensor] | None = None,
        replica: TeacherReplica | None = None,
    ) -> None:
        self.settings = s = section_or_default(settings, VaccineSettings, "ShufflingVaccine",
                                               "vaccine")
        self.teacher = teacher
        self._replica = replica or TeacherReplica(teacher)
        self.ensemble = ShuffledEnsemble(self._replica, n_models=s.n_models, layers=s.layers,
                                         shuffle_linear=s.shuffle_linear, seed=seed,
                                         logits_fn=logits_fn)
        self.coef = float(s.coef)
        self.built = False  # the ensemble is built lazily on the first batch
        self._pending_state: dict[str, Any] | None = None
        self._ctx: GuardContext | None = None  # the guard's context while attached (reports)
        # verification
        self.status = SVStatus.COLLECTING if s.verify else SVStatus.ENABLED
        self.trials: list[dict[str, Any]] = []
        self.observed = 0
        self._pool_x: list[Tensor] = []
        self._pool_t: list[Tensor] = []
        self.stats = SVStats()
        self._tap = TrunkTap(self.ensemble)  # reads the trunk while a guard is active
        self._seen_shape: tuple[int, ...] | None = None  # first logits given, until built

    # ------------------------------------------------------------------ the ensemble
    @property
    def enabled(self) -> bool:
        return self.status == SVStatus.ENABLED and self.coef > 0

    @property
    def verifying(self) -> bool:
        """Still pooling synthetic batches for verification (feed them with :meth:`observe`)."""
        return self.status == SVStatus.COLLECTING

    def build(self, x: Tensor) -> None:
        """Discover the layers (dry run on ``x[:2]``) and draw the first permutations."""
        if self.built:
            return
        check_input(x, "teacher input")
        ens = self.ensemble
        ens.discover(x[:2].detach())
        seen, self._seen_shape = self._seen_shape, None
        if seen is not None and seen[1] != ens.num_classes:
            self._pool_x, self._pool_t = [], []  # pooled with the same wrong class count
            raise ValueError(
                f"teacher_logits given earlier had shape {seen}: {seen[1]} classes, but the "
                f"teacher's own output has {ens.num_classes} (shape ({seen[0]}, "
                f"{ens.num_classes})); pass the logits of the teacher the guard wraps")
        if self._pending_state is not None:
            self.built = True
            self._apply_state(self._pending_state)
            self._pending_state = None
            return
        depth = ens.initial_depth()
        ens.set_layers(depth, ens.draw(ens.candidates[-depth:]))
        self.built = True

    def ensemble_logits(self, x: Tensor, trunk: Tensor | None = None) -> Tensor:
        """Mean logits of the shuffled ensemble on ``x`` (B, ...) -> (B, C), differentiable in x."""
        if not self.built:
            self.build(x)
        return self.ensemble.logits(x, trunk)

    # ------------------------------------------------------------------ public API
    def _check(self, x: Tensor, teacher_logits: Tensor, *, build: bool = True) -> None:
        """The checks every entry point runs: a float, batched, finite ``x``; finite (B, C)
        logits whose C is the teacher's. ``build``: build the ensemble now (the caller would
        next) so that C is known; else the first logits seen stand in until it is built."""
        check_input(x)
        if build and not self.built:
            self.build(x)
        classes = (self.ensemble.num_classes if self.built
                   else None if self._seen_shape is None else self._seen_shape[1])
        check_logits(teacher_logits, x.shape[0], "teacher_logits", classes=classes)
        if classes is None:
            self._seen_shape = tuple(teacher_logits.shape)

    def suspicious(self, x: Tensor, teacher_logits: Tensor) -> Tensor:
        """Boolean mask (B,): the shuffled ensemble predicts the teacher's class."""
        self._check(x, teacher_logits)
        with torch.no_grad():
            z = self.ensemble_logits(x.detach())
            _, mask = divergence_and_mask(teacher_logits.detach(), z)
        self.stats.record(mask)
        return mask

    def penalty(self, x: Tensor, teacher_logits: Tensor, *, trunk: Tensor | None = None) -> Tensor:
        """The SV loss term for a synthesis batch: ``-coef * mean_{suspicious} d``.

        Args:
            x: the exact batch fed to the teacher (B, ...), in the synthesizer's graph.
            teacher_logits: the teacher's logits on ``x`` (B, C), in the graph.
            trunk: the input of ``self.ensemble.trunk_module`` from the teacher's forward on
                ``x``; saves recomputing it. Ignored when this call builds or verifies the
                vaccine and so moves the trunk module.
        Returns a scalar; 0 (no graph) while the vaccine is unverified or disabled.
        """
        trunk_module = self.ensemble.trunk_module  # before building: see ``trunk`` above
        self._check(x, teacher_logits)  # builds the ensemble on the first batch
        if self.verifying:
            self._observe(x, teacher_logits)
        if not self.enabled:
            return teacher_logits.new_zeros(())
        if self.ensemble.trunk_module != trunk_module:
            trunk = None  # built or verified just now: ``trunk`` is another module's input
        z = self.ensemble_logits(x, trunk)
        if not self.settings.grad_through_ensemble:
            z = z.detach()
        d, mask = divergence_and_mask(teacher_logits, z)
        self.stats.record(mask)
        n = mask.sum()
        if int(n) == 0:
            pen = (d * 0).sum()
        else:
            pen = -self.coef * (d * mask).sum() / n
        self.stats.last_penalty = float(pen.detach())
        self._adapt(mask)
        return pen

    def reweight(self, per_sample_loss: Tensor, mask: Tensor) -> Tensor:
        """Fixed-transfer-set rule: ``mean(kept) - coef * mean(min(suspicious, cap))`` with
        ``cap = settings.reweight_cap``.

        The anti-distillation term is bounded: each suspicious sample's loss counts up to
        ``cap`` and gives no gradient beyond it, so the student pushes a suspicious sample away
        from the teacher until its loss reaches ``cap`` and then stops. Without the cap, a
        non-negative loss (KL, cross-entropy) on a fixed transfer set is maximised without end
        (the loss runs to -inf and accuracy collapses, whatever the coefficient). For a
        non-negative loss the result is therefore ``>= -coef * cap``; below the cap nothing
        changes. Finite when no sample or every sample is suspicious (the empty mean counts as
        0); a non-finite per-sample loss raises ``ValueError``."""
        if per_sample_loss.dim() != 1 or mask.shape != per_sample_loss.shape:
            raise ValueError(
                "reweight needs a per-sample loss of shape (B,) and a mask of the same shape; "
                "use reduction='none' and sum over classes first"
            )
        if not torch.is_floating_point(per_sample_loss):
            raise TypeError(f"per_sample_loss must be floating point, got {per_sample_loss.dtype}")
        if not torch.isfinite(per_sample_loss.detach()).all():
            raise ValueError("per_sample_loss contains NaN or Inf; check the KD loss and its "
                             "inputs before reweighting")
        mask = mask.to(torch.bool)
        keep = ~mask
        zero = per_sample_loss.sum() * 0
        kept = per_sample_loss[keep].mean() if keep.any() else zero
        coef = self.coef if self.status == SVStatus.ENABLED else 0.0
        susp = (per_sample_loss[mask].clamp(max=self.settings.reweight_cap).mean()
                if mask.any() and coef > 0 else zero)
        return kept - coef * susp

    def observe(self, x: Tensor, teacher_logits: Tensor) -> None:
        """Add a synthetic batch to the verification pool (detached, CPU); runs the test once
        ``verify_batches`` batches are pooled. The inputs are checked as in :meth:`penalty`."""
        self._check(x, teacher_logits, build=False)
        self._observe(x, teacher_logits)

    def _observe(self, x: Tensor, teacher_logits: Tensor) -> None:
        if not self.verifying:
            return
        self.observed += 1
        if self.observed <= self.settings.verify_skip:
            return
        self._pool_x.append(x.detach().to("cpu", copy=True))
        self._pool_t.append(teacher_logits.detach().to("cpu", copy=True).float())
        if len(self._pool_x) >= self.settings.verify_batches:
            if not self.built:
                self.build(x)
            self.verify()

    # ------------------------------------------------------------------ verification
    def _score(self) -> tuple[float, float, int]:
        """(tail ratio, agreement, pooled samples) of the current shuffle on the pool."""
        dev = self.ensemble.device
        ds, ms = [], []
        with torch.no_grad():
            for xb, tb in zip(self._pool_x, self._pool_t, strict=True):
                z = self.ensemble_logits(xb.to(dev)).float().cpu()
                d, m = divergence_and_mask(tb, z)
                ds.append(d)
                ms.append(m)
        d, m = torch.cat(ds), torch.cat(ms)
        cnt = all_reduce_sum(torch.tensor([float(m.numel()), float(m.sum())], dtype=torch.float64))
        return tail_ratio(d, self.settings.tail_sigma), float(cnt[1]) / float(cnt[0]), int(cnt[0])

    def _trial(self, kind: str) -> float:
        """Score the current shuffle, record the trial (``kind``: ``"depth"`` for the automatic
        depth's scoring, ``"shuffle"`` for the first shuffle, ``"reshuffle"`` for a re-draw);
        returns its tail ratio."""
        ratio, agree, n = self._score()
        self.trials.append({"depth": self.ensemble.depth, "tail_ratio": ratio, "agreement": agree,
                            "n": n, "kind": kind})
        return ratio

    @property
    def shuffles_tried(self) -> int:
        """Shuffles tried at the chosen depth: the first plus re-draws, what
        ``max_shuffle_trials`` caps (the automatic depth's best scoring trial is the first)."""
        kinds = [t.get("kind", "shuffle") for t in self.trials]
        return kinds.count("shuffle") + kinds.count("reshuffle") + (1 if "depth" in kinds else 0)

    def verify(self) -> SVStatus:
        """Run the tail-ratio test on the pool (choosing the depth when ``shuffle_layers='auto'``);
        returns the new status, enabled or disabled."""
        cfg, ens = self.settings, self.ensemble
        if isinstance(cfg.layers, str):  # auto: score every depth once
            best: tuple[float, int, dict[str, Tensor]] | None = None
            for depth in range(1, min(cfg.auto_max_depth, len(ens.candidates)) + 1):
                perms = ens.draw(ens.candidates[-depth:])
                ens.set_layers(depth, perms)
                ratio = self._trial("depth")
                if best is None or ratio > best[0]:
                    best = (ratio, depth, perms)
            assert best is not None
            ens.set_layers(best[1], best[2])
            accepted = best[0] > cfg.tail_ratio_threshold
        else:
            accepted = self._trial("shuffle") > cfg.tail_ratio_threshold
        remaining = cfg.max_shuffle_trials - 1
        while not accepted and remaining > 0:
            remaining -= 1
            ens.set_layers(ens.depth, ens.draw(ens.layers))
            accepted = self._trial("reshuffle") > cfg.tail_ratio_threshold
        self.status = SVStatus.ENABLED if accepted else SVStatus.DISABLED
        self._pool_x, self._pool_t = [], []
        return self.status

    @property
    def message(self) -> str:
        """What the vaccine did (not what it was configured to do)."""
        if self.verifying:
            seen = "" if self.observed else "; no synthesis batch seen yet"
            return (f"SV: verifying ({len(self._pool_x)}/{self.settings.verify_batches} batches "
                    f"pooled{seen})")
        if self.status == SVStatus.ENABLED:
            if not self.built:
                return ("SV: enabled but never ran: 0 synthesis batches seen (the teacher never "
                        "ran with gradients on an input that requires grad, and no explicit "
                        "call came)")
            ens = self.ensemble
            return (f"SV: on, {ens.depth} shuffled layer(s) {ens.layers}, coef {self.coef:.3g}, "
                    f"{self.stats.calls} batch(es) seen")
        best = max((t["tail_ratio"] for t in self.trials), default=float("nan"))
        n_depth = sum(1 for t in self.trials if t.get("kind") == "depth")
        depths = f", {n_depth} depth(s) scored first" if n_depth else ""
        return (f"SV: no vaccine found after {self.shuffles_tried} shuffle(s) at depth "
                f"{self.ensemble.depth}{depths} (best tail ratio {best:.4f} <= "
                f"{self.settings.tail_ratio_threshold}) - SV is off; SR is still available")

    # ------------------------------------------------------------------ adaptive coefficient
    def _adapt(self, mask: Tensor) -> None:
        cfg = self.settings
        if not cfg.adaptive:
            return
        counts = all_reduce_sum(torch.tensor([float(mask.sum()), float(mask.numel())],
                                        dtype=torch.float64))
        frac = float(counts[0] / counts[1])  # the same on every rank: coefficients stay in sync
        lo, hi = cfg.coef_bounds
        step = cfg.adapt_rate * (frac - cfg.target_fraction) / cfg.target_fraction
        # the clamp decided in log space first: math.exp of a large step would overflow
        if self.coef <= 0 or step < math.log(lo / self.coef):
            self.coef = float(lo)
        elif step > math.log(hi / self.coef):
            self.coef = float(hi)
        else:
            self.coef = float(min(hi, max(lo, self.coef * math.exp(step))))

    # ------------------------------------------------------------------ DefenseHook
    def on_guard_enter(self, ctx: GuardContext) -> None:
        self._ctx = ctx
        # after the guard's own teacher hook, which calls on_teacher_forward (see TrunkTap.attach)
        self._tap.attach(unwrap_model(self.teacher))

    def on_guard_exit(self, ctx: GuardContext) -> None:
        self._tap.detach()
        never = self._never_ran(ctx)
        if never:
            warn_once(self, "sv_never_ran", f"abd-plugin: {never}")

    def on_teacher_forward(
        self, ctx: GuardContext, x: Tensor, teacher_logits: Tensor
    ) -> Tensor | None:
        pen = self.penalty(x, teacher_logits, trunk=self._tap.take())
        return pen if pen.requires_grad else None

    def _never_ran(self, ctx: GuardContext | None) -> str | None:
        """Why SV never ran although the teacher did, when that is so (else None)."""
        plain = 0 if ctx is None else ctx.plain_teacher_forwards
        if not plain or self.stats.calls or self.observed:
            return None
        return (f"SV never ran: the teacher ran {plain} time(s) with gradients on, but never on "
                "an input that requires grad, so no synthesis batch reached the vaccine (a "
                "generator output made under no_grad or detached?). Keep the synthesizer's "
                "output in the graph, or call guard.vaccine_penalty(x, t)")

    def report(self) -> VaccineReport:
        st, ctx = self.stats, self._ctx
        message = self.message
        if ctx is not None and ctx.loss_terms[0] >= 1 and ctx.loss_terms[1] == 0:
            message += " - but its loss term never reached a backward (see warnings)"
        never = self._never_ran(ctx)
        return VaccineReport(
            status=self.status.value, message=message, coef=self.coef,
            depth=self.ensemble.depth, layers=list(self.ensemble.layers),
            trunk_module=self.ensemble.trunk_module, trials=list(self.trials),
            suspicious_fraction=(st.sum_suspicious / st.sum_samples if st.sum_samples
                                 else float("nan")),
            last_suspicious_fraction=st.last_fraction, last_penalty=st.last_penalty,
            calls=st.calls, warnings=[never] if never else [])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "built": self.built,
            "layers": list(self.ensemble.layers),
            "depth": self.ensemble.depth,
            "perms": {k: v.clone() for k, v in self.ensemble.perms.items()},
            "status": self.status.value,
            "coef": self.coef,
            "trials": list(self.trials),
            "observed": self.observed,
            "pool_x": [t.clone() for t in self._pool_x],
            "pool_t": [t.clone() for t in self._pool_t],
            "rng": self.ensemble.generator.get_state(),
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("built"):
            self._apply_counters(state)
        elif self.built:
            self._apply_state(state)
        else:  # the layers are set once the ensemble is built on the first batch
            self._pending_state = state
            self._apply_counters(state)

    def _apply_counters(self, state: dict[str, Any]) -> None:
        self.status = SVStatus(state["status"])
        self.coef = float(state["coef"])
        self.trials = list(state["trials"])
        self.observed = int(state["observed"])
        self._pool_x = [t.clone() for t in state["pool_x"]]
        self._pool_t = [t.clone() for t in state["pool_t"]]
        self.ensemble.generator.set_state(state["rng"])
        self.stats = SVStats(**state["stats"])

    def _apply_state(self, state: dict[str, Any]) -> None:
        missing = [n for n in state["layers"] if n not in self.ensemble.candidates]
        if missing:
            raise ValueError(
                f"vaccine state names layers {missing} that this teacher does not have; was it "
                "saved with another architecture?"
            )
        perms = {k: v.clone() for k, v in state["perms"].items()}
        self.ensemble.set_layers(int(state["depth"]), perms)
        self._apply_counters(state)
