"""Implicit hypergradient through a fixed point, by a truncated Neumann series.

For an inner problem solved at a fixed point ``delta* = Phi(delta*, theta)`` and an outer loss
``L(delta*(theta), theta)``, the implicit function theorem gives

    dL/dtheta = dL/dtheta|_direct + (dPhi/dtheta)^T (I - dPhi/ddelta)^{-T} dL/ddelta .

``(I - J^T)^{-1} g`` is approximated by the first K terms of ``sum_i (J^T)^i g`` (Grazzi et al.
2020, the scheme I-BAU and ABD use); every term is one vector-Jacobian product through ``Phi``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

FixedPointMap = Callable[[list[Tensor], Sequence[Tensor]], list[Tensor]]
OuterLoss = Callable[[list[Tensor], Sequence[Tensor]], Tensor]


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def fixed_point_hypergradient(
    params: Sequence[Tensor],
    inner: Sequence[Tensor],
    fp_map: FixedPointMap,
    outer_loss: OuterLoss,
    iterations: int = 5,
    tol: float = 1e-10,
) -> list[Tensor]:
    """Hypergradient of ``outer_loss`` w.r.t. ``params`` at the inner fixed point ``inner``.

    Args:
        params: outer variables theta (tensors with ``requires_grad=True``).
        inner: the inner solution delta* (detached internally).
        fp_map: ``Phi(inner, params) -> list`` shaped like ``inner``; differentiable.
        outer_loss: ``L(inner, params) -> scalar``.
        iterations: K, the number of Neumann terms (K=0 keeps only the direct gradient).
        tol: stop early when the update of v is smaller than this (max abs).

    Returns one gradient per entry of ``params`` (zeros where a parameter is unused). Nothing is
    written into ``.grad``.
    """
    params = list(params)
    inner_d = [t.detach().requires_grad_(True) for t in inner]
    loss = outer_loss(inner_d, params)
    grads = torch.autograd.grad(loss, inner_d + params, allow_unused=True)
    g_inner = _zeros_for_none(grads[: len(inner_d)], inner_d)
    g_params = _zeros_for_none(grads[len(inner_d):], params)
    if iterations <= 0:
        return g_params
    w = fp_map(inner_d, params)
    v = [g.clone() for g in g_inner]  # first Neumann term
    for _ in range(iterations - 1):
        jv = _zeros_for_none(
            torch.autograd.grad(w, inner_d, grad_outputs=v, retain_graph=True, allow_unused=True),
            inner_d,
        )
        new_v = [a + g for a, g in zip(jv, g_inner, strict=True)]
        delta = max(float((a - b).abs().max()) for a, b in zip(new_v, v, strict=True)) if v else 0.0
        v = new_v
        if delta < tol:
            break
    mixed = _zeros_for_none(
        torch.autograd.grad(w, params, grad_outputs=v, allow_unused=True), params
    )
    return [a + b for a, b in zip(g_params, mixed, strict=True)]
