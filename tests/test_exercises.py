"""The exercises' self-checks: the library's answer passes, a wrong answer fails and says
why, and an unanswered exercise (None) is "not attempted" without an error."""

from __future__ import annotations

import ast
import copy
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from swav_ref import exercises as ex
from swav_ref.backend import logsumexp
from swav_ref.deepcluster import IGNORE_INDEX, deepcluster_loss
from swav_ref.nn import functional as F
from swav_ref.ot import sinkhorn_knopp
from swav_ref.swav import CollapseMonitor, prototypes_backward, prototypes_forward, swapped_prediction_loss

# -- answers built on the library (the model answers) ----------------------------------------


def library_codes(scores, epsilon):
    batch, k = scores.shape
    plan = sinkhorn_knopp(-scores, np.full(batch, 1.0 / batch), np.full(k, 1.0 / k), 1.0 / epsilon,
                         tol=1e-12).plan
    return batch * plan


def library_swapped_grad(scores, codes, batch_size, crops_for_assign, temperature):
    return swapped_prediction_loss(scores, codes, batch_size, crops_for_assign=crops_for_assign,
                                   temperature=temperature)[1]


def library_prototypes_backward(dscores, z, weight):
    return prototypes_backward(dscores, prototypes_forward(z, weight)[1])


def library_batchnorm_backward(dout, x, gamma, eps):
    _, cache = F.batchnorm_forward(x, gamma, np.zeros_like(gamma), training=True, eps=eps)
    return F.batchnorm_backward(dout, cache)


def library_conv2d_backward(dout, x, weight, stride, padding):
    _, cache = F.conv2d_forward(x, weight, np.zeros(weight.shape[0]), stride=stride, padding=padding)
    return F.conv2d_backward(dout, cache)


def library_deepcluster_grad(scores, targets, n_crops, temperature, n_sets):
    return deepcluster_loss([scores], [targets], n_crops, temperature)[1][0] / n_sets


# -- independent answers, written from the equations (what a student would write) -------


def lse_g_update(f, M, c, lam):
    return np.log(c) / lam - logsumexp(lam * (f[:, None] - M), axis=0) / lam


def naive_g_update(f, M, c, lam):  # no max subtracted: overflows at large lam
    return np.log(c) / lam - np.log(np.sum(np.exp(lam * (f[:, None] - M)), axis=0)) / lam


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def explicit_swapped_grad(scores, codes, batch_size, crops_for_assign, temperature, count_self=False):
    n_crops = scores.shape[0] // batch_size
    grad = np.zeros_like(scores)
    for v in range(n_crops):
        rows = slice(v * batch_size, (v + 1) * batch_size)
        targets = [q for a, q in zip(crops_for_assign, codes) if a != v or count_self]
        grad[rows] = len(targets) * softmax(scores[rows] / temperature) - sum(targets)
    return grad / (temperature * len(crops_for_assign) * (n_crops - 1) * batch_size)


def naive_batchnorm_backward(dout, x, gamma, eps):
    axes = (0, 2, 3)
    m = x.size // x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    s = np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mu) / s
    g = gamma[None, :, None, None]
    dx = g / s * (dout - dout.sum(axis=axes, keepdims=True) / m
                  - xhat * (dout * xhat).sum(axis=axes, keepdims=True) / m)
    return dx, (dout * xhat).sum(axis=axes), dout.sum(axis=axes)


def loop_conv2d_backward(dout, x, weight, stride, padding):
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dxpad, dweight = np.zeros_like(xpad), np.zeros_like(weight)
    kh, kw = weight.shape[2:]
    for n in range(dout.shape[0]):
        for o in range(dout.shape[1]):
            for u in range(dout.shape[2]):
                for v in range(dout.shape[3]):
                    window = (n, slice(None), slice(stride * u, stride * u + kh), slice(stride * v, stride * v + kw))
                    dweight[o] += dout[n, o, u, v] * xpad[window]
                    dxpad[window] += dout[n, o, u, v] * weight[o]
    h, w = x.shape[2:]
    return dxpad[:, :, padding:padding + h, padding:padding + w], dweight, dout.sum(axis=(0, 2, 3))


def explicit_deepcluster_grad(scores, targets, n_crops, temperature, n_sets, count_ignored=False):
    y = np.tile(targets, n_crops)
    valid = y != IGNORE_INDEX
    n_rows = len(y) if count_ignored else valid.sum()
    one_hot = np.zeros_like(scores)
    one_hot[np.flatnonzero(valid), y[valid]] = 1.0
    grad = (softmax(scores / temperature) - one_hot) / (temperature * n_sets * n_rows)
    return grad if count_ignored else grad * valid[:, None]


# -- every check: the reference passes, None is "not attempted" -----------------------------

CORRECT = {
    ex.check_g_update: [lse_g_update],
    ex.check_codes_as_transport: [library_codes],
    ex.check_swapped_loss_grad: [library_swapped_grad, explicit_swapped_grad],
    ex.check_prototypes_backward: [library_prototypes_backward],
    ex.check_batchnorm_backward: [library_batchnorm_backward, naive_batchnorm_backward],
    ex.check_conv2d_backward: [library_conv2d_backward, loop_conv2d_backward],
    ex.check_deepcluster_grad: [library_deepcluster_grad, explicit_deepcluster_grad],
}


@pytest.mark.parametrize("check, answer", [(c, a) for c, answers in CORRECT.items() for a in answers],
                         ids=lambda x: x.__name__)
def test_a_correct_answer_passes(check, answer):
    result = check(answer)
    assert result.passed, result.message
    assert result.error < 1e-10
    assert str(result).startswith("correct: max rel. error"), str(result)


@pytest.mark.parametrize("check", [*CORRECT, ex.check_collapse], ids=lambda c: c.__name__)
def test_none_is_not_attempted(check):
    result = check(None)
    assert not result.passed and not result.attempted
    assert math.isnan(result.error)
    assert str(result).startswith("not attempted yet"), str(result)


@pytest.mark.parametrize("check", list(CORRECT), ids=lambda c: c.__name__)
def test_a_stub_that_returns_none_is_not_attempted(check):
    result = check(lambda *args: None)
    assert not result.passed and not result.attempted, str(result)


def test_the_library_is_the_only_reference():
    """The module checks against the library's functions: it computes no exponential,
    logarithm or softmax of its own (the formulas live in the library only)."""
    tree = ast.parse(open(ex.__file__).read())
    called = {getattr(node.func, "attr", getattr(node.func, "id", None))
              for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not called & {"exp", "log", "logsumexp", "softmax", "einsum"}, called


# -- wrong answers fail, and the message names the problem ----------------------------------


def verdict(result):
    assert not result.passed and result.attempted, str(result)
    assert str(result).startswith("not yet: "), str(result)
    return str(result)


def test_g_update_wrong_answers():
    assert "overflow" in verdict(ex.check_g_update(naive_g_update))  # fine at lam = 10, inf at 1000
    message = verdict(ex.check_g_update(lambda f, M, c, lam: np.log(c) / lam - logsumexp(lam * (f[:, None] - M),
                                                                                           axis=1) / lam))
    assert "shape" in message  # summed over j: n values instead of m
    message = verdict(ex.check_g_update(lambda f, M, c, lam: -lse_g_update(f, M, c, lam)))
    assert "-1 times the reference" in message


def test_codes_wrong_answers():
    assert "transposed" in verdict(ex.check_codes_as_transport(lambda s, e: library_codes(s, e).T))
    message = verdict(ex.check_codes_as_transport(lambda s, e: library_codes(s, e) / s.shape[0]))
    assert "times the reference" in message and "multiply the plan by B" in message
    message = verdict(ex.check_codes_as_transport(lambda s, e: library_codes(-s, e)))  # cost +scores
    assert "differs from the reference" in message


def test_swapped_grad_wrong_answers():
    message = verdict(ex.check_swapped_loss_grad(lambda *a: -library_swapped_grad(*a)))
    assert "-1 times the reference" in message
    message = verdict(ex.check_swapped_loss_grad(lambda *a: library_swapped_grad(*a) * a[4]))  # no 1/tau
    assert "0.1 times the reference" in message
    message = verdict(ex.check_swapped_loss_grad(lambda *a: explicit_swapped_grad(*a, count_self=True)))
    assert "rows differ most" in message and "is an assignment crop, so it predicts the other" in message
    assert "transposed" in verdict(ex.check_swapped_loss_grad(lambda *a: library_swapped_grad(*a).T))

    def image_major(scores, codes, batch_size, crops_for_assign, temperature):  # rows n V + v, not v B + n
        n_crops = scores.shape[0] // batch_size
        crop_major = np.arange(n_crops * batch_size).reshape(n_crops, batch_size).T.reshape(-1)
        grad = np.empty_like(scores)
        grad[crop_major] = library_swapped_grad(scores[crop_major], codes, batch_size, crops_for_assign, temperature)
        return grad

    assert "stacked crop by crop" in verdict(ex.check_swapped_loss_grad(image_major))


def test_prototypes_backward_wrong_answers():
    def transposed_dc(dscores, z, weight):
        dz, dweight = library_prototypes_backward(dscores, z, weight)
        return dz, dweight.T

    def unnormalised_dc(dscores, z, weight):
        return library_prototypes_backward(dscores, z, weight)[0], dscores.T @ z

    def no_projection(dscores, z, weight):  # forgets to remove the component along e_i
        dweight = library_prototypes_backward(dscores, z, weight)[1]
        return dscores @ weight / np.linalg.norm(z, axis=1, keepdims=True), dweight

    def both_negated(dscores, z, weight):
        return tuple(-d for d in library_prototypes_backward(dscores, z, weight))

    def only_dz(dscores, z, weight):
        return library_prototypes_backward(dscores, z, weight)[0]

    message = verdict(ex.check_prototypes_backward(transposed_dc))
    assert "dC has shape (3, 4), the reference (4, 3): transposed?" in message
    message = verdict(ex.check_prototypes_backward(unnormalised_dc))
    assert message.startswith("not yet: dC differs") and "normalised embeddings" in message
    assert "dC is -1 times the reference" in verdict(ex.check_prototypes_backward(both_negated))
    assert verdict(ex.check_prototypes_backward(no_projection)).startswith("not yet: dz differs")
    assert "as a tuple" in verdict(ex.check_prototypes_backward(only_dz))
    message = verdict(ex.check_prototypes_backward(lambda *a: library_prototypes_backward(*a)[::-1]))
    assert "return (dz, dC) in that order" in message


def test_batchnorm_backward_wrong_answers():
    def eval_mode_dx(dout, x, gamma, eps):  # treats mean and variance as constants
        dx, dgamma, dbeta = naive_batchnorm_backward(dout, x, gamma, eps)
        var = x.var(axis=(0, 2, 3), keepdims=True)
        return gamma[None, :, None, None] * dout / np.sqrt(var + eps), dgamma, dbeta

    def flipped(dout, x, gamma, eps):
        dx, dgamma, dbeta = naive_batchnorm_backward(dout, x, gamma, eps)
        return dx, dgamma, -dbeta

    message = verdict(ex.check_batchnorm_backward(eval_mode_dx))
    assert message.startswith("not yet: dx differs") and "depend on every x" in message
    assert "dbeta is -1 times the reference" in verdict(ex.check_batchnorm_backward(flipped))
    message = verdict(ex.check_batchnorm_backward(lambda *a: (1 / 0, None, None)))
    assert "raised ZeroDivisionError" in message


def test_conv2d_backward_wrong_answers():
    def no_accumulation(dout, x, weight, stride, padding):  # "=" instead of "+=" into dx
        dx, dweight, dbias = loop_conv2d_backward(dout, x, weight, stride, padding)
        return dx * 0.5, dweight, dbias

    def swapped_axes(dout, x, weight, stride, padding):
        dx, dweight, dbias = library_conv2d_backward(dout, x, weight, stride, padding)
        return dx, np.swapaxes(dweight, 0, 1), dbias

    assert "dx is 0.5 times the reference" in verdict(ex.check_conv2d_backward(no_accumulation))
    message = verdict(ex.check_conv2d_backward(swapped_axes))
    assert "dweight has shape (3, 2, 3, 3), the reference (2, 3, 3, 3)" in message

    def padding_kept(dout, x, weight, stride, padding):
        dx, dweight, dbias = library_conv2d_backward(dout, x, weight, stride, padding)
        return np.pad(dx, ((0, 0), (0, 0), (padding, padding), (padding, padding))), dweight, dbias

    assert "cut the padding off" in verdict(ex.check_conv2d_backward(padding_kept))


def test_deepcluster_grad_wrong_answers():
    message = verdict(ex.check_deepcluster_grad(lambda *a: explicit_deepcluster_grad(*a, count_ignored=True)))
    assert "IGNORE_INDEX" in message and "zero gradient" in message
    message = verdict(ex.check_deepcluster_grad(lambda s, y, v, t, h: explicit_deepcluster_grad(s, y, v, t, 1)))
    assert "2 times the reference" in message  # forgot H
    message = verdict(ex.check_deepcluster_grad(lambda *a: -library_deepcluster_grad(*a)))
    assert "-1 times the reference" in message

    def image_major_rows(scores, targets, n_crops, temperature, n_sets):  # np.repeat instead of np.tile
        y = np.repeat(targets, n_crops)
        valid = y != IGNORE_INDEX
        one_hot = np.zeros_like(scores)
        one_hot[np.flatnonzero(valid), y[valid]] = 1.0
        return (softmax(scores / temperature) - one_hot) / (temperature * n_sets * valid.sum()) * valid[:, None]

    assert "np.tile(targets, n_crops), not np.repeat" in verdict(ex.check_deepcluster_grad(image_major_rows))


# -- the collapse exercise, on stand-in trainers (no training in the tests) ----------------


def fake_trainer(losses, window, temperature=0.1, n_prototypes=100):
    monitor = CollapseMonitor(n_prototypes, window=window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loss in losses:
            monitor.update(loss)
    records = [{"kind": "step", "loss": loss} for loss in losses]
    return SimpleNamespace(monitor=monitor, log=SimpleNamespace(steps=lambda: records),
                           config=SimpleNamespace(temperature=temperature))


def test_collapse_check():
    ln_k = math.log(100)
    collapsed = [ln_k + 0.3 * math.exp(-s / 8) for s in range(66)]
    result = ex.check_collapse(fake_trainer(collapsed, window=20))
    assert result.passed and "CollapseWarning fired" in str(result), str(result)
    assert result.error < 1e-3
    message = verdict(ex.check_collapse(fake_trainer(collapsed, window=100)))
    assert "window (100 steps) is longer than the run (66 logged steps)" in message
    healthy = [ln_k - 0.005 * s for s in range(66)]
    message = verdict(ex.check_collapse(fake_trainer(healthy, window=20, temperature=0.2)))
    assert "did not settle at ln K" in message and "0.1" in message
    assert "call trainer.fit()" in verdict(ex.check_collapse(fake_trainer([], window=20)))
    message = verdict(ex.check_collapse(fake_trainer(collapsed[:30], window=20)))  # 0.1, stopped too early
    assert "train longer" in message


# -- answers that edit their inputs, or return the wrong kind of numbers --------------------


def scribbling(answer):
    """``answer``, computed on its own copy of the inputs, after which it overwrites every input
    array in place (NaN into floats, 0 into ints): legal for a student, and it must not matter."""
    def scribble(value):
        if isinstance(value, np.ndarray):
            value[...] = np.nan if value.dtype.kind == "f" else 0
        elif isinstance(value, (list, tuple)):
            for item in value:
                scribble(item)

    def scribbler(*args):
        result = answer(*(copy.deepcopy(a) for a in args))
        scribble(args)
        return result
    scribbler.__name__ = answer.__name__
    return scribbler


# The checks whose reference (or next call) used to see the answer's edits.
EDITED_INPUTS = {
    ex.check_g_update: lse_g_update,  # M and c are passed to both of its calls
    ex.check_codes_as_transport: library_codes,
    ex.check_swapped_loss_grad: explicit_swapped_grad,
    ex.check_prototypes_backward: library_prototypes_backward,
    ex.check_batchnorm_backward: naive_batchnorm_backward,
}


@pytest.mark.parametrize("check, answer", list(EDITED_INPUTS.items()), ids=lambda x: x.__name__)
def test_a_correct_answer_that_edits_its_inputs_passes(check, answer):
    result = check(scribbling(answer))
    assert result.passed, result.message


def test_a_wrong_answer_that_edits_its_inputs_fails():
    def doubled_dout(dout, x, gamma, eps):  # the right formula on a doubled dout
        dout *= 2
        return naive_batchnorm_backward(dout, x, gamma, eps)

    def doubled_dscores(dscores, z, weight):
        dscores *= 2
        return library_prototypes_backward(dscores, z, weight)

    assert "dbeta is 2 times the reference" in verdict(ex.check_batchnorm_backward(doubled_dout))
    assert "dC is 2 times the reference" in verdict(ex.check_prototypes_backward(doubled_dscores))

    def scaled_scores(scores, codes, batch_size, crops_for_assign, temperature):  # right, from s / T
        scores /= temperature
        return explicit_swapped_grad(scores * temperature, codes, batch_size, crops_for_assign, temperature)

    assert ex.check_swapped_loss_grad(scaled_scores).passed


def as_float32(answer):
    def answer32(*args):
        result = answer(*args)
        if isinstance(result, tuple):
            return tuple(np.asarray(r, dtype=np.float32) for r in result)
        return np.asarray(result, dtype=np.float32)
    answer32.__name__ = answer.__name__
    return answer32


@pytest.mark.parametrize("check", list(CORRECT), ids=lambda c: c.__name__)
def test_a_float32_answer_is_told_to_use_float64(check):
    message = verdict(check(as_float32(CORRECT[check][0])))
    assert "is float32" in message and "compute in float64" in message
    assert "times the reference" not in message and "differs" not in message  # no formula hint


def test_a_wrong_float32_answer_gets_the_formula_diagnosis():
    message = verdict(ex.check_g_update(as_float32(lambda *a: -lse_g_update(*a))))
    assert "-1 times the reference" in message


@pytest.mark.parametrize("convert, dtype", [
    (lambda g: g + 5j, "complex128"),
    (lambda g: g.astype(str), "<U"),
    (lambda g: g > 0, "bool"),
    (lambda g: {"g": g}, "dtype object"),
], ids=["complex", "str", "bool", "dict"])
def test_a_non_real_answer_is_refused_naming_its_dtype(convert, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning is no verdict
        message = verdict(ex.check_g_update(lambda *a: convert(lse_g_update(*a))))
    assert dtype in message, message
    message = verdict(ex.check_deepcluster_grad(lambda *a: convert(library_deepcluster_grad(*a))))
    assert dtype in message, message


def test_the_swapped_loss_check_gives_one_diagnosis():
    for answer, diagnosis in [(lambda *a: -library_swapped_grad(*a), "-1 times the reference"),
                              (lambda *a: library_swapped_grad(*a) * a[4], "0.1 times the reference")]:
        message = verdict(ex.check_swapped_loss_grad(answer))
        assert diagnosis in message and "rows" not in message and "Crop" not in message, message

    def image_major(scores, codes, batch_size, crops_for_assign, temperature):
        n_crops = scores.shape[0] // batch_size
        order = np.arange(n_crops * batch_size).reshape(n_crops, batch_size).T.reshape(-1)
        grad = np.empty_like(scores)
        grad[order] = explicit_swapped_grad(scores[order], codes, batch_size, crops_for_assign, temperature)
        return grad

    message = verdict(ex.check_swapped_loss_grad(image_major))
    assert "image by image" in message and "stacked crop by crop" in message
    assert "differ most" not in message and "differs from the reference" not in message, message
    message = verdict(ex.check_swapped_loss_grad(lambda *a: explicit_swapped_grad(*a, count_self=True)))
    assert "rows differ most; crop 1 is an assignment crop" in message and "Every crop" not in message, message


@pytest.mark.parametrize("argument", [3, "trainer", SimpleNamespace(steps=lambda: [])],
                         ids=["int", "str", "the log fit() returns"])
def test_collapse_check_says_what_it_expects(argument):
    message = verdict(ex.check_collapse(argument))
    assert "expects the Trainer" in message and type(argument).__name__ in message


def test_batchnorm_swapped_dgamma_dbeta():
    def swapped(dout, x, gamma, eps):
        dx, dgamma, dbeta = naive_batchnorm_backward(dout, x, gamma, eps)
        return dx, dbeta, dgamma

    message = verdict(ex.check_batchnorm_backward(swapped))
    assert "dgamma and dbeta look swapped" in message
    assert "sum" not in message and "x_hat" not in message  # no formula given away
