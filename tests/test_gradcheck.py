"""The gradient checker itself (swav_ref.nn.gradcheck): every backward in the package is
trusted because these functions say 1e-6, so they must pass a right gradient, fail a
wrong one, leave the checked array as they found it, and refuse float32.

The test function is f(X) = sum(C * X**3) on a non-square X with a non-symmetric C: its
gradient 3 C X**2 is known exactly, has no symmetry a transposed gradient could hide
behind, and has a second derivative large enough that a one-sided difference (error O(h))
misses 1e-6 where the central one (O(h**2)) does not.
"""

from __future__ import annotations

import numpy as np
import pytest

from swav_ref.backend import asarray, to_numpy
from swav_ref.nn.gradcheck import check_gradient, check_gradient_sampled, numerical_gradient, rel_error

TOL = 1e-6


def _cubic(xp, shape=(2, 3), seed=0, magnitudes=(0.5, 1.5)):
    """``(f, x, grad)``: f() = sum(C * x**3) reading x each call, and its exact gradient;
    the entries of x are ``magnitudes`` apart (log-uniform), with random signs."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=shape)
    size = np.exp(rng.uniform(*np.log(magnitudes), size=shape))
    x = asarray(size * rng.choice([-1.0, 1.0], size=shape), xp, "float64")

    def f():
        return float(np.sum(c * to_numpy(x) ** 3))

    return f, x, asarray(3.0 * c * to_numpy(x) ** 2, xp, "float64")


def _square_cubic(xp):
    """The same on a 3x3 X whose gradient is far from symmetric (so its transpose is wrong)."""
    f, x, grad = _cubic(xp, (3, 3), seed=1)
    g = to_numpy(grad)
    assert rel_error(g, g.T) > 0.1
    return f, x, grad


# -- a right gradient passes -----------------------------------------------------------


def test_a_correct_gradient_passes(backend):
    """Catches a checker whose own difference quotient is wrong (one-sided, wrong step
    size, a missing factor 2): then even the exact gradient is reported above 1e-6."""
    f, x, grad = _cubic(backend)
    assert check_gradient(f, x, grad) < TOL
    assert check_gradient_sampled(f, x, grad, samples=4) < TOL
    assert rel_error(numerical_gradient(f, x), grad) < TOL


# -- wrong gradients are reported ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("twice too large", lambda g: 2.0 * g), ("sign flipped", lambda g: -g), ("transposed", lambda g: g.T),
     ("one entry off by 1e-4 relative", lambda g: g + 1e-4 * np.abs(g).max() * (np.arange(g.size) == 4).reshape(g.shape))],
)
def test_a_wrong_gradient_is_reported_by_both_checks(name, wrong):
    """Catches a checker that compares the gradient with itself, takes absolute values,
    or averages an error away. samples >= size: the sampled check sees every entry."""
    f, x, grad = _square_cubic(np)
    bad = wrong(to_numpy(grad))
    assert check_gradient(f, x, bad) > TOL, name
    assert check_gradient_sampled(f, x, bad, samples=x.size) > TOL, name


def test_the_sizes_of_the_reported_errors():
    """rel_error = max|a - b| / max(|a| + |b|): 1/3 for a factor 2, 1 for a sign flip."""
    f, x, grad = _cubic(np)
    assert check_gradient(f, x, 2.0 * grad) == pytest.approx(1 / 3, rel=1e-6)
    assert check_gradient(f, x, -grad) == pytest.approx(1.0, rel=1e-6)


def test_a_sampled_check_with_enough_samples_sees_every_entry():
    """Entries are drawn without replacement: with samples = size every entry is checked
    whatever the seed, so one wrong entry is always found (drawing with replacement would
    miss it for about a third of the seeds)."""
    f, x, grad = _cubic(np, (2, 3))
    for entry in range(x.size):
        bad = grad.copy()
        bad.flat[entry] *= 1.5
        for seed in range(5):
            assert check_gradient_sampled(f, x, bad, samples=x.size, seed=seed) > TOL, (entry, seed)


def test_a_sampled_check_costs_two_calls_per_sample():
    calls = []
    f, x, grad = _cubic(np, (3, 4))

    def counted():
        calls.append(1)
        return f()

    check_gradient_sampled(counted, x, grad, samples=5)
    assert len(calls) == 10
    calls.clear()
    check_gradient_sampled(counted, x, grad, samples=50)  # more samples than entries: all 12
    assert len(calls) == 24
    calls.clear()
    check_gradient(counted, x, grad)
    assert len(calls) == 24


def test_a_gradient_of_another_shape_is_refused_not_broadcast():
    """A transposed non-square gradient cannot be compared entry by entry: an error, not a
    number from broadcasting."""
    f, x, grad = _cubic(np, (2, 3))
    with pytest.raises(ValueError, match=r"rel_error: shapes differ, \(3, 2\) vs \(2, 3\)"):
        check_gradient(f, x, grad.T)
    with pytest.raises(ValueError, match=r"analytic gradient has shape \(3, 2\), x has \(2, 3\)"):
        check_gradient_sampled(f, x, grad.T)


# -- the checked array is left as it was -----------------------------------------------


def test_x_is_restored_exactly(backend):
    """Each entry is perturbed in place by +h and -h: afterwards x must hold the very same
    values, bitwise, and so give the same f. Entries from 1e-8 to 10: below h = 1e-5,
    undoing the step by arithmetic ((old - h) + h) often does not give old back."""
    f, x, grad = _cubic(backend, (3, 4), magnitudes=(1e-8, 10.0))
    before, f_before = to_numpy(x).copy(), f()
    check_gradient(f, x, grad)
    check_gradient_sampled(f, x, grad, samples=5)
    numerical_gradient(f, x)
    np.testing.assert_array_equal(to_numpy(x), before)
    assert f() == f_before


def test_the_checks_perturb_x_itself():
    """The contract is that f reads x: the checker must change x in place (a copy would
    give a zero numerical gradient and every gradient would look wrong)."""
    seen = []
    f, x, grad = _cubic(np)

    def watching():
        seen.append(to_numpy(x).copy())
        return f()

    check_gradient(watching, x, grad)
    changed = [np.flatnonzero(s != to_numpy(x)) for s in seen]
    assert all(len(c) == 1 for c in changed)  # one entry at a time
    assert sorted(int(c[0]) for c in changed) == sorted(2 * list(range(x.size)))  # each entry at +h and -h


# -- float32 is refused ------------------------------------------------------------------


@pytest.mark.parametrize("check", [check_gradient, check_gradient_sampled, lambda f, x, g: numerical_gradient(f, x)],
                         ids=["check_gradient", "check_gradient_sampled", "numerical_gradient"])
def test_float32_is_refused_and_left_untouched(check):
    """The module's rule: gradient checks run in float64 (in float32 the round-off eps/h is
    about 1e-2, so every gradient would look wrong or every bound would be loose)."""
    f, x64, grad = _cubic(np)
    x = x64.astype(np.float32)
    before = x.copy()
    with pytest.raises(ValueError, match="gradient checks need float64, got float32"):
        check(f, x, grad.astype(np.float32))
    np.testing.assert_array_equal(x, before)


# -- rel_error ---------------------------------------------------------------------------


def test_rel_error_is_scale_free_symmetric_and_zero_for_zeros():
    a, b = np.array([1.0, -2.0, 3.0]), np.array([1.0, -2.0, 3.3])
    assert rel_error(a, b) == pytest.approx(0.3 / 6.3)
    assert rel_error(b, a) == rel_error(a, b)
    assert rel_error(1e-8 * a, 1e-8 * b) == pytest.approx(rel_error(a, b))
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.zeros(3), a) == 1.0
    assert isinstance(rel_error(a, b), float)
