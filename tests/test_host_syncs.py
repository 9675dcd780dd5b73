"""The training step does not wait for the device: no array value is read on the host.

On a GPU, reading an array's value into Python (``float(loss)``, ``if bool(x)``, ``item()``,
``to_numpy``) makes the host wait for every queued kernel. The training loop therefore
reads its losses only every ``log_every`` steps, outside the step. These tests run steps
through ``benchmarks/bench_launches.py``'s counting arrays, which record every such read
with the function that made it, on the plain code and through the fused kernels.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import required

from swav_ref.backend import Random
from swav_ref.data.multicrop import MultiCropConfig, sample_crop_params

ROOT = Path(__file__).resolve().parents[1]

#: Reads allowed in a step, of arrays that live on the host on every backend (on NumPy the
#: counter cannot tell them from device arrays): render_crops' decisions on its crop
#: parameters (host arrays by construction, checked below), and the seeding of a
#: ``backend.Random``'s host generator (NumPy's SeedSequence reading its own arrays).
HOST_SIDE = {("data.multicrop.render_crops", "bool()"), ("backend.__init__", "int()")}


@pytest.fixture(scope="module")
def launches():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_launches", ROOT / "benchmarks" / "bench_launches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fused_lanes():
    # Where CI promises a compiler, the fused lane runs (and fails to compile) instead of skipping.
    skip = not required.have_compiler() and not os.environ.get("SWAV_REF_REQUIRE_COMPILER")
    return [False, pytest.param(True, marks=pytest.mark.skipif(skip, reason="no C++ compiler"))]


@pytest.mark.parametrize("use_fused", _fused_lanes(), ids=["plain", "fused"])
def test_a_swav_step_with_its_queue_reads_nothing_from_the_device(launches, use_fused):
    from bench_gpu import swav_step

    def make():  # a queue of 2 batches: full from the third step on, the one counted
        return swav_step("numpy", 4, prototypes=12, hidden=16, feat_dim=8, arch="resnet_tiny",
                         queue_length=8, epoch_queue_starts=0)

    counts = launches.count_step(make, use_fused=use_fused)
    reads = {(s["where"], s["what"]) for s in counts["host_sync_sites"]}
    assert reads <= HOST_SIDE, reads - HOST_SIDE
    assert counts["kernels"] > 100  # the step did run through the counting arrays


def test_the_counter_sees_a_read_of_the_loss(launches):
    """The check above can fail: a step that reads its loss is caught, with its place."""
    make_step = launches.resnet_step("resnet_tiny")  # bench_resnet's step ends with float(loss)
    counts = launches.count_step(make_step, use_fused=False)
    assert counts["host_syncs"] == 1 and counts["host_sync_sites"][0]["what"] == "float()"


def test_the_log_reads_the_device_twice_whatever_the_number_of_steps(launches, tiny, tmp_path):
    """At a logging boundary the pending steps' losses and code statistics come to the host
    in two copies (not three reads per step, each a sync on a GPU)."""
    from small_runs import small_config

    from swav_ref.train import Trainer

    with launches.counting_numpy():
        trainer = Trainer(small_config(tmp_path, log_every=100), train_set=tiny[0], test_set=tiny[1])
        trainer._start_epoch(0)
        for s in range(4):
            indices = trainer.batch_indices(0, s)
            loss, codes = trainer.train_step(trainer.make_crops(indices), indices)
            trainer._pending.append((trainer.step - 1, loss, codes))
        launches.TALLY.by_site.clear()
        launches.TALLY.on = True
        try:
            trainer._flush_log(0, type("Bar", (), {"set_postfix": lambda *a, **k: None})())
        finally:
            launches.TALLY.on = False
    reads = {(where, what): n for (kind, where, what), n in launches.TALLY.by_site.items() if kind == "host_syncs"}
    assert reads == {("train._flush_log", "to_numpy"): 2}, reads
    assert [r["prototypes_used"] for r in trainer.log.steps()] and len(trainer.log.steps()) == 4


def test_crop_decisions_are_host_arrays(gpu_or_numpy):
    """The random crop parameters are drawn and kept on the host on every backend, so the
    augmentation's branching on them never reads the device."""
    params = sample_crop_params(Random(0, gpu_or_numpy), 6, 32, 32, 0, MultiCropConfig())
    for name in ("brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma"):
        assert type(getattr(params, name)) is np.ndarray, name


def test_kmeans_plus_plus_reads_nothing_from_the_device(launches):
    """DeepCluster-v2's seeding draws its K rows on the device: on a GPU, a read per
    centroid would be K waits and K copies of the N distances, every epoch. Only the
    embeddings count here (NumPy's creators are left alone), so the host generator's own
    reads of its host arrays are not mistaken for the device's."""
    from swav_ref.deepcluster import kmeans_plus_plus

    x = np.random.default_rng(0).normal(size=(50, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rng = Random(0)
    launches.TALLY.by_site.clear()
    launches.TALLY.on = True
    try:
        centroids = kmeans_plus_plus(launches._counting(x), 7, rng)
    finally:
        launches.TALLY.on = False
    counted = {kind for (kind, _, _) in launches.TALLY.by_site}
    reads = {(where, what): n for (kind, where, what), n in launches.TALLY.by_site.items() if kind == "host_syncs"}
    assert reads == {}, reads
    assert "kernels" in counted and centroids.shape == (7, 6)  # the draws did run on x
