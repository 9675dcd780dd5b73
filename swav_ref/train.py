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
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swav_ref import checkpoint as ckpt
from swav_ref.backend import Random, get_backend, set_tf32, to_numpy, use_device_for_local_rank
from swav_ref.data.datasets import ARRAYS, DATASETS, ImageDataset, channel_stats, load_dataset
from swav_ref.data.multicrop import MultiCrop, MultiCropConfig, default_config
from swav_ref.deepcluster import IGNORE_INDEX, MemoryBank, cluster_memory, deepcluster_loss
from swav_ref.distributed import get_communicator, install_abort_on_exception
from swav_ref.nn import functional as F
from swav_ref.nn.optim import LARS, SGD, warmup_cosine_schedule
from swav_ref.nn.resnet import resnet18, resnet_tiny
from swav_ref.swav.diagnostics import CollapseMonitor, code_usage
from swav_ref.swav.head import ClassifierHead, SwAVHead, prototypes_frozen
from swav_ref.swav.loss import swav_loss
from swav_ref.swav.queue import Queue, queue_length_per_worker

METHODS = ("swav", "deepcluster-v2", "supervised")
#: The allowed values of TrainConfig's text fields (the command line offers the user-facing
#: ones: no "arrays", which only Python can hand over, and no test backend).
CHOICES = {"method": METHODS, "dataset": (*DATASETS, ARRAYS), "backend": ("numpy", "cupy", "array_api_strict"),
           "dtype": ("float32", "float64"), "arch": ("resnet_tiny", "resnet18"), "optimizer": ("lars", "sgd"),
           "kmeans_init": ("k-means++", "random")}
#: The multi-crop fields of TrainConfig whose default (None) is the data set's recipe.
CROP_FIELDS = ("n_crops", "crop_sizes", "min_scale", "max_scale")
CHECKPOINT_FORMAT = "swav_ref.trainer/1"


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


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot train; the message names the
    option as the command line spells it and the rule it breaks."""


class TrainingDivergedError(RuntimeError):
    """The loss or the parameters became NaN or infinite; a good checkpoint is never
    overwritten by a bad one."""


class ReusedOutDirWarning(UserWarning):
    """A fresh run writes into an ``out_dir`` that holds the checkpoint of an earlier run,
    which it replaces (:meth:`Trainer.fit`). A category of its own, so that a caller that
    replaces runs on purpose (:func:`swav_ref.experiment.run_comparison`, which warns once
    for the whole comparison) can silence it alone."""


#: The TrainConfig fields that a resume may change without a word: how much longer the run
#: goes on (``epochs``, ``stop_after``), where and how often it writes and reports
#: (``out_dir``, ``progress``, ``log_every``, ``checkpoint_every``), the machine it runs on
#: (``backend``, ``tf32``: the same computation, to rounding), and where the data lie
#: (``data_dir``, ``image_size``: the data themselves are compared instead, see
#: :meth:`Trainer.load`). Every other field is the recipe: a resume that changes one
#: continues the checkpoint's run under another recipe, which is warned about (the model's
#: shape, the method, the batch, the queue and the crops are refused outright).
RESUME_MAY_CHANGE = ("epochs", "stop_after", "out_dir", "progress", "log_every", "checkpoint_every",
                     "backend", "tf32", "data_dir", "image_size")


DIVERGENCE_ADVICE = ("Try a lower --base-lr or a longer warm-up (--warmup-epochs); with your own model, check "
                     "that features and prototypes are L2-normalised.")


def load_trainer_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, TrainConfig]:
    """A checkpoint written by :meth:`Trainer.save`: its arrays, metadata and configuration
    (:class:`~swav_ref.checkpoint.CheckpointError` for any other file)."""
    arrays, meta = ckpt.load_checkpoint(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{path}: not a swav_ref trainer checkpoint (format {meta.get('format')!r})")
    if "config" not in meta:  # a worker's own state file (queue, memory bank) has the format but no model
        raise ckpt.CheckpointError(f"{path}: a worker's local state file (its queue or memory bank), not a "
                                   "checkpoint; load the checkpoint.npz beside it, which names it")
    return arrays, meta, TrainConfig.from_dict(meta["config"])


def scheduled_rate(cfg: "TrainConfig", steps_per_epoch: int, step: int) -> float:
    """The learning rate of the run ``cfg`` at a global step: linear warm-up from
    ``start_warmup``, then cosine from ``base_lr`` to ``final_lr`` at ``epochs * steps_per_epoch``."""
    return warmup_cosine_schedule(
        step, cfg.epochs * steps_per_epoch, cfg.base_lr, cfg.final_lr,
        # a short run warms up for half of it at most, so that its rate decays too (with
        # --epochs <= --warmup-epochs it would end at the peak rate)
        min(cfg.warmup_epochs, cfg.epochs // 2) * steps_per_epoch, cfg.start_warmup,
    )


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


def data_record(data: ImageDataset) -> dict:
    """What a checkpoint records of its training data, to tell other data later: the number
    of images and their shape (C, H, W)."""
    return {"n_images": len(data), "image_shape": list(data.images.shape[1:])}


def trained_on_same(trained_on: dict, data: ImageDataset) -> bool:
    """Whether ``data`` has the number of images and the image shape of a checkpoint's
    ``meta["data"]``."""
    now = data_record(data)
    return {k: trained_on.get(k) for k in now} == now


def recipe_name(dataset: str) -> str:
    """The :func:`~swav_ref.data.multicrop.default_config` recipe of a data set: its own for
    digits and CIFAR-10, the general one (sized to the images) for a folder or arrays."""
    return dataset if dataset in ("digits", "cifar10") else "folder"


def option_text(name: str, value: Any) -> str:
    """A setting as the command line spells it: ``--n-crops 2 6``, ``--seed 3``,
    ``--no-sync-bn``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (tuple, list)):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"


def as_options(values: dict[str, Any]) -> str:
    """``{"n_crops": (2, 6), "seed": 3}`` as the command line spells it: ``--n-crops 2 6, --seed 3``."""
    return ", ".join(option_text(name, v) for name, v in values.items())


@dataclass
class TrainConfig:
    """Every setting of a training run (the command line maps onto these one to one).

    Defaults are the digits recipe used by ``swav-ref demo`` (which trains 20 epochs, not
    the default 100): a tiny ResNet on 8x8 images, 2 crops of 8x8 and 4 of 6x6, 100
    prototypes, no queue (the batch of 128 is larger than K). They were chosen on the
    training split only, and they depart from the official ImageNet values (given in the
    comments) where 1438 images of 8x8 pixels need it. Two of the departures are more than
    a matter of scale: temperature 0.2 (at 0.1 the first steps, whose predictions are
    confidently wrong, flatten every prediction and the codes collapse to uniform, loss
    ln K) and K = 100 prototypes (official 3000, for 1.28 million images) of the official
    128-d embedding.

    The fields that only make sense for one kind of image default to ``None``, "the data
    set's recipe", and a :class:`Trainer` fills them in once it knows the images (the crops
    by :meth:`with_crop_recipe`, the freeze from its steps per epoch), so that
    ``--dataset cifar10`` never trains with the crops of 8x8 digits:

    - ``n_crops``, ``crop_sizes``, ``min_scale``, ``max_scale``: from
      :func:`swav_ref.data.multicrop.default_config`. Digits: 2 crops of 8 at area scale
      (0.5, 1) and 4 of 6 at (0.3, 0.6); cifar10: 2 of 32 and 6 of 16 at the official
      scales (0.14, 1) and (0.05, 0.14); folder: 2 of S and 6 of round(S 96 / 224), S the
      shorter image side (``--image-size`` when given), at the official scales.
    - ``freeze_prototypes_niters``: the steps of the first epoch, as the official 313 at
      batch 4096 (5005 at batch 256) are one epoch of ImageNet; two epochs on digits, whose
      epoch is only 11 steps.

    A field set explicitly is kept, so a run can change one crop setting and keep the rest
    of the recipe; the checkpoint stores the filled-in values.
    """

    method: str = "swav"
    dataset: str = "digits"  # or cifar10, folder; "arrays": images handed to Trainer(train_set=...)
    data_dir: str | None = None
    backend: str = "numpy"
    dtype: str = "float32"
    tf32: bool = False  # CuPy only: float32 GEMMs on TF32 tensor cores (PyTorch's conv default)
    arch: str = "resnet_tiny"  # or resnet18 (CIFAR layout)
    epochs: int = 100
    batch_size: int = 128  # per worker (official: 64 per GPU)
    # None: the data set's recipe (see above); digits (2, 4), (8, 6), (0.5, 0.3), (1.0, 0.6)
    n_crops: tuple[int, ...] | None = None  # official (2, 6)
    crop_sizes: tuple[int, ...] | None = None  # official (224, 96)
    min_scale: tuple[float, ...] | None = None  # official (0.14, 0.05)
    max_scale: tuple[float, ...] | None = None  # official (1.0, 0.14)
    crops_for_assign: tuple[int, ...] = (0, 1)
    hidden_dim: int = 256  # official 2048
    feat_dim: int = 128  # official 128
    n_prototypes: tuple[int, ...] = (100,)  # official 3000; DeepCluster-v2: several sets
    epsilon: float = 0.05
    temperature: float = 0.2  # official 0.1
    sinkhorn_iterations: int = 3
    queue_length: int = 0  # official 3840 with batch 256 (0 = no queue)
    epoch_queue_starts: int = 15
    freeze_prototypes_niters: int | None = None  # None: one epoch (digits: two); official 313 at batch 4096
    optimizer: str = "lars"  # or "sgd"
    base_lr: float = 2.0  # official 4.8 at batch 4096 (LARS)
    final_lr: float = 0.001  # official 0 (its scripts: base_lr / 1000)
    warmup_epochs: int = 2  # official 10; capped at half the run (epochs // 2)
    start_warmup: float = 0.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    kmeans_iters: int = 10  # DeepCluster-v2
    kmeans_restarts: int = 1
    kmeans_init: str = "k-means++"  # or "random" (the official: random rows of rank 0's bank)
    sync_bn: bool = False
    seed: int = 0
    out_dir: str = "runs/swav"
    log_every: int = 10
    checkpoint_every: int = 1  # epochs
    stop_after: int = 0  # epochs in this run (0 = to the end); the schedule still spans `epochs`
    progress: bool = True
    image_size: int = 0  # folder data: resize every image to this square size (0 = keep; all must agree)

    def __post_init__(self):
        self._check_types()
        self._check_choices()
        self._check_ranges()
        self._check_crops()

    def _check_types(self) -> None:
        """Each field as its annotation says: whole numbers for ``int`` (NumPy's too, so a
        sweep over ``np.arange`` works; 2.5 epochs is refused, not a crash at the first
        step), numbers for ``float``, a tuple for a sequence field (one number becomes a
        1-tuple), text for ``str`` (a path too), True/False for ``bool``."""
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), str(field.type)
            if isinstance(value, np.ndarray) and value.ndim == 0:  # np.array(5): one number, as np.int64(5)
                value = value[()]
            if value is None and "None" in kind:
                continue
            if kind.startswith("tuple"):
                element = kind[len("tuple["):].split(",")[0]
                values = value if isinstance(value, (list, tuple, np.ndarray)) else (value,)
                if len(values) == 0:  # () would fail later in min(), or train with no crops
                    raise ConfigError(f"--{field.name.replace('_', '-')}: needs at least one value, got none")
                setattr(self, field.name, tuple(self._as_kind(field.name, v, element) for v in values))
            else:
                setattr(self, field.name, self._as_kind(field.name, value, kind.split("|")[0].strip()))

    def _as_kind(self, name: str, value: Any, kind: str) -> Any:
        option = f"--{name.replace('_', '-')} {value!r}"
        if kind == "bool":  # 0 and 1 too: configurations saved before the kinds were checked hold them
            if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))):
                raise ConfigError(f"{option}: must be True or False")
            return bool(value)
        if kind == "str":
            if isinstance(value, os.PathLike):  # out_dir, data_dir
                return os.fspath(value)
            if not isinstance(value, str):
                raise ConfigError(f"{option}: must be text")
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{option}: must be a number")
        if kind == "int":
            if not isinstance(value, numbers.Integral):
                raise ConfigError(f"{option}: must be a whole number")
            return int(value)
        return float(value)

    def _refuse(self, name: str, rule: str) -> None:
        value = getattr(self, name)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        raise ConfigError(f"--{name.replace('_', '-')} {shown}: {rule}")

    def _check_choices(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                self._refuse(name, f"choose one of {', '.join(allowed)}")
        if self.dataset in ("cifar10", "folder") and self.data_dir is None:
            self._refuse("dataset", "needs --data-dir, the folder holding the data")
        if self.dataset in ("digits", ARRAYS) and self.data_dir is not None:
            where = "the digits are embedded (scikit-learn)" if self.dataset == "digits" else \
                "arrays are handed to the Trainer"
            self._refuse("data_dir", f"{where}; --data-dir applies to cifar10 and folder")
        if self.image_size and self.dataset != "folder":
            self._refuse("image_size", "applies to --dataset folder only (digits are 8x8, CIFAR-10 32x32)")
        if self.tf32 and self.backend != "cupy":
            self._refuse("backend", "--tf32 applies to the cupy backend only (CPUs have no TF32 arithmetic)")

    def _check_ranges(self) -> None:
        """Every number in its range, before anything is built or written: a zero or negative
        size, rate or interval would otherwise fail deep inside the first step (or, for the
        checkpoint interval, after a whole epoch of work)."""
        at_least = {"epochs": 1, "batch_size": 1, "feat_dim": 1, "hidden_dim": 0, "sinkhorn_iterations": 1,
                    "queue_length": 0, "epoch_queue_starts": 0, "freeze_prototypes_niters": 0, "warmup_epochs": 0,
                    "kmeans_iters": 1, "kmeans_restarts": 1, "seed": 0, "log_every": 1, "checkpoint_every": 1,
                    "stop_after": 0, "image_size": 0}
        for name, low in at_least.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                self._refuse(name, f"must be at least {low}")
        for name in ("n_crops", "crop_sizes"):
            if getattr(self, name) is not None and min(getattr(self, name)) < 1:
                self._refuse(name, "every entry must be at least 1")
        if min(self.n_prototypes) < 2:  # K = 1: every sample in one cluster, a constant loss ln 1 = 0
            self._refuse("n_prototypes", "every entry must be at least 2 (a single prototype takes every "
                                         "sample: its codes, and so the loss, carry nothing to learn)")
        if self.method == "swav" and len(self.n_prototypes) != 1:
            self._refuse("n_prototypes", "SwAV has one set of prototypes (give one number); several sets are "
                                         "for --method deepcluster-v2")
        for name in ("epsilon", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                self._refuse(name, "must be a positive number")
        for name in ("base_lr", "final_lr", "start_warmup", "weight_decay", "momentum"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                self._refuse(name, "must be a number >= 0")

    def _crops_given(self) -> dict[str, tuple]:
        """The crop settings set explicitly (the others are None: the data set's recipe)."""
        return {name: getattr(self, name) for name in CROP_FIELDS if getattr(self, name) is not None}

    def _check_crops(self) -> None:
        """The crop settings that are given (the others come from the data set's recipe)."""
        given = self._crops_given()
        if len({len(v) for v in given.values()}) > 1:
            raise ConfigError("--n-crops, --crop-sizes, --min-scale and --max-scale need one entry per crop size, "
                              f"got {as_options(given)}")
        # (low, high) pairs; with only one of the two given, each value is checked against itself
        for low, high in zip(self.min_scale or self.max_scale or (), self.max_scale or self.min_scale or ()):
            if not 0 < low <= high <= 1:
                raise ConfigError(f"{as_options({k: given[k] for k in ('min_scale', 'max_scale') if k in given})}: "
                                  "a crop's area fraction needs 0 < min-scale <= max-scale <= 1")
        assign = self.crops_for_assign
        n_total = sum(self.n_crops) if self.n_crops is not None else None
        if not assign or min(assign) < 0 or len(set(assign)) != len(assign) or (n_total and max(assign) >= n_total):
            within = f" in 0..{n_total - 1}" if n_total else ""
            self._refuse("crops_for_assign", f"needs distinct crop indices{within}")

    def with_crop_recipe(self, image_side: int | None = None, data_name: str | None = None) -> TrainConfig:
        """This configuration with the crop fields left as ``None`` filled in from the data
        set's recipe (see the class notes). ``image_side``, the images' shorter side, sets
        the crops of a folder (default ``image_size``; digits and cifar10 need none);
        ``data_name`` names the data in an error."""
        given = self._crops_given()
        if len(given) == len(CROP_FIELDS):
            return self
        recipe = recipe_name(self.dataset)
        side = image_side or self.image_size or None
        if recipe == "folder" and side is None:
            how = "--image-size" if self.dataset == "folder" else "image_side (the arrays' shorter side)"
            raise ConfigError(f"--dataset {self.dataset}: the crop sizes follow the images' size; give {how}, or "
                              "all of --n-crops, --crop-sizes, --min-scale and --max-scale")
        if recipe == "folder" and side < 2:
            scale_up = ("scale them up with --image-size N (N >= 2)" if self.dataset == "folder"
                        else "scale them up before handing them over")
            raise ConfigError(f"{data_name or self.dataset}: the images are {side} pixel(s) on their shorter side, too "
                              f"small for two crop sizes; {scale_up}, or give all of --n-crops, --crop-sizes, "
                              "--min-scale and --max-scale")
        crops = default_config(recipe, image_size=side)
        filled = {"n_crops": crops.n_crops, "crop_sizes": crops.sizes,
                  "min_scale": crops.min_scale, "max_scale": crops.max_scale}
        groups = {len(value) for value in given.values()}
        if groups and groups != {len(crops.n_crops)}:
            missing = {name: value for name, value in filled.items() if name not in given}
            raise ConfigError(
                f"{as_options(given)} gives {groups.pop()} crop size(s), but the {recipe} recipe for "
                f"{data_name or self.dataset} has {len(crops.n_crops)} ({as_options(missing)}); for another "
                "number of crop sizes give all four of --n-crops, --crop-sizes, --min-scale and --max-scale")
        return dataclasses.replace(self, **{name: value for name, value in filled.items() if name not in given})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """The configuration of a dict (``to_dict``'s, a checkpoint's, a JSON file's). A key
        that is no field is ignored with a warning that names it (a typo such as ``epoch``
        would otherwise quietly leave the default); anything but a mapping (``None`` read
        from an empty JSON file, a list) is a TypeError that says what it got."""
        if not isinstance(d, Mapping):
            raise TypeError(f"TrainConfig.from_dict takes a dict of settings (as to_dict() or a checkpoint's "
                            f"'config' holds them), got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"TrainConfig.from_dict ignores {', '.join(map(repr, unknown))}: no such setting "
                          f"(they are {', '.join(sorted(known))})", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})


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
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        """Append ``record`` to :attr:`records` and, as one JSON line, to the file."""
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def steps(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "step"]

    def epochs(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "epoch"]


class Trainer:
    """Trains one model with one method; see the module docstring.

    Parameters
    ----------
    config : TrainConfig
        (a dict is refused with a TypeError: ``TrainConfig.from_dict(d)`` makes one).
    comm : a communicator (:mod:`swav_ref.distributed`); default: MPI when launched under
        ``mpiexec``, else a single process.
    train_set, test_set : override the datasets named in ``config`` (tests, notebooks).
        Each must be an :class:`~swav_ref.data.datasets.ImageDataset` (TypeError otherwise:
        wrap arrays as ``ImageDataset(images, labels)``), and the test images must have the
        training images' channels and size (ConfigError otherwise, at construction: the
        evaluation runs the trained network on them, and images of another size would
        score the model on what it never saw). A ``test_set`` given alone replaces the
        loaded data set's test split.
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
            train_set, loaded_test = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size or None, seed=0)
            test_set = loaded_test if test_set is None else test_set
        self.train_set, self.test_set = train_set, test_set
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
        self._pending: list[tuple[int, Any, Any]] = []  # (step, loss, codes) awaiting the log
        # The checkpoint that holds this run's last good state: the last one it wrote
        # (save), or the one it resumed from (load); None until then. A checkpoint.npz in
        # out_dir that is not this one belongs to an earlier run (see fit).
        self._checkpoint: Path | None = None
        self._fingerprint: str | None = None  # of the training data, see data_fingerprint
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

            raise ConfigError(f"test_set {test.name}: images of {shape(test)}, but the training set {train.name} "
                              f"has {shape(train)}; the evaluation runs the trained network on the test images, "
                              "which need the training images' channels and size")

    def _check_same_data(self) -> None:
        """Every worker must have loaded the same data set (each reads its own copy, say a
        node-local one): else the steps per epoch differ, and a collective fails or hangs,
        or the workers' shares overlap. Compared: the number of images and their pixel sum."""
        images = self.train_set.images
        mine = np.asarray([len(self.train_set), int(images.sum(dtype=np.uint64)) % 2**52], dtype=np.float64)
        low, high = -self.comm.allreduce_max(-mine), self.comm.allreduce_max(mine)
        if not np.array_equal(low, high):
            raise ConfigError(f"{self.train_set.name}: the workers loaded different training data (between "
                              f"{int(low[0])} and {int(high[0])} images, or other pixels); every worker needs the "
                              "same data set, e.g. one copy on a shared file system")

    def _with_recipe(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the data set's recipe filled in where it says ``None``: the crops
        (:meth:`TrainConfig.with_crop_recipe`) and the prototype freeze, the steps of the
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
        init = Random(np.random.SeedSequence([cfg.seed, 0, 0]), xp)  # same on every rank
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
            generator = np.random.Generator(np.random.PCG64([self.config.seed, epoch]))
            self._order = (epoch, generator.permutation(len(self.train_set)))
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
        Purposes: 1 augmentation (per step), 3 memory-bank init. (Purpose 2, k-means per
        epoch, is the exception that every worker shares: see ``_cluster_random``.)
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
                queue_scores = [self.queue.scores(i, model.head.prototype_weight(0)) for i in range(len(cfg.crops_for_assign))]
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
        flat = self.comm.allreduce_sum(xp.concat([xp.reshape(g, (-1,)) for g in grads])) * (1.0 / self.comm.size)
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
        """
        cfg = self.config
        if resume is not None:
            self.load(resume)
        if self.comm.is_root:
            self._warn_if_out_dir_holds_another_run(resume)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
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

    def _holds_this_run(self, path: Path) -> bool:
        """Whether ``path`` is the checkpoint of this run's last good state."""
        if self._checkpoint is None:
            return False
        try:
            return os.path.samefile(self._checkpoint, path)
        except OSError:  # either one is gone
            return False

    @property
    def last_checkpoint(self) -> Path | None:
        """The checkpoint holding this run's last good state: the one it wrote last, or the
        one it resumed from; None if there is none (yet, or any more)."""
        if self._checkpoint is not None and self._checkpoint.exists():
            return self._checkpoint
        return None

    def what_is_kept(self) -> str:
        """For a divergence or an interruption: which checkpoint holds this run's last good
        state, if any, in words."""
        checkpoint = self.out_dir / "checkpoint.npz"
        if self.last_checkpoint is not None:
            return f"the last good checkpoint, {self.last_checkpoint}, is kept"
        if checkpoint.exists():
            return (f"this run wrote no checkpoint; the {checkpoint} there belongs to an earlier run (resuming from it "
                    "continues that run, not this one)")
        return "no checkpoint had been written yet"

    def _train_epoch(self, epoch: int) -> None:
        """The steps of ``epoch`` not yet taken (all of them, except after a resume)."""
        from tqdm.auto import tqdm

        cfg = self.config
        self._start_epoch(epoch)
        first = self.step - epoch * self.steps_per_epoch
        bar = tqdm(range(first, self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.comm.is_root), leave=False)
        t0, epoch_loss = time.perf_counter(), self.xp.zeros((), dtype=self.dtype)
        for s in bar:
            indices = self.batch_indices(epoch, s)
            loss, codes = self.train_step(self.make_crops(indices), indices)
            epoch_loss = epoch_loss + loss
            self._pending.append((self.step - 1, loss, codes))
            if self.step % cfg.log_every == 0 or s == self.steps_per_epoch - 1:
                self._flush_log(epoch, bar)
        n_steps = self.steps_per_epoch - first
        if self.comm.size > 1:  # the mean over workers, as the step records
            epoch_loss = self.comm.allreduce_mean(epoch_loss)
        total = float(epoch_loss)
        if first:  # resumed in the middle of the epoch (not a scan of the whole log every epoch)
            # Its earlier steps' losses are in the log the checkpoint carried (when it holds
            # all of them), so the epoch's mean is the whole epoch's.
            start = epoch * self.steps_per_epoch
            earlier = [r["loss"] for r in self.log.records
                       if r.get("kind") == "step" and start <= r["step"] < start + first]
            if len(earlier) == first:
                total, n_steps = total + math.fsum(earlier), n_steps + first
        self._end_epoch(epoch, total / max(n_steps, 1), time.perf_counter() - t0)

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
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}", used=record.get("prototypes_used", "-"))

    def _end_epoch(self, epoch: int, mean_loss: float, seconds: float) -> None:
        record = {"kind": "epoch", "epoch": epoch, "step": self.step, "loss": mean_loss, "seconds": seconds}
        if self.comm.is_root:
            self.log.write(record)
        if (epoch + 1) % self.config.checkpoint_every == 0 or epoch == self._last_epoch:
            self.save(self.out_dir / "checkpoint.npz")

    # -- checkpoints -----------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict]:
        """The shared state (identical on every worker): model, optimiser, targets, step.

        Random streams need no saving: they are functions of (seed, rank, step)
        (:meth:`random`). Each worker's own state (queue, memory bank) is
        :meth:`local_state`; ``meta["local_ranks"]`` lists the ranks that have one, so that
        :meth:`load` can insist on their files.
        """
        arrays = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        arrays.update({f"optim.{k}": v for k, v in self.optimizer.state_dict().items()})
        for h, t in enumerate(self.targets or []):
            arrays[f"targets.{h}"] = t
        has_local = self.queue is not None or self.bank is not None  # on every worker or on none
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.comm.size,
            # the input normalisation and the data it came from: features need no data set
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
            "data": {"name": self.train_set.name, **data_record(self.train_set),
                     "fingerprint": self.data_fingerprint()},
            "local_ranks": list(range(self.comm.size)) if has_local else [],
            "monitor_fired": self.monitor.fired,
            "log": self.log.records,
        }
        return arrays, meta

    def data_fingerprint(self) -> str:
        """A digest of the training images, in order, and their labels (computed once): a
        resume compares it with the checkpoint's, so other images of the same count and
        shape are noticed (:meth:`load`)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(np.ascontiguousarray(self.train_set.images).data)
            if self.train_set.labels is not None:
                digest.update(np.ascontiguousarray(self.train_set.labels, dtype=np.int64).data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def local_state(self) -> tuple[dict[str, Any], dict]:
        """This worker's queue and memory bank (each rank keeps its own, as officially)."""
        arrays, meta = {}, {"format": CHECKPOINT_FORMAT, "rank": self.comm.rank, "step": self.step}
        if self.queue is not None:
            arrays["queue.embeddings"] = self.queue.embeddings
            meta["queue_filled"] = self.queue.filled
        if self.bank is not None:
            arrays.update({f"bank.{k}": v for k, v in self.bank.state_dict().items()})
        return arrays, meta

    @staticmethod
    def local_path(path: str | os.PathLike, rank: int, step: int | None = None) -> Path:
        """``run/checkpoint.npz`` -> ``run/checkpoint.rank0.step110.local.npz`` (without
        ``step``: ``run/checkpoint.rank0.local.npz``, the name before the step was in it)."""
        path = Path(path)
        at = "" if step is None else f".step{step}"
        return path.with_name(f"{path.stem}.rank{rank}{at}.local{path.suffix}")

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write a checkpoint, never over a good one with NaNs.

        Every worker with a queue or a memory bank first writes its own file next to
        ``path``, named by rank and step (:meth:`local_path`); once all are written, rank 0
        replaces ``path``, whose metadata names them; once that is done, each worker removes
        its files of earlier steps. A job killed at any point leaves a ``path`` whose
        files are all there: the previous one (and its files) or the new one.
        """
        arrays, meta = self.state()
        finite = all(bool(self.xp.all(self.xp.isfinite(v))) for k, v in arrays.items() if k.startswith("model."))
        if not finite:
            raise TrainingDivergedError(f"the parameters are not finite at step {self.step} (training diverged); "
                                        f"{path} was not written. {DIVERGENCE_ADVICE}")
        local_arrays, local_meta = self.local_state()
        mine = self.local_path(path, self.comm.rank, self.step)
        meta["local_files"] = [self.local_path(path, r, self.step).name for r in meta["local_ranks"]]
        if local_arrays:
            ckpt.save_checkpoint(mine, local_arrays, local_meta)
        self.comm.barrier()  # every worker's file is on disk before the checkpoint names it
        if self.comm.is_root:
            ckpt.save_checkpoint(path, arrays, meta)
        self.comm.barrier()
        if local_arrays:  # the checkpoint now names this step's files: earlier ones are not needed
            pattern = f"{glob.escape(Path(path).stem)}.rank{self.comm.rank}.*local{glob.escape(Path(path).suffix)}"
            for old in Path(path).parent.glob(pattern):
                if old != mine:
                    old.unlink(missing_ok=True)
        self._checkpoint = Path(path)

    def load(self, path: str | os.PathLike, weights_only: bool = False) -> None:
        """Restore a checkpoint written by :meth:`save`, to resume training (raises
        CheckpointError if unusable, or if this worker's queue / memory bank file,
        :meth:`local_path`, is missing). ``weights_only``: the model and its input
        normalisation only, for evaluation; any number of workers may have written it.

        A run without per-worker state may resume on another number of workers: it then
        continues at the next epoch boundary, with this run's steps per epoch (not bit for
        bit: the batches are cut differently).

        A resume continues the checkpoint's run, so it must be that run's data and recipe:
        training data of another number of images or image shape are refused (ConfigError;
        other images of the same count and shape are warned about), and every other
        setting that differs from the checkpoint's (seed, learning rates, temperature,
        optimiser, dtype...; all but :data:`RESUME_MAY_CHANGE`) is listed in one warning,
        so that nobody continues a run under another recipe by accident.
        """
        arrays, meta, saved = load_trainer_checkpoint(path)
        compared = ("method", "arch", "n_prototypes", "feat_dim", "hidden_dim")
        if not weights_only:  # these shape the optimiser's and the workers' state too
            compared += ("batch_size", "dataset", "queue_length", *CROP_FIELDS)
        differ = [name for name in compared if getattr(saved, name) != getattr(self.config, name)]
        if differ:  # all of them in one message, not one per attempt
            raise ckpt.CheckpointError(
                f"{path}: the checkpoint was trained with {as_options({n: getattr(saved, n) for n in differ})}; "
                f"this run has {as_options({n: getattr(self.config, n) for n in differ})}. These settings shape "
                f"the model and its state, so {'evaluating' if weights_only else 'resuming'} it needs the "
                "checkpoint's (swav-ref train --resume takes every setting not given on its command line from "
                "the checkpoint)"
            )
        if not weights_only:
            self._check_resumed_data(path, meta.get("data"))
            if self.comm.is_root:
                self._warn_of_other_settings(path, saved, meta)
        local = None if weights_only else self._local_file(path, meta)
        ckpt.check_compatible(
            {k[6:]: v for k, v in arrays.items() if k.startswith("model.")},
            {k: tuple(v.shape) for k, v in self.model.state_dict().items()},
        )
        xp = self.xp
        try:  # bad values (NaN weights, a None) are the file's fault: a CheckpointError naming it
            self.model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
        except ValueError as exc:
            raise ckpt.CheckpointError(f"{path}: its model.* entries: {exc}") from exc
        if "normalisation" in meta:  # checkpoints written before it was saved: this data's own
            self.mean = tuple(meta["normalisation"]["mean"])
            self.std = tuple(meta["normalisation"]["std"])
            self.multicrop = MultiCrop(self._multicrop_config(), self.xp, self.dtype)
        if weights_only:
            if self.comm.size > 1:
                self._broadcast_parameters()
            return
        try:
            self.optimizer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("optim.")})
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"{path}: its optim.* entries: {exc}") from exc
        self.step = self._resumed_step(path, meta)
        if self.comm.is_root:
            self._warn_of_another_schedule(path, saved)
        if any(k.startswith("targets.") for k in arrays):
            self.targets = [xp.asarray(t) for t in self._checked_targets(path, arrays)]
        self.log.records = list(meta.get("log", []))  # up to this checkpoint's step (fit rewrites the file)
        self.monitor.fired = bool(meta.get("monitor_fired", False))
        # the collapse window spans the resume: a run of short jobs is watched as one run
        self.monitor.remember(r["loss"] for r in self.log.records if r.get("kind") == "step")
        if local is not None:
            self._load_local(local)
        if self.comm.size > 1:
            self._broadcast_parameters()
        self._checkpoint = Path(path)  # this run's last good state, until its first save

    def _check_resumed_data(self, path: str | os.PathLike, trained_on: dict | None) -> None:
        """Resuming on other data is a new experiment, not a continuation: another number
        of images or image shape is refused (it would also change the steps per epoch, which
        the resume would blame on the workers); other images of the same count and shape
        (another digest, :meth:`data_fingerprint`) are warned about, since the same files
        decoded by another version of an image library may differ by a few pixels.
        Checkpoints written before the data were recorded are not checked."""
        if not trained_on:
            return
        data = self.train_set
        now = data_record(data)
        if not trained_on_same(trained_on, data):
            old_split = trained_on.get("name") == f"{data.name}/train" and not data.has_labels
            raise ConfigError(
                f"--resume {path}: the checkpoint was trained on {trained_on['n_images']} images of shape "
                f"{tuple(trained_on['image_shape'])} ({trained_on.get('name')}), but this run's training set "
                f"({data.name}) has {now['n_images']} of shape {tuple(now['image_shape'])}; "
                + ("it was written before a flat image folder trained on every image, on the 80 % split that "
                   "versions before then held out; to resume it exactly, hand the trainer that split from Python: "
                   "train, _ = split_dataset(load_image_folder(DATA_DIR), seed=0), then "
                   "Trainer(config, train_set=train).fit(resume=PATH)" if old_split else
                   "resume on the data it was trained on, or start a fresh run (its weights alone: load_encoder, "
                   "or Trainer.load(path, weights_only=True))"))
        if self.comm.is_root and "fingerprint" in trained_on and trained_on["fingerprint"] != self.data_fingerprint():
            warnings.warn(f"--resume {path}: the training images (or their order or labels) differ from those the "
                          f"checkpoint was trained on ({trained_on.get('name')}), though their number and shape "
                          f"agree; this run continues it on other data ({data.name})", stacklevel=4)

    def _warn_of_other_settings(self, path: str | os.PathLike, saved: TrainConfig, meta: dict) -> None:
        """One warning listing every recipe setting of this run that differs from the
        checkpoint's (all fields but :data:`RESUME_MAY_CHANGE`; those that shape the state,
        such as the method and the batch size, were refused before). The prototype freeze
        counts steps, so it is compared only at the same steps per epoch (another number of
        workers rescales it)."""
        skip = set(RESUME_MAY_CHANGE)
        if meta.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            skip.add("freeze_prototypes_niters")

        def shown(value: Any) -> str:
            return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)

        changed = [f"--{f.name.replace('_', '-')} {shown(getattr(saved, f.name))} -> "
                   f"{shown(getattr(self.config, f.name))}"
                   for f in dataclasses.fields(TrainConfig)
                   if f.name not in skip and getattr(saved, f.name) != getattr(self.config, f.name)]
        if changed:
            warnings.warn(f"--resume {path}: this run's settings differ from the checkpoint's ({', '.join(changed)}; "
                          "the checkpoint's first); the resumed run continues under this run's settings, another "
                          "recipe than the one the checkpoint was trained with; to continue that run as it was, give "
                          "the checkpoint's values", stacklevel=4)

    def _checked_targets(self, path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        """DeepCluster-v2's targets as the checkpoint holds them (host arrays), refused
        unless each is one whole-number cluster per training image, in ``0..K-1`` or
        :data:`~swav_ref.deepcluster.IGNORE_INDEX`: a bad value would index past the scores."""
        targets = []
        for h, k in enumerate(self.config.n_prototypes):
            name = f"targets.{h}"
            t = arrays.get(name)
            problem = None
            if t is None:
                problem = "is missing"
            elif t.shape != (len(self.train_set),) or not np.issubdtype(t.dtype, np.integer):
                problem = f"is {t.dtype} of shape {t.shape}, not one integer per training image ({len(self.train_set)})"
            elif not np.all((t == IGNORE_INDEX) | ((t >= 0) & (t < k))):
                problem = f"holds values outside 0..{k - 1} (and {IGNORE_INDEX}, no target)"
            if problem:
                raise ckpt.CheckpointError(f"{path}: {name} {problem}")
            targets.append(t)
        return targets

    def _warn_of_another_schedule(self, path: str | os.PathLike, saved: TrainConfig) -> None:
        """``--epochs`` may change on resume (to train a finished run further), but the
        learning-rate schedule spans ``--epochs``: the resumed run follows a new warm-up and
        cosine, and its rate jumps at once. Said with the numbers, since nothing else shows it."""
        cfg = self.config
        if saved.epochs == cfg.epochs or self.step >= self.total_steps:
            return  # the same schedule, or nothing left to train (fit says so)
        # Both schedules over the steps left (the checkpoint's at its last step past its end),
        # at five points: a constant rate, say, is the same schedule whatever --epochs says.
        saved_last, left = saved.epochs * self.steps_per_epoch - 1, self.total_steps - 1 - self.step
        rates = [(scheduled_rate(saved, self.steps_per_epoch, min(step, saved_last)), self.learning_rate(step))
                 for step in (self.step + left * i // 4 for i in range(5))]
        if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in rates):
            return
        was, now = rates[0]
        warnings.warn(
            f"--resume {path}: --epochs {saved.epochs} -> {cfg.epochs} changes the learning-rate schedule, which "
            f"spans --epochs (warm-up, then cosine to --final-lr): at step {self.step} the rate is {now:.4g}, where "
            f"the checkpoint's run was at {was:.4g}. To split one run into several jobs without this, give every job "
            "the run's final --epochs and end each one early with --stop-after", stacklevel=4)

    def _local_file(self, path: str | os.PathLike, meta: dict) -> Path | None:
        """This worker's queue / memory bank file named by the checkpoint (None if it has none)."""
        ranks = meta.get("local_ranks")  # None in checkpoints written before it existed
        files = meta.get("local_files")  # None before the step was in the names
        old_name = self.local_path(path, self.comm.rank)
        if ranks is None:
            return old_name if old_name.exists() else None
        if not ranks:
            return None
        if meta["world_size"] != self.comm.size:
            raise ckpt.CheckpointError(
                f"{path}: written by {meta['world_size']} workers, resumed by {self.comm.size}; the per-worker "
                "queues or memory banks cannot be redistributed (resume on as many workers, or evaluate it)"
            )
        local = Path(path).with_name(files[self.comm.rank]) if files else old_name
        if not local.is_file():
            names = ", ".join(files) if files else ", ".join(self.local_path(path, r).name for r in ranks)
            raise ckpt.CheckpointError(
                f"{local} is missing: {path} keeps each worker's queue or memory bank in its own file ({names}), "
                f"written next to it; copy those files from the run's folder into {local.parent}, or the resumed "
                "run would silently start from a fresh queue / memory bank"
            )
        return local

    def _resumed_step(self, path: str | os.PathLike, meta: dict) -> int:
        """The step to continue from: the checkpoint's, or on another number of steps per
        epoch (other workers) the start of the epoch after the last one it completed."""
        step, saved_per_epoch = meta["step"], meta.get("steps_per_epoch", self.steps_per_epoch)
        for name, value, least in (("step", step, 0), ("steps_per_epoch", saved_per_epoch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ckpt.CheckpointError(f"{path}: its {name} is {value!r}, not a whole number of steps "
                                           f"(at least {least})")
        if saved_per_epoch == self.steps_per_epoch:
            return step
        if step % saved_per_epoch:
            raise ckpt.CheckpointError(f"{path}: written in the middle of an epoch (step {step} of "
                                       f"{saved_per_epoch} per epoch) with other steps per epoch than this run's "
                                       f"{self.steps_per_epoch}; resume it on {meta['world_size']} workers")
        epochs = step // saved_per_epoch
        if self.comm.is_root:
            warnings.warn(f"{path}: {epochs} epochs of {saved_per_epoch} steps ({meta['world_size']} workers) "
                          f"continue with {self.steps_per_epoch} steps per epoch ({self.comm.size} workers) from "
                          f"epoch {epochs + 1}: the schedule carries on, but not bit for bit", stacklevel=3)
        return epochs * self.steps_per_epoch

    def _load_local(self, path: Path) -> None:
        arrays, meta = ckpt.load_checkpoint(path)
        if meta.get("step") != self.step:
            raise ckpt.CheckpointError(f"{path}: local state of step {meta.get('step')} does not match step {self.step}")
        try:
            if "queue.embeddings" in arrays:
                self.queue = self._new_queue()
                self.queue.load_state_dict({"embeddings": arrays["queue.embeddings"], "filled": meta.get("queue_filled")})
            if "bank.embeddings" in arrays:
                cfg = self.config
                self.bank = MemoryBank(len(cfg.crops_for_assign), self.steps_per_epoch * cfg.batch_size, cfg.feat_dim,
                                       self.xp, self.dtype)
                self.bank.load_state_dict({"embeddings": self.xp.asarray(arrays["bank.embeddings"]),
                                           "index": arrays.get("bank.index")})
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"{path}: {exc}") from exc

    # -- features for evaluation ----------------------------------------------------------
    def features(self, images: np.ndarray, batch_size: int = 512) -> Any:
        """Backbone features (N, D) of uint8 images, in eval mode (the frozen-feature protocol)."""
        from swav_ref.evaluate import extract_features

        return extract_features(self.model.backbone, images, xp=self.xp, dtype=self.dtype,
                                batch_size=batch_size, normalize=(self.mean, self.std))
