"""Diagnostics: prototype usage and the collapse watchdog."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import entropy

from swav_ref import backend as B
from swav_ref.swav import CollapseMonitor, CollapseWarning, code_usage, sinkhorn_codes


def test_code_usage_of_one_hot_codes(backend):
    favourites = np.array([0, 2, 2, 4, 0, 2])
    codes = np.eye(5)[favourites]
    usage = code_usage(B.asarray(codes, backend))
    assert int(usage.n_used) == 3
    assert abs(float(usage.mean_entropy)) < 1e-12  # sharp codes
    assert abs(float(usage.entropy_of_mean) - entropy(codes.mean(axis=0))) < 1e-12
    assert usage.max_entropy == math.log(5)


def test_code_usage_of_uniform_codes(backend):
    usage = code_usage(B.asarray(np.full((6, 4), 0.25), backend))
    assert abs(float(usage.mean_entropy) - math.log(4)) < 1e-12  # the collapsed state
    assert abs(float(usage.entropy_of_mean) - math.log(4)) < 1e-12
    assert int(usage.n_used) == 1  # ties go to the first prototype


def test_code_usage_matches_scipy_on_sinkhorn_codes(backend, rng):
    scores = rng.uniform(-1, 1, size=(20, 6))
    codes = B.to_numpy(sinkhorn_codes(B.asarray(scores, backend)))
    usage = code_usage(B.asarray(codes, backend))
    assert B.array_namespace(usage.mean_entropy) is backend
    assert abs(float(usage.mean_entropy) - np.mean(entropy(codes, axis=1))) < 1e-12
    assert int(usage.n_used) == len(np.unique(codes.argmax(axis=1)))


def test_monitor_fires_once_on_a_flat_ln_k_loss(rng):
    monitor = CollapseMonitor(n_prototypes=30, window=20, tolerance=0.01)
    flat = math.log(30) + rng.uniform(-0.005, 0.005, size=50)
    with pytest.warns(CollapseWarning, match="uniform code") as record:
        fired = [monitor.update(x) for x in flat]
    assert len(record) == 1 and fired.count(True) == 1 and fired.index(True) == 19
    message = str(record[0].message)
    assert "epsilon" in message and "freeze" in message and "queue" in message
    assert monitor.fired and monitor.collapsed


def test_monitor_silent_on_a_decreasing_loss():
    monitor = CollapseMonitor(n_prototypes=30, window=20)
    decreasing = math.log(30) * np.exp(-np.arange(100) / 30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        assert not any(monitor.update(x) for x in decreasing)
    assert not monitor.fired


def test_monitor_needs_the_whole_window_near_ln_k():
    monitor = CollapseMonitor(n_prototypes=10, window=5)
    losses = [math.log(10)] * 4 + [1.0] + [math.log(10)] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        for x in losses:
            monitor.update(x)
    assert not monitor.collapsed


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_prototypes": 1}, "n_prototypes"), ({"n_prototypes": 5, "window": 0}, "window"),
     ({"n_prototypes": 5, "tolerance": -1.0}, "tolerance")],
)
def test_monitor_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CollapseMonitor(**kwargs)


def test_code_usage_bad_shape(backend):
    with pytest.raises(ValueError, match="codes must be"):
        code_usage(B.asarray(np.ones(3), backend))


def test_monitor_accepts_numpy_integers():
    """K read from a NumPy array (np.int64) was refused as "not an integer"."""
    monitor = CollapseMonitor(n_prototypes=np.int64(30), window=np.int64(2))
    with pytest.warns(CollapseWarning, match="ln 30 "):
        fired = [monitor.update(math.log(30)) for _ in range(2)]
    assert fired == [False, True]
    with pytest.raises(ValueError, match="n_prototypes must be an integer >= 2, got True"):
        CollapseMonitor(n_prototypes=True)


def test_remembered_losses_fill_the_window_without_warning():
    """A resumed run's losses, read back from its log, count towards the window: a run
    split into jobs shorter than the window is watched as one run."""
    monitor = CollapseMonitor(n_prototypes=10, window=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.remember([math.log(10)] * 3)
    assert not monitor.fired and not monitor.collapsed
    with pytest.warns(CollapseWarning):
        assert monitor.update(math.log(10))  # the fourth loss in a row near ln K
