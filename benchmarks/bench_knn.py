"""The kNN evaluation at CIFAR-10's size: ours against scikit-learn and against a full sort.

``knn_predict`` scores every test point against every training point (one matrix product
per chunk of test points) and keeps each row's k most similar. That top-k used to be a full
sort of each row, :math:`O(N \\log N)`; on NumPy it is now a partition, :math:`O(N)`, with
ties at the k-th place taken in index order (``evaluate.nearest_neighbours``). Measured
here, on unit-length random features of CIFAR-10's size (50,000 training and 2,000 test
points of 512 dimensions, resnet18's width, 10 classes), float32:

- ours: ``knn_predict`` (search and weighted vote);
- peer: scikit-learn's brute-force cosine search, ``NearestNeighbors(metric="cosine",
  algorithm="brute").kneighbors`` (the search alone: its vote would only add time);
- peer: the same function with the full sort of each row in place of the partition.

Each time is the median of ``--repeats`` runs; the predictions are checked to agree with
the full sort's (they must be equal: same neighbours, same vote).

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_knn.py [--repeats 3]
Writes benchmarks/results/bench_knn.json and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np

from swav_ref import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN, N_TEST, DIM, CLASSES = 50_000, 2_000, 512, 10


def unit_features(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(run, repeats: int) -> tuple[list[float], object]:
    """Every run's seconds, and the last run's result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return times, out


def full_sort(similarity, k):
    """The top-k as it was: a full sort of each row (NumPy's default, introsort)."""
    return np.argsort(-similarity, axis=1)[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    train, test = unit_features(N_TRAIN, rng), unit_features(N_TEST, rng)
    labels = rng.integers(0, CLASSES, N_TRAIN)
    cases = {}
    for k in (20, 200):
        ours_all, ours = timed(lambda: evaluate.knn_predict(train, labels, test, k=k), args.repeats)
        with mock.patch.object(evaluate, "nearest_neighbours", full_sort):
            sort_all, sorted_out = timed(lambda: evaluate.knn_predict(train, labels, test, k=k), args.repeats)
        search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
        sklearn_all, _ = timed(lambda: search.kneighbors(test), args.repeats)
        cases[f"k={k}"] = {"ours_s": statistics.median(ours_all), "full_sort_s": statistics.median(sort_all),
                           "sklearn_search_s": statistics.median(sklearn_all), "ours_s_all": ours_all,
                           "full_sort_s_all": sort_all, "sklearn_search_s_all": sklearn_all,
                           "same_predictions_as_full_sort": bool(np.array_equal(ours, sorted_out))}
    result = {
        "benchmark": "bench_knn",
        "what": f"kNN evaluation, {N_TRAIN:,} training and {N_TEST:,} test points of {DIM} dimensions, float32",
        "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_knn.py",
        "repeats": args.repeats,
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_knn.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
