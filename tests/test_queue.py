"""The feature queue: official FIFO shift, fill counter, scores, checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest

from swav_ref import backend as B
from swav_ref.checkpoint import CheckpointError
from swav_ref.swav import Queue, queue_length_per_worker, swav_loss

N_CROPS, LENGTH, DIM, BATCH = 2, 6, 3, 2


def official_push(queue: np.ndarray, new: np.ndarray) -> None:
    """main_swav.py: queue[i, bs:] = queue[i, :-bs].clone(); queue[i, :bs] = embedding."""
    bs = new.shape[1]
    for i in range(queue.shape[0]):
        queue[i, bs:] = queue[i, :-bs].copy()
        queue[i, :bs] = new[i]


def test_fifo_matches_the_official_shift(backend, rng):
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend, dtype="float64")
    reference = np.zeros((N_CROPS, LENGTH, DIM))
    fills = []
    for _ in range(5):  # more pushes than fit: the oldest batches fall off the end
        new = rng.normal(size=(N_CROPS, BATCH, DIM))
        queue.push([B.asarray(new[i], backend) for i in range(N_CROPS)])
        official_push(reference, new)
        np.testing.assert_array_equal(B.to_numpy(queue.embeddings), reference)
        fills.append((queue.filled, queue.is_full))
    assert fills == [(2, False), (4, False), (6, True), (6, True), (6, True)]


def test_push_accepts_a_stacked_array(backend, rng):
    """A stacked array or a list; float64 embeddings are cast to the queue's dtype (NumPy's
    promotion made the whole queue float64 for good, doubling its memory)."""
    a = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend)
    new = B.asarray(rng.normal(size=(N_CROPS, BATCH, DIM)), backend, "float32")
    a.push(new)
    assert a.embeddings.dtype == backend.float32
    np.testing.assert_array_equal(B.to_numpy(a.embeddings)[:, :BATCH], B.to_numpy(new))
    assert np.all(B.to_numpy(a.embeddings)[:, BATCH:] == 0)
    wide = rng.normal(size=(N_CROPS, BATCH, DIM))
    a.push(B.asarray(wide, backend, "float64"))
    a.push([B.asarray(wide[i], backend, "float64") for i in range(N_CROPS)])
    assert a.embeddings.dtype == backend.float32


def test_scores_use_filled_rows_and_current_prototypes(backend, rng):
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend, dtype="float64")
    new = rng.normal(size=(N_CROPS, BATCH, DIM))
    queue.push(B.asarray(new, backend))
    weight = rng.normal(size=(4, DIM))
    s = B.to_numpy(queue.scores(1, B.asarray(weight, backend)))
    np.testing.assert_allclose(s, new[1] @ weight.T, rtol=1e-12)  # only the 2 filled rows
    assert [x.shape for x in queue.all_scores(B.asarray(weight, backend))] == [(BATCH, 4)] * N_CROPS


def test_state_round_trip(backend, rng):
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend, dtype="float64")
    for _ in range(2):
        queue.push(B.asarray(rng.normal(size=(N_CROPS, BATCH, DIM)), backend))
    state = queue.state_dict()
    host = {"embeddings": B.to_numpy(state["embeddings"]).copy(), "filled": int(state["filled"])}

    restored = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend, dtype="float64")
    restored.load_state_dict(host)
    host["embeddings"][...] = 7.0  # the loaded queue is a copy: the caller's array is not its storage
    assert restored.filled == 4 and not restored.is_full
    np.testing.assert_array_equal(B.to_numpy(restored.embeddings), B.to_numpy(queue.embeddings))
    new = B.asarray(rng.normal(size=(N_CROPS, BATCH, DIM)), backend)
    queue.push(new)
    restored.push(new)
    np.testing.assert_array_equal(B.to_numpy(restored.embeddings), B.to_numpy(queue.embeddings))
    assert restored.is_full


def test_full_queue_feeds_swav_loss(backend, rng):
    n_prototypes = 8  # more prototypes than the batch: the queue's raison d'etre
    weight = rng.normal(size=(n_prototypes, DIM))
    weight /= np.linalg.norm(weight, axis=1, keepdims=True)
    weight = B.asarray(weight, backend)
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend, dtype="float64")
    while not queue.is_full:
        e = rng.normal(size=(N_CROPS, BATCH, DIM))
        queue.push(B.asarray(e / np.linalg.norm(e, axis=2, keepdims=True), backend))
    scores = B.asarray(rng.uniform(-1, 1, size=(2 * BATCH, n_prototypes)), backend)
    out = swav_loss(scores, BATCH, queue_scores=queue.all_scores(weight))
    assert [q.shape for q in out.codes] == [(BATCH, n_prototypes)] * 2
    assert np.all(np.isfinite(B.to_numpy(out.grad)))


def test_queue_length_per_worker():
    """The official rule: a multiple of batch_size * world_size, so that every worker's share
    is whole batches (a multiple of the batch alone was let through)."""
    assert queue_length_per_worker(3840, 64, 4) == 960
    assert queue_length_per_worker(256, 64) == 256
    with pytest.raises(ValueError, match=r"queue_length=3800 .* 64 \* 4 = 256; use 3840 or 3584"):
        queue_length_per_worker(3800, 64, 4)
    with pytest.raises(ValueError, match="use 256$"):
        queue_length_per_worker(100, 64, 4)
    with pytest.raises(ValueError, match=r"128 \* 2 = 256; use 512 or 256"):  # a multiple of the batch only
        queue_length_per_worker(384, 128, 2)
    with pytest.raises(ValueError, match="world_size"):
        queue_length_per_worker(256, 64, 0)


def test_bad_shapes(backend):
    with pytest.raises(ValueError, match="length 5 is not a multiple of batch_size 2"):
        Queue(N_CROPS, 5, DIM, BATCH, xp=backend)
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend)
    with pytest.raises(ValueError, match="expected 2 arrays"):
        queue.push([backend.zeros((BATCH, DIM))])
    with pytest.raises(ValueError, match=r"crop 1 has shape \(3, 3\)"):
        queue.push([backend.zeros((BATCH, DIM)), backend.zeros((3, DIM))])
    with pytest.raises(ValueError, match="shape"):
        queue.push(backend.zeros((N_CROPS, BATCH, DIM + 1)))
    with pytest.raises(ValueError, match="prototype weight"):
        queue.scores(0, backend.zeros((4, DIM + 1)))
    with pytest.raises(ValueError, match="crop index 2"):
        queue.scores(2, backend.zeros((4, DIM)))
    with pytest.raises(ValueError, match="embeddings of shape"):
        queue.load_state_dict({"embeddings": np.zeros((1, LENGTH, DIM)), "filled": 0})
    with pytest.raises(ValueError, match="filled=7"):
        queue.load_state_dict({"embeddings": np.zeros((N_CROPS, LENGTH, DIM)), "filled": 7})
    with pytest.raises(ValueError, match="lacks"):
        queue.load_state_dict({"filled": 0})


@pytest.mark.parametrize("crop", [1.5, True, "0"])
def test_crop_index_must_be_an_integer(backend, crop):
    """1.5 used to reach the indexing: a raw IndexError."""
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend)
    with pytest.raises(ValueError, match="crop index must be an integer, got"):
        queue.scores(crop, backend.zeros((4, DIM)))
    assert tuple(queue.scores(np.int64(1), backend.zeros((4, DIM))).shape) == (0, 4)


def _good_state(rng, dtype="float64"):
    return {"embeddings": rng.normal(size=(N_CROPS, LENGTH, DIM)).astype(dtype), "filled": 4}


@pytest.mark.parametrize("key, value, match", [
    ("filled", 2.5, r"'filled' must be an integer, got 2.5"),  # was a raw TypeError
    ("filled", True, "'filled' must be an integer, got True"),
    ("filled", "4", "'filled' must be an integer, got '4'"),
    ("filled", 3, "filled=3, not a multiple of batch_size 2"),  # whole batches are pushed
    ("embeddings", np.ones((N_CROPS, LENGTH, DIM), dtype=np.int32), "'embeddings' has dtype int32, not a floating"),
    ("embeddings", np.ones((N_CROPS, LENGTH, DIM), dtype=bool), "'embeddings' has dtype bool"),
    ("embeddings", [[0.0]], "'embeddings' is a list, not an array"),
    ("embeddings", "nan", "'embeddings' holds NaN or infinity"),
    ("embeddings", "inf", "'embeddings' holds NaN or infinity"),
    ("embeddings", "huge", r"'embeddings' holds NaN or infinity \(or values too large for float32\)"),
])
def test_load_refuses_bad_state_and_keeps_its_own(backend, rng, key, value, match):
    """Each used to load (a NaN then poisoned every Sinkhorn problem and the run seemed to
    diverge; integers were cast) or fail with a raw TypeError."""
    queue = Queue(N_CROPS, LENGTH, DIM, BATCH, xp=backend)
    queue.push(B.asarray(rng.normal(size=(N_CROPS, BATCH, DIM)), backend, "float32"))
    before = B.to_numpy(queue.embeddings).copy()
    state = _good_state(rng)
    if isinstance(value, str) and key == "embeddings":
        state["embeddings"][1, 3, 0] = {"nan": np.nan, "inf": np.inf, "huge": 1e300}[value]
    else:
        state[key] = value
    with pytest.raises(CheckpointError, match=match):
        queue.load_state_dict(state)
    assert queue.filled == BATCH
    np.testing.assert_array_equal(B.to_numpy(queue.embeddings), before)
    queue.load_state_dict({**_good_state(rng), "filled": np.int64(6)})  # a NumPy integer is an integer
    assert queue.filled == LENGTH and queue.embeddings.dtype == backend.float32
