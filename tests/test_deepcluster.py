import inspect

import numpy as np
import pytest

import required

from swav_ref.backend import Random, array_namespace, asarray, to_numpy
from swav_ref.checkpoint import CheckpointError
from swav_ref.deepcluster import (
    IGNORE_INDEX,
    MemoryBank,
    cluster_memory,
    deepcluster_loss,
    kmeans_plus_plus,
    spherical_kmeans,
)
from swav_ref.swav import swav_loss
from swav_ref.nn.gradcheck import check_gradient
from thread_workers import ThreadWorkers


def _blobs(n_per, k, d, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # orthonormal: well separated
    x = np.repeat(centres, n_per, axis=0) + spread * rng.normal(size=(n_per * k, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(x))
    return x[perm], labels[perm], centres


def _same_partition(a, b):
    """Clusterings agree up to a relabelling: the contingency table is a permutation."""
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=int)
    np.add.at(table, (a, b), 1)
    return np.all((table > 0).sum(axis=1) == 1) and np.all((table > 0).sum(axis=0) == 1)


def test_kmeans_recovers_separated_clusters(backend):
    x, labels, centres = _blobs(40, 5, 8)
    for seed in range(3):
        c, a = spherical_kmeans(asarray(x, backend), 5, 10, Random(seed), n_restarts=3)
        assert _same_partition(to_numpy(a), labels), f"seed {seed}: blobs not recovered"
    found = to_numpy(c)
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-12)
    assert np.max(found @ centres.T, axis=1).min() > 0.99  # each centroid sits on a blob centre


def test_random_init_is_the_weaker_official_choice():
    """Random-row seeding (the official init) often merges blobs; k-means++ with a few
    restarts does not."""
    x, labels, _ = _blobs(40, 5, 8)
    random_ok = [_same_partition(spherical_kmeans(x, 5, 10, Random(s), init="random")[1], labels) for s in range(10)]
    plus_ok = [_same_partition(spherical_kmeans(x, 5, 10, Random(s), n_restarts=3)[1], labels) for s in range(10)]
    assert sum(plus_ok) == 10 and sum(random_ok) < 10


def test_kmeans_rejects_too_many_clusters_but_takes_one_per_row():
    """More clusters than rows is refused; exactly as many is a valid (if trivial) request,
    every row its own cluster."""
    with pytest.raises(ValueError, match="n_clusters=11"):
        spherical_kmeans(np.eye(10), 11, 3, Random(0))
    _, assignments = spherical_kmeans(np.eye(4), 4, 2, Random(0))
    assert sorted(np.asarray(assignments).tolist()) == [0, 1, 2, 3]


def test_kmeans_plus_plus_never_picks_a_chosen_row_twice():
    """A chosen row is at distance 0 from its centroid, so it cannot be drawn again; the
    distances to a fixed row 0 instead of the first draw let the first draw repeat."""
    x = np.eye(3)
    for seed in range(30):
        rows = np.asarray(kmeans_plus_plus(x, 3, Random(seed)))
        assert len({tuple(row) for row in rows}) == 3, seed


def _choice_oracle(x, n_clusters, seed):
    """k-means++ as NumPy's ``Generator.choice`` draws it, distances on the host."""
    gen = Random(seed).host()
    chosen = [int(gen.integers(len(x)))]
    nearest = 2.0 - 2.0 * (x @ x[chosen[0]])
    nearest[chosen[0]] = 0.0
    for _ in range(1, n_clusters):
        weight = np.clip(nearest.astype(np.float64), 0.0, None)
        chosen.append(int(gen.choice(len(x), p=weight / weight.sum())))
        nearest = np.minimum(nearest, 2.0 - 2.0 * (x @ x[chosen[-1]]))
        nearest[chosen[-1]] = 0.0
    return x[chosen]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kmeans_plus_plus_draws_the_rows_numpy_choice_draws(backend, dtype):
    """The draws by inverse CDF on the device are ``choice``'s draws, row for row, and the
    same on every backend."""
    for seed in range(12):
        x = np.random.default_rng(seed).normal(size=(60, 5)).astype(dtype)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        centroids = kmeans_plus_plus(asarray(x, backend), 9, Random(seed))
        assert array_namespace(centroids) is backend and centroids.dtype == asarray(x, backend).dtype
        assert np.array_equal(to_numpy(centroids), _choice_oracle(x, 9, seed)), seed


def test_kmeans_plus_plus_in_float32_never_draws_a_row_twice():
    """In float32 a row's distance to itself rounds to +-1e-7, not 0: with as many clusters
    as rows on the 2-sphere (the last rows drawn are close to chosen ones), a chosen row was
    drawn again in 5 of 20 seeds."""
    x = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for seed in range(20):
        centroids = kmeans_plus_plus(x, 300, Random(seed))
        assert len({row.tobytes() for row in centroids}) == 300, seed


def test_kmeans_plus_plus_draws_uniformly_when_every_row_is_a_centroid():
    """Rows that all coincide are at distance 0 from the first centroid: no NaN, K rows."""
    x = np.full((6, 4), 0.5)
    centroids = kmeans_plus_plus(x, 3, Random(0))
    assert centroids.shape == (3, 4) and np.array_equal(centroids, x[:3])


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_clusters=0), "n_clusters must be an integer >= 1, got 0"),
    (dict(n_clusters=2.5), "n_clusters must be an integer >= 1, got 2.5"),
    (dict(n_iters=-1), "n_iters must be an integer >= 0, got -1"),
    (dict(n_restarts=0), "n_restarts must be an integer >= 1, got 0"),
    (dict(init=np.eye(5)), r"init must have shape \(n_clusters, d\) = \(3, 5\), got \(5, 5\)"),
    (dict(init=np.eye(5)[:3, :4]), r"init must have shape \(n_clusters, d\) = \(3, 5\), got \(3, 4\)"),
    (dict(init=[[1.0, 0.0]]), "init must be 'k-means\\+\\+', 'random' or an array"),
])
def test_kmeans_refuses_bad_arguments(kwargs, message):
    x, _, _ = _blobs(4, 3, 5)
    args = dict(n_clusters=3, n_iters=2, init="k-means++", n_restarts=1) | kwargs
    with pytest.raises(ValueError, match=message):
        spherical_kmeans(x, args.pop("n_clusters"), args.pop("n_iters"), Random(0), **args)


def test_kmeans_with_zero_iterations_returns_its_start(backend):
    x, _, _ = _blobs(4, 3, 5)
    init = asarray(x[[0, 5, 9]], backend)
    centroids, assignments = spherical_kmeans(asarray(x, backend), 3, 0, Random(0), init=init)
    np.testing.assert_array_equal(to_numpy(centroids), x[[0, 5, 9]])
    np.testing.assert_array_equal(to_numpy(assignments), np.argmax(x @ x[[0, 5, 9]].T, axis=1))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_kmeans_refuses_non_finite_input(backend, bad):
    x, _, _ = _blobs(4, 3, 5)
    x[7, 2] = bad
    with pytest.raises(ValueError, match="x \\(or init\\) contains NaN or infinity"):
        spherical_kmeans(asarray(x, backend), 3, 2, Random(0))
    init = x[[0, 1, 2]].copy()
    with pytest.raises(ValueError, match="contains NaN or infinity"):
        spherical_kmeans(asarray(np.nan_to_num(x, posinf=0.0), backend), 3, 2, Random(0),
                         init=asarray(np.where(np.isfinite(x[[0, 7, 2]]), init, bad), backend))


def test_data_parallel_kmeans_refuses_non_finite_rows_on_every_worker():
    """A NaN on one worker makes every worker raise, none is left waiting at a collective."""
    x, _, _ = _blobs(6, 3, 5)
    halves = [x[:9].copy(), x[9:]]
    halves[1][4, 0] = np.nan
    workers = ThreadWorkers(2)

    def work(rank):
        # The error is returned, not raised: a raise aborts the thread barrier, which could
        # break the other worker's exit from the last collective before it sees the count.
        try:
            return spherical_kmeans(halves[rank], 3, 2, Random(7), allreduce=workers.allreduce(rank),
                                    broadcast=workers.broadcast(rank))
        except ValueError as exc:
            return exc

    for outcome in workers.run(work):
        assert isinstance(outcome, ValueError) and "NaN or infinity on some worker" in str(outcome)


def test_kmeans_statistics_summed_over_two_halves_equal_kmeans_on_the_whole():
    """The arithmetic that makes data-parallel k-means exact: summing the M-step statistics
    of two halves (written out here, by hand) equals k-means on the whole. The trainer's own
    all-reduce path is run on thread workers by the broadcast tests below."""
    x, _, _ = _blobs(20, 4, 6, seed=3)
    init = x[:4]
    c_full, a_full = spherical_kmeans(x, 4, 5, Random(0), init=init)
    halves = [x[: len(x) // 2], x[len(x) // 2 :]]
    # simulate two workers in lock-step: each allreduce sees both halves' partial sums
    cents = init
    for _ in range(5):
        parts = []
        for h in halves:
            a = np.argmax(h @ cents.T, axis=1)
            one_hot = (a[:, None] == np.arange(4)).astype(float)
            parts.append((one_hot.T @ h, one_hot.sum(0)))
        sums = parts[0][0] + parts[1][0]
        counts = parts[0][1] + parts[1][1]
        new = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        cents = np.where((counts > 0)[:, None], new, cents)
    np.testing.assert_allclose(c_full, cents, atol=1e-12)


def test_data_parallel_kmeans_starts_every_worker_from_rank_0s_centroids():
    """Two workers with different rows: the result is k-means on all rows started from the
    centroids rank 0 drew from its own rows (each worker drawing its own start, the summed
    statistics mixed unrelated clusters and the run ended elsewhere)."""
    x, _, _ = _blobs(12, 6, 8, seed=5, spread=0.3)
    halves = [x[: len(x) // 2], x[len(x) // 2 :]]
    k, iters = 6, 3

    workers = ThreadWorkers(2)

    def work(rank):
        return spherical_kmeans(halves[rank], k, iters, Random(7), allreduce=workers.allreduce(rank),
                                broadcast=workers.broadcast(rank))[0]

    centroids = workers.run(work)
    start = spherical_kmeans(halves[0], k, 0, Random(7))[0]  # rank 0's draw (0 iterations: the start)
    expected = spherical_kmeans(x, k, iters, Random(0), init=start)[0]
    np.testing.assert_allclose(centroids[0], expected, atol=1e-12)
    np.testing.assert_array_equal(centroids[0], centroids[1])


def test_data_parallel_kmeans_counts_a_cluster_whose_members_are_on_one_worker():
    """The cluster counts are summed over workers like the sums: otherwise the worker
    without members of cluster 2 kept its old centroid and the workers disagreed."""
    e = np.eye(3)
    x = e[[0, 0, 1, 1, 0, 1, 2, 2]] + 0.01 * np.random.default_rng(0).normal(size=(8, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    halves = [x[:4], x[4:]]  # cluster 2 lives on rank 1 only
    init = np.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.6, 0.0, 0.8]])
    init /= np.linalg.norm(init, axis=1, keepdims=True)
    workers = ThreadWorkers(2)
    got = workers.run(lambda rank: spherical_kmeans(halves[rank], 3, 3, Random(0), init=init,
                                                    allreduce=workers.allreduce(rank))[0])
    expected = spherical_kmeans(x, 3, 3, Random(0), init=init)[0]
    for centroids in got:
        np.testing.assert_allclose(centroids, expected, atol=1e-12)


def test_data_parallel_restarts_pick_the_same_run_on_every_worker():
    """The objective that ranks the restarts is summed over workers; each worker's own
    share picked different winners, and the workers' centroids parted ways."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(24, 3))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        halves = [x[:12], x[12:]]
        workers = ThreadWorkers(2)
        got = workers.run(lambda rank: spherical_kmeans(halves[rank], 4, 2, Random(seed), init="random", n_restarts=4,
                                                        allreduce=workers.allreduce(rank),
                                                        broadcast=workers.broadcast(rank))[0])
        np.testing.assert_array_equal(got[0], got[1], err_msg=f"seed {seed}")


def test_each_prototype_set_clusters_its_own_crops_bank():
    """Set h is clustered on bank h % n_banks (the embeddings of its assignment crop); using
    bank 0 for every set gave all sets the same clusters."""
    bank = MemoryBank(2, 4, 4, np, np.float64)
    e = np.eye(4)
    bank.write(0, np.arange(4), [e[[0, 0, 1, 1]], e[[2, 2, 3, 3]]])  # bank 0 on axes 0, 1; bank 1 on 2, 3
    centroids, _ = cluster_memory(bank, [2, 2], 3, Random(0), dataset_size=4)
    assert np.all(centroids[0][:, 2:] == 0) and np.all(centroids[1][:, :2] == 0)


def test_cluster_memory_targets_cover_the_bank(backend):
    x, labels, _ = _blobs(10, 3, 4, seed=1)
    bank = MemoryBank(2, 30, 4, backend, backend.float64)
    index = np.arange(30)[::-1].copy()  # bank rows hold dataset images in reverse order
    bank.write(0, index[:16], [asarray(x[:16], backend)] * 2)
    bank.write(16, index[16:28], [asarray(x[16:28], backend)] * 2)  # 2 images never written
    cents, targets = cluster_memory(bank, [3, 3], 5, Random(0), dataset_size=30)
    assert len(cents) == 2 and tuple(cents[0].shape) == (3, 4)
    t = to_numpy(targets[0])
    assert set(np.flatnonzero(t == IGNORE_INDEX)) == set(index[28:])
    assert bank.nbytes == 2 * 30 * 4 * 8


def test_memory_bank_state_roundtrip(backend):
    """The loaded bank owns copies: writing into the arrays it was loaded from (a later
    epoch's bank, a reused buffer) used to change it."""
    bank = MemoryBank(2, 6, 3, backend, backend.float64)
    bank.write(0, np.array([5, 4, 3]), [asarray(np.ones((3, 3)), backend)] * 2)
    other = MemoryBank(2, 6, 3, backend, backend.float64)
    state = {k: asarray(to_numpy(v).copy(), backend) if k == "embeddings" else v.copy()
             for k, v in bank.state_dict().items()}
    other.load_state_dict(state)
    state["embeddings"] *= 5.0
    state["index"][0] = 99
    np.testing.assert_array_equal(to_numpy(other.embeddings), to_numpy(bank.embeddings))
    np.testing.assert_array_equal(other.index, bank.index)
    with pytest.raises(ValueError, match="memory bank shape"):
        MemoryBank(2, 7, 3, backend, backend.float64).load_state_dict(bank.state_dict())


@pytest.mark.parametrize("key, value, match", [
    ("embeddings", "nan", "'embeddings' holds NaN or infinity"),
    ("embeddings", "inf", "'embeddings' holds NaN or infinity"),
    ("embeddings", np.ones((2, 6, 3), dtype=np.int32), "'embeddings' has dtype int32, not a floating dtype"),
    ("index", np.zeros(6), "'index' has dtype float64, not a signed integer dtype"),
    ("index", np.zeros(5, dtype=np.int64), r"'index' must hold 6 dataset indices .* got shape \(5,\)"),
    ("index", np.array([0, 1, -2, -1, -1, -1]), "'index' must hold 6 dataset indices .* smallest -2"),
    ("index", None, r"lacks \['index'\]"),
])
def test_memory_bank_refuses_bad_state_and_keeps_its_own(backend, key, value, match):
    """A NaN row used to load and win or lose every k-means argmax; integer embeddings
    and a float index were cast."""
    bank = MemoryBank(2, 6, 3, backend, backend.float32)
    bank.write(0, np.array([5, 4, 3]), [asarray(np.ones((3, 3)), backend, "float32")] * 2)
    state = {"embeddings": np.full((2, 6, 3), 0.5), "index": np.arange(6)}
    if isinstance(value, str):
        state["embeddings"][1, 2, 0] = {"nan": np.nan, "inf": -np.inf}[value]
    elif value is None:
        del state[key]
    else:
        state[key] = value
    with pytest.raises(CheckpointError, match=match):
        bank.load_state_dict(state)
    np.testing.assert_array_equal(bank.index, [5, 4, 3, -1, -1, -1])
    assert float(to_numpy(bank.embeddings).sum()) == 2 * 3 * 3


def test_deepcluster_loss_gradient_and_ignore(backend):
    rng = np.random.default_rng(0)
    n_crops, b = 3, 4
    scores = [asarray(rng.normal(size=(n_crops * b, k)), backend) for k in (5, 7)]
    targets = [asarray(np.array([0, 4, IGNORE_INDEX, 2]), backend), asarray(np.array([6, 1, 0, IGNORE_INDEX]), backend)]
    loss, grads = deepcluster_loss(scores, targets, n_crops, temperature=0.5)
    for s, g in zip(scores, grads):
        err = check_gradient(lambda: float(deepcluster_loss(scores, targets, n_crops, 0.5)[0]), s, g)
        assert err < 1e-6
    # an ignored image's rows get no gradient
    assert np.all(to_numpy(grads[0])[2::b] == 0)


def test_a_set_whose_images_are_all_ignored_adds_nothing(backend):
    """No image of the batch has a target in this set: the set adds 0 to the loss and
    its gradient is 0 (the mean over no rows was 0 / 0 = NaN)."""
    scores = [asarray(np.random.default_rng(0).normal(size=(4, 3)), backend)]
    loss, grads = deepcluster_loss(scores, [asarray(np.full(2, IGNORE_INDEX), backend)], n_crops=2)
    assert float(loss) == 0.0 and np.all(to_numpy(grads[0]) == 0)


def test_deepcluster_loss_defaults_to_swavs_temperature():
    """docs/deepcluster.md: the same softmax at temperature tau as SwAV (0.1)."""
    assert (inspect.signature(deepcluster_loss).parameters["temperature"].default
            == inspect.signature(swav_loss).parameters["temperature"].default == 0.1)


def test_deepcluster_loss_keeps_float32_and_checks_its_temperature(backend):
    rng = np.random.default_rng(0)
    scores = [asarray(rng.normal(size=(2 * 3, 5)), backend, "float32")]
    targets = [asarray(np.array([0, 4, IGNORE_INDEX]), backend)]
    loss, grads = deepcluster_loss(scores, targets, 2, temperature=np.float64(0.1))  # NumPy 2 would promote
    assert loss.dtype == grads[0].dtype == backend.float32
    with pytest.raises(ValueError, match="temperature must be positive, got 0.0"):
        deepcluster_loss(scores, targets, 2, temperature=0)


def test_deepcluster_loss_matches_torch():
    torch = required.module("torch")
    rng = np.random.default_rng(1)
    scores = [rng.normal(size=(2 * 5, 6))]
    targets = [np.array([0, 5, 2, IGNORE_INDEX, 1])]
    loss, grads = deepcluster_loss(scores, targets, 2, temperature=0.1)
    s = torch.tensor(scores[0], requires_grad=True)
    ref = torch.nn.functional.cross_entropy(s / 0.1, torch.tensor(np.tile(targets[0], 2)), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert abs(float(loss) - ref.item()) < 1e-10
    np.testing.assert_allclose(grads[0], s.grad.numpy(), atol=1e-12)
