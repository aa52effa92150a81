"""The fixed-point hypergradient against the closed-form answer of a quadratic inner problem."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abd_plugin import fixed_point_hypergradient


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 4), seed=st.integers(0, 10_000),
       mu=st.floats(0.0, 2.0))
def test_matches_closed_form_on_quadratic(n, m, seed, mu):
    # inner: w*(lam) = argmin 1/2 w'Aw - w'B lam = A^-1 B lam ; fixed point map w - eta (Aw - B lam)
    # outer: f = 1/2 ||w - c||^2 + mu/2 ||lam||^2 ; df/dlam = mu lam + (A^-1 B)' (w* - c)
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, n))
    a = q @ q.T + n * np.eye(n)
    b = rng.normal(size=(n, m))
    c = rng.normal(size=n)
    lam0 = rng.normal(size=m)
    eta = 1.0 / np.linalg.eigvalsh(a).max()
    A, B, C = (torch.tensor(v, dtype=torch.float64) for v in (a, b, c))
    lam = torch.tensor(lam0, dtype=torch.float64, requires_grad=True)
    w_star = torch.linalg.solve(A, B @ lam.detach())

    def fp(inner, params):
        return [inner[0] - eta * (A @ inner[0] - B @ params[0])]

    def outer(inner, params):
        return 0.5 * (inner[0] - C).pow(2).sum() + 0.5 * mu * params[0].pow(2).sum()

    (got,) = fixed_point_hypergradient([lam], [w_star], fp, outer, iterations=2000, tol=1e-14)
    expected = mu * lam0 + np.linalg.solve(a, b).T @ (np.linalg.solve(a, b @ lam0) - c)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-6, atol=1e-8)


def test_truncation_is_the_neumann_partial_sum():
    # scalar: Phi = w - eta (a w - b lam); J = 1 - eta a; K terms -> b eta g sum_{i<K} J^i
    a, b, eta = 2.0, 3.0, 0.1
    lam = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(b * 1.5 / a, dtype=torch.float64)

    def fp(inner, params):
        return [inner[0] - eta * (a * inner[0] - b * params[0])]

    def outer(inner, params):
        return 0.5 * inner[0] ** 2

    for k in (0, 1, 2, 5):
        (g,) = fixed_point_hypergradient([lam], [w], fp, outer, iterations=k)
        j = 1 - eta * a
        expected = 0.0 if k == 0 else eta * b * float(w) * sum(j ** i for i in range(k))
        assert abs(float(g) - expected) < 1e-12, (k, float(g), expected)


def test_unused_params_get_zero_and_nothing_is_written_to_grad():
    p_used = torch.tensor(1.0, requires_grad=True)
    p_unused = torch.tensor(2.0, requires_grad=True)
    d = torch.tensor(0.5)

    def fp(inner, params):
        return [0.5 * inner[0] + params[0]]

    def outer(inner, params):
        return inner[0] ** 2

    g1, g2 = fixed_point_hypergradient([p_used, p_unused], [d], fp, outer, iterations=3)
    assert float(g2) == 0.0 and float(g1) != 0.0
    assert p_used.grad is None and p_unused.grad is None
