"""Experiments: train the methods, evaluate them against honest baselines, tabulate.

The evaluation table has one row per method and three columns (top-1 on the test split):
a linear probe on standardised frozen backbone features (regularisation chosen by
cross-validation on the *training* split) and a weighted kNN with k = 20 and k = 200.

Rows:

``raw pixels``
    the images themselves, no network;
``random init``
    the same network, untrained (what the architecture gives for free);
``supervised``
    the same network trained with labels (cross-entropy on the large crops, same
    optimiser, schedule and epochs), the target SwAV tries to reach;
``SwAV``
    trained without labels;
``DeepCluster-v2``
    trained without labels, offline clustering.

Used by ``swav-ref demo``, ``swav-ref eval`` and notebook 05. Several seeds give mean and
standard deviation per row.
"""

from __future__ import annotations

import dataclasses
import numbers
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swav_ref import plots
from swav_ref.backend import to_numpy
from swav_ref.data.datasets import load_dataset
from swav_ref.evaluate import KNNResult, LinearProbeResult, evaluate_features, raw_pixel_features
from swav_ref.results import results_table, save_results_json
from swav_ref.swav.head import normalize_prototypes
from swav_ref.train import ReusedOutDirWarning, TrainConfig, Trainer

METHOD_NAMES = {"swav": "SwAV", "deepcluster-v2": "DeepCluster-v2", "supervised": "supervised"}


Results = dict[str, LinearProbeResult | KNNResult]


def check_evaluable(train: Any, test: Any) -> None:
    """Raise ValueError, saying why, unless the linear probe and kNN can score these splits:
    both labelled and not empty, at least 2 classes, and at least 2 training images of every
    class (the probe chooses its regularisation by stratified cross-validation). Cheap: call
    it before training, so a run does not fail only at its evaluation."""
    for split in (train, test):
        if split is None or not split.has_labels:
            name = "the test split" if split is None else split.name
            raise ValueError(f"evaluation needs labelled train and test splits, but {name} has no labels "
                             "(e.g. a flat image folder); put the images in one sub-folder per class")
    if len(test) == 0:
        raise ValueError(f"{test.name} is empty: the split holds out a fraction of each class, rounded, which is "
                         "no image for a class of 2 or fewer images: add images")
    classes, counts = np.unique(train.labels, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"{train.name} has {classes.size} class ({', '.join(train.class_names) or 'unnamed'}); "
                         "a classifier needs 2 or more (one sub-folder per class, not one folder for all)")
    if counts.min() < 2:
        rare = classes[counts < 2]
        names = [train.class_names[int(c)] if int(c) < len(train.class_names) else str(int(c)) for c in rare]
        raise ValueError(f"{train.name}: class {', '.join(names)} has a single training image; the linear probe's "
                         "cross-validation needs 2 or more per class")


def _labelled_splits(trainer: Trainer):
    """The trainer's ``(train, test)`` splits, checked by :func:`check_evaluable`."""
    train, test = trainer.train_set, trainer.test_set
    check_evaluable(train, test)
    return train, test


def evaluate_trainer(trainer: Trainer, seed: int = 0) -> Results:
    """Linear probe and kNN of the trainer's backbone (frozen, eval mode).

    Returns ``{metric: result}``: ``float(result)`` is the accuracy, and a :class:`~swav_ref.evaluate.KNNResult`
    also holds the k actually used, which :func:`~swav_ref.results.results_table` reports when it was clipped.
    """
    train, test = _labelled_splits(trainer)
    return evaluate_features(trainer.features(train.images), train.labels,
                             trainer.features(test.images), test.labels, seed=seed)


def evaluate_raw_pixels(trainer: Trainer, seed: int = 0) -> Results:
    """The raw-pixel baseline on the same splits, as :func:`evaluate_trainer` returns it."""
    train, test = _labelled_splits(trainer)
    return evaluate_features(raw_pixel_features(train.images), train.labels,
                             raw_pixel_features(test.images), test.labels, seed=seed)


def check_comparison(config: TrainConfig, seeds: Sequence[int], methods: Sequence[str]) -> None:
    """Raise ValueError, saying why, for a comparison that would mislead or fail late: a
    seed or a method given twice (the same run counted twice, a spread of ± 0.0 that looks
    like agreement between seeds, and one run's folder overwritten by the other), no seed,
    a seed that is not a whole number >= 0 (which TrainConfig would refuse only after the
    seeds before it had trained every method, leaving no results.json), "supervised" among
    the methods (it is the baseline every comparison trains already, into the same
    folder: it would be trained twice and counted as two seeds), or a setting that one of
    the methods refuses (SwAV: several prototype sets). All of it before anything trains."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, np.ndarray)):
        raise ValueError(f"seeds must be a list of whole numbers, e.g. [0, 1, 2]; got {seeds!r}")
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence):
        raise ValueError(f"methods must be a list of method names, e.g. ['swav']; got {methods!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given: a comparison needs at least one")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:  # np.bool_ is no Integral
            raise ValueError(f"seed {seed!r}: each seed must be a whole number >= 0 (it seeds the random "
                             "generators and names the seed<N> folder)")
    if "supervised" in methods:
        raise ValueError("method supervised: the supervised baseline is trained in every comparison already "
                         f"(seed<N>/supervised); give the self-supervised methods only "
                         f"({', '.join(m for m in METHOD_NAMES if m != 'supervised')})")
    for name, given in (("seed", list(seeds)), ("method", list(methods))):
        twice = sorted({str(v) for v in given if given.count(v) > 1})
        if twice:
            raise ValueError(f"{name} {', '.join(twice)} given twice: each {name} counts once in the "
                             f"table's mean ± std, so give distinct {name}s")
    for method in methods:  # each method's own checks (SwAV: one prototype set), before any training
        dataclasses.replace(config, method=method)


def run_comparison(config: TrainConfig, seeds: Sequence[int] = (0,),
                   methods: Sequence[str] = ("swav",), out_dir: str | Path = "swav_out",
                   log: Any = print) -> tuple[Any, dict]:
    """Train and evaluate every method (and the baselines) for every seed.

    Returns the results table (pandas, accuracies in [0, 1], mean and std over seeds) and
    a dict of run artefacts: the trainers of the last seed by method, and timings.
    Writes ``results.json`` (per-seed values; ``metadata.k_used`` as in the table's
    ``attrs["k_used"]``) and figures into ``out_dir``, and ``seed<N>/<method>/`` for each
    trained method. The untrained "random init" trainer writes nothing, so it gets no folder.

    Rerun into the same ``out_dir``, a comparison replaces the earlier one's runs: one
    :class:`~swav_ref.train.ReusedOutDirWarning` names the runs it replaces (in place of
    one per trained model, each of which is a fresh run into a folder that holds a
    checkpoint).
    """
    check_comparison(config, seeds, methods)
    seeds = [int(seed) for seed in seeds]  # NumPy integers too, for the folder names and results.json
    out = Path(out_dir)
    earlier = [path.parent.relative_to(out).as_posix() for seed in seeds for method in (*methods, "supervised")
               if (path := out / f"seed{seed}" / method / "checkpoint.npz").exists()]
    if earlier:
        warnings.warn(ReusedOutDirWarning(
            f"{out} holds the runs of an earlier comparison ({', '.join(earlier)}); this comparison replaces them, "
            "and results.json and the figures; choose another output folder (--out) to keep them"), stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list]] = {}
    artefacts: dict[str, Any] = {"trainers": {}, "seconds": {}}

    def add(method: str, metrics: Results) -> None:
        for name, value in metrics.items():
            rows.setdefault(method, {}).setdefault(name, []).append(value)

    # One copy of the data for every run (each Trainer would otherwise read it again).
    train_set, test_set = load_dataset(config.dataset, config.data_dir, image_size=config.image_size or None,
                                       image_fit=config.image_fit, seed=0)
    config = config.with_crop_recipe(min(train_set.images.shape[-2:]), train_set.name)  # supervised_config needs them
    for seed in seeds:
        base = dataclasses.replace(config, seed=seed)
        # A Trainer creates its out_dir; the untrained baseline never writes there, so a
        # scratch folder keeps an empty seed<N>/untrained/ out of the results.
        with tempfile.TemporaryDirectory(prefix="swav_ref_untrained_") as scratch:
            untrained = Trainer(dataclasses.replace(base, out_dir=scratch, progress=False),
                                train_set=train_set, test_set=test_set)
            add("raw pixels", evaluate_raw_pixels(untrained, seed))
            add("random init", evaluate_trainer(untrained, seed))
        artefacts["trainers"]["random init"] = untrained
        for method in (*methods, "supervised"):
            t0 = time.perf_counter()
            cfg = dataclasses.replace(base, method=method, out_dir=str(out / f"seed{seed}" / method))
            if method == "supervised":
                cfg = supervised_config(cfg)
            epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
            log(f"[seed {seed}] training {METHOD_NAMES[method]} for {epochs} ...")
            trainer = Trainer(cfg, train_set=train_set, test_set=test_set)
            with warnings.catch_warnings():  # said once for the whole comparison, above
                warnings.simplefilter("ignore", ReusedOutDirWarning)
                trainer.fit()
            add(METHOD_NAMES[method], evaluate_trainer(trainer, seed))
            artefacts["trainers"][method] = trainer
            artefacts["seconds"].setdefault(method, []).append(time.perf_counter() - t0)
    table = results_table([{"method": m, **v} for m, v in rows.items()])
    # the settings as trained: the recipe's prototype freeze filled in (as by the first method's trainer)
    first = artefacts["trainers"].get(methods[0]) if methods else None
    trained = config if first is None else dataclasses.replace(
        config, freeze_prototypes_niters=first.config.freeze_prototypes_niters)
    save_results_json(out / "results.json", [{"method": m, **v} for m, v in rows.items()],
                      metadata={"config": trained.to_dict(), "seeds": list(seeds), "methods": list(methods),
                                "train_images": len(train_set), "test_images": len(test_set),
                                "seconds": artefacts["seconds"], "k_used": table.attrs["k_used"]})
    write_figures(artefacts["trainers"], out)
    return table, artefacts


def supervised_config(config: TrainConfig, image_side: int | None = None) -> TrainConfig:
    """The supervised baseline's recipe: the same network, optimiser, schedule and large
    crops, without the small crops (label prediction needs no multi-crop, and it halves
    the baseline's cost). Crops left to the data set's recipe are filled in first
    (:meth:`~swav_ref.config.TrainConfig.with_crop_recipe`; a folder without ``image_size``, or arrays, need
    ``image_side``, the images' shorter side)."""
    config = config.with_crop_recipe(image_side)
    return dataclasses.replace(
        config, method="supervised", n_crops=config.n_crops[:1], crop_sizes=config.crop_sizes[:1],
        min_scale=config.min_scale[:1], max_scale=config.max_scale[:1],
    )


def write_figures(trainers: dict[str, Trainer], out: Path) -> list[Path]:
    """Training curves of each trained method, the crops, and images grouped by prototype."""
    written = []
    for method, trainer in trainers.items():
        if method == "random init":  # never trained: no curves
            continue
        steps = trainer.log.steps()
        if steps:
            fig = plots.training_curves(steps, trainer.config.n_prototypes[0] if method != "supervised" else None)
            path = out / f"training_curves_{method}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    swav = trainers.get("swav")
    if swav is not None:
        from swav_ref.backend import Random
        from swav_ref.data.multicrop import show_crops

        fig = show_crops(swav.train_set.images[:4], swav.multicrop, Random(0, swav.xp), n_images=4)
        fig.savefig(out / "crops.png", dpi=110)
        written.append(out / "crops.png")
        assignments = prototype_assignments(swav, swav.test_set.images)
        fig = plots.prototype_gallery(swav.test_set.images, np.asarray(assignments), n_prototypes=10, per_prototype=12)
        fig.savefig(out / "prototypes.png", dpi=110)
        written.append(out / "prototypes.png")
    return written


def prototype_assignments(trainer: Trainer, images: Any) -> Any:
    """The most similar prototype of each image (eval mode, first prototype set), on the host.

    Similar by cosine: the prototypes are unit vectors at the start of each training step,
    but the last step's update has moved them off the sphere, so they are re-normalised
    here, in a copy (the model itself is left as it is)."""
    xp = trainer.xp
    model = trainer.model
    was_training = model.backbone.training
    model.eval()
    try:
        feats = trainer.features(images)
        embedding, _ = model.head.forward(feats)  # (N, d), unit rows
        prototypes = normalize_prototypes(model.head.prototype_weight(0))  # (K, d), unit rows
        return to_numpy(xp.argmax(embedding @ prototypes.T, axis=1))
    finally:
        if was_training:
            model.train()
