r"""The dessert allocation example (after Michiel Stock, "Notes on Optimal Transport", 2017).

Eight people share five desserts. Person :math:`i` can eat :math:`r_i` portions, there are
:math:`c_j` portions of dessert :math:`j` (both total 20), and person :math:`i` likes dessert
:math:`j` by a score from -2 to 2. The cost of a portion is minus the preference,
:math:`M = -\text{preferences}`, and the best allocation is an optimal transport plan from
:math:`r` to :math:`c`. The exact optimum costs -36; it is degenerate (several plans reach it).

This module holds the data, the original notebook's Sinkhorn loop (:func:`original_sinkhorn`,
kept to show its stopping-rule pitfall), figures, and :func:`run_dessert_example`, which the
command ``swav-ref dessert`` runs.

Figures are built on :class:`matplotlib.figure.Figure` directly, not through pyplot, so saving
them from the command line needs no display; pass ``ax`` to draw into a notebook's axes.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from swav_ref.backend import array_namespace, asarray, to_numpy
from swav_ref.ot.exact import exact_transport
from swav_ref.ot.sinkhorn import TransportResult, marginal_violation, sinkhorn_knopp, sinkhorn_log

__all__ = [
    "DESSERTS",
    "PEOPLE",
    "PREFERENCES",
    "EXACT_COST",
    "PUBLISHED_COSTS",
    "c",
    "cost_against_lam",
    "cost_matrix",
    "dessert_problem",
    "original_sinkhorn",
    "plan_table",
    "plot_cost_against_lam",
    "plot_plan",
    "r",
    "run_dessert_example",
]

PEOPLE = ("Bernard", "Jan", "Willem", "Hilde", "Steffie", "Marlies", "Tim", "Wouter")
DESSERTS = ("merveilleux", "eclair", "chocolate mousse", "bavarois", "carrot cake")

#: Preferences, rows = people, columns = desserts, from -2 (dislikes) to 2 (loves).
PREFERENCES = (
    (2.0, 2.0, 1.0, 0.0, 0.0),  # Bernard
    (0.0, -2.0, -2.0, -2.0, 2.0),  # Jan
    (1.0, 2.0, 2.0, 2.0, -1.0),  # Willem
    (2.0, 1.0, 0.0, 1.0, -1.0),  # Hilde
    (0.5, 2.0, 2.0, 1.0, 0.0),  # Steffie
    (0.0, 1.0, 1.0, 1.0, -1.0),  # Marlies
    (-2.0, 2.0, 2.0, 1.0, 1.0),  # Tim
    (2.0, 1.0, 2.0, 1.0, -1.0),  # Wouter
)

#: Portions each person can eat, shape (8,).
r = np.array([3.0, 3.0, 3.0, 4.0, 2.0, 2.0, 2.0, 1.0])
#: Portions of each dessert, shape (5,).
c = np.array([4.0, 2.0, 6.0, 4.0, 4.0])
r.flags.writeable = False
c.flags.writeable = False

#: The exact (unregularised) optimum.
EXACT_COST = -36.0
#: Costs printed by the original notebook (its stopping rule with tol=1e-5), by lambda.
PUBLISHED_COSTS = {1.0: -29.626510743466827, 10.0: -35.99503084811552}


def cost_matrix(xp: Any = np, dtype: str = "float64") -> Any:
    """``M = -preferences``, shape (8, 5), on the backend ``xp``, of dtype ``dtype``."""
    return asarray(0.0 - np.array(PREFERENCES), xp, dtype=dtype)  # 0.0 - x: no "-0.0" entries


def dessert_problem(xp: Any = np, dtype: str = "float64") -> tuple[Any, Any, Any]:
    """``(M, r, c)`` on the backend ``xp``, of dtype ``dtype``: costs (8, 5), portions (8,),
    quantities (5,)."""
    # copies, so that a caller may modify them without touching the read-only module data
    r_copy, c_copy = np.array(r), np.array(c)
    return cost_matrix(xp, dtype), asarray(r_copy, xp, dtype=dtype), asarray(c_copy, xp, dtype=dtype)


def original_sinkhorn(
    M: Any, r: Any, c: Any, lam: float, tol: float = 1e-5, max_iter: int = 100_000
) -> TransportResult:
    r"""The original notebook's Sinkhorn loop, stopping rule included (for teaching only).

    It stops when the row sums stop changing between iterations,
    :math:`\max_i |u^{(t)}_i - u^{(t-1)}_i| \le \text{tol}` with :math:`u = P 1`, which is not
    the same as meeting the marginals: at large ``lam`` the iteration crawls, the row sums
    barely move, and it stops with the constraints badly violated (and a cost *below* the
    true optimum). Use :func:`swav_ref.ot.sinkhorn_knopp <swav_ref.ot.sinkhorn.sinkhorn_knopp>` instead.

    Parameters
    ----------
    M : array (n, m)
        costs.
    r : array (n,)
        source masses.
    c : array (m,)
        target masses, of the same total as ``r``.
    lam : float
        :math:`\lambda` of the plan :math:`P \propto e^{-\lambda M}`, the inverse of the
        entropic regularisation: larger means less entropy, closer to the exact plan.
    tol : float
        threshold on the change of the row sums (the original used 1e-5 for its printed
        values).
    max_iter : int
        a safety net the original did not have.

    Returns
    -------
    TransportResult
        ``converged`` says whether *its own rule* fired; ``marginal_error`` holds the true
        marginal error after every iteration (``checked_at`` = 1, 2, ...), and
        ``details["row_sum_change"]`` the quantity the rule looked at. It checks on the host
        every iteration, which is fine for 8 x 5 and the reason it is not the library's loop.

    Notes
    -----
    Exactly the original operations, in the original order (so it reproduces the published
    numbers to their last digit, or one unit in it):

    .. math::

        & P \leftarrow e^{-\lambda M} / \textstyle\sum e^{-\lambda M}; \\
        & \text{repeat: } u \leftarrow P 1;\; P \leftarrow \operatorname{diag}(r / u) P;\;
          P \leftarrow P \operatorname{diag}(c / P^\top 1).

    Beyond :math:`\lambda \approx 354` (on the dessert data) the normalising sum of
    :math:`e^{-\lambda M}` overflows, which the original did not notice (its plan became
    all zeros, then NaN); here that raises ``ValueError`` instead.
    """
    xp = array_namespace(M, r, c)
    n = M.shape[0]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        P = xp.exp(-lam * M)
        total = float(xp.sum(P))  # a host read, as every iteration below makes
        if not (math.isfinite(total) and total > 0):
            raise ValueError(f"original_sinkhorn: at lam = {lam} the sum of exp(-lam M) is {total} (it works in "
                             "the kernel domain with no shift); use swav_ref.ot.sinkhorn_log")
        P = P / total
        u = xp.zeros(n, dtype=P.dtype)
        errors, changes, it, stopped = [], [], 0, False
        while it < max_iter:
            change = float(xp.max(xp.abs(u - xp.sum(P, axis=1))))
            if not change > tol:  # the original rule (NaN also ends the loop, as in the original)
                stopped = True
                break
            u = xp.sum(P, axis=1)
            P = P * xp.reshape(r / u, (-1, 1))
            P = P * xp.reshape(c / xp.sum(P, axis=0), (1, -1))
            it += 1
            changes.append(change)
            errors.append(float(marginal_violation(P, r, c)))
    return TransportResult(P, xp.sum(P * M), it, stopped, tuple(errors), tuple(range(1, it + 1)),
                           "original (row sums stop changing)", float(lam),
                           details={"row_sum_change": tuple(changes)})


def plan_table(plan: Any, decimals: int = 2):
    """The plan as a pandas DataFrame, people x desserts, rounded for printing.

    Parameters
    ----------
    plan : array (8, 5)
        a transport plan of the dessert problem, rows = people (``PEOPLE``), columns =
        desserts (``DESSERTS``), on any backend.
    decimals : int
        decimal places kept.

    Returns
    -------
    pandas.DataFrame
        (8, 5), indexed by the people's names, with the desserts as columns.
    """
    import pandas as pd

    return pd.DataFrame(to_numpy(plan), index=list(PEOPLE), columns=list(DESSERTS)).round(decimals)


def _axes(ax, figsize):
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def plot_plan(plan: Any, ax: Any = None, title: str | None = None, legend: bool = True):
    """Stacked bars: for each person, the portions of each dessert they get.

    Parameters
    ----------
    plan : array (8, 5)
        portions, rows = people, columns = desserts (as
        :func:`~swav_ref.ot.desserts.plan_table`), on any backend.
    ax : matplotlib.axes.Axes, optional
        draw into it (notebooks); otherwise a new :class:`~matplotlib.figure.Figure` is made.
    title : str, optional
        the axes' title; ``"dessert allocation"`` when None.
    legend : bool
        add the dessert legend (outside the axes, on the right).

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, (7, 4))
    P = np.asarray(to_numpy(plan), dtype=float)
    bottom = np.zeros(P.shape[0])
    for j, dessert in enumerate(DESSERTS):
        ax.bar(PEOPLE, P[:, j], bottom=bottom, label=dessert)
        bottom += P[:, j]
    ax.set_ylim(0, 1.08 * bottom.max())
    ax.set_ylabel("portions")
    ax.set_title(title or "dessert allocation")
    if legend:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for label in ax.get_xticklabels():
        label.set_rotation(40)
        label.set_horizontalalignment("right")
    return fig


def cost_against_lam(lams: Any, xp: Any = np, dtype: str = "float64", max_iter: int = 100_000) -> np.ndarray:
    r"""Sinkhorn cost of the dessert problem for each ``lam`` (host array of floats).

    The kernel domain (:func:`~swav_ref.ot.sinkhorn.sinkhorn_knopp`) for ``lam <= 100``, where its kernel is safe in
    float64; the log domain (:func:`~swav_ref.ot.sinkhorn.sinkhorn_log`) above, and also below wherever the kernel
    domain refuses (its ``ValueError``; in float32, on this problem, from ``lam`` about 49).

    Parameters
    ----------
    lams : array-like (L,)
        regularisation strengths :math:`\lambda > 0`, any order (a host sequence or array).
    xp : array namespace
        the backend the problem is solved on, as in
        :func:`~swav_ref.ot.desserts.dessert_problem`.
    dtype : str
        the floating dtype it is solved in.
    max_iter : int
        iteration limit of each Sinkhorn run.

    Returns
    -------
    numpy.ndarray
        (L,) float64, the cost :math:`\langle P_\lambda, M \rangle` of each plan, in the
        order of ``lams``.
    """
    M, r_, c_ = dessert_problem(xp, dtype)
    costs = []
    for lam in np.asarray(lams, dtype=float):
        result = None
        if lam <= 100:
            try:
                result = sinkhorn_knopp(M, r_, c_, lam, max_iter=max_iter)
            except ValueError:
                pass  # the kernel under/overflowed: the log domain below
        if result is None:
            result = sinkhorn_log(M, r_, c_, lam, max_iter=max_iter)
        costs.append(float(result.cost))
    return np.array(costs)


def plot_cost_against_lam(
    lams: Any,
    costs: Any,
    exact_cost: float = EXACT_COST,
    ax: Any = None,
    original_costs: Any = None,
):
    r"""Sinkhorn cost against ``lam`` (log axis), approaching the exact optimum.

    Parameters
    ----------
    lams : array-like (L,)
        regularisation strengths :math:`\lambda > 0` (the x axis).
    costs : array-like (L,)
        the cost at each ``lam``, as :func:`~swav_ref.ot.desserts.cost_against_lam`
        returns them.
    exact_cost : float
        the unregularised optimum, drawn as a horizontal line (default
        :data:`~swav_ref.ot.desserts.EXACT_COST`).
    ax : matplotlib.axes.Axes, optional
        draw into it (notebooks); otherwise a new :class:`~matplotlib.figure.Figure` is made.
    original_costs : array-like (L,), optional
        the original stopping rule's costs at the same ``lams``
        (:func:`~swav_ref.ot.desserts.original_sinkhorn`), added for comparison.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, (6, 4))
    ax.semilogx(lams, costs, "o-", label="Sinkhorn, marginal-error rule")
    if original_costs is not None:
        ax.semilogx(lams, original_costs, "x--", label="original rule (row sums stop changing)")
    ax.axhline(exact_cost, color="k", linestyle=":", label=f"exact optimum ({exact_cost:g})")
    ax.set_xlabel(r"$\lambda$ (regularisation strength)")
    ax.set_ylabel(r"transport cost $\langle P, M \rangle$")
    ax.set_title("entropic cost approaches the exact optimum")
    ax.legend(fontsize="small")
    return fig


def run_dessert_example(lam: float = 10.0, out_dir: str | Path = "dessert_out") -> dict:
    """Solve the dessert problem, print the plan and the costs, save the figures.

    Prints the plan (people x desserts) from the log-domain Sinkhorn (it works for every
    ``lam``), its cost, and the exact optimum; writes ``plan_lam<lam>.png`` and
    ``cost_vs_lam.png`` into ``out_dir`` and prints their paths.

    Returns
    -------
    dict
        ``plan`` (DataFrame), ``sinkhorn_cost``, ``exact_cost``, ``n_iter``, ``converged``,
        ``figures`` (list of paths).
    """
    M, r_, c_ = dessert_problem()
    result = sinkhorn_log(M, r_, c_, lam, max_iter=200_000)
    exact = exact_transport(M, r_, c_)
    table = plan_table(result.plan)
    print(f"Dessert allocation, Sinkhorn with lambda = {lam:g} ({result.n_iter} iterations, "
          f"marginal error {result.marginal_error[-1]:.1e})")
    print(table.to_string())
    # An unconverged plan does not carry the right masses, so its cost is no bound on the
    # optimum (at lam = 1e6 it comes out below it): say so on the line itself.
    caveat = "" if result.converged else (f" (not converged: the plan misses the marginals by "
                                          f"{result.marginal_error[-1]:.1e}, so this is not the cost of a transport plan)")
    print(f"Sinkhorn cost sum(P * M): {float(result.cost):.10f}{caveat}")
    print(f"exact optimum (linear program): {float(exact.cost):.10f}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lams = np.logspace(-2, 3, 21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the figure shows the curve; a stray warning adds nothing
        costs = cost_against_lam(lams)
    figures = []
    for name, fig in (
        (f"plan_lam{lam:g}.png", plot_plan(result.plan, title=f"Sinkhorn plan, $\\lambda$ = {lam:g}")),
        ("cost_vs_lam.png", plot_cost_against_lam(lams, costs, float(exact.cost))),
    ):
        path = out / name
        fig.savefig(path, dpi=120)
        figures.append(path)
        print(f"wrote {path}")
    return {
        "plan": table,
        "sinkhorn_cost": float(result.cost),
        "exact_cost": float(exact.cost),
        "n_iter": result.n_iter,
        "figures": figures,
        "converged": result.converged,
    }
