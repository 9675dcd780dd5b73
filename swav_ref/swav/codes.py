r"""Codes: soft assignments of a batch to the prototypes under an equal-partition constraint.

SwAV turns the scores of a batch (cosines between embeddings and prototypes) into *codes*,
one probability vector over the K prototypes per sample, with the constraint that every
prototype receives the same share of the batch. Without that constraint the trivial
solution (every sample on one prototype) would be optimal; with it, the problem is an
entropy-regularised optimal-transport problem, solved by a few Sinkhorn-Knopp iterations.

This module follows ``distributed_sinkhorn`` of facebookresearch/swav (main_swav.py) step
by step, with two safety measures that do not change the result (see
:func:`sinkhorn_codes`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import numpy as np

from swav_ref import fused
from swav_ref.backend import array_namespace, is_numpy

__all__ = ["FLOAT32_SAFE_EPSILON", "sinkhorn_codes"]

#: Below this epsilon a float32 (or float16) input is iterated in float64 and the codes are
#: cast back. With cosine scores an entry of exp((score - max) / eps) is at least
#: exp(-2 / eps); at eps = 0.03 that is e^-67, which leaves a factor e^20 (about 5e8) of
#: head-room above float32's smallest normal number (e^-87.3) for the 1/B and 1/K factors
#: of the normalisations. float64 reaches e^-708: safe down to eps of about 0.003.
FLOAT32_SAFE_EPSILON = 0.03

Hook = Optional[Callable[[Any], Any]]


def sinkhorn_codes(
    scores: Any,
    *,
    epsilon: float = 0.05,
    n_iters: int = 3,
    allreduce: Hook = None,
    allreduce_max: Hook = None,
    compute_dtype: Any = None,
) -> Any:
    r"""Equal-partition codes of a batch, by the official SwAV Sinkhorn-Knopp iterations.

    Parameters
    ----------
    scores : array (B, K), float16, float32 or float64
        Scores of B samples against K prototypes: cosines in [-1, 1] (L2-normalised
        embeddings against L2-normalised prototypes). Other scores, e.g. cosines times 30,
        can underflow (see Notes).
    epsilon : float
        Entropic regularisation; smaller gives sharper codes (official default 0.05).
    n_iters : int
        Number of (prototype, sample) normalisation rounds; fixed, no convergence test, so
        nothing is read back from the device (official default 3).
    allreduce : callable or None
        ``allreduce(array) -> array`` summing an array over all workers (data-parallel
        training). ``None`` means a single process. It is applied exactly where the
        official distributed code reduces: the total, the per-prototype sums, and the batch
        size (global B = sum of the local B).
    allreduce_max : callable or None
        ``allreduce_max(array) -> array``, the element-wise maximum over workers. Required
        together with ``allreduce``: the shift before ``exp`` must be identical on every
        worker (see Notes).
    compute_dtype : dtype or None
        The dtype the iterations run in. ``None`` chooses: float64 for a float64 input;
        float32 for a float32 or float16 input, or float64 when
        ``epsilon < FLOAT32_SAFE_EPSILON`` (codes are cast back to the input dtype either way).

    Returns
    -------
    codes : array (B, K), the dtype of ``scores``
        Each row is a probability vector (sums to 1); each prototype's total over the
        (global) batch approaches B / K as ``n_iters`` grows.

    Notes
    -----
    The official algorithm, on :math:`Q = \exp(S/\varepsilon)^\top` (K x B):

    .. math::

        & Q \leftarrow Q / \textstyle\sum_{kb} Q_{kb}; \\
        & \text{repeat } n: \quad
          Q_{kb} \leftarrow \frac{Q_{kb}}{K \sum_{b'} Q_{kb'}},\quad
          Q_{kb} \leftarrow \frac{Q_{kb}}{B \sum_{k'} Q_{k'b}}; \\
        & \text{codes} = (B\,Q)^\top .

    Here the array stays in the (B, K) layout of ``scores``: the official "rows" (one per
    prototype, sums over the batch) are our ``axis=0`` sums, its "columns" (one per sample)
    our ``axis=1`` sums. Same numbers, no transposes.

    *Shift before exp.* ``exp(S / eps)`` overflows float32 once a score exceeds
    :math:`88\varepsilon` (at eps = 0.005, a cosine of 0.44). We compute
    :math:`\exp((S_{bk} - m_k)/\varepsilon)` with :math:`m_k` the largest score of prototype
    k over the (global) batch. Scaling row k of the official :math:`Q` by a constant
    :math:`e^{-m_k/\varepsilon}` changes nothing: the first per-prototype normalisation
    divides row k by its own sum, which carries the same factor (the division by the total,
    a scalar, cancels there as well). So the iterates from then on are the official ones.
    The per-prototype shift is safer than one global maximum: every prototype keeps an entry
    equal to 1, so no per-prototype sum can underflow to 0 (0/0 = NaN). It is exact only if
    every worker uses the same :math:`m_k` (the total and the per-prototype sums mix the
    workers' columns), hence ``allreduce_max``. A fixed shift of 1 (valid for cosines) was
    rejected: it overflows on un-normalised features, a known way to get NaN in SwAV.

    *Underflow at small epsilon.* The smallest entry is about :math:`e^{-2/\varepsilon}`;
    when all of one sample's entries underflow (a row of our B x K array, a column of the
    paper's K x B Q), the official iterations divide 0 by 0. In float32
    that can happen for epsilon below about 0.02 (the threshold grows with ln(B K)), hence
    the automatic float64 iterations below ``FLOAT32_SAFE_EPSILON``. They reproduce the official algorithm (in more
    precision); they are not a different algorithm.

    *Scores outside the contract.* Scores that are not cosines can make all of one sample's
    entries underflow even in float64 (unit-norm embeddings times 30 at eps = 0.05 give exponents
    down to -1200), and one 0/0 row turns every code into NaN through the per-prototype
    sums. On NumPy that is an error naming the scores' range; elsewhere finding it would
    cost a wait for the device, so the NaN reaches the loss, where the trainer's check at
    its logging boundary stops training with advice. NaN scores give NaN codes everywhere.
    """
    xp = array_namespace(scores)
    epsilon, n_iters = _check_arguments(scores, epsilon, n_iters, allreduce, allreduce_max)
    dtype = _choose_compute_dtype(xp, scores.dtype, epsilon, compute_dtype)
    reduce_sum = allreduce if allreduce is not None else _identity
    reduce_max = allreduce_max if allreduce_max is not None else _identity

    s = scores if scores.dtype == dtype else xp.astype(scores, dtype)
    n_prototypes = s.shape[1]
    per_prototype_max = reduce_max(xp.max(s, axis=0, keepdims=True))  # (1, K), same everywhere
    if fused.usable(s):
        q = _fused_iterations(s, per_prototype_max, epsilon, n_iters, reduce_sum, scores.dtype)
    else:
        q = s - per_prototype_max
        q *= 1.0 / epsilon
        q = xp.exp(q)  # entries in [0, 1] (0 only where exp underflows, see Notes); each prototype has a 1

        q /= reduce_sum(xp.sum(q))  # official: Q /= sum(Q), an all-reduce
        batch_total = reduce_sum(xp.asarray(s.shape[0], dtype=dtype))  # global B
        for _ in range(n_iters):
            # each prototype (official row) gets total mass 1/K; its sum is all-reduced
            q /= reduce_sum(xp.sum(q, axis=0, keepdims=True)) * n_prototypes
            # each sample (official column) gets total mass 1/B; local, no communication
            q /= xp.sum(q, axis=1, keepdims=True) * batch_total
        q *= batch_total  # rows now sum to 1: the codes
        q = q if q.dtype == scores.dtype else xp.astype(q, scores.dtype)
    if is_numpy(xp):  # free on the host; on a device the trainer's NaN check catches it
        _check_underflow(q, s, epsilon)
    return q


def _fused_iterations(s, per_prototype_max, epsilon, n_iters, reduce_sum, out_dtype):
    """The same iterations as :func:`sinkhorn_codes`, each normalisation one fused kernel
    (:mod:`swav_ref.fused`, CuPy): the shifted exponential in one pass, and each division
    by a (reduced) sum times its count without a separate vector operation."""
    xp = array_namespace(s)
    batch, n_prototypes = s.shape
    q = fused.shifted_exp(s, xp.reshape(per_prototype_max, (n_prototypes,)), epsilon)
    q /= reduce_sum(xp.sum(q))
    batch_total = fused.dense(xp.reshape(reduce_sum(xp.asarray(batch, dtype=s.dtype)), (1,)))
    prototype_count = xp.full((1,), n_prototypes, dtype=s.dtype)
    for _ in range(n_iters):
        fused.divide_columns(q, fused.dense(reduce_sum(xp.sum(q, axis=0))), prototype_count)
        fused.divide_rows(q, xp.sum(q, axis=1), batch_total)
    q *= batch_total
    return q if q.dtype == out_dtype else xp.astype(q, out_dtype)


def _check_underflow(q: Any, s: Any, epsilon: float) -> None:
    """Raise, naming the cause, when finite NumPy scores gave NaN codes (see *Scores outside
    the contract* in :func:`sinkhorn_codes`). Scores that are NaN already (a diverged
    network) give NaN codes, left for the trainer, whose check stops training with advice."""
    codes, scores = q.view(np.ndarray), s.view(np.ndarray)  # plain arrays: no device stand-in
    if np.all(np.isfinite(codes)) or not np.all(np.isfinite(scores)):
        return
    low, high = float(scores.min()), float(scores.max())
    raise ValueError(
        f"sinkhorn_codes: the codes are NaN: scores spanning [{low:.3g}, {high:.3g}] at epsilon {epsilon} make "
        f"exp((score - max) / epsilon) underflow to 0 for a whole sample in {scores.dtype}; the scores should "
        "be cosines in [-1, 1] (L2-normalised embeddings and prototypes), else raise epsilon or pass "
        "compute_dtype=float64")


def _identity(x: Any) -> Any:
    return x


def _check_arguments(scores, epsilon, n_iters, allreduce, allreduce_max) -> tuple[float, int]:
    if getattr(scores, "ndim", None) != 2:
        raise ValueError(
            f"sinkhorn_codes: scores must be 2-D (batch, prototypes), got shape "
            f"{getattr(scores, 'shape', None)}"
        )
    if scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"sinkhorn_codes: scores has an empty axis, shape {scores.shape}")
    if isinstance(epsilon, bool) or not (
        isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon > 0
    ):
        raise ValueError(f"sinkhorn_codes: epsilon must be a positive number, got {epsilon!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"sinkhorn_codes: n_iters must be an integer >= 1, got {n_iters!r}")
    if allreduce is not None and allreduce_max is None:
        raise ValueError(
            "sinkhorn_codes: allreduce given without allreduce_max; the shift before exp must "
            "be the same on every worker, so pass an element-wise max all-reduce as well"
        )
    return float(epsilon), int(n_iters)  # Python numbers: NumPy scalars would promote


def _choose_compute_dtype(xp, dtype, epsilon: float, requested):
    # The scores first, whatever compute_dtype says: integer, bool or complex scores would
    # be cast to it and the codes cast back, giving all-zero, all-True or real-part codes.
    if dtype not in (xp.float32, xp.float64, getattr(xp, "float16", xp.float32)):
        raise ValueError(
            f"sinkhorn_codes: scores must be a floating-point array, got {dtype}; the scores are real "
            "(cosines), in float16, float32 or float64")
    if requested is not None:
        if isinstance(requested, str):
            requested = getattr(xp, requested)
        if requested not in (xp.float32, xp.float64):
            raise ValueError(f"sinkhorn_codes: compute_dtype must be float32 or float64, got {requested}")
        return requested
    return xp.float64 if dtype == xp.float64 or epsilon < FLOAT32_SAFE_EPSILON else xp.float32
