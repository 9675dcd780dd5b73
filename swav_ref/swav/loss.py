r"""The swapped-prediction loss of SwAV, forward and hand-derived backward.

Every crop of an image is asked to predict the *code* of the other crops: the codes of the
assignment crops (by default the two large ones) are computed by Sinkhorn and held
constant, and every other crop's scores, through a softmax at temperature tau, must match
them. Two functions:

- :func:`swapped_prediction_loss` -- the loss and its gradient for *given* codes (pure; the
  gradient check perturbs the scores with these codes held fixed);
- :func:`swav_loss` -- computes the codes (with the optional queue) and calls the above; it
  is what a training step calls.

Usage::

    loss, grad = swav_loss(scores, batch_size)          # unpacks to (loss, grad)
    out = swav_loss(scores, batch_size); out.codes      # the codes, for diagnostics
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from swav_ref.backend import array_namespace, is_numpy, python_int
from swav_ref.swav.codes import sinkhorn_codes

__all__ = ["SwAVLossOutput", "swapped_prediction_loss", "swav_loss"]


@dataclass(frozen=True)
class SwAVLossOutput:
    """What :func:`swav_loss` returns.

    Attributes
    ----------
    loss : 0-d array
        The swapped-prediction loss (on the backend: convert it at the logging boundary).
    grad : array (n_crops * batch_size, K)
        d loss / d scores, with the codes held constant.
    codes : tuple of arrays (batch_size, K)
        The codes of the current batch, one per assignment crop, in ``crops_for_assign``
        order.

    Notes
    -----
    Iterating yields ``loss, grad`` only, so ``loss, grad = swav_loss(...)`` works.
    """

    loss: Any
    grad: Any
    codes: tuple

    def __iter__(self):
        return iter((self.loss, self.grad))


def swav_loss(
    scores: Any,
    batch_size: int,
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue_scores: Optional[Sequence[Any]] = None,
    allreduce: Optional[Callable[[Any], Any]] = None,
    allreduce_max: Optional[Callable[[Any], Any]] = None,
) -> SwAVLossOutput:
    r"""SwAV's loss over multi-crop scores: codes by Sinkhorn, then swapped prediction.

    Parameters
    ----------
    scores : array (n_crops * batch_size, K)
        Prototype scores, stacked crop by crop (rows ``v*B : (v+1)*B`` are crop v), as the
        official code stacks them.
    batch_size : int
        B, the number of images (per worker).
    crops_for_assign : sequence of int
        The crops whose codes are computed (official default: the two large crops, 0 and 1).
    temperature : float
        tau of the softmax over the prototypes (official 0.1).
    epsilon, sinkhorn_iterations : float, int
        Passed to :func:`~swav_ref.swav.codes.sinkhorn_codes` (official 0.05 and 3).
    queue_scores : sequence or None
        One entry per assignment crop: ``None`` or the (L, K) scores of queued embeddings
        against the *current* prototypes. They join the Sinkhorn problem, placed before the
        batch as the official code does (``torch.cat((queue @ C.T, out))``), and only the
        last ``batch_size`` codes (the current batch) are kept. They get no gradient.
    allreduce, allreduce_max : callable or None
        Cross-worker sum and max, passed to Sinkhorn only: the codes are computed over the
        global batch; the loss itself is the local one (data parallelism averages the
        gradients, not this function).

    Returns
    -------
    SwAVLossOutput
        ``loss`` (0-d), ``grad`` (d loss / d scores) and ``codes``; unpacks to
        ``loss, grad``.

    Notes
    -----
    See :func:`swapped_prediction_loss` for the loss and its gradient.
    """
    xp = array_namespace(scores)
    n_crops, batch_size = _check_layout(scores, batch_size, crops_for_assign)
    temperature = _check_temperature(temperature)
    queue_scores = _check_queue(queue_scores, crops_for_assign, scores)
    codes = []
    for crop, queued in zip(crops_for_assign, queue_scores):
        crop_scores = scores[crop * batch_size : (crop + 1) * batch_size, :]
        if queued is not None:
            crop_scores = xp.concat((queued, crop_scores), axis=0)
        q = sinkhorn_codes(
            crop_scores,
            epsilon=epsilon,
            n_iters=sinkhorn_iterations,
            allreduce=allreduce,
            allreduce_max=allreduce_max,
        )
        codes.append(q[q.shape[0] - batch_size :, :])  # the current batch only
    # the layout and the temperature are checked above, and Sinkhorn's codes are probability
    # rows by construction: not checked again on every step
    loss, grad = _loss_and_gradient(scores, codes, n_crops, batch_size, crops_for_assign, temperature)
    return SwAVLossOutput(loss, grad, tuple(codes))


def swapped_prediction_loss(
    scores: Any,
    codes: Sequence[Any],
    batch_size: int,
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
) -> tuple[Any, Any]:
    r"""The swapped-prediction loss for given codes, and its gradient w.r.t. the scores.

    Parameters
    ----------
    scores : array (n_crops * batch_size, K), real floating point
        Stacked crop by crop.
    codes : sequence of arrays (batch_size, K)
        One per assignment crop, in ``crops_for_assign`` order, the dtype of ``scores``;
        each row is a probability vector (entries >= 0, sum 1). Checked on NumPy only;
        elsewhere a precondition (checking costs a device sync). Treated as constants
        (SwAV's stop-gradient).
    batch_size : int
    crops_for_assign : sequence of int
    temperature : float

    Returns
    -------
    loss : 0-d array
    grad : array (n_crops * batch_size, K)
        d loss / d scores.

    Notes
    -----
    With :math:`A` the assignment crops, :math:`V` the number of crops,
    :math:`p_v = \operatorname{softmax}(s_v / \tau)` row-wise and :math:`q_a` the codes,

    .. math::

        L = \frac{1}{|A|} \sum_{a \in A} \frac{1}{V - 1} \sum_{v \ne a}
            -\frac{1}{B} \sum_{b=1}^{B} \sum_{k} q_{a,bk} \log p_{v,bk} .

    Regroup by the predicting crop v: it is scored against :math:`T_v = \sum_{a \in A, a
    \ne v} q_a`, a sum of :math:`n_v` codes (:math:`n_v = |A|` for a crop that is not an
    assignment crop, :math:`|A| - 1` for one that is). Since
    :math:`\partial(-\sum_k t_k \log \operatorname{softmax}(z)_k)/\partial z
    = (\sum_k t_k)\,\operatorname{softmax}(z) - t` and every code sums to 1,

    .. math::

        \frac{\partial L}{\partial s_v} = \frac{n_v\, p_v - T_v}{\tau\, |A|\, (V - 1)\, B} ,

    which for a single pair is the familiar :math:`(p_v - q_a)/\tau` times the averaging
    factors.

    *Computation.* The softmax of every crop is computed once and shared by all the pairs it
    enters (the official code recomputes it per pair). With :math:`Q = \sum_{a\in A} q_a`,
    :math:`T_v = Q - [v \in A]\, q_v`, so the targets never need to be formed per crop:

    .. math::

        \sum_v \langle T_v, \log p_v \rangle
        = \Big\langle Q, \sum_v \log p_v \Big\rangle
          - \sum_{a \in A} \langle q_a, \log p_a \rangle ,

    and the gradient is :math:`n_v p_v - Q` on every crop plus :math:`q_a` on assignment
    crop a. :math:`\log p = z - \max z - \log\sum e^{z - \max z}`, with
    :math:`\sum_k (T_v)_{bk} = n_v`.
    """
    n_crops, batch_size = _check_layout(scores, batch_size, crops_for_assign)
    _check_codes(codes, crops_for_assign, batch_size, scores)
    return _loss_and_gradient(scores, codes, n_crops, batch_size, crops_for_assign, _check_temperature(temperature))


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not (
        isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"swapped_prediction_loss: temperature must be positive, got {temperature!r}")
    return float(temperature)  # a Python number: NumPy scalars would promote


def _loss_and_gradient(scores, codes, n_crops: int, batch_size: int, crops_for_assign, temperature: float):
    """:func:`swapped_prediction_loss` on checked arguments (what :func:`swav_loss` passes:
    it has checked the layout, and its codes come from Sinkhorn, rows summing to 1)."""
    xp = array_namespace(scores, *codes)
    n_assign, (n_rows, n_prototypes) = len(crops_for_assign), scores.shape
    weight = 1.0 / (n_assign * (n_crops - 1) * batch_size)  # mean over b, v != a, a
    grad_weight = weight / temperature

    # crop-major view (V, B, K); logits shifted by their row maximum: z - max z
    scores3 = xp.reshape(scores, (n_crops, batch_size, n_prototypes))
    logits = scores3 - xp.max(scores3, axis=2, keepdims=True)
    logits *= 1.0 / temperature
    # exp(z - max z): the softmax's numerators, not yet divided by their row sum. The
    # buffer is turned into the gradient in place below (one (V, B, K) array, not three).
    grad = xp.exp(logits)
    sum_exp = xp.sum(grad, axis=2, keepdims=True)  # (V, B, 1)

    # n_v: how many codes crop v predicts (assignment crops do not predict themselves)
    counts = [n_assign - 1 if v in crops_for_assign else n_assign for v in range(n_crops)]
    count = xp.reshape(xp.asarray(counts, dtype=scores.dtype), (n_crops, 1, 1))

    # loss = weight * sum_v [ n_v sum_b log sum exp  -  <T_v, z_v - max z_v> ]
    code_total = _sum(codes)  # Q
    cross = xp.sum(code_total * xp.sum(logits, axis=0))
    for a, q in zip(crops_for_assign, codes):
        cross -= xp.sum(q * logits[a, ...])
    loss = weight * (xp.sum(count * xp.log(sum_exp)) - cross)

    # grad = (n_v p_v - T_v) * grad_weight = n_v p_v gw - Q gw (+ q_a gw on crop a)
    grad *= (count * grad_weight) / sum_exp  # now n_v p_v gw, p_v = softmax(z_v)
    grad -= code_total * grad_weight
    for a, q in zip(crops_for_assign, codes):
        grad[a, ...] += q * grad_weight
    return loss, xp.reshape(grad, (n_rows, n_prototypes))


def _sum(arrays):
    total = arrays[0]
    for a in arrays[1:]:
        total = total + a
    return total


def _check_layout(scores, batch_size, crops_for_assign) -> tuple[int, int]:
    """The number of crops and ``batch_size`` as a Python int (NumPy integers are accepted),
    after checking the stacked layout; ValueError otherwise."""
    if getattr(scores, "ndim", None) != 2:
        raise ValueError(
            f"scores must be 2-D (n_crops * batch_size, K), got shape {getattr(scores, 'shape', None)}"
        )
    if not array_namespace(scores).isdtype(scores.dtype, "real floating"):  # a dtype check: no sync
        raise ValueError(f"scores must be a real floating-point array, got dtype {scores.dtype}")
    batch_size = python_int(batch_size, "batch_size")
    n_rows = scores.shape[0]
    if n_rows % batch_size != 0:
        raise ValueError(
            f"scores has {n_rows} rows, not a multiple of batch_size={batch_size}; rows must "
            "be the crops stacked one batch after another"
        )
    n_crops = n_rows // batch_size
    if n_crops < 2:
        raise ValueError(f"SwAV needs at least 2 crops, got {n_crops} ({n_rows} rows / {batch_size})")
    crops = list(crops_for_assign)
    if not crops or len(set(crops)) != len(crops) or any(
        isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c < n_crops for c in crops
    ):
        raise ValueError(
            f"crops_for_assign must be distinct crop indices in [0, {n_crops}), got {crops_for_assign!r}"
        )
    return n_crops, batch_size


def _check_codes(codes, crops_for_assign, batch_size, scores) -> None:
    if len(codes) != len(crops_for_assign):
        raise ValueError(
            f"got {len(codes)} code arrays for {len(crops_for_assign)} assignment crops {tuple(crops_for_assign)}"
        )
    want = (batch_size, scores.shape[1])
    for a, q in zip(crops_for_assign, codes):
        if tuple(q.shape) != want:
            raise ValueError(f"codes of crop {a} have shape {tuple(q.shape)}, expected {want}")
        if q.dtype != scores.dtype:
            raise ValueError(f"codes of crop {a} are {q.dtype}, scores are {scores.dtype}")
    # The loss and its gradient assume every code row sums to 1 (n_v p_v - T_v). Checking the
    # sums reads values: free on NumPy, a wait for the device on every step elsewhere. So,
    # as sinkhorn_codes does, NumPy checks and the other backends take it as a precondition.
    if is_numpy(array_namespace(scores)):
        _check_code_sums(codes, crops_for_assign)


def _check_code_sums(codes, crops_for_assign) -> None:
    """Raise unless every finite code row is a probability vector (>= 0, sums to 1). NaN
    codes (NaN scores, a diverged network) pass: the trainer's NaN check gives advice."""
    for a, q in zip(crops_for_assign, codes):
        q = q.view(np.ndarray)  # a plain array: no device stand-in counts this read
        sums = np.sum(q, axis=1)
        tol = max(1e-6, 10 * q.shape[1] * np.finfo(q.dtype).eps)  # summation rounding of K terms
        bad = np.flatnonzero((np.abs(sums - 1) > tol) | np.any(q < 0, axis=1))
        if bad.size:
            b = int(bad[0])
            raise ValueError(
                f"codes of crop {a}: row {b} sums to {float(sums[b]):.6g} (min entry "
                f"{float(q[b].min()):.3g}); each row must be a probability vector (>= 0, sums to 1), "
                "as sinkhorn_codes returns")


def _check_queue(queue_scores, crops_for_assign, scores) -> list:
    if queue_scores is None:
        return [None] * len(crops_for_assign)
    queue_scores = list(queue_scores)
    if len(queue_scores) != len(crops_for_assign):
        raise ValueError(
            f"queue_scores has {len(queue_scores)} entries, expected one per assignment crop "
            f"({len(crops_for_assign)})"
        )
    for a, queued in zip(crops_for_assign, queue_scores):
        if queued is None:
            continue
        if queued.ndim != 2 or queued.shape[1] != scores.shape[1]:
            raise ValueError(
                f"queue scores of crop {a} have shape {tuple(queued.shape)}, expected (L, {scores.shape[1]})"
            )
        if queued.dtype != scores.dtype:
            raise ValueError(f"queue scores of crop {a} are {queued.dtype}, scores are {scores.dtype}")
    return queue_scores
