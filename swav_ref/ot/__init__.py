"""Optimal transport, independent of SwAV.

- :func:`sinkhorn_knopp` -- entropic OT by alternating scaling, in the kernel domain (fast).
- :func:`sinkhorn_log` -- the same in the log domain with dual potentials (finite for any lam).
- :func:`exact_transport` -- the unregularised optimum, a linear program (SciPy HiGHS).
- :class:`TransportResult` -- what they return; :class:`ConvergenceWarning`.
- :mod:`swav_ref.ot.desserts` -- the dessert allocation example (imported on demand: it needs
  pandas and matplotlib).
"""

from swav_ref.ot.exact import exact_transport
from swav_ref.ot.sinkhorn import (
    ConvergenceWarning,
    TransportProblem,
    TransportResult,
    check_problem,
    marginal_violation,
    sinkhorn_knopp,
    sinkhorn_log,
)

__all__ = [
    "ConvergenceWarning",
    "TransportProblem",
    "TransportResult",
    "check_problem",
    "exact_transport",
    "marginal_violation",
    "sinkhorn_knopp",
    "sinkhorn_log",
]
