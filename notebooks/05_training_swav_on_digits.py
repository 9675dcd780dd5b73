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
# # 05 · Training SwAV on digits
#
# The previous notebooks built the pieces: optimal transport and Sinkhorn (01, 02), SwAV's
# codes and swapped loss (03), and a ResNet with hand-written backward passes (04). Here
# they train together, without labels, on scikit-learn's 1797 handwritten digits, and we
# ask what the network has learned.
#
# 1. **The crops** -- the views of each image that SwAV compares.
# 2. **Training** -- `Trainer(config).fit()`, with its progress bar and metrics log.
# 3. **Curves** -- the loss and how many prototypes the codes use.
# 4. **Evaluation** -- a linear probe and kNN on the frozen features, against raw pixels
#    and the same network untrained.
# 5. **Prototypes** -- the test images grouped by the prototype they are assigned to.
# 6. **Online against offline** -- SwAV against DeepCluster-v2 as the data set grows.
#
# To keep this notebook to a minute on a laptop, the training here is **short** (a few
# epochs). The full recipe, with the supervised baseline and several seeds, is
# one command: `swav-ref demo --seeds 0 1 2 --epochs 30` (see the README and the *Results*
# page).

# %%
# %matplotlib inline
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Code

import swav_ref
import swav_ref.backend
from swav_ref import exercises, plots
from swav_ref.data.datasets import load_dataset
from swav_ref.data.multicrop import show_crops
from swav_ref.results import results_table
from swav_ref.encoder import load_encoder
from swav_ref.experiment import evaluate_raw_pixels, evaluate_trainer, prototype_assignments, supervised_config
from swav_ref.swav import CollapseMonitor
from swav_ref.train import TrainConfig, Trainer

# "cupy" runs this notebook on a GPU; so does SWAV_REF_BACKEND=cupy in the environment
BACKEND = os.environ.get("SWAV_REF_BACKEND", "numpy")
xp = swav_ref.backend.get_backend(BACKEND)
# Without ipywidgets the progress bar is plain text; tqdm would warn about that.
warnings.filterwarnings("ignore", message="IProgress not found")

# %% [markdown]
# ## 1 · The data and the crops
#
# The digits are $8 \times 8$ greyscale images. The split is fixed and stratified: 1438
# images to train on, 359 to test on. The configuration is the digits recipe of
# `swav-ref demo` (a tiny ResNet, 2 crops of $8 \times 8$ and 4 of $6 \times 6$, $K = 100$
# prototypes, a 128-d embedding, temperature 0.2, batch 128, LARS), shortened: a few
# epochs, one epoch of warm-up, and the prototypes frozen for the first epoch only.

# %%
EPOCHS = 6  # swav-ref demo trains 20; the Results page's tables 30 and 60
run_dir = Path(tempfile.mkdtemp(prefix="swav_digits_"))
train_set, test_set = load_dataset("digits", seed=0)
config = TrainConfig(
    backend=BACKEND, epochs=EPOCHS, warmup_epochs=1, freeze_prototypes_niters=11, log_every=2,
    out_dir=str(run_dir / "swav"),
)
trainer = Trainer(config, train_set=train_set, test_set=test_set)
print(f"{len(train_set)} training images, {len(test_set)} test images, "
      f"{trainer.steps_per_epoch} steps of {config.batch_size} per epoch")
# The crop settings were left to the data set's recipe (None in `config`); the trainer's copy
# has them filled in for the digits.
print({k: v for k, v in trainer.config.to_dict().items() if k in ("arch", "n_crops", "crop_sizes", "min_scale",
                                                                  "max_scale", "n_prototypes", "epsilon", "temperature")})

# %% [markdown]
# Each image becomes six views: two large crops (covering 50-100% of the image, resized
# to $8 \times 8$) and four small ones (30-60%, resized to $6 \times 6$), most of them (80 %)
# with their brightness and contrast jittered. No flips (a mirrored 3 is no digit) and no blur (one
# pixel is an eighth of the image): the digits recipe of `swav_ref.data.multicrop`. The codes are computed for the two large crops,
# and every other crop must predict them. The augmentation runs on the backend, so under
# CuPy the crops are made on the GPU.

# %%
show_crops(train_set.images[:4], trainer.multicrop, swav_ref.backend.Random(0, xp), n_images=4)

# %% [markdown]
# ## 2 · Training
#
# `fit()` runs the epochs. Each step: crops $\to$ ResNet $\to$ head $\to$ scores against the
# prototypes $\to$ Sinkhorn codes of the large crops $\to$ swapped loss and its gradient
# $\to$ backward $\to$ LARS. Every `log_every` steps the metrics of the steps since the
# last time are brought to the host together (the only device-to-host copy), written to
# `metrics.jsonl`, checked for NaN and collapse, and shown on the progress bar. So
# `log_every` sets how often, not which: every step's loss is logged, and the collapse
# monitor below sees each one.

# %%
t0 = time.perf_counter()
log = trainer.fit()
print(f"trained {EPOCHS} epochs ({trainer.step} steps) in {time.perf_counter() - t0:.0f} s; "
      f"log: {(trainer.out_dir / 'metrics.jsonl').relative_to(run_dir)} in the run folder")
pd.DataFrame(log.epochs())[["epoch", "loss", "seconds"]].set_index("epoch")

# %% [markdown]
# ## 3 · Loss and code usage
#
# The loss starts at about $\ln K$: with random prototypes every prediction is nearly
# uniform over the $K$ prototypes, and the cross-entropy of a uniform prediction is $\ln K$
# whatever the code. Learning moves it below, as the crops' predictions come to agree
# with the codes of the other crops. Two numbers tell whether the run is healthy:
#
# - the **loss** against $\ln K$ (dashed): a loss that settles *at* $\ln K$ means every
#   crop predicts the uniform distribution over prototypes, whatever the image: the
#   signature of collapse, where the features stop carrying information;
# - the **prototypes used** (how many prototypes are the argmax of at least one code in the
#   batch) and the **entropy of the mean code**: Sinkhorn's equal-partition constraint
#   keeps both high, which is what stops SwAV from putting every image into one cluster.

# %%
plots.training_curves(log.steps(), config.n_prototypes[0])

# %% [markdown]
# The trainer watches the logged loss for that signature: its `CollapseMonitor` warns when
# the last `window` logged losses (100 by default) all lie within `tolerance` (0.01) of
# $\ln K$, and lists what to try. This short run logs fewer steps than that window, so the
# monitor cannot have fired here whatever happened; what it would look at, computed on the
# steps we have:

# %%
monitor = trainer.monitor
steps_df = pd.DataFrame(log.steps())
recent = steps_df["loss"].tail(monitor.window)
print(f"monitor: window {monitor.window} logged steps, tolerance {monitor.tolerance}; this run logged "
      f"{len(steps_df)} steps, so it {'can' if len(steps_df) >= monitor.window else 'cannot'} fire")
print(f"largest |loss - ln K| over the last {len(recent)} logged steps: "
      f"{(recent - monitor.log_k).abs().max():.4f} (collapse means all of them within {monitor.tolerance}); "
      f"last loss {recent.iloc[-1] - monitor.log_k:+.4f} from ln K = {monitor.log_k:.4f}")
print(f"prototypes used over the last 10 logged steps: {steps_df['prototypes_used'].tail(10).mean():.1f} "
      f"of {config.n_prototypes[0]}")

# %% [markdown]
# **Exercise (reproduce collapse).** The digits recipe uses temperature 0.2 instead of the
# official 0.1 because at 0.1 it collapses (see the note in `TrainConfig`'s docstring).
# See it happen: train the same short run with `temperature = 0.1`, and give the trainer a
# `CollapseMonitor` whose window fits in the run (say 20: the monitor sees the loss of every
# training step, and this run has 6 x 11 = 66) so that it can notice. The
# cell below trains only when you set `REPRODUCE_COLLAPSE = True` (about as long as the
# training above); fill in the two values first. Expected: instead of falling below
# $\ln K$, the loss comes down onto $\ln K$ and stays there (within about $10^{-4}$ by the
# sixth epoch), and a `CollapseWarning` is printed.

# %%
REPRODUCE_COLLAPSE = False  # True trains a second short run
collapse_temperature = config.temperature  # your value here
collapse_window = 100  # your value here

collapsed = None
if REPRODUCE_COLLAPSE:
    collapsed = Trainer(dataclasses.replace(config, temperature=collapse_temperature, progress=False,
                                            out_dir=str(run_dir / "collapse")),
                        train_set=train_set, test_set=test_set)
    collapsed.monitor = CollapseMonitor(config.n_prototypes[0], window=collapse_window)
    collapsed.fit()
print(exercises.check_collapse(collapsed))

# %% [markdown]
# ## 4 · Evaluation: how good are the frozen features?
#
# The backbone is frozen and put in eval mode; its features of the training images fit a
# classifier, scored on the test images. Two protocols: a **linear probe** (logistic
# regression on standardised features, its regularisation $C$ chosen by 5-fold
# cross-validation on the training split, repeated 3 times with other folds), the SwAV
# paper's main evaluation, and a **weighted kNN** on cosine
# similarity ($k = 20$ and $k = 200$, temperature 0.07), the protocol of Wu et al. (2018),
# later used by DINO, which needs no training at all. The baselines:
#
# - **raw pixels** -- the 64 pixel values, no network;
# - **random init** -- the same ResNet, untrained: what the architecture gives for free;
# - **supervised** (optional, `RUN_SUPERVISED = True`) -- the same network and recipe
#   trained with the labels (on the large crops only, `supervised_config`, as in the
#   *Results* table), the target a self-supervised method tries to reach.

# %%
RUN_SUPERVISED = False  # True adds the supervised row (as long again as the SwAV training)

untrained = Trainer(dataclasses.replace(config, out_dir=str(run_dir / "untrained")),
                    train_set=train_set, test_set=test_set)
rows = [
    {"method": "raw pixels", **evaluate_raw_pixels(trainer)},
    {"method": "random init", **evaluate_trainer(untrained)},
    {"method": f"SwAV ({EPOCHS} epochs)", **evaluate_trainer(trainer)},
]
if RUN_SUPERVISED:
    supervised = Trainer(supervised_config(dataclasses.replace(config, out_dir=str(run_dir / "supervised"))),
                         train_set=train_set, test_set=test_set)
    supervised.fit()
    rows.append({"method": f"supervised ({EPOCHS} epochs)", **evaluate_trainer(supervised)})
table = results_table(rows)
(100 * table[["linear probe", "kNN k=20", "kNN k=200"]]).round(1)

# %% [markdown]
# Read the table with the training length in mind. Digits are easy, so raw pixels are a
# strong baseline, and an untrained ResNet already gives useful features (random
# convolutions and pooling are a decent fixed feature map). A run of a few epochs is far
# from the recipe's 20 to 30: compare the SwAV row with the random-init row to see whether these
# epochs improved on the starting point, and the curves above to see whether the loss was
# still falling or had settled near $\ln K$. The numbers show where such a short run
# stands, not what the method reaches. `swav-ref demo --seeds 0 1 2 --epochs 30` trains
# the full recipe for every row (with the supervised one) and reports mean and standard
# deviation over seeds; the *Results* page has its numbers at 30 epochs and at 60
# (`--epochs 60`).

# %% [markdown]
# The trained network is in its checkpoint, with the input normalisation it was trained
# with, so features of new images need neither this notebook's objects nor the data set:
# `load_encoder` rebuilds the backbone from `checkpoint.npz` alone, and its features are
# the trainer's, bit for bit. A classifier of your own can be fitted on them.

# %%
encoder = load_encoder(run_dir / "swav" / "checkpoint.npz")
new_features = encoder.features(test_set.images[:5])
print(new_features.shape, "| the trainer's features:",
      bool(xp.all(new_features == trainer.features(test_set.images[:5]))))

# %% [markdown]
# ## 5 · Images grouped by prototype
#
# Each test image goes to its most similar prototype (the argmax of its scores, no
# Sinkhorn needed at test time). One row per prototype, the ten most used: a row of one
# digit means the prototype has found that class without ever seeing a label.

# %%
assignments = prototype_assignments(trainer, test_set.images)
plots.prototype_gallery(test_set.images, assignments, n_prototypes=10, per_prototype=12)

# %% [markdown]
# How pure are the prototypes? For each prototype, the share of its images that carry its
# most frequent label (a purity of 1 means every prototype holds one digit only).
#
# What is chance here? Not 0.1: purity rewards many small groups (a prototype holding one
# image is always pure), so the honest baseline keeps these very groups and shuffles the
# labels among the images. Compare the two numbers, not the first with 0.1.

# %%
def purity_of(groups, labels) -> float:
    """The share of images that carry the most frequent label of their group."""
    table = pd.crosstab(pd.Series(groups, name="prototype"), pd.Series(labels, name="digit"))
    return table.max(axis=1).sum() / table.to_numpy().sum()


test_labels = np.asarray(test_set.labels)
purity = purity_of(assignments, test_labels)
shuffles = np.random.default_rng(0)
chance = np.mean([purity_of(assignments, shuffles.permutation(test_labels)) for _ in range(200)])
crosstab = pd.crosstab(pd.Series(assignments, name="prototype"), pd.Series(test_labels, name="digit"))
print(f"{(crosstab.sum(axis=1) > 0).sum()} prototypes used on the test set; purity {purity:.2f}, "
      f"against {chance:.2f} for the same groups with the labels shuffled")
crosstab.loc[crosstab.sum(axis=1).sort_values(ascending=False).index[:10]]

# %% [markdown]
# ## 6 · Online against offline: SwAV and DeepCluster-v2
#
# SwAV computes its targets **online**: the codes of a batch come from that batch's scores,
# by Sinkhorn, and are forgotten after the step. Its memory beyond the model (the queue, not
# even used here) does not depend on the size $N$ of the data set.
#
# DeepCluster-v2, which the SwAV paper builds from the same ingredients, computes them
# **offline**: a *memory bank* keeps the embedding of every training image, and at the start
# of every epoch k-means clusters the whole bank; each image's cluster is its hard target for
# the epoch. The same `Trainer` runs both (`method="deepcluster-v2"`); what differs is the
# targets, made at the start of the epoch (below), and, at each step, the loss (against
# those targets, not Sinkhorn codes), the memory bank's update and the prototypes, which
# DeepCluster-v2 never trains (k-means sets them each epoch).

# %%
Code(inspect.getsource(Trainer._start_epoch), language="python")

# %% [markdown]
# The loss is SwAV's with the soft code replaced by a one-hot vector: every crop of image
# $n$ predicts the image's cluster $y_n$ in each of the $H$ prototype sets, averaged over
# the sets and over the rows $R$ that have a target (an image missing from the bank has
# target `IGNORE_INDEX` and does not count).
#
# **Exercise (DeepCluster-v2's gradient).** For one prototype set, given `scores` (V B, K)
# stacked crop by crop, `targets` (B,) (with `IGNORE_INDEX` = -100 for an image without a
# target), `n_crops` $= V$, `temperature` $= \tau$ and `n_sets` $= H$, return the (V B, K)
# gradient
# $\frac{\mathrm{softmax}(s_r/\tau) - \mathrm{onehot}(y_r)}{\tau\, H\, |R|}$ on the rows
# with a target and 0 on the others. Hint: crop $v$ of image $n$ is row $vB + n$, so the row
# targets are `np.tile(targets, n_crops)`. The check compares with
# `swav_ref.deepcluster.deepcluster_loss` (H = 3 sets, one image without a target).

# %%
def my_deepcluster_grad(scores, targets, n_crops, temperature, n_sets):
    return None  # your code here


# %%
print(exercises.check_deepcluster_grad(my_deepcluster_grad))

# %% [markdown]
# What does that cost as the data grow? `benchmarks/bench_deepcluster_scaling.py` trains
# both methods on digits repeated 1, 4 and 16 times (the same images; the augmentation makes
# every pass different) and measures the memory each method holds beyond the model and the
# time per epoch. We read its saved result; if it is not there (an installed package without
# the repository's `benchmarks/` folder has neither), we measure a tiny version here, on
# digits repeated once and twice, by calling the benchmark's own function.

# %%
repo = Path(swav_ref.__file__).resolve().parents[1]
saved = repo / "benchmarks" / "results" / "bench_deepcluster_scaling.json"
scaling = None
if saved.exists():
    scaling = json.loads(saved.read_text(encoding="utf-8"))
    print(f"measured on {scaling['date']} ({scaling['machine']}): {scaling['command']}")
elif (repo / "benchmarks" / "bench_deepcluster_scaling.py").exists():
    sys.path.insert(0, str(repo / "benchmarks"))
    import bench_deepcluster_scaling

    scaling = bench_deepcluster_scaling.measure_scaling(repeats=(1, 2), steps=1, cluster_repeats=1)
else:
    print("benchmarks/ is not next to the package: run the benchmark from a clone of the repository")

if scaling is not None:
    columns = {"method": "method", "n_images": "N", "state_bytes": "state (bytes)",
               "step_s": "step (s)", "cluster_s": "clustering pass (s)", "epoch_s": "epoch (s)"}
    shown = pd.DataFrame(scaling["results"])[list(columns)].rename(columns=columns)
    shown["state (bytes)"] = shown["state (bytes)"].astype(int)
    print(scaling["epoch_time"])
    display(shown.round(3))  # noqa: F821 (IPython's display)

# %%
if scaling is not None:
    sys.path.insert(0, str(repo / "benchmarks"))
    from bench_deepcluster_scaling import scaling_figure

    display(scaling_figure(scaling))  # noqa: F821

# %% [markdown]
# What to read in it:
#
# - **memory** -- DeepCluster-v2's bank holds $|A| \cdot N \cdot d$ floats (2 assignment
#   crops $\times$ 128 dimensions $\times$ 4 bytes = 1 KiB per image here) plus one target
#   per image and prototype set: it grows linearly with $N$. SwAV holds nothing (no queue
#   in this recipe), or a queue of fixed length whatever $N$. At ImageNet scale
#   ($N = 1.28$ million, $d = 128$) the bank is 1.3 GB per copy.
# - **time** -- an epoch of either method is $N / B$ steps, so both grow linearly; the
#   steps cost the same. DeepCluster-v2 adds a clustering pass over the whole bank at every
#   epoch, $O(NKd)$ per k-means iteration; on digits it is a small fraction of the epoch,
#   with the official three sets of 3000 prototypes it is not.
#
# More on the algorithm (k-means++ seeding, frozen prototypes, the loss) on the page
# *DeepCluster-v2: the offline alternative*. To train it and compare the two with the
# baselines: `swav-ref demo --methods swav deepcluster-v2 --seeds 0 1 2 --epochs 30`.
