r"""Exact (unregularised) optimal transport as a linear program, for comparison.

.. math::

    \min_{P \ge 0} \sum_{ij} P_{ij} M_{ij}
    \quad\text{subject to}\quad \sum_j P_{ij} = r_i,\; \sum_i P_{ij} = c_j.

This is the :math:`\lambda \to \infty` limit of the entropic problem that Sinkhorn solves. It is
solved on the host by SciPy's HiGHS solver; inputs from any backend are copied to the host and
the answer is copied back, so the array type in equals the array type out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from swav_ref.backend import asarray, to_numpy
from swav_ref.ot.sinkhorn import TransportResult, check_problem, marginal_violation

__all__ = ["exact_transport"]

#: Largest marginal error (relative to the total mass) accepted from the solver: a little above
#: HiGHS's feasibility tolerance (1e-7) on the unit problem.
MARGINAL_RTOL = 1e-6


def exact_transport(M: Any, r: Any, c: Any) -> TransportResult:
    r"""The optimal transport plan without regularisation (a linear program, HiGHS).

    Parameters
    ----------
    M : array (n, m)
        costs.
    r : array (n,)
        source masses, non-negative (checked as in
        :func:`swav_ref.ot.sinkhorn.check_problem`).
    c : array (m,)
        target masses, non-negative, of the same total as ``r``.

    Returns
    -------
    TransportResult
        ``plan`` (n, m) and ``cost`` in the input's namespace and dtype; ``f`` (n,), ``g`` (m,)
        are the dual potentials (:math:`f_i + g_j \le M_{ij}`, with equality where
        :math:`P_{ij} > 0`); ``n_iter`` is the solver's iteration count.

    Raises
    ------
    ValueError
        bad input.
    RuntimeError
        the solver failed, or its plan misses the marginals by more than ``MARGINAL_RTOL``
        of the total mass (it should not: equal masses always admit a plan).

    Notes
    -----
    The plan is flattened row by row into :math:`x = \operatorname{vec}(P)` of length
    :math:`nm`; the constraints are :math:`(I_n \otimes 1_m^\top) x = r` (row sums) and
    :math:`(1_n^\top \otimes I_m) x = c` (column sums). One constraint is redundant (the masses
    are equal), which HiGHS handles. Optimal plans are often not unique (the dessert problem
    has several), so compare costs, not plans.

    HiGHS works to absolute tolerances, so it solves the unit problem: masses
    :math:`r / \sum r`, :math:`c / \sum c` and costs :math:`(M - \ell) / s` in :math:`[0, 1]`
    (:math:`\ell = \min M`, :math:`s = \max M - \min M`). Its optimal plans, times
    :math:`\sum r`, are those of the original problem. Its duals :math:`u, v`
    (:math:`u_i + v_j \le (M_{ij} - \ell) / s`) give :math:`f = \ell + s u`,
    :math:`g = s v`; the masses drop out, since they appear only in the dual objective
    :math:`\langle r, f \rangle + \langle c, g \rangle`, not in its constraints.
    """
    prob = check_problem(M, r, c)
    xp, dtype = prob.xp, prob.M.dtype
    M_host = np.asarray(to_numpy(prob.M), dtype=np.float64)
    r_host = np.asarray(to_numpy(prob.r), dtype=np.float64)
    c_host = np.asarray(to_numpy(prob.c), dtype=np.float64)
    n, m = M_host.shape
    # HiGHS's tolerances are absolute (about 1e-7): a total mass of 1e-6 would be met only to
    # 10%, one of 1e-8 by the empty plan, one of 1e12 not at all, and costs 1e-9 apart would
    # look equal. So solve the unit problem (see the Notes), then scale back.
    mass = float(r_host.sum())
    low, high = prob.min_cost, prob.max_cost  # exact in any dtype: entries of M
    span = high - low if high > low else 1.0  # equal costs: every plan is optimal
    if not math.isfinite(span):
        raise ValueError(f"M spans {low:g} to {high:g}, more than float64 can hold; rescale M")
    x, nit, (u, v) = _solve_lp((M_host - low) / span, r_host / mass, c_host / c_host.sum())
    f_host, g_host = low + span * u, span * v
    plan_host = x.reshape(n, m) * mass
    err = float(marginal_violation(plan_host, r_host, c_host))
    if not err <= MARGINAL_RTOL:  # `not <=` catches NaN too
        raise RuntimeError(f"exact_transport: HiGHS returned a plan whose marginals are off by {err:.2e} "
                           f"of the total mass (more than {MARGINAL_RTOL:g}); the solver lost precision")

    plan = asarray(plan_host, xp, dtype=dtype)
    f, g = asarray(f_host, xp, dtype=dtype), asarray(g_host, xp, dtype=dtype)
    err = float(marginal_violation(plan, prob.r, prob.c))  # as returned, in its dtype
    return TransportResult(plan, xp.sum(plan * prob.M), nit, True, (err,), (nit,),
                           "exact", None, f=f, g=g)


def _solve_lp(M: np.ndarray, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray]]:
    """HiGHS on host float64 arrays: the flattened plan (clipped at 0), the iteration count,
    and the duals of the row-sum and of the column-sum constraints."""
    n, m = M.shape
    row_sums = sp.kron(sp.eye(n), np.ones((1, m)))
    col_sums = sp.kron(np.ones((1, n)), sp.eye(m))
    res = linprog(
        M.ravel(),
        A_eq=sp.vstack([row_sums, col_sums]).tocsr(),
        b_eq=np.concatenate([r, c]),
        bounds=(0, None),
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"exact_transport: HiGHS failed (status {res.status}): {res.message}")
    duals = res.eqlin.marginals  # one per equality: the n row sums, then the m column sums
    # HiGHS meets the bounds to its tolerance; clip its -1e-17s so the plan is a valid one
    return np.maximum(res.x, 0.0), int(res.nit), (duals[:n], duals[n:])
