"""ABD configuration: one frozen dataclass, every field documented.

The defaults are the recipe this project measured to defend without per-run knobs (README,
"Results"): the guard audits the teacher without data at its first batch (:mod:`abd_plugin.audit`)
and, when the audit flags it, the trigger eraser (:mod:`abd_plugin.eraser`) learns a small mask
over the suspected target's trigger region and blanks it in every teacher input. A teacher the
audit calls clean gets nothing. The paper's two parts, the Shuffling Vaccine and Self-Retrospection,
are off by default: :meth:`ABDConfig.classic` turns them on with the official code's settings,
:meth:`ABDConfig.paper` gives the literal paper recipe and :meth:`ABDConfig.tuned` the SV/SR
settings tuned on this project's grid (all three leave the audit and the eraser off, for
comparison).
"""
from __future__ import annotations

import dataclasses
import inspect
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .schedule import SRSchedule
from .validation import (
    Bool,
    Choice,
    Int,
    IsCallable,
    Num,
    NumPair,
    Optional,
    Spec,
    field_specs,
    spec,
    validate_fields,
)

LayerSpec = str | int | Sequence[str]


class Layers(Spec):
    """``shuffle_layers``: ``"auto"``, an int >= 1, or a non-empty list of module names."""

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
class ABDConfig:
    """Every setting of the ABD defenses (a frozen dataclass; ``replace`` makes changed copies).

    The field list with what each field means and accepts is generated below from the field
    declarations (``help(ABDConfig)`` shows it).
    """

    # ------------------------------------------------------------ teacher audit (data-free)
    audit: bool = spec(
        True, Bool(),
        """Audit the teacher for a backdoor, without data, at the first teacher forward inside
        the guard (:func:`~abd_plugin.audit.audit`: per-class maximum-margin statistic, Gamma
        null, verdict ``poisoned``/``unsure``/``clean`` and the suspected target class). The
        verdict gates the trigger eraser; the report shows it. About a second for a LeNet-5 on a
        CPU.""")
    input_range: tuple[float, float] | None = spec(
        None, Optional(NumPair(-1e9, 1e9)),
        """``(low, high)`` of valid teacher inputs, in the units the teacher receives (after
        your normalisation). ``None``: read it off the first batch the teacher is fed (values
        in [0, 1] -> (0, 1), in [-1, 1] -> (-1, 1), else the batch's range widened by a
        quarter), see :func:`~abd_plugin.audit.infer_input_range`.""")
    audit_starts: int = spec(
        10, Int(1, 10_000),
        """Random starts per class of the audit's margin search.""")
    audit_steps: int = spec(
        100, Int(1, 100_000),
        """Adam steps per start of the audit's margin search.""")
    audit_alpha: float = spec(
        0.05, Num(0, 1, lo_open=True, hi_open=True),
        """The audit calls the teacher ``poisoned`` when the largest statistic's p-value is below
        this.""")
    audit_clean_alpha: float = spec(
        0.2, Num(0, 1, lo_open=True),
        """... and ``clean`` when it is at least this (``unsure`` in between; must be >=
        ``audit_alpha``).""")
    target: int | None = spec(
        None, Optional(Int(0)),
        """The backdoor's target class if you know it: the eraser then runs for this class
        whatever the audit says (the audit still runs and is reported when ``audit`` is on).""")

    # ------------------------------------------------------------ trigger eraser (default)
    erase: bool = spec(
        True, Bool(),
        """Run the trigger eraser (:class:`~abd_plugin.eraser.TriggerEraser`) when the audit
        flags the teacher (``erase_on``): a soft pixel mask, learned online on the batches the
        teacher already sees, that erases from every teacher input the region which sends the
        teacher's samples to the target class; the teacher then sees erased inputs everywhere in
        the loop (student targets and generator loss alike).""")
    erase_on: str = spec(
        "flagged", Choice("poisoned", "flagged", "always"),
        """When the eraser runs: ``"poisoned"`` (audit verdict poisoned), ``"flagged"``
        (poisoned or unsure), ``"always"`` (for the audit's suspect class whatever the verdict;
        measures what a false alarm costs). A ``target`` makes it run regardless.""")
    erase_price: float = spec(
        2.5, Num(0, 1e6),
        """Price of erasing the whole input, in units of 'one target-class sample flipped':
        the mask objective is ``mean p_t(erased target samples) + erase_price * mean(mask) +
        erase_keep * KL(other samples)``. Lower: larger masks (spread triggers), more accuracy
        cost. 5 left scattered, partial masks over an in-digit square (README, "Results"). The
        re-audit (``erase_recheck``) lowers it to ``erase_price_low`` during a run when the mask
        misses part of the trigger.""")
    erase_recheck: int = spec(
        50, Int(0, 1_000_000),
        """Every ``erase_recheck`` mask updates (first after twice that many, once the mask has
        settled), re-audit the *erased* teacher for the target class alone (the audit's margin
        search through the mask, a tenth of an audit's cost) and compare its statistic with the
        other classes' from the first audit. If the target still stands out (p <
        ``audit_alpha``: the mask misses part of the trigger, as on a spread watermark), the
        price drops to ``erase_price_low`` and the checks stop; they also stop after two checks in
        a row find the target back among the others. 0: never re-audit. Needs the audit (a
        ``target`` given with ``audit=False`` has no other classes to compare with).""")
    erase_price_low: float = spec(
        1.0, Num(0, 1e6),
        """The price after a re-audit finds that the mask misses part of the trigger (larger
        masks). With ``erase_price`` at or below it, no re-audit runs.""")
    erase_keep: float = spec(
        1.0, Num(0, 1e6),
        """Weight of keeping the teacher's predictions on the samples it does not call the
        target (KL between the erased and the original teacher).""")
    erase_steps: int = spec(
        2, Int(1, 1000),
        """Adam steps on the mask per update.""")
    erase_every: int = spec(
        2, Int(1, 1_000_000),
        """The mask is updated on every ``erase_every``-th distinct teacher batch (a batch fed
        several times in a row, as ZSKT's student steps do, counts once).""")
    erase_lr: float = spec(
        0.1, Num(0, 1e3, lo_open=True),
        """Adam learning rate of the mask's logits.""")
    erase_fill: float | None = spec(
        None, Optional(Num(-1e9, 1e9)),
        """Value erased pixels take, in the teacher's input units. ``None``: the low end of the
        input range, per channel - black in image space, whatever the normalisation: the low
        end of ``input_range`` when given, else 0 for inputs in [0, 1], -1 for inputs in
        [-1, 1], else each channel's minimum over the first batch the eraser sees. A number:
        that value everywhere (0 is the data mean for mean-normalised inputs).""")
    erase_only_target: bool = spec(
        False, Bool(),
        """Erase only the inputs the teacher calls the target class (one extra teacher forward
        on those rows); the others reach the teacher unchanged.""")

    # ------------------------------------------------------------------ Shuffling Vaccine (SV)
    sv: bool = spec(
        False, Bool(),
        """Enable the Shuffling Vaccine (off by default: on the benchmark it did not cut the
        backdoor; ``ABDConfig.paper()`` and ``ABDConfig.classic()`` turn it on).""")
    sv_coef: float = spec(
        0.1, Num(0, 1e4),
        """Weight of the SV loss term ``-coef * mean_{suspicious} KL(p_T || p_shuffled) / C``
        (paper: 0.1). On a fixed transfer set the same coefficient weights the anti-distillation of
        suspicious samples in :meth:`ABDGuard.reweight`.""")
    sv_reweight_cap: float = spec(
        5.0, Num(0, lo_open=True),
        """Bound of the anti-distillation in :meth:`ABDGuard.reweight`: a suspicious sample's
        per-sample loss counts up to this value (in the loss's units; nats for a KL) and gives
        no gradient beyond it, so the reweighted loss stays ``>= -sv_coef * sv_reweight_cap``
        and cannot run away on a fixed transfer set (uncapped, it reached -1e5 and 11 % accuracy
        on the test suite's digits task at coefficient 1). 5 nats of ``KL(p_T || p_S)`` on a
        confidently classified sample means the student gives the teacher's class about
        ``e^-5``, under 1 %, of the teacher's probability: pushing further only costs accuracy.
        Below the cap the rule is the paper's, unchanged.""")
    sv_adaptive: bool = spec(
        False, Bool(),
        """Adapt the coefficient online so that the suspicious fraction of synthetic batches is
        driven down to ``sv_target_fraction`` (a multiplicative controller, see
        :class:`~abd_plugin.vaccine.ShufflingVaccine`). Off in the paper.""")
    sv_target_fraction: float = spec(
        0.2, Num(0, 1, lo_open=True, hi_open=True),
        """Target suspicious fraction for ``sv_adaptive``.""")
    sv_adapt_rate: float = spec(
        0.05, Num(0, 1e3, lo_open=True),
        """Step of the log-coefficient controller per SV call (``sv_adaptive``).""")
    sv_coef_bounds: tuple[float, float] = spec(
        (1e-3, 1e3), NumPair(0, 1e6),
        """Clamp for the adaptive coefficient.""")
    n_shuffle_models: int = spec(
        3, Int(1, 1024),
        """Number of channel-shuffled teacher copies averaged into the ensemble (paper: 3).""")
    shuffle_layers: LayerSpec = spec(
        "auto", Layers(),
        """Which layers get their input channels permuted: ``"auto"`` (choose the depth per teacher
        from the verification pool), an int k (the last k conv layers in forward order; paper: 5),
        or a list of module names.""")
    shuffle_linear: bool = spec(
        False, Bool(),
        """Also count ``nn.Linear`` layers when picking the last k layers (``"auto"`` always
        considers them).""")
    auto_max_depth: int = spec(
        6, Int(1),
        """Largest depth tried by ``shuffle_layers="auto"``.""")
    sv_grad_through_ensemble: bool = spec(
        True, Bool(),
        """Back-propagate the SV term through the shuffled ensemble as well as the teacher (paper:
        yes; ``--no_shuf_grad`` turns it off).""")
    verify: bool = spec(
        True, Bool(),
        """Verify the vaccine (tail-ratio test) before switching SV on.""")
    verify_batches: int = spec(
        50, Int(1),
        """Synthetic batches pooled for verification (paper: ``pseudo_test_batches``, 50).""")
    verify_skip: int = spec(
        10, Int(0),
        """First synthetic batches ignored before pooling (paper: 10).""")
    tail_sigma: float = spec(
        3.0, Num(0, 100),
        """A sample is in the low-divergence tail when ``log10 d < mean - tail_sigma * std``.""")
    tail_ratio_threshold: float = spec(
        0.02, Num(-1, 1, hi_open=True),
        """Accept the vaccine when the tail holds more than this fraction (paper: 0.02). A
        tail ratio lies in [0, 1]: 1 or more would never accept; a negative value accepts
        every shuffle (``"auto"`` still picks the best-scoring depth).""")
    max_shuffle_trials: int = spec(
        8, Int(1),
        """Shuffles tried (the first plus re-makes) before SV gives up (paper: 8).""")

    # ------------------------------------------------------------------ Self-Retrospection (SR)
    sr: bool = spec(
        False, Bool(),
        """Enable Self-Retrospection. It only runs inside its window (below). Off by default (on
        the benchmark it traded accuracy for ASR); ``paper()`` and ``classic()`` turn it on.""")
    sr_start_step: int | None = spec(
        None, Optional(Int(0)),
        """First student optimizer step (0-based, counted by the guard) at which SR runs.""")
    sr_start_fraction: float | None = spec(
        None, Optional(Num(0, 1)),
        """Or: SR starts at ``int(sr_start_fraction * total_steps)`` (the paper resumes at
        99.3-99.5 % of ZSKT training; the last 1-2 of 200 epochs for CMI).""")
    total_steps: int | None = spec(
        None, Optional(Int(1)),
        """Total student optimizer steps of the run, needed by ``sr_start_fraction``.""")
    sr_lr: float | None = spec(
        None, Optional(Num(0, lo_open=True)),
        """Learning rate of the student optimizer's steps inside the SR window. The paper resumes SR
        from a late checkpoint with a fresh optimizer at 5e-4 or 1e-4, while a cosine schedule has
        almost reached zero there; the optimizer's own value is put back after every step, so its
        scheduler is unaffected. ``None``: leave the optimizer alone.""")
    sr_every: int = spec(
        1, Int(1),
        """Run SR on every ``sr_every``-th student step inside the window.""")
    sr_inner_rounds: int = spec(
        10, Int(0),
        """Adam steps synthesising the universal perturbation per SR step (paper sweeps: 10,
        20).""")
    sr_pert_lr: float = spec(
        0.1, Num(0, 1e3, lo_open=True),
        """Adam learning rate of the perturbation synthesis (paper: 0.1).""")
    sr_pert_model: str = spec(
        "teacher", Choice("teacher", "student"),
        """Model whose deviation the perturbation maximises: ``"teacher"`` (paper sweeps) or
        ``"student"``.""")
    sr_pert_l2: float = spec(
        1e-3, Num(0),
        """L2 penalty on the perturbation during synthesis (ZSKT: 1e-3; CMI: 0).""")
    sr_epsilon: float | None = spec(
        None, Optional(Num(0, lo_open=True)),
        """Project the perturbation onto an L2 ball of this radius (the poster's C_eps; the official
        code never projects). ``None``: no projection.""")
    sr_epsilon_rms: float | None = spec(
        None, Optional(Num(0, lo_open=True)),
        """Or: the L2 radius as a root-mean-square per element, ``eps = sr_epsilon_rms *
        sqrt(numel(delta))`` (resolution independent; a 3x3 white patch on a 32x32 grey image has
        an RMS of about 0.09).""")
    sr_warm_start: bool = spec(
        False, Bool(),
        """Carry the perturbation (and its Adam state) from one SR step to the next instead of
        restarting from zero (off in the paper).""")
    sr_init_std: float = spec(
        1e-3, Num(0, 1e3),
        """Std of the seeded Gaussian start of the perturbation (zero, the official start, is a
        stationary point of the deviation objective).""")
    sr_fixed_point_iters: int = spec(
        5, Int(0),
        """Truncated Neumann iterations K of the implicit hypergradient (paper: 5).""")
    sr_inner_step: float = spec(
        0.1, Num(0, 1e3, lo_open=True),
        """Step size eta of the fixed-point map ``delta - eta * grad L_in`` (paper: 0.1).""")
    sr_inner_l2: float = spec(
        1e-3, Num(0),
        """L2 penalty inside ``L_in`` (paper: 1e-3).""")
    sr_outer_portion: float = spec(
        0.02, Num(0, 1, lo_open=True),
        """Fraction of the batch that carries the perturbation in the outer loss (paper: 0.02;
        at least one sample).""")
    sr_outer_target: str = spec(
        "student", Choice("student", "teacher"),
        """What the perturbed samples are pulled towards in the outer loss: ``"student"`` (the
        student's own clean prediction, detached: the paper) or ``"teacher"`` (the teacher's
        prediction on the clean input: the unlearning then also distills, which keeps accuracy).""")
    sr_scale: float = spec(
        1.0, Num(0, 1e4),
        """Multiplier of the SR gradient added to the student's ``.grad``.""")
    sr_temperature: float = spec(
        1.0, Num(0.01, 100),
        """Softmax temperature of the SR divergences.""")

    # ------------------------------------------------------------------ general
    seed: int = spec(
        0, Int(0, 2**63 - 2),
        """Seed of the guard's own RNG (permutations, SR sample choice). The global RNG is never
        touched.""")
    logits_fn: Callable[[Any], Any] | None = spec(
        None, Optional(IsCallable()),
        """Extract logits from a model output; default handles tensors, tuples (logits first),
        dicts with ``"logits"`` and objects with ``.logits``.""", compare=False)

    def __post_init__(self) -> None:
        validate_fields(self, _SPECS)  # every field against its spec (the table above)
        if self.sr_epsilon is not None and self.sr_epsilon_rms is not None:
            raise ValueError("ABDConfig: give sr_epsilon or sr_epsilon_rms, not both")
        if self.audit_clean_alpha < self.audit_alpha:
            raise ValueError(
                f"ABDConfig.audit_clean_alpha ({self.audit_clean_alpha}) must be >= audit_alpha "
                f"({self.audit_alpha})")
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError(f"ABDConfig.input_range must be (low, high) with low < high, got "
                             f"{self.input_range}")

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
    def classic(cls, **overrides: Any) -> ABDConfig:
        """ABD as published, with this project's implementation defaults: SV (automatic depth,
        verified) and SR (in its window), no audit and no eraser."""
        base: dict = dict(sv=True, sr=True, audit=False, erase=False)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def paper(cls, **overrides: Any) -> ABDConfig:
        """The official code's recipe: 5 shuffled convs, coefficient 0.1, verification on, SR
        with 10 rounds at the student learning rate 5e-4 it resumes with (``sup_resume_lr``);
        no audit, no eraser."""
        base: dict = dict(sv=True, sr=True, audit=False, erase=False, shuffle_layers=5,
                          sr_lr=5e-4)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tuned(cls, **overrides: Any) -> ABDConfig:
        """The previous release's recipe for SV and SR (README, "Results"): SV with the
        automatic depth (verified, so it stays off where no vaccine separates), and SR over the
        last 10 % of student steps at learning rate 1e-3 with a quarter of each batch carrying an
        L2-bounded perturbation."""
        base: dict = dict(sv=True, sr=True, audit=False, erase=False, shuffle_layers="auto",
                          sr_start_fraction=0.9, sr_lr=1e-3, sr_outer_portion=0.25,
                          sr_epsilon_rms=0.3)
        base.update(overrides)
        return cls(**base)


_SPECS = field_specs(ABDConfig)  # raises at import for a field declared without a spec


def _field_docs(cls: type) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        check, doc = _SPECS[f.name]
        parts.append(f"{f.name} = {f.default!r}\n    accepts {check.describe()}\n"
                     + textwrap.indent(inspect.cleandoc(doc), "    "))
    return "\n\n".join(parts)


ABDConfig.__doc__ = (
    inspect.cleandoc(ABDConfig.__doc__ or "").split("\n\nThe field list")[0]
    + "\n\nEvery field is checked when a config is made (also by ``replace``, ``paper()``, "
    "``tuned()``): a value of the wrong type raises ``TypeError``, one out of range ``ValueError``,"
    " both naming the field and what it accepts.\n\nFields (name = default):\n\n"
    + _field_docs(ABDConfig)
)
