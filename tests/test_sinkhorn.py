"""Sinkhorn-Knopp (kernel domain) and its log-domain twin: oracles, marginals, failure modes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import required
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swav_ref.backend import array_namespace, asarray, default_tol, to_numpy
from swav_ref.ot import (
    ConvergenceWarning,
    TransportResult,
    marginal_violation,
    sinkhorn_knopp,
    sinkhorn_log,
)
from swav_ref.ot.desserts import dessert_problem

SOLVERS = [sinkhorn_knopp, sinkhorn_log]
# the backend fixture is a stateless namespace, so reusing it across examples is safe
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def host_marginal_error(plan, r, c) -> float:
    """Independent of the library: plain NumPy on host copies."""
    P, r, c = (np.asarray(to_numpy(x), dtype=np.float64) for x in (plan, r, c))
    return max(np.abs(P.sum(1) - r).max(), np.abs(P.sum(0) - c).max()) / r.sum()


def random_problem(seed: int, n: int, m: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    M = rng.random((n, m)) * scale
    r = rng.random(n) + 0.05
    c = rng.random(m) + 0.05
    c *= r.sum() / c.sum()
    return M, r, c


# -- oracles -----------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_dessert_cost_matches_pot(backend, solver, lam):
    ot = required.module("ot")
    M, r, c = dessert_problem(backend)
    ours = solver(M, r, c, lam, tol=1e-12, max_iter=100_000)
    Mh, rh, ch = dessert_problem()
    pot_plan = ot.sinkhorn(rh, ch, Mh, 1.0 / lam, stopThr=1e-13, numItermax=100_000)
    assert ours.converged
    assert abs(float(ours.cost) - float(np.sum(pot_plan * Mh))) < 1e-6
    np.testing.assert_allclose(to_numpy(ours.plan), pot_plan, atol=1e-6)


@settings(max_examples=15, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    lam=st.floats(0.1, 30.0),
)
def test_marginals_hold_on_random_problems(backend, seed, n, m, lam):
    Mh, rh, ch = random_problem(seed, n, m)
    M, r, c = (asarray(x, backend) for x in (Mh, rh, ch))
    tol = default_tol(M.dtype)
    results = [solver(M, r, c, lam, max_iter=50_000) for solver in SOLVERS]
    for res in results:
        assert res.converged
        assert host_marginal_error(res.plan, rh, ch) <= 10 * tol
        assert np.all(to_numpy(res.plan) >= 0)
        assert float(res.cost) == pytest.approx(float(np.sum(to_numpy(res.plan) * Mh)), rel=1e-12, abs=1e-12)
    kernel, log = results
    np.testing.assert_allclose(to_numpy(kernel.plan), to_numpy(log.plan), atol=1e-7 * rh.sum())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 8), m=st.integers(2, 8))
def test_log_domain_matches_pot_log(seed, n, m):
    ot = required.module("ot")
    M, r, c = random_problem(seed, n, m, scale=3.0)
    lam = 20.0
    ours = sinkhorn_log(M, r, c, lam, tol=1e-12, max_iter=100_000)
    pot = ot.sinkhorn(r, c, M, 1.0 / lam, method="sinkhorn_log", stopThr=1e-13, numItermax=100_000)
    np.testing.assert_allclose(ours.plan, pot, atol=1e-8)


def test_log_potentials_reproduce_the_plan(backend):
    M, r, c = dessert_problem(backend)
    lam = 30.0
    res = sinkhorn_log(M, r, c, lam)
    xp = backend
    rebuilt = xp.exp(lam * (xp.reshape(res.f, (-1, 1)) + xp.reshape(res.g, (1, -1)) - M))
    np.testing.assert_allclose(to_numpy(rebuilt), to_numpy(res.plan), rtol=1e-9, atol=1e-12)


# -- large lambda: the log domain stays finite, the kernel domain refuses clearly ---------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_log_domain_at_lam_1000_reaches_the_exact_optimum(backend, dtype):
    M, r, c = dessert_problem(backend, dtype)
    res = sinkhorn_log(M, r, c, 1000.0)
    cost = float(res.cost)
    assert res.plan.dtype == M.dtype
    assert math.isfinite(cost) and np.all(np.isfinite(to_numpy(res.plan)))
    assert res.converged
    assert abs(cost - (-36.0)) < 1e-3
    assert host_marginal_error(res.plan, r, c) <= 2 * default_tol(M.dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_log_domain_at_lam_1e4(dtype):
    M, r, c = dessert_problem(np, dtype)
    res = sinkhorn_log(M, r, c, 1e4, max_iter=100_000)
    assert res.converged
    assert abs(float(res.cost) + 36.0) < 1e-3


def test_log_domain_recovers_when_the_fast_path_overflows():
    # float32 with lam * M up to 2000: the scaling iterations overflow within a block, so
    # sinkhorn_log must fall back to exact log-sum-exp blocks, and still agree with float64.
    M = np.array([[0.0, 10.0, 20.0], [10.0, 0.0, 10.0], [20.0, 10.0, 0.0]])
    r = np.array([1.0, 1e-4, 1.0])
    c = np.array([1e-4, 1.0, 1.0])
    res32 = sinkhorn_log(M.astype(np.float32), r.astype(np.float32), c.astype(np.float32), 100.0)
    res64 = sinkhorn_log(M, r, c, 100.0)
    assert res32.details["exact_blocks"] > 0
    assert res32.converged and res64.converged
    assert float(res32.cost) == pytest.approx(float(res64.cost), rel=1e-5)


def test_kernel_domain_underflow_raises_with_advice(backend):
    M, r, c = dessert_problem(backend)
    with pytest.raises(ValueError, match="sinkhorn_log"):
        sinkhorn_knopp(M, r, c, 1000.0)  # exp(-1000 * 4) = 0: the scalings overflow making up for it


def test_kernel_domain_is_unchanged_by_adding_a_constant_to_a_row_or_column(backend):
    """The entropic plan ignores such offsets. Shifted by min M only, the kernel lost the
    offset row's cheap entries and converged, without a warning, to a plan that never used
    them: Hilde lost her 3.2 merveilleux."""
    M, r, c = (to_numpy(x) for x in dessert_problem())
    shifted = M.copy()
    shifted[3, :] += 40.0
    shifted[:, 0] += 40.0
    reference = sinkhorn_log(asarray(M, backend), asarray(r, backend), asarray(c, backend), 10.0)
    result = sinkhorn_knopp(asarray(shifted, backend), asarray(r, backend), asarray(c, backend), 10.0)
    assert result.converged
    np.testing.assert_allclose(to_numpy(result.plan), to_numpy(reference.plan), atol=1e-8)


def test_kernel_domain_never_returns_a_wrong_plan_as_converged():
    """Random small problems, some with zero masses, lam up to 100: the kernel domain either
    agrees with the log domain or raises; it never claims convergence on a wrong plan (13 in
    750 such problems did, before the kernel was shifted by the c-transform pair)."""
    rng = np.random.default_rng(0)
    raised = 0
    for _ in range(300):
        n, m = rng.integers(2, 7, size=2)
        M = rng.uniform(0, 100, size=(n, m)) * (rng.uniform() < 0.5) + rng.integers(0, 5, size=(n, m))
        r = rng.uniform(0, 1, n) * (rng.uniform(size=n) > 0.2)
        c = rng.uniform(0, 1, m) * (rng.uniform(size=m) > 0.2)
        if r.sum() == 0 or c.sum() == 0:
            continue
        c *= r.sum() / c.sum()
        lam = float(10 ** rng.uniform(0, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reference = sinkhorn_log(M, r, c, lam)
            try:
                result = sinkhorn_knopp(M, r, c, lam)
            except ValueError as err:
                assert "sinkhorn_log" in str(err)
                raised += 1
                continue
        if result.converged:
            assert np.abs(result.plan - reference.plan).max() <= 1e-8 * r.sum(), (M, r, c, lam)
    assert 0 < raised < 100  # the large-lam cases are refused, the others solved


@pytest.mark.parametrize("scale", [1.0, 1e-100])
def test_kernel_entries_that_vanished_but_should_carry_mass_are_refused(backend, scale):
    """At any total mass: the check compares the mass lost with the tolerance relative to the
    total, so masses of 1e-100 (an absolute comparison) let the wrong plan through."""
    M = np.array([[35.541, 49.591], [103.121, 82.496], [46.04, 85.508], [83.792, 95.007]])
    r, c = np.array([0.205, 0.86, 0.388, 0.597]) * scale, np.array([1.247, 0.803]) * scale
    lam = 50.0  # row 1, column 0 is 20.6 above its row's cheapest (exp(-1031) = 0), yet must carry 0.057
    assert sinkhorn_log(M, r, c, lam).plan[1, 0] == pytest.approx(0.057 * scale, rel=1e-4)
    with pytest.raises(ValueError, match="underflowed .to zero or to a subnormal number. should carry mass.*sinkhorn_log"):
        sinkhorn_knopp(*(asarray(x, backend) for x in (M, r, c)), lam)


def _flushed_problem():
    """float32; the entry (2, 0) sits at exp(-94.6) yet carries 0.005 of the mass."""
    M = np.array([[0, 1, 2, 0], [2, 1, 0, 0], [0, 1, 1, 1], [2, 0, 1, 0], [1, 2, 2, 1]], dtype=np.float32)
    r = np.array([0.533, 0.234, 0.0738, 0.608, 0.0], dtype=np.float32)
    c = np.array([0.0, 0.842, 0.325, 0.283], dtype=np.float32)
    return M, r, c * (r.sum() / c.sum()), 47.32


def _refuses_or_agrees(M, r, c, lam, xp=np):
    reference = sinkhorn_log(M, r, c, lam).plan
    try:
        result = sinkhorn_knopp(*(asarray(x, xp) for x in (M, r, c)), lam)
    except ValueError as err:
        assert "sinkhorn_log" in str(err)
    else:
        np.testing.assert_allclose(to_numpy(result.plan), reference, atol=1e-4 * float(r.sum()))


def test_a_kernel_entry_flushed_to_zero_is_not_taken_for_a_tiny_one(backend, monkeypatch):
    """float32, an entry at exp(-94.6) that should carry 0.005 of the mass: a subnormal on
    the CPU, but 0 on a GPU that flushes subnormals (CuPy's float32 kernels). A stored 0 must
    be bounded by the smallest normal number, not by the subnormal rounding error: the
    kernel domain then refuses, or agrees with the log domain, with or without the flush."""
    M, r, c, lam = _flushed_problem()
    _refuses_or_agrees(M, r, c, lam, backend)
    if backend is np:  # flush the kernel's subnormals to zero by hand, as such a GPU does
        real_exp = np.exp

        def flushing_exp(x, *args, **kwargs):
            y = real_exp(x, *args, **kwargs)
            return np.where(np.abs(y) < np.finfo(y.dtype).smallest_normal, np.zeros_like(y), y)

        monkeypatch.setattr(np, "exp", flushing_exp)
        _refuses_or_agrees(M, r, c, lam)


def test_a_subnormal_kernel_entry_whose_rounding_is_within_tol_is_accepted_on_the_cpu():
    """NumPy keeps float32 subnormals: the entry at exp(-94.6) keeps about 12 bits, an error
    below tol. Bounding every subnormal as if it were 0 refused this solvable problem."""
    M, r, c, lam = _flushed_problem()
    result = sinkhorn_knopp(M, r, c, lam)
    assert result.converged
    np.testing.assert_allclose(result.plan, sinkhorn_log(M, r, c, lam).plan, atol=1e-6)


@pytest.mark.parametrize("dtype, M, lam", [
    ("float64", [[0.0, 7.42, 7.425], [5.0, 0.0, 0.0]], 100.0),  # entries exp(-742): 5e-323, 3 bits
    ("float32", [[0.0, 1.0, 1.005], [0.7, 0.0, 0.0]], 101.0),
])
def test_kernel_entries_left_subnormal_that_carry_mass_are_refused(dtype, M, lam):
    """A kernel entry below the smallest normal number keeps a few significant bits: the
    plan came back 1e-3 off while its marginals fitted exactly, marked converged."""
    M, r, c = np.array(M, dtype=dtype), np.array([0.9, 0.1], dtype=dtype), np.array([0.1, 0.45, 0.45], dtype=dtype)
    assert sinkhorn_log(M, r, c, lam).plan[0, 1] > 0.3  # the subnormal entries carry most of row 0
    with pytest.raises(ValueError, match="underflowed \\(to zero or to a subnormal number\\) should carry mass"):
        sinkhorn_knopp(M, r, c, lam)


def test_a_row_without_mass_does_not_spoil_the_kernel_domain():
    """Its costs far above the others used to zero its kernel row: a refusal for nothing."""
    M, r, c = np.array([[0.0, 1.0], [1000.0, 1000.0]]), np.array([1.0, 0.0]), np.array([0.5, 0.5])
    for solver in SOLVERS:
        np.testing.assert_allclose(solver(M, r, c, 1.0).plan, [[0.5, 0.5], [0.0, 0.0]], atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_cheap_entry_between_a_row_and_a_column_without_mass_stays_finite(solver):
    """Entry (2, 2) joins a row and a column that carry no mass; its exponent in the shifted
    kernel is lam * 10 = +2000 unless capped at 0, and exp overflowed to inf (then NaN)."""
    M = np.array([[0.0, 1.0, 10.0], [1.0, 0.0, 10.0], [1.0, 1.0, 0.0]])
    r = c = np.array([0.5, 0.5, 0.0])
    result = solver(M, r, c, 200.0)
    assert result.converged and np.all(np.isfinite(result.plan))
    np.testing.assert_allclose(result.plan, np.diag([0.5, 0.5, 0.0]), atol=1e-12)


def test_log_domain_with_zero_masses_stays_on_the_fast_path():
    M = np.array([[0.0, 2.0], [2.0, 0.0]], dtype=np.float32)
    result = sinkhorn_log(M, np.float32([1, 0]), np.float32([0, 1]), 100.0)
    assert result.details == {"kernel_rebuilds": 0, "exact_blocks": 0}
    np.testing.assert_allclose(result.plan, [[0, 1], [0, 0]])


def test_kernel_rebuilds_counts_the_rebuilds_after_the_first_kernel():
    """At lam = 1 the scalings stay moderate and the first kernel serves throughout (0
    rebuilds); at lam = 1000 they grow past the threshold and are absorbed, which the
    counter must show (it read 1 for no rebuild before)."""
    M, r, c = dessert_problem(np, "float64")
    assert sinkhorn_log(M, r, c, 1.0).details["kernel_rebuilds"] == 0
    assert sinkhorn_log(M, r, c, 1000.0).details["kernel_rebuilds"] >= 1


def test_kernel_domain_scaling_overflow_raises_with_advice(backend):
    # float32 at lam=100: the kernel is positive (subnormal) but the scalings overflow.
    M, r, c = dessert_problem(backend, "float32")
    with pytest.raises(ValueError, match="sinkhorn_log"):
        sinkhorn_knopp(M, r, c, 100.0)


# -- results: types, history, warnings ------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_array_type_in_equals_array_type_out(backend, solver, dtype):
    M, r, c = dessert_problem(backend, dtype)
    res = solver(M, r, c, 5.0)
    assert isinstance(res, TransportResult)
    assert array_namespace(res.plan) is backend and array_namespace(res.cost) is backend
    assert res.plan.dtype == M.dtype and res.cost.dtype == M.dtype
    assert res.plan.shape == (8, 5) and res.cost.shape == ()
    with pytest.raises(AttributeError):
        res.n_iter = 3  # frozen


@pytest.mark.parametrize("solver", SOLVERS)
def test_history_is_checked_every_k_iterations(solver):
    M, r, c = dessert_problem()
    res = solver(M, r, c, 10.0, check_every=7)
    assert len(res.marginal_error) == len(res.checked_at)
    assert all(k % 7 == 0 for k in res.checked_at)
    assert res.checked_at[-1] == res.n_iter
    assert res.marginal_error[-1] <= 1e-9 < res.marginal_error[0]
    every = solver(M, r, c, 10.0, check_every=1)
    assert every.checked_at == tuple(range(1, every.n_iter + 1))


@pytest.mark.parametrize("solver", SOLVERS)
def test_not_converging_warns_with_advice(backend, solver):
    M, r, c = dessert_problem(backend)
    with pytest.warns(ConvergenceWarning, match="max_iter") as record:
        res = solver(M, r, c, 10.0, max_iter=15)
    assert not res.converged and res.n_iter == 15
    assert issubclass(ConvergenceWarning, UserWarning)
    assert record[0].filename == __file__  # the caller's line, not the library's


@pytest.mark.parametrize("solver", SOLVERS)
def test_integer_inputs_and_any_total_mass(solver):
    M = np.array([[0, 2, 1], [3, 0, 1]])
    r = np.array([5, 7])
    c = np.array([4, 4, 4])
    res = solver(M, r, c, 2.0)
    assert res.plan.dtype == np.float64
    assert host_marginal_error(res.plan, r, c) <= 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("float32_input", ["M", "r"])
def test_mixed_float32_and_float64_inputs_run_in_float64(solver, float32_input):
    """As documented: taking M's dtype instead ran float64 masses in float32 (tol 1e-6)."""
    M, r, c = (to_numpy(x) for x in dessert_problem())
    args = {"M": M, "r": r, "c": c}
    args[float32_input] = args[float32_input].astype(np.float32)
    res = solver(args["M"], args["r"], args["c"], 5.0)
    assert res.plan.dtype == np.float64 and res.cost.dtype == np.float64


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_the_stopping_rule_is_relative_to_the_total_mass(solver, scale):
    """Scaling both masses scales the plan and changes nothing else: an absolute marginal
    error stopped at once on tiny masses and never on large ones."""
    M, r, c = (to_numpy(x) for x in dessert_problem())
    unit = solver(M, r, c, 3.0)
    scaled = solver(M, r * scale, c * scale, 3.0)
    assert scaled.converged and scaled.n_iter == unit.n_iter
    np.testing.assert_allclose(scaled.plan, unit.plan * scale, rtol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_masses_give_zero_rows_and_columns(backend, solver):
    Mh, rh, ch = random_problem(3, 5, 4)
    rh[1] = 0.0
    ch[2] = 0.0
    ch *= rh.sum() / ch.sum()
    M, r, c = (asarray(x, backend) for x in (Mh, rh, ch))
    res = solver(M, r, c, 5.0)
    P = to_numpy(res.plan)
    assert res.converged and np.all(np.isfinite(P))
    assert np.all(P[1] == 0) and np.all(P[:, 2] == 0)
    assert host_marginal_error(P, rh, ch) <= 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("rel", [1e-9, 1e-7])
def test_masses_equal_up_to_rounding_are_accepted(solver, rel):
    """Masses within MASS_RTOL are accepted and c is rescaled to r's mass; unscaled, a
    mismatch of 1e-7 left a marginal error the iterations could never bring below tol."""
    M, r, c = (to_numpy(x) for x in dessert_problem())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = solver(M, r, c * (1 + rel), 10.0)
    assert res.converged
    np.testing.assert_allclose(res.plan.sum(axis=0), c * (r.sum() / c.sum()), rtol=1e-9)


def test_marginal_violation_matches_a_hand_computation(backend):
    P = asarray(np.array([[1.0, 1.0], [0.0, 2.0]]), backend)
    r = asarray(np.array([2.0, 2.0]), backend)
    c = asarray(np.array([2.0, 2.0]), backend)
    # columns are (1, 3): off by 1 each, relative to mass 4
    assert float(marginal_violation(P, r, c)) == pytest.approx(0.25)


@pytest.mark.parametrize("shapes", [((2, 2), (1,), (2,)), ((2, 2), (2,), (3,)), ((2, 3), (3,), (2,)),
                                    ((4,), (2,), (2,)), ((2, 2), (2, 1), (2,))])
def test_marginal_violation_refuses_shapes_that_do_not_fit(backend, shapes):
    """An r of shape (1,) used to broadcast against every row sum, and be divided by its own
    sum, the wrong total; other mismatches surfaced as NumPy's broadcast errors."""
    plan, r, c = (backend.ones(shape, dtype=backend.float64) for shape in shapes)
    wanted = "plan {}, r {}, c {}".format(*(str(tuple(shape)) for shape in shapes))
    with pytest.raises(ValueError, match="marginal_violation: .*" + wanted.replace("(", r"\(").replace(")", r"\)")):
        marginal_violation(plan, r, c)


# -- bad input ------------------------------------------------------------------------------


def _bad_inputs():
    M, r, c = (np.array(x, dtype=float) for x in dessert_problem())
    nan_M = M.copy()
    nan_M[0, 0] = np.nan
    inf_M = M.copy()
    inf_M[2, 3] = np.inf
    neg_r = r.copy()
    neg_r[0] = -1.0
    neg_r[1] += 1.0
    nan_r = r.copy()
    nan_r[0] = np.nan
    inf_c = c.copy()
    inf_c[0] = np.inf
    return {
        "1-D M": ((M[0], r, c), "2-D"),
        "3-D M": ((M[None], r, c), "2-D"),
        "r shape": ((M, r[:-1], c), "r must have shape"),
        "c shape": ((M, r, c[:-1]), "c must have shape"),
        "c 2-D": ((M, r, c[None]), "c must have shape"),
        "NaN in M": ((nan_M, r, c), "M contains NaN"),
        "inf in M": ((inf_M, r, c), "M contains NaN"),
        "negative r": ((M, neg_r, c), "negative"),
        "NaN in r": ((M, nan_r, c), "r contains NaN"),
        "inf in c": ((M, r, inf_c), "c contains NaN"),
        "masses differ": ((M, r, c * 1.01), "same mass"),
        "masses differ by 1e-5": ((M, r, c * (1 + 1e-5)), "same mass"),  # MASS_RTOL is 1e-6
        "zero mass": ((M, 0 * r, 0 * c), "zero total mass"),
        "empty": ((np.zeros((0, 5)), np.zeros(0), c), "empty"),
        "r sums to inf": ((M, np.full_like(r, 1e308), np.full_like(c, 1.6e308)), "r sums to more than"),
        "c sums to inf": ((M, r, np.full_like(c, 1e308)), "c sums to more than"),
        "lam * M overflows": ((M * 1e307, r, c), "lam \\* M overflows"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_value_error(backend, solver, case):
    args, message = BAD[case]
    args = tuple(asarray(x, backend) for x in args)
    with pytest.raises(ValueError, match=message):
        solver(*args, 10.0)


def _bad_host_arrays():
    """NumPy-only inputs (array_api_strict holds none of them) that used to be converted to
    float64 and solved, or to fail deep inside NumPy."""
    M, r, c = (np.array(x, dtype=float) for x in dessert_problem())
    seconds = np.round(M).astype(np.int64)
    return {
        "string M": ((M.astype(str), r, c), "M must hold real numbers .*dtype <U"),
        "object M": ((M.astype(object), r, c), "M must hold real numbers .*dtype object"),
        "datetime64 M": ((seconds.astype("datetime64[s]"), r, c), "M must hold real numbers .*dtype datetime64"),
        "timedelta64 c": ((M, r, (1000 * c).astype("timedelta64[ms]")), "c must hold real numbers .*dtype timedelta64"),
        "bool r": ((M, r > 0, c), "r must hold real numbers .*dtype bool"),
        "complex M": ((M + 0j, r, c), "must be real, got dtype complex128 for M"),
        "np.matrix M": ((np.asmatrix(M), r, c), "M is an np.matrix"),
        "np.matrix r": ((M, np.asmatrix(r), c), "r is an np.matrix"),
        "masked M": ((np.ma.masked_greater(M, 3.0), r, c), "M is a masked array"),
        "masked c": ((M, r, np.ma.masked_array(c)), "c is a masked array"),
    }


BAD_HOST = _bad_host_arrays()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", list(BAD_HOST))
def test_arrays_that_are_not_plain_real_arrays_are_refused_by_name(solver, case):
    args, message = BAD_HOST[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before NumPy can warn about them
        with pytest.raises(ValueError, match=message):
            solver(*args, 10.0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", ["int32", "uint8", "float16"])
def test_integer_and_half_precision_inputs_are_still_accepted(backend, solver, dtype):
    if not hasattr(backend, dtype):
        pytest.skip(f"{backend.__name__} has no {dtype}")
    M, r, c = (to_numpy(x) for x in dessert_problem())  # whole-number masses
    res = solver(asarray(np.round(M - M.min()), backend, dtype), asarray(r, backend, dtype),
                 asarray(c, backend, dtype), 1.0)
    assert array_namespace(res.plan) is backend and res.plan.dtype == backend.float64
    assert res.converged


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("lam", [0.0, -1.0, math.inf, math.nan, "ten"])
def test_bad_lam_raises_value_error(solver, lam):
    M, r, c = dessert_problem()
    with pytest.raises(ValueError, match="lam"):
        solver(M, r, c, lam)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kwargs", [{"tol": -1.0}, {"max_iter": 0}, {"check_every": 0}, {"max_iter": 2.5},
                                    {"max_iter": 15.0}, {"check_every": 2.0}, {"max_iter": True}])
def test_bad_loop_options_raise_value_error(solver, kwargs):
    M, r, c = dessert_problem()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        solver(M, r, c, 10.0, **kwargs)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kwargs", [{"tol": 0.0}, {"max_iter": 1}, {"check_every": 1, "max_iter": 3}])
def test_loop_options_at_their_limits_are_accepted(solver, kwargs):
    """tol = 0 (run to max_iter) and single iterations are valid requests, not errors."""
    M, r, c = dessert_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solver(M, r, c, 10.0, **{"max_iter": 20, **kwargs})
    assert 1 <= res.n_iter <= 20


@pytest.mark.parametrize("solver", SOLVERS)
def test_masses_that_are_not_arrays_are_refused_by_name(solver):
    M, r, c = dessert_problem()
    with pytest.raises(ValueError, match="r must be an array.*xp.full"):
        solver(M, 0.25, c, 10.0)
    with pytest.raises(ValueError, match="c must be an array"):
        solver(M, r, list(c), 10.0)


def test_no_runtime_warnings_on_underflow_paths():
    # NumPy's floating-point warnings are replaced by our own error/recovery.
    M, r, c = dessert_problem(np, "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn_log(M, r, c, 1000.0)
        with pytest.raises(ValueError):
            sinkhorn_knopp(M, r, c, 100.0)
