"""DeepCluster-v2: the offline alternative that the SwAV paper compares against.

SwAV computes its targets *online*: codes for the current batch, by Sinkhorn, from scores
the network just produced. DeepCluster-v2 (re-implemented by SwAV's authors, 75.2% top-1
on ImageNet against SwAV's 75.3%) computes them *offline*:

1. during epoch ``e`` a **memory bank** keeps the embedding of every training image (one
   per assignment crop), written as the batches go by;
2. at the start of epoch ``e + 1``, **spherical k-means** clusters the whole bank (one run
   per prototype set, cycling through the assignment crops' banks); the prototypes are *set* to the
   centroids (they are never trained by gradient: frozen for ever);
3. the hard cluster of each image is its **target** for the epoch, and the loss is the
   cross-entropy of every crop's scores (divided by the temperature) against it.

The price of being offline is memory and a pass over the dataset: the bank grows with the
dataset (``n_assign_crops * N * d`` floats), and clustering costs ``O(N K d)`` per k-means
iteration every epoch. SwAV's state is independent of N. The trainer
(:mod:`swav_ref.train`) runs both methods with the same model, data and optimiser; only
the targets differ.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from swav_ref.backend import Random, array_namespace, host_dtype, logsumexp, python_float, to_numpy
from swav_ref.checkpoint import CheckpointError, entry_problem, finite_copy
from swav_ref.nn.functional import l2_normalize_forward

#: Target value of images that have no entry in the memory bank (dropped last batch).
IGNORE_INDEX = -100

Allreduce = Callable[[Any], Any]
Broadcast = Callable[[Any], Any]


def kmeans_plus_plus(x: Any, n_clusters: int, rng: Random) -> Any:
    r"""k-means++ seeding on the sphere: each new centroid is a row drawn with probability
    proportional to its squared distance :math:`\lVert x_n - c \rVert^2 = 2 - 2 x_n^\top c`
    to the nearest centroid chosen so far.

    Random rows (the official DeepCluster-v2 init) often put two centroids in one cluster,
    and Lloyd's iterations rarely move them apart.

    Parameters
    ----------
    x
        (N, d) unit-norm embeddings, all finite.
        (:func:`~swav_ref.deepcluster.spherical_kmeans` checks that; this one does not.)
    n_clusters
        K, at most N.
    rng
        its host generator (``rng.host()``) draws the first row and the K - 1 uniforms
        that pick every later one.

    Returns
    -------
    centroids : (K, d)
        copies of K rows of ``x`` (so unit norm), in the order they were drawn, on the
        backend of ``x``.

    Notes
    -----
    Each draw inverts the distances' cumulative distribution: with
    :math:`F_i = \sum_{n \le i} D_n / \sum_n D_n` and a uniform :math:`u \in [0, 1)`, the
    row is the number of :math:`F_i \le u`. A chosen row's :math:`D_n` is set to 0 (not
    left to rounding), so it can never be drawn again. This is the computation ``numpy.random.Generator.choice(N, p=D /
    sum D)`` makes, here on the device: the draws need no distance on the host (on a GPU,
    K waits for the device and K copies of N floats), and on NumPy they are the rows
    ``choice`` would draw.
    """
    xp = array_namespace(x)
    n = x.shape[0]
    gen = rng.host()
    # The first row, then all K - 1 uniforms in one transfer (the same stream as K - 1
    # calls of gen.random()); both are host arrays, never read back.
    first = xp.asarray(gen.integers(n, size=1))
    uniforms = xp.asarray(gen.random(n_clusters - 1), dtype=xp.float64)
    chosen = [first]
    rows = xp.arange(n, dtype=first.dtype)
    zero = xp.zeros((), dtype=x.dtype)
    zero64, one64, n64 = (xp.asarray(v, dtype=xp.float64) for v in (0.0, 1.0, n))
    # A chosen row's distance is set to exactly 0: in float32, x_n . x_n rounds to
    # 1 +- 6e-8, which left it a small chance of being drawn again.
    nearest = xp.where(rows == first, zero, 2.0 - 2.0 * (x @ xp.take(x, first, axis=0)[0, :]))
    for k in range(n_clusters - 1):
        # float64, so that on NumPy the draws are choice's; rounding can make a distance
        # slightly negative, which would be a negative probability.
        distance = xp.maximum(xp.astype(nearest, xp.float64), zero64)
        total = xp.sum(distance)
        # Every row already a centroid (all distances 0): draw uniformly instead.
        has_mass = total > 0
        distance, total = xp.where(has_mass, distance, one64), xp.where(has_mass, total, n64)
        cdf = xp.cumulative_sum(distance / total)
        cdf = cdf / cdf[-1]
        row = xp.searchsorted(cdf, uniforms[k:k + 1], side="right")
        chosen.append(row)
        nearest = xp.where(rows == row, zero, xp.minimum(nearest, 2.0 - 2.0 * (x @ xp.take(x, row, axis=0)[0, :])))
    return xp.take(x, xp.concat(chosen), axis=0)


def spherical_kmeans(x: Any, n_clusters: int, n_iters: int, rng: Random,
                     allreduce: Allreduce | None = None, init: Any = "k-means++",
                     n_restarts: int = 1, broadcast: Broadcast | None = None) -> tuple[Any, Any]:
    r"""k-means on the unit sphere: cosine similarity, centroids re-normalised.

    Parameters
    ----------
    x
        (N, d) unit-norm embeddings, all finite.
    n_clusters
        K, at most N.
    n_iters
        Lloyd iterations (the official code uses 10); 0 returns the initial
        centroids and the assignments to them.
    rng
        draws the initial centroids.
    allreduce
        sums an array over workers (data-parallel k-means); None = one process.
    init
        ``"k-means++"`` (default, :func:`kmeans_plus_plus`), ``"random"`` (K random rows,
        as the official code), or a (K, d) array of initial centroids.
    n_restarts
        runs from different seeds, at least 1; the one with the highest total
        cosine :math:`\sum_n \max_k x_n^\top c_k` wins (chosen on the device, no host sync).
    broadcast
        sends rank 0's array to every worker; data-parallel k-means needs it with
        ``allreduce``. Each worker draws its initial centroids from its own rows, so they
        must be replaced by rank 0's (as the official code broadcasts them): otherwise the
        all-reduced sums would add up the members of unrelated clusters.

    Returns
    -------
    centroids : (K, d)
        unit norm.
    assignments : (N,) int64
        the nearest centroid of each row after the last iteration.

    Notes
    -----
    E step: :math:`a_n = \arg\max_k x_n^\top c_k`. M step:
    :math:`c_k \leftarrow \mathrm{normalize}(\sum_{n: a_n = k} x_n)`; a cluster that
    lost all its members keeps its previous centroid. The sums are one matrix product with
    the one-hot assignment matrix, which is the Array API's way to scatter-add.
    """
    xp = array_namespace(x)
    _check_kmeans_arguments(x, n_clusters, n_iters, n_restarts, init)
    # One host sync per call for the finiteness check (k-means runs once per epoch, outside
    # the training step): a NaN row would otherwise win or lose every argmax silently. The
    # count is summed over workers so that every worker raises, none waits at a collective.
    bad = xp.sum(xp.astype(xp.logical_not(xp.isfinite(x)), x.dtype))
    if not isinstance(init, str):
        bad = bad + xp.sum(xp.astype(xp.logical_not(xp.isfinite(init)), x.dtype))
    if allreduce is not None:
        bad = allreduce(bad)
    if float(bad) > 0:
        raise ValueError("spherical_kmeans: x (or init) contains NaN or infinity"
                         + (" on some worker" if allreduce is not None else ""))
    best = None
    for _ in range(n_restarts):
        centroids = _initial_centroids(x, n_clusters, rng, init)
        if broadcast is not None:
            centroids = broadcast(centroids)
        centroids = _lloyd(x, centroids, n_iters, allreduce)
        similarity = x @ xp.matrix_transpose(centroids)
        objective = xp.sum(xp.max(similarity, axis=1))
        if allreduce is not None:
            objective = allreduce(objective)
        if best is None:
            best = (objective, centroids, xp.argmax(similarity, axis=1))
        else:
            better = objective > best[0]
            best = (xp.where(better, objective, best[0]), xp.where(better, centroids, best[1]),
                    xp.where(better, xp.argmax(similarity, axis=1), best[2]))
    return best[1], best[2]


def _check_kmeans_arguments(x: Any, n_clusters: Any, n_iters: Any, n_restarts: Any, init: Any) -> None:
    """Shapes and counts, checked before any work (and any collective) starts."""
    if len(x.shape) != 2:
        raise ValueError(f"spherical_kmeans: x must be 2-D (N, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    for name, value, lowest in (("n_clusters", n_clusters, 1), ("n_iters", n_iters, 0),
                                ("n_restarts", n_restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
            raise ValueError(f"spherical_kmeans: {name} must be an integer >= {lowest}, got {value!r}")
    if n_clusters > n:
        raise ValueError(f"spherical_kmeans: n_clusters={n_clusters} must be in 1..{n} (the number of points)")
    if not isinstance(init, str):
        if not hasattr(init, "shape"):
            raise ValueError(f"spherical_kmeans: init must be 'k-means++', 'random' or an array, got {init!r}")
        array_namespace(x, init)  # TypeError if init lives in another library
        if tuple(init.shape) != (n_clusters, d):
            raise ValueError(f"spherical_kmeans: init must have shape (n_clusters, d) = ({n_clusters}, {d}), "
                             f"got {tuple(init.shape)}")


def _initial_centroids(x: Any, n_clusters: int, rng: Random, init: Any) -> Any:
    xp = array_namespace(x)
    if isinstance(init, str) and init == "k-means++":
        return kmeans_plus_plus(x, n_clusters, rng)
    if isinstance(init, str) and init == "random":
        chosen = np.sort(rng.host().permutation(x.shape[0])[:n_clusters])
        return xp.take(x, xp.asarray(chosen), axis=0)
    if isinstance(init, str):
        raise ValueError(f"spherical_kmeans: unknown init {init!r}; use 'k-means++', 'random' or an array")
    return init


def _lloyd(x: Any, centroids: Any, n_iters: int, allreduce: Allreduce | None) -> Any:
    """``n_iters`` E and M steps from the given centroids."""
    xp = array_namespace(x)
    cluster_ids = xp.arange(centroids.shape[0])
    for _ in range(n_iters):
        assignments = xp.argmax(x @ xp.matrix_transpose(centroids), axis=1)
        one_hot = xp.astype(assignments[:, None] == cluster_ids[None, :], x.dtype)  # (N, K)
        sums = xp.matrix_transpose(one_hot) @ x  # (K, d)
        counts = xp.sum(one_hot, axis=0)  # (K,)
        if allreduce is not None:
            sums, counts = allreduce(sums), allreduce(counts)
        updated, _ = l2_normalize_forward(sums)
        centroids = xp.where((counts > 0)[:, None], updated, centroids)
    return centroids


class MemoryBank:
    """The embeddings of the last epoch, one bank per assignment crop.

    Parameters
    ----------
    n_banks
        number of assignment crops (2 with the default ``crops_for_assign``).
    size
        number of rows, the images seen per epoch (``steps_per_epoch * batch_size``).
    dim
        embedding dimension d.
    xp
        array namespace the bank lives on, the model's.
        So writing a batch's embeddings copies nothing between host and device.
    dtype
        floating dtype of the stored embeddings, the model's (e.g. ``xp.float32``).

    Attributes
    ----------
    embeddings
        (n_banks, size, d) on the backend.
    index : (size,) int64 host array
        the dataset index of each row (-1 = not written yet).
    """

    def __init__(self, n_banks: int, size: int, dim: int, xp: Any, dtype: Any):
        self.embeddings = xp.zeros((n_banks, size, dim), dtype=dtype)
        self.index = np.full(size, -1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Memory the bank holds on the device: grows linearly with the dataset."""
        n_banks, size, dim = self.embeddings.shape
        return n_banks * size * dim * host_dtype(self.embeddings.dtype).itemsize

    def write(self, start: int, dataset_index: np.ndarray, embeddings: Sequence[Any]) -> None:
        """Store a batch's embeddings (one (B, d) array per bank) at rows start..start+B,
        and ``dataset_index`` (B,), the dataset index of each of the batch's images."""
        stop = start + len(dataset_index)
        self.index[start:stop] = dataset_index
        for bank, emb in enumerate(embeddings):
            self.embeddings[bank, start:stop, :] = emb

    def state_dict(self) -> dict[str, Any]:
        """``{"embeddings": (n_banks, size, d), "index": (size,)}``, the arrays themselves."""
        return {"embeddings": self.embeddings, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (any backend's arrays, NumPy included).

        Raises :class:`~swav_ref.checkpoint.CheckpointError` (a ``ValueError``) naming the
        entry, and changes nothing, unless ``embeddings`` is an array of a floating dtype
        (integers would be cast silently) and of this bank's shape, finite once cast (one
        NaN row would win or lose every k-means argmax), and ``index`` a signed integer
        array of one entry per row, each a dataset index or -1 (not written). Not a hot
        path: one read-back for the finiteness.
        """
        missing = sorted({"embeddings", "index"} - set(state))
        if missing:
            raise CheckpointError(f"memory bank state lacks {missing}")
        emb, index = state["embeddings"], state["index"]
        # (the index is signed: -1 marks a row not written)
        for name, value, kind in (("embeddings", emb, "f"), ("index", index, "i")):
            problem = entry_problem(value, kind)
            if problem:
                raise CheckpointError(f"memory bank state '{name}' {problem}")
        if tuple(emb.shape) != tuple(self.embeddings.shape):
            raise CheckpointError(
                f"memory bank shape {tuple(emb.shape)} does not match "
                f"{tuple(self.embeddings.shape)} (dataset, batch size or crops changed)"
            )
        index = to_numpy(index)
        if index.shape != self.index.shape or np.any(index < -1):
            raise CheckpointError(f"memory bank state 'index' must hold {self.index.shape[0]} dataset indices "
                                  f"(or -1, not written), got shape {index.shape}, smallest "
                                  f"{index.min() if index.size else None}")
        self.embeddings = finite_copy(emb, array_namespace(self.embeddings), self.embeddings.dtype,
                                      "memory bank state 'embeddings'")
        self.index = index.astype(np.int64)  # (astype copies)


def cluster_memory(bank: MemoryBank, n_prototypes: Sequence[int], n_iters: int, rng: Random,
                   dataset_size: int, allreduce: Allreduce | None = None,
                   init: str = "k-means++", n_restarts: int = 1,
                   broadcast: Broadcast | None = None) -> tuple[list, list]:
    """Cluster the bank once per prototype set, cycling through the crops' banks.

    One :func:`~swav_ref.deepcluster.spherical_kmeans` run per set, to which ``n_iters``,
    ``rng``, ``allreduce``, ``init``, ``n_restarts`` and ``broadcast`` are passed unchanged
    (``allreduce`` and ``broadcast`` for several workers).

    Parameters
    ----------
    bank
        the :class:`~swav_ref.deepcluster.MemoryBank` written during the last epoch.
        Only its written rows (``index >= 0``) are clustered.
    n_prototypes
        K_h for each of the H prototype sets.
        Set h clusters bank ``h % n_banks``.
    n_iters
        Lloyd iterations per set.
    rng
        draws the initial centroids of every set, in turn.
    dataset_size
        N_data, the number of images in the dataset (not the bank's rows).
        The length of each ``targets`` array, which is indexed by dataset index.
    allreduce
        sums an array over workers; None = one process.
    init
        ``"k-means++"`` (default) or ``"random"``.
    n_restarts
        k-means runs per set, the best one kept.
    broadcast
        sends rank 0's array to every worker; needed with ``allreduce``.

    Returns
    -------
    centroids : list of (K_h, d) arrays
        the new prototypes of each set.
    targets : list of (dataset_size,) int64 arrays on the backend
        the cluster of every dataset image, :data:`IGNORE_INDEX` for images not in the bank.
    """
    xp = array_namespace(bank.embeddings)
    written = np.flatnonzero(bank.index >= 0)
    rows = xp.asarray(written)
    centroids_all, targets_all = [], []
    for h, k in enumerate(n_prototypes):
        emb = xp.take(bank.embeddings[h % bank.embeddings.shape[0], ...], rows, axis=0)
        centroids, assignments = spherical_kmeans(emb, k, n_iters, rng, allreduce=allreduce, init=init,
                                                   n_restarts=n_restarts, broadcast=broadcast)
        # targets[dataset index] = cluster. The Array API has no scatter, and a one-hot
        # product would cost N x N, so this once-per-epoch scatter is done on the host.
        # Data-parallel: each image sits in exactly one worker's bank, so a sum over workers
        # of (cluster + 1, or 0 where absent) is an all-gather of the assignments.
        plus_one = np.zeros(dataset_size, dtype=np.int64)
        plus_one[bank.index[written]] = to_numpy(assignments) + 1
        if allreduce is not None:
            plus_one = to_numpy(allreduce(plus_one))
        targets = np.where(plus_one > 0, plus_one - 1, IGNORE_INDEX)
        centroids_all.append(centroids)
        targets_all.append(xp.asarray(targets))
    return centroids_all, targets_all


def deepcluster_loss(scores: Sequence[Any], targets: Sequence[Any], n_crops: int,
                     temperature: float = 0.1) -> tuple[Any, list]:
    r"""Cross-entropy of every crop's scores against its image's cluster, per prototype set.

    Parameters
    ----------
    scores
        one (n_crops * B, K_h) array per prototype set, crops stacked as in SwAV.
    targets
        one (B,) int64 array per set (the batch images' clusters; IGNORE_INDEX rows
        do not count).
    n_crops
        V, the number of crops per image.
    temperature
        :math:`\tau > 0` (default 0.1, as SwAV's); ``ValueError`` otherwise.

    Returns
    -------
    loss : 0-d array
        :math:`\frac{1}{H} \sum_h \frac{1}{|R|} \sum_{r \in R}
        -\log \mathrm{softmax}(s_r / \tau)_{y_r}` over the valid rows R.
    grads : list
        d loss / d scores, one per set:
        :math:`(\mathrm{softmax}(s_r/\tau) - \mathrm{onehot}(y_r)) / (\tau H |R|)`.

    Notes
    -----
    A set whose rows are all IGNORE_INDEX (a whole batch missing from last epoch's bank,
    rare) adds 0 to the loss and the gradient, where PyTorch's ``CrossEntropyLoss`` in the
    official code returns NaN.
    """
    xp = array_namespace(*scores)
    temperature = python_float(temperature, "deepcluster_loss: temperature")
    if temperature <= 0:
        raise ValueError(f"deepcluster_loss: temperature must be positive, got {temperature}")
    n_sets = len(scores)
    loss = xp.zeros((), dtype=scores[0].dtype)
    grads = []
    for s, y in zip(scores, targets):
        k = s.shape[1]
        y_all = xp.concat([y] * n_crops)  # every crop of image n has target y_n
        valid = xp.astype(y_all != IGNORE_INDEX, s.dtype)
        n_valid = xp.maximum(xp.sum(valid), 1.0)
        logits = s / temperature
        log_p = logits - logsumexp(logits, axis=1, keepdims=True)
        one_hot = xp.astype(y_all[:, None] == xp.arange(k)[None, :], s.dtype)
        loss = loss - xp.sum(valid * xp.sum(one_hot * log_p, axis=1)) / (n_valid * n_sets)
        grads.append((xp.exp(log_p) - one_hot) * (valid / (temperature * n_valid * n_sets))[:, None])
    return loss, grads
