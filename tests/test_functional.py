"""The pure forward/backward pairs of swav_ref.nn.functional.

Oracles: float64 central differences (rel_error < 1e-6) on every backend, a direct loop
implementation of im2col, the adjoint identity of im2col/col2im, and PyTorch's functional
ops (1e-10 in float64) when torch imports.
"""

from __future__ import annotations

import numpy as np
import pytest

import required

from swav_ref.backend import asarray, to_numpy
from swav_ref.nn import functional as F
from swav_ref.nn.gradcheck import check_gradient, rel_error
from thread_workers import ThreadWorkers

TOL = 1e-6

# (N, C, H, W, O, k, stride, padding): odd, non-square shapes, kernels 1 and 3
CONV_CASES = [
    (2, 2, 5, 6, 3, 3, 1, 1),
    (2, 2, 5, 6, 3, 3, 2, 0),
    (1, 3, 6, 5, 2, 3, 2, 1),
    (2, 3, 4, 5, 2, 1, 1, 0),
    (2, 2, 5, 4, 3, 1, 2, 0),
    (1, 2, 3, 4, 2, 3, 3, 2),
    (2, 2, 3, 4, 3, 1, 1, 1),  # 1x1 with padding (not the column-free shortcut)
]


def _arr(rng, shape, xp):
    return asarray(rng.normal(size=shape), xp, "float64")


def _loss_against(r):
    """A scalar loss sum(out * r) whose gradient with respect to out is r."""
    return lambda out: float(np.sum(to_numpy(out) * to_numpy(r)))


# -- convolution -------------------------------------------------------------------------


def _naive_im2col(x, k, stride, padding):
    """The definition, with loops: row (c, i, j), column (u, v, n) (batch last)."""
    n, c, h, w = x.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    cols = np.zeros((c * k * k, n * oh * ow))
    for ci in range(c):
        for i in range(k):
            for j in range(k):
                for b in range(n):
                    for u in range(oh):
                        for v in range(ow):
                            cols[(ci * k + i) * k + j, (u * ow + v) * n + b] = xp_[b, ci, stride * u + i, stride * v + j]
    return cols


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_matches_definition_and_col2im_is_its_adjoint(backend, case, rng):
    n, c, h, w, _, k, s, p = case
    x = rng.normal(size=(n, c, h, w))
    cols = F.im2col(asarray(x, backend), (k, k), s, p)
    np.testing.assert_array_equal(to_numpy(cols), _naive_im2col(x, k, s, p))
    # <im2col(x), G> = <x, col2im(G)> for every x, G: col2im is the transpose
    g = rng.normal(size=cols.shape)
    back = to_numpy(F.col2im(asarray(g, backend), x.shape, (k, k), s, p))
    assert back.shape == x.shape
    np.testing.assert_allclose(np.sum(_naive_im2col(x, k, s, p) * g), np.sum(x * back), rtol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradients(backend, case, rng):
    n, c, h, w, o, k, s, p = case
    x, weight, bias = _arr(rng, (n, c, h, w), backend), _arr(rng, (o, c, k, k), backend), _arr(rng, (o,), backend)
    out, cache = F.conv2d_forward(x, weight, bias, s, p)
    r = _arr(rng, out.shape, backend)
    dx, dw, db = F.conv2d_backward(r, cache)
    loss = _loss_against(r)
    f = lambda: loss(F.conv2d_forward(x, weight, bias, s, p)[0])  # noqa: E731
    assert check_gradient(f, x, dx) < TOL
    assert check_gradient(f, weight, dw) < TOL
    assert check_gradient(f, bias, db) < TOL


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch(case, rng):
    torch = required.module("torch")
    n, c, h, w, o, k, s, p = case
    x, weight, bias = rng.normal(size=(n, c, h, w)), rng.normal(size=(o, c, k, k)), rng.normal(size=o)
    out, cache = F.conv2d_forward(x, weight, bias, s, p)
    r = rng.normal(size=out.shape)
    dx, dw, db = F.conv2d_backward(r, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    tout = torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p)
    tout.backward(torch.tensor(r))
    assert rel_error(out, tout.detach().numpy()) < 1e-10
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        assert rel_error(ours, theirs.grad.numpy()) < 1e-10


def test_conv2d_reuses_scratch_buffers_safely(backend, rng):
    """Column matrices go back to SCRATCH after the backward and are reused by the next
    forward; results must not depend on what the reused buffer held before."""
    F.SCRATCH.clear()
    weight = _arr(rng, (3, 2, 3, 3), backend)
    xs = [_arr(rng, (2, 2, 5, 4), backend) for _ in range(3)]
    r = _arr(rng, (2, 3, 5, 4), backend)
    first = [F.conv2d_backward(r, F.conv2d_forward(x, weight, None, 1, 1)[1]) for x in xs]
    assert F.SCRATCH.nbytes() > 0
    held = F.SCRATCH.nbytes()
    again = [F.conv2d_backward(r, F.conv2d_forward(x, weight, None, 1, 1)[1]) for x in reversed(xs)]
    assert F.SCRATCH.nbytes() == held  # reused, not grown
    for a, b in zip(first, reversed(again)):
        for ga, gb in zip(a[:2], b[:2]):
            np.testing.assert_array_equal(to_numpy(ga), to_numpy(gb))
    F.SCRATCH.clear()
    assert F.SCRATCH.nbytes() == 0


def test_conv2d_cache_is_used_once(rng):
    out, cache = F.conv2d_forward(rng.normal(size=(1, 2, 4, 4)), rng.normal(size=(2, 2, 3, 3)), None, 1, 1)
    F.conv2d_backward(np.ones(out.shape), cache)
    with pytest.raises(RuntimeError, match="already used"):
        F.conv2d_backward(np.ones(out.shape), cache)
    with pytest.raises(ValueError, match="out must be"):
        F.im2col(np.zeros((1, 2, 4, 4)), (3, 3), 1, 1, out=np.zeros((5, 5)))


def test_conv2d_without_bias(rng):
    x, weight = rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(3, 2, 3, 3))
    out_nb, cache = F.conv2d_forward(x, weight, None, 1, 1)
    out_zero, _ = F.conv2d_forward(x, weight, np.zeros(3), 1, 1)
    np.testing.assert_allclose(out_nb, out_zero)
    assert F.conv2d_backward(np.ones(out_nb.shape), cache)[2] is None


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs, match",
    [
        ((2, 3, 5, 5), (4, 2, 3, 3), {}, "channels"),
        ((3, 5, 5), (4, 3, 3, 3), {}, r"\(N, C, H, W\)"),
        ((1, 3, 2, 2), (4, 3, 3, 3), {}, "smaller than the kernel"),
        ((1, 3, 5, 5), (4, 3, 3, 3), {"stride": 0}, "stride"),
        ((1, 3, 5, 5), (4, 3, 3, 3), {"padding": -1}, "padding"),
    ],
)
def test_conv2d_rejects_bad_input(x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.conv2d_forward(np.zeros(x_shape), np.zeros(w_shape), **kwargs)


# -- batch normalisation -----------------------------------------------------------------

BN_SHAPES = [(5, 3), (3, 2, 3, 4)]


def _bn_inputs(rng, shape, xp):
    c = shape[1]
    x = _arr(rng, shape, xp) * 2.0 + 0.5
    weight = asarray(rng.uniform(0.5, 1.5, size=c), xp, "float64")
    bias = _arr(rng, (c,), xp)
    running_mean = _arr(rng, (c,), xp)
    running_var = asarray(rng.uniform(0.5, 2.0, size=c), xp, "float64")
    return x, weight, bias, running_mean, running_var


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(backend, shape, training, rng):
    x, weight, bias, rm, rv = _bn_inputs(rng, shape, backend)

    def forward():
        return F.batchnorm_forward(x, weight, bias, rm, rv, training=training)

    out, cache = forward()
    r = _arr(rng, out.shape, backend)
    dx, dw, db = F.batchnorm_backward(r, cache)
    loss = _loss_against(r)
    f = lambda: loss(forward()[0])  # noqa: E731
    assert check_gradient(f, x, dx) < TOL
    assert check_gradient(f, weight, dw) < TOL
    assert check_gradient(f, bias, db) < TOL


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_torch(shape, training, rng):
    """Including the default eps, PyTorch's 1e-5 (a notebook holds the two side by side)."""
    torch = required.module("torch")
    x, weight, bias, rm, rv = _bn_inputs(rng, shape, np)
    out, cache = F.batchnorm_forward(x, weight, bias, rm, rv, training=training)
    r = rng.normal(size=out.shape)
    dx, dw, db = F.batchnorm_backward(r, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    tout = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=0.1)
    tout.backward(torch.tensor(r))
    assert rel_error(out, tout.detach().numpy()) < 1e-10
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        assert rel_error(ours, theirs.grad.numpy()) < 1e-10
    if training:  # torch updated its running statistics in place; ours are returned
        new_mean, new_var = F.batchnorm_update_running(rm, rv, cache, momentum=0.1)
        assert rel_error(new_mean, trm.numpy()) < 1e-12
        assert rel_error(new_var, trv.numpy()) < 1e-12


@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 3, 3)])
def test_sync_batchnorm_equals_one_big_batch(backend, shape, rng):
    x, weight, bias, rm, rv = _bn_inputs(rng, shape, backend)
    r = _arr(rng, shape, backend)
    out, cache = F.batchnorm_forward(x, weight, bias)
    dx, dw, db = F.batchnorm_backward(r, cache)
    mean, var = F.batchnorm_update_running(rm, rv, cache)
    half = shape[0] // 2
    parts = [slice(0, half), slice(half, shape[0])]

    workers = ThreadWorkers(2)

    def worker(rank):
        o, c = F.batchnorm_forward(x[parts[rank], ...], weight, bias, allreduce=workers.allreduce(rank))
        grads = F.batchnorm_backward(r[parts[rank], ...], c)
        return o, grads, F.batchnorm_update_running(rm, rv, c)

    (o0, g0, s0), (o1, g1, s1) = workers.run(worker)
    assert rel_error(np.concatenate([to_numpy(o0), to_numpy(o1)]), out) < 1e-12
    assert rel_error(np.concatenate([to_numpy(g0[0]), to_numpy(g1[0])]), dx) < 1e-12
    # parameter gradients are per worker; the data-parallel all-reduce adds them up
    assert rel_error(to_numpy(g0[1]) + to_numpy(g1[1]), dw) < 1e-12
    assert rel_error(to_numpy(g0[2]) + to_numpy(g1[2]), db) < 1e-12
    for s in (s0, s1):  # the running statistics use the global count (unbiased variance)
        assert rel_error(s[0], mean) < 1e-12 and rel_error(s[1], var) < 1e-12
    # and a single local batch would NOT give the big-batch gradient (the test can fail)
    o_local, c_local = F.batchnorm_forward(x[parts[0], ...], weight, bias)
    assert rel_error(F.batchnorm_backward(r[parts[0], ...], c_local)[0], to_numpy(g0[0])) > 1e-3


def test_sync_batchnorm_with_the_running_mean_as_shift_equals_one_big_batch(backend, rng):
    x, weight, bias, rm, rv = _bn_inputs(rng, (6, 3), backend)
    out, _ = F.batchnorm_forward(x, weight, bias)

    workers = ThreadWorkers(2)

    def worker(rank):
        return F.batchnorm_forward(x[3 * rank : 3 * rank + 3, ...], weight, bias, rm, rv,
                                   allreduce=workers.allreduce(rank))[0]

    assert rel_error(np.concatenate([to_numpy(o) for o in workers.run(worker)]), out) < 1e-12


def test_sync_batchnorm_variance_keeps_float32_precision_far_from_zero():
    """A channel at mean 30, std 1: the variance from sums of x and x^2 loses 3 to 4 digits in
    float32; from sums of x - running mean (near 30 once it has caught up) it keeps them."""
    rng = np.random.default_rng(0)
    x = (30.0 + rng.normal(size=(4096, 2))).astype(np.float32)
    truth = x.astype(np.float64).var(axis=0)
    weight, bias = np.ones(2, np.float32), np.zeros(2, np.float32)

    def variance(running_mean):
        cache = F.batchnorm_forward(x, weight, bias, running_mean, np.ones(2, np.float32), allreduce=lambda a: a)[1]
        return np.max(np.abs(cache.var - truth) / truth)

    assert variance(np.full(2, 29.9, np.float32)) < 2e-6
    assert variance(np.zeros(2, np.float32)) > 2e-5  # no shift: the cancellation the shift avoids


def test_sync_batchnorm_variance_never_goes_negative():
    """E[x^2] - E[x]^2 of a nearly constant float32 channel at 77.7 cancels to a small
    negative number; unclamped, var + eps < 0 gave NaN outputs."""
    x = (np.float32(77.7) + np.float32(1e-3) * np.arange(6, dtype=np.float32))[:, None]
    out, cache = F.batchnorm_forward(x, np.ones(1, np.float32), np.zeros(1, np.float32), allreduce=lambda a: a)
    assert float(cache.var[0]) >= 0 and np.all(np.isfinite(out))


def test_batchnorm_rejects_bad_input():
    with pytest.raises(ValueError, match="eps must be >= 0, got -0.001"):  # var + eps < 0: NaN
        F.batchnorm_forward(np.ones((4, 2)), np.ones(2), np.zeros(2), eps=-1e-3)
    with pytest.raises(ValueError, match="more than 1 value"):
        F.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, H, W\)"):
        F.batchnorm_forward(np.ones((2, 3, 4)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="running_mean"):
        F.batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), training=False)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        F.batchnorm_forward(np.ones((2, 3)), np.ones(4), np.zeros(3))


# -- element-wise, linear, pooling, add, loss ----------------------------------------------


def test_relu_gradient(backend, rng):
    a = rng.normal(size=(3, 4, 2, 5))
    a = np.where(np.abs(a) < 0.05, 0.5, a)  # keep away from the kink
    x = asarray(a, backend)
    out, cache = F.relu_forward(x)
    np.testing.assert_array_equal(to_numpy(out), np.maximum(a, 0))
    r = _arr(rng, out.shape, backend)
    dx = F.relu_backward(r, cache)
    assert check_gradient(lambda: _loss_against(r)(F.relu_forward(x)[0]), x, dx) < TOL


def test_linear_gradients_and_torch(backend, rng):
    x, weight, bias = _arr(rng, (4, 5), backend), _arr(rng, (3, 5), backend), _arr(rng, (3,), backend)
    out, cache = F.linear_forward(x, weight, bias)
    r = _arr(rng, out.shape, backend)
    dx, dw, db = F.linear_backward(r, cache)
    f = lambda: _loss_against(r)(F.linear_forward(x, weight, bias)[0])  # noqa: E731
    for a, g in ((x, dx), (weight, dw), (bias, db)):
        assert check_gradient(f, a, g) < TOL
    torch = required.module("torch")
    tx, tw, tb = (torch.tensor(to_numpy(a), requires_grad=True) for a in (x, weight, bias))
    tout = torch.nn.functional.linear(tx, tw, tb)
    tout.backward(torch.tensor(to_numpy(r)))
    assert rel_error(out, tout.detach().numpy()) < 1e-10
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        assert rel_error(ours, theirs.grad.numpy()) < 1e-10


def test_linear_without_bias(rng):
    """No bias: no bias gradient (None, which the optimiser skips), not a zero array."""
    x, weight = rng.normal(size=(2, 3)), rng.normal(size=(4, 3))
    out, cache = F.linear_forward(x, weight)
    np.testing.assert_allclose(out, x @ weight.T)
    assert F.linear_backward(np.ones(out.shape), cache)[2] is None


def test_linear_refuses_a_bias_that_would_broadcast():
    """A (1,) bias used to broadcast over every output unit: a silently shared bias."""
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(1,\)"):
        F.linear_forward(np.ones((2, 3)), np.ones((4, 3)), np.ones(1))


def test_global_avg_pool_gradient(backend, rng):
    x = _arr(rng, (2, 3, 3, 5), backend)
    out, cache = F.global_avg_pool_forward(x)
    np.testing.assert_allclose(to_numpy(out), to_numpy(x).mean(axis=(2, 3)), rtol=1e-12)
    r = _arr(rng, out.shape, backend)
    dx = F.global_avg_pool_backward(r, cache)
    assert check_gradient(lambda: _loss_against(r)(F.global_avg_pool_forward(x)[0]), x, dx) < TOL


MAXPOOL_CASES = [(2, 2, 0, (2, 2, 6, 5)), (3, 2, 1, (2, 2, 7, 6)), (3, 1, 1, (1, 2, 4, 5)), (2, 1, 0, (1, 1, 3, 4))]


@pytest.mark.parametrize("k, s, p, shape", MAXPOOL_CASES)
def test_maxpool_gradient(backend, k, s, p, shape, rng):
    x = _arr(rng, shape, backend)
    out, cache = F.maxpool2d_forward(x, k, s, p)
    r = _arr(rng, out.shape, backend)
    dx = F.maxpool2d_backward(r, cache)
    assert check_gradient(lambda: _loss_against(r)(F.maxpool2d_forward(x, k, s, p)[0]), x, dx) < TOL


@pytest.mark.parametrize("k, s, p, shape", MAXPOOL_CASES)
def test_maxpool_matches_torch(k, s, p, shape, rng):
    torch = required.module("torch")
    x = rng.normal(size=shape)
    x[0, 0, :2, :2] = 1.0  # a tie: both pick the first maximum of the window
    out, cache = F.maxpool2d_forward(x, k, s, p)
    r = rng.normal(size=out.shape)
    dx = F.maxpool2d_backward(r, cache)
    tx = torch.tensor(x, requires_grad=True)
    tout = torch.nn.functional.max_pool2d(tx, k, s, p)
    tout.backward(torch.tensor(r))
    assert rel_error(out, tout.detach().numpy()) < 1e-10
    assert rel_error(dx, tx.grad.numpy()) < 1e-10


def test_maxpool_passes_a_nan_on_wherever_it_sits_in_the_window():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan  # the second offset of the first window: `>` alone skipped it
    out, cache = F.maxpool2d_forward(x, 2, 2, 0)
    assert np.isnan(out[0, 0, 0, 0]) and not np.isnan(out[0, 0, 1:, :]).any()
    dx = F.maxpool2d_backward(np.ones_like(out), cache)
    assert dx[0, 0, 0, 1] == 1.0 and dx[0, 0, :2, :2].sum() == 1.0  # the NaN took the gradient
    torch = required.module("torch")
    tout = torch.nn.functional.max_pool2d(torch.tensor(x), 2, 2, 0).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(tout))


def test_maxpool_with_a_1x1_window_returns_a_new_array(backend, rng):
    """With k = 1 the output is the input's (strided) view unless copied: an in-place
    operation on it (ReLU, the next layer's) then changed the layer's input too."""
    x = _arr(rng, (1, 2, 4, 4), backend)
    before = to_numpy(x).copy()
    out, _ = F.maxpool2d_forward(x, 1, 2, 0)
    out *= 0.0
    np.testing.assert_array_equal(to_numpy(x), before)


def test_maxpool_rejects_large_padding():
    with pytest.raises(ValueError, match="at most half"):
        F.maxpool2d_forward(np.zeros((1, 1, 4, 4)), 2, 2, 2)


def test_add_pair(rng):
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    out, cache = F.add_forward(a, b)
    np.testing.assert_array_equal(out, a + b)
    da, db = F.add_backward(np.ones((2, 3)), cache)
    np.testing.assert_array_equal(da, np.ones((2, 3)))
    np.testing.assert_array_equal(db, np.ones((2, 3)))
    with pytest.raises(ValueError, match="equal shapes"):
        F.add_forward(a, np.zeros((2, 1)))


def test_softmax_cross_entropy(backend, rng):
    logits = _arr(rng, (5, 4), backend) * 3.0
    labels = asarray(np.array([0, 3, 1, 3, 2]), backend, "int64")
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    dlogits = F.softmax_cross_entropy_backward(1.0, cache)
    f = lambda: float(F.softmax_cross_entropy_forward(logits, labels)[0])  # noqa: E731
    assert check_gradient(f, logits, dlogits) < TOL
    torch = required.module("torch")
    tl = torch.tensor(to_numpy(logits), requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tl, torch.tensor(to_numpy(labels)))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) < 1e-12
    assert rel_error(dlogits, tl.grad.numpy()) < 1e-10


def test_softmax_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="integers"):
        F.softmax_cross_entropy_forward(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=r"labels \(N,\)"):
        F.softmax_cross_entropy_forward(np.zeros((2, 3)), np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("labels, bad", [([0, 3, 1], r"\[3\]"), ([-1, 2, 5], r"\[-1, 5\]")])
def test_softmax_cross_entropy_rejects_labels_outside_the_classes_on_numpy(labels, bad):
    # a label >= K or < 0 used to give a zero one-hot row and a silently wrong loss
    with pytest.raises(ValueError, match=r"\[0, 3\) for K=3 classes, got " + bad):
        F.softmax_cross_entropy_forward(np.zeros((3, 3)), np.array(labels))
    F.softmax_cross_entropy_forward(np.zeros((3, 3)), np.array([0, 2, 1], dtype=np.uint8))  # in range


def test_l2_normalize_gradient(backend, rng):
    x = _arr(rng, (3, 4), backend)
    out, cache = F.l2_normalize_forward(x)
    r = _arr(rng, out.shape, backend)
    dx = F.l2_normalize_backward(r, cache)
    assert check_gradient(lambda: _loss_against(r)(F.l2_normalize_forward(x)[0]), x, dx) < TOL


def test_l2_normalize_of_rows_shorter_than_eps(rng):
    """At the default eps, PyTorch's 1e-12: a row of length 1e-8 is still normalised (a
    larger default returned tiny embeddings as they were)."""
    eps = 1e-12
    x = rng.normal(size=(4, 5))
    x[1] *= 1e-14  # clamped: divided by eps, so the gradient is dy / eps
    x[2] = 0.0
    x[3] *= 1e-8 / np.linalg.norm(x[3])  # short, but longer than eps: unit length
    out, cache = F.l2_normalize_forward(x)
    r = rng.normal(size=out.shape)
    dx = F.l2_normalize_backward(r, cache)
    np.testing.assert_allclose(dx[1:3], r[1:3] / eps, rtol=1e-14)
    assert np.linalg.norm(out[0]) == pytest.approx(1.0) and np.abs(out[1]).max() < 1
    assert np.linalg.norm(out[3]) == pytest.approx(1.0)
    torch = required.module("torch")
    tx = torch.tensor(x, requires_grad=True)
    tout = torch.nn.functional.normalize(tx, dim=1)
    tout.backward(torch.tensor(r))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-15)
    # row by row: the clamped rows' gradients (~1e12) would swamp an error in the others
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=0)
