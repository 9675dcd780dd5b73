"""The exercises' self-checks: the library's answer passes, a wrong answer fails and says
why, and an unanswered exercise (None) is "not attempted" without an error."""

from __future__ import annotations

import ast
import copy
import itertools
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
    assert message.startswith("not yet: dx is what the eval-mode formula") and "depend on every x" in message
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
    assert "dweight has shape (6, 7, 3, 4), the reference (7, 6, 3, 4)" in message

    def padding_kept(dout, x, weight, stride, padding):
        dx, dweight, dbias = library_conv2d_backward(dout, x, weight, stride, padding)
        return np.pad(dx, ((0, 0), (0, 0), (padding, padding), (padding, padding))), dweight, dbias

    assert "cut the padding off" in verdict(ex.check_conv2d_backward(padding_kept))


def test_deepcluster_grad_wrong_answers():
    message = verdict(ex.check_deepcluster_grad(lambda *a: explicit_deepcluster_grad(*a, count_ignored=True)))
    assert "IGNORE_INDEX" in message and "zero gradient" in message
    message = verdict(ex.check_deepcluster_grad(lambda s, y, v, t, h: explicit_deepcluster_grad(s, y, v, t, 1)))
    assert "3 times the reference" in message  # forgot H (H = 3)
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


# -- the collapse exercise cannot be passed by a loss that only crosses ln K ----------------


def crossing_losses(ln_k, steps=66):
    """A healthy run at temperature 0.2, like the notebook's: the loss starts 0.07 above ln K,
    passes through it on its way down (within 0.01 of it at steps 11 to 14), and ends 0.3 below."""
    return [ln_k + 0.07 - 0.0057 * s for s in range(steps)]


@pytest.mark.parametrize("window", [1, 2, 4])
def test_collapse_check_fails_a_short_window_that_fired_on_the_crossing(window):
    ln_k = math.log(100)
    trainer = fake_trainer(crossing_losses(ln_k), window=window, temperature=0.2)
    assert trainer.monitor.fired  # the monitor fired, on the crossing: no collapse
    message = verdict(ex.check_collapse(trainer))
    assert "crossing ln K" in message and "window of about 20" in message and "temperature 0.1" in message
    assert "correct" not in message and "sit within" not in message


def test_collapse_check_passes_a_real_collapse_watched_with_a_short_window():
    ln_k = math.log(100)
    collapsed = [ln_k + 0.3 * math.exp(-s / 8) for s in range(66)]  # at ln K from step 28 on
    result = ex.check_collapse(fake_trainer(collapsed, window=5))
    assert result.passed and "the last 20 losses sit within" in str(result), str(result)


def test_collapse_check_says_how_long_the_loss_has_sat_at_ln_k():
    ln_k = math.log(100)
    collapsed = [ln_k + 0.3 * math.exp(-s / 8) for s in range(66)]
    settled = sum(1 for _ in itertools.takewhile(lambda loss: abs(loss - ln_k) <= 0.01, reversed(collapsed)))
    assert 20 <= settled < 60
    for window in (60, 66):
        message = verdict(ex.check_collapse(fake_trainer(collapsed, window=window)))
        assert f"for the last {settled} logged steps" in message and f"use a window <= {settled}" in message
        assert "did not settle" not in message


# -- sizes that coincide would let a wrong count pass ---------------------------------------


def test_a_wrong_count_does_not_pass_for_a_right_one():
    def rescaled(wrong_divisor):  # the right gradient, divided by another count instead of |A| (V - 1) B
        def answer(scores, codes, batch_size, crops_for_assign, temperature):
            n_crops = len(scores) // batch_size
            right = len(crops_for_assign) * (n_crops - 1) * batch_size
            return library_swapped_grad(scores, codes, batch_size, crops_for_assign, temperature) * right / \
                wrong_divisor(n_crops, len(crops_for_assign), batch_size)
        return answer

    for wrong in (lambda v, a, b: (v // 2) * (v - 1) * b,   # |A| written as V // 2
                  lambda v, a, b: (v - a) * (v - 1) * b,    # |A| confused with the small crops' count
                  lambda v, a, b: a * (v - 1) * (v - 1)):   # V - 1 where B belongs
        verdict(ex.check_swapped_loss_grad(rescaled(wrong)))
    message = verdict(ex.check_deepcluster_grad(lambda s, y, v, t, h: explicit_deepcluster_grad(s, y, v, t, v - 1)))
    assert "times the reference" in message  # SwAV's V - 1 where H belongs

    def conv_loops(dout, x, weight, stride, padding, sizes):  # the loops, over the ranges in ``sizes``
        n_images, n_out, n_in, kh, kw = sizes
        p = padding
        xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        dxpad, dweight = np.zeros_like(xpad), np.zeros_like(weight)
        for n, o, u, v, c, i, j in itertools.product(range(n_images), range(n_out), range(dout.shape[2]),
                                                     range(dout.shape[3]), range(n_in), range(kh), range(kw)):
            dweight[o, c, i, j] += dout[n, o, u, v] * xpad[n, c, stride * u + i, stride * v + j]
            dxpad[n, c, stride * u + i, stride * v + j] += dout[n, o, u, v] * weight[o, c, i, j]
        return dxpad[:, :, p:p + x.shape[2], p:p + x.shape[3]], dweight, dout.sum(axis=(0, 2, 3))

    def unpacked_wrong(dout, x, weight, stride, padding):  # O, kh, kw, C = weight.shape
        o, kh, kw, c = weight.shape
        return conv_loops(dout, x, weight, stride, padding, (x.shape[0], o, c, kh, kw))

    def n_and_o_swapped(dout, x, weight, stride, padding):  # O, N = dout.shape[:2]
        o, n = dout.shape[:2]
        return conv_loops(dout, x, weight, stride, padding, (n, o, *weight.shape[1:]))

    def right_ranges(dout, x, weight, stride, padding):
        return conv_loops(dout, x, weight, stride, padding, (x.shape[0], *weight.shape[:2], *weight.shape[2:]))

    assert ex.check_conv2d_backward(right_ranges).passed
    verdict(ex.check_conv2d_backward(unpacked_wrong))
    verdict(ex.check_conv2d_backward(n_and_o_swapped))


# -- near misses, float32 inside an answer -------------------------------------------------


def computed_in_float32(answer):
    """``answer`` run on float32 copies of its float inputs, its outputs cast back to float64."""
    def down(value):
        if isinstance(value, np.ndarray) and value.dtype == np.float64:
            return value.astype(np.float32)
        return [down(v) for v in value] if isinstance(value, list) else value

    def answer32(*args):
        result = answer(*(down(a) for a in args))
        if isinstance(result, tuple):
            return tuple(np.asarray(r, dtype=np.float64) for r in result)
        return np.asarray(result, dtype=np.float64)
    answer32.__name__ = answer.__name__
    return answer32


@pytest.mark.parametrize("check, answer", [
    (ex.check_g_update, lse_g_update),
    (ex.check_swapped_loss_grad, explicit_swapped_grad),
    (ex.check_batchnorm_backward, naive_batchnorm_backward),
    (ex.check_deepcluster_grad, explicit_deepcluster_grad),
], ids=lambda x: x.__name__)
def test_a_float64_answer_computed_in_float32_is_nearly_right(check, answer):
    message = verdict(check(computed_in_float32(answer)))
    assert "nearly right" in message and "float32" in message, message
    for misleading in ("times the reference", "differs", "rows", "Crop", "stacking"):
        assert misleading not in message, message


def test_a_loose_solver_tolerance_is_nearly_right():
    def loose_codes(scores, epsilon):
        batch, k = scores.shape
        return batch * sinkhorn_knopp(-scores, np.full(batch, 1.0 / batch), np.full(k, 1.0 / k), 1.0 / epsilon,
                                      tol=1e-8).plan

    message = verdict(ex.check_codes_as_transport(loose_codes))
    assert "nearly right" in message and "solver tolerance" in message and "differs" not in message, message


def test_a_float32_answer_prints_its_error():
    result = ex.check_codes_as_transport(as_float32(library_codes))
    message = verdict(result)
    assert f"its error {result.error:.2g} is above the 1e-08 the check needs" in message, message


# -- BatchNorm, convolution and prototype slips are named ------------------------------------


def batchnorm_with(*, ddof=0, eps_outside=False, no_eps=False, axes=(0, 2, 3), mean_term=True, xhat_term=True,
                   gamma_in=True):
    def answer(dout, x, gamma, eps):
        eps = 0.0 if no_eps else eps
        mu = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True, ddof=ddof)
        std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
        xhat = (x - mu) / std
        dxhat = dout - (dout.mean(axis=axes, keepdims=True) if mean_term else 0) \
            - (xhat * (dout * xhat).mean(axis=axes, keepdims=True) if xhat_term else 0)
        scale = gamma[None, :, None, None] if gamma_in else 1.0
        return scale * dxhat / std, (dout * xhat).sum(axis=(0, 2, 3)), dout.sum(axis=(0, 2, 3))
    return answer


@pytest.mark.parametrize("mistake, diagnosis", [
    ({"ddof": 1}, "x_hat uses the biased variance, 1/m with m = N H W"),
    ({"eps_outside": True}, "eps goes inside the sqrt, sqrt(var + eps)"),
    ({"no_eps": True}, "eps goes inside the sqrt, sqrt(var + eps)"),
    ({"axes": (1, 2, 3)}, "per channel, over axes (0, 2, 3)"),
    ({"axes": (0,)}, "per channel, over axes (0, 2, 3)"),
    ({"mean_term": False, "xhat_term": False}, "the eval-mode formula"),
    ({"mean_term": False}, "dropping the mean(g) term"),
    ({"xhat_term": False}, "dropping the x_hat * mean(g x_hat) term"),
    ({"gamma_in": False}, "leaving gamma out"),
], ids=lambda x: str(x))
def test_batchnorm_slips_are_named(mistake, diagnosis):
    assert ex.check_batchnorm_backward(batchnorm_with()).passed  # without a slip, the helper is right
    message = verdict(ex.check_batchnorm_backward(batchnorm_with(**mistake)))
    assert diagnosis in message and "times the reference" not in message, message


def test_conv_a_flipped_kernel_is_named():
    def flipped_dx(dout, x, weight, stride, padding):  # a true convolution in dx
        dx = loop_conv2d_backward(dout, x, weight[:, :, ::-1, ::-1], stride, padding)[0]
        return (dx, *loop_conv2d_backward(dout, x, weight, stride, padding)[1:])

    def flipped_both(dout, x, weight, stride, padding):
        dx, dweight, dbias = flipped_dx(dout, x, weight, stride, padding)
        return dx, dweight[:, :, ::-1, ::-1], dbias

    for answer, name in ((flipped_dx, "dx"), (flipped_both, "dweight")):
        message = verdict(ex.check_conv2d_backward(answer))
        assert message.startswith(f"not yet: {name} is what a flipped kernel gives") and "no flip" in message
        assert "+=" not in message and "mind the stride" not in message, message

    def stride_ignored_in_dx(dout, x, weight, stride, padding):
        dx = loop_conv2d_backward(dout, x, weight, 1, padding)[0]  # windows 1 apart instead of s
        return (dx, *loop_conv2d_backward(dout, x, weight, stride, padding)[1:])

    assert "stride" in verdict(ex.check_conv2d_backward(stride_ignored_in_dx))


def test_prototypes_an_answer_that_normalises_c_fails():
    def normalises_c(dscores, z, weight):
        return library_prototypes_backward(dscores, z, weight / np.linalg.norm(weight, axis=1, keepdims=True))

    message = verdict(ex.check_prototypes_backward(normalises_c))
    assert "C is used as given" in message, message


# -- outputs in another order, and answers of the wrong kind --------------------------------


def test_outputs_in_any_other_order_are_told_so():
    def rotated_conv(*args):
        dx, dweight, dbias = loop_conv2d_backward(*args)
        return dweight, dbias, dx

    def rotated_batchnorm(*args):
        dx, dgamma, dbeta = naive_batchnorm_backward(*args)
        return dgamma, dbeta, dx

    def rotated_wrong_conv(*args):  # another order, and dx wrong as well: told by the shapes
        dx, dweight, dbias = loop_conv2d_backward(*args)
        return dbias, 2 * dx, dweight

    message = verdict(ex.check_conv2d_backward(rotated_conv))
    assert "you returned (dweight, dbias, dx): return (dx, dweight, dbias) in that order" in message, message
    message = verdict(ex.check_batchnorm_backward(rotated_batchnorm))
    assert "you returned (dgamma, dbeta, dx): return (dx, dgamma, dbeta) in that order" in message, message
    message = verdict(ex.check_conv2d_backward(rotated_wrong_conv))
    assert "in that order: your arrays have the shapes of (dbias, dx, dweight)" in message, message


class Tensor:
    """Stands in for a torch tensor that requires grad (NumPy cannot convert it)."""
    requires_grad = True

    def __array__(self, *args, **kwargs):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")


def test_answers_of_the_wrong_kind_get_a_specific_hint():
    def transport_result(scores, epsilon):
        batch, k = scores.shape
        return sinkhorn_knopp(-scores, np.full(batch, 1.0 / batch), np.full(k, 1.0 / k), 1.0 / epsilon, tol=1e-12)

    assert ".plan" in verdict(ex.check_codes_as_transport(transport_result))
    for answer in (lambda *a: swapped_prediction_loss(a[0], a[1], a[2], crops_for_assign=a[3], temperature=a[4]),
                   lambda *a: list(swapped_prediction_loss(a[0], a[1], a[2], crops_for_assign=a[3],
                                                           temperature=a[4]))[::-1]):
        assert "return only the gradient" in verdict(ex.check_swapped_loss_grad(answer))
    assert ".detach()" in verdict(ex.check_swapped_loss_grad(lambda *a: Tensor()))
