"""ABD configuration: one frozen dataclass, every field documented.

Defaults follow the paper's official code (Hong et al., ICML 2023) except where the paper's value
is architecture-specific (``shuffle_layers``: the paper shuffles the last 5 convs of a WRN-16-2;
``"auto"`` chooses per teacher, see :mod:`abd_plugin.vaccine`). :meth:`ABDConfig.paper` gives the
literal paper recipe; :meth:`ABDConfig.tuned` the recipe this project measured to work better
(README, "Results").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .schedule import SRSchedule

LayerSpec = str | int | Sequence[str]


@dataclass(frozen=True)
class ABDConfig:
    # ------------------------------------------------------------------ Shuffling Vaccine (SV)
    sv: bool = True
    """Enable the Shuffling Vaccine."""
    sv_coef: float = 0.1
    """Weight of the SV loss term ``-coef * mean_{suspicious} KL(p_T || p_shuffled) / C``
    (paper: 0.1). On a fixed transfer set the same coefficient weights the anti-distillation of
    suspicious samples in :meth:`ABDGuard.reweight`."""
    sv_adaptive: bool = False
    """Adapt the coefficient online so that the suspicious fraction of synthetic batches is
    driven down to ``sv_target_fraction`` (a multiplicative controller, see
    :class:`~abd_plugin.vaccine.ShufflingVaccine`). Off in the paper."""
    sv_target_fraction: float = 0.2
    """Target suspicious fraction for ``sv_adaptive``."""
    sv_adapt_rate: float = 0.05
    """Step of the log-coefficient controller per SV call (``sv_adaptive``)."""
    sv_coef_bounds: tuple[float, float] = (1e-3, 1e3)
    """Clamp for the adaptive coefficient."""
    n_shuffle_models: int = 3
    """Number of channel-shuffled teacher copies averaged into the ensemble (paper: 3)."""
    shuffle_layers: LayerSpec = "auto"
    """Which layers get their input channels permuted: ``"auto"`` (choose the depth per teacher
    from the verification pool), an int k (the last k conv layers in forward order; paper: 5),
    or a list of module names."""
    shuffle_linear: bool = False
    """Also count ``nn.Linear`` layers when picking the last k layers (``"auto"`` always
    considers them)."""
    auto_max_depth: int = 6
    """Largest depth tried by ``shuffle_layers="auto"``."""
    sv_grad_through_ensemble: bool = True
    """Back-propagate the SV term through the shuffled ensemble as well as the teacher (paper:
    yes; ``--no_shuf_grad`` turns it off)."""
    verify: bool = True
    """Verify the vaccine (tail-ratio test) before switching SV on."""
    verify_batches: int = 50
    """Synthetic batches pooled for verification (paper: ``pseudo_test_batches``, 50)."""
    verify_skip: int = 10
    """First synthetic batches ignored before pooling (paper: 10)."""
    tail_sigma: float = 3.0
    """A sample is in the low-divergence tail when ``log10 d < mean - tail_sigma * std``."""
    tail_ratio_threshold: float = 0.02
    """Accept the vaccine when the tail holds more than this fraction (paper: 0.02)."""
    max_shuffle_trials: int = 8
    """Shuffles tried (the first plus re-makes) before SV gives up (paper: 8)."""

    # ------------------------------------------------------------------ Self-Retrospection (SR)
    sr: bool = True
    """Enable Self-Retrospection. It only runs inside its window (below)."""
    sr_start_step: int | None = None
    """First student optimizer step (0-based, counted by the guard) at which SR runs."""
    sr_start_fraction: float | None = None
    """Or: SR starts at ``int(sr_start_fraction * total_steps)`` (the paper resumes at 99.3-99.5 %
    of ZSKT training; the last 1-2 of 200 epochs for CMI)."""
    total_steps: int | None = None
    """Total student optimizer steps of the run, needed by ``sr_start_fraction``."""
    sr_lr: float | None = None
    """Learning rate of the student optimizer's steps inside the SR window. The paper resumes SR
    from a late checkpoint with a fresh optimizer at 5e-4 or 1e-4, while a cosine schedule has
    almost reached zero there; the optimizer's own value is put back after every step, so its
    scheduler is unaffected. ``None``: leave the optimizer alone."""
    sr_every: int = 1
    """Run SR on every ``sr_every``-th student step inside the window."""
    sr_inner_rounds: int = 10
    """Adam steps synthesising the universal perturbation per SR step (paper sweeps: 10, 20)."""
    sr_pert_lr: float = 0.1
    """Adam learning rate of the perturbation synthesis (paper: 0.1)."""
    sr_pert_model: str = "teacher"
    """Model whose deviation the perturbation maximises: ``"teacher"`` (paper sweeps) or
    ``"student"``."""
    sr_pert_l2: float = 1e-3
    """L2 penalty on the perturbation during synthesis (ZSKT: 1e-3; CMI: 0)."""
    sr_epsilon: float | None = None
    """Project the perturbation onto an L2 ball of this radius (the poster's C_eps; the official
    code never projects). ``None``: no projection."""
    sr_epsilon_rms: float | None = None
    """Or: the L2 radius as a root-mean-square per element, ``eps = sr_epsilon_rms *
    sqrt(numel(delta))`` (resolution independent; a 3x3 white patch on a 32x32 grey image has
    an RMS of about 0.09)."""
    sr_warm_start: bool = False
    """Carry the perturbation (and its Adam state) from one SR step to the next instead of
    restarting from zero (off in the paper)."""
    sr_init_std: float = 1e-3
    """Std of the seeded Gaussian start of the perturbation (zero, the official start, is a
    stationary point of the deviation objective)."""
    sr_fixed_point_iters: int = 5
    """Truncated Neumann iterations K of the implicit hypergradient (paper: 5)."""
    sr_inner_step: float = 0.1
    """Step size eta of the fixed-point map ``delta - eta * grad L_in`` (paper: 0.1)."""
    sr_inner_l2: float = 1e-3
    """L2 penalty inside ``L_in`` (paper: 1e-3)."""
    sr_outer_portion: float = 0.02
    """Fraction of the batch that carries the perturbation in the outer loss (paper: 0.02;
    at least one sample)."""
    sr_outer_target: str = "student"
    """What the perturbed samples are pulled towards in the outer loss: ``"student"`` (the
    student's own clean prediction, detached: the paper) or ``"teacher"`` (the teacher's
    prediction on the clean input: the unlearning then also distills, which keeps accuracy)."""
    sr_scale: float = 1.0
    """Multiplier of the SR gradient added to the student's ``.grad``."""
    sr_temperature: float = 1.0
    """Softmax temperature of the SR divergences."""

    # ------------------------------------------------------------------ general
    seed: int = 0
    """Seed of the guard's own RNG (permutations, SR sample choice). The global RNG is never
    touched."""
    logits_fn: Callable[[Any], Any] | None = field(default=None, compare=False)
    """Extract logits from a model output; default handles tensors, tuples (logits first),
    dicts with ``"logits"`` and objects with ``.logits``."""

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ABDConfig: {msg}")

        need(self.sv_coef >= 0, f"sv_coef must be >= 0, got {self.sv_coef}")
        need(self.n_shuffle_models >= 1, "n_shuffle_models must be >= 1")
        need(0 < self.sv_target_fraction < 1, "sv_target_fraction must be in (0, 1)")
        need(self.verify_batches >= 1, "verify_batches must be >= 1")
        need(self.verify_skip >= 0, "verify_skip must be >= 0")
        need(self.max_shuffle_trials >= 1, "max_shuffle_trials must be >= 1")
        need(self.auto_max_depth >= 1, "auto_max_depth must be >= 1")
        sl = self.shuffle_layers
        if isinstance(sl, str):
            need(sl == "auto", f"shuffle_layers must be 'auto', an int or a list of module "
                 f"names, got {sl!r}")
        elif isinstance(sl, int):
            need(sl >= 1, "shuffle_layers as an int must be >= 1")
        else:
            need(len(list(sl)) >= 1 and all(isinstance(s, str) for s in sl),
                 "shuffle_layers as a list must hold module names (str)")
        need(self.sr_pert_model in ("teacher", "student"),
             f"sr_pert_model must be 'teacher' or 'student', got {self.sr_pert_model!r}")
        need(self.sr_inner_rounds >= 0, "sr_inner_rounds must be >= 0")
        need(self.sr_outer_target in ("student", "teacher"),
             f"sr_outer_target must be 'student' or 'teacher', got {self.sr_outer_target!r}")
        need(self.sr_fixed_point_iters >= 0, "sr_fixed_point_iters must be >= 0")
        need(0 < self.sr_outer_portion <= 1, "sr_outer_portion must be in (0, 1]")
        need(self.sr_every >= 1, "sr_every must be >= 1")
        if self.sr_start_fraction is not None:
            need(0 <= self.sr_start_fraction <= 1, "sr_start_fraction must be in [0, 1]")
        if self.sr_epsilon is not None:
            need(self.sr_epsilon > 0, "sr_epsilon must be > 0")
        if self.sr_lr is not None:
            need(self.sr_lr > 0, "sr_lr must be > 0")
        if self.sr_epsilon_rms is not None:
            need(self.sr_epsilon_rms > 0, "sr_epsilon_rms must be > 0")
            need(self.sr_epsilon is None, "give sr_epsilon or sr_epsilon_rms, not both")

    def replace(self, **changes: Any) -> ABDConfig:
        """A copy with some fields changed (unknown names raise a clear error)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"unknown ABDConfig field(s) {sorted(unknown)}; see help(ABDConfig) for the list"
            )
        return dataclasses.replace(self, **changes)

    @property
    def sr_start(self) -> int | None:
        """The first SR step resolved from ``sr_start_step``/``sr_start_fraction``, or ``None``
        when the SR window only opens through ``with guard.retrospection():`` (see
        :class:`~abd_plugin.schedule.SRSchedule`)."""
        return SRSchedule.from_config(self).start

    @classmethod
    def paper(cls, **overrides: Any) -> ABDConfig:
        """The official code's recipe: 5 shuffled convs, coefficient 0.1, verification on, SR
        with 10 rounds at the student learning rate 5e-4 it resumes with (``sup_resume_lr``)."""
        base: dict = dict(shuffle_layers=5, sr_lr=5e-4)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tuned(cls, **overrides: Any) -> ABDConfig:
        """The recipe measured to work best in this project (README, "Results"): SV with the
        automatic depth (verified, so it stays off where no vaccine separates), and SR over the
        last 10 % of student steps at learning rate 1e-3 with a quarter of each batch carrying an
        L2-bounded perturbation."""
        base: dict = dict(shuffle_layers="auto", sr_start_fraction=0.9, sr_lr=1e-3,
                          sr_outer_portion=0.25, sr_epsilon_rms=0.3)
        base.update(overrides)
        return cls(**base)
