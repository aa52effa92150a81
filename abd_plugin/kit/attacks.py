"""L_inf evasion attacks for robustness evaluation and adversarial training (not backdoors).

Images are assumed in [0, 1] (``clamp``); the attacked model runs in whatever mode the caller
put it in, and only the input is differentiated (no parameter's ``.grad`` is written).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import _logits

__all__ = ["pgd_attack", "default_step_size"]


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps`` (Madry et al.'s rule: the walk can cross the ball and come back)."""
    return 2.5 * eps / max(1, steps)


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD-``steps`` in the L_inf ball of radius ``eps`` around ``x`` maximising
    ``CE(model(x'), y)`` (Madry et al. 2018): optional uniform random start in the ball, then
    signed-gradient steps of ``step_size`` (default :func:`default_step_size`), each projected on
    the ball and on ``clamp``. ``steps=1`` without random start and ``step_size=eps`` is FGSM.
    Returns the detached adversarial images."""
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be >= 0, got eps={eps}, steps={steps}")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    delta = torch.zeros_like(x)
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        delta = (2 * noise - 1).to(x.device) * eps
    x_adv = x + delta
    if clamp is not None:
        x_adv = x_adv.clamp(*clamp)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(_logits(model(x_adv)), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        if clamp is not None:
            x_adv = x_adv.clamp(*clamp)
    return x_adv.detach()
