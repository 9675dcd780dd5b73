"""Online (SwAV) against offline (DeepCluster-v2) as the data set grows: memory and time per epoch.

SwAV computes its targets per batch: its state beyond the model is the queue (none in the
digits recipe), whatever the data set size N. DeepCluster-v2 keeps a memory bank of every
image's embedding (``n_assign_crops * N * d`` floats) plus one int64 target per image and
prototype set, and clusters the whole bank at the start of every epoch.

The training set is scikit-learn's digits (1438 training images) repeated 1x, 4x and 16x
with ``np.tile``: the repeats are the same images, the augmentation makes every pass
different, and only N matters here. Both methods use the same small configuration
(``resnet_tiny``, batch 128, and otherwise :class:`~swav_ref.config.TrainConfig`'s digits
recipe: its crops, 100 prototypes, a 128-d embedding; numpy, float32).

What is measured, per size and method:

- **time per step**: the median of ``--steps`` timed training steps (augmentation + forward
  + backward + LARS) after one warm-up step. A step does not depend on N, so the epoch time
  is extrapolated as ``steps_per_epoch * median step`` (we do not train whole epochs);
- **clustering time per epoch** (DeepCluster-v2 only): the trainer's real start-of-epoch
  pass (spherical k-means++, 10 Lloyd iterations, targets), measured at every size, median
  of 5 passes (2 with ``--quick``). The bank is filled with random unit vectors rather than
  by a forward pass over the whole set (which would cost minutes at 16x): k-means runs a
  fixed number of iterations, so its cost does not depend on the values. Steps and passes
  are timed in rounds over all cases, so that the shared machine's slow phases hit every
  case alike;
- **method state bytes**: ``MemoryBank.nbytes`` + the targets for DeepCluster-v2; the
  queue for SwAV (0 B in the digits recipe; a 1024-long queue is given for reference);
- **transient peak** (tracemalloc, untimed): the peak of host allocations during one training
  step and during one clustering pass, above what was already held.

Run::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_deepcluster_scaling.py [--quick] [--docs]

Writes benchmarks/results/bench_deepcluster_scaling.json and deepcluster_scaling.png (and
with ``--docs`` copies the figure to docs/_static/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from swav_ref.backend import Random
from swav_ref.data.datasets import ImageDataset, load_dataset
from swav_ref.deepcluster import MemoryBank
from swav_ref.nn.functional import l2_normalize_forward
from swav_ref.swav.queue import Queue
from swav_ref.train import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS_STATIC = HERE.parent / "docs" / "_static"
METHODS = ("swav", "deepcluster-v2")
REFERENCE_QUEUE_LENGTH = 1024


def repeated_digits(repeats: int) -> tuple[ImageDataset, ImageDataset]:
    """Digits' training split tiled ``repeats`` times (same images; augmentation differs)."""
    train, test = load_dataset("digits", seed=0)
    tiled = ImageDataset(images=np.tile(train.images, (repeats, 1, 1, 1)), labels=np.tile(train.labels, repeats),
                         class_names=train.class_names, name=f"digits/train x{repeats}")
    return tiled, test


def fill_memory_bank(trainer: Trainer) -> None:
    """Give the trainer a full memory bank of random unit vectors (see the module docstring)."""
    cfg, xp = trainer.config, trainer.xp
    size = trainer.steps_per_epoch * cfg.batch_size
    bank = MemoryBank(len(cfg.crops_for_assign), size, cfg.feat_dim, xp, trainer.dtype)
    raw = Random(1, xp).normal((len(cfg.crops_for_assign) * size, cfg.feat_dim), dtype=cfg.dtype)
    unit, _ = l2_normalize_forward(raw)
    bank.embeddings = xp.reshape(unit, (len(cfg.crops_for_assign), size, cfg.feat_dim))
    bank.index = trainer.epoch_order(0)[:size].copy()
    trainer.bank = bank


def one_step(trainer: Trainer, s: int) -> None:
    indices = trainer.batch_indices(0, s)
    loss, _ = trainer.train_step(trainer.make_crops(indices), indices)
    float(loss)  # wait for the result (a no-op sync on NumPy, needed on a GPU)


def prepare(method: str, repeats: int) -> tuple[Trainer, dict]:
    """A trainer for one method at one size, warmed up, with its memory measured; the steps
    and clustering passes are timed later, interleaved with the other cases."""
    train, test = repeated_digits(repeats)
    cfg = TrainConfig(method=method, epochs=1, batch_size=128, arch="resnet_tiny", progress=False,
                      log_every=10**9, out_dir=tempfile.mkdtemp(prefix="bench_dc_"))
    trainer = Trainer(cfg, train_set=train, test_set=test)
    trainer.model.train()
    row: dict = {"method": method, "repeats": repeats, "n_images": len(train),
                 "steps_per_epoch": trainer.steps_per_epoch, "dataset_bytes": int(train.images.nbytes)}
    if method == "deepcluster-v2":
        fill_memory_bank(trainer)
        cluster_pass(trainer)
        # Transient host memory of one clustering pass, untimed (tracemalloc slows allocations).
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        cluster_pass(trainer)
        row["peak_cluster_bytes"] = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        bank_bytes = trainer.bank.nbytes
        target_bytes = sum(int(t.nbytes) for t in trainer.targets)
        row.update(bank_bytes=bank_bytes, target_bytes=target_bytes, state_bytes=bank_bytes + target_bytes)
    else:
        queue_bytes = 0 if trainer.queue is None else int(trainer.queue.embeddings.nbytes)
        reference = Queue(len(cfg.crops_for_assign), REFERENCE_QUEUE_LENGTH, cfg.feat_dim, cfg.batch_size,
                          xp=trainer.xp, dtype=trainer.dtype)
        row.update(queue_bytes=queue_bytes, state_bytes=queue_bytes,
                   reference_queue_length=REFERENCE_QUEUE_LENGTH,
                   reference_queue_bytes=int(reference.embeddings.nbytes))
    one_step(trainer, 0)  # warm-up
    return trainer, row


def cluster_pass(trainer: Trainer) -> float:
    """Seconds of the trainer's own start-of-epoch clustering pass (k-means, targets, prototypes)."""
    step = trainer.step
    trainer.step = 0  # the pass runs at epoch boundaries only
    t0 = time.perf_counter()
    trainer._start_epoch(0)
    float(trainer.xp.sum(trainer.targets[0]))  # wait for the result (a sync on a GPU)
    seconds = time.perf_counter() - t0
    trainer.step = step
    return seconds


def measure_scaling(repeats=(1, 4, 16), steps: int = 6, cluster_repeats: int = 3, log=print) -> dict:
    """Every method at every size; the result dict written to the JSON file.

    Steps and clustering passes are timed in rounds (one of every case per round), so that
    the shared machine's slow phases hit every case alike.
    """
    cases = [prepare(method, r) for r in repeats for method in METHODS]
    times: list[list[float]] = [[] for _ in cases]
    cluster_times: list[list[float]] = [[] for _ in cases]
    for s in range(1, max(steps, cluster_repeats) + 1):
        for (trainer, row), case_times, case_cluster in zip(cases, times, cluster_times):
            if s <= steps:
                t0 = time.perf_counter()
                one_step(trainer, s % trainer.steps_per_epoch)
                case_times.append(time.perf_counter() - t0)
            if row["method"] == "deepcluster-v2" and s <= cluster_repeats:
                case_cluster.append(cluster_pass(trainer))
    rows = []
    for (trainer, row), case_times, case_cluster in zip(cases, times, cluster_times):
        row.update(step_s=statistics.median(case_times), step_s_all=case_times,
                   cluster_s=statistics.median(case_cluster) if case_cluster else 0.0, cluster_s_all=case_cluster)
        row["epoch_s"] = trainer.steps_per_epoch * row["step_s"] + row["cluster_s"]
        # Transient host memory of one step, untimed.
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        one_step(trainer, (steps + 1) % trainer.steps_per_epoch)
        row["peak_step_bytes"] = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        shutil.rmtree(trainer.config.out_dir, ignore_errors=True)
        log(f"{row['method']:15s} x{row['repeats']:<3d} N={row['n_images']:6d}  step {1e3 * row['step_s']:7.1f} ms  "
            f"cluster {1e3 * row['cluster_s']:7.1f} ms  epoch {row['epoch_s']:7.2f} s  "
            f"state {row['state_bytes'] / 2**20:7.3f} MiB")
        rows.append(row)
    largest = max(repeats)
    recipe = cases[0][0].config  # the settings every case ran with (TrainConfig's defaults)
    by = {(r["method"], r["repeats"]): r for r in rows}
    swav, dc = by[("swav", largest)], by[("deepcluster-v2", largest)]
    return {
        "benchmark": "bench_deepcluster_scaling",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} ({_cpu_count()} cores)",
        "command": "python benchmarks/bench_deepcluster_scaling.py"
                   + ("" if tuple(repeats) == (1, 4, 16) else " --quick"),
        "numpy": np.__version__,
        "settings": {
            "dataset": "digits train split tiled with np.tile", "repeats": list(repeats), "arch": "resnet_tiny",
            "batch_size": 128, "n_prototypes": list(recipe.n_prototypes), "feat_dim": recipe.feat_dim,
            "crops": " + ".join(f"{n}x{size}" for n, size in zip(recipe.n_crops, recipe.crop_sizes)),
            "backend": "numpy", "dtype": "float32",
            "timed_steps": steps, "cluster_repeats": cluster_repeats, "statistic": "median",
        },
        "epoch_time": "extrapolated: steps_per_epoch x median step time, plus the clustering pass measured at "
                      "every size (not whole epochs trained)",
        "memory_bank": "random unit vectors (k-means cost does not depend on the values: fixed iterations)",
        "results": rows,
        "summary": {
            "n_images": swav["n_images"],
            "swav_epoch_s": swav["epoch_s"], "deepcluster_epoch_s": dc["epoch_s"],
            "epoch_ratio_swav_over_deepcluster": swav["epoch_s"] / dc["epoch_s"],
            "swav_state_bytes": swav["state_bytes"], "deepcluster_state_bytes": dc["state_bytes"],
            "deepcluster_cluster_fraction_of_epoch": dc["cluster_s"] / dc["epoch_s"],
        },
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def scaling_figure(result: dict):
    """Two log-log panels: method state (bytes) and time per epoch against N."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    rows = result["results"]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_mem, ax_time = fig.subplots(1, 2)
    dc = [r for r in rows if r["method"] == "deepcluster-v2"]
    sw = [r for r in rows if r["method"] == "swav"]
    n_dc, n_sw = [r["n_images"] for r in dc], [r["n_images"] for r in sw]
    ax_mem.loglog(n_dc, [r["state_bytes"] for r in dc], "o-", c="C1", label="DeepCluster-v2: bank + targets")
    ax_mem.loglog(n_sw, [r["reference_queue_bytes"] for r in sw], "s-", c="C0",
                  label=f"SwAV: queue of {sw[0]['reference_queue_length']} (none in the digits recipe: 0 B)")
    ax_mem.loglog(n_dc, [r["dataset_bytes"] for r in dc], ":", c="grey", label="the uint8 images themselves")
    ax_mem.set(xlabel="training images N", ylabel="bytes held beyond the model",
               title="memory: offline grows with N, online does not")
    ax_mem.legend(fontsize=7, loc="upper left")
    ax_time.loglog(n_sw, [r["epoch_s"] for r in sw], "s-", c="C0", label="SwAV epoch")
    ax_time.loglog(n_dc, [r["epoch_s"] for r in dc], "o-", c="C1", label="DeepCluster-v2 epoch")
    ax_time.loglog(n_dc, [max(r["cluster_s"], 1e-6) for r in dc], "o--", c="C1", alpha=0.6,
                   label="DeepCluster-v2: of which the clustering pass")
    ax_time.set(xlabel="training images N", ylabel="seconds per epoch", title="time per epoch")
    ax_time.legend(fontsize=7, loc="upper left")
    for ax in (ax_mem, ax_time):
        ax.set_xticks(n_dc, labels=[f"{n:,}" for n in n_dc])
        ax.xaxis.set_minor_formatter(NullFormatter())
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 1x and 4x, 2 timed steps")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per case (default 6; quick 2)")
    p.add_argument("--docs", action="store_true", help="also copy the figure to docs/_static/")
    p.add_argument("--out", default=str(RESULTS / "bench_deepcluster_scaling.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the figure from the JSON file")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        write_figure(json.loads(out.read_text(encoding="utf-8")), out, args.docs)
        return 0
    repeats = (1, 4) if args.quick else (1, 4, 16)
    steps = args.steps or (2 if args.quick else 6)
    t0 = time.perf_counter()
    result = measure_scaling(repeats, steps=steps, cluster_repeats=5 if not args.quick else 2)
    result["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    write_figure(result, out, args.docs)
    print(json.dumps(result, indent=2))
    return 0


def write_figure(result: dict, out: Path, docs: bool) -> None:
    """deepcluster_scaling.png next to the JSON file (and into docs/_static/ with ``docs``)."""
    figure = out.with_name("deepcluster_scaling.png")
    scaling_figure(result).savefig(figure, dpi=110)
    if docs:
        DOCS_STATIC.mkdir(parents=True, exist_ok=True)
        shutil.copy2(figure, DOCS_STATIC / figure.name)


if __name__ == "__main__":
    sys.exit(main())
