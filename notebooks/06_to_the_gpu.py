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
# # 06 · To the GPU
#
# Every numerical function in swav_ref is written once, against the Python Array API
# standard, and asks its inputs which library they belong to (`xp = array_namespace(x)`).
# So the same training runs on a GPU by changing one word: `backend="cupy"`. Nothing is
# translated or copied: CuPy *is* the namespace, and the arrays live in GPU memory from the
# moment a batch of `uint8` images leaves the host until the logged loss comes back.
#
# This notebook
#
# 1. asks for CuPy, and says clearly when this machine has no usable GPU (it then runs the
#    same cells on NumPy);
# 2. shows where the arrays live: the crops, a parameter, the codes;
# 3. times one training step on every backend available here;
# 4. trains briefly on the chosen backend;
# 5. shows the GPU measurements made on an NVIDIA H200: NumPy and CuPy give the same losses,
#    and how fast each piece is against PyTorch on the same GPU.
#
# The full recipe on a GPU is `swav-ref demo --backend cupy` (or `swav-ref train
# --backend cupy ...`); install CuPy with the `gpu` extra, `pip install -e ".[gpu]"`.

# %%
# %matplotlib inline
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Code

import swav_ref
import swav_ref.backend
from swav_ref.backend import BackendUnavailableError, backend_name, synchronize
from swav_ref.data.datasets import load_dataset
from swav_ref.train import TrainConfig, Trainer

# this notebook is about the GPU; "numpy" (or SWAV_REF_BACKEND=numpy in the environment) runs it on the CPU
BACKEND = os.environ.get("SWAV_REF_BACKEND", "cupy")
try:
    xp = swav_ref.backend.get_backend(BACKEND)
except BackendUnavailableError as error:
    print(f"No GPU here, so this notebook runs on NumPy.\n\n{error}")
    BACKEND = "numpy"
    xp = swav_ref.backend.get_backend(BACKEND)
print(f"backend: {BACKEND} ({xp.__name__} {xp.__version__})")
# Without ipywidgets the progress bar is plain text; tqdm would warn about that.
warnings.filterwarnings("ignore", message="IProgress not found")

# %% [markdown]
# ## 1 · Where the arrays live
#
# A `Trainer` on the chosen backend. Images are kept on the host as `uint8` (four times
# cheaper to move than float32); a batch is moved to the device and the multi-crop
# augmentation runs there, as a few matrix products per crop. The parameters were created
# on the device at construction time.

# %%
train_set, test_set = load_dataset("digits", seed=0)
run_dir = Path(tempfile.mkdtemp(prefix="swav_gpu_"))
config = TrainConfig(backend=BACKEND, epochs=2, warmup_epochs=1, freeze_prototypes_niters=11,
                     log_every=2, out_dir=str(run_dir / BACKEND))
trainer = Trainer(config, train_set=train_set, test_set=test_set)

indices = trainer.batch_indices(0, 0)
crops = trainer.make_crops(indices)
name, owner, key = next(trainer.model.named_parameters())
weight = owner.params[key]
print("host images :", type(train_set.images).__module__, type(train_set.images).__name__, train_set.images.dtype)
print("crops       :", len(crops), "arrays of type", type(crops[0]).__module__ + "." + type(crops[0]).__name__,
      [tuple(c.shape) for c in crops[:3]], "...")
print(f"parameter   : {name} {tuple(weight.shape)} of type {type(weight).__module__}.{type(weight).__name__}")
print("namespace   :", backend_name(swav_ref.backend.array_namespace(crops[0], weight)))
print("device      :", getattr(crops[0], "device", "host"))

# %% [markdown]
# One step returns the loss as a 0-d array *on the device*, and the codes too: nothing is
# copied back inside the step. The trainer brings them to the host only every `log_every`
# steps (with `float(loss)`), which is the only synchronisation of the training loop.

# %%
loss, codes = trainer.train_step(crops, indices)
print(f"loss  : {type(loss).__module__}.{type(loss).__name__}, shape {tuple(loss.shape)}")
print(f"codes : {type(codes[0]).__module__}.{type(codes[0]).__name__}, shape {tuple(codes[0].shape)}")
print(f"float(loss) = {float(loss):.4f}   <- the copy to the host happens here")

# %% [markdown]
# ## 2 · One training step on each backend
#
# The same step (batch 128, 2 + 4 crops, the tiny ResNet of the digits recipe) on every
# backend this machine has. A GPU runs kernels asynchronously, so each timing waits for the
# device to finish (`synchronize`) before reading the clock. Tiny $8 \times 8$ images leave
# a GPU mostly idle: its advantage shows at CIFAR and ImageNet sizes (see the H200
# measurements below).

# %%
def time_steps(backend, n_steps=3):
    """Median seconds of a training step on ``backend`` (after one warm-up step)."""
    cfg = TrainConfig(backend=backend, epochs=1, progress=False, out_dir=str(run_dir / f"timing_{backend}"))
    t = Trainer(cfg, train_set=train_set, test_set=test_set)
    t.model.train()
    seconds = []
    for s in range(n_steps + 1):
        idx = t.batch_indices(0, s)
        synchronize(t.xp)
        t0 = time.perf_counter()
        step_loss, _ = t.train_step(t.make_crops(idx), idx)
        synchronize(t.xp)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[1:])


backends = ["numpy"] + (["cupy"] if BACKEND == "cupy" else [])
step_times = pd.DataFrame({"backend": backends, "seconds per step": [time_steps(b) for b in backends]})
step_times["images per second"] = (config.batch_size / step_times["seconds per step"]).round(0)
step_times

# %% [markdown]
# ## 3 · A short training on the chosen backend
#
# Two epochs, with the progress bar; the full recipe is `swav-ref demo --backend cupy`.

# %%
t0 = time.perf_counter()
log = trainer.fit()
print(f"{trainer.step} steps on {BACKEND} in {time.perf_counter() - t0:.1f} s")
steps = pd.DataFrame(log.steps())
fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
ax.plot(steps["step"], steps["loss"])
ax.set(xlabel="step", ylabel="loss", title=f"SwAV on digits, {BACKEND}")
plt.show()

# %% [markdown]
# ## 4 · Measured on an NVIDIA H200
#
# The repository's GPU check (`bash benchmarks/gpu_check.sh`) ran on one NVIDIA H200 and
# saved its results in `benchmarks/results/`. We read them here; if this is an installed
# package without the repository's `benchmarks/` folder, run the script on a GPU machine.
#
# **NumPy and CuPy agree.** `gpu_equivalence.py` trains SwAV on digits for 20 steps on each
# backend from the same seed: same initialisation and same crops (every random number is
# drawn on the host by one generator), float32. The losses agree to within
# `max_relative_difference` (the tolerance is 1e-3): the GPU computes the same thing, up to
# the order of float32 additions, which drifts slowly as the weights diverge.

# %%
results = Path(swav_ref.__file__).resolve().parents[1] / "benchmarks" / "results"
equivalence_file, gpu_file = results / "gpu_equivalence.json", results / "bench_gpu.json"
if equivalence_file.exists():
    equivalence = json.loads(equivalence_file.read_text(encoding="utf-8"))
    losses = pd.DataFrame({"numpy": equivalence["numpy"], "cupy": equivalence["cupy"],
                           "relative difference": equivalence["relative_difference"]})
    losses.index.name = "step"
    print(f"largest relative difference {equivalence['max_relative_difference']:.1e} "
          f"(tolerance {equivalence['rtol']}): {'passed' if equivalence['passed'] else 'FAILED'}")
    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    ax_loss.plot(losses.index, losses["numpy"], "o-", label="NumPy (CPU)")
    ax_loss.plot(losses.index, losses["cupy"], "x--", label="CuPy (H200)")
    ax_loss.set(xlabel="step", ylabel="loss", title="the same 20 training steps")
    ax_loss.legend()
    ax_diff.semilogy(losses.index, losses["relative difference"].clip(lower=1e-9), "o-")
    ax_diff.axhline(equivalence["rtol"], ls="--", c="grey", label="tolerance")
    ax_diff.set(xlabel="step", ylabel="|cupy - numpy| / |numpy|", title="relative difference of the loss")
    ax_diff.legend()
    plt.show()
else:
    print(f"{equivalence_file} not found: run `bash benchmarks/gpu_check.sh` on a GPU machine")

# %% [markdown]
# **Speed against PyTorch on the same GPU** (`bench_gpu.py`, medians in milliseconds; the
# ratio is ours / PyTorch, below 1 means ours is faster):
#
# - *Sinkhorn codes* ($B = 4096$, $K = 3000$): three iterations of a few element-wise
#   kernels; ours takes one and a half times PyTorch's time with the fused kernels and
#   nearly twice without, and both take about a millisecond, little next to a network step.
# - *the swapped loss, forward and backward*: ours computes each crop's log-softmax once and
#   the gradient in closed form; PyTorch's autograd of the official loop recomputes and
#   stores more.
# - *a ResNet-18 training step* (CIFAR layout, batch 256): PyTorch calls cuDNN's tuned
#   convolution kernels; ours are matrix products over unfolded windows that a reader can
#   follow, with the element-wise work around them fused (section below), and this is where
#   a teaching implementation pays. Newer results measure it twice, with true float32
#   products in both libraries and with TF32 tensor cores allowed in both (PyTorch's default
#   for convolutions), so that the ratio compares like with like.
# - *a full SwAV step* (ResNet-18, 2 crops of 32 and 6 of 16, augmentation on the GPU,
#   LARS), in images per second; newer results set the fused kernels against the plain
#   CuPy code.
#
# A file written before the fused kernels existed has the older, shorter set of rows. The
# check's probes (`bench_gpu_probes.json`) then time one ResNet-18 step by kind of
# operation, with CUDA events around each: the convolutions, their unfolding (im2col) and
# folding back (col2im), BatchNorm and the rest.

# %%
PROFILES = {"profile_ms": "fused kernels, float32", "profile_plain_ms": "plain CuPy code, float32",
            "profile_tf32_ms": "fused kernels, TF32"}
probes_file = results / "bench_gpu_probes.json"
profiles = {}  # where a ResNet step's time goes: in the probes' file
for path in (gpu_file, probes_file):
    if path.exists():
        for case in json.loads(path.read_text(encoding="utf-8"))["cases"].values():
            for key, label in PROFILES.items():
                if key in case:
                    profiles[label] = case[key]
if gpu_file.exists():
    gpu = json.loads(gpu_file.read_text(encoding="utf-8"))
    print(f"{gpu['machine']}, CuPy {gpu.get('cupy', '-')}, PyTorch {gpu['torch']}, {gpu['date']}: {gpu['command']}")
    cases = {}
    for case, values in gpu["cases"].items():
        values = {k: v for k, v in values.items() if k != "what" and k not in PROFILES}
        if "images_per_s" in values:  # the SwAV step: fused kernels against the plain code
            values["ours_images_per_s"] = values.pop("images_per_s")
        cases[case] = values
    table = pd.DataFrame.from_dict(cases, orient="index").rename(columns={
        "ours_ms": "ours (ms)", "torch_ms": "PyTorch (ms)", "peer_ms": "plain code (ms)", "ratio": "ours / peer",
        "ours_images_per_s": "ours (images/s)", "torch_images_per_s": "PyTorch (images/s)"})
    display(table.round(2))  # noqa: F821 (IPython's display)
else:
    print(f"{gpu_file} not found: run `bash benchmarks/gpu_check.sh` on a GPU machine")
if profiles:
    print("one ResNet-18 step by kind of operation, device ms (rows marked 'in ...' are inside that row):")
    display(pd.DataFrame(profiles).round(2))  # noqa: F821

# %% [markdown]
# **Reading the profile.** Three things stand out, and each is a question worth asking of
# any profile:
#
# - *Where is most of the time?* In the convolutions, forward and backward: the matrix
#   products, and the unfolding (im2col) and folding back (col2im) of the windows around
#   them. That is the cost of convolutions written as products a reader can follow, where
#   PyTorch calls cuDNN.
# - *What did switching precision change?* In the TF32 column only the convolutions'
#   matrix products shrink. im2col, col2im, BatchNorm and ReLU stay as they were: they move
#   data and do no products. BatchNorm's sums do not shrink either, though they are
#   matrix products too: each is a dot product that reads every value once, so memory,
#   not arithmetic, sets its time. TF32 can only help the step's arithmetic-bound share.
# - *Is any row doing more work than it must?* BatchNorm's per-channel sums of products are
#   batched matrix products, the fastest form on a CPU. On the H200 the check's probes
#   found `xp.sum(a * b, axis=1)` about twice as fast at those shapes. A choice made on
#   one machine needs measuring again on the next.
#
# *Exercise.* im2col writes every window of the input, about $K_H K_W$ values per input
# value (9 for a 3x3 convolution); col2im, its adjoint, reads as many and writes one value
# per input pixel. Compare their two rows in the table. Then read both kernels in
# `swav_ref/fused/kernels.cu` (`fused.KERNEL_SOURCE`): count the bytes each one reads and
# writes per thread, and say why col2im, which sums several windows' gradients into one
# pixel, needs no atomic additions.

# %% [markdown]
# ## What makes the same code fast on a GPU
#
# - **No host round trips inside a step.** The loss stays a 0-d device array; Python `if`s
#   on array values (each one a synchronisation) are kept out of the hot path; metrics come
#   back every `log_every` steps, together.
# - **Random numbers on the host, pixels on the device.** The crop boxes, flips and jitter
#   factors are a few hundred numbers per batch, drawn by NumPy and sent in one small array;
#   every pixel operation is an Array API call on the device.
# - **Bytes, not floats, cross the bus.** Images travel as `uint8` and become float on the
#   device.
# - **float32 everywhere**, with the one exception that Sinkhorn iterates in float64 when
#   $\varepsilon$ is so small that float32 would underflow. `--tf32` lets the matrix
#   products use TF32 tensor cores, as PyTorch's convolutions do by default.
# - **One pass where the formula allows it.** On a GPU each array operation is a kernel
#   launch that reads and writes whole arrays, so BatchNorm's
#   $y = \gamma (x - \mu) / \sigma + \beta$, written as four array operations, moves its data
#   four times. `swav_ref.fused` holds CUDA kernels that do such chains in one pass: im2col
#   and col2im as single gathers, BatchNorm's normalisation and input gradient, the ReLU
#   gradient, each optimiser update, and the normalisations of Sinkhorn. They run only on
#   CuPy; the plain array code stays the reference (the tests compare the two, and also run
#   the same CUDA source compiled for the CPU), and `SWAV_REF_FUSED=0` switches them off.
#   Here is one of them, the ReLU gradient, from the kernel source:

# %%
from swav_ref import fused  # noqa: E402

source = fused.KERNEL_SOURCE.read_text(encoding="utf-8")
start = source.index("template <typename T, typename I>\n__device__ void relu_backward")
display(Code(source[start : source.index("#define", start)], language="cuda"))  # noqa: F821
print(f"fused kernels enabled: {fused.enabled()}; used on this backend: {fused.applies(xp, xp.float32)}")

# %% [markdown]
# - **Fewer launches.** Each CuPy operation also costs the host several microseconds to
#   issue, however small its array, and that cost does not shrink with a faster GPU: before
#   the fused kernels, the H200 took 23 ms for a `resnet_tiny` step on 8x8 images, where it
#   had almost nothing to compute, against PyTorch's 3.7 ms; with them, 7.9 ms against
#   4.2 ms (the README's older ResNet table, 2026-11-29). `benchmarks/bench_launches.py`
#   counts the kernels a step launches, exactly and on any machine (it runs the step on a
#   NumPy array subclass that tallies every operation). The fused kernels cut a ResNet-18
#   step from about 1,600 launches to under 500:

# %%
launches_file = results / "bench_launches.json"
if launches_file.exists():
    launches = json.loads(launches_file.read_text(encoding="utf-8"))["cases"]
    counts = pd.DataFrame({name: {"plain code": c["plain"]["kernels"], "fused kernels": c["fused"]["kernels"]}
                           for name, c in launches.items()}).T
    display(counts.assign(**{"fused / plain": (counts["fused kernels"] / counts["plain code"]).round(2)}))  # noqa: F821
    print("where the fused ResNet-18 step still launches most:")
    for site in launches["resnet18_step"]["top_kernel_sites_fused"][:6]:
        print(f"  {site['count']:4d}  {site['what']:<28s} in {site['where']}")
else:
    print(f"{launches_file} not found: run `python benchmarks/bench_launches.py`")

# %% [markdown]
# Over several GPUs the same code runs data-parallel under MPI: `mpiexec -n 4 swav-ref
# train --backend cupy ...`. Each process takes the GPU of its rank on the machine
# (`swav_ref.backend.use_device_for_local_rank`, called by the trainer before it allocates
# anything), and CuPy arrays are passed to a CUDA-aware MPI directly or staged through host
# memory (page *Data-parallel training over MPI*).
