"""A Trainer's checkpoints: what they hold, and resuming from one exactly.

:class:`Resumable` is the half of :class:`~swav_ref.train.Trainer` that saves and loads.
A checkpoint holds the shared state (model, optimiser, DeepCluster-v2's targets, the step,
the configuration and the log so far) in one file, and each worker's own state (its queue
or memory bank) in a file of its own beside it; random streams need no saving, since every
draw is a function of (seed, rank, step). Loading checks that the checkpoint continues
*this* run (the same recipe, data and model shape), and says what differs, so that a
resumed run is the run it claims to be, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import math
import os
import re
import reprlib
import warnings
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from swav_ref import __version__
from swav_ref import checkpoint as ckpt
from swav_ref.config import CROP_FIELDS, ConfigError, TrainConfig, as_options, scheduled_rate
from swav_ref.data.datasets import FOLDER_DECODER, DatasetError, ImageDataset
from swav_ref.data.multicrop import MultiCrop
from swav_ref.deepcluster import IGNORE_INDEX, MemoryBank
from swav_ref.swav.queue import queue_length_per_worker

CHECKPOINT_FORMAT = "swav_ref.trainer/1"
#: The package and version that wrote a checkpoint, as its metadata records it; for the
#: reader (``swav-ref eval`` copies it into its results), never for the loader: checkpoints
#: written before the field existed have none and load all the same.
WRITTEN_BY = f"swav_ref {__version__}"


class TrainingDivergedError(RuntimeError):
    """The loss or the parameters became NaN or infinite; a good checkpoint is never
    overwritten by a bad one."""


#: The TrainConfig fields that a resume may change without a word: how much longer the run
#: goes on (``epochs``, ``stop_after``), where and how often it writes and reports
#: (``out_dir``, ``progress``, ``log_every``, ``checkpoint_every``), the machine it runs on
#: (``backend``, ``tf32``: the same computation, to rounding), and where the data lie
#: (``data_dir``, ``image_size``, ``image_fit``: the data themselves are compared instead, see
#: :meth:`Trainer.load <swav_ref.train.Trainer.load>`). Every other field is the recipe: a
#: resume that changes one continues the checkpoint's run under another recipe, which is
#: warned about (the model's shape, the method, the batch, the queue and the crops are
#: refused outright).
RESUME_MAY_CHANGE = ("epochs", "stop_after", "out_dir", "progress", "log_every", "checkpoint_every",
                     "backend", "tf32", "data_dir", "image_size", "image_fit")


#: The settings that shape a model's weights (a checkpoint's must be kept even to evaluate
#: it), and with them those that shape the optimiser's, the queue's and the workers' state
#: (kept on a resume: ``Resumable.load`` refuses others).
SHAPE_THE_MODEL = ("method", "arch", "n_prototypes", "feat_dim", "hidden_dim")
SHAPE_THE_STATE = (*SHAPE_THE_MODEL, "batch_size", "dataset", "queue_length", *CROP_FIELDS)

DIVERGENCE_ADVICE = ("Try a lower --base-lr or a longer warm-up (--warmup-epochs), and check the other rates "
                     "(--final-lr, --start-warmup and --weight-decay, which a typo can make huge); with your own "
                     "model, check that features and prototypes are L2-normalised.")


def check_workers_for_local_state(path: str | os.PathLike, meta: dict, workers: int) -> None:
    """Refuse to resume, on ``workers`` workers, a checkpoint (metadata ``meta``) whose
    workers each kept a queue or memory bank of their own, unless as many resume it."""
    if meta.get("local_ranks") and meta.get("world_size") != workers:
        raise ckpt.CheckpointError(
            f"{path}: written by {meta.get('world_size')} workers, resumed by {workers}; the per-worker "
            "queues or memory banks cannot be redistributed (resume on as many workers, or evaluate it)"
        )


def load_trainer_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, TrainConfig]:
    """A checkpoint written by :meth:`Trainer.save <swav_ref.train.Trainer.save>`: its
    arrays, metadata and configuration (:class:`~swav_ref.checkpoint.CheckpointError` for
    any other file)."""
    arrays, meta = ckpt.load_checkpoint(path)
    if not isinstance(meta, dict):
        raise ckpt.CheckpointError(f"{path}: its metadata is a {type(meta).__name__}, not a dict of entries; not a "
                                   "swav_ref trainer checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        found = (f"format {meta['format']!r}" if "format" in meta
                 else "it names no format: written by save_checkpoint itself, not by Trainer.save")
        raise ckpt.CheckpointError(f"{path}: not a swav_ref trainer checkpoint ({found})")
    if "config" not in meta:  # a worker's own state file (queue, memory bank) has the format but no model
        raise ckpt.CheckpointError(f"{path}: a worker's local state file (its queue or memory bank), not a "
                                   "checkpoint; load the checkpoint.npz beside it, which names it")
    return arrays, meta, checked_metadata(path, arrays, meta)


def _whole(value: Any, least: int = 0) -> bool:
    """An int (not a bool, not 4.5) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _finite(value: Any) -> bool:
    """A finite int or float (not a bool, not text)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checked_metadata(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> TrainConfig:
    """The configuration of a trainer checkpoint's metadata, once every entry the code reads
    is of the shape :meth:`Trainer.state <swav_ref.train.Trainer.state>` writes; else a
    CheckpointError naming the file and the entry (its checksum has no key, so anyone can
    write any metadata).

    ``step`` and ``config`` are required; the rest may be missing, as in checkpoints written
    before they were saved, but each entry present must be what
    :meth:`Trainer.save <swav_ref.train.Trainer.save>` writes: ``steps_per_epoch``,
    ``world_size`` whole numbers (``world_size`` required with per-worker files);
    ``local_ranks`` distinct ranks below ``world_size`` (all of them, or none, as written),
    with one ``local_files`` base name each (no folder: they lie beside the checkpoint);
    ``written_by`` a short text (``WRITTEN_BY``);
    ``log`` a list of records (the epochs'; the steps' are the ``log.*`` arrays, see
    :func:`check_log_columns`); ``normalisation`` a mean in [0, 1] and a std in (0, 1] per input
    channel of the stored first convolution (statistics of [0, 1] pixels; 1 for a constant
    channel, :func:`~swav_ref.train.input_normalisation`); ``data`` a count of images and
    their (C, H, W). The configuration must also describe the file's own weights (head
    widths, prototype sets) and its per-worker state, so that nothing is built from
    settings the file contradicts (a prototype set of 10**9 rows, say) before the
    weights' shapes are compared.
    """
    def refuse(entry: str, problem: str) -> ckpt.CheckpointError:
        return ckpt.CheckpointError(f"{path}: its {entry} {problem}")

    if not isinstance(meta["config"], dict):
        raise refuse("config", f"is a {type(meta['config']).__name__}, not a dict of settings")
    try:
        config = TrainConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise refuse("config", f"is not a valid configuration: {exc}") from exc
    if "step" not in meta:
        raise refuse("step", "is missing: the step the checkpoint was written at")
    for name, least in (("step", 0), ("steps_per_epoch", 1), ("world_size", 1)):
        if name in meta and not _whole(meta[name], least):
            unit = "workers" if name == "world_size" else "steps"
            raise refuse(name, f"is {meta[name]!r}, not a whole number of {unit} (at least {least})")
    ranks, files, world = meta.get("local_ranks"), meta.get("local_files"), meta.get("world_size")
    if ranks is not None:
        if not isinstance(ranks, list) or not all(_whole(r) for r in ranks):
            raise refuse("local_ranks", f"is {ranks!r}, not a list of worker ranks")
        if ranks and world is None:
            raise refuse("world_size", "is missing, yet local_ranks names per-worker files")
        if len(set(ranks)) != len(ranks) or any(r >= world for r in ranks):
            raise refuse("local_ranks", f"is {ranks!r}, not distinct ranks of its {world} worker(s)")
    if files is not None:
        if not isinstance(files, list) or not all(
                isinstance(f, str) and "\0" not in f and f not in ("", ".", "..") and Path(f).name == f for f in files):
            raise refuse("local_files", f"is {files!r}, not a list of file names (without a folder: the workers' "
                                        "files lie beside the checkpoint)")
        if files and len(files) != len(ranks or []):
            raise refuse("local_files", f"names {len(files)} files for the ranks {ranks!r}")
    log = meta.get("log", [])
    if not isinstance(log, list) or not all(isinstance(r, dict) for r in log):
        raise refuse("log", f"is a {type(log).__name__}, not a list of records (dicts)" if not isinstance(log, list)
                     else "holds a record that is not a dict")
    for r in log:
        loss = r.get("loss")
        if r.get("kind") == "step" and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
            raise refuse("log", f"holds a step record whose loss is {loss!r}, not a number")
    check_log_columns(path, arrays, meta)
    if "written_by" in meta and not (isinstance(meta["written_by"], str) and len(meta["written_by"]) <= 200):
        raise refuse("written_by", f"is {reprlib.repr(meta['written_by'])}, not the name and version of a program")
    if "monitor_fired" in meta and not isinstance(meta["monitor_fired"], bool):
        raise refuse("monitor_fired", f"is {meta['monitor_fired']!r}, not true or false")
    conv1 = arrays.get("model.backbone.conv1.weight")
    channels = conv1.shape[1] if getattr(conv1, "ndim", 0) == 4 else None  # a missing one is reported later
    if "normalisation" in meta:
        norm = meta["normalisation"]
        if not isinstance(norm, dict) or not all(isinstance(norm.get(k), list) for k in ("mean", "std")):
            raise refuse("normalisation", f"is {norm!r}, not {{'mean': [...], 'std': [...]}} (one number per "
                                          "input channel)")
        for key, ok, bound in (("mean", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
                               ("std", lambda v: 0.0 < v <= 1.0, "in (0, 1]")):
            values = norm[key]
            if not all(_finite(v) and ok(v) for v in values):
                raise refuse(f"normalisation {key}", f"is {values!r}: each must be a number {bound} (the "
                                                     "statistics of [0, 1] pixels)")
            if channels is not None and len(values) != channels:
                raise refuse(f"normalisation {key}", f"has {len(values)} value(s), but the model's first "
                                                     f"convolution (model.backbone.conv1.weight) takes {channels} "
                                                     "channel(s)")
    if meta.get("data") is not None:
        data = meta["data"]
        if not isinstance(data, dict):
            raise refuse("data", f"is {data!r}, not a dict (n_images, image_shape)")
        shape = data.get("image_shape")
        if not _whole(data.get("n_images")):
            raise refuse("data n_images", f"is {data.get('n_images')!r}, not a whole number of images")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_whole(n, 1) for n in shape)):
            raise refuse("data image_shape", f"is {shape!r}, not three positive whole numbers (C, H, W)")
        if channels is not None and shape[0] != channels:
            raise refuse("data image_shape", f"is {shape!r}: {shape[0]} channel(s), but the model's first "
                                             f"convolution (model.backbone.conv1.weight) takes {channels}")
        if "folder_decoder" in data and not _whole(data["folder_decoder"], 1):
            raise refuse("data folder_decoder", f"is {data['folder_decoder']!r}, not a version number")
        for key in ("name", "fingerprint"):  # (a data set handed over from Python may have no name)
            if data.get(key) is not None and not isinstance(data[key], str):
                raise refuse(f"data {key}", f"is {data[key]!r}, not text")
    _check_config_fits_state(path, arrays, meta, config)
    return config


def _check_config_fits_state(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict,
                             config: TrainConfig) -> None:
    """The head's widths and prototype sets of ``config`` against the file's own weights
    (:class:`~swav_ref.swav.head.SwAVHead`: ``projection.0`` (hidden, in) and
    ``projection.3`` (feat, hidden), or one ``projection`` (feat, in) without a hidden
    layer; ``prototypes{h}`` (K_h, feat)), and a SwAV queue against the per-worker state: a
    checkpoint written after the queue's epoch began holds the queue in its workers' files.
    CheckpointError before a model or a queue of the configuration's sizes is built."""
    if config.method == "supervised":  # a ClassifierHead, sized by the data's classes
        return
    feat, hidden = config.feat_dim, config.hidden_dim
    expected = ({"model.head.projection.0.weight": (hidden, None), "model.head.projection.3.weight": (feat, hidden)}
                if hidden else {"model.head.projection.weight": (feat, None)})
    expected.update({f"model.head.prototypes{h}.weight": (k, feat) for h, k in enumerate(config.n_prototypes)})
    differ = []
    for name, want in expected.items():
        got = arrays.get(name)
        got_shape = tuple(getattr(got, "shape", ()))
        if got is None:
            differ.append(f"{name} is missing")
        elif len(got_shape) != len(want) or any(w is not None and w != g for w, g in zip(want, got_shape)):
            shown = ", ".join("*" if w is None else str(w) for w in want)
            differ.append(f"{name} is {got_shape}, the configuration makes it ({shown})")
    extra = f"model.head.prototypes{len(config.n_prototypes)}.weight"
    if extra in arrays:
        differ.append(f"{extra} is there, the configuration has {len(config.n_prototypes)} prototype set(s)")
    if differ:
        raise ckpt.CheckpointError(
            f"{path}: the configuration disagrees with the checkpoint's own weights ({'; '.join(differ)}; "
            f"--hidden-dim {hidden} --feat-dim {feat} --n-prototypes {' '.join(map(str, config.n_prototypes))})")
    per_epoch = meta.get("steps_per_epoch")
    if (config.method == "swav" and config.queue_length > 0 and per_epoch is not None
            and meta.get("local_ranks") == [] and meta["step"] > config.epoch_queue_starts * per_epoch):
        raise ckpt.CheckpointError(
            f"{path}: the configuration disagrees with the checkpoint's own state (--queue-length "
            f"{config.queue_length} from epoch {config.epoch_queue_starts}, but at step {meta['step']}, in epoch "
            f"{(meta['step'] - 1) // per_epoch}, it holds no queue: local_ranks is empty)")


#: What the data folder of each data set read from disk is called in messages.
_DATA_FOLDERS = {"cifar10": "CIFAR-10 folder", "folder": "image folder"}


def check_recorded_data_dir(checkpoint: str | os.PathLike, config: TrainConfig) -> None:
    """Before a resume loads its data from the folder its checkpoint recorded
    (``config.data_dir``, when the command line gives no ``--data-dir``): that folder must
    be there, or :class:`~swav_ref.data.errors.DatasetError` says to give it with
    ``--data-dir``, as ``swav-ref eval`` does.

    A checkpoint copied from another machine names that machine's folder, perhaps in
    another OS's form (``C:\\Users\\x\\data`` read on Linux): a bare "image folder not
    found" would not say that the run can go on with the data's folder here.
    """
    data_dir = config.data_dir
    if config.dataset not in _DATA_FOLDERS or data_dir is None or Path(data_dir).is_dir():
        return
    written_elsewhere = ""
    if os.name != "nt" and PureWindowsPath(data_dir).drive:  # C:\..., or \\server\share\...
        written_elsewhere = " (a Windows path: the checkpoint was written on Windows)"
    elif os.name == "nt" and str(data_dir).startswith("/"):
        written_elsewhere = " (a Linux or macOS path: the checkpoint was written there)"
    raise DatasetError(
        f"--resume {checkpoint}: {data_dir}, the {_DATA_FOLDERS[config.dataset]} the checkpoint was trained on, is not "
        f"there{written_elsewhere}; if the data moved, or the checkpoint came from another machine, give their "
        "folder with --data-dir"
    )


#: The columns of the step records in a checkpoint (``log.<name>`` arrays), their dtype
#: and, for the code statistics a supervised step has not, the value that marks "absent".
LOG_COLUMNS = {"step": (np.int64, None), "epoch": (np.int64, None), "loss": (np.float64, None),
               "lr": (np.float64, None), "prototypes_used": (np.int64, -1),
               "code_entropy": (np.float64, math.nan), "code_row_entropy": (np.float64, math.nan)}


def log_as_arrays(records: list[dict]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The metrics log as a checkpoint keeps it: the step records as columns (``log.step``,
    ``log.loss``...: 8 bytes a value), the epoch records as they are (for the metadata).

    A record per step, as JSON in the metadata, is about 200 bytes: a long run (340,000
    steps, say CIFAR-10 at batch 64 for 435 epochs) would pass
    :data:`~swav_ref.checkpoint.MAX_METADATA_BYTES`, and every save would rewrite it all.
    """
    steps = [r for r in records if r["kind"] == "step"]
    arrays = {f"log.{name}": np.asarray([r.get(name, absent) for r in steps], dtype=dtype)
              for name, (dtype, absent) in LOG_COLUMNS.items()}
    return arrays, [r for r in records if r["kind"] != "step"]


def log_from_arrays(arrays: dict[str, np.ndarray], others: list[dict]) -> list[dict]:
    """The records :func:`log_as_arrays` took apart, in their order: each epoch record
    (written at the end of its epoch) goes before the first step record of a later epoch.
    (By epoch, not by step: a run resumed on another number of workers numbers its steps
    anew, from the next epoch's first, which can be lower than those logged before.)"""
    n = len(arrays["log.step"])
    columns = {name: arrays[f"log.{name}"].tolist() for name in LOG_COLUMNS}
    steps = []
    for i in range(n):
        record = {"kind": "step", "step": columns["step"][i], "epoch": columns["epoch"][i],
                  "loss": columns["loss"][i], "lr": columns["lr"][i]}
        if columns["prototypes_used"][i] != -1:
            record.update({name: columns[name][i] for name in ("prototypes_used", "code_entropy", "code_row_entropy")})
        steps.append(record)
    merged, i = [], 0
    for other in others:
        while i < n and steps[i]["epoch"] <= other.get("epoch", -1):
            merged.append(steps[i])
            i += 1
        merged.append(other)
    return merged + steps[i:]


def check_log_columns(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """A CheckpointError naming the file unless its ``log.*`` columns are those
    :func:`log_as_arrays` writes (one 1-D array each, of one length, of its dtype, finite
    losses), or absent, as in checkpoints written before the columns, whose metadata keeps
    every record. (:func:`checked_metadata` checks this on load; :func:`log_records` then
    rebuilds the records without checking again.)"""
    names = [f"log.{name}" for name in LOG_COLUMNS]
    present = [name for name in names if name in arrays]
    if not present:
        return
    if len(present) != len(names):
        missing = sorted(set(names) - set(present))
        raise ckpt.CheckpointError(f"{path}: its metrics log is incomplete ({', '.join(missing)} missing)")
    n = len(arrays["log.step"]) if getattr(arrays["log.step"], "ndim", 0) == 1 else -1
    for name, (dtype, _) in LOG_COLUMNS.items():
        column = arrays[f"log.{name}"]
        if column.ndim != 1 or column.shape[0] != n or column.dtype != dtype:
            raise ckpt.CheckpointError(f"{path}: its log.{name} is {column.dtype} of shape {column.shape}, not "
                                       f"{np.dtype(dtype)} of one value per logged step ({n})")
    if not np.all(np.isfinite(arrays["log.loss"])):
        raise ckpt.CheckpointError(f"{path}: its log.loss holds a loss that is not finite (a run stops at one)")
    if any(r.get("kind") == "step" for r in meta.get("log", [])):
        raise ckpt.CheckpointError(f"{path}: its metadata's log holds step records beside the log.* columns")


def log_records(arrays: dict[str, np.ndarray], meta: dict) -> list[dict]:
    """The metrics log of a checkpoint checked by :func:`check_log_columns`: its ``log.*``
    columns and the records of its metadata, in order (the metadata's records alone in a
    checkpoint written before the columns)."""
    if "log.step" not in arrays:
        return list(meta.get("log", []))
    return log_from_arrays(arrays, meta.get("log", []))


def data_record(data: ImageDataset) -> dict:
    """What a checkpoint records of its training data, to tell other data later: the number
    of images and their shape (C, H, W)."""
    return {"n_images": len(data), "image_shape": list(data.images.shape[1:])}


def trained_on_same(trained_on: dict, data: ImageDataset) -> bool:
    """Whether ``data`` has the number of images and the image shape of a checkpoint's
    ``meta["data"]``."""
    now = data_record(data)
    return {k: trained_on.get(k) for k in now} == now


class Resumable:
    """Saving and resuming a :class:`~swav_ref.train.Trainer` (which inherits from it).

    A class of its own so that the training loop and the checkpoints each read as one
    concept; its methods use the trainer's run state (``config``, ``comm``, ``xp``,
    ``dtype``, ``train_set``, ``steps_per_epoch``, ``total_steps``, ``step``, ``model``,
    ``optimizer``, ``queue``, ``bank``, ``targets``, ``log``, ``monitor``, ``mean``, ``std``,
    ``multicrop``, ``out_dir``) and a few of its methods (``learning_rate``,
    ``_multicrop_config``, ``_new_queue``, ``_broadcast_parameters``, ``_log_pending``).
    """

    _checkpoint: Path | None  # this run's last good checkpoint (set by save and load), see last_checkpoint
    _fingerprint: str | None  # of the training data, computed once, see data_fingerprint

    # -- this run's last good state ----------------------------------------------------
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

    # -- writing a checkpoint ------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict]:
        """The shared state (identical on every worker): model, optimiser, targets, step.

        Random streams need no saving: they are functions of (seed, rank, step)
        (:meth:`~swav_ref.train.Trainer.random`). Each worker's own state (queue, memory
        bank) is :meth:`local_state`; ``meta["local_ranks"]`` lists the ranks that have one, so that
        :meth:`load` can insist on their files.
        """
        arrays = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        arrays.update({f"optim.{k}": v for k, v in self.optimizer.state_dict().items()})
        log_columns, epoch_records = log_as_arrays(self.log.records)
        arrays.update(log_columns)
        for h, t in enumerate(self.targets or []):
            arrays[f"targets.{h}"] = t
        has_local = self.queue is not None or self.bank is not None  # on every worker or on none
        meta = {
            "format": CHECKPOINT_FORMAT,
            "written_by": WRITTEN_BY,  # for a reader's report; loading never depends on it
            "config": self.config.to_dict(),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.comm.size,
            # the input normalisation and the data it came from: features need no data set
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
            "data": {"name": self.train_set.name, **data_record(self.train_set),
                     "fingerprint": self.data_fingerprint(), "folder_decoder": FOLDER_DECODER},
            "local_ranks": list(range(self.comm.size)) if has_local else [],
            "monitor_fired": self.monitor.fired,
            "log": epoch_records,  # the step records are the log.* arrays
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
        its files of earlier steps (one another program holds open, on Windows, is left for
        the next save). A job killed at any point leaves a ``path`` whose
        files are all there: the previous one (and its files) or the new one.

        Steps taken since the last logging boundary are logged first, so that the
        checkpoint's log holds every step (a save in the middle of an epoch, from Python,
        would otherwise lose up to ``log_every - 1`` step records for good).
        """
        self._log_pending()  # on every worker: under MPI the losses are all-reduced
        arrays, meta = self.state()
        finite = all(bool(self.xp.all(self.xp.isfinite(v))) for k, v in arrays.items() if k.startswith("model."))
        if not finite:
            raise TrainingDivergedError(f"the parameters are not finite at step {self.step} (training diverged), so "
                                        f"this step was not saved to {path}; {self.what_is_kept()}. "
                                        f"{DIVERGENCE_ADVICE}")
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
                    try:
                        old.unlink(missing_ok=True)
                    except OSError:  # held open (Windows: a scanner, an indexer); the next save removes it
                        pass
        if self.comm.is_root:  # an earlier run's workers beyond this run's (a reused --out-dir)
            self._remove_files_of_absent_ranks(Path(path))
        self._checkpoint = Path(path)

    def _remove_files_of_absent_ranks(self, path: Path) -> None:
        """An earlier run's per-worker files of ranks that this run lacks (a run on more
        workers into the same ``--out-dir``): no worker of this run would ever remove them."""
        pattern = f"{glob.escape(path.stem)}.rank*.local{glob.escape(path.suffix)}"
        for old in path.parent.glob(pattern):
            rank = re.match(rf"{re.escape(path.stem)}\.rank(\d+)\.", old.name)
            if rank is not None and int(rank.group(1)) >= self.comm.size:
                with contextlib.suppress(OSError):
                    old.unlink(missing_ok=True)

    # -- resuming from one ------------------------------------------------------------------
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
        optimiser, dtype...; all but :data:`~swav_ref.resume.RESUME_MAY_CHANGE`) is listed in one warning,
        so that nobody continues a run under another recipe by accident.
        """
        arrays, meta, saved = load_trainer_checkpoint(path)
        compared = SHAPE_THE_MODEL if weights_only else SHAPE_THE_STATE
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
        self.log.records = log_records(arrays, meta)  # up to this checkpoint's step (fit rewrites the file)
        self._pending.clear()  # steps of an interrupted fit, past this checkpoint: not this run's any more
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
            decoder = ""
            if self.config.dataset == "folder" and self.config.image_size and \
                    trained_on.get("folder_decoder", 1) != FOLDER_DECODER:
                decoder = (". The checkpoint was written by an earlier swav_ref, which decoded JPEGs at full size "
                           "before resizing them; this one decodes a large JPEG at reduced scale first, which moves "
                           "its pixels by a fraction of a grey level: if the folder is unchanged, that is the whole "
                           "difference, and the run goes on as well as it would have")
            warnings.warn(f"--resume {path}: the training images (or their order or labels) differ from those the "
                          f"checkpoint was trained on ({trained_on.get('name')}), though their number and shape "
                          f"agree; this run continues it on other data ({data.name}){decoder}", stacklevel=4)

    def _warn_of_other_settings(self, path: str | os.PathLike, saved: TrainConfig, meta: dict) -> None:
        """One warning listing every recipe setting of this run that differs from the
        checkpoint's (all fields but :data:`~swav_ref.resume.RESUME_MAY_CHANGE`; those that shape the state,
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
        check_workers_for_local_state(path, meta, self.comm.size)
        if self.comm.rank not in ranks:
            raise ckpt.CheckpointError(f"{path}: its local_ranks {ranks} name no queue or memory bank file for "
                                       f"rank {self.comm.rank}")
        local = Path(path).with_name(files[ranks.index(self.comm.rank)]) if files else old_name
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
        epoch (other workers) the start of the epoch after the last one it completed. Both
        numbers were checked to be whole (:func:`checked_metadata`)."""
        step, saved_per_epoch = meta["step"], meta.get("steps_per_epoch", self.steps_per_epoch)
        if saved_per_epoch == self.steps_per_epoch:
            return step
        if step % saved_per_epoch:
            raise ckpt.CheckpointError(f"{path}: written in the middle of an epoch (step {step} of "
                                       f"{saved_per_epoch} per epoch) with other steps per epoch than this run's "
                                       f"{self.steps_per_epoch}; resume it on "
                                       f"{meta.get('world_size', 'as many')} workers")
        epochs = step // saved_per_epoch
        # The prototype freeze counts steps. The checkpoint's (unless this run set another) is
        # rescaled to last as many epochs, rounded up, as the learning-rate schedule does.
        freeze, freeze_note = self.config.freeze_prototypes_niters, ""
        if self.config.method == "swav" and freeze == meta.get("config", {}).get("freeze_prototypes_niters"):
            rescaled = -(-freeze * self.steps_per_epoch // saved_per_epoch)
            self.config = dataclasses.replace(self.config, freeze_prototypes_niters=rescaled)
            freeze_note = f"; the prototype freeze, {freeze} steps there, is {rescaled} here (as many epochs)"
        if self.comm.is_root:
            workers = meta.get("world_size", "other")
            warnings.warn(f"{path}: {epochs} epoch{'s' * (epochs != 1)} of {saved_per_epoch} steps "
                          f"({workers} worker{'s' * (workers != 1)}) "
                          f"continue with {self.steps_per_epoch} steps per epoch ({self.comm.size} worker"
                          f"{'s' * (self.comm.size != 1)}) from "
                          f"epoch {epochs + 1}: the schedule carries on, but not bit for bit{freeze_note}",
                          stacklevel=4)
        return epochs * self.steps_per_epoch

    def _load_local(self, path: Path) -> None:
        arrays, meta = ckpt.load_checkpoint(path)
        if meta.get("step") != self.step:
            raise ckpt.CheckpointError(f"{path}: local state of step {meta.get('step')} does not match step {self.step}")
        if "queue.embeddings" in arrays:  # its shape, before a queue of the configuration's length is made
            cfg = self.config
            try:
                length = queue_length_per_worker(cfg.queue_length, cfg.batch_size, self.comm.size)
            except ValueError:
                length = None
            want, got = (len(cfg.crops_for_assign), length, cfg.feat_dim), tuple(getattr(arrays["queue.embeddings"],
                                                                                         "shape", ()))
            if got != want:
                raise ckpt.CheckpointError(
                    f"{path}: the configuration disagrees with the checkpoint's own state (queue.embeddings is {got}; "
                    f"--queue-length {cfg.queue_length} on {self.comm.size} worker(s), --crops-for-assign "
                    f"{' '.join(map(str, cfg.crops_for_assign))} and --feat-dim {cfg.feat_dim} make it {want})")
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
