"""Frozen-feature evaluation: weighted kNN, linear probe, baselines and the results table."""

from __future__ import annotations

import datetime
import inspect
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swav_ref import backend as B
from swav_ref import evaluate as E
from swav_ref import results as R


def _knn_reference(train, y_train, test, k, temperature, n_classes):
    """Brute force, one test point at a time, straight from the definition."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = []
    for t in test:
        similarity = train @ t
        votes = np.zeros(n_classes)
        for i in np.argsort(-similarity)[:k]:
            votes[y_train[i]] += np.exp(similarity[i] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def _blobs(rng, n_per_class, n_classes=3, dim=5, spread=0.3):
    centres = rng.normal(size=(n_classes, dim)) * 4.0
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    order = rng.permutation(labels.size)
    return features[order], labels[order]


# ------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (60, 0.07)])
def test_knn_matches_brute_force(backend, rng, k, temperature):
    train, test = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    y_train = rng.integers(0, 4, size=60)
    expected = _knn_reference(train, y_train, test, k, temperature, 4)
    got = E.knn_predict(
        B.asarray(train, backend), B.asarray(y_train, backend), B.asarray(test, backend),
        k=k, temperature=temperature, chunk_size=7,  # several chunks, the last one short
    )
    assert B.array_namespace(got) is backend
    np.testing.assert_array_equal(B.to_numpy(got), expected)


def test_knn_k1_matches_scikit_learn_cosine(rng):
    from sklearn.neighbors import KNeighborsClassifier

    train, test = rng.normal(size=(80, 6)), rng.normal(size=(40, 6))
    y_train = rng.integers(0, 5, size=80)
    oracle = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
    expected = oracle.fit(train, y_train).predict(test)
    np.testing.assert_array_equal(E.knn_predict(train, y_train, test, k=1), expected)


def test_knn_accuracy_and_chunking(backend, rng):
    x, y = _blobs(rng, 30)
    train, test = B.asarray(x[:60], backend), B.asarray(x[60:], backend)
    result = E.knn_classifier(train, y[:60], test, y[60:], k=20)
    assert isinstance(result, E.KNNResult) and result.accuracy == pytest.approx(1.0)
    assert float(result) == result.accuracy and not result.clipped and result.note == ""
    # random labels: same geometry, chance-level accuracy
    y_random = np.random.default_rng(5).integers(0, 3, size=y.size)
    noise = E.knn_classifier(train, y_random[:60], test, y_random[60:], k=20)
    assert noise.accuracy < 0.8
    one_by_one = E.knn_predict(train, y[:60], test, k=20, chunk_size=1)
    all_at_once = E.knn_predict(train, y[:60], test, k=20, chunk_size=1000)
    np.testing.assert_array_equal(B.to_numpy(one_by_one), B.to_numpy(all_at_once))


def test_knn_weights_decide_between_near_and_many():
    # One very close class-0 neighbour against two farther class-1 neighbours.
    train = np.array([[1.0, 0.02], [1.0, 0.6], [1.0, -0.6]])
    y_train = np.array([0, 1, 1])
    test = np.array([[1.0, 0.0]])
    sharp = E.knn_predict(train, y_train, test, k=3, temperature=0.01)
    flat = E.knn_predict(train, y_train, test, k=3, temperature=100.0)  # nearly a plain vote
    assert int(sharp[0]) == 0 and int(flat[0]) == 1


def test_knn_breaks_ties_at_the_kth_place_by_index(backend):
    """Training points equally similar at the k-th place (duplicates): the earlier ones are
    the neighbours, on every backend (NumPy's default sort orders ties arbitrarily)."""
    rng = np.random.default_rng(0)
    directions = rng.integers(0, 3, size=1000)  # 1000 training points, 3 distinct images
    train = np.eye(3)[directions]
    first_twenty_of_image_0 = np.flatnonzero(directions == 0)[:20]
    y_train = np.ones(1000, dtype=np.int64)
    y_train[first_twenty_of_image_0] = 0  # the rest of image 0's ~330 copies say class 1
    predicted = E.knn_predict(B.asarray(train, backend), B.asarray(y_train, backend),
                              B.asarray(np.eye(3)[:1], backend), k=20)
    assert B.to_numpy(predicted).tolist() == [0]


@pytest.mark.parametrize("seed", range(5))
def test_nearest_neighbours_are_a_stable_sort_of_the_similarities(backend, seed):
    """Many ties (a few distinct values), k anywhere from 1 to N: the k columns of a stable
    descending sort, in its order."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        b, n = int(rng.integers(1, 6)), int(rng.integers(1, 200))
        k = int(rng.integers(1, n + 1))
        similarity = rng.integers(0, int(rng.integers(1, 6)), size=(b, n)).astype(np.float32)
        expected = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        got = E.nearest_neighbours(B.asarray(similarity, backend), k)
        np.testing.assert_array_equal(B.to_numpy(got), expected, err_msg=f"b={b} n={n} k={k}")


def test_nearest_neighbours_refuses_a_k_out_of_range():
    for k in (0, 4):  # once "operands could not be broadcast" and a quiet result
        with pytest.raises(ValueError, match=f"1 <= k <= N, got shape \\(2, 3\\) and k={k}"):
            E.nearest_neighbours(np.ones((2, 3)), k)


def test_knn_small_temperature_does_not_overflow(backend, rng):
    train = B.asarray(rng.normal(size=(30, 4)), backend, dtype="float32")
    test = B.asarray(rng.normal(size=(10, 4)), backend, dtype="float32")
    y = rng.integers(0, 3, size=30)
    got = E.knn_predict(train, y, test, k=10, temperature=1e-3)  # exp(1/1e-3) would be inf
    expected = _knn_reference(B.to_numpy(train).astype(np.float64), y, B.to_numpy(test), 1, 1.0, 3)
    np.testing.assert_array_equal(B.to_numpy(got), expected)  # tiny T: the nearest one wins


@pytest.mark.parametrize("function", [E.knn_predict, E.knn_classifier])
def test_knn_defaults_are_k_20_and_temperature_0_07(rng, function):
    """The documented protocol (Wu et al.'s T = 0.07; k = 20 as DINO reports it): the
    results table's 'kNN k=20' column means exactly this."""
    parameters = inspect.signature(function).parameters
    assert (parameters["k"].default, parameters["temperature"].default) == (20, 0.07)
    if function is E.knn_classifier:
        x, y = _blobs(rng, 10)
        result = E.knn_classifier(x[:25], y[:25], x[25:], y[25:])
        assert (result.k, result.k_requested, result.temperature) == (20, 20, 0.07)


def test_knn_k_clipped_to_train_size(rng):
    x, y = _blobs(rng, 10)
    clipped = E.knn_classifier(x[:20], y[:20], x[20:], y[20:], k=200)
    exact = E.knn_classifier(x[:20], y[:20], x[20:], y[20:], k=20)
    assert clipped.k == 20 and clipped.k_requested == 200 and clipped.clipped
    assert "clipped" in clipped.note and clipped.accuracy == exact.accuracy


@settings(max_examples=10)
@given(scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_knn_ignores_feature_length(scale, seed):
    # Cosine similarity: rescaling every feature vector changes nothing.
    rng = np.random.default_rng(seed)
    train, test = rng.normal(size=(20, 3)), rng.normal(size=(8, 3))
    y = rng.integers(0, 3, size=20)
    row_scales = scale * rng.uniform(0.5, 2.0, size=(20, 1))
    np.testing.assert_array_equal(
        E.knn_predict(train, y, test, k=5), E.knn_predict(train * row_scales, y, test * scale, k=5)
    )


def test_knn_refuses_bad_input(rng):
    train, test, y = rng.normal(size=(10, 3)), rng.normal(size=(4, 3)), np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match="k must be"):
        E.knn_predict(train, y, test, k=0)
    with pytest.raises(ValueError, match="temperature"):
        E.knn_predict(train, y, test, temperature=0.0)
    with pytest.raises(ValueError, match="width"):
        E.knn_predict(train, y, test[:, :2])
    with pytest.raises(ValueError, match="one label per row"):
        E.knn_predict(train, y[:9], test)
    with pytest.raises(ValueError, match="n_classes=2"):
        E.knn_predict(train, y + 2, test, n_classes=2)
    with pytest.raises(ValueError, match="labels must be non-negative, found -1"):  # a vote for no class
        E.knn_predict(train, y - 1, test)
    with pytest.raises(ValueError, match="integers"):
        E.knn_predict(train, y.astype(float), test)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_knn_refuses_non_finite_features(backend, rng, split, bad):
    # All-NaN features used to score a chance-level 0.333 instead of failing.
    features = {"train": rng.normal(size=(12, 3)), "test": rng.normal(size=(5, 3))}
    features[split][2, 1] = bad
    train, test = B.asarray(features["train"], backend), B.asarray(features["test"], backend)
    y_train, y_test = rng.integers(0, 3, size=12), rng.integers(0, 3, size=5)
    with pytest.raises(ValueError, match=f"{split} features contain NaN or infinity"):
        E.knn_predict(train, y_train, test, k=3)
    with pytest.raises(ValueError, match=f"{split} features contain NaN or infinity"):
        E.knn_classifier(train, y_train, test, y_test, k=3)


def test_knn_empty_test_set(backend, rng):
    """Predicting for no points is an empty prediction; an accuracy over no points is an error."""
    train = B.asarray(rng.normal(size=(10, 3)), backend)
    empty = B.asarray(np.zeros((0, 3)), backend)
    y = rng.integers(0, 2, size=10)
    got = E.knn_predict(train, y, empty, k=3)
    assert B.array_namespace(got) is backend and got.shape == (0,) and got.dtype == backend.int64
    with pytest.raises(ValueError, match="the test split is empty"):
        E.knn_classifier(train, y, empty, np.zeros(0, dtype=int), k=3)


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_knn_refuses_bad_chunk_size(rng, chunk_size):
    train, test, y = rng.normal(size=(10, 3)), rng.normal(size=(4, 3)), np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match=f"chunk_size must be a positive integer, got {chunk_size!r}"):
        E.knn_predict(train, y, test, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------
# linear probe
# ------------------------------------------------------------------------------------------
def test_linear_probe_separable_data_is_perfect(rng):
    x, y = _blobs(rng, 40)
    result = E.linear_probe(x[:90], y[:90], x[90:], y[90:])
    assert result.accuracy == pytest.approx(1.0) and float(result) == result.accuracy
    assert result.C in E.DEFAULT_C_GRID and set(result.cv_accuracy) == set(E.DEFAULT_C_GRID)
    assert result.n_folds == 5 and result.n_repeats == 3 and result.converged  # 90 images: 3 repeats
    assert result.cv_accuracy[result.C] == max(result.cv_accuracy.values())


def test_linear_probe_repeats_its_cross_validation_on_small_splits_only(rng, monkeypatch):
    x, y = _blobs(rng, 40)
    assert E.linear_probe(x[:90], y[:90], x[90:], y[90:], cv_repeats=2).n_repeats == 2
    monkeypatch.setattr(E, "CV_PREDICTIONS", 90)  # as if 90 images were a large split
    assert E.linear_probe(x[:90], y[:90], x[90:], y[90:]).n_repeats == 1
    assert E.linear_probe(x[:90], y[:90], x[90:], y[90:], C=1.0).n_repeats == 0
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="cv_repeats must be a positive integer"):
            E.linear_probe(x[:90], y[:90], x[90:], y[90:], cv_repeats=bad)


def test_linear_probe_random_labels_is_chance(rng):
    x = rng.normal(size=(900, 10))
    y = rng.integers(0, 3, size=900)
    result = E.linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert abs(result.accuracy - 1 / 3) < 0.08  # 600 test points: chance +- 4 sigma


def test_linear_probe_never_looks_at_the_test_split(rng):
    # Overlapping classes, so that the CV accuracy depends on C.
    x, y = _blobs(rng, 60, dim=8, spread=4.0)
    train, y_train, test, y_test = x[:120], y[:120], x[120:], y[120:]
    honest = E.linear_probe(train, y_train, test, y_test)
    scrambled = E.linear_probe(train, y_train, test * -3.0 + 1.0, rng.permutation(y_test))
    assert len(set(honest.cv_accuracy.values())) > 1  # the choice of C is not trivial
    assert scrambled.C == honest.C and scrambled.cv_accuracy == honest.cv_accuracy
    assert scrambled.accuracy != honest.accuracy  # while the test score does react


def test_linear_probe_does_not_care_about_the_units_of_a_feature(rng):
    """Features are standardised on the train split first, so rescaling one feature by
    1e-3 or 1e3 changes nothing; without the scaler the same C over-regularises the small
    feature and under-regularises the large one."""
    x, y = _blobs(rng, 40, dim=6, spread=3.0)
    scaled = x * np.array([1e-3, 1e3, 1.0, 1e-3, 1e3, 1.0])
    plain = E.linear_probe(x[:90], y[:90], x[90:], y[90:], C=0.05)
    rescaled = E.linear_probe(scaled[:90], y[:90], scaled[90:], y[90:], C=0.05)
    assert rescaled.accuracy == pytest.approx(plain.accuracy)


def test_linear_probe_fixed_C_matches_scikit_learn(rng):
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(rng, 30, dim=6, spread=3.0)
    result = E.linear_probe(x[:60], y[:60], x[60:], y[60:], C=0.5)
    mean, std = x[:60].mean(axis=0), x[:60].std(axis=0)  # train statistics only
    clf = LogisticRegression(C=0.5, max_iter=1000).fit((x[:60] - mean) / std, y[:60])
    assert result.accuracy == pytest.approx(clf.score((x[60:] - mean) / std, y[60:]))
    assert result.C == 0.5 and result.cv_accuracy == {} and result.n_folds == 0


def test_linear_probe_accepts_backend_arrays(backend, rng):
    x, y = _blobs(rng, 20)
    result = E.linear_probe(B.asarray(x[:45], backend), B.asarray(y[:45], backend),
                            B.asarray(x[45:], backend), B.asarray(y[45:], backend), C=1.0)
    assert result.accuracy == pytest.approx(1.0)


def test_linear_probe_refuses_bad_input(rng):
    x = rng.normal(size=(20, 3))
    y = np.array([0, 1] * 10)
    with pytest.raises(ValueError, match="2 or more"):
        E.linear_probe(x, np.zeros(20, dtype=int), x, y)
    with pytest.raises(ValueError, match="smallest class"):
        E.linear_probe(x, np.r_[np.zeros(19, dtype=int), 1], x, y)
    with pytest.raises(ValueError, match="width"):
        E.linear_probe(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="NaN"):
        E.linear_probe(x, y, np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="C must be positive"):
        E.linear_probe(x, y, x, y, C=0.0)


@pytest.mark.parametrize("cv_folds", [0, 1, -3, 2.5])
def test_linear_probe_refuses_too_few_folds(rng, cv_folds):
    # Ten examples per class: the message must blame cv_folds, not the smallest class.
    x, y = rng.normal(size=(20, 3)), np.array([0, 1] * 10)
    with pytest.raises(ValueError, match=f"cv_folds must be an integer >= 2, got {cv_folds!r}"):
        E.linear_probe(x, y, x, y, cv_folds=cv_folds)


def test_evaluate_features_gives_a_table_row(rng):
    """One column per k, each at the temperature asked for (it used to be dropped for the
    default 0.07)."""
    x, y = _blobs(rng, 20)
    row = E.evaluate_features(x[:45], y[:45], x[45:], y[45:], ks=(5, 200), temperature=0.5)
    assert list(row) == ["linear probe", "kNN k=5", "kNN k=200"]
    assert row["kNN k=200"].k == 45
    assert row["kNN k=5"].temperature == row["kNN k=200"].temperature == 0.5
    table = R.results_table([{"method": "blobs", **row}])
    assert table.at["blobs", "kNN k=5"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------
def test_raw_pixel_features(backend, rng):
    images = rng.integers(0, 256, size=(4, 3, 2, 2), dtype=np.uint8)
    out = E.raw_pixel_features(B.asarray(images, backend))
    assert B.array_namespace(out) is backend and out.shape == (4, 12)
    assert out.dtype == backend.float32
    np.testing.assert_allclose(B.to_numpy(out), images.reshape(4, -1) / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        E.raw_pixel_features(B.asarray(images.astype(np.float32), backend))


class LinearModel:
    """A stand-in network: a fixed random linear map of the flattened image."""

    def __init__(self, in_features, out_features, xp, seed=0):
        self.weight = B.Random(seed, xp).normal((in_features, out_features))
        self.training = True
        self.calls = []

    def train(self):
        self.training = True

    def eval(self):
        self.training = False

    def forward(self, x):
        self.calls.append((x.shape[0], self.training))
        xp = B.array_namespace(x)
        flat = xp.reshape(x, (x.shape[0], -1))
        return flat @ xp.astype(self.weight, flat.dtype)


@pytest.mark.parametrize("was_training", [True, False])
def test_extract_features_batches_and_restores_mode(backend, rng, was_training):
    images = rng.integers(0, 256, size=(7, 2, 3, 3), dtype=np.uint8)
    mean, std = (0.5, 0.25), (0.2, 0.4)
    model = LinearModel(18, 4, backend)
    model.training = was_training
    out = E.extract_features(model, images, xp=backend, dtype="float64", batch_size=3,
                             normalize=(mean, std))
    assert B.array_namespace(out) is backend and out.shape == (7, 4)
    pixels = (images / 255.0 - np.reshape(mean, (1, 2, 1, 1))) / np.reshape(std, (1, 2, 1, 1))
    expected = pixels.reshape(7, -1) @ B.to_numpy(model.weight)
    np.testing.assert_allclose(B.to_numpy(out), expected, rtol=1e-12)
    assert model.calls == [(3, False), (3, False), (1, False)]  # eval mode, batch by batch
    assert model.training is was_training


def test_extract_features_restores_mode_on_error(rng):
    class Broken(LinearModel):
        def forward(self, x):
            return x  # (B, C, H, W), not (B, D)

    model = Broken(18, 4, np)
    images = rng.integers(0, 256, size=(2, 2, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        E.extract_features(model, images, xp=np, normalize=None)
    assert model.training is True
    with pytest.raises(ValueError, match="2 per-channel"):
        E.extract_features(model, images, xp=np, normalize=((0.5,), (0.2,)))
    with pytest.raises(ValueError, match="uint8"):
        E.extract_features(model, images.astype(np.float32), xp=np, normalize=None)


def test_extract_features_needs_its_normalisation_named(rng):
    """Left out, features came from unnormalised pixels (4.4 away from the trained
    transform's in a checkpoint's features) without a word; now it must be named."""
    images = rng.integers(0, 256, size=(2, 2, 3, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="normalize"):
        E.extract_features(LinearModel(18, 4, np), images, xp=np)


# ------------------------------------------------------------------------------------------
# results table
# ------------------------------------------------------------------------------------------
def _rows():
    return [
        {"method": "raw pixels", "linear probe": 0.85, "kNN k=20": 0.9},
        {"method": "SwAV", "kNN k=200": [0.8, 0.9, 1.0], "linear probe": [0.9, 0.92, 0.94],
         "kNN k=20": [0.95, 0.95, 0.95]},
    ]


def test_results_table_means_and_stds():
    df = R.results_table(_rows())
    assert list(df.index) == ["raw pixels", "SwAV"]
    assert list(df.columns) == ["seeds", "linear probe", "linear probe std", "kNN k=20",
                                "kNN k=20 std", "kNN k=200", "kNN k=200 std"]
    assert df.at["SwAV", "seeds"] == 3 and df.at["raw pixels", "seeds"] == 1
    assert df.at["SwAV", "linear probe"] == pytest.approx(0.92)
    assert df.at["SwAV", "linear probe std"] == pytest.approx(0.02)  # sample std, ddof=1
    assert df.at["SwAV", "kNN k=200 std"] == pytest.approx(0.1)
    assert math.isnan(df.at["raw pixels", "linear probe std"])
    assert math.isnan(df.at["raw pixels", "kNN k=200"])


def test_format_results_shows_mean_plus_minus_std():
    text = R.format_results(R.results_table(_rows()))
    lines = text.splitlines()
    assert "linear probe" in lines[0] and "kNN k=200" in lines[0] and "seeds" in lines[0]
    swav = next(line for line in lines if line.startswith("SwAV"))
    raw = next(line for line in lines if line.startswith("raw pixels"))
    assert "92.0 ± 2.0" in swav and "90.0 ± 10.0" in swav and "95.0 ± 0.0" in swav
    assert "85.0" in raw and "±" not in raw and raw.rstrip().endswith("-")


def test_results_table_accepts_mapping_and_result_objects():
    probe = E.LinearProbeResult(accuracy=0.75, C=1.0)
    df = R.results_table({"random init": {"linear probe": probe, "kNN k=20": [probe, 0.25]}})
    assert df.at["random init", "linear probe"] == 0.75
    assert df.at["random init", "kNN k=20"] == 0.5
    with pytest.raises(ValueError, match="method"):
        R.results_table([{"linear probe": 0.5}])
    with pytest.raises(ValueError, match="twice"):
        R.results_table([{"method": "a"}, {"method": "a"}])


def test_the_probes_choices_are_kept_and_a_probe_that_did_not_converge_is_marked(tmp_path):
    fine = E.LinearProbeResult(accuracy=0.9, C=1.0, n_folds=5, n_repeats=3)
    stuck = E.LinearProbeResult(accuracy=0.8, C=10.0, n_folds=5, n_repeats=3, converged=False)
    rows = [{"method": "SwAV", "linear probe": [fine, stuck], "kNN k=20": [0.9, 0.8]},
            {"method": "raw pixels", "linear probe": [fine, fine]}]
    table = R.results_table(rows)
    assert table.attrs["not_converged"] == [("SwAV", "linear probe")]
    text = R.format_results(table)
    assert "85.0 ± 7.1 *" in text and "did not converge" in text.splitlines()[-1]
    assert "*" not in next(line for line in text.splitlines() if line.startswith("raw pixels"))
    assert "*" not in R.format_results(R.results_table(rows[1:]))
    data = json.loads(R.save_results_json(tmp_path / "r.json", rows).read_text())
    swav = data["results"][0]["linear probe"]
    assert swav["values"] == [0.9, 0.8]
    assert swav["probe"] == [{"C": 1.0, "cv_folds": 5, "cv_repeats": 3, "converged": True},
                             {"C": 10.0, "cv_folds": 5, "cv_repeats": 3, "converged": False}]
    assert "probe" not in data["results"][0]["kNN k=20"]


def test_save_results_json_roundtrip(tmp_path):
    path = R.save_results_json(tmp_path / "out" / "results.json", iter(_rows()),
                               metadata={"dataset": "digits"})
    data = json.loads(path.read_text())
    assert data["metrics"] == ["linear probe", "kNN k=20", "kNN k=200"]
    assert data["metadata"]["dataset"] == "digits"
    today = datetime.date.today()
    assert data["metadata"]["date"] in {today.isoformat(), (today - datetime.timedelta(days=1)).isoformat()}
    assert data["metadata"]["machine"]
    swav = next(r for r in data["results"] if r["method"] == "SwAV")
    assert swav["seeds"] == 3 and swav["linear probe"]["values"] == [0.9, 0.92, 0.94]
    assert swav["linear probe"]["mean"] == pytest.approx(0.92)
    raw = next(r for r in data["results"] if r["method"] == "raw pixels")
    assert raw["linear probe"]["std"] is None and raw["kNN k=200"]["mean"] is None
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary left behind


def test_the_results_tables_old_names_still_import_with_a_warning():
    """results_table and its kin moved from swav_ref.evaluate to swav_ref.results; code
    written for the old place keeps working, told where they are now."""
    with pytest.warns(DeprecationWarning, match="swav_ref.results.results_table"):
        from swav_ref.evaluate import results_table
    assert results_table is R.results_table
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        E.no_such_name


def test_knn_takes_class_names_as_the_linear_probe_does(rng):
    """kNN refused string labels that the linear probe took ("labels must be integers")."""
    names = np.array(["cat", "dog", "eel"])[np.arange(30) % 3]
    features = np.eye(4)[np.arange(30) % 3] + 0.1 * rng.normal(size=(30, 4))  # a direction per class
    by_name = E.knn_classifier(features[:20], names[:20], features[20:], list(names[20:]), k=3)
    by_index = E.knn_classifier(features[:20], np.arange(20) % 3, features[20:], np.arange(20, 30) % 3, k=3)
    assert by_name.accuracy == by_index.accuracy == 1.0
    assert E.linear_probe(features[:20], names[:20], features[20:], names[20:], C=1.0).accuracy == 1.0
    with pytest.raises(ValueError, match="integers"):  # a fractional label is no class
        E.knn_classifier(features[:20], np.arange(20) * 0.5, features[20:], np.arange(10) * 0.5, k=3)
    with pytest.raises(ValueError, match="integers"):  # nor is 0 the name "0"
        E.knn_classifier(features[:20], np.arange(20) % 3, features[20:], (np.arange(10) % 3).astype(str), k=3)
    with pytest.raises(ValueError, match="class names of one kind"):
        E.knn_classifier(features[:20], np.array(["a", None] * 10, dtype=object), features[20:], names[20:], k=3)
