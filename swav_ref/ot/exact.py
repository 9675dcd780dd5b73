r"""Exact (unregularised) optimal transport as a linear program, for comparison.

.. math::

    \min_{P \ge 0} \sum_{ij} P_{ij} M_{ij}
    \quad\text{subject to}\quad \sum_j P_{ij} = r_i,\; \sum_i P_{ij} = c_j.

This is the :math:`\lambda \to \infty` limit of the entropic problem that Sinkhorn solves. It is
solved on the host by SciPy's HiGHS solver; inputs from any backend are copied to the host and
the answer is copied back, so the array type in equals the array type out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from swav_ref.backend import asarray, to_numpy
from swav_ref.ot.sinkhorn import TransportResult, check_problem, marginal_violation

__all__ = ["exact_transport"]


def exact_transport(M: Any, r: Any, c: Any) -> TransportResult:
    r"""The optimal transport plan without regularisation (a linear program, HiGHS).

    Parameters
    ----------
    M : array (n, m)
        costs.
    r : array (n,), c : array (m,)
        non-negative masses of equal total (checked as in
        :func:`swav_ref.ot.sinkhorn.check_problem`).

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
        the solver failed (it should not: equal masses always admit a plan).

    Notes
    -----
    The plan is flattened row by row into :math:`x = \operatorname{vec}(P)` of length
    :math:`nm`; the constraints are :math:`(I_n \otimes 1_m^\top) x = r` (row sums) and
    :math:`(1_n^\top \otimes I_m) x = c` (column sums). One constraint is redundant (the masses
    are equal), which HiGHS handles. Optimal plans are often not unique (the dessert problem
    has several), so compare costs, not plans.
    """
    prob = check_problem(M, r, c)
    xp, dtype = prob.xp, prob.M.dtype
    M_host = np.asarray(to_numpy(prob.M), dtype=np.float64)
    r_host = np.asarray(to_numpy(prob.r), dtype=np.float64)
    c_host = np.asarray(to_numpy(prob.c), dtype=np.float64)
    n, m = M_host.shape

    row_sums = sp.kron(sp.eye(n), np.ones((1, m)))
    col_sums = sp.kron(np.ones((1, n)), sp.eye(m))
    res = linprog(
        M_host.ravel(),
        A_eq=sp.vstack([row_sums, col_sums]).tocsr(),
        b_eq=np.concatenate([r_host, c_host]),
        bounds=(0, None),
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"exact_transport: HiGHS failed (status {res.status}): {res.message}")

    # HiGHS meets the bounds to its tolerance; clip its -1e-17s so the plan is a valid one
    plan = asarray(np.maximum(res.x, 0.0).reshape(n, m), xp, dtype=dtype)
    duals = res.eqlin.marginals
    f, g = asarray(duals[:n], xp, dtype=dtype), asarray(duals[n:], xp, dtype=dtype)
    err = float(marginal_violation(plan, prob.r, prob.c))
    return TransportResult(plan, xp.sum(plan * prob.M), int(res.nit), True, (err,), (int(res.nit),),
                           "exact", None, f=f, g=g)
