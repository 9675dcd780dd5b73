"""The trainer: SwAV (and DeepCluster-v2, and the supervised baseline) on one code path.

One training step, as in the official ``main_swav.py``::

    re-normalise the prototypes
    crops (xp) -> ResNet per crop-size group -> head -> L2 normalise -> prototypes -> scores
    codes of the assignment crops (Sinkhorn; the queue's scores join once it is full)
    swapped loss and d loss / d scores -> backward through head and ResNet
    drop the prototypes' gradient while they are frozen -> average gradients over workers
    LARS (or SGD) step at the scheduled learning rate

The three methods share the model, the data, the augmentation, the optimiser, the
schedule, the checkpoints and the logs; only the targets differ:

``swav``            codes from the batch itself, by Sinkhorn (online);
``deepcluster-v2``  hard clusters of last epoch's memory bank, by k-means (offline);
``supervised``      the labels (the upper baseline of the evaluation table).

Nothing leaves the device inside a step: the loss stays a 0-d array, and every
``log_every`` steps the metrics are brought to the host, logged (JSON lines), shown on the
progress bar and checked for NaN and collapse.

A run's settings are :class:`~swav_ref.config.TrainConfig`; saving and resuming the
trainer are :mod:`swav_ref.resume`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swav_ref.backend import Random, get_backend, set_tf32, to_numpy, use_device_for_local_rank
from swav_ref.checkpoint import write_atomically
from swav_ref.config import CHOICES, METHODS, ConfigError, TrainConfig, recipe_name, scheduled_rate
from swav_ref.data.datasets import ARRAYS, ImageDataset, channel_stats, load_dataset
from swav_ref.data.multicrop import MultiCrop, MultiCropConfig, default_config
from swav_ref.deepcluster import MemoryBank, cluster_memory, deepcluster_loss
from swav_ref.distributed import get_communicator, install_abort_on_exception
from swav_ref.nn import functional as F
from swav_ref.nn.optim import LARS, SGD
from swav_ref.nn.resnet import resnet18, resnet_tiny
from swav_ref.resume import DIVERGENCE_ADVICE, Resumable, TrainingDivergedError, load_trainer_checkpoint
from swav_ref.swav.diagnostics import CollapseMonitor, code_usage
from swav_ref.swav.head import ClassifierHead, SwAVHead, prototypes_frozen
from swav_ref.swav.loss import swav_loss
from swav_ref.swav.queue import Queue, queue_length_per_worker

# The names a user of the trainer needs, importable from here: the configuration and its
# errors are defined in swav_ref.config, the checkpoints' side in swav_ref.resume.
__all__ = ["ARCHITECTURES", "CHOICES", "METHODS", "ConfigError", "MetricsLog", "ReusedOutDirWarning", "SwAVModel",
           "TrainConfig", "Trainer", "TrainingDivergedError", "build_backbone", "crop_groups", "input_normalisation",
           "load_trainer_checkpoint", "scheduled_rate", "set_batchnorm_allreduce"]


#: Names that were defined here before this module was split, and where they are now.
_MOVED = {**dict.fromkeys(("CROP_FIELDS", "as_options", "option_text"), "swav_ref.config"),
          **dict.fromkeys(("CHECKPOINT_FORMAT", "RESUME_MAY_CHANGE", "data_record", "trained_on_same"),
                          "swav_ref.resume")}


def __getattr__(name: str) -> Any:
    """The names of ``_MOVED`` still import from here, with a DeprecationWarning that says
    where they are now, so that code written for earlier versions keeps running."""
    if name in _MOVED:
        import importlib

        warnings.warn(f"swav_ref.train.{name} is now {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Backbones by name (``--arch``).
ARCHITECTURES = {"resnet_tiny": resnet_tiny, "resnet18": resnet18}


def build_backbone(arch: str, in_channels: int, xp: Any, dtype: Any, rng: Random) -> Any:
    """A ResNet preset by name, initialised from ``rng``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[arch](in_channels=in_channels, xp=xp, dtype=dtype, rng=rng)


def set_batchnorm_allreduce(module: Any, allreduce: Any) -> None:
    """Make every BatchNorm in ``module`` synchronised over workers (``--sync-bn``)."""
    for _, m in module.named_modules():
        if hasattr(m, "allreduce"):
            m.allreduce = allreduce


class ReusedOutDirWarning(UserWarning):
    """A fresh run writes into an ``out_dir`` that holds the checkpoint of an earlier run,
    which it replaces (:meth:`Trainer.fit`). A category of its own, so that a caller that
    replaces runs on purpose (:func:`swav_ref.experiment.run_comparison`, which warns once
    for the whole comparison) can silence it alone."""


def input_normalisation(train_set: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The training images' per-channel mean and std, for the crops' normalisation. A
    channel that is constant over the whole set (a red-only stain saved as RGB, blank
    images) has std 0: it is centred but not scaled (std 1), with a warning."""
    mean, std = channel_stats(train_set.images)
    constant = [c for c, s in enumerate(std) if s == 0.0]
    if constant:
        warnings.warn(f"{train_set.name}: channel {', '.join(map(str, constant))} is the same in every training "
                      "image (standard deviation 0); it is centred but not scaled", stacklevel=3)
    return mean, tuple(s if s > 0.0 else 1.0 for s in std)


class SwAVModel:
    """Backbone (a ResNet that knows nothing of SwAV) and head (MLP, L2 norm, prototypes)."""

    def __init__(self, backbone: Any, head: Any):
        self.backbone, self.head = backbone, head

    def modules(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "head": self.head}

    def train(self) -> None:
        self.backbone.train(), self.head.train()

    def eval(self) -> None:
        self.backbone.eval(), self.head.eval()

    def zero_grad(self) -> None:
        self.backbone.zero_grad(), self.head.zero_grad()

    def named_parameters(self):
        for prefix, module in self.modules().items():
            for name, owner, key in module.named_parameters():
                yield f"{prefix}.{name}", owner, key

    def state_dict(self) -> dict[str, Any]:
        return {f"{p}.{k}": v for p, m in self.modules().items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for prefix, module in self.modules().items():
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})


def crop_groups(crops: Sequence[Any]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: runs of consecutive crops of the same size.

    The official code concatenates crops of one resolution and runs them through the
    backbone together, so BatchNorm sees one set of statistics per size.
    """
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or tuple(crops[i].shape[2:]) != tuple(crops[start].shape[2:]):
            groups.append((start, i))
            start = i
    return groups


class MetricsLog:
    """JSON lines, one record per logged step and one per epoch (``kind`` tells which).

    The file holds one run: :meth:`Trainer.fit` calls :meth:`restart` first, then each
    :meth:`write` appends a line.

    Attributes
    ----------
    path : pathlib.Path or None
        the ``.jsonl`` file; ``None`` keeps the records in memory only.
    records : list of dict
        every record of the run so far, in the order written.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.records: list[dict] = []

    def restart(self) -> None:
        """Rewrite the file with :attr:`records` alone: none for a fresh run (a reused
        ``--out-dir`` would otherwise hold two runs), a checkpoint's for a resumed one (so
        whatever was logged after that checkpoint, before an interruption, is dropped
        rather than logged twice)."""
        if self.path is not None:
            # UTF-8 and "\n" on every OS: the same bytes from a run on Windows
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8", newline="\n")

    def write(self, record: dict) -> None:
        """Append ``record`` to :attr:`records` and, as one JSON line, to the file."""
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8", newline="\n") as f:
                f.write(json.dumps(record) + "\n")

    def steps(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "step"]

    def epochs(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "epoch"]


class Trainer(Resumable):
    """Trains one model with one method; see the module docstring. Its checkpoints
    (:meth:`save`, :meth:`load`) are the :class:`~swav_ref.resume.Resumable` half.

    Parameters
    ----------
    config : TrainConfig
        (a dict is refused with a TypeError: ``TrainConfig.from_dict(d)`` makes one).
    comm
        a communicator (:mod:`swav_ref.distributed`); default: MPI when launched under
        ``mpiexec``, else a single process.
    train_set, test_set
        override the datasets named in ``config`` (tests, notebooks).
        Each must be an :class:`~swav_ref.data.datasets.ImageDataset` (TypeError otherwise:
        wrap arrays as ``ImageDataset(images, labels)``), and the test images must have the
        training images' channels and size (ConfigError otherwise, at construction: the
        evaluation runs the trained network on them, and images of another size would
        score the model on what it never saw). A ``test_set`` given alone replaces the
        loaded data set's test split.

    Attributes
    ----------
    config
        the configuration, with the data set's recipe filled in (crops, freeze).
    model : :class:`~swav_ref.train.SwAVModel`
        ``model.backbone`` (the ResNet, whose features are
        evaluated) and ``model.head`` (projection and prototypes, or the classifier).
    optimizer : :class:`~swav_ref.nn.optim.LARS` or :class:`~swav_ref.nn.optim.SGD`.
    train_set, test_set
        the :class:`~swav_ref.data.datasets.ImageDataset` s trained
        and evaluated on (``test_set`` may be None).
    mean, std
        per-channel input normalisation, from the training images.
    xp, dtype
        the backend namespace and floating type.
    step, total_steps, steps_per_epoch
        steps done, steps of the whole run, per epoch.
    log : :class:`~swav_ref.train.MetricsLog`
        the metrics written so far (``log.steps()``, ``log.epochs()``).
    on_epoch_end : callable or None
        called on rank 0 with each epoch's record once it is logged (a dict: ``epoch``,
        ``step``, ``loss``, ``seconds`` and ``images``, the images this run trained on in
        that epoch); ``swav-ref train`` prints a line from it. None (the default): nothing.
    queue, bank
        the SwAV queue and the DeepCluster-v2 memory bank, when in use.

    Notes
    -----
    :meth:`~swav_ref.train.Trainer.fit` trains; :meth:`~swav_ref.train.Trainer.features` gives the backbone's features of new images;
    :func:`swav_ref.experiment.evaluate_trainer` scores them by linear probe and kNN
    against the test split (what ``swav-ref train`` prints).
    """

    def __init__(self, config: TrainConfig, comm: Any = None, train_set: ImageDataset | None = None,
                 test_set: ImageDataset | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer(config): config must be a TrainConfig, got {type(config).__name__}; "
                            "make one with TrainConfig(**settings) or TrainConfig.from_dict(settings)")
        for name, data in (("train_set", train_set), ("test_set", test_set)):
            if data is not None and not isinstance(data, ImageDataset):
                raise TypeError(f"Trainer({name}=...): must be an ImageDataset, got {type(data).__name__}; wrap "
                                "the arrays as ImageDataset(images, labels) (uint8 images, N x C x H x W)")
        self.config = cfg = config
        if comm is None:  # launched under mpiexec: one rank's error must end the job, not hang the others
            comm = get_communicator()
            install_abort_on_exception(comm)
        self.comm = comm
        self.xp = get_backend(cfg.backend)
        self.device = use_device_for_local_rank(self.xp, self.comm.local_rank, self.comm.local_size)
        self.dtype = getattr(self.xp, cfg.dtype)
        set_tf32(self.xp, cfg.tf32)
        if train_set is None and cfg.dataset == ARRAYS:
            raise ConfigError("dataset 'arrays': hand the images to the trainer, "
                              "Trainer(config, train_set=ImageDataset(images, labels))")
        if train_set is None:
            train_set, loaded_test = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size or None,
                                                  image_fit=cfg.image_fit, seed=0)
            test_set = loaded_test if test_set is None else test_set
        self.train_set, self.test_set = train_set, test_set
        self._fingerprint: str | None = None  # of the training data, see data_fingerprint
        self._check_test_set()
        self.mean, self.std = input_normalisation(train_set)
        if self.comm.size > 1:
            self._check_same_data()
        self.steps_per_epoch = len(train_set) // (cfg.batch_size * self.comm.size)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its data order), see epoch_order
        self._last_epoch = cfg.epochs - 1  # set by fit (--stop-after)
        self.config = cfg = self._with_recipe(config)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self._check_fits_the_data()
        self.model = self._build_model()
        self.optimizer = self._build_optimizer()
        self.multicrop = MultiCrop(self._multicrop_config(), self.xp, self.dtype)
        self.step = 0
        self.queue: Queue | None = None
        self.bank: MemoryBank | None = None
        self.targets: list[Any] | None = None
        self.monitor = CollapseMonitor(cfg.n_prototypes[0])
        out = Path(cfg.out_dir)
        if self.comm.is_root:
            out.mkdir(parents=True, exist_ok=True)
        self.out_dir = out
        self.log = MetricsLog(out / "metrics.jsonl" if self.comm.is_root else None)
        self.on_epoch_end: Callable[[dict], Any] | None = None
        self._pending: list[tuple[int, Any, Any]] = []  # (step, loss, codes) awaiting the log
        # The checkpoint that holds this run's last good state: the last one it wrote
        # (save), or the one it resumed from (load); None until then. A checkpoint.npz in
        # out_dir that is not this one belongs to an earlier run (see fit).
        self._checkpoint: Path | None = None
        if self.comm.size > 1:
            self._broadcast_parameters()

    # -- construction ----------------------------------------------------------------
    def _check_test_set(self) -> None:
        """The test images must be of the training images' channels and size: the probe
        and kNN run the trained network on them (3 channels on a 1-channel network fail
        only at the evaluation, after the training; another size runs, since the network
        pools globally, but scores the model on a scale it never saw)."""
        train, test = self.train_set, self.test_set
        if test is None:
            return
        if test.n_channels != train.n_channels or test.image_shape != train.image_shape:
            def shape(d: ImageDataset) -> str:
                return f"{d.n_channels} channel(s) of {d.image_shape[0]}x{d.image_shape[1]}"

            raise ConfigError(f"test_set {test.name!r}: images of {shape(test)}, but the training set ({train.name!r}) "
                              f"has {shape(train)}; the evaluation runs the trained network on the test images, "
                              "which need the training images' channels and size")

    def _check_same_data(self) -> None:
        """Every worker must have the same settings and have loaded the same data set (each
        reads its own copy, say a node-local one): else the steps per epoch differ, and a
        collective fails or hangs, or the workers' shares overlap, or they train on in
        silence with different recipes. Compared with rank 0's: the settings (but for each
        worker's own paths and progress bar), first, since some of them change the data;
        then the number of images and their pixel sum; then a digest of the images in order
        and of their labels (:meth:`data_fingerprint`)."""
        from swav_ref.config import as_options  # (here: swav_ref.train.as_options is a moved name)

        mine = {"data": self.data_fingerprint(), "config": self.config.to_dict()}
        for own in ("data_dir", "out_dir", "progress"):  # a worker's own copy; only rank 0 writes and shows
            mine["config"].pop(own)
        root = self.comm.broadcast_object(mine)
        differ = {name: value for name, value in mine["config"].items() if root["config"].get(name) != value}
        if differ:
            theirs = {name: root["config"].get(name) for name in differ}
            raise ConfigError(f"rank {self.comm.rank} was started with {as_options(differ)}, rank 0 with "
                              f"{as_options(theirs)}; every worker needs the same settings")
        images = self.train_set.images
        counts = np.asarray([len(self.train_set), int(images.sum(dtype=np.uint64)) % 2**52], dtype=np.float64)
        low, high = -self.comm.allreduce_max(-counts), self.comm.allreduce_max(counts)
        if not np.array_equal(low, high):
            what = (f"the same {int(low[0])} images, but other pixels" if low[0] == high[0]
                    else f"between {int(low[0])} and {int(high[0])} images")
            raise ConfigError(f"{self.train_set.name}: the workers loaded different training data ({what}); every "
                              "worker needs the same data set, e.g. one copy on a shared file system")
        if root["data"] != mine["data"]:
            raise ConfigError(f"{self.train_set.name}: rank {self.comm.rank} loaded the training images in another "
                              "order, or with other labels, than rank 0; every worker needs the same data set")

    def _with_recipe(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the data set's recipe filled in where it says ``None``: the crops
        (:meth:`~swav_ref.config.TrainConfig.with_crop_recipe`) and the prototype freeze, the steps of the
        first epoch (two on digits, whose epoch is 11 steps)."""
        config = config.with_crop_recipe(min(self.train_set.images.shape[-2:]), self.train_set.name)
        if config.freeze_prototypes_niters is None:
            epochs = 2 if config.dataset == "digits" else 1
            config = dataclasses.replace(config, freeze_prototypes_niters=epochs * max(self.steps_per_epoch, 1))
        return config

    def _check_fits_the_data(self) -> None:
        """The settings that depend on the data set and the number of workers, checked
        before anything is built (else they fail at the first step, or epochs later)."""
        cfg, n, workers = self.config, len(self.train_set), self.comm.size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"--batch-size {cfg.batch_size}: the training set has {n} images, fewer than one "
                              f"global batch of {cfg.batch_size} x {workers} workers; lower --batch-size")
        if cfg.method == "supervised" and not self.train_set.has_labels:
            raise ConfigError(f"--method supervised needs labels, and {self.train_set.name} has none "
                              "(a folder of images needs one sub-folder per class)")
        if cfg.method == "supervised" and np.unique(self.train_set.labels).size < 2:
            raise ConfigError(f"--method supervised needs at least 2 classes, and the training images of "
                              f"{self.train_set.name} are all of one: the loss is 0 from the start")
        channels = self.train_set.n_channels
        if channels not in (1, 3):
            raise ConfigError(f"{self.train_set.name} has {channels} channels per image; training takes 1 (grey) "
                              "or 3 (RGB), which the colour augmentations are defined for (drop an alpha "
                              "channel, or train on each channel's grey image)")
        if cfg.queue_length:
            try:
                queue_length_per_worker(cfg.queue_length, cfg.batch_size, workers)
            except ValueError as exc:
                raise ConfigError(f"--queue-length {cfg.queue_length}: {exc}") from exc
        bank_size = self.steps_per_epoch * cfg.batch_size  # embeddings per worker's memory bank
        if cfg.method == "deepcluster-v2" and max(cfg.n_prototypes) > bank_size:
            raise ConfigError(f"--n-prototypes {' '.join(map(str, cfg.n_prototypes))}: k-means needs at least as "
                              f"many embeddings as clusters, and the memory bank holds {bank_size}")
        queue_length = cfg.queue_length if cfg.method == "swav" and self._queue_is_used() else 0
        if queue_length > n and self.comm.is_root:
            per_worker = queue_length_per_worker(cfg.queue_length, cfg.batch_size, workers)
            size = per_worker * cfg.feat_dim * len(cfg.crops_for_assign) * np.dtype(cfg.dtype).itemsize
            warnings.warn(f"--queue-length {cfg.queue_length} is longer than the {n} training images: the queue will "
                          f"hold the same images more than once (their embeddings from earlier epochs), in "
                          f"{size / 2**20:,.0f} MiB per worker (the official 3840 is 0.3% of ImageNet)", stacklevel=3)
        codes_per_batch = cfg.batch_size * workers + queue_length
        if cfg.method == "swav" and max(cfg.n_prototypes) > codes_per_batch and self.comm.is_root:
            warnings.warn(
                f"{max(cfg.n_prototypes)} prototypes but only {codes_per_batch} samples per Sinkhorn problem "
                f"(batch {cfg.batch_size} x {workers} workers + queue {queue_length}): the equal partition "
                "gives each prototype less than one sample per batch; use a queue (--queue-length) or fewer "
                "prototypes", stacklevel=3)

    def _queue_is_used(self) -> bool:
        """Whether a SwAV queue (``--queue-length``) is ever used in this run, with a warning
        if not. The queue is made at the start of epoch ``epoch_queue_starts`` (counting
        from 0) and serves the codes only once full, after ``queue_length / (batch x
        workers)`` more steps: a run too short for both would train without it, silently."""
        cfg = self.config
        if not cfg.queue_length:
            return False
        steps_to_fill = cfg.queue_length // (cfg.batch_size * self.comm.size)
        first_use = cfg.epoch_queue_starts * self.steps_per_epoch + steps_to_fill
        total = self.total_steps
        if first_use < total:
            return True
        if self.comm.is_root:
            warnings.warn(f"--queue-length {cfg.queue_length} is never used: the queue is made at epoch "
                          f"{cfg.epoch_queue_starts} (--epoch-queue-starts, counting from 0) and is full "
                          f"{steps_to_fill} steps later, at step {first_use}, but the run has {total} steps; "
                          "lower --epoch-queue-starts or --queue-length, or train longer", stacklevel=4)
        return False

    def _multicrop_config(self) -> MultiCropConfig:
        """The data set's augmentation recipe (flip, jitter, blur suited to its images:
        none of ImageNet's flips and blurs on 8x8 digits), with this run's crop counts,
        sizes and scales, normalised by the training set's own channel statistics."""
        cfg = self.config
        # only the recipe's flips, jitter and blur are used: its sizes are replaced by this
        # run's, which may be smaller than the folder recipe's least (2)
        base = default_config(recipe_name(cfg.dataset), image_size=max(2, *cfg.crop_sizes))
        return base.replace(n_crops=cfg.n_crops, sizes=cfg.crop_sizes, min_scale=cfg.min_scale,
                            max_scale=cfg.max_scale, mean=self.mean, std=self.std)

    def _build_model(self) -> SwAVModel:
        cfg, xp = self.config, self.xp
        init = self._init_random()
        backbone = build_backbone(cfg.arch, in_channels=self.train_set.n_channels, xp=xp, dtype=self.dtype, rng=init)
        if cfg.method == "supervised":
            n_classes = len(self.train_set.class_names)
            head = ClassifierHead(backbone.out_dim, n_classes, xp=xp, dtype=self.dtype, rng=init)
        else:
            head = SwAVHead(backbone.out_dim, cfg.hidden_dim, cfg.feat_dim, cfg.n_prototypes,
                            xp=xp, dtype=self.dtype, rng=init)
        if cfg.sync_bn and self.comm.size > 1:
            for module in (backbone, head):
                set_batchnorm_allreduce(module, self.comm.allreduce_sum)
        return SwAVModel(backbone, head)

    def _build_optimizer(self):
        cfg = self.config
        if cfg.optimizer == "lars":
            return LARS(self.model, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return SGD(self.model, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _broadcast_parameters(self) -> None:
        """Rank 0's parameters and buffers everywhere (at start and after resume)."""
        state = self.model.state_dict()
        self.model.load_state_dict({k: self.comm.broadcast(v) for k, v in state.items()})

    # -- schedule and data -----------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        """The scheduled rate at a global step: linear warm-up, then cosine to ``final_lr``."""
        return scheduled_rate(self.config, self.steps_per_epoch, step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The data order of an epoch: a function of (seed, epoch) alone, so a run resumed
        mid-epoch sees the same batches (drawn once per epoch: 40 ms for a million images)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._order_generator(epoch).permutation(len(self.train_set)))
        return self._order[1]

    def batch_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """This worker's share of a global batch (rank r takes the r-th slice)."""
        b, r = self.config.batch_size, self.comm.rank
        start = (step_in_epoch * self.comm.size + r) * b
        return self.epoch_order(epoch)[start : start + b]

    def random(self, purpose: int, *counters: int) -> Random:
        """The random stream for (seed, rank, purpose, counters...).

        Every draw of a run is a pure function of these numbers: workers never share draws,
        and a resumed run needs no generator state to continue exactly where it stopped.
        Purposes: 1 augmentation (per step), 3 memory-bank init. Purposes 2 (k-means, per
        epoch) and 4 (the model's initial weights) are the streams every worker shares: rank
        0's, see ``_cluster_random`` and ``_init_random``. No purpose is 0, because
        ``SeedSequence`` ignores trailing zeros: ``[seed, 0, 0]`` is the same stream as
        ``[seed, 0]``, which is epoch 0's data order (``_order_generator``).
        """
        key = [self.config.seed, self.comm.rank, purpose, *counters]
        return Random(np.random.SeedSequence(key), self.xp)

    def make_crops(self, indices: np.ndarray, step: int | None = None) -> list[Any]:
        """uint8 host images -> device -> multi-crop views (on the backend) for ``step``."""
        images = self.xp.asarray(self.train_set.images[indices])
        return self.multicrop(images, self.random(1, self.step if step is None else step))

    # -- one step --------------------------------------------------------------------
    def train_step(self, crops: Sequence[Any], indices: np.ndarray | None = None) -> tuple[Any, Any]:
        """One optimisation step on a batch of crops; returns (loss, codes) on the device.

        ``indices`` are the dataset indices of the batch (DeepCluster-v2's targets and
        memory bank, the supervised labels).
        """
        cfg, xp, model = self.config, self.xp, self.model
        batch = crops[0].shape[0]
        if cfg.method == "swav":
            model.head.normalize_prototypes()
        model.zero_grad()
        groups = crop_groups(crops)
        features = model.backbone.forward_groups([xp.concat(list(crops[a:b]), axis=0) for a, b in groups])
        embedding, scores = model.head.forward(xp.concat(features, axis=0))
        codes = None
        if cfg.method == "swav":
            queue_scores = None
            if self.queue is not None and self.queue.is_full:
                queue_scores = self.queue.all_scores(model.head.prototype_weight(0))
            out = swav_loss(
                scores[0], batch, crops_for_assign=cfg.crops_for_assign, temperature=cfg.temperature,
                epsilon=cfg.epsilon, sinkhorn_iterations=cfg.sinkhorn_iterations, queue_scores=queue_scores,
                allreduce=None if self.comm.size == 1 else self.comm.allreduce_sum,
                allreduce_max=None if self.comm.size == 1 else self.comm.allreduce_max,
            )
            loss, dscores, codes = out.loss, [out.grad], out.codes
            if self.queue is not None:
                self.queue.push([embedding[c * batch : (c + 1) * batch, :] for c in cfg.crops_for_assign])
        elif cfg.method == "deepcluster-v2":
            idx = xp.asarray(indices)
            targets = [xp.take(t, idx, axis=0) for t in self.targets]
            loss, dscores = deepcluster_loss(scores, targets, sum(cfg.n_crops), cfg.temperature)
            position = (self.step % self.steps_per_epoch) * batch
            self.bank.write(position, indices, [embedding[c * batch : (c + 1) * batch, :] for c in cfg.crops_for_assign])
        else:
            labels = xp.asarray(np.tile(self.train_set.labels[indices], len(crops)))
            loss, cache = F.softmax_cross_entropy_forward(scores[0], labels)
            dscores = [F.softmax_cross_entropy_backward(1.0, cache)]
        dfeatures = model.head.backward(dscores)
        model.backbone.backward_groups(
            [dfeatures[a * batch : b * batch, :] for a, b in groups]
        )
        if cfg.method != "supervised" and prototypes_frozen(self.step, self._freeze_iters()):
            model.head.drop_prototype_gradients()
        if self.comm.size > 1:
            self._average_gradients()
        self.optimizer.step(self.learning_rate(self.step))
        self.step += 1
        return loss, codes

    def _freeze_iters(self) -> int:
        # DeepCluster-v2's prototypes are the k-means centroids: never trained by gradient.
        return self.total_steps + 1 if self.config.method == "deepcluster-v2" else self.config.freeze_prototypes_niters

    def _average_gradients(self) -> None:
        """Every gradient averaged over the workers, in one all-reduce of all of them
        flattened into one vector (one message instead of one per tensor: 67 for resnet18)."""
        xp = self.xp
        owned = [(owner, key) for _, owner, key in self.model.named_parameters() if owner.grads.get(key) is not None]
        grads = [owner.grads[key] for owner, key in owned]
        flat = self.comm.allreduce_mean(xp.concat([xp.reshape(g, (-1,)) for g in grads]))
        start = 0
        for (owner, key), g in zip(owned, grads):
            owner.grads[key] = xp.reshape(flat[start : start + g.size], g.shape)
            start += g.size

    # -- epochs ----------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        cfg = self.config
        if cfg.method == "swav" and cfg.queue_length > 0 and epoch >= cfg.epoch_queue_starts and self.queue is None:
            self.queue = self._new_queue()
        if cfg.method == "deepcluster-v2" and self.step % self.steps_per_epoch == 0:
            if self.bank is None:
                self._init_memory_bank()
            centroids, self.targets = cluster_memory(
                self.bank, cfg.n_prototypes, cfg.kmeans_iters, self._cluster_random(epoch), len(self.train_set),
                allreduce=None if self.comm.size == 1 else self.comm.allreduce_sum,
                broadcast=None if self.comm.size == 1 else self.comm.broadcast,
                init=cfg.kmeans_init, n_restarts=cfg.kmeans_restarts,
            )
            for h, c in enumerate(centroids):
                self.model.head.set_prototype_weight(h, c)

    def _order_generator(self, epoch: int) -> np.random.Generator:
        # the same on every worker: each takes its own slice of one global order
        return np.random.Generator(np.random.PCG64([self.config.seed, epoch]))

    def _init_random(self) -> Random:
        # the same initial weights on every worker (rank 0's stream for all)
        return Random(np.random.SeedSequence([self.config.seed, 0, 4]), self.xp)

    def _cluster_random(self, epoch: int) -> Random:
        # k-means seeds must agree on every worker (rank 0's stream for all).
        return Random(np.random.SeedSequence([self.config.seed, 0, 2, epoch]), self.xp)

    def _new_queue(self) -> Queue:
        cfg = self.config
        length = queue_length_per_worker(cfg.queue_length, cfg.batch_size, self.comm.size)
        return Queue(len(cfg.crops_for_assign), length, cfg.feat_dim, cfg.batch_size, xp=self.xp, dtype=self.dtype)

    def _init_memory_bank(self) -> None:
        """Fill the bank with one pass of the untrained model (as the official init_memory)."""
        cfg, xp = self.config, self.xp
        self.bank = MemoryBank(len(cfg.crops_for_assign), self.steps_per_epoch * cfg.batch_size, cfg.feat_dim,
                               xp, self.dtype)
        rng = self.random(3)
        for s in range(self.steps_per_epoch):
            indices = self.batch_indices(0, s)
            crops = self.multicrop(xp.asarray(self.train_set.images[indices]), rng)
            embeddings = []
            for c in cfg.crops_for_assign:
                emb, _ = self.model.head.forward(self.model.backbone.forward(crops[c]))
                embeddings.append(emb)
                self.model.head.clear_cache(), self.model.backbone.clear_cache()
            self.bank.write(s * cfg.batch_size, indices, embeddings)

    def fit(self, resume: str | os.PathLike | None = None) -> MetricsLog:
        """Train for ``config.epochs`` epochs (from a checkpoint when ``resume`` is given).

        ``metrics.jsonl`` starts over with the records so far (:meth:`MetricsLog.restart`):
        none for a fresh run, the checkpoint's when resuming. Warns when the model has
        already trained ``config.epochs`` epochs, and then trains nothing.

        ``out_dir`` holds one run. When it already holds a ``checkpoint.npz`` of an earlier
        run (neither written by this trainer nor the one it resumes from), a
        :class:`ReusedOutDirWarning` says so before anything is written: this run starts
        ``metrics.jsonl`` and ``config.json`` over now and replaces that checkpoint at its
        first save, so the earlier run is lost unless it is resumed (``resume=``) or this
        run goes to another ``out_dir``. Should this run diverge before its first save, its
        error says that the checkpoint there is the earlier run's, not a good state of
        this one.

        Settings that cannot train (:meth:`~swav_ref.config.TrainConfig.check_trainable`)
        are refused first: a trainer built from such a checkpoint's configuration can still
        load its weights, to be evaluated.
        """
        self.config.check_trainable()
        if resume is not None:
            self.load(resume)  # (on other workers, it rescales the prototype freeze)
        cfg = self.config
        if self.comm.is_root:
            self._warn_if_out_dir_holds_another_run(resume)
            config_text = json.dumps(cfg.to_dict(), indent=2)
            write_atomically(self.out_dir / "config.json", lambda f: f.write(config_text), mode="w")
            self.log.restart()
        self.model.train()
        start_epoch = self.step // self.steps_per_epoch
        # this run's last epoch, always checkpointed (--stop-after: whatever --checkpoint-every says)
        self._last_epoch = min(cfg.epochs, start_epoch + cfg.stop_after if cfg.stop_after else cfg.epochs) - 1
        if start_epoch >= cfg.epochs and self.comm.is_root:
            source = f"the checkpoint {resume}" if resume is not None else "the model"
            warnings.warn(f"nothing to train: {source} has already trained {start_epoch} epochs and --epochs is "
                          f"{cfg.epochs}; raise --epochs to train further", stacklevel=2)
        try:
            for epoch in range(start_epoch, cfg.epochs):
                if cfg.stop_after and epoch - start_epoch >= cfg.stop_after:
                    break  # a time-limited job: the checkpoint lets --resume carry on
                self._train_epoch(epoch)
        finally:
            # The convolutions' column matrices kept for the next step (gigabytes on a GPU
            # for resnet18) are not needed by what comes after training, e.g. evaluation.
            F.SCRATCH.clear()
        return self.log

    def _warn_if_out_dir_holds_another_run(self, resume: str | os.PathLike | None) -> None:
        """A researcher reusing ``--out-dir`` by mistake would otherwise lose the earlier run
        without a word (its metrics at once, its checkpoint at this run's first save), and a
        divergence before that save would leave a folder whose checkpoint is the earlier
        run's beside this run's config.json. Warned, not refused: rerunning a command into
        the same folder (``swav-ref demo`` twice) is a normal way to replace a run."""
        checkpoint = self.out_dir / "checkpoint.npz"
        if not checkpoint.exists() or self._holds_this_run(checkpoint):
            return
        how = (f"this run (resumed from {resume}) replaces it" if resume is not None else "this run replaces it")
        warnings.warn(ReusedOutDirWarning(
            f"{self.out_dir} holds a checkpoint of an earlier run ({checkpoint.name}); {how} at its first save, and "
            "starts metrics.jsonl and config.json over now; to continue that run use --resume "
            f"{checkpoint} (fit(resume=...)), or choose another --out-dir to keep it"), stacklevel=3)

    def _train_epoch(self, epoch: int) -> None:
        """The steps of ``epoch`` not yet taken (all of them, except after a resume)."""
        from tqdm.auto import tqdm

        cfg = self.config
        self._start_epoch(epoch)
        first = self.step - epoch * self.steps_per_epoch
        bar = tqdm(range(first, self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.comm.is_root), leave=False)
        t0 = time.perf_counter()
        for s in bar:
            indices = self.batch_indices(epoch, s)
            loss, codes = self.train_step(self.make_crops(indices), indices)
            self._pending.append((self.step - 1, loss, codes))
            if self.step % cfg.log_every == 0 or s == self.steps_per_epoch - 1:
                self._flush_log(epoch, bar)
        images = (self.steps_per_epoch - first) * cfg.batch_size * self.comm.size  # by this run, on every worker
        self._end_epoch(epoch, self._epoch_mean_loss(epoch), time.perf_counter() - t0, images)

    def _epoch_mean_loss(self, epoch: int) -> float:
        """The mean of the epoch's step losses, from its step records (on rank 0, which
        keeps the log). Summed exactly on the host (``math.fsum``), so that a run resumed
        in the middle of the epoch, whose earlier steps' records came with its checkpoint,
        gives the very number an uninterrupted run gives. The records are the last of the
        log: it is read backwards to the epoch's first step, not whole every epoch."""
        losses = []
        for record in reversed(self.log.records):
            if record.get("kind") == "step" and record.get("epoch") == epoch:
                losses.append(record["loss"])
            elif record.get("kind") == "epoch" or record.get("epoch", epoch) < epoch:
                break
        return math.fsum(losses) / len(losses) if losses else math.nan

    def _log_pending(self) -> None:
        """Log the steps taken since the last logging boundary (before a checkpoint)."""
        if self._pending:
            self._flush_log(self._pending[0][0] // self.steps_per_epoch, bar=None)

    def _flush_log(self, epoch: int, bar: Any) -> None:
        """The logging boundary: bring the pending metrics to the host, check them.

        The pending losses travel together (one device-to-host copy and, under MPI, one
        all-reduce per flush rather than one per step), and so do this worker's code
        statistics (a second copy).
        """
        xp = self.xp
        losses = xp.stack([xp.reshape(loss, ()) for _, loss, _ in self._pending])
        if self.comm.size > 1:
            losses = self.comm.allreduce_sum(losses)
        values = [float(v) / self.comm.size for v in to_numpy(losses)]
        # This worker's code statistics for every pending step, brought over in one copy too.
        with_codes = [code_usage(codes[0]) for _, _, codes in self._pending if codes is not None]
        usage_rows = iter(to_numpy(xp.stack([
            xp.stack([xp.astype(u.n_used, losses.dtype), u.entropy_of_mean, u.mean_entropy]) for u in with_codes
        ])) if with_codes else ())
        for (step, _, codes), value in zip(self._pending, values):
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"the loss became {value} at step {step} (epoch {epoch + 1}); training stopped and "
                    f"{self.what_is_kept()}. "
                    f"{DIVERGENCE_ADVICE}"
                )
            record = {"kind": "step", "step": step, "epoch": epoch, "loss": value, "lr": self.learning_rate(step)}
            if codes is not None:  # the first assignment crop's codes
                n_used, entropy_of_mean, mean_entropy = next(usage_rows)
                record["prototypes_used"] = int(n_used)
                record["code_entropy"] = float(entropy_of_mean)
                record["code_row_entropy"] = float(mean_entropy)
            if self.comm.is_root:  # one record and one warning per job, not one per worker
                self.log.write(record)
                self.monitor.update(value)
        self._pending.clear()
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}",
                            used=record.get("prototypes_used", "-"))

    def _end_epoch(self, epoch: int, mean_loss: float, seconds: float, images: int) -> None:
        record = {"kind": "epoch", "epoch": epoch, "step": self.step, "loss": mean_loss, "seconds": seconds,
                  "images": images}
        if self.comm.is_root:
            self.log.write(record)
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
        if (epoch + 1) % self.config.checkpoint_every == 0 or epoch == self._last_epoch:
            self.save(self.out_dir / "checkpoint.npz")

    # -- features for evaluation ----------------------------------------------------------
    def features(self, images: np.ndarray, batch_size: int = 512) -> Any:
        """Backbone features (N, D) of uint8 images, in eval mode (the frozen-feature protocol)."""
        from swav_ref.evaluate import extract_features

        return extract_features(self.model.backbone, images, xp=self.xp, dtype=self.dtype,
                                batch_size=batch_size, normalize=(self.mean, self.std))
