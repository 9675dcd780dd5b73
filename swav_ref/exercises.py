r"""Self-checks for the notebooks' exercises.

Each ``check_*`` function takes the student's answer (a function, or for the collapse
exercise a trained :class:`~swav_ref.train.Trainer`), runs it on small random float64
inputs drawn with a fixed seed, and compares the result with the library's own
implementation, the reference. It returns a :class:`CheckResult` whose printed form is the
verdict::

    >>> print(check_batchnorm_backward(my_batchnorm_backward))      # doctest: +SKIP
    correct: max rel. error 2e-16
    >>> print(check_prototypes_backward(my_prototypes_backward))    # doctest: +SKIP
    not yet: dC is -1 times the reference: check the sign ...

An answer of ``None`` (or a stub that returns ``None``) gives "not attempted yet", so the
notebooks run to the end with the exercises unanswered. The distance is
:func:`swav_ref.nn.gradcheck.rel_error`, :math:`\max|a - b| / \max(|a| + |b|)`; an answer
passes below ``1e-8``, so it must be computed in float64 like the inputs (a float32 answer
is told so, and so is a float64 answer that lost precision on the way: "nearly right");
complex or non-numeric answers are refused. Where the answer is off, the message says how:
a transposed or mis-shaped output, outputs in another order, a flipped sign, a constant
factor, a known slip (BatchNorm's unbiased variance, a flipped convolution kernel, ...), or
which rows differ, with a hint. The test sizes differ from one another (:math:`V - 1`,
:math:`B`, :math:`|A|`, ...), so a wrong count cannot pass for a right one. The reference
is computed before the answer runs, and the answer gets copies of the inputs, so an answer
that edits its inputs in place changes neither.

The exercises, by notebook: 02 :func:`check_g_update`; 03 :func:`check_codes_as_transport`,
:func:`check_swapped_loss_grad`, :func:`check_prototypes_backward`; 04
:func:`check_batchnorm_backward`, :func:`check_conv2d_backward`; 05
:func:`check_collapse`, :func:`check_deepcluster_grad`.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from swav_ref.deepcluster import IGNORE_INDEX, deepcluster_loss
from swav_ref.nn import functional as F
from swav_ref.nn.gradcheck import rel_error
from swav_ref.ot import ConvergenceWarning, sinkhorn_log
from swav_ref.swav import prototypes_backward, prototypes_forward, sinkhorn_codes, swapped_prediction_loss

__all__ = [
    "CheckResult",
    "check_batchnorm_backward",
    "check_codes_as_transport",
    "check_collapse",
    "check_conv2d_backward",
    "check_deepcluster_grad",
    "check_g_update",
    "check_prototypes_backward",
    "check_swapped_loss_grad",
]

#: An answer passes when its relative error to the reference is below this.
TOLERANCE = 1e-8

#: A float64 answer closer than this (but not within ``TOLERANCE``) has the right formula and
#: lost precision somewhere (a float32 step, a loose solver tolerance): told so, not given a
#: formula hint.
NEAR_MISS = 1e-4

Answer = Optional[Callable[..., Any]]


@dataclass(frozen=True)
class CheckResult:
    """The verdict of a check; printing it prints ``message``.

    Attributes
    ----------
    passed : bool
    error : float
        the largest relative error found (``nan`` when nothing could be compared).
    message : str
        ``"correct: ..."``, ``"not yet: ..."`` or ``"not attempted yet: ..."``.
    """

    passed: bool
    error: float
    message: str

    @property
    def attempted(self) -> bool:
        """False for a "not attempted yet" verdict (no answer given)."""
        return not self.message.startswith("not attempted")

    def __str__(self) -> str:
        return self.message

    __repr__ = __str__


# -- comparing an answer with the reference ---------------------------------------------


def _not_attempted(what: str) -> CheckResult:
    return CheckResult(False, math.nan, f"not attempted yet: {what}")


def _not_yet(error: float, message: str) -> CheckResult:
    return CheckResult(False, error, f"not yet: {message}")


def _run(answer: Callable[..., Any], *args: Any) -> tuple[Any, CheckResult | None]:
    """The answer's output, or the verdict when it raised or returned None.

    The answer gets deep copies of ``args``: an answer that edits an input in place (``dout *= 2``)
    must change neither the reference nor the inputs of its next call.
    """
    name = getattr(answer, "__name__", "your function")
    args = copy.deepcopy(args)
    try:
        result = answer(*args)
    except Exception as exc:  # any mistake in the student's code is reported, not raised
        return None, _not_yet(math.nan, f"{name} raised {type(exc).__name__}: {exc}")
    return result, (_not_attempted(f"{name} returned None") if result is None else None)


def _real_array(name: str, got: Any) -> tuple[np.ndarray | None, str | None]:
    """``got`` as an array of real numbers, or ``(None, what is wrong)``.

    Only integer and floating dtypes are accepted: converting a complex answer to float64 would
    silently drop its imaginary part, and strings of digits would convert without complaint.
    A few near misses get their own hint: a solver's result instead of its ``.plan``, a
    ``(loss, gradient)`` pair, a torch tensor that still requires grad (or lives on a GPU).
    """
    kind = type(got).__name__
    if not isinstance(got, np.ndarray) and hasattr(got, "plan"):  # a TransportResult
        return None, f"{name} is a {kind}, not an array: return the array in its .plan"
    try:
        array = np.asarray(got)
    except Exception:  # ragged lists, objects whose __array__ raises, ...
        return None, f"{name} is not an array of numbers (got {kind}){_conversion_hint(got)}"
    if array.dtype == object:  # a dict, a ragged list, ...
        return None, f"{name} is not an array of numbers (got {kind}, dtype object){_conversion_hint(got)}"
    if array.dtype.kind not in "iuf":  # complex, bool, strings, dates
        return None, (f"{name} has dtype {array.dtype}: return an array of real numbers "
                      f"(float64, like the inputs)")
    return array, None


def _conversion_hint(got: Any) -> str:
    """Why ``got`` did not convert to an array, when it is a common slip ("" otherwise)."""
    if getattr(got, "requires_grad", False):  # a torch tensor in an autograd graph
        return ": it is a tensor that requires grad, call .detach() on it first (e.g. grad.detach().numpy())"
    if getattr(got, "is_cuda", False):
        return ": it is a tensor on the GPU, call .cpu() on it first (e.g. grad.cpu().numpy())"
    if isinstance(got, (tuple, list)) and len(got) == 2:
        try:
            ndims = sorted(np.ndim(item) for item in got)
        except Exception:
            return ""
        if ndims[0] == 0 and ndims[1] > 0:
            return ": it looks like a (loss, gradient) pair, return only the gradient"
    return ""


def _tolerance(dtype: np.dtype) -> float:
    """How close an answer of this dtype can get: float32 (or float16) stops near its own eps,
    so the float64 ``TOLERANCE`` would fail a correct answer with a misleading formula hint."""
    if dtype.kind == "f" and dtype.itemsize < 8:
        return min(1e3 * float(np.finfo(dtype).eps), 1e-2)
    return TOLERANCE


def _difference(name: str, got: Any, want: Any, hint: str) -> tuple[float, str | None]:
    """``(error, None)`` when ``got`` matches ``want``, else ``(error, what is wrong)``."""
    want = np.asarray(want, dtype=np.float64)
    got, problem = _real_array(name, got)
    if problem is not None:
        return math.nan, problem
    if got.shape != want.shape:
        if got.ndim == 2 and got.shape == want.shape[::-1]:
            return math.nan, f"{name} has shape {got.shape}, the reference {want.shape}: transposed?"
        return math.nan, f"{name} has shape {got.shape}, the reference {want.shape}"
    if not np.all(np.isfinite(got)):
        return math.nan, f"{name} contains NaN or inf; {hint}"
    dtype, tolerance = got.dtype, _tolerance(got.dtype)  # for the float32 verdict, the sign and the factor
    got = got.astype(np.float64)
    error = rel_error(got, want)
    if error < TOLERANCE:
        return error, None
    if error < tolerance:  # right, but float32 (or float16) cannot get closer
        return error, (f"{name} is {dtype}, which agrees with the reference only to {dtype}'s precision: "
                       f"its error {error:.2g} is above the {TOLERANCE:.0e} the check needs; compute in "
                       f"float64 (the inputs are float64)")
    if rel_error(-got, want) < tolerance:
        return error, f"{name} is -1 times the reference: check the sign; {hint}"
    scale = float(np.sum(got * want) / np.sum(want * want)) if np.any(want) else 0.0
    # a scale within 1e-3 of 1 is no factor a formula forgets: it is a near miss (below)
    if scale != 0.0 and abs(scale - 1.0) >= 1e-3 and rel_error(got, scale * want) < tolerance:
        return error, f"{name} is {scale:.4g} times the reference: a missing or extra factor; {hint}"
    if error < NEAR_MISS:
        return error, (f"{name} is nearly right ({error:.2g}): the formula looks right but precision is "
                       f"lost somewhere: a float32 step (np.float32, torch's default dtype) or a loose "
                       f"solver tolerance")
    return error, f"{name} differs from the reference by {error:.2g} (max rel. error); {hint}"


def _matches(got: Any, want: Any) -> bool:
    """Whether ``got`` passes against ``want`` (for spotting swapped or misread outputs)."""
    return _difference("", got, want, "")[1] is None


def _verdict(comparisons: list[tuple[str, Any, Any, str]],
             diagnose: Callable[[str, Any], str | None] | None = None) -> CheckResult:
    """Compare each ``(name, got, want, hint)``; the first mismatch is the verdict.

    ``diagnose(name, got)``, when given, may name a known mistake behind that first mismatch
    (by matching ``got`` against the reference computed the mistaken way); its message then
    replaces the generic one.
    """
    worst = 0.0
    for name, got, want, hint in comparisons:
        error, problem = _difference(name, got, want, hint)
        if problem is not None:
            known = diagnose(name, got) if diagnose is not None else None
            return _not_yet(error, problem if known is None else known)
        worst = max(worst, error)
    return CheckResult(True, worst, f"correct: max rel. error {worst:.0e}")


def _outputs(result: Any, count: int, names: str) -> tuple[Any, CheckResult | None]:
    """Unpack a tuple answer, or the verdict when it is not one of ``count`` items."""
    if not isinstance(result, (tuple, list)) or len(result) != count:
        return None, _not_yet(math.nan, f"return the {count} arrays ({names}) as a tuple")
    if any(r is None for r in result):
        return None, _not_attempted(f"part of ({names}) is still None")
    return result, None


def _order(result: Any, references: tuple[Any, ...], names: tuple[str, ...]) -> CheckResult | None:
    """The verdict when the outputs came back in another order, else None.

    Some other order fits: each moved array equals the reference it stands in for (so outputs
    of the same shape, dgamma and dbeta, are told apart by their values), or, where the
    outputs in the order given do not even have the right shapes, every shape fits.
    """
    def shape(item: Any) -> tuple[int, ...] | None:
        try:
            return np.shape(item)
        except Exception:  # ragged
            return None

    def fits(order: tuple[int, ...]) -> bool:  # order[i]: the answer's array standing for references[i]
        return all(shape(result[order[i]]) == np.shape(references[i]) for i in range(len(names)))

    identity = tuple(range(len(names)))
    orders = [order for order in itertools.permutations(identity) if order != identity and fits(order)]
    wanted = f"return ({', '.join(names)}) in that order"
    for order in orders:
        moved = [i for i in identity if order[i] != i]
        if all(_matches(result[order[i]], references[i]) for i in moved):
            if len(moved) == 2:
                return _not_yet(math.nan, f"your {names[moved[0]]} and {names[moved[1]]} look swapped: {wanted}")
            yours = [names[order.index(j)] for j in identity]
            return _not_yet(math.nan, f"you returned ({', '.join(yours)}): {wanted}")
    if orders and not fits(identity):
        yours = [names[orders[0].index(j)] for j in identity]
        return _not_yet(math.nan, f"{wanted}: your arrays have the shapes of ({', '.join(yours)})")
    return None


# -- notebook 02: log-domain Sinkhorn ---------------------------------------------------


def check_g_update(my_g_update: Answer) -> CheckResult:
    r"""The log-domain column fit: ``my_g_update(f, M, c, lam) -> g``.

    Parameters of the answer: ``f`` (n,), ``M`` (n, m), ``c`` (m,), ``lam`` float;
    returns ``g`` (m,) with

    .. math:: g_j = \frac{1}{\lambda}\log c_j
              - \frac{1}{\lambda}\log \sum_i e^{\lambda (f_i - M_{ij})}.

    Reference: the potentials ``res.f, res.g`` of
    :func:`swav_ref.ot.sinkhorn_log <swav_ref.ot.sinkhorn.sinkhorn_log>`, whose last step is a
    column fit, so ``res.g`` is the update of ``res.f``. The check also shifts
    the pair to ``(f + 1, g - 1)`` (the same plan) at ``lam = 1000``, where
    :math:`e^{\lambda (f_i - M_{ij})}` overflows float64 unless the log-sum-exp subtracts
    its maximum first.
    """
    if my_g_update is None:
        return _not_attempted("define my_g_update(f, M, c, lam)")
    rng = np.random.default_rng(2)
    M = rng.random((6, 5))
    r, c = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(5))
    comparisons = []
    for lam, shift in ((10.0, 0.0), (1000.0, 1.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # any iterate is a column fit
            res = sinkhorn_log(M, r, c, lam, max_iter=5000)
        with np.errstate(all="ignore"):
            g, failed = _run(my_g_update, res.f + shift, M, c, lam)
        if failed:
            return failed
        hint = ("the sum runs over i (the rows), g_j = log(c_j)/lam - logsumexp_i(lam (f_i - M_ij))/lam"
                if shift == 0 else f"at lam = {lam:g} the exponentials overflow: subtract the maximum "
                "before exp (swav_ref.backend.logsumexp does)")
        comparisons.append((f"g at lam = {lam:g}", g, res.g - shift, hint))
    return _verdict(comparisons)


# -- notebook 03: codes, swapped loss, prototype layer --------------------------------------


def check_codes_as_transport(my_codes: Answer) -> CheckResult:
    r"""SwAV's codes as an optimal-transport plan: ``my_codes(scores, epsilon) -> codes``.

    ``scores`` (B, K) are cosines; the answer returns the (B, K) codes computed with
    :func:`swav_ref.ot.sinkhorn_knopp <swav_ref.ot.sinkhorn.sinkhorn_knopp>`: cost
    :math:`M = -S`, sample masses :math:`r = \mathbf 1_B / B`, prototype masses :math:`c = \mathbf 1_K / K`,
    :math:`\lambda = 1/\varepsilon`, a tight ``tol`` (1e-12), and the plan times B (so each
    row sums to 1):

    .. math:: \text{codes} = B \cdot \arg\max_{P \in U(r, c)} \langle P, S\rangle
              + \varepsilon H(P).

    Reference: :func:`swav_ref.swav.sinkhorn_codes <swav_ref.swav.codes.sinkhorn_codes>`
    iterated to convergence (``n_iters=1000``); the two must agree within ``1e-8``.
    """
    if my_codes is None:
        return _not_attempted("define my_codes(scores, epsilon)")
    rng = np.random.default_rng(3)
    batch, n_prototypes, epsilon = 12, 4, 0.05
    embeddings, _ = F.l2_normalize_forward(rng.normal(size=(batch, 5)))
    prototypes, _ = F.l2_normalize_forward(rng.normal(size=(n_prototypes, 5)))
    scores = embeddings @ prototypes.T  # cosines
    reference = sinkhorn_codes(scores, epsilon=epsilon, n_iters=1000)
    codes, failed = _run(my_codes, scores, epsilon)
    if failed:
        return failed
    hint = ("cost -scores, r = 1/B per sample, c = 1/K per prototype, lam = 1/epsilon, "
            "multiply the plan by B so that every row sums to 1, and solve to a tight tol (1e-12)")
    return _verdict([("codes", codes, reference, hint)])


def check_swapped_loss_grad(my_swapped_loss_grad: Answer) -> CheckResult:
    r"""The gradient of the swapped loss with respect to the scores.

    ``my_swapped_loss_grad(scores, codes, batch_size, crops_for_assign, temperature) -> grad``,
    with ``scores`` (V B, K) stacked crop by crop, ``codes`` one (B, K) array per assignment
    crop (constants), and ``grad`` (V B, K):

    .. math:: \frac{\partial L}{\partial s_v} &= \frac{n_v\, p_v - T_v}{\tau\, |A|\, (V - 1)\, B},
              \qquad p_v = \operatorname{softmax}(s_v / \tau), \\
              T_v &= \sum_{a \in A,\, a \ne v} q_a, \qquad n_v = \#\{a \in A : a \ne v\}.

    Checked with V = 7 crops, A = {0, 1}, B = 4, K = 9, tau = 0.1: the counts
    :math:`V - 1 = 6`, :math:`B`, :math:`|A| = 2`, :math:`V - |A| = 5` and :math:`V // 2 = 3` all
    differ, so none passes for another. Reference:
    :func:`swav_ref.swav.swapped_prediction_loss <swav_ref.swav.loss.swapped_prediction_loss>`.
    """
    if my_swapped_loss_grad is None:
        return _not_attempted("define my_swapped_loss_grad(scores, codes, batch_size, crops_for_assign, temperature)")
    rng = np.random.default_rng(4)
    n_crops, batch, n_prototypes, assign, temperature = 7, 4, 9, (0, 1), 0.1  # V - 1, B, |A| all differ
    scores = rng.uniform(-1, 1, size=(n_crops * batch, n_prototypes))
    codes = [rng.dirichlet(np.ones(n_prototypes), size=batch) for _ in assign]
    _, reference = swapped_prediction_loss(scores, codes, batch, crops_for_assign=assign, temperature=temperature)
    grad, failed = _run(my_swapped_loss_grad, scores, codes, batch, assign, temperature)
    if failed:
        return failed
    error, problem = _difference("the gradient", grad, reference,
                                 "prediction minus target, divided by tau |A| (V - 1) B")
    if problem is None:
        return CheckResult(True, error, f"correct: max rel. error {error:.0e}")
    if _row_diagnosis_helps(problem):
        problem = _swapped_loss_rows(problem, grad, reference, scores, codes, batch, assign, temperature)
    return _not_yet(error, problem)


def _row_diagnosis_helps(problem: str) -> bool:
    """Only a plain "differs" is worth narrowing down to rows: a shape, dtype, sign or factor
    diagnosis is already the most specific one (and adding row advice would contradict it)."""
    return " differs from the reference by " in problem


def _swapped_loss_rows(problem: str, grad: Any, reference: np.ndarray, scores: np.ndarray,
                       codes: list[np.ndarray], batch: int, assign: tuple[int, ...], temperature: float) -> str:
    """``problem`` (a plain "differs") narrowed down to the rows that are wrong: one diagnosis."""
    grad = np.asarray(grad, dtype=np.float64)
    n_crops = len(scores) // batch
    stacking = (f"the scores are stacked crop by crop, rows v B to (v + 1) B - 1 are crop v "
                f"(here B = {batch})")
    # An answer that reads the rows image by image (image n, crop v at row n V + v) is
    # recognised by running the reference on the scores reordered that way.
    image_major = np.arange(n_crops * batch).reshape(n_crops, batch).T.reshape(-1)
    misread = np.empty_like(reference)
    misread[image_major] = swapped_prediction_loss(scores[image_major], codes, batch, crops_for_assign=assign,
                                                   temperature=temperature)[1]
    if _matches(grad, misread):
        return f"your rows are ordered image by image, but {stacking}"
    rows = [slice(v * batch, (v + 1) * batch) for v in range(n_crops)]
    wrong = [v for v in range(n_crops) if not _matches(grad[rows[v]], reference[rows[v]])]
    if len(wrong) == n_crops:
        return f"{problem}. Every crop's rows differ (mind that {stacking})"
    worst = max(wrong, key=lambda v: rel_error(grad[rows[v]], reference[rows[v]]))
    role = ("an assignment crop, so it predicts the other assignment crop's code only (n_v = |A| - 1)"
            if worst in assign else "not an assignment crop, so it predicts every code (n_v = |A|)")
    return f"{problem}. Crop {worst}'s rows differ most; crop {worst} is {role}"


def check_prototypes_backward(my_prototypes_backward: Answer) -> CheckResult:
    r"""Backward through the L2 normalisation and the prototype layer.

    ``my_prototypes_backward(dscores, z, C) -> (dz, dC)`` for the forward
    :math:`e_i = z_i / \lVert z_i \rVert`, :math:`S = E C^\top`, with ``dscores`` = G (N, K),
    ``z`` (N, d), ``C`` (K, d):

    .. math:: \frac{\partial L}{\partial C} = G^\top E \ (K \times d), \qquad
              \frac{\partial L}{\partial z_i} = \frac{g_i - e_i (e_i^\top g_i)}{\lVert z_i \rVert},
              \quad g_i = (G C)_i .

    Reference: :func:`swav_ref.swav.prototypes_forward <swav_ref.swav.head.prototypes_forward>` and
    :func:`swav_ref.swav.prototypes_backward <swav_ref.swav.head.prototypes_backward>`.
    """
    if my_prototypes_backward is None:
        return _not_attempted("define my_prototypes_backward(dscores, z, C)")
    rng = np.random.default_rng(5)
    z = rng.normal(size=(6, 3)) * rng.uniform(0.5, 2.0, size=(6, 1))  # rows of different lengths
    # prototypes of other lengths than 1 too: the layer uses C as given, and an answer that
    # normalises C would pass unit-length prototypes
    weight = rng.normal(size=(4, 3)) * rng.uniform(0.5, 2.0, size=(4, 1))
    dscores = rng.normal(size=(6, 4))
    _, cache = prototypes_forward(z, weight)
    dz, dweight = prototypes_backward(dscores, cache)
    result, failed = _run(my_prototypes_backward, dscores, z, weight)
    if failed:
        return failed
    result, failed = _outputs(result, 2, "dz, dC")
    if failed:
        return failed
    order = _order(result, (dz, dweight), ("dz", "dC"))
    if order is not None:
        return order

    def diagnose(name: str, got: Any) -> str | None:
        unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        if name == "dz" and _matches(got, prototypes_backward(dscores, prototypes_forward(z, unit)[1])[0]):
            return ("dz is what unit-length prototypes give, but C is used as given: S = E C^T normalises "
                    "z only (SwAV renormalises C after each optimiser step, outside this layer), so g_i = (G C)_i")
        return None

    return _verdict([
        ("dC", result[1], dweight, "dC = G^T E uses the normalised embeddings e_i, and is K x d like C"),
        ("dz", result[0], dz, "g_i = (G C)_i, remove its component along e_i, then divide by |z_i|"),
    ], diagnose)


# -- notebook 04: BatchNorm and convolution backward ------------------------------------


def check_batchnorm_backward(my_batchnorm_backward: Answer) -> CheckResult:
    r"""BatchNorm's training-mode backward: ``my_batchnorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)``.

    ``x`` and ``dout`` (N, C, H, W), ``gamma`` (C,); statistics per channel over its
    :math:`m = N H W` values, :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`:

    .. math:: \frac{\partial L}{\partial x} &= \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
              \Big(g - \frac1m \sum g - \hat x\, \frac1m \sum g \hat x\Big), \\
              \frac{\partial L}{\partial \gamma} &= \sum g \hat x, \qquad
              \frac{\partial L}{\partial \beta} = \sum g .

    Reference: :func:`swav_ref.nn.functional.batchnorm_forward` (training) and
    :func:`swav_ref.nn.functional.batchnorm_backward`.
    """
    if my_batchnorm_backward is None:
        return _not_attempted("define my_batchnorm_backward(dout, x, gamma, eps)")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 3, 2, 2)) * 2.0 + 1.0
    gamma, beta = rng.uniform(0.5, 1.5, size=3), rng.normal(size=3)
    dout = rng.normal(size=x.shape)
    eps = 1e-5
    _, cache = F.batchnorm_forward(x, gamma, beta, training=True, eps=eps)
    dx, dgamma, dbeta = F.batchnorm_backward(dout, cache)
    result, failed = _run(my_batchnorm_backward, dout, x, gamma, eps)
    if failed:
        return failed
    result, failed = _outputs(result, 3, "dx, dgamma, dbeta")
    if failed:
        return failed
    # dgamma and dbeta have the same shape (C,): a swap is told by the values
    order = _order(result, (dx, dgamma, dbeta), ("dx", "dgamma", "dbeta"))
    if order is not None:
        return order

    def diagnose(name: str, got: Any) -> str | None:
        index = ("dx", "dgamma", "dbeta").index(name)
        for mistake, fix in _BATCHNORM_MISTAKES:
            if _matches(got, _batchnorm_variant(dout, x, gamma, eps, **mistake)[index]):
                return f"{name} is what {fix}"
        return None

    return _verdict([
        ("dbeta", result[2], dbeta, "sum g over the batch and the pixels (axes 0, 2, 3)"),
        ("dgamma", result[1], dgamma, "sum g * x_hat over axes 0, 2, 3"),
        ("dx", result[0], dx, "the mean and the sigma depend on every x of the channel: subtract "
         "mean(g) and x_hat * mean(g x_hat), then scale by gamma / sqrt(var + eps)"),
    ], diagnose)


_PER_CHANNEL = "the mean and the variance are per channel, over axes (0, 2, 3) (the batch and the pixels)"

#: BatchNorm slips, as keyword arguments of :func:`_batchnorm_variant`, and what fixes each
#: (completing "dx is what ..."); the first whose output matches the answer's is named.
_BATCHNORM_MISTAKES: list[tuple[dict[str, Any], str]] = [
    ({"ddof": 1}, "the unbiased variance (ddof=1) gives: x_hat uses the biased variance, 1/m with m = N H W "
                  "(np.var's default ddof=0; torch.var is unbiased by default)"),
    ({"eps_outside": True}, "sqrt(var) + eps gives: eps goes inside the sqrt, sqrt(var + eps)"),
    ({"no_eps": True}, "leaving eps out gives: eps goes inside the sqrt, sqrt(var + eps)"),
    *(({"stat_axes": axes}, f"statistics over axes {axes} give: {_PER_CHANNEL}")
      for axes in ((1, 2, 3), (0,), (2, 3), (0, 1, 2, 3))),
    ({"mean_term": False, "xhat_term": False},
     "the eval-mode formula, gamma g / sqrt(var + eps), gives: it treats the mean and the variance as "
     "constants, but in training they depend on every x of the channel, so subtract mean(g) and "
     "x_hat * mean(g x_hat) (per channel) before scaling"),
    ({"mean_term": False}, "dropping the mean(g) term gives: mu depends on every x of the channel, "
                           "so subtract mean(g) (per channel)"),
    ({"xhat_term": False}, "dropping the x_hat * mean(g x_hat) term gives: sigma depends on every x of "
                           "the channel, so subtract x_hat * mean(g x_hat) (per channel)"),
    ({"gamma_in": False}, "leaving gamma out gives: y = gamma x_hat + beta, so dx is scaled by "
                          "gamma / sqrt(var + eps)"),
]


def _batchnorm_variant(dout: np.ndarray, x: np.ndarray, gamma: np.ndarray, eps: float, *, ddof: int = 0,
                       eps_outside: bool = False, no_eps: bool = False, stat_axes: tuple[int, ...] = (0, 2, 3),
                       mean_term: bool = True, xhat_term: bool = True,
                       gamma_in: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BatchNorm's backward with one of the slips of :data:`_BATCHNORM_MISTAKES` (not a
    reference: the reference is the library's); with the defaults, the right formulas."""
    eps = 0.0 if no_eps else eps
    mean = x.mean(axis=stat_axes, keepdims=True)
    var = x.var(axis=stat_axes, keepdims=True, ddof=ddof)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    xhat = (x - mean) / std
    dxhat = dout.copy()
    if mean_term:
        dxhat -= dout.mean(axis=stat_axes, keepdims=True)
    if xhat_term:
        dxhat -= xhat * (dout * xhat).mean(axis=stat_axes, keepdims=True)
    scale = gamma[None, :, None, None] / std if gamma_in else 1.0 / std
    return scale * dxhat, (dout * xhat).sum(axis=(0, 2, 3)), dout.sum(axis=(0, 2, 3))


def check_conv2d_backward(my_conv2d_backward: Answer) -> CheckResult:
    r"""The convolution's backward: ``my_conv2d_backward(dout, x, weight, stride, padding) -> (dx, dweight, dbias)``.

    ``x`` (N, C, H, W), ``weight`` (O, C, kh, kw), ``dout`` (N, O, H_out, W_out); for the
    forward :math:`y[n,o,u,v] = b_o + \sum_{c,i,j} W[o,c,i,j]\, x_\text{pad}[n,c,su+i,sv+j]`:

    .. math:: \frac{\partial L}{\partial W[o,c,i,j]} &= \sum_{n,u,v} g[n,o,u,v]\,
              x_\text{pad}[n,c,su+i,sv+j], \\
              \frac{\partial L}{\partial b_o} &= \sum_{n,u,v} g[n,o,u,v],

    and every input pixel collects :math:`W[o,c,i,j]\, g[n,o,u,v]` from each window it
    appears in (cut the padding off at the end). Loops are fine. Checked with stride 2,
    padding 1, ``x`` (2, 6, 9, 8) and a non-square ``weight`` (7, 6, 3, 4): every size differs,
    so a shape unpacked in the wrong order or a flipped kernel fails. Reference:
    :func:`swav_ref.nn.functional.conv2d_backward`.
    """
    if my_conv2d_backward is None:
        return _not_attempted("define my_conv2d_backward(dout, x, weight, stride, padding)")
    rng = np.random.default_rng(7)
    # every size different (N, C, O, kh, kw, H, W; H_out = 5, W_out = 4), so that a shape unpacked
    # in the wrong order fails, and a non-square kernel, so that a flipped one fails
    x = rng.normal(size=(2, 6, 9, 8))
    weight, bias = rng.normal(size=(7, 6, 3, 4)), rng.normal(size=7)
    stride, padding = 2, 1
    out, cache = F.conv2d_forward(x, weight, bias, stride=stride, padding=padding)
    dout = rng.normal(size=out.shape)
    dx, dweight, dbias = F.conv2d_backward(dout, cache)
    result, failed = _run(my_conv2d_backward, dout, x, weight, stride, padding)
    if failed:
        return failed
    result, failed = _outputs(result, 3, "dx, dweight, dbias")
    if failed:
        return failed
    padded = (x.shape[0], x.shape[1], x.shape[2] + 2 * padding, x.shape[3] + 2 * padding)
    if np.shape(result[0]) == padded:
        return _not_yet(math.nan, f"dx has the padded shape {padded}: cut the padding off at the end, "
                        f"dx_pad[:, :, p:-p, p:-p], to get x's shape {x.shape}")
    order = _order(result, (dx, dweight, dbias), ("dx", "dweight", "dbias"))
    if order is not None:
        return order

    def diagnose(name: str, got: Any) -> str | None:
        flipped = weight[:, :, ::-1, ::-1]
        if name == "dx":
            _, flipped_cache = F.conv2d_forward(x, flipped, bias, stride=stride, padding=padding)
            flip = _matches(got, F.conv2d_backward(dout, flipped_cache)[0])
        else:
            flip = name == "dweight" and _matches(got, dweight[:, :, ::-1, ::-1])
        if flip:
            return (f"{name} is what a flipped kernel gives: this layer is a cross-correlation (as in "
                    f"PyTorch), window pixel (i, j) meets W[o, c, i, j], no flip")
        return None

    return _verdict([
        ("dbias", result[2], dbias, "sum dout over n, u and v"),
        ("dweight", result[1], dweight, "each weight sees the input value under it in every window "
         "(mind the stride and the padding)"),
        ("dx", result[0], dx, "a pixel belongs to several windows, stride s apart: add (+=) every "
         "contribution into the padded dx, window (u, v) starting at (s u, s v), then cut off the padding"),
    ], diagnose)


# -- notebook 05: collapse, and DeepCluster-v2's gradient -------------------------------------


#: How many logged losses in a row (at least) must sit at ln K for the collapse exercise to
#: pass: a shorter stretch does not tell collapse from the loss crossing ln K on its way down.
COLLAPSE_STEPS = 20


def check_collapse(trainer: Any) -> CheckResult:
    r"""Did the run collapse, and did the monitor see it? ``trainer``: a fitted Trainer.

    Collapse is the loss sitting at :math:`\ln K` (every prediction uniform). Passes when the
    trainer's :class:`~swav_ref.swav.diagnostics.CollapseMonitor` fired and the last
    ``max(window, COLLAPSE_STEPS)`` (at least 20) logged losses are all within the monitor's
    ``tolerance`` of :math:`\ln K`: a monitor with a window of a few steps fires when the loss
    merely crosses :math:`\ln K` on its way down (at temperature 0.2 it does, early on), which
    is no collapse. ``error`` is the largest distance :math:`|L - \ln K|` over those steps.
    """
    if trainer is None:
        return _not_attempted("set REPRODUCE_COLLAPSE = True, choose the temperature and the window, "
                              "and run the cell (a second short training run)")
    if not all(hasattr(trainer, attribute) for attribute in ("log", "monitor", "config")):
        return _not_yet(math.nan, f"check_collapse expects the Trainer you ran fit() on (not what fit() "
                        f"returns), got {type(trainer).__name__}")
    losses = [record["loss"] for record in trainer.log.steps()]
    if not losses:
        return _not_yet(math.nan, "the trainer has no logged steps: call trainer.fit() first")
    monitor = trainer.monitor
    log_k, tolerance, window = monitor.log_k, monitor.tolerance, monitor.window
    needed = max(window, COLLAPSE_STEPS)
    recent = losses[-needed:]
    distance = max(abs(loss - log_k) for loss in recent)
    settled = next((k for k, loss in enumerate(reversed(losses)) if abs(loss - log_k) > tolerance), len(losses))
    temperature = trainer.config.temperature
    at = f"ln K = {log_k:.4f}"
    if monitor.fired and len(losses) >= needed and distance <= tolerance:
        return CheckResult(True, distance, f"correct: the last {needed} losses sit within {distance:.0e} "
                           f"of {at} and the CollapseWarning fired")
    if len(losses) < window:
        return _not_yet(distance, f"the monitor's window ({window} steps) is longer than the run "
                        f"({len(losses)} logged steps), so it cannot fire: give CollapseMonitor a shorter window")
    if len(losses) < needed:
        return _not_yet(distance, f"the run logged {len(losses)} steps, but collapse means the loss sitting at "
                        f"ln K for at least {COLLAPSE_STEPS} logged steps: train longer")
    official = " and the official temperature 0.1" if temperature > 0.1 else ""
    if monitor.fired and window < COLLAPSE_STEPS:
        steps = f"{window} logged step{'s' * (window != 1)}"
        return _not_yet(distance, f"the CollapseWarning fired, but a window of {steps} cannot tell collapse from "
                        f"the loss crossing {at} on its way down, which is when it fired: the last "
                        f"{needed} losses are up to {distance:.2g} away from ln K (collapse means all within "
                        f"{tolerance}). Use a window of about {COLLAPSE_STEPS}{official}, as the exercise asks")
    if monitor.fired:
        return _not_yet(distance, f"the CollapseWarning fired, but the loss has left {at} since: the last "
                        f"{needed} losses are up to {distance:.2g} away (collapse means all within {tolerance}), "
                        f"the last one {losses[-1]:.4f}")
    if settled >= COLLAPSE_STEPS:  # at ln K for long enough, but the window reaches back further
        return _not_yet(distance, f"the loss has sat at {at} (within {tolerance}) for the last {settled} logged "
                        f"steps, but your window of {window} also covers earlier steps, when it was still on its "
                        f"way: use a window <= {settled} (about {COLLAPSE_STEPS} works) or train longer")
    advice = (f"at temperature {temperature:g} the digits recipe learns; try the official 0.1" if temperature > 0.1
              else f"train longer, or loosen the monitor's tolerance ({tolerance})")
    if settled > 0:
        return _not_yet(distance, f"the loss has sat at {at} (within {tolerance}) only for the last {settled} "
                        f"logged steps, fewer than the {COLLAPSE_STEPS} that tell collapse from a passing "
                        f"crossing of ln K: {advice}")
    return _not_yet(distance, f"the loss did not settle at {at} (last value "
                    f"{losses[-1]:.4f}, up to {distance:.2g} away over the last {len(recent)} logged steps): {advice}")


def check_deepcluster_grad(my_deepcluster_grad: Answer) -> CheckResult:
    r"""DeepCluster-v2's loss gradient for one prototype set.

    ``my_deepcluster_grad(scores, targets, n_crops, temperature, n_sets) -> grad``, with
    ``scores`` (V B, K) stacked crop by crop, ``targets`` (B,) int (``IGNORE_INDEX`` = -100
    for an image without a target; every crop of image n has target :math:`y_n`), ``n_sets``
    the number H of prototype sets the loss averages over, and ``grad`` (V B, K):

    .. math:: \frac{\partial \mathcal L}{\partial s_r} &=
              \frac{\operatorname{softmax}(s_r / \tau) - \operatorname{onehot}(y_r)}{\tau\, H\, |R|}
              \quad \text{for } r \in R, \\
              \frac{\partial \mathcal L}{\partial s_r} &= 0 \quad \text{for the rows without a target},

    :math:`R` the (image, crop) rows that have a target. Checked with H = 3 sets, V = 5 crops,
    B = 7 images (one ignored, so :math:`|R| = 30`) and K = 8 (H differs from V - 1, and B - 1
    from V).
    Reference: :func:`swav_ref.deepcluster.deepcluster_loss`.
    """
    if my_deepcluster_grad is None:
        return _not_attempted("define my_deepcluster_grad(scores, targets, n_crops, temperature, n_sets)")
    rng = np.random.default_rng(8)
    n_crops, batch, n_prototypes, n_sets, temperature = 5, 7, 8, 3, 0.1  # H, V - 1, B - 1, V all differ
    scores = [rng.uniform(-1, 1, size=(n_crops * batch, n_prototypes)) for _ in range(n_sets)]
    targets = [rng.integers(0, n_prototypes, size=batch) for _ in range(n_sets)]
    for t in targets:
        t[1] = IGNORE_INDEX
    _, reference = deepcluster_loss(scores, targets, n_crops, temperature)
    comparisons = []
    for h in range(n_sets):
        ignored = np.tile(targets[h] == IGNORE_INDEX, n_crops)  # crop v of image n is row v B + n
        grad, failed = _run(my_deepcluster_grad, scores[h], targets[h], n_crops, temperature, n_sets)
        if failed:
            return failed
        name = f"the gradient of set {h}"
        grad, problem = _real_array(name, grad)
        if problem is not None:
            return _not_yet(math.nan, problem)
        if grad.shape == reference[h].shape and np.any(grad[ignored] != 0):
            zero_rows = np.all(grad == 0, axis=1)
            if np.array_equal(zero_rows, np.repeat(targets[h] == IGNORE_INDEX, n_crops)):
                return _not_yet(rel_error(grad, reference[h]), "your zero rows are those of image n at row "
                                "n V + v, but the rows are stacked crop by crop: crop v of image n is row "
                                "v B + n (np.tile(targets, n_crops), not np.repeat)")
            return _not_yet(rel_error(grad, reference[h]), "the rows of the image whose target is IGNORE_INDEX "
                            "must get zero gradient (and must not count in |R|)")
        comparisons.append((name, grad, reference[h],
                            "softmax(s / tau) - onehot(y), divided by tau H |R| with |R| the rows that "
                            "have a target"))
    return _verdict(comparisons)
