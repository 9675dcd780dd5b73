"""Error paths that no other test reached: each guard is called once with the input it
exists to refuse, and the message must name the problem.

Where the guarded code would otherwise run on (a gradient of the wrong shape that
broadcasts, a list of gradients that ``zip`` truncates), the bad input is chosen so that a
missing guard gives a silently wrong result rather than some other error; the match on the
guard's own words keeps a later, unrelated exception from passing for it.
"""

from __future__ import annotations

import numpy as np
import pytest

from swav_ref import backend as B
from swav_ref.checkpoint import CheckpointError, save_checkpoint
from swav_ref.deepcluster import spherical_kmeans
from swav_ref.nn import functional as F
from swav_ref.swav import sinkhorn_codes, swapped_prediction_loss, swav_loss
from swav_ref.swav.head import SwAVHead
from swav_ref.train import load_trainer_checkpoint


def _zeros(xp, shape, dtype="float64"):
    return B.asarray(np.zeros(shape), xp, dtype)


def _normal(xp, rng, shape):
    return B.asarray(rng.normal(size=shape), xp, "float64")


# -- sinkhorn_codes ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_sinkhorn_codes_refuses_an_empty_axis(backend, shape):
    """Zero samples or zero prototypes: without the guard the max over an empty axis
    fails with the array library's own words (or codes of shape (0, K) come back)."""
    with pytest.raises(ValueError, match=rf"sinkhorn_codes: scores has an empty axis, shape \({shape[0]}, {shape[1]}\)"):
        sinkhorn_codes(_zeros(backend, shape))


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_sinkhorn_codes_refuses_scores_that_are_not_floating_point(backend, dtype):
    """Integer (or boolean) scores would be iterated in float32 and the codes cast back to
    the input's dtype: all zeros for integers (every code is below 1), all True for bool."""
    with pytest.raises(ValueError, match="sinkhorn_codes: scores must be a floating-point array, got"):
        sinkhorn_codes(_zeros(backend, (3, 2), dtype))


# -- swav_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (6, 5, 1)])
def test_swav_loss_refuses_scores_that_are_not_2d(backend, shape):
    """The loss's own 2-D check, naming the stacked layout. Without it, 3-D scores reach
    Sinkhorn, whose message ("(batch, prototypes)") does not say how the crops are stacked."""
    with pytest.raises(ValueError, match=r"scores must be 2-D \(n_crops \* batch_size, K\), got shape"):
        swav_loss(_zeros(backend, shape), 3)


def test_swapped_prediction_loss_refuses_codes_of_another_dtype_than_the_scores(backend):
    """float32 codes against float64 scores would silently promote (NumPy) or fail inside
    the arithmetic (array_api_strict); the loss's dtype must be the scores'."""
    scores = _zeros(backend, (6, 5))
    codes = [_zeros(backend, (3, 5), "float32"), _zeros(backend, (3, 5))]
    with pytest.raises(ValueError, match=r"codes of crop 0 are \S*float32, scores are \S*float64"):
        swapped_prediction_loss(scores, codes, 3)


# -- SwAVHead.backward -------------------------------------------------------------------


def test_swav_head_backward_without_a_pending_forward_is_refused():
    """A backward with no forward cache would pop from an empty list (IndexError) or,
    worse, use a stale cache."""
    head = SwAVHead(6, 0, 4, (5,), dtype="float64", rng=0)
    with pytest.raises(RuntimeError, match="SwAVHead.backward called with no pending forward"):
        head.backward([np.ones((3, 5))])


@pytest.mark.parametrize(("sets", "n_grads"), [((5,), 2), ((5, 3), 1)])
def test_swav_head_backward_refuses_the_wrong_number_of_prototype_sets(sets, n_grads):
    """One score gradient per prototype set: zip would drop the extra ones, or leave a set
    without a gradient, with no error."""
    head = SwAVHead(6, 0, 4, sets, dtype="float64", rng=0)
    head.forward(np.ones((3, 6)))
    dscores = [np.ones((3, sets[0]))] * n_grads
    with pytest.raises(ValueError, match=rf"SwAVHead.backward: {n_grads} score gradients for {len(sets)} prototype sets"):
        head.backward(dscores)
    head.backward([np.ones((3, k)) for k in sets])  # the refusal lost nothing: the forward is still pending


# -- spherical_kmeans --------------------------------------------------------------------


def test_spherical_kmeans_refuses_an_unknown_init():
    """A misspelt init ("kmeans++") must not be taken for an array of centroids."""
    x = np.eye(4)
    with pytest.raises(ValueError, match=r"spherical_kmeans: unknown init 'kmeans\+\+'; use 'k-means\+\+', 'random'"):
        spherical_kmeans(x, 2, 1, B.Random(0), init="kmeans++")


# -- nn.functional -----------------------------------------------------------------------


def test_batchnorm_running_statistics_need_a_training_mode_forward(backend):
    """An eval-mode cache holds the running statistics themselves, not the batch's: updating
    from it would feed them back in (and inflate the running variance by the m / (m - 1)
    correction meant for a batch variance)."""
    x = _normal(backend, np.random.default_rng(0), (4, 3))
    ones, zeros = _zeros(backend, (3,)) + 1.0, _zeros(backend, (3,))
    _, cache = F.batchnorm_forward(x, ones, zeros, zeros, ones, training=False)
    with pytest.raises(ValueError, match="running statistics are only updated from a training-mode forward"):
        F.batchnorm_update_running(zeros, ones, cache)


def _conv(xp, rng):
    x, w = _normal(xp, rng, (2, 2, 5, 6)), _normal(xp, rng, (3, 2, 3, 3))
    out, cache = F.conv2d_forward(x, w, None, 1, 1)  # out (2, 3, 5, 6)
    # 6 channels for 3, same size: without the check the reshape to (3, ...) succeeds
    return F.conv2d_backward, cache, out.shape, (2, 6, 5, 3), r"dout must be \(N, 3, H_out, W_out\), got \(2, 6, 5, 3\)"


def _batchnorm(xp, rng):
    x = _normal(xp, rng, (2, 3, 4, 5))
    ones, zeros = _zeros(xp, (3,)) + 1.0, _zeros(xp, (3,))
    out, cache = F.batchnorm_forward(x, ones, zeros)
    # H and W swapped: the same number of values per channel, so the rows line up silently
    return F.batchnorm_backward, cache, out.shape, (2, 3, 5, 4), \
        r"dout has shape \(2, 3, 5, 4\), the forward output had \(2, 3, 4, 5\)"


def _linear(xp, rng):
    out, cache = F.linear_forward(_normal(xp, rng, (4, 3)), _normal(xp, rng, (2, 3)), _normal(xp, rng, (2,)))
    # one row for four: without the check, NumPy's matmul fails in its own words, naming no layer
    return F.linear_backward, cache, out.shape, (1, 2), r"dout must be \(4, 2\), got \(1, 2\)"


def _global_avg_pool(xp, rng):
    out, cache = F.global_avg_pool_forward(_normal(xp, rng, (2, 3, 4, 4)))
    # transposed: (3, 2) reshapes to (3, 1, 1, 2) as well as (2, 3) does
    return F.global_avg_pool_backward, cache, out.shape, (3, 2), r"dout must be \(2, 3\), got \(3, 2\)"


def _maxpool(xp, rng):
    out, cache = F.maxpool2d_forward(_normal(xp, rng, (2, 3, 4, 4)), 2)  # out (2, 3, 2, 2)
    # (2, 3, 1, 1) broadcasts against the winners' mask
    return F.maxpool2d_backward, cache, out.shape, (2, 3, 1, 1), r"dout must be \(2, 3, 2, 2\), got \(2, 3, 1, 1\)"


@pytest.mark.parametrize("case", [_conv, _batchnorm, _linear, _global_avg_pool, _maxpool],
                         ids=["conv2d", "batchnorm", "linear", "global_avg_pool", "maxpool2d"])
def test_backward_refuses_a_gradient_of_the_wrong_shape(backend, case):
    """Each backward checks its incoming gradient's shape before using the cache. The bad
    shapes are ones the arithmetic would otherwise accept (a silently wrong gradient), but
    for linear, where no such shape exists. The refused call must leave the cache usable
    (conv's is used up by a backward)."""
    rng = np.random.default_rng(0)
    backward, cache, good_shape, bad_shape, match = case(backend, rng)
    with pytest.raises(ValueError, match=match):
        backward(_zeros(backend, bad_shape), cache)
    backward(_zeros(backend, tuple(good_shape)), cache)


# -- train.load_trainer_checkpoint --------------------------------------------------------


@pytest.mark.parametrize(("metadata", "shown"), [({"format": "swav_ref.encoder/1"}, "'swav_ref.encoder/1'"),
                                                 ({"epoch": 3}, "None")])
def test_load_trainer_checkpoint_refuses_a_checkpoint_of_another_format(tmp_path, metadata, shown):
    """A valid swav_ref checkpoint that a Trainer did not write (another format, or none):
    without the check, the missing "config" would surface as a bare KeyError."""
    path = save_checkpoint(tmp_path / "other.npz", {"w": np.zeros(3)}, metadata)
    with pytest.raises(CheckpointError, match=rf"other\.npz: not a swav_ref trainer checkpoint \(format {shown}\)"):
        load_trainer_checkpoint(path)


def test_load_trainer_checkpoint_refuses_a_workers_local_file(tmp_path):
    """checkpoint.rank0.step10.local.npz has the trainer's format but only a worker's queue
    or memory bank: a bare KeyError 'config' before."""
    from swav_ref.resume import CHECKPOINT_FORMAT

    path = save_checkpoint(tmp_path / "checkpoint.rank0.step10.local.npz", {"queue.embeddings": np.zeros(3)},
                           {"format": CHECKPOINT_FORMAT, "step": 10})
    with pytest.raises(CheckpointError, match="a worker's local state file.*checkpoint.npz beside it"):
        load_trainer_checkpoint(path)


def test_load_trainer_checkpoint_refuses_a_plain_npz(tmp_path):
    """A NumPy archive of arrays (no swav_ref metadata) is refused by the checkpoint layer
    underneath, with the same exception type."""
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a swav_ref checkpoint: missing keys"):
        load_trainer_checkpoint(path)
