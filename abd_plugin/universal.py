"""A second audit statistic that names the target of triggers spread over the whole input.

The maximum-margin search (:func:`~abd_plugin.audit.max_margin_statistic`) asks how far *one*
input can be pushed into each class. A small patch trigger makes its target reach much further
than any other class; a trigger spread over the whole input (a blended noise image, a sinusoid,
a warp) often does not, and on BatchNorm teachers the margin search's favourite can be a natural
class (an "8" is easy to draw from noise) while the true target sits among the others.

This statistic asks instead how easily one *shared* change moves *many* inputs: a backdoor is a
universal shortcut. Two stages, both data-free and on a frozen copy of the teacher:

1. **A class-balanced base** of ``per_class`` inputs per class, inverted from dark noise inside
   the input domain: a hinge ``max(0, kappa - margin_k)`` (stop once the class is reasonably
   confident, so the base stays near the decision regions instead of running to extreme inputs),
   a total-variation prior, and - for teachers with BatchNorm - DeepInversion's match of the
   batch statistics to the running statistics (which keeps the base on the teacher's input
   manifold; an off-manifold base lets natural classes be reached universally).
2. **A blend head per class**: one full-input pattern ``P_c`` inside the domain, mixed into every
   base input with weight ``alpha`` (``x' = (1 - alpha) x + alpha P_c``), trained by Adam to send
   the base inputs of the *other* classes to ``c``. The statistic ``u_c`` is the mean margin of
   class ``c`` over those inputs after the steps.

The class with the largest ``u_c`` is the universal statistic's suspect; its leave-one-out z-score
``(u_t - mean of the others) / std of the others`` says how clearly it stands apart. Measured on
36 LeNet-5 / LeNet-5-BN teachers poisoned with patch, watermark, blend, sinusoid and warp
triggers (mnist5k): the suspect was the true target on 35 (the margin search's suspect on 31);
on clean teachers the z-score stayed below about 3 (the numbers and the held-out check are in
``benchmarks/results/``). It names a target; it is a weak detector on its own, so the audit uses
it for *which* class, and the margin statistic (with this as a second vote) for *whether*.

Cost: ``per_class * K`` base inputs and ``K`` heads, one batched forward of ``K * B`` inputs per
step (chunked by ``batch_size``): about 5 CPU-seconds for a LeNet-5 on 32x32 inputs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._replica import model_device
from .outputs import extract_logits


def class_margins(z: Tensor, cls: Tensor) -> Tensor:
    """Per row, ``z[cls] - max_{k != cls} z[k]`` (the audit's margin)."""
    zc = z.gather(1, cls[:, None])[:, 0]
    other = z.scatter(1, cls[:, None], -math.inf).amax(1)
    return zc - other


def inversion_base(model: nn.Module, shape: tuple[int, ...], num_classes: int, low: Tensor,
                   high: Tensor, *, per_class: int = 3, steps: int = 40, lr: float = 0.05,
                   kappa: float = 3.0, tv: float = 0.05, bn: float = 1.0, seed: int = 0,
                   logits_fn: Callable[[Any], Tensor] | None = None,
                   max_inputs: int = 512) -> tuple[Tensor, Tensor]:
    """Data-free, class-balanced base inputs (see the module docstring). ``low``/``high``
    broadcast over one batch of inputs (per channel). Returns ``(x, labels)``; with more than
    ``max_inputs`` inputs, the classes are cycled so every class keeps at least one."""
    dev = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    n = min(per_class * num_classes, max(num_classes, max_inputs))
    cls = torch.arange(n) % num_classes
    gen = torch.Generator().manual_seed(seed + 77)
    u = (torch.rand((n,) + shape, generator=gen, dtype=torch.float64) * 0.5).to(dev, dtype)
    u.requires_grad_(True)
    lo, hi = low.to(dev, dtype), high.to(dev, dtype)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None and m.running_var is not None]
    feats: list[tuple[nn.Module, Tensor]] = []
    handles = [b.register_forward_hook(lambda mod, i, o: feats.append((mod, i[0])))
               for b in bns] if bn > 0 else []
    opt = torch.optim.Adam([u], lr=lr)
    cls_d = cls.to(dev)
    try:
        for _ in range(steps):
            feats.clear()
            x = lo + u * (hi - lo)
            z = extract_logits(model(x), logits_fn).float()
            loss = (kappa - class_margins(z, cls_d)).clamp_min(0).mean()
            if tv > 0 and len(shape) >= 3:
                loss = loss + tv * ((u[..., 1:, :] - u[..., :-1, :]).abs().mean()
                                    + (u[..., :, 1:] - u[..., :, :-1]).abs().mean())
            if feats:
                lb = torch.zeros((), device=dev)
                for mod, a in feats:
                    dims = [0] + list(range(2, a.dim()))
                    mu, var = a.float().mean(dims), a.float().var(dims, unbiased=False)
                    rm, rv = cast(Tensor, mod.running_mean), cast(Tensor, mod.running_var)
                    lb = lb + (mu - rm.float()).norm() + (var - rv.float()).norm()
                loss = loss + bn * lb / len(feats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                u.clamp_(0.0, 1.0)
    finally:
        for h in handles:
            h.remove()
    return (lo + u.detach() * (hi - lo)), cls


def _wanted(classes: Sequence[int] | None, num_classes: int) -> Tensor:
    """The heads to train: every class, or ``classes`` (sorted, distinct, in range)."""
    if classes is None:
        return torch.arange(num_classes)
    wanted = torch.tensor(sorted({int(c) for c in classes}), dtype=torch.long)
    if wanted.numel() == 0 or int(wanted.min()) < 0 or int(wanted.max()) >= num_classes:
        raise ValueError(f"classes must be non-empty and in [0, {num_classes}), got "
                         f"{list(classes)}")
    return wanted


def _universal_heads(
    model: nn.Module, shape: tuple[int, ...], num_classes: int, low: Tensor, high: Tensor,
    base: tuple[Tensor, Tensor] | None, *,
    init: Callable[[int, torch.Generator], list[Tensor]],
    paste: Callable[[list[Tensor], Tensor, Tensor, Tensor], Tensor],
    steps: int, lr: float, per_class: int, seed: int, gen_seed: int, batch_size: int,
    logits_fn: Callable[[Any], Tensor] | None, classes: Sequence[int] | None = None,
) -> Tensor:
    """What both universal heads share: per class ``c``, head parameters ``init(k, gen)``
    (float64, first axis the ``k`` classes of a chunk, drawn from ``gen``), trained by Adam for
    ``steps`` steps so that ``paste(params, base, lo, hi)`` (shape ``(k, B, *shape)``) sends the
    other classes' base inputs to ``c``; returns each class's mean margin on them afterwards.
    ``classes``: only these heads (the chunks, hence the draws, follow that list; the other
    entries are NaN)."""
    dev = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        xs, lab = base if base is not None else inversion_base(
            model, shape, num_classes, low, high, per_class=per_class, seed=seed,
            logits_fn=logits_fn)
        B = xs.shape[0]
        lo, hi = low.to(dev, dtype), high.to(dev, dtype)
        out = torch.full((num_classes,), math.nan, dtype=torch.float64)
        wanted = _wanted(classes, num_classes)
        per = max(1, batch_size // B)  # classes per chunk
        gen = torch.Generator().manual_seed(gen_seed)
        for c0 in range(0, len(wanted), per):
            cs = wanted[c0:c0 + per]
            k = len(cs)
            params = [p.to(dev, dtype).requires_grad_(True) for p in init(k, gen)]
            opt = torch.optim.Adam(params, lr=lr)
            tgt = cs.repeat_interleave(B).to(dev)
            w = (lab[None, :] != cs[:, None]).to(dev, torch.float32).reshape(-1)
            xb = xs[None]
            for it in range(steps + 1):
                x = paste(params, xb, lo, hi).reshape((k * B,) + shape)
                z = extract_logits(model(x), logits_fn).float()
                if it == steps:
                    m = class_margins(z.detach(), tgt).reshape(k, B).double().cpu()
                    wk = w.reshape(k, B).double().cpu()
                    out[cs] = (m * wk).sum(1) / wk.sum(1).clamp_min(1)
                    break
                loss = (F.cross_entropy(z, tgt, reduction="none") * w).sum() / w.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return out


def universal_blend_statistic(
    model: nn.Module, shape: tuple[int, ...], num_classes: int, low: Tensor, high: Tensor, *,
    alpha: float = 0.1, steps: int = 60, lr: float = 0.1, per_class: int = 3, seed: int = 0,
    batch_size: int = 4096, logits_fn: Callable[[Any], Tensor] | None = None,
    base: tuple[Tensor, Tensor] | None = None, classes: Sequence[int] | None = None,
) -> Tensor:
    """Per class ``c`` (float64, (K,)): the mean margin of ``c`` over the base inputs of the
    other classes after ``steps`` Adam steps of a blend head that mixes one pattern into all of
    them with weight ``alpha`` (see the module docstring). ``model`` is a frozen copy in eval
    mode; ``low``/``high`` broadcast over a batch (per channel). ``base``: the
    :func:`inversion_base` to use (default: made here with ``per_class`` and ``seed``).
    ``classes``: train only these classes' heads (the others' entries are NaN); the heads'
    random starts then follow that list, so a class's number can differ from the full run's."""

    def init(k: int, gen: torch.Generator) -> list[Tensor]:
        return [torch.randn((k, 1) + shape, generator=gen, dtype=torch.float64) * 0.1]

    def paste(params: list[Tensor], xb: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return (1 - alpha) * xb + alpha * (lo + torch.sigmoid(params[0]) * (hi - lo))

    return _universal_heads(model, shape, num_classes, low, high, base, init=init, paste=paste,
                            steps=steps, lr=lr, per_class=per_class, seed=seed,
                            gen_seed=seed + 91, batch_size=batch_size, logits_fn=logits_fn,
                            classes=classes)


def universal_patch_statistic(
    model: nn.Module, shape: tuple[int, ...], num_classes: int, low: Tensor, high: Tensor, *,
    budget: float = 0.03, steps: int = 60, lr: float = 0.1, per_class: int = 3, seed: int = 0,
    batch_size: int = 4096, logits_fn: Callable[[Any], Tensor] | None = None,
    base: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Per class ``c`` (float64, (K,)): the mean margin of ``c`` over the base inputs of the
    other classes after ``steps`` Adam steps of a *patch head*: one pattern ``P_c`` pasted
    through one soft spatial mask ``m_c`` (shared by the channels) into every base input,
    ``x' = (1 - m_c) x + m_c P_c``, the mask's mean held at most ``budget`` of the positions
    (a sigmoid mask rescaled down to the budget when it grows past it), trained to send the
    other classes' base inputs to ``c``.

    The blend head cannot draw a small bright patch (its pattern is mixed in at a weight of
    0.1); this head can, anywhere: it is a universal Neural-Cleanse-style head at a fixed area.
    On teachers whose margin search saturates (a residual network on normalised 3-channel
    inputs reaches margins in the hundreds for every class from colour noise), a patch backdoor's
    target still stands out here. ``base``: the :func:`inversion_base` to use (default: made
    here with ``per_class`` and ``seed``)."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if len(shape) < 3:
        raise ValueError(f"the patch statistic needs spatial inputs (C, H, W), got {shape}")
    spatial = (1,) * (len(shape) - 2) + tuple(shape[-2:])
    dims = tuple(range(-len(shape) + 1, 0))  # the mask's own axes: all but the class's

    def init(k: int, gen: torch.Generator) -> list[Tensor]:
        logit = torch.randn((k, 1) + spatial, generator=gen, dtype=torch.float64) * 0.1 - 3
        return [logit, torch.randn((k, 1) + shape, generator=gen, dtype=torch.float64) * 0.1]

    def paste(params: list[Tensor], xb: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        soft = torch.sigmoid(params[0])
        mask = soft * (budget / soft.mean(dim=dims, keepdim=True)).clamp(max=1.0)
        return (1 - mask) * xb + mask * (lo + torch.sigmoid(params[1]) * (hi - lo))

    return _universal_heads(model, shape, num_classes, low, high, base, init=init, paste=paste,
                            steps=steps, lr=lr, per_class=per_class, seed=seed,
                            gen_seed=seed + 93, batch_size=batch_size, logits_fn=logits_fn)


def leave_one_out_z(stat: Tensor) -> tuple[int, float]:
    """``(argmax, (u_t - mean of the others) / std of the others)`` (population std)."""
    t = int(torch.argmax(stat))
    others = torch.cat([stat[:t], stat[t + 1:]]).double()
    sd = float(others.std(unbiased=False))
    return t, (float(stat[t]) - float(others.mean())) / max(sd, 1e-12)


__all__ = ["class_margins", "inversion_base", "universal_blend_statistic",
           "universal_patch_statistic", "leave_one_out_z"]
