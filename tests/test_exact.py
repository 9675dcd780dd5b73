"""Exact optimal transport (linear program): the dessert optimum, POT's emd, LP duality."""

from __future__ import annotations

import numpy as np
import pytest

import required
from hypothesis import given, settings
from hypothesis import strategies as st

from swav_ref.backend import array_namespace, asarray, to_numpy
from swav_ref.ot import exact_transport, sinkhorn_log
from swav_ref.ot.desserts import dessert_problem


def random_problem(seed: int, n: int, m: int):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(n, m))
    r = rng.random(n) + 0.1
    c = rng.random(m) + 0.1
    return M, r, c * (r.sum() / c.sum())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dessert_optimum_is_minus_36(backend, dtype):
    M, r, c = dessert_problem(backend, dtype)
    res = exact_transport(M, r, c)
    assert array_namespace(res.plan, res.cost) is backend
    assert res.plan.dtype == M.dtype and res.cost.shape == ()
    assert float(res.cost) == pytest.approx(-36.0, abs=1e-9 if dtype == "float64" else 1e-4)
    P = to_numpy(res.plan)
    assert np.all(P >= -1e-12)
    np.testing.assert_allclose(P.sum(1), to_numpy(r), atol=1e-5)
    np.testing.assert_allclose(P.sum(0), to_numpy(c), atol=1e-5)


def test_one_by_one_problem_has_the_only_plan():
    """1 x 1: the only plan moves all of r. (POT's network simplex answers 0 here when the
    two masses differ in the last bit, so this size is checked by hand, not against POT.)"""
    res = exact_transport(np.array([[-1.6]]), np.array([0.7]), np.array([0.7]))
    assert float(res.cost) == pytest.approx(-1.12, abs=1e-12)
    np.testing.assert_allclose(to_numpy(res.plan), [[0.7]])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 7), m=st.integers(2, 7))
def test_strong_duality(seed, n, m):
    """LP duality, checked without any oracle: f_i + g_j <= M_ij everywhere, and
    <r, f> + <c, g> equals the optimal cost."""
    M, r, c = random_problem(seed, n, m)
    res = exact_transport(M, r, c)
    f, g = to_numpy(res.f), to_numpy(res.g)
    assert np.all(f[:, None] + g[None, :] <= M + 1e-8)
    assert r @ f + c @ g == pytest.approx(float(res.cost), abs=1e-8)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 7), m=st.integers(2, 7))
def test_matches_pot_emd(seed, n, m):
    ot = required.module("ot")
    M, r, c = random_problem(seed, n, m)
    assert float(exact_transport(M, r, c).cost) == pytest.approx(ot.emd2(r, c, M), abs=1e-8)


def test_entropic_cost_tends_to_the_exact_cost():
    M, r, c = random_problem(5, 6, 4)
    exact = float(exact_transport(M, r, c).cost)
    gaps = [float(sinkhorn_log(M, r, c, lam, max_iter=100_000).cost) - exact for lam in (1.0, 10.0, 100.0)]
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-7
    assert gaps[2] < 0.1


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(3), np.ones(3), np.ones(1)), "2-D"),
        ((np.zeros((2, 3)), np.ones(3), np.ones(3)), "r must have shape"),
        ((np.zeros((2, 3)), np.ones(2), np.ones(3)), "same mass"),
        ((np.zeros((2, 3)), -np.ones(2), np.ones(3)), "negative"),
        ((np.full((2, 3), np.nan), np.ones(2), np.ones(3) * 2 / 3), "NaN"),
    ],
)
def test_bad_input_raises_value_error(backend, args, message):
    with pytest.raises(ValueError, match=message):
        exact_transport(*(asarray(x, backend) for x in args))
