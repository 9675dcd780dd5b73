r"""Entropic optimal transport by Sinkhorn-Knopp scaling, in the kernel and the log domain.

The problem: move the mass ``r`` (n,) onto the mass ``c`` (m,) at the smallest cost, where
moving one unit from ``i`` to ``j`` costs ``M[i, j]``, and pay a little for plans that are
not spread out:

.. math::

    P_\lambda &= \arg\min_{P \ge 0,\; P 1 = r,\; P^\top 1 = c}
        \sum_{ij} P_{ij} M_{ij} - \frac{1}{\lambda} H(P), \\
    H(P) &= -\sum_{ij} P_{ij} \log P_{ij}.

Its solution has the scaling form :math:`P = \operatorname{diag}(a)\, K \operatorname{diag}(b)`
with the Gibbs kernel :math:`K = e^{-\lambda M}`, and Sinkhorn-Knopp finds the scalings by
fitting the rows and the columns in turn:

.. math:: a \leftarrow r \oslash K b, \qquad b \leftarrow c \oslash K^\top a.

Two implementations:

:func:`sinkhorn_knopp`
    the kernel domain, two matrix-vector products per iteration. Fast, but an entry of the
    kernel underflows once :math:`\lambda` times its reduced cost (its cost less the row's
    and the column's shifts, at most its height above the cheapest entry of its row)
    exceeds about 708 (float64) or 87 (float32), and the scalings cannot bring back what
    was lost: the plan leaves that entry empty, or weighs it wrongly. When such an entry should have
    carried mass, or the scalings overflow, it raises ``ValueError`` and recommends
    :func:`sinkhorn_log`.
:func:`sinkhorn_log`
    the log domain, with dual potentials :math:`f, g` and
    :math:`P_{ij} = e^{\lambda (f_i + g_j - M_{ij})}`. It stays finite for any ``lam`` (as long
    as :math:`\lambda M` itself fits in the dtype), and is
    fast because it absorbs the potentials into the kernel and runs the cheap scaling
    iterations on top of it (see its Notes).

Both stop on the **marginal error** (how far the plan's row and column sums are from ``r`` and
``c``, relative to the total mass), not on how much the row sums changed since the last
iteration: that second rule can stop long before the constraints hold (see
:func:`swav_ref.ot.desserts.original_sinkhorn`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from swav_ref.backend import array_namespace, default_tol, host_dtype, logsumexp, to_numpy

__all__ = [
    "ConvergenceWarning",
    "TransportProblem",
    "TransportResult",
    "check_problem",
    "marginal_violation",
    "sinkhorn_knopp",
    "sinkhorn_log",
]

#: Largest relative difference allowed between ``sum(r)`` and ``sum(c)``.
MASS_RTOL = 1e-6


class ConvergenceWarning(UserWarning):
    """Sinkhorn did not meet its tolerance within ``max_iter`` iterations."""


@dataclass(frozen=True, eq=False)
class TransportResult:
    """What a transport solver found.

    Attributes
    ----------
    plan : array (n, m)
        the transport plan :math:`P`, in the namespace and dtype of the inputs.
    cost : 0-d array
        :math:`\\sum_{ij} P_{ij} M_{ij}`, the transport cost of ``plan`` (without the entropy).
    n_iter : int
        iterations run (one iteration = one row fit and one column fit).
    converged : bool
        whether the marginal error reached ``tol``.
    marginal_error : tuple of float
        the marginal error, measured every ``check_every`` iterations (host floats; measuring
        forces a device-to-host sync, which is why it is not done every iteration).
    checked_at : tuple of int
        the iteration at which each ``marginal_error`` entry was measured.
    method : str
        ``"sinkhorn_knopp"``, ``"sinkhorn_log"``, ``"exact"``, ...
    lam : float or None
        the regularisation strength (``None`` for exact transport).
    f, g : arrays (n,), (m,) or None
        dual potentials, :math:`P_{ij} = e^{\\lambda (f_i + g_j - M_{ij})}` for
        :func:`sinkhorn_log`; the linear program's duals for exact transport.
    details : dict
        solver-specific counters. :func:`sinkhorn_log`: ``kernel_rebuilds``, how often the
        kernel was rebuilt from new potentials, after the scalings grew large or after an
        exact block (0: the first kernel served throughout), and ``exact_blocks``, the blocks
        that over- or underflowed and were redone with exact log-sum-exp updates.
    """

    plan: Any
    cost: Any
    n_iter: int
    converged: bool
    marginal_error: tuple[float, ...]
    checked_at: tuple[int, ...]
    method: str
    lam: float | None = None
    f: Any = None
    g: Any = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class TransportProblem:
    """Validated inputs (:func:`check_problem`): one float dtype, ``c`` rescaled to the mass
    of ``r``.

    Attributes
    ----------
    xp : module
        the inputs' array namespace.
    M : array (n, m)
        the cost matrix.
    r, c : arrays (n,), (m,)
        the marginals, ``c`` scaled to the mass of ``r``.
    mass : float
        the total mass, ``sum(r)`` (the solvers' stopping rule is relative to it).
    min_cost, max_cost : float
        the smallest and the largest entry of ``M`` (whether ``lam * M`` fits the dtype).
    has_zero_mass : bool
        whether some row or column carries no mass (those are kept out of the scalings).
    """

    xp: Any
    M: Any
    r: Any
    c: Any
    mass: float
    min_cost: float
    has_zero_mass: bool
    max_cost: float


def _check_array(name: str, x: Any) -> None:
    """Refuse what is not a plain array of real numbers, by name. Looks only at the type and
    the dtype, never at the data, so it costs no device sync."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array (NumPy, CuPy, ...), got {type(x).__name__} {x!r:.60}; "
                         f"for uniform masses write e.g. xp.full(n, 1 / n)")
    # NumPy's subclasses that change the arithmetic: np.matrix makes `*` and `@` matrix
    # products and keeps everything 2-D; a masked array's mask is dropped by some operations
    # and obeyed by others, so its masked entries would count in some sums and not in others.
    if isinstance(x, np.matrix):
        raise ValueError(f"{name} is an np.matrix (shape {x.shape}); pass a plain array, np.asarray({name})")
    if isinstance(x, np.ma.MaskedArray):
        raise ValueError(f"{name} is a masked array; say what its masked entries mean and pass a plain "
                         f"array, e.g. {name}.filled(0.0)")
    kind = host_dtype(x.dtype).kind  # metadata only: works for any backend's dtype
    if kind == "c":
        raise ValueError(f"costs and marginals must be real, got dtype {x.dtype} for {name}")
    if kind not in "fiu":  # bool, str, bytes, object, datetime64, timedelta64, ...
        raise ValueError(f"{name} must hold real numbers (a floating or integer dtype), got dtype {x.dtype}")


def _as_float(x: Any, xp: Any) -> Any:
    if x.dtype == xp.float32 or x.dtype == xp.float64:
        return x
    return xp.astype(x, xp.float64)  # integers and float16 (checked by _check_array)


def check_problem(M: Any, r: Any, c: Any) -> TransportProblem:
    """Validate a transport problem; raise ``ValueError`` naming what is wrong.

    Parameters
    ----------
    M : array (n, m)
        costs, finite.
    r : array (n,)
        source masses, finite and >= 0.
    c : array (m,)
        target masses, finite and >= 0, with ``sum(c)`` equal to ``sum(r)`` within a relative
        ``MASS_RTOL`` (1e-6); ``c`` is then rescaled to exactly the mass of ``r`` so that a
        rounding-level mismatch cannot stall the iterations.

    Raises
    ------
    ValueError
        naming the problem: not an array, an ``np.matrix`` or masked array, a dtype that is
        not real floating or integer (bool, complex, string, object, datetime64), a shape,
        NaN/inf, a negative or zero mass, or masses that differ.

    Notes
    -----
    The type and dtype checks read only metadata; the value checks are reductions computed on
    the device and brought to the host in one transfer (one sync per call). Integer and float16 inputs become float64 (float16 is too coarse for
    the iterations); mixed float32/float64 become float64.
    """
    for name, x in (("M", M), ("r", r), ("c", c)):
        _check_array(name, x)
    xp = array_namespace(M, r, c)
    if M.ndim != 2:
        raise ValueError(f"M must be a 2-D cost matrix (n, m), got shape {tuple(M.shape)}")
    n, m = M.shape
    if n == 0 or m == 0:
        raise ValueError(f"empty problem: M has shape {tuple(M.shape)}")
    if tuple(r.shape) != (n,):
        raise ValueError(f"r must have shape ({n},) to match M {tuple(M.shape)}, got {tuple(r.shape)}")
    if tuple(c.shape) != (m,):
        raise ValueError(f"c must have shape ({m},) to match M {tuple(M.shape)}, got {tuple(c.shape)}")
    M, r, c = (_as_float(x, xp) for x in (M, r, c))
    dtype = xp.result_type(M, r, c)
    M, r, c = (xp.astype(x, dtype, copy=False) for x in (M, r, c))  # no copy if already right

    # min and max propagate NaN, so they double as finiteness checks.
    with _quiet_floating_point():  # a sum that overflows is reported below, by name
        stats = to_numpy(xp.stack([xp.min(M), xp.max(M), xp.min(r), xp.max(r), xp.sum(r),
                                   xp.min(c), xp.max(c), xp.sum(c)]))
    m_min, m_max, r_min, r_max, r_sum, c_min, c_max, c_sum = (float(s) for s in stats)
    if not (math.isfinite(m_min) and math.isfinite(m_max)):
        raise ValueError("M contains NaN or inf; costs must be finite")
    for name, lo, hi, total in (("r", r_min, r_max, r_sum), ("c", c_min, c_max, c_sum)):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or inf; masses must be finite")
        if not math.isfinite(total):
            raise ValueError(f"{name} sums to more than {dtype} can hold (its largest entry is {hi:g}); "
                             "rescale the masses, e.g. to total 1")
        if lo < 0:
            raise ValueError(f"{name} has a negative entry ({lo:g}); masses must be >= 0")
        if total <= 0:
            raise ValueError(f"{name} has zero total mass; there is nothing to transport")
    if abs(r_sum - c_sum) > MASS_RTOL * max(r_sum, c_sum):
        raise ValueError(
            f"r and c must carry the same mass: sum(r) = {r_sum:.10g}, sum(c) = {c_sum:.10g} "
            f"(relative difference {abs(r_sum - c_sum) / max(r_sum, c_sum):.2e} > {MASS_RTOL:g})"
        )
    if c_sum != r_sum:
        c = c * (r_sum / c_sum)
    return TransportProblem(xp, M, r, c, r_sum, m_min, has_zero_mass=min(r_min, c_min) == 0, max_cost=m_max)


def _check_lam(lam: Any, prob: TransportProblem) -> float:
    """``lam`` as a float, checked to be positive, finite, and such that ``lam * M`` fits in
    the dtype of the problem."""
    try:
        lam = float(lam)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lam must be a number, got {lam!r}") from exc
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be positive and finite, got {lam}")
    largest = max(abs(prob.min_cost), abs(prob.max_cost))
    # Headroom: the log domain adds lam * M to potentials of about the same size (f_i + g_j
    # - lam M_ij), and the c-transform subtracts such terms, so lam * |M| must stay a few
    # times below the largest float, not merely below it.
    if lam * largest > float(prob.xp.finfo(prob.M.dtype).max) / 4:
        raise ValueError(f"lam * M overflows {prob.M.dtype}: lam={lam:g} times the largest |cost| "
                         f"{largest:g}; rescale M (e.g. divide by its largest entry) or lower lam")
    return lam


def _check_loop(tol: float | None, max_iter: int, check_every: int, dtype: Any) -> float:
    tol = default_tol(dtype) if tol is None else float(tol)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    for name, value in (("max_iter", max_iter), ("check_every", check_every)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return tol


def _c_transform_pair(neg_lam_M: Any, prob: TransportProblem) -> tuple[Any, Any]:
    r"""Scaled potentials :math:`F = \lambda f`, :math:`G = \lambda g` of the c-transform pair
    :math:`f_i = \min_j M_{ij}`, :math:`g_j = \min_i (M_{ij} - f_i)`, the minima taken over
    the columns and rows that carry mass.

    Then :math:`e^{F_i + G_j - \lambda M_{ij}}` is at most 1 on every row and column with
    mass and equals 1 somewhere in each of them, whatever constant a row or a column of
    ``M`` is shifted by: an entry of the kernel built on it underflows only where its cost is
    far above the cheapest of its row, never merely far above ``min M``.
    """
    xp = prob.xp
    n, m = neg_lam_M.shape
    if not prob.has_zero_mass:
        F = -xp.max(neg_lam_M, axis=1)
        G = -xp.max(neg_lam_M + xp.reshape(F, (n, 1)), axis=0)
        return F, G
    # rows and columns without mass get no say: their entries of the plan are zero anyway
    never = xp.asarray(-xp.inf, dtype=neg_lam_M.dtype)
    F = -xp.max(xp.where(xp.reshape(prob.c > 0, (1, m)), neg_lam_M, never), axis=1)
    shifted = neg_lam_M + xp.reshape(F, (n, 1))
    G = -xp.max(xp.where(xp.reshape(prob.r > 0, (n, 1)), shifted, never), axis=0)
    return F, G


def _exponent(neg_lam_M: Any, F: Any, G: Any) -> Any:
    r""":math:`F_i + G_j - \lambda M_{ij}` (n, m): the log of the kernel with the scaled
    potentials absorbed (one new matrix, added to in place)."""
    xp = array_namespace(neg_lam_M)
    n, m = neg_lam_M.shape
    exponent = neg_lam_M + xp.reshape(F, (n, 1))
    exponent += xp.reshape(G, (1, m))
    return exponent


def _shifted_exponent(neg_lam_M: Any, F: Any, G: Any, prob: TransportProblem) -> Any:
    r""":func:`_exponent` at the c-transform pair, capped at 0 (only rows without mass exceed it)."""
    exponent = _exponent(neg_lam_M, F, G)
    return prob.xp.minimum(exponent, 0.0) if prob.has_zero_mass else exponent


def _quiet_floating_point():
    """NumPy warns on 0/0, log(0) and overflow. We detect those cases ourselves (and raise or
    recover), so its warnings would only repeat our message; CuPy never warns."""
    return np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore")


def marginal_violation(plan: Any, r: Any, c: Any) -> Any:
    r"""The marginal error of a plan, relative to the total mass.

    Parameters
    ----------
    plan : array (n, m)
    r : array (n,)
    c : array (m,)

    Returns
    -------
    0-d array
        :math:`\max(\lVert P 1 - r \rVert_\infty, \lVert P^\top 1 - c \rVert_\infty)
        / \sum_i r_i`.

    Raises
    ------
    ValueError
        shapes that do not fit together, named.
    """
    xp = array_namespace(plan, r, c)
    # broadcasting would otherwise compare, say, every row sum with a single r, and divide
    # by the wrong total
    if plan.ndim != 2 or (tuple(r.shape), tuple(c.shape)) != ((plan.shape[0],), (plan.shape[1],)):
        raise ValueError(f"marginal_violation: plan (n, m) needs r (n,) and c (m,), got plan "
                         f"{tuple(plan.shape)}, r {tuple(r.shape)}, c {tuple(c.shape)}")
    rows = xp.max(xp.abs(xp.sum(plan, axis=1) - r))
    cols = xp.max(xp.abs(xp.sum(plan, axis=0) - c))
    return xp.maximum(rows, cols) / xp.sum(r)


def _scaled_plan(a: Any, K: Any, b: Any) -> Any:
    """``diag(a) K diag(b)`` with one temporary instead of two."""
    xp = array_namespace(a, K, b)
    plan = K * xp.reshape(b, (1, -1))
    plan *= xp.reshape(a, (-1, 1))
    return plan


def _transport_cost(plan: Any, M: Any) -> Any:
    """``sum(plan * M)`` as one dot product of the flattened arrays: no (n, m) temporary."""
    xp = array_namespace(plan, M)
    return xp.reshape(plan, (-1,)) @ xp.reshape(M, (-1,))


def _warn_not_converged(method: str, tol: float, max_iter: int, err: float, hint: str) -> None:
    warnings.warn(
        f"{method} did not reach tol={tol:.1e} within max_iter={max_iter} iterations "
        f"(marginal error {err:.2e}); {hint}",
        ConvergenceWarning,
        stacklevel=3,
    )


def _check_vanished_entries(K, a, b, M, lam, F, G, prob, tol, hint) -> None:
    r"""Raise ValueError if the kernel entries that underflowed (to zero, or to a subnormal
    number with only a few significant bits) put more than ``tol`` of the mass in the wrong
    place.

    An entry :math:`e^{E_{ij}}`, :math:`E = F_i + G_j - \lambda M_{ij}`, stored below the
    smallest normal number is off by at most :math:`\min(e^{E_{ij}}, u)`: :math:`u` is half the
    smallest subnormal (:math:`2^{-1075}` in float64, :math:`2^{-150}` in float32) for an entry
    kept as a subnormal, and the smallest normal number for one stored as 0 (a GPU that
    flushes subnormals to zero, as CuPy's float32 kernels do, zeroes entries well above
    :math:`u`). The plan's entry is off by :math:`a_i b_j` times that. The bound summed over those entries, computed in
    logs, is compared with ``tol`` of the mass (one more pass over the matrix, only for a
    kernel that underflowed).
    """
    xp = prob.xp
    n, m = K.shape
    info = xp.finfo(K.dtype)
    log_tiny = math.log(float(info.smallest_normal))
    half_subnormal = log_tiny + math.log(float(info.eps)) - math.log(2.0)
    stored_as_zero = K == 0
    cap = xp.where(stored_as_zero, xp.asarray(log_tiny, dtype=K.dtype), xp.asarray(half_subnormal, dtype=K.dtype))
    exponent = _shifted_exponent(M * (-lam), F, G, prob)
    error = xp.minimum(exponent, cap)  # the capped exponent first
    error += xp.reshape(xp.log(a), (n, 1))
    error += xp.reshape(xp.log(b), (1, m))
    imprecise = K < xp.asarray(float(info.smallest_normal), dtype=K.dtype)
    lost = float(logsumexp(xp.reshape(xp.where(imprecise, error, xp.asarray(-xp.inf, dtype=K.dtype)), (-1,))))
    # compared in logs: tol * mass can underflow to 0 for a tiny total mass or tol = 0
    if lost - math.log(prob.mass) > math.log(max(tol, np.finfo(np.float64).tiny)):
        raise ValueError(
            f"sinkhorn_knopp: kernel entries that underflowed (to zero or to a subnormal number) should "
            f"carry mass (more than tol={tol:g} of the total), so the plan would be wrong; {hint}"
        )


def sinkhorn_knopp(
    M: Any,
    r: Any,
    c: Any,
    lam: float,
    *,
    tol: float | None = None,
    max_iter: int = 10_000,
    check_every: int = 10,
) -> TransportResult:
    r"""Entropic optimal transport by Sinkhorn-Knopp in the kernel domain.

    Parameters
    ----------
    M : array (n, m)
        costs.
    r : array (n,)
        source masses, non-negative (any total, not necessarily 1).
    c : array (m,)
        target masses, non-negative, of the same total as ``r``.
    lam : float
        regularisation strength :math:`\lambda > 0` (POT's ``reg`` is :math:`1/\lambda`).
        Larger is closer to exact transport, slower, and eventually underflows.
    tol : float, optional
        stop when the marginal error (see :func:`marginal_violation`) is at most ``tol``;
        default :func:`swav_ref.backend.default_tol` of the dtype (1e-9 float64, 1e-5 float32).
    max_iter : int
        iterations before giving up with a :class:`ConvergenceWarning`.
    check_every : int
        measure the marginal error every this many iterations. Each measurement brings one
        number to the host (a device sync on a GPU), so it is amortised over the block.

    Returns
    -------
    TransportResult
        ``plan`` (n, m) and ``cost`` in the input's namespace.

    Raises
    ------
    ValueError
        bad input (see :func:`check_problem`), or ``lam`` so large that the kernel or the
        scalings under/overflow; the message recommends :func:`sinkhorn_log`.

    Notes
    -----
    One iteration fits the rows, then the columns:

    .. math:: a \leftarrow r \oslash (\hat K b), \qquad b \leftarrow c \oslash (\hat K^\top a),
              \qquad \hat K_{ij} = e^{-\lambda (M_{ij} - \hat f_i - \hat g_j)}.

    The shift by the c-transform pair :math:`\hat f_i = \min_j M_{ij}`,
    :math:`\hat g_j = \min_i (M_{ij} - \hat f_i)` turns the Gibbs kernel
    :math:`e^{-\lambda M}` into :math:`\hat K` by diagonal factors that the scalings absorb
    (the optimal plan is the same; ``F``, ``G`` in the code are :math:`\lambda \hat f`,
    :math:`\lambda \hat g`); it puts a 1 in every row and column and nothing above 1. A plain shift by :math:`\min M` would not do: a row whose costs are all
    high would underflow to a row of zeros, or, worse, lose only some of its entries and
    converge to a plan that never uses them. After the column fit the column sums are exact
    up to rounding, and ``K @ b``, needed by the next row fit, also gives the row sums
    :math:`a \odot K b` of the current plan, so the marginal error costs no extra matrix
    product.

    An entry that underflowed to zero cannot carry mass, however large the scalings grow,
    and one that underflowed to a subnormal number carries it with the wrong weight (a few
    significant bits). If the kernel has such entries, the end bounds the mass they misplace,
    :math:`a_i b_j e^{-\lambda (M_{ij} - f_i - g_j)}` capped at the subnormal rounding error,
    computed in logs, and raises ``ValueError`` when that exceeds ``tol`` of the mass: the plan
    would then be wrong, however well its marginals fit.
    """
    prob = check_problem(M, r, c)
    xp, M, r, c = prob.xp, prob.M, prob.r, prob.c
    lam = _check_lam(lam, prob)
    tol = _check_loop(tol, max_iter, check_every, M.dtype)
    underflow_hint = (
        f"lam={lam:g} is too large for the kernel domain in {M.dtype}: the kernel "
        "exp(-lam * (M - f - g)) underflows (and the scalings overflow making up for it); use "
        "sinkhorn_log, or a smaller lam"
    )

    with _quiet_floating_point():
        neg_lam_M = M * (-lam)
        F, G = _c_transform_pair(neg_lam_M, prob)
        exponent = _shifted_exponent(neg_lam_M, F, G, prob)
        del neg_lam_M  # the exponent is rebuilt from M in the rare case it is needed again
        K = xp.exp(exponent)
        del exponent
        Kt = K.T
        # Every row and column of K holds a 1 after the shift (_c_transform_pair), so no row
        # or column is all zero; single entries can underflow, and below the smallest normal
        # number an entry keeps only a few significant bits (checked after the iterations).
        underflowed = not float(xp.min(K)) >= float(xp.finfo(M.dtype).smallest_normal)  # one host sync

        b = xp.ones(M.shape[1], dtype=M.dtype)
        Kb = K @ b
        history, checked_at, it, err = [], [], 0, math.inf
        while it < max_iter:
            for _ in range(min(check_every, max_iter - it)):
                a = r / Kb
                Kta = Kt @ a
                b = c / Kta
                Kb = K @ b
                it += 1
            row_err = xp.max(xp.abs(a * Kb - r))
            col_err = xp.max(xp.abs(b * Kta - c))
            err = float(xp.maximum(row_err, col_err)) / prob.mass  # the one host sync per block
            history.append(err)
            checked_at.append(it)
            if not math.isfinite(err):
                raise ValueError(
                    f"sinkhorn_knopp: the scalings became NaN/inf at iteration {it}; {underflow_hint}"
                )
            if err <= tol:
                break
        if underflowed:
            _check_vanished_entries(K, a, b, M, lam, F, G, prob, tol, underflow_hint)
        plan = _scaled_plan(a, K, b)
    converged = err <= tol
    if not converged:
        _warn_not_converged("sinkhorn_knopp", tol, max_iter, err,
                            "raise max_iter, lower lam (more regularisation), or use sinkhorn_log")
    return TransportResult(plan, _transport_cost(plan, M), it, converged, tuple(history),
                           tuple(checked_at), "sinkhorn_knopp", lam)


def sinkhorn_log(
    M: Any,
    r: Any,
    c: Any,
    lam: float,
    *,
    tol: float | None = None,
    max_iter: int = 10_000,
    check_every: int = 10,
) -> TransportResult:
    r"""Entropic optimal transport in the log domain: finite for any ``lam``.

    Same parameters, stopping rule and result as :func:`sinkhorn_knopp`; the result also
    carries the dual potentials ``f`` (n,) and ``g`` (m,) with
    :math:`P_{ij} = e^{\lambda (f_i + g_j - M_{ij})}` (``-inf`` where a mass is zero).

    Notes
    -----
    The exact log-domain iteration updates the (scaled) potentials with log-sum-exp,

    .. math::

        f_i &\leftarrow \tfrac{1}{\lambda}\log r_i
            - \tfrac{1}{\lambda}\log\sum_j e^{\lambda (g_j - M_{ij})}, \\
        g_j &\leftarrow \tfrac{1}{\lambda}\log c_j
            - \tfrac{1}{\lambda}\log\sum_i e^{\lambda (f_i - M_{ij})},

    which never overflows but costs an exponential of the whole (n, m) matrix per update.
    So we run it stabilised (Schmitzer 2019): absorb the current potentials into the kernel,

    .. math:: \tilde K_{ij} = e^{\lambda (f_i + g_j - M_{ij})} \quad(\text{the current plan}),

    and run ordinary scaling iterations :math:`a \leftarrow r \oslash \tilde K b`,
    :math:`b \leftarrow c \oslash \tilde K^\top a` on it (two matrix-vector products each).
    The scalings only carry what changed since the potentials were last absorbed, so they stay
    moderate. The start is the c-transform pair :math:`f_i = \min_j M_{ij}`,
    :math:`g_j = \min_i (M_{ij} - f_i)`: every entry of :math:`\tilde K` is at most 1 and every
    row and column holds a 1.
    After every block of ``check_every`` iterations one host sync looks at the marginal error
    and the size of the scalings:

    - moderate scalings: carry on;
    - scalings beyond :math:`e^{\pm\tau}` (:math:`\tau` = half the dtype's exponent range):
      absorb them, :math:`f \mathrel{+}= \log(a)/\lambda`, :math:`g \mathrel{+}= \log(b)/\lambda`,
      and rebuild :math:`\tilde K` (one exponential of the matrix);
    - NaN/inf (the block under/overflowed, e.g. a row of :math:`\tilde K` underflowed to zero):
      throw the block away and redo it with the exact log-sum-exp updates above.

    Float32 precision: the rebuilt kernel carries a rounding error of about
    :math:`\lambda \max|M| \cdot 6\times 10^{-8}` in its exponent; the scaling iterations on
    top of it then fit the marginals to float32 rounding, so the default tolerance is reached.
    """
    prob = check_problem(M, r, c)
    xp, M, r, c = prob.xp, prob.M, prob.r, prob.c
    lam = _check_lam(lam, prob)
    tol = _check_loop(tol, max_iter, check_every, M.dtype)
    n, m = M.shape
    dtype = M.dtype
    # Work with scaled potentials F = lam f, G = lam g: P = exp(F_i + G_j - lam M_ij).
    neg_lam_M = M * (-lam)
    # Scalings beyond exp(+-tau) get absorbed into the kernel before they can overflow.
    tau = 0.5 * math.log(float(np.finfo(np.float32 if dtype == xp.float32 else np.float64).max))
    ones_n, ones_m = xp.ones(n, dtype=dtype), xp.ones(m, dtype=dtype)
    if prob.has_zero_mass:
        # rows/columns with zero mass have zero kernel rows/columns: keep their scaling at 0
        # instead of computing 0/0.
        r_pos, c_pos = r > 0, c > 0
        zeros_n, zeros_m = xp.zeros(n, dtype=dtype), xp.zeros(m, dtype=dtype)

        def fit(mass, sums, positive, zeros):
            return xp.where(positive, mass / sums, zeros)

        def log_size(scaling, positive, zeros):
            return xp.max(xp.where(positive, xp.abs(xp.log(scaling)), zeros))
    else:
        r_pos = c_pos = zeros_n = zeros_m = None

        def fit(mass, sums, positive, zeros):
            return mass / sums

        def log_size(scaling, positive, zeros):
            return xp.max(xp.abs(xp.log(scaling)))

    with _quiet_floating_point():
        log_r, log_c = xp.log(r), xp.log(c)

        def fit_rows_exactly(G):  # F_i = log r_i - lse_j(G_j - lam M_ij)
            return log_r - logsumexp(xp.reshape(G, (1, m)) + neg_lam_M, axis=1)

        def fit_cols_exactly(F):  # G_j = log c_j - lse_i(F_i - lam M_ij)
            return log_c - logsumexp(xp.reshape(F, (n, 1)) + neg_lam_M, axis=0)

        def absorbed_kernel(F, G):
            return xp.exp(_exponent(neg_lam_M, F, G))

        # Start from the c-transform pair f_i = min_j M_ij, g_j = min_i (M_ij - f_i), over the
        # rows and columns with mass: then f_i + g_j <= M_ij there, so no kernel entry exceeds
        # 1, and every row and every column has an entry equal to 1, so none is all zero.
        # Cheaper than a log-sum-exp sweep.
        F, G = _c_transform_pair(neg_lam_M, prob)
        K = xp.exp(_shifted_exponent(neg_lam_M, F, G, prob))
        a, b = ones_n, ones_m
        Kb, Kta = K @ ones_m, K.T @ ones_n
        history, checked_at, it, err = [], [], 0, math.inf
        n_rebuilds, n_exact_blocks = 0, 0  # rebuilds after the first kernel
        while it < max_iter:
            steps = min(check_every, max_iter - it)
            block_start = (a, b)
            for _ in range(steps):  # the fast path: scaling iterations on the absorbed kernel
                a = fit(r, Kb, r_pos, zeros_n)
                Kta = K.T @ a
                b = fit(c, Kta, c_pos, zeros_m)
                Kb = K @ b
            err_dev = xp.maximum(xp.max(xp.abs(a * Kb - r)), xp.max(xp.abs(b * Kta - c)))
            size_dev = xp.maximum(log_size(a, r_pos, zeros_n), log_size(b, c_pos, zeros_m))
            err, size = (float(v) for v in to_numpy(xp.stack([err_dev / prob.mass, size_dev])))

            if not (math.isfinite(err) and math.isfinite(size)):
                # The fast block broke down: absorb the (finite) scalings from its start and
                # redo the block with exact log-domain updates, which cannot overflow.
                a0, b0 = block_start
                F, G = F + xp.log(a0), G + xp.log(b0)
                for _ in range(steps):
                    F = fit_rows_exactly(G)
                    G = fit_cols_exactly(F)
                n_exact_blocks += 1
            elif size > tau:
                F, G = F + xp.log(a), G + xp.log(b)
            else:
                it += steps
                history.append(err)
                checked_at.append(it)
                if err <= tol:
                    break
                continue
            # Kernel rebuilt from the new potentials; scalings start again from 1.
            K = absorbed_kernel(F, G)
            a, b = ones_n, ones_m
            Kb, Kta = K @ ones_m, K.T @ ones_n
            n_rebuilds += 1
            err_dev = xp.maximum(xp.max(xp.abs(Kb - r)), xp.max(xp.abs(Kta - c)))
            err = float(err_dev) / prob.mass
            it += steps
            history.append(err)
            checked_at.append(it)
            if err <= tol:
                break
        plan = _scaled_plan(a, K, b)
        f = (F + xp.log(a)) / lam
        g = (G + xp.log(b)) / lam
    converged = err <= tol
    if not converged:
        _warn_not_converged("sinkhorn_log", tol, max_iter, err,
                            "raise max_iter or lower lam (more regularisation)")
    return TransportResult(plan, _transport_cost(plan, M), it, converged, tuple(history),
                           tuple(checked_at), "sinkhorn_log", lam, f=f, g=g,
                           details={"kernel_rebuilds": n_rebuilds, "exact_blocks": n_exact_blocks})
