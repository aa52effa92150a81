"""Data-free teacher audit: is this teacher backdoored, and towards which class?

No data is needed. For every class ``c`` the audit starts from random inputs inside the valid
input range and maximises the class's logit margin by gradient steps on the inputs (kept inside
the range):

    r_c = max_i [ z_c(x_i) - max_{k != c} z_k(x_i) ]        (the class's maximum margin)

A backdoor is a shortcut to its target class: some small input pattern drives the target's margin
far beyond what any other class can reach, so the target's ``r`` stands out. The null model for a
class is a Gamma distribution fitted (maximum likelihood) to the other classes' statistics; with
``K`` classes the order-statistic p-value of class ``c`` is ``p_c = 1 - F(r_c)^K``. A robust
z-score (median / median absolute deviation of the other classes) is reported as a second
opinion. This is the maximum-margin detector of Wang et al., "MM-BD: Post-Training Detection of
Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic" (IEEE S&P
2024), written here from its description.

The plug-in p-value trusts a Gamma fitted to only ``K - 1`` values; on clean teachers it falls
below 0.05 far more often than 1 time in 20 (4 of 20 clean LeNet-5-BN teachers). The audit
therefore reports *calibrated* p-values (:func:`calibrated_pvalues`): the same rule applied to
simulated clean teachers (``K`` independent Gamma statistics with the fitted shape) says how
often a clean teacher's largest statistic looks at least this extreme. The universal blend
statistic (:mod:`abd_plugin.universal`) gets its own p-value the same way (the largest of ``K``
independent normal statistics, :func:`universal_pvalue`).

The verdict: ``"poisoned"`` when the suspect's evidence (the smaller p-value of the statistics
that favour it, times 2) is below ``alpha``, ``"clean"`` when the margin statistic's p-value is
at least ``clean_alpha`` and the universal z-score below ``flag_z``, ``"unsure"`` otherwise.
Before a teacher is called clean, a third look: the universal patch statistic
(:func:`~abd_plugin.universal.universal_patch_statistic`, one small pasted patch per class) turns
``clean`` into ``"unsure"``, with its favourite as the suspect, when its leave-one-out z-score
reaches ``patch_flag_z``; the margin search saturates on some architectures (a residual network on
normalised colour inputs reaches margins in the hundreds for every class) and hides a patch
backdoor there.

The inputs live where the teacher's real inputs live: pass ``input_range`` (after your
normalisation, per channel if it differs), or let :func:`infer_input_range` read it off a batch
the teacher is fed (inside a guard, the domain the guard resolved: the teacher's own evidence
first, :mod:`abd_plugin.domain`).

The audit never touches the teacher (it runs a frozen copy), the global RNG or autograd state
outside itself.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from . import _dist
from ._replica import TeacherReplica, model_device, unwrap_model
from .domain import infer_input_range
from .hooks import DefenseHook, GuardContext, HookReport
from .outputs import check_logits, extract_logits
from .universal import (
    class_margins,
    inversion_base,
    leave_one_out_z,
    universal_blend_statistic,
    universal_patch_statistic,
)
from .validation import Bool, Int, Num, Section, section_or_default, spec

Verdict = Literal["poisoned", "clean", "unsure"]

#: the universal patch statistic's z-score that keeps a verdict from ``clean`` (measured on the
#: kit's clean teachers: README, "The audit's null")
PATCH_FLAG_Z = 7.0
RangeLike = tuple[float, float] | tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class AuditSettings(Section):
    """The audit's section of :class:`~abd_plugin.ABDConfig` (``ABDConfig(audit=...)``), also the
    settings of :func:`audit` on its own. The defaults take about a second for a LeNet-5 on a
    CPU. The random starts are drawn from the guard's ``seed`` (``audit(..., seed=)`` alone)."""

    switch: ClassVar[str] = "audit"
    flat_prefix: ClassVar[str] = "audit_"

    enabled: bool = spec(
        True, Bool(),
        """Audit the teacher for a backdoor, without data, at the first teacher forward inside
        the guard (:func:`~abd_plugin.audit.audit`: per-class maximum-margin statistic, Gamma
        null, verdict ``poisoned``/``unsure``/``clean`` and the suspected target class). The
        verdict gates the trigger eraser; the report shows it. About a second for a LeNet-5 on a
        CPU.""")
    starts: int = spec(
        10, Int(1, 10_000),
        """Random starts per class of the margin search; the statistic is the best margin over
        them.""")
    steps: int = spec(
        100, Int(1, 100_000),
        """Adam steps on the inputs per start.""")
    lr: float = spec(
        0.05, Num(0, 1e3, lo_open=True),
        """Adam learning rate of the margin search, in units of the input range's width.""")
    alpha: float = spec(
        0.05, Num(0, 1, lo_open=True, hi_open=True),
        """The audit calls the teacher ``poisoned`` when the suspect's evidence is below this:
        the smaller calibrated p-value of the statistics that favour the suspect, times 2 (two
        statistics are looked at). Measured: 1 of 52 clean teachers of 4 architectures called
        ``poisoned`` (README, "The audit's null").""")
    clean_alpha: float = spec(
        0.5, Num(0, 1, lo_open=True),
        """The audit calls the teacher ``clean`` when the margin statistic's calibrated
        p-value is at least this and the universal z-score is below ``flag_z`` (``unsure`` in
        between; must be >= ``alpha``). A calibrated p-value under 0.5 is a hint, not a
        finding: ``unsure`` puts the trigger eraser on probation, which costs a clean teacher
        nothing unless its repair proves itself (0.5 here is the old plug-in 0.2).""")
    null_draws: int = spec(
        2000, Int(100, 10_000_000),
        """Simulated clean teachers per class of the calibrated null (:func:`calibrated_pvalues`;
        the universal statistic's null uses ten times as many). The smallest p-value is
        ``1 / (null_draws + 1)``.""")
    batch_size: int = spec(
        512, Int(1, 1_000_000),
        """Inputs optimised at once (classes are processed in chunks of this many inputs).""")
    universal: bool = spec(
        True, Bool(),
        """Also compute the universal blend statistic (:mod:`abd_plugin.universal`): per class,
        how well one full-input pattern blended into a data-free, class-balanced base moves the
        other classes' inputs there. It names the target of triggers spread over the whole
        input (blend, sinusoid, warp), where the margin statistic's favourite is often a natural
        class, and it is the verdict's second vote (see ``target_z`` and ``flag_z``). About 5
        CPU-seconds for a LeNet-5.""")
    universal_steps: int = spec(
        60, Int(1, 100_000),
        """Adam steps of each class's blend head.""")
    target_z: float = spec(
        1.8, Num(0, 1e6),
        """The universal statistic's favourite class becomes the suspect when its leave-one-out
        z-score is at least this and its p-value is below the margin statistic's favourite's
        (else the margin statistic's favourite stays the suspect).""")
    flag_z: float = spec(
        4.0, Num(0, 1e6),
        """A universal z-score at least this keeps the verdict from ``clean`` by itself (at
        least ``unsure``: the eraser goes on probation). ``poisoned`` needs the suspect's
        evidence below ``alpha`` (see ``alpha``).""")
    patch: bool = spec(
        True, Bool(),
        """Before calling a teacher ``clean``, also compute the universal patch statistic
        (:func:`~abd_plugin.universal.universal_patch_statistic`: per class, how well one
        pattern pasted through one small mask, ``patch_budget`` of the positions, moves the
        other classes' inputs there). Its leave-one-out z-score at ``patch_flag_z`` or more
        makes the verdict ``unsure`` with its favourite as the suspect (never ``poisoned``: the
        eraser goes on probation). It finds patch backdoors where the margin search saturates
        (a residual network on normalised 3-channel inputs). About the universal statistic's
        cost, paid only by teachers the other two statistics call clean.""")
    patch_budget: float = spec(
        0.03, Num(0, 1, lo_open=True),
        """The patch head's area: the mask's mean over the positions is held at most this.""")
    patch_steps: int = spec(
        60, Int(1, 100_000),
        """Adam steps of each class's patch head.""")
    patch_flag_z: float = spec(
        PATCH_FLAG_Z, Num(0, 1e6),
        """The patch statistic's leave-one-out z-score at which it keeps the verdict from
        ``clean`` and names the suspect (see ``patch``).""")

    def check(self) -> None:
        if self.clean_alpha < self.alpha:
            raise ValueError(f"{type(self).__name__}.clean_alpha ({self.clean_alpha}) must be >= "
                             f"alpha ({self.alpha})")


@dataclass(frozen=True)
class AuditReport:
    """The audit's outcome (a plain, printable record).

    Attributes:
        verdict: ``"poisoned"``, ``"clean"`` or ``"unsure"``.
        suspect: the class with the largest statistic.
        target: ``suspect`` unless the verdict is ``"clean"`` (then ``None``).
        statistic: per class, the maximum margin ``r_c``.
        p_values: per class, the calibrated p-value of ``r_c`` (:func:`calibrated_pvalues`:
            the share of simulated clean teachers, ``K`` Gamma statistics with the shape fitted
            to the other classes, whose largest statistic looks at least as extreme).
        raw_p_values: per class, the plug-in order-statistic p-value ``1 - F(r_c)^K`` of the
            Gamma fitted to the other classes (MM-BD's; too small on clean teachers, kept for
            comparison; ``None`` in reports saved before it existed).
        z_scores: per class, ``(r_c - median) / (1.4826 * MAD)`` of the other classes.
        seconds: wall time of the audit.
        input_shape: one input's shape, e.g. ``(3, 32, 32)``.
        input_range: the (low, high) the inputs were kept in, per channel.
        ensemble_class: where synthetic samples were given, the class the channel-shuffled
            teacher ensemble predicts most often on them (a second, independent hint of the target;
            ``None`` when not computed).
        alpha, clean_alpha: the thresholds the verdict used.
        universal: per class, the universal blend statistic (:mod:`abd_plugin.universal`;
            ``None`` when not computed); ``universal_class``, ``universal_z``: its favourite and
            that class's leave-one-out z-score; ``universal_p``: that z-score's p-value
            (:func:`universal_pvalue`).
        margin_suspect: the class with the largest maximum margin (the suspect unless the
            universal statistic named another one).
        patch: per class, the universal patch statistic (``None`` when not computed: only a
            teacher the other two statistics call clean gets it, with ``AuditSettings.patch``
            on and inputs with two spatial axes); ``patch_class``, ``patch_z``: its favourite
            and that class's leave-one-out z-score.
        reason: how the verdict and the suspect were decided, in words.
    """

    verdict: Verdict
    suspect: int
    target: int | None
    statistic: tuple[float, ...]
    p_values: tuple[float, ...]
    z_scores: tuple[float, ...]
    seconds: float
    input_shape: tuple[int, ...]
    input_range: tuple[tuple[float, ...], tuple[float, ...]]
    alpha: float = 0.05
    clean_alpha: float = 0.5
    ensemble_class: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    universal: tuple[float, ...] | None = None
    universal_class: int | None = None
    universal_z: float | None = None
    margin_suspect: int | None = None
    reason: str = ""
    raw_p_values: tuple[float, ...] | None = None
    universal_p: float | None = None
    patch: tuple[float, ...] | None = None
    patch_class: int | None = None
    patch_z: float | None = None

    @property
    def p_value(self) -> float:
        """p-value of the suspect class."""
        return self.p_values[self.suspect]

    @property
    def z_score(self) -> float:
        """Robust z-score of the suspect class."""
        return self.z_scores[self.suspect]

    @property
    def agree(self) -> bool | None:
        """Whether the shuffled ensemble's favourite class is the suspect (None: not computed)."""
        return None if self.ensemble_class is None else self.ensemble_class == self.suspect

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(p_value=self.p_value, z_score=self.z_score, agree=self.agree)
        return d

    def headline(self) -> str:
        """One sentence a user understands."""
        stat = (f"class {self.suspect}'s maximum margin {self.statistic[self.suspect]:.3g}, "
                f"p = {self.p_value:.2g}, robust z = {self.z_score:.1f}")
        if self.verdict == "poisoned":
            head = f"the teacher looks backdoored towards class {self.suspect} ({stat})"
        elif self.verdict == "unsure":
            head = (f"the teacher may be backdoored towards class {self.suspect} (not significant"
                    f" at {self.alpha}: {stat})")
        else:
            head = f"no backdoor found (largest statistic: {stat})"
        if self.universal_class is not None and self.universal_z is not None:
            head += (f"; the universal blend statistic favours class {self.universal_class} "
                     f"(z = {self.universal_z:.1f}"
                     + (f", p = {self.universal_p:.2g})" if self.universal_p is not None
                        else ")"))
        if self.patch_class is not None and self.patch_z is not None:
            head += (f"; the universal patch statistic favours class {self.patch_class} "
                     f"(z = {self.patch_z:.1f})")
        if self.ensemble_class is not None:
            head += (f"; the shuffled ensemble favours class {self.ensemble_class}"
                     f" ({'agrees' if self.agree else 'disagrees'})")
        return head

    def __str__(self) -> str:
        lines = [f"audit: {self.verdict} - {self.headline()} [{self.seconds:.1f}s]"]
        if self.reason:
            lines.append(f"why: {self.reason}")
        uni = self.universal
        raw = self.raw_p_values
        lines.append(f"{'class':>5} {'max margin':>11} {'p-value':>9}"
                     + (f" {'plug-in p':>9}" if raw is not None else "") + f" {'robust z':>9}"
                     + (f" {'universal':>10}" if uni is not None else "")
                     + (f" {'patch':>10}" if self.patch is not None else ""))
        for c, (r, p, z) in enumerate(zip(self.statistic, self.p_values, self.z_scores,
                                           strict=True)):
            mark = "  <- suspect" if c == self.suspect else ""
            u = f" {uni[c]:>10.3f}" if uni is not None else ""
            u += f" {self.patch[c]:>10.3f}" if self.patch is not None else ""
            q = f" {raw[c]:>9.2g}" if raw is not None else ""
            lines.append(f"{c:>5} {r:>11.3f} {p:>9.2g}{q} {z:>9.1f}{u}{mark}")
        lines.extend(self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- statistics
def _gamma_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood Gamma (shape k, scale theta) of positive samples (float64)."""
    return _gamma_fit_rows(x)


def order_pvalues(stat: Tensor) -> Tensor:
    """Per class: ``1 - F(r_c)^K`` with F the Gamma fitted to the other classes' statistics."""
    r = _shifted(stat)
    K = r.numel()
    out = torch.ones(K, dtype=torch.float64)
    for c in range(K):
        rest = torch.cat([r[:c], r[c + 1:]])
        if rest.numel() < 2 or float(rest.std()) == 0.0:
            out[c] = 0.0 if float(r[c]) > float(rest.max()) else 1.0
            continue
        k, theta = _gamma_fit(rest)
        cdf = torch.special.gammainc(k, r[c] / theta)
        out[c] = 1 - cdf.clamp(0, 1) ** K
    return out.clamp(0.0, 1.0)


def _shifted(stat: Tensor) -> Tensor:
    """The statistics (one set per row of the last dimension) shifted so that every value is
    positive (float64): margins can be <= 0 for classes the model can hardly produce; the
    shift is common to every class of a set."""
    r = stat.double()
    lo = r.min(-1, keepdim=True).values
    return r + torch.clamp(-lo, min=0.0) + 1e-6 * (r.abs().max(-1, keepdim=True).values + 1)


def _split_largest(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows (..., K) -> each row's largest value (...,) and its other values (..., K - 1)."""
    top, idx = x.max(-1)
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(-1, idx.unsqueeze(-1), False)
    return top, x[keep].view(*x.shape[:-1], x.shape[-1] - 1)


def _largest_pvalue(r: Tensor) -> Tensor:
    """Rows of positive statistics (..., K) -> the plug-in order p-value of each row's
    largest value (Gamma fitted to the row's other values): what :func:`order_pvalues` gives
    the suspect, for many rows at once."""
    top, rest = _split_largest(r)
    k, theta = _gamma_fit_rows(rest)
    return 1 - torch.special.gammainc(k, top / theta).clamp(0, 1) ** r.shape[-1]


def _gamma_fit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood Gamma (shape k, scale theta) of every row of positive samples
    ``x`` (..., n) at once (float64): Minka's start, 20 Newton steps on
    ``log k - digamma(k) = log mean - mean log``."""
    mean = x.mean(-1)
    s = (torch.log(mean) - torch.log(x).mean(-1)).clamp_min(1e-12)
    k = (3 - s + torch.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(20):
        num = torch.log(k) - torch.special.digamma(k) - s
        den = 1 / k - torch.special.polygamma(1, k)
        k = (k - num / den).clamp_min(1e-6)
    return k, mean / k


def _standard_gamma(shape: float, size: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Gamma(shape, 1) draws (float64) from ``gen`` only (Marsaglia and Tsang's method; shapes
    below 1 through Gamma(shape + 1) * U^(1 / shape))."""
    n = math.prod(size)
    a = shape + 1.0 if shape < 1.0 else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(0, dtype=torch.float64)
    while out.numel() < n:
        m = int((n - out.numel()) * 1.1) + 16
        x = torch.randn(m, generator=gen, dtype=torch.float64)
        u = torch.rand(m, generator=gen, dtype=torch.float64)
        v = (1 + c * x) ** 3
        ok = v > 0
        logv = torch.log(v.clamp_min(1e-300))
        ok &= torch.log(u) < 0.5 * x * x + d - d * v + d * logv
        out = torch.cat([out, (d * v)[ok]])
    out = out[:n]
    if shape < 1.0:
        out = out * torch.rand(n, generator=gen, dtype=torch.float64) ** (1.0 / shape)
    return out.view(size)


def calibrated_pvalues(stat: Tensor, draws: int = 2000, seed: int = 0) -> Tensor:
    """Per class, the p-value of the audit's decision rule itself, calibrated by simulation.

    :func:`order_pvalues` plugs a Gamma fitted to only ``K - 1`` values into ``1 - F(r)^K``;
    that ignores the fit's own error and, with 10 classes, calls ``p < 0.05`` far more often
    than 1 time in 20 when nothing is wrong. Here, for class ``c``: draw ``draws`` sets of
    ``K`` independent Gamma values with the shape fitted to the other classes (the null: no
    class is special; the scale does not matter), apply the same rule to each set (the plug-in
    p-value of its largest value, Gamma fitted to the rest), and return the share of sets whose
    p-value is at most class ``c``'s: ``(1 + #{p_sim <= p_c}) / (draws + 1)``. Deterministic
    in ``seed``; the global RNG is not touched. The smallest value is ``1 / (draws + 1)``.
    With fewer than 3 classes there is nothing to fit: the plug-in values are returned."""
    r = _shifted(stat)
    K = r.numel()
    raw = order_pvalues(stat)
    out = torch.ones(K, dtype=torch.float64)
    if K < 3:
        return raw
    gen = torch.Generator().manual_seed(int(seed))
    for c in range(K):
        rest = torch.cat([r[:c], r[c + 1:]])
        if float(rest.std()) == 0.0:
            out[c] = raw[c]
            continue
        k, _ = _gamma_fit_rows(rest)
        null = _largest_pvalue(_shifted(_standard_gamma(float(k), (draws, K), gen)))
        out[c] = (1 + int((null <= raw[c]).sum())) / (draws + 1)
    return out


@functools.lru_cache(maxsize=16)
def _universal_null(num_classes: int, draws: int, seed: int) -> Tensor:
    """Sorted leave-one-out z of the largest of ``num_classes`` independent standard normals
    (``draws`` sets): the universal statistic's null when no class is special."""
    gen = torch.Generator().manual_seed(int(seed))
    top, rest = _split_largest(torch.randn(draws, num_classes, generator=gen,
                                           dtype=torch.float64))
    return ((top - rest.mean(1)) / rest.std(1, unbiased=False)).sort().values


def universal_pvalue(z: float, num_classes: int, draws: int = 20000, seed: int = 0) -> float:
    """The p-value of the universal statistic's favourite: the share of ``draws`` sets of
    ``num_classes`` independent normal statistics whose largest value's leave-one-out z-score
    (:func:`~abd_plugin.universal.leave_one_out_z`) is at least ``z``,
    ``(1 + count) / (draws + 1)``."""
    if num_classes < 3:
        return 1.0
    null = _universal_null(int(num_classes), int(draws), int(seed))
    above = len(null) - int(torch.searchsorted(null, torch.tensor(float(z), dtype=null.dtype)))
    return (1 + above) / (len(null) + 1)


def robust_z(stat: Tensor) -> Tensor:
    """Per class: ``(r_c - median) / (1.4826 MAD)`` over the other classes."""
    r = stat.double()
    K = r.numel()
    out = torch.zeros(K, dtype=torch.float64)
    for c in range(K):
        rest = torch.cat([r[:c], r[c + 1:]])
        med = rest.median()
        mad = (rest - med).abs().median() * 1.4826
        out[c] = (r[c] - med) / (mad + 1e-12 * (r.abs().max() + 1))
    return out


# ---------------------------------------------------------------------------------- inputs
def _range_tensors(input_range: Any, channels: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    lo, hi = input_range
    low = torch.as_tensor(lo, dtype=torch.float64).flatten()
    high = torch.as_tensor(hi, dtype=torch.float64).flatten()
    if low.numel() not in (1, channels) or high.numel() not in (1, channels):
        raise ValueError(
            f"input_range must be (low, high) with scalars or {channels} per-channel values, "
            f"got {input_range!r}")
    low, high = low.expand(channels), high.expand(channels)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()) or bool(
            (high <= low).any()):
        raise ValueError(f"input_range needs finite low < high, got {input_range!r}")
    return low.to(device, dtype), high.to(device, dtype)


# ---------------------------------------------------------------------------------- the search
def max_margin_statistic(
    model: nn.Module, input_shape: Sequence[int], num_classes: int, *,
    input_range: Any = (0.0, 1.0), settings: AuditSettings | None = None,
    logits_fn: Callable[[Any], Tensor] | None = None, classes: Sequence[int] | None = None,
    seed: int = 0,
) -> Tensor:
    """Per-class maximum margin ``r_c`` (float64, (K,)) of a frozen ``model`` over
    ``settings.starts`` random starts in ``input_range`` (drawn from ``seed``), each run
    ``settings.steps`` Adam steps. The inputs are optimised in the unit cube and mapped affinely
    into the range. With ``classes``, only those classes are searched (the others stay
    ``-inf``)."""
    settings = settings or AuditSettings()
    dev = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shape = tuple(int(s) for s in input_shape)
    low, high = _range_tensors(input_range, shape[0], dtype, dev)
    view = (1, shape[0]) + (1,) * (len(shape) - 1)
    low, high = low.view(view), high.view(view)
    gen = torch.Generator().manual_seed(seed)
    n = settings.starts
    wanted = torch.arange(num_classes) if classes is None else torch.tensor(
        sorted({int(c) for c in classes}), dtype=torch.long)
    if wanted.numel() == 0 or int(wanted.min()) < 0 or int(wanted.max()) >= num_classes:
        raise ValueError(f"classes must be non-empty and in [0, {num_classes}), got {classes}")
    labels = wanted.repeat_interleave(n)
    best = torch.full((num_classes,), -math.inf, dtype=torch.float64)
    chunk = max(n, settings.batch_size // n * n)
    with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        for start in range(0, len(labels), chunk):
            cls = labels[start:start + chunk].to(dev)
            u = torch.rand((len(cls),) + shape, generator=gen, dtype=torch.float64)
            u = u.to(dev, dtype).requires_grad_(True)
            opt = torch.optim.Adam([u], lr=settings.lr)
            for _ in range(settings.steps + 1):
                z = extract_logits(model(low + u * (high - low)), logits_fn)
                margin = class_margins(z, cls)
                if _ == settings.steps:
                    break
                opt.zero_grad(set_to_none=True)
                (-margin.sum()).backward()
                opt.step()
                with torch.no_grad():
                    u.clamp_(0.0, 1.0)
            m = margin.detach().double().cpu()
            for c in cls.unique().tolist():
                sel = cls.cpu() == c
                best[c] = max(float(best[c]), float(m[sel].max()))
    return best


def _base(model: nn.Module, shape: tuple[int, ...], num_classes: int, low: Tensor,
          high: Tensor, *, seed: int, logits_fn: Callable[[Any], Tensor] | None = None
          ) -> tuple[Tensor, Tensor]:
    """The data-free base both universal heads start from (:func:`~abd_plugin.universal.
    inversion_base` with its defaults), for per-channel ``low`` / ``high`` (1-D)."""
    view = (1, shape[0]) + (1,) * (len(shape) - 1)
    with torch.enable_grad(), torch.autocast(model_device(model).type, enabled=False):
        return inversion_base(model, shape, num_classes, low.reshape(view), high.reshape(view),
                              seed=seed, logits_fn=logits_fn)


def patch_statistic(model: nn.Module, shape: tuple[int, ...], num_classes: int,
                    low: Tensor, high: Tensor, settings: AuditSettings, *, seed: int,
                    logits_fn: Callable[[Any], Tensor] | None = None,
                    base: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The audit's universal patch statistic (:func:`~abd_plugin.universal.
    universal_patch_statistic`) with its settings, for per-channel ``low`` / ``high`` (1-D);
    ``base``: the universal statistic's (the audit shares it; default: made from ``seed``)."""
    view = (1, shape[0]) + (1,) * (len(shape) - 1)
    return universal_patch_statistic(
        model, shape, num_classes, low.reshape(view), high.reshape(view),
        budget=settings.patch_budget, steps=settings.patch_steps, seed=seed,
        batch_size=max(settings.batch_size, 8 * num_classes), logits_fn=logits_fn, base=base)


def universal_statistic(model: nn.Module, shape: tuple[int, ...], num_classes: int,
                        low: Tensor, high: Tensor, settings: AuditSettings, *, seed: int,
                        logits_fn: Callable[[Any], Tensor] | None = None,
                        base: tuple[Tensor, Tensor] | None = None,
                        classes: Sequence[int] | None = None) -> Tensor:
    """The audit's universal blend statistic (:func:`~abd_plugin.universal.
    universal_blend_statistic`) with its settings, for per-channel ``low`` / ``high`` (1-D);
    the audit and the probation's universal re-audit both call it. ``base``: a precomputed
    base (default: made from ``seed``, as :func:`_base` makes it); ``classes``: only these
    classes' heads (the others NaN)."""
    view = (1, shape[0]) + (1,) * (len(shape) - 1)
    return universal_blend_statistic(
        model, shape, num_classes, low.reshape(view), high.reshape(view),
        steps=settings.universal_steps, seed=seed,
        batch_size=max(settings.batch_size, 8 * num_classes), logits_fn=logits_fn, base=base,
        classes=classes)


def audit(
    teacher: nn.Module, input_shape: Sequence[int], *, input_range: Any = (0.0, 1.0),
    num_classes: int | None = None, settings: AuditSettings | None = None,
    samples: Tensor | None = None, logits_fn: Callable[[Any], Tensor] | None = None,
    replica: TeacherReplica | None = None, seed: int = 0, **overrides: Any,
) -> AuditReport:
    """Audit ``teacher`` for a backdoor without any data.

    Args:
        teacher: the model to audit (never modified; a frozen copy runs).
        input_shape: one input's shape without the batch dimension, e.g. ``(3, 32, 32)``.
        input_range: ``(low, high)`` of valid inputs *as the model receives them* (after your
            normalisation): scalars, or one value per channel. Default ``(0, 1)``.
        num_classes: number of classes (default: read off one forward).
        settings: an :class:`AuditSettings`; keyword ``overrides`` replace its fields
            (``starts=``, ``steps=``, ``alpha=``, ...).
        samples: optional synthetic inputs (B, *input_shape) from your generator: the report then
            also gives the channel-shuffled ensemble's favourite class on them.
        logits_fn: extract logits from the model's output (default: tensor, tuple with logits
            first, dict with ``"logits"``, object with ``.logits``).
        replica: share the guard's frozen copy of the teacher.
        seed: seed of the random starts (the audit's own generator; the global RNG is not
            touched).

    Returns an :class:`AuditReport`; ``print(report)`` shows the verdict and a per-class table.
    """
    t0 = time.perf_counter()
    s = settings or AuditSettings()
    if overrides:
        s = s.replace(**overrides)
    rep = replica or TeacherReplica(teacher)
    model = rep.module
    if model_device(model) != model_device(unwrap_model(teacher)):
        model.to(model_device(unwrap_model(teacher)))
    shape = tuple(int(v) for v in input_shape)
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"input_shape must be one input's shape without the batch, got {shape}")
    dev = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    low, high = _range_tensors(input_range, shape[0], torch.float64, torch.device("cpu"))
    if num_classes is None:
        with torch.no_grad():
            probe = (low.view((1, -1) + (1,) * (len(shape) - 1)) + torch.zeros((1,) + shape,
                     dtype=torch.float64)).to(dev, dtype)
            z = extract_logits(model(probe), logits_fn)
        check_logits(z, 1, "teacher logits")
        num_classes = int(z.shape[1])
    if num_classes < 2:
        raise ValueError("the audit needs a classifier with at least 2 classes")
    stat = max_margin_statistic(model, shape, num_classes, input_range=(low, high),
                                settings=s, logits_fn=logits_fn, seed=seed)
    raw_p = order_pvalues(stat)
    p = calibrated_pvalues(stat, draws=s.null_draws, seed=seed)
    z = robust_z(stat)
    notes: list[str] = []
    if num_classes < 4:
        notes.append(f"note: with {num_classes} classes the null fit is weak; read the p-values "
                     "as rough")
    uni = None
    base = None  # the data-free base both universal heads start from, made once
    if s.universal and num_classes >= 3:
        base = _base(model, shape, num_classes, low, high, seed=seed, logits_fn=logits_fn)
        uni = universal_statistic(model, shape, num_classes, low, high, s, seed=seed,
                                  logits_fn=logits_fn, base=base)
    u_class, u_z = (None, None) if uni is None else leave_one_out_z(uni)
    verdict, suspect, reason, u_p = _decide(stat, p, uni, s)
    patch = None
    if s.patch and verdict == "clean" and num_classes >= 3 and len(shape) >= 3:
        patch = patch_statistic(model, shape, num_classes, low, high, s, seed=seed,
                                logits_fn=logits_fn, base=base)
        verdict, suspect, reason = _patch_vote(verdict, suspect, reason, patch, s)
    p_class, p_z = (None, None) if patch is None else leave_one_out_z(patch)
    ens = None
    if samples is not None:
        ens = ensemble_favourite(rep, samples, logits_fn=logits_fn)
    return AuditReport(
        verdict=verdict, suspect=suspect, target=None if verdict == "clean" else suspect,
        statistic=tuple(float(v) for v in stat), p_values=tuple(float(v) for v in p),
        raw_p_values=tuple(float(v) for v in raw_p), universal_p=u_p,
        z_scores=tuple(float(v) for v in z), seconds=time.perf_counter() - t0,
        input_shape=shape, input_range=(tuple(low.tolist()), tuple(high.tolist())),
        alpha=s.alpha, clean_alpha=s.clean_alpha, ensemble_class=ens, notes=tuple(notes),
        universal=None if uni is None else tuple(float(v) for v in uni),
        universal_class=u_class, universal_z=u_z,
        margin_suspect=int(torch.argmax(stat)), reason=reason,
        patch=None if patch is None else tuple(float(v) for v in patch),
        patch_class=p_class, patch_z=p_z)


def _patch_vote(verdict: Verdict, suspect: int, why: str, patch: Tensor, s: AuditSettings
                ) -> tuple[Verdict, int, str]:
    """The patch statistic's say on a ``clean`` verdict: at ``patch_flag_z`` or more its
    favourite becomes the suspect and the verdict ``unsure``."""
    c, z = leave_one_out_z(patch)
    said = f"; the universal patch statistic favours class {c} (z = {z:.1f})"
    if z < s.patch_flag_z:
        return verdict, suspect, why + said + f", below patch_flag_z ({s.patch_flag_z:g})"
    return "unsure", c, why + said + (f", at least patch_flag_z ({s.patch_flag_z:g}): unsure, "
                                      f"suspect class {c}")


def _decide(stat: Tensor, p: Tensor, uni: Tensor | None, s: AuditSettings
            ) -> tuple[Verdict, int, str, float | None]:
    """The verdict, the suspect, why, and the universal favourite's p-value, from the margin
    statistic (``stat``, its calibrated p-values ``p``) and the universal statistic ``uni``
    (see :class:`AuditSettings`).

    The suspect is the universal statistic's favourite when its z-score reaches ``target_z``
    and its p-value is below the margin favourite's, else the margin statistic's.
    ``poisoned``: the suspect's evidence, the smaller calibrated p-value of the statistics that
    favour it times 2 (Bonferroni: two statistics were looked at), is below ``alpha``.
    ``clean``: the margin favourite's p-value is at least ``clean_alpha`` and the universal
    z-score is below ``flag_z``. ``unsure`` otherwise."""
    m = int(torch.argmax(stat))
    pm = float(p[m])
    if uni is None:
        mv: Verdict = ("poisoned" if pm < s.alpha else
                       ("clean" if pm >= s.clean_alpha else "unsure"))
        return mv, m, f"the margin statistic favours class {m} (p = {pm:.2g}: {mv})", None
    u, zu = leave_one_out_z(uni)
    pu = universal_pvalue(zu, int(uni.numel()), draws=10 * s.null_draws)
    said = (f"the margin statistic favours class {m} (p = {pm:.2g}); the universal blend "
            f"statistic favours class {u} (z = {zu:.1f}, p = {pu:.2g})")
    suspect = u if (zu >= s.target_z and pu < pm) else m
    votes = [q for q, c in ((pm, m), (pu, u)) if c == suspect]
    evidence = min(1.0, 2 * min(votes))
    if u == m:
        who = "both favour it"
    elif suspect == u:
        who = (f"the universal z reaches target_z ({s.target_z:g}) and its p is the "
               "smaller")
    elif zu >= s.target_z:
        who = "the margin statistic's p is the smaller"
    else:
        who = f"the universal z is below target_z ({s.target_z:g})"
    why = f"class {suspect} is the suspect ({who}); its evidence 2 x p = {evidence:.2g}"
    if evidence < s.alpha:
        verdict: Verdict = "poisoned"
        why += f" is below alpha ({s.alpha:g}): poisoned"
    elif pm >= s.clean_alpha and zu < s.flag_z:
        verdict = "clean"
        why += (f"; the margin p reaches clean_alpha ({s.clean_alpha:g}) and the universal z is "
                f"below flag_z ({s.flag_z:g}): clean")
    else:
        verdict = "unsure"
        why += (f" is not below alpha ({s.alpha:g}), and "
                + (f"the universal z reaches flag_z ({s.flag_z:g})" if zu >= s.flag_z else
                   f"the margin p is below clean_alpha ({s.clean_alpha:g})") + ": unsure")
    return verdict, suspect, f"{said}; {why}", pu


def ensemble_favourite(replica: TeacherReplica, samples: Tensor, *,
                       logits_fn: Callable[[Any], Tensor] | None = None, seed: int = 0) -> int:
    """The class a channel-shuffled ensemble of the teacher (3 copies, last Conv/Linear layer's
    inputs permuted) predicts most often on ``samples``."""
    from .ensemble import ShuffledEnsemble

    ens = ShuffledEnsemble(replica, n_models=3, layers=1, shuffle_linear=True, seed=seed,
                           logits_fn=logits_fn)
    x = samples.detach()
    try:
        with torch.no_grad():
            ens.discover(x[:2])
            ens.set_layers(1, ens.draw(ens.candidates[-1:]))
            pred = ens.logits(x).argmax(1)
    finally:
        ens.remove()  # the copy is the guard's: leave no hook on it
    return int(torch.bincount(pred.cpu()).argmax())


# ---------------------------------------------------------------------------------- in a guard
@dataclass
class AuditRecord(HookReport):
    """The audit's part of the guard's report.

    Attributes:
        state: ``"not run"`` (no teacher batch seen yet) or the verdict.
        audit: the :class:`AuditReport`, once the audit ran.
        ensemble_class: the class a channel-shuffled teacher ensemble predicts most on a few
            recent teacher inputs (a second hint of the target), when it could be computed.
    """

    state: str = "not run"
    audit: AuditReport | None = None
    ensemble_class: int | None = None

    @property
    def verdict(self) -> str:
        return self.state

    def lines(self) -> list[str]:
        a = self.audit
        if a is None:
            return ["  Teacher audit: not run (no teacher batch seen)"]
        s = a.suspect
        stat = (f"class {s}'s maximum margin {a.statistic[s]:.3g}, p = {a.p_value:.2g}, "
                f"robust z = {a.z_score:.1f}; {a.seconds:.1f}s")
        word = {"poisoned": f"the teacher looks BACKDOORED towards class {s}",
                "unsure": f"the teacher MAY be backdoored towards class {s} (not significant)",
                "clean": "no backdoor found"}[a.verdict]
        out = [f"  Teacher audit: {word} ({stat})."]
        if a.reason:
            out.append(f"    How: {a.reason}.")
        if self.ensemble_class is not None:
            agree = "agrees" if self.ensemble_class == s else "does not agree"
            out.append(f"    The shuffled-teacher ensemble favours class {self.ensemble_class} "
                       f"on the inputs seen ({agree}).")
        return out

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        if self.audit is not None:
            d["audit"] = self.audit.as_dict()
            if self.ensemble_class is not None:
                d["audit"]["ensemble_class"] = self.ensemble_class
                d["audit"]["agree"] = self.ensemble_class == self.audit.suspect
        return d


class TeacherAudit(DefenseHook):
    """The data-free audit inside a guard: at the first teacher batch it audits a frozen copy of
    the teacher inside the input domain the guard resolved (``ctx.domain``) and publishes the
    result on the context (``ctx.audit``) for the hooks registered after it (the eraser's gate).

    Args:
        teacher: the teacher (never modified; the audit runs ``replica``).
        settings: the :class:`AuditSettings` section.
        seed: seed of the random starts.
        logits_fn: how to find the logits in the teacher's output.
        replica: the guard's frozen copy of the teacher.
    """

    name = "audit"

    def __init__(self, teacher: nn.Module, settings: AuditSettings | None = None, *,
                 seed: int = 0, logits_fn: Callable[[Any], Tensor] | None = None,
                 replica: TeacherReplica | None = None) -> None:
        self.teacher = teacher
        self.settings = section_or_default(settings, AuditSettings, "TeacherAudit", "audit")
        self.seed = seed
        self.logits_fn = logits_fn
        self._replica = replica or TeacherReplica(teacher)
        self.result: AuditReport | None = None
        self._teacher_batches = 0
        self._recent_inputs: Tensor | None = None  # a few teacher inputs, for the report

    def on_teacher_input(self, ctx: GuardContext, x: Tensor) -> Tensor | None:
        if self.result is None:
            self._run(ctx, x)
        self._teacher_batches += 1
        if self._teacher_batches % 20 == 1:  # a few inputs for the report's ensemble check
            self._recent_inputs = x.detach()[:128].clone()  # on its device: no sync
        return None

    def _run(self, ctx: GuardContext, x: Tensor) -> None:
        domain = ctx.domain
        assert domain is not None, "the guard resolves the input domain before the hooks run"
        self._replica.to_device_of(x)
        result: AuditReport | None = None
        error = None
        if not ctx.distributed or _dist.rank() == 0:  # data-parallel: rank 0 audits for all
            with ctx.suspended():
                try:
                    result = audit(self.teacher, domain.shape, input_range=domain.range,
                                   settings=self.settings, logits_fn=self.logits_fn,
                                   replica=self._replica, seed=self.seed)
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
        if ctx.distributed:
            result, error = _dist.broadcast((result, error))
        if error is not None or result is None:
            raise RuntimeError(
                f"abd-plugin: the data-free teacher audit failed on inputs of shape "
                f"{domain.shape} ({error}) in the input domain {domain.describe()}; pass "
                "input_range=(low, high) if that range is wrong, or audit=False (then name the "
                "backdoor's target=... for the eraser)")
        self.result = result
        ctx.publish_audit(result)

    def on_guard_enter(self, ctx: GuardContext) -> None:
        if self.result is not None:  # resumed: the hooks after this one read it
            ctx.publish_audit(self.result)

    def _ensemble_class(self) -> int | None:
        """The shuffled-teacher ensemble's favourite class on recent teacher inputs (None when
        it cannot be computed for this teacher)."""
        from ._amp import as_input_of

        x = self._recent_inputs
        if x is None:
            return None
        try:
            model = self._replica.to_device_of(x)
            return ensemble_favourite(self._replica, as_input_of(model, x),
                                      logits_fn=self.logits_fn, seed=self.seed)
        except (ValueError, TypeError, RuntimeError):
            return None

    def report(self) -> AuditRecord:
        if self.result is None:
            return AuditRecord()
        return AuditRecord(state=self.result.verdict, audit=self.result,
                           ensemble_class=self._ensemble_class())

    def state_dict(self) -> dict[str, Any]:
        return {"audit": None if self.result is None else asdict(self.result)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a = state.get("audit")
        self.result = None if a is None else audit_report_from_dict(a)


def audit_report_from_dict(d: dict[str, Any]) -> AuditReport:
    """An :class:`AuditReport` from ``dataclasses.asdict`` of one (a saved state)."""
    return AuditReport(**d)


__all__ = ["AuditSettings", "AuditReport", "AuditRecord", "TeacherAudit", "audit",
           "max_margin_statistic", "order_pvalues", "robust_z", "ensemble_favourite",
           "infer_input_range", "audit_report_from_dict", "universal_statistic",
           "calibrated_pvalues", "universal_pvalue", "patch_statistic"]
