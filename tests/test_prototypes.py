"""The prototype layer: gradients into z and C through the swapped loss, re-normalisation, freezing."""

from __future__ import annotations

import numpy as np
import pytest

import required

from swav_ref import backend as B
from swav_ref.nn.gradcheck import check_gradient
from swav_ref.swav import (
    normalize_prototypes,
    prototypes_backward,
    prototypes_forward,
    prototypes_frozen,
    swapped_prediction_loss,
    swav_loss,
)

BATCH, N_PROTOTYPES, DIM, QUEUE = 3, 5, 4, 6

SETTINGS = [(2, False), (6, False), (2, True), (6, True)]  # (n_crops, queue?)


def make_problem(rng, backend, n_crops, with_queue):
    z = B.asarray(rng.normal(size=(n_crops * BATCH, DIM)), backend)
    weight = normalize_prototypes(B.asarray(rng.normal(size=(N_PROTOTYPES, DIM)), backend))
    queue = None
    if with_queue:
        queued = rng.normal(size=(2, QUEUE, DIM))
        queued /= np.linalg.norm(queued, axis=2, keepdims=True)
        queue = [B.asarray(e, backend) for e in queued]
    return z, weight, queue


@pytest.mark.parametrize("n_crops, with_queue", SETTINGS)
def test_gradients_into_z_and_prototypes(backend, rng, n_crops, with_queue):
    z, weight, queue = make_problem(rng, backend, n_crops, with_queue)
    scores, cache = prototypes_forward(z, weight)
    queue_scores = None if queue is None else [e @ weight.T for e in queue]
    out = swav_loss(scores, BATCH, queue_scores=queue_scores)
    dz, dweight = prototypes_backward(out.grad, cache)

    # the codes (computed once, above) are constants: perturbing z or C changes the scores,
    # not the targets, so the numerical loss reuses out.codes
    def loss_with_fixed_codes():
        s, _ = prototypes_forward(z, weight)
        return float(swapped_prediction_loss(s, out.codes, BATCH)[0])

    assert check_gradient(loss_with_fixed_codes, z, dz) < 1e-6
    assert check_gradient(loss_with_fixed_codes, weight, dweight) < 1e-6


@pytest.mark.parametrize("n_crops, with_queue", SETTINGS)
def test_agrees_with_torch_autograd(backend, rng, n_crops, with_queue):
    torch = required.module("torch")
    import torch.nn.functional as F

    z, weight, queue = make_problem(rng, backend, n_crops, with_queue)
    scores, cache = prototypes_forward(z, weight)
    queue_scores = None if queue is None else [e @ weight.T for e in queue]
    out = swav_loss(scores, BATCH, queue_scores=queue_scores)
    dz, dweight = prototypes_backward(out.grad, cache)

    z_t = torch.tensor(B.to_numpy(z), requires_grad=True)
    w_t = torch.tensor(B.to_numpy(weight), requires_grad=True)
    scores_t = F.normalize(z_t, dim=1, p=2) @ w_t.t()
    loss_t = 0
    for i, crop in enumerate((0, 1)):
        with torch.no_grad():
            s = scores_t[crop * BATCH : (crop + 1) * BATCH]
            if queue is not None:  # queue scores use the current prototypes, no gradient
                s = torch.cat((torch.tensor(B.to_numpy(queue[i])) @ w_t.t(), s))
            q = torch.exp(s / 0.05).t()
            q /= q.sum()
            for _ in range(3):
                q /= q.sum(dim=1, keepdim=True) * q.shape[0]
                q /= q.sum(dim=0, keepdim=True) * q.shape[1]
            q = (q * q.shape[1]).t()[-BATCH:]
        sub = 0
        for v in [v for v in range(n_crops) if v != crop]:
            log_p = F.log_softmax(scores_t[v * BATCH : (v + 1) * BATCH] / 0.1, dim=1)
            sub -= torch.mean(torch.sum(q * log_p, dim=1))
        loss_t += sub / (n_crops - 1)
    loss_t /= 2
    loss_t.backward()

    assert abs(float(out.loss) - loss_t.item()) < 1e-10
    assert np.max(np.abs(B.to_numpy(dz) - z_t.grad.numpy())) < 1e-10
    assert np.max(np.abs(B.to_numpy(dweight) - w_t.grad.numpy())) < 1e-10


def test_forward_scores_are_cosines(backend, rng):
    z, weight, _ = make_problem(rng, backend, 2, False)
    scores, cache = prototypes_forward(3.0 * z, weight)
    emb = B.to_numpy(cache.embedding)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-12)
    zn = B.to_numpy(z)
    want = (zn / np.linalg.norm(zn, axis=1, keepdims=True)) @ B.to_numpy(weight).T
    np.testing.assert_allclose(B.to_numpy(scores), want, rtol=1e-12, atol=1e-14)
    assert np.all(np.abs(want) <= 1.0 + 1e-12)


def test_normalize_prototypes(backend, rng):
    w_np = rng.normal(size=(N_PROTOTYPES, DIM)) * 3.0
    w = B.asarray(w_np, backend)
    unit = normalize_prototypes(w)
    assert B.array_namespace(unit) is backend
    u = B.to_numpy(unit)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(u * np.linalg.norm(w_np, axis=1, keepdims=True), w_np, rtol=1e-12)
    np.testing.assert_array_equal(B.to_numpy(w), w_np)  # the input is not modified


def test_prototypes_frozen():
    assert prototypes_frozen(0, 313) and prototypes_frozen(312, 313)
    assert not prototypes_frozen(313, 313)
    assert not prototypes_frozen(0, 0)
    assert prototypes_frozen(np.int64(2), 3)
    with pytest.raises(ValueError, match="iteration"):
        prototypes_frozen(-1, 3)
    with pytest.raises(ValueError, match="freeze_iters"):
        prototypes_frozen(1, 2.5)


def test_shape_mismatch(backend):
    z = B.asarray(np.ones((3, 4)), backend)
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(5, 3\)"):
        prototypes_forward(z, B.asarray(np.ones((5, 3)), backend))
    with pytest.raises(ValueError, match="weight must be"):
        normalize_prototypes(B.asarray(np.ones(3), backend))
