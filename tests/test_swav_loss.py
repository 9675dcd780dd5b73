"""swav_loss: hand-derived gradient (central differences, codes held fixed) and PyTorch autograd."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import required

from swav_ref import backend as B
from swav_ref.nn.gradcheck import check_gradient
from swav_ref.swav import SwAVLossOutput, sinkhorn_codes, swapped_prediction_loss, swav_loss
from thread_workers import ThreadWorkers

BATCH, N_PROTOTYPES, DIM, QUEUE = 3, 5, 4, 6
ROOT = Path(__file__).resolve().parents[1]

# (number of crops, assignment crops, queue?)
SETTINGS = [
    (2, (0, 1), False),
    (6, (0, 1), False),  # 2 large + 4 small crops
    (2, (0, 1), True),
    (6, (0, 1), True),
    (4, (1,), False),  # one assignment crop, not the first
    (4, (0, 2, 3), True),  # three assignment crops: a crop is predicted from two codes
]


def unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_problem(rng, n_crops, with_queue, n_assign):
    """Cosine scores (n_crops * BATCH, K) and, optionally, queue scores per assignment crop."""
    prototypes = unit_rows(rng.normal(size=(N_PROTOTYPES, DIM)))
    scores = unit_rows(rng.normal(size=(n_crops * BATCH, DIM))) @ prototypes.T
    queue = None
    if with_queue:
        queue = [unit_rows(rng.normal(size=(QUEUE, DIM))) @ prototypes.T for _ in range(n_assign)]
    return scores, queue


def on(backend, queue):
    return None if queue is None else [B.asarray(q, backend) for q in queue]


@pytest.mark.parametrize("n_crops, assign, with_queue", SETTINGS)
def test_gradient_matches_central_differences(backend, rng, n_crops, assign, with_queue):
    scores_np, queue_np = make_problem(rng, n_crops, with_queue, len(assign))
    scores = B.asarray(scores_np, backend)
    out = swav_loss(scores, BATCH, crops_for_assign=assign, queue_scores=on(backend, queue_np))

    # Codes are constants (stop-gradient): the numerical derivative perturbs the scores while
    # the codes stay those computed once above, by evaluating swapped_prediction_loss with them.
    def loss_with_fixed_codes():
        loss, _ = swapped_prediction_loss(scores, out.codes, BATCH, crops_for_assign=assign)
        return float(loss)

    assert check_gradient(loss_with_fixed_codes, scores, out.grad) < 1e-6


@pytest.mark.parametrize("n_crops, assign, with_queue", SETTINGS)
def test_agrees_with_torch_autograd_of_the_official_formula(backend, rng, n_crops, assign, with_queue):
    torch = required.module("torch")
    scores_np, queue_np = make_problem(rng, n_crops, with_queue, len(assign))
    loss, grad = swav_loss(B.asarray(scores_np, backend), BATCH, crops_for_assign=assign,
                           queue_scores=on(backend, queue_np))
    ref_loss, ref_grad = torch_official_loss(torch, scores_np, BATCH, assign, queue_np)
    assert abs(float(loss) - ref_loss) < 1e-10
    assert np.max(np.abs(B.to_numpy(grad) - ref_grad)) < 1e-10


@functools.cache
def _bench_loss():
    """benchmarks/bench_loss.py, whose literal official Sinkhorn loop is the oracle here too."""
    spec = importlib.util.spec_from_file_location("bench_loss", ROOT / "benchmarks" / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("epsilon, n_iters, temperature", [(0.03, 1, 0.2), (0.1, 5, 0.2), (0.05, 3, 0.5)])
def test_epsilon_iterations_and_temperature_reach_the_loss(rng, epsilon, n_iters, temperature):
    """Each setting changes the official loss; a loss that ignored one (kept 0.05, 3 or 0.1)
    would match the oracle at the defaults only."""
    torch = required.module("torch")
    scores_np, queue_np = make_problem(rng, 4, True, 2)
    out = swav_loss(scores_np, BATCH, crops_for_assign=(0, 1), queue_scores=queue_np, temperature=temperature,
                    epsilon=epsilon, sinkhorn_iterations=n_iters)
    ref_loss, ref_grad = torch_official_loss(torch, scores_np, BATCH, (0, 1), queue_np, temperature=temperature,
                                             epsilon=epsilon, n_iters=n_iters)
    default_loss, _ = torch_official_loss(torch, scores_np, BATCH, (0, 1), queue_np)
    assert abs(ref_loss - default_loss) > 1e-3  # the setting matters here
    assert abs(float(out.loss) - ref_loss) < 1e-10
    assert np.max(np.abs(out.grad - ref_grad)) < 1e-10


def torch_official_loss(torch, scores_np, batch_size, crops_for_assign, queue_np=None,
                        temperature=0.1, epsilon=0.05, n_iters=3):
    """main_swav.py's loss with autograd, written from the official recipe (float64)."""
    import torch.nn.functional as F

    output = torch.tensor(scores_np, dtype=torch.float64, requires_grad=True)
    n_crops = scores_np.shape[0] // batch_size
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[batch_size * crop_id : batch_size * (crop_id + 1)].detach()
            if queue_np is not None and queue_np[i] is not None:
                out = torch.cat((torch.tensor(queue_np[i]), out))
            q = _bench_loss().torch_sinkhorn(torch, out, epsilon, n_iters)[-batch_size:]
        subloss = 0
        for v in np.delete(np.arange(n_crops), crop_id):
            x = output[batch_size * v : batch_size * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    loss /= len(crops_for_assign)
    loss.backward()
    return loss.item(), output.grad.numpy()


def test_returns_loss_grad_and_codes(backend, rng):
    scores_np, _ = make_problem(rng, 4, False, 2)
    scores = B.asarray(scores_np, backend)
    out = swav_loss(scores, BATCH)
    assert isinstance(out, SwAVLossOutput)
    loss, grad = out  # unpacks to (loss, grad)
    assert loss.shape == () and B.array_namespace(loss) is backend
    assert grad.shape == scores.shape and grad.dtype == scores.dtype
    assert len(out.codes) == 2
    for crop, q in enumerate(out.codes):
        want = sinkhorn_codes(scores[crop * BATCH : (crop + 1) * BATCH, :])
        np.testing.assert_array_equal(B.to_numpy(q), B.to_numpy(want))


def test_queue_joins_sinkhorn_before_the_batch(backend, rng):
    scores_np, queue_np = make_problem(rng, 2, True, 2)
    scores, queue = B.asarray(scores_np, backend), on(backend, queue_np)
    with_queue = swav_loss(scores, BATCH, queue_scores=queue)
    without = swav_loss(scores, BATCH)
    for crop in (0, 1):
        joint = sinkhorn_codes(backend.concat((queue[crop], scores[crop * BATCH : (crop + 1) * BATCH, :])))
        np.testing.assert_array_equal(B.to_numpy(with_queue.codes[crop]), B.to_numpy(joint)[QUEUE:])
        assert np.max(np.abs(B.to_numpy(with_queue.codes[crop]) - B.to_numpy(without.codes[crop]))) > 1e-3
    # a None entry means no queue for that crop
    partial = swav_loss(scores, BATCH, queue_scores=[None, queue[1]])
    np.testing.assert_array_equal(B.to_numpy(partial.codes[0]), B.to_numpy(without.codes[0]))


def test_uniform_predictions_cost_ln_k(backend):
    # equal scores: every prediction is uniform, each term is ln K, and the averaging weights
    # sum to one, so the loss is exactly ln K whatever the codes
    scores = B.asarray(np.full((6 * BATCH, N_PROTOTYPES), 0.3), backend)
    loss, _ = swav_loss(scores, BATCH)
    assert abs(float(loss) - math.log(N_PROTOTYPES)) < 1e-12


def test_float32_close_to_float64(backend, rng):
    scores_np, _ = make_problem(rng, 6, False, 2)
    loss32, grad32 = swav_loss(B.asarray(scores_np, backend, "float32"), BATCH)
    loss64, grad64 = swav_loss(B.asarray(scores_np, backend), BATCH)
    assert loss32.dtype == backend.float32 and grad32.dtype == backend.float32
    assert abs(float(loss32) - float(loss64)) < 1e-5
    assert np.max(np.abs(B.to_numpy(grad32) - B.to_numpy(grad64))) < 1e-5


def test_float32_at_a_small_temperature_is_finite_and_right(rng):
    """Each row's largest logit is subtracted before the softmax: exp(1 / 0.005) = e^200
    overflows float32, and the loss and gradient came back inf and NaN."""
    scores, _ = make_problem(rng, 2, False, 2)
    codes = [sinkhorn_codes(scores[crop * BATCH : (crop + 1) * BATCH, :]) for crop in (0, 1)]
    loss64, grad64 = swapped_prediction_loss(scores, codes, BATCH, temperature=0.005)
    loss32, grad32 = swapped_prediction_loss(scores.astype(np.float32), [q.astype(np.float32) for q in codes],
                                             BATCH, temperature=0.005)
    assert np.isfinite(float(loss32)) and np.all(np.isfinite(grad32))
    assert float(loss32) == pytest.approx(float(loss64), rel=1e-5)
    np.testing.assert_allclose(grad32, grad64, atol=1e-5 * np.abs(grad64).max())


def test_allreduce_hooks_give_every_worker_the_codes_of_the_global_batch(rng):
    """The hooks reach Sinkhorn: two workers with half the images each get the codes of the
    whole batch (the loss itself stays local); dropped, each worker solved its half alone."""
    n_crops, batch = 2, 2 * BATCH
    prototypes = unit_rows(rng.normal(size=(N_PROTOTYPES, DIM)))
    whole = unit_rows(rng.normal(size=(n_crops * batch, DIM))) @ prototypes.T
    expected = swav_loss(whole, batch).codes
    halves = [np.concatenate([whole[v * batch + h * BATCH : v * batch + (h + 1) * BATCH] for v in range(n_crops)])
              for h in (0, 1)]
    workers = ThreadWorkers(2)
    results = workers.run(lambda rank: swav_loss(halves[rank], BATCH, allreduce=workers.allreduce(rank),
                                                 allreduce_max=workers.allreduce(rank, np.maximum)).codes)
    for crop in (0, 1):
        got = np.concatenate([results[rank][crop] for rank in (0, 1)])
        np.testing.assert_allclose(got, expected[crop], atol=1e-12)
    alone = swav_loss(halves[0], BATCH).codes[0]
    assert np.max(np.abs(alone - expected[0][:BATCH])) > 1e-3  # the hooks did matter


@pytest.mark.parametrize(
    "rows, kwargs, match",
    [
        (7, {}, "multiple of batch_size"),
        (3, {}, "at least 2 crops"),
        (6, {"crops_for_assign": (0, 2)}, "crops_for_assign"),
        (6, {"crops_for_assign": (1, 1)}, "crops_for_assign"),
        (6, {"queue_scores": [None]}, "one per assignment crop"),
        (6, {"temperature": 0.0}, "temperature"),
        (6, {"temperature": float("nan")}, "temperature"),
        (6, {"temperature": True}, "temperature"),
        (6, {"crops_for_assign": (True, 0)}, "crops_for_assign"),
    ],
)
def test_bad_input(backend, rows, kwargs, match):
    scores = B.asarray(np.zeros((rows, N_PROTOTYPES)), backend)
    with pytest.raises(ValueError, match=match):
        swav_loss(scores, BATCH, **kwargs)


def test_numpy_scalar_arguments_are_accepted(backend, rng):
    scores_np, _ = make_problem(rng, 4, False, 2)
    scores = B.asarray(scores_np, backend, "float32")
    want = swav_loss(scores, BATCH)
    got = swav_loss(scores, np.int64(BATCH), crops_for_assign=(np.int64(0), np.int64(1)),
                    temperature=np.float32(0.1), epsilon=np.float32(0.05), sinkhorn_iterations=np.int64(3))
    assert got.loss.dtype == backend.float32 and got.grad.dtype == backend.float32
    assert abs(float(got.loss) - float(want.loss)) < 1e-6
    assert np.max(np.abs(B.to_numpy(got.grad) - B.to_numpy(want.grad))) < 1e-6


@pytest.mark.parametrize("batch_size", [True, 3.0, np.float64(3.0), 0, np.int64(-3)])
def test_bad_batch_size(backend, batch_size):
    scores = B.asarray(np.zeros((6, N_PROTOTYPES)), backend)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        swav_loss(scores, batch_size)


def test_scores_that_are_not_cosines_are_an_error_on_numpy(rng):
    # cosines times 30 at eps = 0.05 (outside the contract) underflow in Sinkhorn: named, not NaN
    scores_np, _ = make_problem(rng, 2, False, 2)
    scores_np[0, :] = -1.0
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="should be cosines"):
        swav_loss(30.0 * scores_np.astype(np.float32), BATCH)


def test_bad_queue_or_codes(backend):
    scores = B.asarray(np.zeros((6, N_PROTOTYPES)), backend)
    queue = [B.asarray(np.zeros((4, N_PROTOTYPES + 1)), backend), None]
    with pytest.raises(ValueError, match=r"queue scores of crop 0 have shape \(4, 6\)"):
        swav_loss(scores, BATCH, queue_scores=queue)
    queue = [None, B.asarray(np.zeros((4, N_PROTOTYPES)), backend, "float32")]
    with pytest.raises(ValueError, match="queue scores of crop 1 are"):
        swav_loss(scores, BATCH, queue_scores=queue)
    codes = [B.asarray(np.zeros((BATCH, N_PROTOTYPES)), backend)]
    with pytest.raises(ValueError, match="got 1 code arrays for 2 assignment crops"):
        swapped_prediction_loss(scores, codes, BATCH)
    codes = [B.asarray(np.zeros((BATCH, N_PROTOTYPES + 1)), backend)] * 2
    with pytest.raises(ValueError, match=r"codes of crop 0 have shape \(3, 6\)"):
        swapped_prediction_loss(scores, codes, BATCH)


@pytest.mark.parametrize("dtype", ["int64", "complex128"])
def test_scores_that_are_not_real_floating_point_are_named(backend, dtype):
    """Integer scores failed inside the arithmetic (NumPy's UFuncTypeError) or in Sinkhorn,
    whose message does not name the loss's input."""
    scores = B.asarray(np.ones((2 * BATCH, N_PROTOTYPES)).astype(dtype), backend)
    codes = [B.asarray(np.full((BATCH, N_PROTOTYPES), 1 / N_PROTOTYPES).astype(dtype), backend)] * 2
    match = r"scores must be a real floating-point array, got dtype \S*" + dtype
    with pytest.raises(ValueError, match=match):
        swapped_prediction_loss(scores, codes, BATCH)
    with pytest.raises(ValueError, match=match):
        swav_loss(scores, BATCH)


@pytest.mark.parametrize(
    "row, match",
    [(np.ones(N_PROTOTYPES), "row 1 sums to 5"),  # unnormalised: used to give a wrong loss
     (np.full(N_PROTOTYPES, 1.001 / N_PROTOTYPES), r"row 1 sums to 1\.001 "),  # off by 1e-3: tol is 1e-6
     (np.array([2.0, -1.0, 0.0, 0.0, 0.0]), r"row 1 sums to 1 \(min entry -1\)")],  # not >= 0
)
def test_codes_that_are_not_probability_vectors_are_named_on_numpy(rng, row, match):
    scores, _ = make_problem(rng, 2, False, 2)
    good = B.to_numpy(swav_loss(scores, BATCH).codes[0])
    bad = good.copy()
    bad[1] = row
    with pytest.raises(ValueError, match="codes of crop 1: " + match):
        swapped_prediction_loss(scores, [good, bad], BATCH)


def test_nan_codes_pass_the_row_check_for_the_trainer_to_report(rng):
    """NaN scores (a diverged network) give NaN codes; the loss returns NaN, which the
    trainer's check at its logging boundary turns into advice."""
    scores, _ = make_problem(rng, 2, False, 2)
    scores[0, 0] = np.nan
    assert np.isnan(float(swav_loss(scores, BATCH).loss))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_sinkhorn_codes_pass_the_row_check_at_many_prototypes(rng, dtype):
    """The tolerance admits the rounding of K-term row sums (K = 3000, SwAV's ImageNet K)."""
    prototypes = unit_rows(rng.normal(size=(3000, 16)))
    scores = (unit_rows(rng.normal(size=(2 * 64, 16))) @ prototypes.T).astype(dtype)
    assert np.isfinite(float(swav_loss(scores, 64).loss))
