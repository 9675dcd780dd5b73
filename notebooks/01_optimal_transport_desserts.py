# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Optimal transport with desserts
#
# SwAV turns image features into cluster assignments by solving a small **optimal transport**
# problem for every batch. Before we get there, this notebook builds the intuition on a toy
# problem (after Michiel Stock's *Notes on Optimal Transport*, 2017): eight friends share five
# desserts at a party.
#
# We will
#
# 1. state the problem (who can eat how much, how much of each dessert there is, who likes what),
# 2. solve it exactly as a linear program (the optimum costs $-36$),
# 3. solve the *entropy-regularised* version with Sinkhorn's algorithm and watch it approach
#    the exact optimum as $\lambda$ grows ($P \propto e^{-\lambda M}$: $1/\lambda$ is the
#    strength of the entropic regularisation),
# 4. look at a pitfall of the original code: its stopping rule can stop early and report a
#    cost that is *better than the optimum*, which is impossible for a valid allocation.
#
# Everything numerical comes from the library `swav_ref.ot`; this notebook only calls it.

# %%
# %matplotlib inline
import inspect
import os
import textwrap
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Code

import swav_ref.backend
from swav_ref.ot import exact_transport, sinkhorn_knopp
from swav_ref.ot import desserts

# "cupy" runs the same notebook on a GPU; so does SWAV_REF_BACKEND=cupy in the environment
BACKEND = os.environ.get("SWAV_REF_BACKEND", "numpy")
xp = swav_ref.backend.get_backend(BACKEND)
to_numpy = swav_ref.backend.to_numpy

# %% [markdown]
# ## 1 · The problem
#
# Person $i$ can eat $r_i$ portions and there are $c_j$ portions of dessert $j$. Both add up
# to 20, so every portion is eaten and nobody goes hungry. How much each person likes each
# dessert is a score from $-2$ (please no) to $2$ (yes please):

# %%
preferences = pd.DataFrame(desserts.PREFERENCES, index=desserts.PEOPLE, columns=desserts.DESSERTS)
preferences["can eat (r)"] = desserts.r
preferences.loc["available (c)"] = list(desserts.c) + [desserts.r.sum()]
preferences

# %% [markdown]
# Transport language: $r$ is the mass at the *sources* (people), $c$ the mass at the *targets*
# (desserts), and an allocation is a **transport plan** $P \in \mathbb{R}^{8 \times 5}$,
# $P_{ij}$ = portions of dessert $j$ that person $i$ gets. A valid plan lies in
#
# $$U(r, c) = \{ P \ge 0 : P \mathbf{1} = r,\; P^\top \mathbf{1} = c \},$$
#
# the rows sum to what each person eats, the columns to what there is. We want happy
# people, so the **cost** of a portion is minus the preference, $M = -\text{preferences}$, and
# the optimal transport problem is
#
# $$d_M(r, c) = \min_{P \in U(r, c)} \langle P, M \rangle = \min_{P \in U(r,c)} \sum_{ij} P_{ij} M_{ij}.$$

# %%
M, r, c = desserts.dessert_problem(xp)
pd.DataFrame(to_numpy(M), index=desserts.PEOPLE, columns=desserts.DESSERTS)

# %% [markdown]
# ## 2 · The exact answer: a linear program
#
# The objective and the constraints are linear in the $8 \times 5 = 40$ unknowns, so this is a
# linear program; `exact_transport` hands it to SciPy's HiGHS solver.

# %%
exact = exact_transport(M, r, c)
print(f"exact optimum: {float(exact.cost):.6f}")
desserts.plan_table(exact.plan)

# %% [markdown]
# The optimum is $-36$. It is **degenerate**: several plans reach $-36$ (for instance
# chocolate mousse and bavarois are equally loved by Willem and Marlies, so they can swap),
# so comparing *plans* between solvers is meaningless here; we compare *costs*.
#
# A linear program's solution sits on a corner of $U(r,c)$: few non-zero entries, and a plan
# that jumps when the preferences change a little. Sinkhorn gives up a tiny bit of optimality
# for a smooth, dense, fast-to-compute plan.

# %% [markdown]
# ## 3 · Entropic regularisation and Sinkhorn
#
# Add an entropy bonus that rewards spread-out plans,
#
# $$P_\lambda = \arg\min_{P \in U(r,c)} \langle P, M \rangle - \frac{1}{\lambda} H(P), \qquad
# H(P) = -\sum_{ij} P_{ij} \log P_{ij}.$$
#
# Small $\lambda$: the entropy wins, everyone gets a bit of everything
# ($P \approx r c^\top / 20$). Large $\lambda$: the cost wins, $P_\lambda$ approaches an
# optimal plan. The solution has the form $P_\lambda = \operatorname{diag}(a)\, e^{-\lambda M}
# \operatorname{diag}(b)$, and **Sinkhorn-Knopp** finds the scalings $a, b$ by alternately fixing
# the row sums and the column sums (notebook 02 explains why this works). Here is the loop;
# in it `K` is $e^{-\lambda M}$ with each row and column rescaled by a constant (which the
# scalings absorb; notebook 02, section 2), `Kt` is its transpose, and the last lines are
# notebook 02's check for kernel entries that underflowed:

# %%
source = inspect.getsource(sinkhorn_knopp)
Code(textwrap.dedent(source[source.index("        b = xp.ones("):source.index("        plan = ")]), language="python")

# %%
result = sinkhorn_knopp(M, r, c, lam=10.0)
print(f"lambda = 10: cost {float(result.cost):.6f} after {result.n_iter} iterations, "
      f"marginal error {result.marginal_error[-1]:.1e}")
desserts.plan_table(result.plan)

# %%
fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
desserts.plot_plan(result.plan, ax=ax, title=r"Sinkhorn plan, $\lambda = 10$")
plt.show()

# %% [markdown]
# Jan, who only likes carrot cake, gets three portions of it; Hilde gets most of the
# merveilleux. The plan is nearly an exact one, but spread a little: Bernard gets small
# amounts of mousse and carrot cake instead of one more merveilleux.
#
# ### From a fair share to the optimum
#
# Let us watch the plan change with $\lambda$.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True, layout="constrained")
for ax, lam in zip(axes, [0.1, 1.0, 100.0]):
    plan = sinkhorn_knopp(M, r, c, lam).plan
    desserts.plot_plan(plan, ax=ax, title=rf"$\lambda$ = {lam:g}", legend=lam == 100.0)
plt.show()

# %% [markdown]
# The cost $\langle P_\lambda, M \rangle$ decreases with $\lambda$ towards the exact optimum.
# For large $\lambda$ the kernel $e^{-\lambda M}$ underflows in floating point, so
# `cost_against_lam` switches to the log-domain solver `sinkhorn_log` above $\lambda = 100$.

# %%
lams = np.logspace(-2, 3, 21)
costs = desserts.cost_against_lam(lams, xp=xp)
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
desserts.plot_cost_against_lam(lams, costs, float(exact.cost), ax=ax)
plt.show()
pd.DataFrame({"lambda": lams[::4], "cost": costs[::4], "gap to -36": costs[::4] + 36})

# %% [markdown]
# ## 4 · The pitfall: "the row sums stopped changing" is not "the marginals hold"
#
# The original notebook stopped its loop when the row sums stopped changing between two
# iterations, with a tolerance of $10^{-5}$. `desserts.original_sinkhorn` reproduces it,
# operation for operation, and recovers the published numbers. (Copies of this loop that
# lost their minus signs in extraction, `u  P.sum(1)` for `u - P.sum(1)`, show the tolerance
# as `1e8`, that is $10^{-8}$. Only $10^{-5}$ reproduces the published costs: at $10^{-8}$ the
# loop runs longer and $\lambda = 10$ gives $-35.99488$, as the last column shows.)

# %%
for lam, published in desserts.PUBLISHED_COSTS.items():
    orig = desserts.original_sinkhorn(M, r, c, lam, tol=1e-5)
    orig_1e8 = desserts.original_sinkhorn(M, r, c, lam, tol=1e-8)
    ours = sinkhorn_knopp(M, r, c, lam)
    print(f"lambda = {lam:4g}: original {float(orig.cost):.14f} (published {published:.14f}), "
          f"marginal-error rule {float(ours.cost):.10f}; original at tol 1e-8: {float(orig_1e8.cost):.5f}")

# %% [markdown]
# At $\lambda = 1$ and $10$ the two agree to about $10^{-4}$: the original rule stopped a little
# early, nothing worse. Now increase $\lambda$:

# %%
rows = []
for lam in [10.0, 20.0, 30.0, 50.0, 100.0]:
    orig = desserts.original_sinkhorn(M, r, c, lam)
    ours = sinkhorn_knopp(M, r, c, lam)
    rows.append({
        "lambda": lam,
        "original: iterations": orig.n_iter,
        "original: cost": float(orig.cost),
        "original: marginal error": orig.marginal_error[-1],
        "ours: iterations": ours.n_iter,
        "ours: cost": float(ours.cost),
        "ours: marginal error": ours.marginal_error[-1],
    })
pd.DataFrame(rows).set_index("lambda")

# %% [markdown]
# From $\lambda = 30$ on, the original loop "converges" after 64 iterations with a cost near
# $-38$, **below the exact optimum $-36$**. That is impossible for a valid plan, and indeed
# its plan is not valid: the marginal error is 5% of the total mass. Its row sums show who is
# short-changed:

# %%
orig = desserts.original_sinkhorn(M, r, c, 50.0)
eaten = to_numpy(xp.sum(orig.plan, axis=1))
pd.DataFrame({"should eat (r)": desserts.r, "gets (original, lambda=50)": eaten}, index=desserts.PEOPLE).round(3)

# %% [markdown]
# Jan eats 4 portions instead of 3, Bernard 2.6 instead of 3 and Hilde 3.4 instead of 4: a
# plan that breaks the rules can of course be cheaper than the best one that keeps them.
# Why did the rule fire? At large $\lambda$ the iteration crosses a long **plateau** where
# each step moves almost no mass: the row sums change by less than $10^{-5}$ per iteration
# while the marginals are still far off. Plotting both quantities per iteration shows it:

# %%
ours = sinkhorn_knopp(M, r, c, 50.0, check_every=1)
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
ax.semilogy(orig.checked_at, orig.details["row_sum_change"], label="original: change of row sums")
ax.semilogy(orig.checked_at, orig.marginal_error, "--", lw=3, label="original: marginal error")
ax.semilogy(ours.checked_at, ours.marginal_error, label="ours: marginal error")
ax.axhline(1e-5, color="k", linestyle=":", label="original tolerance")
ax.set_xlabel("iteration")
ax.set_ylabel("relative error / change")
ax.set_title(r"$\lambda = 50$: the original rule stops on a plateau")
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# Our rule measures what we actually want: the **marginal error**
#
# $$\epsilon = \frac{\max\big(\lVert P\mathbf 1 - r\rVert_\infty,\ \lVert P^\top \mathbf 1 - c\rVert_\infty\big)}{\sum_i r_i},$$
#
# and stops only when it is below the tolerance ($10^{-9}$ in float64). It rides out the plateau
# (a few hundred iterations at $\lambda=50$) and lands within $10^{-7}$ of $-36$. Look at the
# last digits, though: at $\lambda = 50$ the cost is a hair *below* $-36$.

# %%
ours = sinkhorn_knopp(M, r, c, 50.0)
print(f"lambda = 50, marginal-error rule: cost {float(ours.cost):.10f}, "
      f"marginal error {ours.marginal_error[-1]:.1e}, after {ours.n_iter} iterations")

# %% [markdown]
# No contradiction: only a plan that meets the marginals *exactly* must cost at least $-36$.
# Ours may miss them by up to $10^{-9}$ of the mass (here $2.5 \times 10^{-10}$), and that
# slack is worth of the order of $10^{-8}$ in cost, which is what we see. The original plan
# missed them by 5% and "saved" 2 whole units. A stopping tolerance bounds how far below the
# optimum a cost can fall; it does not make it impossible.
#
# The cost against $\lambda$ for both rules makes the failure visible at a glance:

# %%
lams = np.logspace(0, np.log10(300), 13)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    original_costs = [float(desserts.original_sinkhorn(M, r, c, lam).cost) for lam in lams]
ours_costs = desserts.cost_against_lam(lams, xp=xp)
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
desserts.plot_cost_against_lam(lams, ours_costs, float(exact.cost), ax=ax,
                               original_costs=original_costs)
plt.show()

# %% [markdown]
# ## Take-aways
#
# - Optimal transport moves mass $r$ onto mass $c$ at minimal cost; the exact problem is a
#   linear program (here: $-36$, with several optimal plans).
# - Entropic regularisation gives a smooth plan $\operatorname{diag}(a) e^{-\lambda M}
#   \operatorname{diag}(b)$ that Sinkhorn computes with matrix-vector products; its cost tends
#   to the exact optimum as $\lambda$ grows.
# - Stop Sinkhorn on the **marginal error**, never on "the iterates stopped changing": on a
#   plateau the second rule reports an invalid plan whose cost beats the optimum.
# - For large $\lambda$ the kernel underflows; notebook 02 shows the log-domain solver.
#
# Run the same example from the shell with `swav-ref dessert --lam 10 --out dessert_out`.
