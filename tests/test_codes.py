"""sinkhorn_codes: the official SwAV iterations, equal partition, float32 safety, all-reduce hooks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swav_ref import backend as B
from swav_ref.swav import FLOAT32_SAFE_EPSILON, sinkhorn_codes
from thread_workers import ThreadWorkers


def official_sinkhorn(scores: np.ndarray, epsilon: float, n_iters: int) -> np.ndarray:
    """main_swav.py's distributed_sinkhorn for one process, literally (K x B layout, no shift)."""
    q = np.exp(scores / epsilon).T
    n_prototypes, batch = q.shape
    q = q / np.sum(q)
    for _ in range(n_iters):
        q = q / np.sum(q, axis=1, keepdims=True)
        q = q / n_prototypes
        q = q / np.sum(q, axis=0, keepdims=True)
        q = q / batch
    return (q * batch).T


def cosine_scores(rng, batch, n_prototypes, dim=4):
    z = rng.normal(size=(batch, dim))
    c = rng.normal(size=(n_prototypes, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return z @ c.T


@pytest.mark.parametrize("epsilon, n_iters", [(0.05, 3), (0.05, 1), (0.1, 7), (0.03, 3)])
def test_matches_official_loop(backend, rng, epsilon, n_iters):
    s = cosine_scores(rng, 12, 5)
    got = sinkhorn_codes(B.asarray(s, backend), epsilon=epsilon, n_iters=n_iters)
    assert B.array_namespace(got) is backend and got.dtype == backend.float64
    want = official_sinkhorn(s, epsilon, n_iters)
    assert np.max(np.abs(B.to_numpy(got) - want)) < 1e-12


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 20), n_prototypes=st.integers(1, 9), n_iters=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_rows_are_probability_vectors(backend, batch, n_prototypes, n_iters, seed):
    s = cosine_scores(np.random.default_rng(seed), batch, n_prototypes)
    q = B.to_numpy(sinkhorn_codes(B.asarray(s, backend), n_iters=n_iters))
    assert q.shape == (batch, n_prototypes)
    assert np.all(q >= 0)
    assert np.max(np.abs(q.sum(axis=1) - 1.0)) < 1e-12


def test_prototype_totals_approach_equal_partition(backend, rng):
    batch, n_prototypes = 40, 6
    s = B.asarray(cosine_scores(rng, batch, n_prototypes), backend)
    deviation = []
    for n_iters in (1, 3, 10, 300):
        q = B.to_numpy(sinkhorn_codes(s, epsilon=0.05, n_iters=n_iters))
        deviation.append(np.max(np.abs(q.sum(axis=0) - batch / n_prototypes)))
    assert deviation[0] > deviation[1] > deviation[2] > deviation[3]
    assert deviation[3] < 1e-6  # converged: every prototype holds B / K of the batch


def test_codes_sharpen_as_epsilon_falls(backend, rng):
    s = B.asarray(cosine_scores(rng, 30, 6), backend)
    peak = [float(np.mean(np.max(B.to_numpy(sinkhorn_codes(s, epsilon=e)), axis=1))) for e in (0.5, 0.1, 0.02)]
    assert peak[0] < peak[1] < peak[2]


@pytest.mark.parametrize("dim", [2, 4, 16])
def test_float32_small_epsilon_is_finite_and_right(backend, rng, dim):
    # d = 4 cosines at eps = 0.005 make whole sample columns underflow in float32 iterations;
    # the automatic float64 iterations must give the official (float64) answer.
    s = cosine_scores(rng, 32, 10, dim)
    q = sinkhorn_codes(B.asarray(s, backend, "float32"), epsilon=0.005)
    assert q.dtype == backend.float32
    q = B.to_numpy(q)
    assert np.all(np.isfinite(q))
    assert np.max(np.abs(q.sum(axis=1) - 1.0)) < 1e-5
    assert np.max(np.abs(q - official_sinkhorn(s.astype(np.float32).astype(np.float64), 0.005, 3))) < 1e-5


@pytest.mark.parametrize("epsilon", [0.005, 0.05])
def test_scores_above_one_do_not_overflow_float32(backend, rng, epsilon):
    # slightly-off cosines: exp(1.3 / 0.005) = e^260 would overflow float32, and
    # exp(4.0 / 0.005) = e^800 even float64; the per-prototype shift keeps exponents <= 0
    for scale, offset in ((1.3, 0.0), (1.0, 3.0)):
        s = scale * cosine_scores(rng, 16, 5) + offset
        q = B.to_numpy(sinkhorn_codes(B.asarray(s, backend, "float32"), epsilon=epsilon))
        assert np.all(np.isfinite(q)) and np.max(np.abs(q.sum(axis=1) - 1.0)) < 1e-5


@pytest.mark.parametrize("epsilon", [0.012, 0.029])
def test_float32_below_the_safe_epsilon_is_iterated_in_float64(backend, rng, epsilon):
    """Anywhere below FLOAT32_SAFE_EPSILON (0.03), not only far below it: float32 iterations
    start to lose whole samples to underflow from about eps = 0.02 (see the constant)."""
    s = B.asarray(cosine_scores(rng, 16, 8), backend, "float32")
    q = sinkhorn_codes(s, epsilon=epsilon)
    assert q.dtype == backend.float32
    np.testing.assert_array_equal(B.to_numpy(q), B.to_numpy(sinkhorn_codes(s, epsilon=epsilon, compute_dtype="float64")))


def test_float32_default_epsilon_stays_in_float32(backend, rng):
    s = cosine_scores(rng, 16, 5)
    q = sinkhorn_codes(B.asarray(s, backend, "float32"), epsilon=FLOAT32_SAFE_EPSILON)
    forced = sinkhorn_codes(B.asarray(s, backend, "float32"), epsilon=FLOAT32_SAFE_EPSILON,
                            compute_dtype="float32")
    assert q.dtype == backend.float32
    np.testing.assert_array_equal(B.to_numpy(q), B.to_numpy(forced))


def test_scores_that_are_not_cosines_are_named_on_numpy(rng):
    # cosines times 30 at eps = 0.05: exponents down to -1200 underflow a whole row even in
    # float64, and the 0/0 makes every code NaN; NumPy says why instead of returning NaN
    s = cosine_scores(rng, 64, 10, dim=8)
    s[0, :] = -1.0  # a sample far from every prototype
    with np.errstate(all="ignore"), pytest.raises(ValueError, match=r"scores spanning \[-30, .*should be cosines"):
        sinkhorn_codes(30.0 * s, epsilon=0.05)
    s[3, 2] = np.nan  # a diverged network: NaN in, NaN out, for the trainer's check to report
    with np.errstate(all="ignore"):
        assert np.isnan(sinkhorn_codes(s, epsilon=0.05)).any()


def test_numpy_scalar_arguments_are_accepted(backend, rng):
    s = B.asarray(cosine_scores(rng, 12, 5), backend)
    want = B.to_numpy(sinkhorn_codes(s, epsilon=0.05, n_iters=3))
    got = B.to_numpy(sinkhorn_codes(s, epsilon=np.float64(0.05), n_iters=np.int64(3)))
    np.testing.assert_array_equal(got, want)
    q = sinkhorn_codes(B.asarray(cosine_scores(rng, 12, 5), backend, "float32"),
                       epsilon=np.float32(0.05), n_iters=np.int32(3))
    assert q.dtype == backend.float32 and np.all(np.isfinite(B.to_numpy(q)))


def test_allreduce_hooks_reproduce_the_global_batch(backend, rng):
    s = cosine_scores(rng, 12, 5)
    whole = B.to_numpy(sinkhorn_codes(B.asarray(s, backend)))
    parts = [s[:5], s[5:]]  # unequal local batches
    workers = ThreadWorkers(2)

    def worker(rank):
        return sinkhorn_codes(
            B.asarray(parts[rank], backend),
            allreduce=workers.allreduce(rank),
            allreduce_max=workers.allreduce(rank, backend.maximum),
        )

    results = workers.run(worker)
    got = np.concatenate([B.to_numpy(r) for r in results])
    assert np.max(np.abs(got - whole)) < 1e-12
    # local Sinkhorn on each part alone is a different answer: the hooks did matter
    alone = B.to_numpy(sinkhorn_codes(B.asarray(parts[0], backend)))
    assert np.max(np.abs(alone - whole[:5])) > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"n_iters": 0}, "n_iters"),
        ({"n_iters": True}, "n_iters"),
        ({"n_iters": 2.0}, "n_iters"),
        ({"epsilon": True}, "epsilon"),
        ({"epsilon": np.float32("nan")}, "epsilon"),
        ({"epsilon": np.float64(-0.1)}, "epsilon"),
        ({"allreduce": lambda x: x}, "allreduce_max"),
        ({"compute_dtype": "int64"}, "compute_dtype"),
    ],
)
def test_bad_arguments(backend, kwargs, match):
    s = B.asarray(np.zeros((3, 2)), backend)
    with pytest.raises(ValueError, match=match):
        sinkhorn_codes(s, **kwargs)


def test_bad_shape(backend):
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_codes(B.asarray(np.zeros(3), backend))


def test_converged_codes_are_the_optimal_transport_plan_times_b(rng):
    """docs/api.md's dictionary: sinkhorn_codes(S, epsilon) iterated to convergence is
    B * sinkhorn_knopp(M = -S, r = 1/B, c = 1/K, lam = 1/epsilon).plan."""
    from swav_ref.ot import sinkhorn_knopp

    s = cosine_scores(rng, 24, 6)
    b, k = s.shape
    codes = sinkhorn_codes(s, epsilon=0.05, n_iters=2000)
    plan = sinkhorn_knopp(-s, np.full(b, 1.0 / b), np.full(k, 1.0 / k), lam=20.0, tol=1e-12).plan
    np.testing.assert_allclose(codes, b * plan, atol=1e-9)


@pytest.mark.parametrize("compute_dtype", [None, "float32", "float64"])
@pytest.mark.parametrize("dtype", ["int64", "bool", "complex128"])
def test_scores_must_be_real_floating_point_whatever_the_compute_dtype(backend, dtype, compute_dtype):
    """With compute_dtype given, integer scores used to give all-zero codes, bool ones all
    True, complex ones lost their imaginary part (cast in, cast back out)."""
    scores = B.asarray(np.arange(12).reshape(3, 4).astype(dtype), backend)
    with pytest.raises(ValueError, match=r"scores must be a floating-point array, got \S*" + dtype):
        sinkhorn_codes(scores, compute_dtype=compute_dtype)
