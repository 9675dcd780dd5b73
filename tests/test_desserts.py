"""The dessert example: data, the original notebook's numbers and pitfall, figures, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from swav_ref.backend import array_namespace, to_numpy
from swav_ref.ot import ConvergenceWarning, sinkhorn_knopp
from swav_ref.ot import desserts as D


def test_data_has_the_real_signs():
    M, r, c = D.dessert_problem()
    assert M.shape == (8, 5) and float(r.sum()) == float(c.sum()) == 20.0
    prefs = -M
    jan, tim = D.PEOPLE.index("Jan"), D.PEOPLE.index("Tim")
    assert list(prefs[jan]) == [0, -2, -2, -2, 2]  # Jan only wants carrot cake
    assert prefs[tim, D.DESSERTS.index("merveilleux")] == -2
    assert (prefs < 0).sum() == 8  # the seed had lost all eight minus signs


@pytest.mark.parametrize("lam", sorted(D.PUBLISHED_COSTS))
def test_original_rule_reproduces_the_published_costs(backend, lam):
    M, r, c = D.dessert_problem(backend)
    res = D.original_sinkhorn(M, r, c, lam, tol=1e-5)
    assert res.converged  # its own rule fired
    assert float(res.cost) == pytest.approx(D.PUBLISHED_COSTS[lam], rel=1e-12)


@pytest.mark.parametrize("lam", sorted(D.PUBLISHED_COSTS))
def test_our_cost_agrees_with_the_published_one_to_the_original_precision(backend, lam):
    # The original stopped with marginal errors of ~3e-6 (relative, mass 20); the cost can
    # then be off by about mass * error * max|M| = 20 * 3e-6 * 2, rounded up.
    M, r, c = D.dessert_problem(backend)
    ours = sinkhorn_knopp(M, r, c, lam)
    assert abs(float(ours.cost) - D.PUBLISHED_COSTS[lam]) < 5e-4


def test_original_rule_stops_early_below_the_optimum():
    M, r, c = D.dessert_problem()
    lam = 50.0
    original = D.original_sinkhorn(M, r, c, lam)
    ours = sinkhorn_knopp(M, r, c, lam)
    # the original "converges", but its plan breaks the marginals and beats the true optimum
    assert original.converged and original.marginal_error[-1] > 1e-2
    assert float(original.cost) < D.EXACT_COST - 1.0
    assert ours.marginal_error[-1] <= 1e-9
    assert float(ours.cost) >= D.EXACT_COST - 1e-6


def test_original_keeps_its_history():
    M, r, c = D.dessert_problem()
    res = D.original_sinkhorn(M, r, c, 10.0)
    assert len(res.marginal_error) == len(res.details["row_sum_change"]) == res.n_iter
    assert res.checked_at[-1] == res.n_iter


def test_cost_against_lam_decreases_to_the_exact_optimum():
    lams = [0.01, 1.0, 10.0, 1000.0]
    costs = D.cost_against_lam(lams)
    assert np.all(np.diff(costs) < 0)
    assert costs[-1] == pytest.approx(D.EXACT_COST, abs=1e-3)
    assert costs[0] > -15  # nearly uniform plan: about mean cost * mass


def test_cost_against_lam_in_float32_takes_the_log_domain_where_the_kernel_fails():
    lams = np.logspace(-2, 3, 11)
    cost32 = D.cost_against_lam(lams, dtype="float32")  # raised from lam = 100 before
    np.testing.assert_allclose(cost32, D.cost_against_lam(lams), rtol=1e-4)


def test_plan_table_and_figures(backend):
    M, r, c = D.dessert_problem(backend)
    plan = sinkhorn_knopp(M, r, c, 10.0).plan
    assert array_namespace(plan) is backend
    table = D.plan_table(plan)
    assert list(table.index) == list(D.PEOPLE) and list(table.columns) == list(D.DESSERTS)
    np.testing.assert_allclose(table.sum(axis=1).to_numpy(), to_numpy(r), atol=0.05)
    fig = D.plot_plan(plan)
    ax = fig.axes[0]
    assert len(ax.patches) == 8 * 5  # one bar segment per person and dessert
    fig2 = D.plot_cost_against_lam([1.0, 10.0], [-29.6, -36.0], original_costs=[-29.6, -36.0])
    assert len(fig2.axes[0].lines) == 3


def test_plot_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert D.plot_plan(np.full((8, 5), 0.5), ax=ax) is fig
    assert len(ax.patches) == 40


def test_run_dessert_example_prints_and_writes(tmp_path, capsys):
    out = D.run_dessert_example(lam=10.0, out_dir=tmp_path / "figs")
    text = capsys.readouterr().out
    assert "Bernard" in text and "carrot cake" in text and "-36.0000" in text and "not converged" not in text
    assert out["exact_cost"] == pytest.approx(-36.0)
    assert out["sinkhorn_cost"] == pytest.approx(-35.99488, abs=1e-4)
    for path in out["figures"]:
        assert path.exists() and path.stat().st_size > 1000
        assert str(path) in text


def test_an_unconverged_cost_says_so_on_its_line(tmp_path, capsys, monkeypatch):
    """Stopped early, the plan misses the marginals and its cost can fall below the optimum
    (lam = 1e6 stops at -38 against -36); the cost line must not read as a result."""
    solve = D.sinkhorn_log
    monkeypatch.setattr(D, "sinkhorn_log", lambda *args, **kw: solve(*args, **{**kw, "max_iter": 20}))
    with pytest.warns(ConvergenceWarning):
        D.run_dessert_example(lam=1000.0, out_dir=tmp_path)
    cost_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Sinkhorn cost"))
    assert "(not converged: the plan misses the marginals by" in cost_line


def test_cli_dessert(tmp_path, capsys):
    from swav_ref.cli import main

    assert main(["dessert", "--lam", "1000", "--out", str(tmp_path)]) == 0
    assert "plan_lam1000.png" in capsys.readouterr().out
    assert (tmp_path / "cost_vs_lam.png").exists()


@pytest.mark.parametrize("lam", [354.0, 400.0])
def test_the_original_refuses_a_lambda_where_its_kernel_overflows(lam):
    """Past lambda ~ 354 the original's unshifted kernel sums to inf: it used to return an
    all-zero plan with cost 0 marked converged (then NaN); now it says so and what to use."""
    M, r, c = D.dessert_problem()
    with pytest.raises(ValueError, match=f"at lam = {lam} the sum of exp.*sinkhorn_log"):
        D.original_sinkhorn(M, r, c, lam)
    assert np.isfinite(float(D.original_sinkhorn(M, r, c, 300.0).cost))  # below the limit it still runs
