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
# # 03 · SwAV's codes and loss
#
# SwAV learns by *swapped prediction*: two crops of the same image should be assigned to
# the same prototypes, so each crop is asked to predict the **code** (soft assignment) of
# the other. This notebook walks through the pieces of `swav_ref.swav`:
#
# 1. **Equal partition** -- codes from Sinkhorn, and why plain softmax codes would not do.
# 2. **Epsilon** -- how the entropic regularisation sets the sharpness of the codes.
# 3. **The gradient** -- derived by hand, checked numerically, with the codes held fixed.
# 4. **Multi-crop** -- how the loss averages over assignment crops and predicting crops.
# 5. **The queue** -- why a batch smaller than the number of prototypes needs one.
#
# The derivation in full is on the page *The gradient of SwAV's swapped loss, by hand*.

# %%
# %matplotlib inline
import inspect
import math
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Code

import swav_ref.backend
from swav_ref import exercises
from swav_ref.backend import to_numpy
from swav_ref.nn.functional import l2_normalize_forward
from swav_ref.nn.gradcheck import check_gradient
from swav_ref.swav import (
    Queue,
    code_usage,
    normalize_prototypes,
    prototypes_forward,
    sinkhorn_codes,
    swapped_prediction_loss,
    swav_loss,
)

# "cupy" runs this notebook on a GPU; so does SWAV_REF_BACKEND=cupy in the environment
BACKEND = os.environ.get("SWAV_REF_BACKEND", "numpy")
xp = swav_ref.backend.get_backend(BACKEND)
rand = swav_ref.backend.Random(3, xp)

# %% [markdown]
# ## A toy batch
#
# Embeddings are unit vectors in $d = 8$ dimensions drawn around a few hidden "classes",
# the prototypes are random unit vectors, and the scores are their cosines,
# $S = E C^\top$, computed by the prototype layer.


# %%
def toy_embeddings(n, dim, n_classes, spread, seed):
    """n unit vectors scattered around n_classes random directions (host data -> xp)."""
    r = np.random.default_rng(seed)
    centres = r.normal(size=(n_classes, dim))
    labels = r.integers(0, n_classes, size=n)
    points = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True)
    points = points + spread * r.normal(size=(n, dim))
    return swav_ref.backend.asarray(points, xp), labels, centres


B, K, D = 32, 6, 8
z, labels, _ = toy_embeddings(B, D, n_classes=3, spread=0.3, seed=0)
prototypes = normalize_prototypes(rand.normal((K, D)))
scores, cache = prototypes_forward(z, prototypes)
print("scores", scores.shape, "range", float(xp.min(scores)), "to", float(xp.max(scores)))

# %% [markdown]
# ## 1. Equal partition
#
# The obvious code is each sample's own softmax over the prototypes,
# $\mathrm{softmax}(s_b / \varepsilon)$. Nothing stops it from putting the whole batch on
# the one or two prototypes that happen to be closest: the trivial solution that makes
# "predict the other crop's code" easy and useless.
#
# SwAV instead asks for codes $Q$ that also spread the batch **equally** over the
# prototypes: each prototype receives $B/K$ of the batch in total. Maximising
# $\langle Q, S \rangle + \varepsilon H(Q)$ under both marginal constraints is an
# entropic optimal-transport problem. The official code runs a fixed three Sinkhorn-Knopp
# iterations (alternately normalising the prototype totals and the per-sample totals); we
# will measure below how close that gets. Here is the library's implementation, the
# official algorithm step by step:

# %%
source = inspect.getsource(sinkhorn_codes)
signature = source[:source.index('    r"""')]
Code(signature + source[source.index("    xp = array_namespace"):], language="python")  # without the docstring

# %%
eps = 0.05
softmax_codes = xp.exp(scores / eps - swav_ref.backend.logsumexp(scores / eps, axis=1, keepdims=True))
codes = sinkhorn_codes(scores, epsilon=eps)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, q, title in ((axes[0], softmax_codes, "softmax(s / eps) per sample"), (axes[1], codes, "Sinkhorn codes")):
    ax.imshow(to_numpy(q).T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(title=title, xlabel="sample b", ylabel="prototype k")
width = 0.4
axes[2].bar(np.arange(K) - width / 2, to_numpy(xp.sum(softmax_codes, axis=0)), width, label="softmax")
axes[2].bar(np.arange(K) + width / 2, to_numpy(xp.sum(codes, axis=0)), width, label="Sinkhorn")
axes[2].axhline(B / K, color="k", ls="--", label="B / K")
axes[2].set(title="prototype totals (column sums)", xlabel="prototype k")
axes[2].legend()
plt.tight_layout()
plt.show()
print("rows sum to 1:", float(xp.max(xp.abs(xp.sum(codes, axis=1) - 1.0))))


def totals_range(q):
    totals = to_numpy(xp.sum(q, axis=0))
    return f"prototype totals {totals.min():.2f} to {totals.max():.2f}"


print(f"B / K = {B / K:.2f}; softmax: {totals_range(softmax_codes)}; Sinkhorn (3 iterations): {totals_range(codes)}")

# %% [markdown]
# Both kinds of code are probability vectors per sample (the rows sum to 1). Neither meets
# the equal partition exactly, but they are far apart: the softmax codes leave one
# prototype almost empty and pile more than twice its share on another, while after three
# Sinkhorn iterations every prototype holds between about half and 1.25 times its share
# $B/K$. More iterations close the gap:

# %%
for n_iters in (1, 3, 10, 100):
    q = sinkhorn_codes(scores, epsilon=eps, n_iters=n_iters)
    deviation = float(xp.max(xp.abs(xp.sum(q, axis=0) - B / K)))
    print(f"n_iters = {n_iters:3d}: largest |prototype total - B/K| = {deviation:.2e} ({totals_range(q)})")

# %% [markdown]
# Three iterations are therefore a choice, not convergence: in this small, clustered batch
# (32 samples, 6 random prototypes, 3 hidden classes) they leave a prototype at about half
# its share. Why is that enough for training? The constraint's job is to rule out the
# degenerate solution, the whole batch on a few prototypes, and even a rough partition does
# that. Nothing accumulates either: every step solves a fresh problem on a new batch, with
# prototypes that have moved, so an imbalance in one batch is not carried into the next.
# And the iterations are cheap and need no convergence test (no value read back from the
# device). The SwAV paper reports that 3 iterations are fast and sufficient for good
# performance; the price of stopping early is codes that are only approximately balanced.
#
# **Exercise (codes are an optimal-transport plan).** Converged, the codes are exactly the
# entropic OT plan of notebooks 01 and 02, scaled: cost $M = -S$, each sample a mass
# $r_b = 1/B$, each prototype a mass $c_k = 1/K$, and $\lambda = 1/\varepsilon$. Compute
# them with the generic solver `swav_ref.ot.sinkhorn_knopp(M, r, c, lam, tol=...)` and
# return its plan times $B$ (so that each row sums to 1), shape (B, K). The check compares
# them with `sinkhorn_codes(..., n_iters=1000)` and wants agreement within $10^{-8}$
# (hint: a tight `tol`, say `1e-12`: the solver's default stops when the marginals are
# within $10^{-9}$, uncomfortably close to the check's bound).

# %%
def my_codes(scores, epsilon):
    return None  # your code here


# %%
print(exercises.check_codes_as_transport(my_codes))

# %% [markdown]
# ## 2. The effect of epsilon
#
# $\varepsilon$ trades the transport objective against entropy. Large $\varepsilon$: soft,
# almost uniform codes. Small $\varepsilon$: nearly one-hot codes, but a rougher partition
# after the same 3 iterations, because Sinkhorn needs more iterations to converge as
# $\varepsilon$ falls (section 1: three iterations are not convergence). `code_usage` summarises a batch of codes: the mean entropy of a code (0 for
# one-hot, $\ln K$ for uniform) and how many prototypes are somebody's favourite.

# %%
epsilons = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005]
mean_entropy, sharpness, used = [], [], []
for e in epsilons:
    q = sinkhorn_codes(scores, epsilon=e)
    usage = code_usage(q)
    mean_entropy.append(float(usage.mean_entropy))
    sharpness.append(float(xp.mean(xp.max(q, axis=1))))
    used.append(int(usage.n_used))

fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.semilogx(epsilons, mean_entropy, "o-", label="mean code entropy")
ax.semilogx(epsilons, sharpness, "s-", label="mean largest entry of a code")
ax.axhline(math.log(K), color="gray", ls=":", label="ln K (uniform code)")
ax.set(xlabel="epsilon", title="sharper codes as epsilon falls")
ax.invert_xaxis()
ax.legend()
plt.show()
print("prototypes in use:", dict(zip(epsilons, used)))

# %% [markdown]
# The official value is $\varepsilon = 0.05$. Smaller values are sharper but numerically
# delicate: $e^{s/\varepsilon}$ at $\varepsilon = 0.005$ spans $e^{\pm 200}$. The
# library shifts each prototype's scores by their maximum before `exp` (the shift cancels
# in the first normalisation), so nothing overflows; what remains is *underflow*: a sample
# far from every prototype's best match can see all its entries (its row of the codes, its
# column of the paper's $Q$) round to 0 in float32,
# and the official iterations divide 0 by 0. Below `FLOAT32_SAFE_EPSILON` a float32 input
# is therefore iterated in float64 (and cast back). Forcing float32 shows why:

# %%
r = np.random.default_rng(0)
spread_z = r.normal(size=(32, 4))
spread_c = r.normal(size=(10, 4))
hard = swav_ref.backend.asarray(
    (spread_z / np.linalg.norm(spread_z, axis=1, keepdims=True))
    @ (spread_c / np.linalg.norm(spread_c, axis=1, keepdims=True)).T, xp, "float32")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the 0/0 we are demonstrating
    try:
        forced = sinkhorn_codes(hard, epsilon=0.005, compute_dtype="float32")
        # on a GPU the NaN comes back (looking for it would wait for the device)
        print("float32 iterations, non-finite codes:", int(xp.sum(xp.astype(~xp.isfinite(forced), xp.int32))))
    except ValueError as error:  # NumPy checks its codes, and names the cause
        print("float32 iterations:", error)
automatic = sinkhorn_codes(hard, epsilon=0.005)
print("automatic (float64 iterations), non-finite codes:",
      int(xp.sum(xp.astype(~xp.isfinite(automatic), xp.int32))), "| dtype out:", automatic.dtype)

# %% [markdown]
# ## 3. The gradient, derived and checked
#
# For one assignment crop $a$ and one predicting crop $v$ the loss is the cross-entropy
# $-\frac1B\sum_b \sum_k q_{a,bk} \log p_{v,bk}$ with $p_v = \mathrm{softmax}(s_v/\tau)$.
# The codes are **constants** (SwAV computes them under `no_grad`), so this is a softmax
# cross-entropy with fixed targets, whose gradient is "prediction minus target":
#
# $$ \frac{\partial L}{\partial s_v} = \frac{p_v - q_a}{\tau}\times\text{(averaging factors)} .$$
#
# With two crops, $\partial L / \partial s_0 = (p_0 - q_1) / (2B\tau)$: crop 0's scores are
# pulled towards crop 1's code, and vice versa, the swap. In general a crop $v$ predicts
# $T_v$, the sum of the codes of the assignment crops other than itself ($n_v$ of them):
#
# $$ \frac{\partial L}{\partial s_v} = \frac{n_v\, p_v - T_v}{\tau\, |A|\, (V - 1)\, B} .$$
#
# The check: compute the codes once, then perturb the scores with those codes held fixed
# (`swapped_prediction_loss` takes the codes as an argument), in float64.

# %%
z2, _, _ = toy_embeddings(2 * 4, D, n_classes=3, spread=0.3, seed=1)  # 2 crops x B = 4
z2 = xp.astype(z2, xp.float64)
s2, _ = prototypes_forward(z2, xp.astype(prototypes, xp.float64))
out = swav_loss(s2, 4)


def loss_with_fixed_codes():
    return float(swapped_prediction_loss(s2, out.codes, 4)[0])


print("rel. error, hand-derived vs central differences:", check_gradient(loss_with_fixed_codes, s2, out.grad))
print("each row of the gradient sums to zero:", float(xp.max(xp.abs(xp.sum(out.grad, axis=1)))))
print("two crops: grad of crop 0 == (p_0 - q_1) / (2 B tau):",
      float(xp.max(xp.abs(out.grad[:4, :] - (xp.exp(s2[:4, :] / 0.1 - swav_ref.backend.logsumexp(
          s2[:4, :] / 0.1, axis=1, keepdims=True)) - out.codes[1]) / (2 * 4 * 0.1)))))

# %% [markdown]
# **Exercise (the swapped-loss gradient).** Write $\partial L / \partial S$ yourself, for
# any number of crops: `scores` is (V B, K), stacked crop by crop; `codes` is a list with one
# (B, K) array per assignment crop, in the order of `crops_for_assign`; return the
# (V B, K) gradient
# $\frac{\partial L}{\partial s_v} = \frac{n_v\, p_v - T_v}{\tau\, |A|\, (V - 1)\, B}$,
# with $p_v = \mathrm{softmax}(s_v / \tau)$ row by row. Hint: loop over the crops $v$; $T_v$
# sums the codes of the assignment crops other than $v$, and $n_v$ counts them. The check
# uses $V = 7$ crops, $A = \{0, 1\}$, $B = 4$, and compares with `swapped_prediction_loss`.

# %%
def my_swapped_loss_grad(scores, codes, batch_size, crops_for_assign, temperature):
    return None  # your code here


# %%
print(exercises.check_swapped_loss_grad(my_swapped_loss_grad))

# %% [markdown]
# What if the codes were *not* held fixed? Differentiating through Sinkhorn as well (let
# `swav_loss` recompute the codes at every perturbed point) gives a different vector: the
# stop-gradient is a modelling choice, not a detail.

# %%
print("rel. error vs the derivative through Sinkhorn too:",
      check_gradient(lambda: float(swav_loss(s2, 4).loss), s2, out.grad))

# %% [markdown]
# ### Through the prototype layer
#
# Upstream of the scores sit the L2 normalisation and the prototypes:
# $e_i = z_i / \lVert z_i \rVert$ and $S = E C^\top$, with $C$ the (K, d) prototypes. The
# page *The gradient of SwAV's swapped loss, by hand* derives the backward pass; with
# $G = \partial L / \partial S$,
#
# $$ \frac{\partial L}{\partial C} = G^\top E \quad (K \times d), \qquad
#    \frac{\partial L}{\partial z_i} = \frac{g_i - e_i\,(e_i^\top g_i)}{\lVert z_i \rVert},
#    \quad g_i = (G C)_i . $$
#
# **Exercise (prototype layer backward).** Given `dscores` $= G$ (N, K), the un-normalised
# `z` (N, d) and the prototypes `C` (K, d), return `(dz, dC)`. Hint: normalise `z` first;
# the gradient with respect to $z_i$ loses its component along $e_i$ (moving along the unit
# vector does not change a normalised output). The check compares with
# `prototypes_backward`.

# %%
def my_prototypes_backward(dscores, z, C):
    return None  # your code here


# %%
print(exercises.check_prototypes_backward(my_prototypes_backward))

# %% [markdown]
# ## 4. Multi-crop: how the loss averages
#
# With $V$ crops and assignment crops $A$ (the two large crops), the official loss is
#
# $$ L = \frac{1}{|A|}\sum_{a\in A} \frac{1}{V-1}\sum_{v\ne a} \ell(a, v). $$
#
# Below, $V = 2 + 4$: we evaluate every pair term $\ell(a, v)$ on its own (a two-crop
# problem with one assignment crop) and check that their average is `swav_loss`.

# %%
V, Bm = 6, 8
zm, _, _ = toy_embeddings(V * Bm, D, n_classes=3, spread=0.3, seed=2)
sm, _ = prototypes_forward(zm, prototypes)
multi = swav_loss(sm, Bm, crops_for_assign=(0, 1))

pair = np.full((2, V), np.nan)
for i, a in enumerate((0, 1)):
    for v in range(V):
        if v != a:
            stacked = xp.concat((sm[a * Bm:(a + 1) * Bm, :], sm[v * Bm:(v + 1) * Bm, :]))
            pair[i, v] = float(swapped_prediction_loss(stacked, [multi.codes[i]], Bm, crops_for_assign=(0,))[0])

fig, ax = plt.subplots(figsize=(6.5, 2.6))
im = ax.imshow(pair, cmap="magma")
ax.set(xticks=range(V), yticks=[0, 1], xlabel="predicting crop v (0, 1 large; 2-5 small)",
       ylabel="code of crop a", title="pair terms l(a, v)")
plt.colorbar(im)
plt.show()
print("mean over v != a, then over a:", np.mean(np.nanmean(pair, axis=1)), "| swav_loss:", float(multi.loss))

# %% [markdown]
# The gradient weights follow from the same averaging: a large crop predicts one code
# ($n_v = 1$), a small crop predicts both ($n_v = 2$), so the small crops' rows of the
# gradient carry about twice the weight. Mean absolute gradient per crop:

# %%
per_crop = [float(xp.mean(xp.abs(multi.grad[v * Bm:(v + 1) * Bm, :]))) for v in range(V)]
plt.figure(figsize=(6.5, 2.6))
plt.bar(range(V), per_crop, color=["C0", "C0"] + ["C1"] * (V - 2))
plt.xlabel("crop")
plt.ylabel("mean |dL/ds|")
plt.title("large crops (blue) predict 1 code, small crops (orange) 2")
plt.show()

# %% [markdown]
# ## 5. The queue: when the batch is smaller than K
#
# The equal-partition constraint gives each prototype $B/K$ of the batch. With $B = 16$
# images and $K = 64$ prototypes that is a quarter of a sample each: no sample can be
# assigned to one prototype, and the codes are forced to smear over several. SwAV's fix is
# to solve Sinkhorn over the current batch **plus** the embeddings of the last $N_q$ samples
# (a queue, re-scored with the current prototypes) and keep only the batch's codes.
#
# Below, the data has 64 hidden classes and the prototypes sit on the class centres, so the
# right code of a sample is its class. We fill queues of several lengths with earlier
# batches and measure how sharp the batch's codes are and how often their arg-max is the
# sample's class.

# %%
Kq, Dq, Bq = 64, 16, 16
pool, pool_labels, centres = toy_embeddings(4096 + Bq, Dq, n_classes=Kq, spread=0.15, seed=3)
pool, _ = l2_normalize_forward(pool)
class_prototypes = normalize_prototypes(swav_ref.backend.asarray(centres, xp))
batch, batch_labels = pool[:Bq, :], pool_labels[:Bq]
batch_scores = xp.concat((batch, batch)) @ class_prototypes.T  # 2 crops (identical here)

lengths = [0, 64, 256, 1024, 4096]
accuracy, peak = [], []
for length in lengths:
    queued = None
    if length:
        queue = Queue(2, length, Dq, Bq, xp=xp, dtype=pool.dtype)
        for start in range(Bq, Bq + length, Bq):  # earlier batches
            past = pool[start:start + Bq, :]
            queue.push([past, past])
        assert queue.is_full
        queued = queue.all_scores(class_prototypes)
    q = to_numpy(swav_loss(batch_scores, Bq, queue_scores=queued).codes[0])
    accuracy.append(np.mean(q.argmax(axis=1) == batch_labels))
    peak.append(q.max(axis=1).mean())

fig, ax = plt.subplots(figsize=(6.5, 3.5))
x = np.arange(len(lengths))
ax.plot(x, accuracy, "o-", label="arg-max code = class")
ax.plot(x, peak, "s-", label="mean largest code entry")
ax.set(xticks=x, xticklabels=[str(n) for n in lengths], xlabel="queue length",
       title=f"B = {Bq} < K = {Kq}: codes need the queue", ylim=(0, 1.05))
ax.legend()
plt.show()
for n, a, p in zip(lengths, accuracy, peak):
    print(f"queue length {n:5d}: accuracy {a:.2f}, mean largest entry {p:.2f}")

# %% [markdown]
# Without the queue the codes are smeared (the largest entry of a code is about 1/4,
# exactly the B/K share a prototype may take) and some point at the wrong prototype,
# because the constraint forces 16 samples to cover all 64 prototypes. With a few hundred
# queued embeddings the partition becomes meaningful again: the codes are sharp and recover
# the classes. The official recipe starts the queue only after some epochs (its embeddings
# must come from a network that already produces meaningful features) and uses it only
# once full; the queue stores embeddings, not scores, because the prototypes move every
# step.
