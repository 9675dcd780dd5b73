"""Every setting of a training run, checked before anything is built.

:class:`TrainConfig` is the one place where a run's settings live: the command line maps
onto its fields one to one, a checkpoint stores it (``to_dict`` / ``from_dict``), and its
checks refuse a setting that cannot train with a :class:`ConfigError` that names the
option as the command line spells it. Also here: the learning-rate schedule a
configuration implies (:func:`scheduled_rate`), and the helpers that write settings back
as command-line options for messages (:func:`option_text`, :func:`as_options`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from swav_ref.data.datasets import ARRAYS, DATASETS, IMAGE_FITS
from swav_ref.data.multicrop import default_config
from swav_ref.nn.optim import warmup_cosine_schedule

METHODS = ("swav", "deepcluster-v2", "supervised")
#: The allowed values of TrainConfig's text fields (the command line offers the user-facing
#: ones: no "arrays", which only Python can hand over, and no test backend).
CHOICES = {"method": METHODS, "dataset": (*DATASETS, ARRAYS), "backend": ("numpy", "cupy", "array_api_strict"),
           "dtype": ("float32", "float64"), "arch": ("resnet_tiny", "resnet18"), "optimizer": ("lars", "sgd"),
           "kmeans_init": ("k-means++", "random"), "image_fit": IMAGE_FITS}
#: The settings each method leaves unused (the command line warns of one given to it).
UNUSED_BY = {
    "swav": ("kmeans_iters", "kmeans_restarts", "kmeans_init"),
    "deepcluster-v2": ("epsilon", "sinkhorn_iterations", "queue_length", "epoch_queue_starts",
                       "freeze_prototypes_niters"),  # its prototypes are the centroids: never stepped
    "supervised": ("hidden_dim", "feat_dim", "n_prototypes", "crops_for_assign", "epsilon", "temperature",
                   "sinkhorn_iterations", "queue_length", "epoch_queue_starts", "freeze_prototypes_niters",
                   "kmeans_iters", "kmeans_restarts", "kmeans_init"),  # a linear classifier on the backbone
}
#: The multi-crop fields of TrainConfig whose default (None) is the data set's recipe.
CROP_FIELDS = ("n_crops", "crop_sizes", "min_scale", "max_scale")
#: SwAV's smallest epsilon: cosine scores span up to 2, so Sinkhorn's smallest entry is about
#: exp(-2 / epsilon), and float64 holds no positive number below exp(-745) (normal ones end at
#: exp(-708)): 2 / 708 = 0.0028, rounded up. The official scripts use 0.05.
MIN_EPSILON = 0.003


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot train; the message names the
    option as the command line spells it and the rule it breaks. ``field`` is the
    TrainConfig field refused, where the error is about one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


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
    set's recipe", and a :class:`~swav_ref.train.Trainer` fills them in once it knows the images (the crops
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
    crop_sizes: tuple[int, ...] | None = None  # official (224, 96); one per group: MultiCropConfig.sizes
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
    start_warmup: float = 0.0  # official default 0; its 800-epoch scripts pass 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    kmeans_iters: int = 10  # DeepCluster-v2
    kmeans_restarts: int = 1
    kmeans_init: str = "k-means++"  # or "random" (the official: random rows of rank 0's bank)
    sync_bn: bool = False
    seed: int = 0
    out_dir: str = "runs/swav"  # swav-ref train: runs/<method> unless --out-dir is given
    log_every: int = 10
    checkpoint_every: int = 1  # epochs
    stop_after: int = 0  # epochs in this run (0 = to the end); the schedule still spans `epochs`
    progress: bool = True
    image_size: int = 0  # folder data: resize every image to this square size (0 = keep; all must agree)
    image_fit: str = "stretch"  # with image_size: stretch each image to the square, or "crop" its centre

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
        raise ConfigError(f"--{name.replace('_', '-')} {shown}: {rule}", field=name)

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
        if self.image_fit != "stretch" and not self.image_size:
            self._refuse("image_fit", "applies with --image-size (folder data), the size each image is cropped to")
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
                                         "for the method deepcluster-v2")  # (train's --method, demo's --methods)
        for name in ("epsilon", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                self._refuse(name, "must be a positive number")
        for name in ("base_lr", "final_lr", "start_warmup", "weight_decay", "momentum"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                self._refuse(name, "must be a number >= 0")

    def check_trainable(self) -> None:
        """The settings a run cannot train with, though a configuration may hold them (a
        checkpoint written before these checks loads, to be evaluated): called by
        :meth:`Trainer.fit <swav_ref.train.Trainer.fit>` first, and by the command line
        before anything is loaded, built or written."""
        if self.momentum >= 1:
            self._refuse("momentum", "must be below 1 (at 1 or more the velocity adds up every gradient "
                                     "without decay and grows without bound)")
        if self.batch_size < 2:
            self._refuse("batch_size", "must be at least 2 to train: BatchNorm normalises each batch by its own "
                                       "mean and variance, which one image does not have")
        if self.method == "swav" and self.epsilon < MIN_EPSILON:
            self._refuse("epsilon", f"must be at least {MIN_EPSILON}: Sinkhorn's exp((score - max) / epsilon) "
                                    "reaches exp(-2 / epsilon) for cosine scores, which underflows to 0 even in "
                                    "float64 below it: a sample far from every prototype's best can have all "
                                    "its entries 0, and its codes 0 / 0 (NaN)")
        if self.method == "swav" and self.n_crops is not None and sum(self.n_crops) < 2:
            self._refuse("n_crops", "SwAV needs at least 2 crops of each image in all: each crop predicts "
                                    "the code of another")

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


def scheduled_rate(cfg: "TrainConfig", steps_per_epoch: int, step: int) -> float:
    """The learning rate of the run ``cfg`` at a global step: linear warm-up from
    ``start_warmup``, then cosine from ``base_lr`` to ``final_lr`` at ``epochs * steps_per_epoch``."""
    return warmup_cosine_schedule(
        step, cfg.epochs * steps_per_epoch, cfg.base_lr, cfg.final_lr,
        # a short run warms up for half of it at most, so that its rate decays too (with
        # --epochs <= --warmup-epochs it would end at the peak rate)
        min(cfg.warmup_epochs, cfg.epochs // 2) * steps_per_epoch, cfg.start_warmup,
    )
