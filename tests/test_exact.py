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
from test_sinkhorn import host_marginal_error  # the library-independent check, shared


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


SCALES = [1e-8, 1.0, 1e12]


@pytest.mark.parametrize("mass", SCALES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_total_mass_matches_pot_emd(mass, seed):
    """HiGHS's absolute tolerances once swallowed small masses (an all-zero plan at 1e-8, a plan
    10% short at 1e-6 marked converged) and called large ones infeasible (1e12)."""
    ot = required.module("ot")
    M, r, c = random_problem(seed, 4, 5)
    r, c = r / r.sum(), c / c.sum()
    res = exact_transport(M, mass * r, mass * c)
    assert res.converged and res.marginal_error[0] <= 1e-12
    assert host_marginal_error(res.plan, mass * r, mass * c) <= 1e-12
    assert float(res.cost) == pytest.approx(mass * ot.emd2(r, c, M), rel=1e-9, abs=1e-9 * mass)


def test_a_total_mass_of_one_millionth_is_moved_in_full():
    """The reviewer's case: the plan summed to 9e-7 and cost 3.70e-7, yet said converged."""
    M = np.random.default_rng(0).random((3, 4))
    r, c = np.array([2e-7, 3e-7, 5e-7]), np.array([4e-7, 1e-7, 3e-7, 2e-7])
    res = exact_transport(M, r, c)
    assert float(np.sum(res.plan)) == pytest.approx(1e-6, rel=1e-12)
    assert host_marginal_error(res.plan, r, c) <= 1e-12
    assert float(res.cost) == pytest.approx(3.973654e-7, rel=1e-6)


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
@pytest.mark.parametrize("mass", SCALES)
def test_duals_scale_with_the_costs_and_not_with_the_masses(scale, mass):
    """The dual LP's constraints f_i + g_j <= M_ij do not involve the masses: the duals are
    those of the unit-mass problem, and scale with M. Checked by strong duality too, with
    costs 1e-9 apart that HiGHS would take for equal."""
    M, r, c = random_problem(3, 5, 4)
    M = M - M.min()  # costs >= 0, so the duals scale with M exactly
    r, c = r / r.sum(), c / c.sum()
    unit = exact_transport(M, r, c)
    res = exact_transport(scale * M, mass * r, mass * c)
    f, g = to_numpy(res.f), to_numpy(res.g)
    assert np.all(f[:, None] + g[None, :] <= scale * (M + 1e-9))
    assert mass * (r @ f + c @ g) == pytest.approx(float(res.cost), rel=1e-9)
    assert float(res.cost) == pytest.approx(scale * mass * float(unit.cost), rel=1e-9)
    # duals are unique only up to f + t, g - t: compare f_i + g_j, which is M_ij on the plan's support
    pairs, unit_pairs = f[:, None] + g[None, :], to_numpy(unit.f)[:, None] + to_numpy(unit.g)[None, :]
    support = to_numpy(unit.plan) > 1e-12
    np.testing.assert_allclose(pairs[support], scale * unit_pairs[support], rtol=1e-9, atol=1e-12 * scale)


def test_a_plan_that_misses_the_marginals_is_refused(monkeypatch):
    """Whatever the solver answers, a plan off its marginals is never returned as converged."""
    import swav_ref.ot.exact as exact

    real_linprog = exact.linprog

    def short_linprog(*args, **kwargs):
        res = real_linprog(*args, **kwargs)
        res.x = 0.9 * res.x
        return res

    monkeypatch.setattr(exact, "linprog", short_linprog)
    M, r, c = random_problem(0, 3, 4)
    with pytest.raises(RuntimeError, match="marginals are off by .* of the total mass"):
        exact_transport(M, r, c)


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


def test_string_costs_are_refused_by_dtype():
    """NumPy once converted the strings to numbers and solved; array_api_strict cannot hold them."""
    with pytest.raises(ValueError, match="M must hold real numbers.*dtype <U3"):
        exact_transport(np.full((2, 3), "1.5"), np.ones(2), np.ones(3) * 2 / 3)
