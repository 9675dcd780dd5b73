"""How good are frozen features? A linear probe and a kNN classifier, sized for small data.

Self-supervised features are judged with the network frozen: a simple classifier is fitted
on top of them and its test accuracy is the score. Two classifiers are standard:

:func:`linear_probe`
    multinomial logistic regression on standardised features (the SwAV paper's "linear
    evaluation"), its regularisation chosen by cross-validation on the train split only.
:func:`knn_classifier`
    weighted k-nearest neighbours on cosine similarity, the protocol of Wu et al. (2018),
    later used by DINO. No training at all, so it measures the geometry of the features.

Both take features as arrays, so any network (or none, :func:`raw_pixel_features`) can be
compared with the same code; :func:`extract_features` runs a model over uint8 images to get
them. :mod:`swav_ref.results` puts the numbers of several methods (and seeds) side by side::

    row = {"method": "SwAV", **evaluate_features(f_train, y_train, f_test, y_test)}
    print(format_results(results_table([raw_row, random_row, row])))

The kNN runs on the features' backend (NumPy, CuPy); the linear probe runs in scikit-learn on
the host, which is the evaluation boundary where a copy to the host is expected.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from swav_ref.backend import array_namespace, asarray, is_numpy, python_float, python_int, to_numpy
from swav_ref.nn.functional import SCRATCH, l2_normalize_forward

__all__ = [
    "DEFAULT_C_GRID",
    "METRICS",
    "KNNResult",
    "LinearProbeResult",
    "evaluate_features",
    "extract_features",
    "knn_classifier",
    "knn_predict",
    "linear_probe",
    "nearest_neighbours",
    "raw_pixel_features",
]

#: The results table's names, which moved to :mod:`swav_ref.results`.
_MOVED_TO_RESULTS = ("Rows", "format_results", "machine_description", "results_table", "save_results_json")


def __getattr__(name: str) -> Any:
    """The results table moved to :mod:`swav_ref.results`: its old names here still work, with a
    DeprecationWarning, so that code written for earlier versions keeps running."""
    if name in _MOVED_TO_RESULTS:
        warnings.warn(f"swav_ref.evaluate.{name} is now swav_ref.results.{name}", DeprecationWarning, stacklevel=2)
        from swav_ref import results  # (imported here: results imports this module)

        return getattr(results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Regularisation strengths tried by the linear probe's cross-validation (inverse L2 weight).
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)

#: The linear probe repeats its cross-validation with other folds (at most 3 times) until each
#: candidate C is judged on about this many held-out predictions. Repeating averages out the
#: luck of which images share a fold (it cannot make a small train split larger); past a few
#: thousand predictions that luck is small, so a large data set is not repeated.
CV_PREDICTIONS = 5000

#: The standard columns of a results table, in display order.
METRICS = ("linear probe", "kNN k=20", "kNN k=200")

#: Elements of the (test chunk x train) similarity matrix held at once by the kNN (~32 MB f64).
_KNN_CHUNK_ELEMENTS = 2**22


# ------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------
def _check_features_and_labels(features: Any, labels: Any, split: str) -> None:
    if len(features.shape) != 2:
        raise ValueError(f"{split} features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if len(labels.shape) != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{split} labels must be 1-D with one label per row of the features "
            f"{tuple(features.shape)}, got shape {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"the {split} split is empty")


def _check_same_width(train_features: Any, test_features: Any) -> None:
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in width: {train_features.shape[1]} vs "
            f"{test_features.shape[1]}"
        )


def _labels_on(labels: Any, xp: Any) -> Any:
    """Labels as int64 on the namespace ``xp`` (they often arrive as host NumPy arrays)."""
    if not isinstance(labels, (np.ndarray, list, tuple)) and array_namespace(labels) is xp:
        if not xp.isdtype(labels.dtype, "integral"):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        return xp.astype(labels, xp.int64)  # already on the backend: no host round trip
    host = np.asarray(to_numpy(labels))
    if host.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {host.dtype}")
    return asarray(host.astype(np.int64, copy=False), xp)


def _numbered_if_not_integers(train_labels: Any, test_labels: Any) -> tuple[Any, Any]:
    """Host labels that are not integers (class names) as indices into their sorted joint
    set; anything else as it is (integers, device arrays: :func:`_labels_on` checks them)."""
    host = [np.asarray(y) if isinstance(y, (np.ndarray, list, tuple)) else None for y in (train_labels, test_labels)]
    # Integers, fractions (1.7 or NaN is no class) and a mix of integers and names (0 is
    # not "0") are left to the integer check, which says what is wrong.
    if any(y is None or y.dtype.kind in "iufc" for y in host):
        return train_labels, test_labels
    try:
        _, numbered = np.unique(np.concatenate([host[0].ravel(), host[1].ravel()]), return_inverse=True)
    except TypeError as exc:  # None beside text, say
        raise ValueError(f"labels must be integers or class names of one kind: {exc}") from exc
    return numbered[:host[0].size].reshape(host[0].shape), numbered[host[0].size:].reshape(host[1].shape)


# ------------------------------------------------------------------------------------------
# linear probe
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe`; ``float(result)`` is the test accuracy.

    Attributes
    ----------
    accuracy
        top-1 accuracy on the test split, in [0, 1].
    C
        the inverse regularisation strength used for the final fit.
    cv_accuracy
        mean cross-validation accuracy on the train split for each C tried
        (empty when C was fixed by the caller).
    n_folds
        number of cross-validation folds (0 when C was fixed).
    n_repeats
        how many times the cross-validation was repeated with other folds (0 when C
        was fixed).
    converged
        whether L-BFGS converged within ``max_iter`` in the final fit.
    """

    accuracy: float
    C: float
    cv_accuracy: dict[float, float] = field(default_factory=dict)
    n_folds: int = 0
    converged: bool = True
    n_repeats: int = 0

    def summary(self) -> dict[str, Any]:
        """The probe's choices as plain JSON values: what a results file keeps beside the
        accuracy, so that a different number can be traced to a different C."""
        return {"C": self.C, "cv_folds": self.n_folds, "cv_repeats": self.n_repeats,
                "converged": self.converged}

    def __float__(self) -> float:
        return self.accuracy


def _probe_pipeline(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # The scaler sits inside the pipeline so that, in cross-validation, each fold is
    # standardised with statistics of its own training part only.
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    cv_folds: int = 5,
    cv_repeats: int | None = None,
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbeResult:
    r"""Top-1 accuracy of a linear classifier trained on frozen features.

    Parameters
    ----------
    train_features
        (N_train, D) array of any backend (copied to the host).
    train_labels
        (N_train,) class labels: integers, or host values of another kind
        (class names), as scikit-learn takes them.
    test_features
        (N_test, D) array.
    test_labels
        (N_test,) class labels, of the kind of ``train_labels``.
    C : float, optional
        A fixed inverse regularisation strength. If ``None`` (default) it is chosen from
        ``C_grid`` by stratified ``cv_folds``-fold cross-validation on the train split,
        repeated ``cv_repeats`` times with other folds.
    C_grid
        the candidates for C (default :data:`DEFAULT_C_GRID`, 1e-3 ... 10).
    cv_folds
        number of folds, at least 2 (default 5; reduced to the size of the smallest
        class).
    cv_repeats
        how many times to repeat the cross-validation. Default: enough repeats for
        about ``CV_PREDICTIONS`` (5000) held-out predictions per candidate, at most 3 (3 on the
        1438 training digits, 1 on CIFAR-10's 50000 images).
    max_iter
        L-BFGS iteration limit per fit.
    seed
        shuffles the folds.

    Returns
    -------
    LinearProbeResult
        test accuracy, the chosen C and the cross-validation accuracy of each candidate.

    Notes
    -----
    Features are standardised with the mean and standard deviation of the train split, then a
    multinomial logistic regression (L-BFGS) minimises

    .. math:: \frac{1}{2}\lVert W \rVert_F^2
              - C \sum_{i} \log \operatorname{softmax}(W x_i + b)_{y_i}

    This replaces the paper's ImageNet protocol (SGD on a linear layer for 100 epochs, on
    random-resized crops, scored on centre crops), which needs far more data than a laptop
    experiment has. (The official ``eval_linear.py`` reports the best validation accuracy
    over its 100 epochs, a choice made on the test data.) The test split is used exactly once,
    to score the final model: choosing C on it would report an optimistic accuracy. Ties in
    the cross-validation accuracy go to the smaller C (the stronger regularisation).

    Why repeat: on a small train split one set of folds is a noisy judge. For one SwAV model
    of the digits, 3-fold cross-validation picked C = 0.1, 1 or 10 depending only on
    ``seed``, which moved the test accuracy by 0.56 points; three repeats of 5 folds picked
    C = 1 for six seeds out of six. Candidates can still trade places when their
    cross-validation accuracies are within noise: on the digits' raw pixels C = 1 for seeds 0
    and 1 and 0.1 for seed 2 (0.56 points, two test images, apart); the supervised network,
    whose features separate the training classes at almost any C, took 10, 0.001 and 0.1 at
    30 epochs and 0.1, 0.1 and 0.01 at 60 (0.001 is the grid's edge: a still smaller C
    might do as well). A table's spread over seeds includes this choice.
    """
    x_train = np.asarray(to_numpy(train_features), dtype=np.float64)
    x_test = np.asarray(to_numpy(test_features), dtype=np.float64)
    y_train = to_numpy(train_labels)
    y_test = to_numpy(test_labels)
    _check_features_and_labels(x_train, y_train, "train")
    _check_features_and_labels(x_test, y_test, "test")
    _check_same_width(x_train, x_test)
    for name, x in (("train", x_train), ("test", x_test)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} features contain NaN or infinity")
    classes, counts = np.unique(y_train, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"the train split has {classes.size} class; a classifier needs 2 or more")

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    cv_accuracy: dict[float, float] = {}
    n_folds = 0
    with warnings.catch_warnings():
        # Non-convergence is reported in the result (``converged``) instead.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if C is None:
            if len(C_grid) == 0:
                raise ValueError("C_grid is empty; give candidates or a fixed C")
            # Checked before the data: otherwise cv_folds=1 is blamed on the smallest class.
            n_folds = min(python_int(cv_folds, "cv_folds", minimum=2), int(counts.min()))
            if n_folds < 2:
                raise ValueError(
                    f"the smallest class in the train split has {int(counts.min())} example(s); "
                    "cross-validation needs at least 2 per class: pass a fixed C instead"
                )
            if cv_repeats is None:
                cv_repeats = min(3, math.ceil(CV_PREDICTIONS / len(y_train)))
            if int(cv_repeats) != cv_repeats or cv_repeats < 1:
                raise ValueError(f"cv_repeats must be a positive integer, got {cv_repeats!r}")
            folds = RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=int(cv_repeats), random_state=seed)
            for c in sorted(float(c) for c in C_grid):
                scores = cross_val_score(_probe_pipeline(c, max_iter), x_train, y_train, cv=folds)
                cv_accuracy[c] = float(np.mean(scores))
            # max() keeps the first maximum: with the grid ascending, ties go to the smaller C.
            C = max(cv_accuracy, key=cv_accuracy.__getitem__)
        elif not C > 0:
            raise ValueError(f"C must be positive, got {C}")
        model = _probe_pipeline(float(C), max_iter).fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    converged = bool(np.all(model[-1].n_iter_ < max_iter))
    n_repeats = int(cv_repeats) if n_folds else 0
    return LinearProbeResult(accuracy, float(C), cv_accuracy, n_folds, converged, n_repeats)


# ------------------------------------------------------------------------------------------
# weighted k-nearest neighbours
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KNNResult:
    """Outcome of :func:`knn_classifier`; ``float(result)`` is the test accuracy.

    ``k`` is the number of neighbours actually used: ``k_requested`` clipped to the size of
    the train split, which :attr:`note` reports.
    """

    accuracy: float
    k: int
    k_requested: int
    temperature: float

    @property
    def clipped(self) -> bool:
        """Whether ``k_requested`` was more than the train split holds."""
        return self.k < self.k_requested

    @property
    def note(self) -> str:
        """``"k=200 clipped to 150, the size of the train split"`` when clipped, else ``""``."""
        if not self.clipped:
            return ""
        return f"k={self.k_requested} clipped to {self.k}, the size of the train split"

    def __float__(self) -> float:
        return self.accuracy


def knn_predict(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    n_classes: int | None = None,
    chunk_size: int | None = None,
) -> Any:
    r"""Predicted class of each test point by a similarity-weighted vote of its k neighbours.

    Parameters
    ----------
    train_features
        (N_train, D) finite array; any backend.
    train_labels
        (N_train,) integer labels in ``[0, n_classes)`` (host or backend array).
    test_features
        (N_test, D) finite array of the same backend as ``train_features``;
        N_test may be 0 (an empty prediction: nothing to predict is not an error, unlike
        an empty split in :func:`knn_classifier`, whose accuracy would be undefined).
    k
        neighbours per test point; clipped to ``N_train``.
    temperature
        T in the vote weights :math:`e^{s/T}`.
    n_classes
        number of classes; default ``max(train_labels) + 1``.
    chunk_size
        positive number of test points handled at once (default: enough to hold
        about 4M similarities), which bounds memory at
        ``chunk_size * max(N_train, k * n_classes)`` elements.

    Returns
    -------
    (N_test,) int64 array in the features' namespace (empty when N_test is 0).

    Notes
    -----
    With rows L2-normalised, :math:`s_{ij} = \hat x_i^\top \hat t_j` is a cosine. For test
    point :math:`j` with neighbour set :math:`\mathcal N_k(j)` (the k largest :math:`s_{ij}`),
    the score of class :math:`c` and the prediction are

    .. math:: w_c(j) = \sum_{i \in \mathcal N_k(j)} e^{s_{ij}/T}\,[y_i = c], \qquad
              \hat y_j = \arg\max_c w_c(j)

    Each row's largest similarity is subtracted before the exponential; this scales all of
    the row's weights by one positive factor, so the vote is unchanged while ``exp`` can no
    longer overflow at small T. Among training points equally similar at the k-th place
    (duplicate images) the earlier ones are the neighbours, on every backend: see
    :func:`nearest_neighbours`.
    """
    xp = array_namespace(train_features, test_features)
    labels = _labels_on(train_labels, xp)
    _check_features_and_labels(train_features, labels, "train")
    if len(test_features.shape) != 2:
        raise ValueError(
            f"test features must be 2-D (N, D), got shape {tuple(test_features.shape)}"
        )
    _check_same_width(train_features, test_features)
    k = python_int(k, "k")
    if chunk_size is not None:
        chunk_size = python_int(chunk_size, "chunk_size")
    temperature = python_float(temperature, "knn_predict: temperature")
    if not temperature > 0:
        raise ValueError(f"knn_predict: temperature must be positive, got {temperature}")
    # One host read, outside the loop: the label range sizes the vote, and the features must
    # be finite (a NaN similarity sorts anywhere, so NaN features gave a plausible-looking
    # accuracy instead of an error).
    summary = xp.stack([xp.min(labels), xp.max(labels),
                        xp.astype(xp.all(xp.isfinite(train_features)), xp.int64),
                        xp.astype(xp.all(xp.isfinite(test_features)), xp.int64)])
    lowest, highest, train_finite, test_finite = (int(v) for v in to_numpy(summary))
    if lowest < 0:
        raise ValueError(f"labels must be non-negative, found {lowest}")
    if n_classes is None:
        n_classes = highest + 1
    elif highest >= n_classes:
        raise ValueError(f"found label {highest} but n_classes={n_classes}")
    for name, finite in (("train", train_finite), ("test", test_finite)):
        if not finite:
            raise ValueError(f"{name} features contain NaN or infinity")

    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_test == 0:
        return xp.zeros((0,), dtype=xp.int64)
    k = min(k, n_train)
    if chunk_size is None:
        chunk_size = max(1, _KNN_CHUNK_ELEMENTS // max(n_train, k * n_classes))
    train, _ = l2_normalize_forward(train_features)
    test, _ = l2_normalize_forward(test_features)
    train_t = xp.matrix_transpose(train)
    classes = xp.arange(n_classes, dtype=labels.dtype)

    predictions = []
    for start in range(0, n_test, chunk_size):
        stop = min(start + chunk_size, n_test)  # the standard leaves out-of-range stops undefined
        similarity = test[start:stop, :] @ train_t  # (b, N_train)
        nearest = nearest_neighbours(similarity, k)  # (b, k), most similar first
        top_similarity = xp.take_along_axis(similarity, nearest, axis=1)
        weights = xp.exp((top_similarity - top_similarity[:, :1]) / temperature)
        top_labels = xp.reshape(xp.take(labels, xp.reshape(nearest, (-1,))), nearest.shape)
        one_hot = xp.astype(top_labels[:, :, None] == classes, weights.dtype)  # (b, k, C)
        class_scores = xp.sum(weights[:, :, None] * one_hot, axis=1)  # (b, C)
        predictions.append(xp.argmax(class_scores, axis=1))
    return xp.concat(predictions, axis=0)


def nearest_neighbours(similarity: Any, k: int) -> Any:
    r"""The columns of each row's k largest similarities, most similar first, ties by index.

    ``similarity`` is ``(b, N)`` and finite, ``1 <= k <= N``; returns ``(b, k)`` integers.
    Equal values keep their index order, at the k-th place too, so every backend picks the
    same neighbours. The Array API's sort is stable (so is CuPy's, its only sort): there
    this is a full sort of each row, :math:`O(N \log N)`. NumPy's default sort orders ties
    arbitrarily, so on NumPy the k-th largest value is found by a partition, :math:`O(N)`,
    and only the k chosen are sorted (``benchmarks/bench_knn.py``: 2.5x faster than the
    full sort at 50,000 training points).
    """
    xp = array_namespace(similarity)
    if similarity.ndim != 2 or not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"nearest_neighbours: needs (b, N) similarities and 1 <= k <= N, got shape "
                         f"{tuple(similarity.shape)} and k={k}")
    if not is_numpy(xp):
        return xp.argsort(-similarity, axis=1)[:, :k]  # stable: the standard's default
    kth_largest = -np.partition(-similarity, k - 1, axis=1)[:, k - 1 : k]  # (b, 1)
    above = similarity > kth_largest
    tied = similarity == kth_largest
    room_for_ties = k - np.sum(above, axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room_for_ties))  # k per row
    columns = np.nonzero(chosen)[1].reshape(similarity.shape[0], k)  # in index order
    order = np.argsort(-np.take_along_axis(similarity, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def knn_classifier(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    n_classes: int | None = None,
    chunk_size: int | None = None,
) -> KNNResult:
    """Top-1 test accuracy of the weighted kNN vote of :func:`knn_predict`.

    The weighted kNN of Wu et al. (2018), k=200 and T=0.07, which DINO reports at k=20 as
    well (SwAV's own baseline included); on a small train split
    k is clipped to its size and the result's ``note`` says so. Runs on the features'
    backend; only the final accuracy comes back to the host.

    Labels are integers (on the host or the backend), or host values of another kind
    (strings, say), which are numbered jointly first, as the linear probe takes them.

    Parameters
    ----------
    train_features
        (N_train, D) features of the training split, the candidate neighbours; any backend.
    train_labels
        (N_train,) labels of the training split.
    test_features
        (N_test, D) features of the test split, on the backend of ``train_features``.
    test_labels
        (N_test,) labels the predictions are scored against; N_test is at least 1.
    k
        neighbours per test point (clipped to ``N_train``).
    temperature
        T in the vote weights, as in :func:`knn_predict`.
    n_classes
        number of classes, passed to :func:`knn_predict`.
    chunk_size
        test points handled at once, passed to :func:`knn_predict`.

    Returns
    -------
    KNNResult
    """
    xp = array_namespace(train_features, test_features)
    train_labels, test_labels = _numbered_if_not_integers(train_labels, test_labels)
    y_test = _labels_on(test_labels, xp)
    _check_features_and_labels(test_features, y_test, "test")
    predicted = knn_predict(
        train_features, train_labels, test_features,
        k=k, temperature=temperature, n_classes=n_classes, chunk_size=chunk_size,
    )
    accuracy = float(xp.mean(xp.astype(predicted == y_test, xp.float64)))
    return KNNResult(accuracy, min(k, train_features.shape[0]), k, temperature)


def evaluate_features(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    ks: Iterable[int] = (20, 200),
    temperature: float = 0.07,
    C: float | None = None,
    seed: int = 0,
) -> dict[str, LinearProbeResult | KNNResult]:
    """Linear probe and kNN for each k, keyed by the column names of
    :func:`~swav_ref.results.results_table`.

    Returns ``{"linear probe": LinearProbeResult, "kNN k=20": KNNResult, ...}``; add a
    ``"method"`` key to make it a row of :func:`~swav_ref.results.results_table`.
    """
    out: dict[str, LinearProbeResult | KNNResult] = {
        "linear probe": linear_probe(
            train_features, train_labels, test_features, test_labels, C=C, seed=seed
        )
    }
    for k in ks:
        out[f"kNN k={k}"] = knn_classifier(
            train_features, train_labels, test_features, test_labels, k=k, temperature=temperature
        )
    return out


# ------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------
def _is_uint8(x: Any) -> bool:
    return x.dtype == array_namespace(x).uint8


def raw_pixel_features(images_uint8: Any, dtype: Any = None) -> Any:
    """The raw-pixels baseline: each image flattened and scaled to [0, 1].

    Parameters
    ----------
    images_uint8
        (N, C, H, W) (or (N, H, W)) uint8 array of any backend.
    dtype
        output floating dtype (a dtype of that backend or a name); default float32.

    Returns
    -------
    (N, C*H*W) array in the input's namespace.
    """
    xp = array_namespace(images_uint8)
    if not _is_uint8(images_uint8):
        raise ValueError(f"images must be uint8, got dtype {images_uint8.dtype}")
    if len(images_uint8.shape) < 2:
        raise ValueError(f"images must be (N, ...) with N first, got shape {images_uint8.shape}")
    if dtype is None:
        dtype = xp.float32
    elif isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    n = images_uint8.shape[0]
    return xp.reshape(xp.astype(images_uint8, dtype), (n, -1)) / 255.0


def extract_features(
    model: Any,
    images_uint8: Any,
    *,
    xp: Any,
    dtype: Any = "float32",
    normalize: tuple[Sequence[float], Sequence[float]] | None,
    batch_size: int = 512,
) -> Any:
    r"""Run a frozen ``model`` over uint8 images, batch by batch, on the backend ``xp``.

    Parameters
    ----------
    model
        any object with ``eval()``, ``train()``, ``training`` and
        ``forward(x: (B, C, H, W)) -> (B, D)``. It is put in eval mode (BatchNorm uses its
        running statistics) and returned to its previous mode afterwards, even on error.
    images_uint8
        (N, C, H, W) uint8 array, on the host or on the backend.
    xp
        the backend namespace the model runs on.
    dtype
        floating dtype of the network input (name or dtype of ``xp``).
    normalize
        ``(mean, std)``, per-channel sequences of length C applied to the [0, 1]
        pixels: those the model was trained with, or its features are not those it learned
        to give. Required, so that it is never left out by accident; ``None`` gives the
        [0, 1] pixels themselves. :meth:`Encoder.features
        <swav_ref.encoder.Encoder.features>` and :meth:`Trainer.features
        <swav_ref.train.Trainer.features>` pass their own.
    batch_size
        images per forward pass (bounds device memory).

    Returns
    -------
    (N, D) features on ``xp``.

    Notes
    -----
    Pixels are mapped as :math:`x = (u / 255 - \mu_c) / \sigma_c` with ``normalize =
    (mu, sigma)``, the training's input transform. Only one batch at a time is moved to the device, and the convolutions'
    column buffers of this batch size are let go at the end (``nn.functional.SCRATCH``).
    """
    if len(images_uint8.shape) != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images_uint8.shape)}")
    if not _is_uint8(images_uint8):
        raise ValueError(f"images must be uint8, got dtype {images_uint8.dtype}")
    n, channels = images_uint8.shape[0], images_uint8.shape[1]
    if n == 0:
        raise ValueError("no images to extract features from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    mean = std = None
    if normalize is not None:
        mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in normalize)
        if mean.size != channels or std.size != channels:
            raise ValueError(
                f"normalize needs {channels} per-channel means and stds, "
                f"got {mean.size} and {std.size}"
            )
        if np.any(std <= 0):
            raise ValueError(f"normalize std must be positive, got {std.tolist()}")
        mean = asarray(mean.reshape(1, channels, 1, 1), xp, dtype)
        std = asarray(std.reshape(1, channels, 1, 1), xp, dtype)

    was_training = model.training
    model.eval()
    try:
        features = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)  # in range: the standard needs that
            batch = asarray(images_uint8[start:stop, ...], xp)
            x = xp.astype(batch, dtype) / 255.0
            if mean is not None:
                x = (x - mean) / std
            out = model.forward(x)
            if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
                raise ValueError(
                    f"model.forward must return (B, D) features, got shape {tuple(out.shape)} "
                    f"for a batch of {x.shape[0]}"
                )
            features.append(out)
        return xp.concat(features, axis=0)
    finally:
        SCRATCH.clear()  # the column buffers of this batch size: not needed once done
        if was_training:
            model.train()
