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

import dataclasses
import glob
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from swav_ref import checkpoint as ckpt
from swav_ref.config import CROP_FIELDS, ConfigError, TrainConfig, as_options, scheduled_rate
from swav_ref.data.datasets import ImageDataset
from swav_ref.data.multicrop import MultiCrop
from swav_ref.deepcluster import IGNORE_INDEX, MemoryBank

CHECKPOINT_FORMAT = "swav_ref.trainer/1"


class TrainingDivergedError(RuntimeError):
    """The loss or the parameters became NaN or infinite; a good checkpoint is never
    overwritten by a bad one."""


#: The TrainConfig fields that a resume may change without a word: how much longer the run
#: goes on (``epochs``, ``stop_after``), where and how often it writes and reports
#: (``out_dir``, ``progress``, ``log_every``, ``checkpoint_every``), the machine it runs on
#: (``backend``, ``tf32``: the same computation, to rounding), and where the data lie
#: (``data_dir``, ``image_size``: the data themselves are compared instead, see
#: :meth:`Trainer.load <swav_ref.train.Trainer.load>`). Every other field is the recipe: a
#: resume that changes one continues the checkpoint's run under another recipe, which is
#: warned about (the model's shape, the method, the batch, the queue and the crops are
#: refused outright).
RESUME_MAY_CHANGE = ("epochs", "stop_after", "out_dir", "progress", "log_every", "checkpoint_every",
                     "backend", "tf32", "data_dir", "image_size")


DIVERGENCE_ADVICE = ("Try a lower --base-lr or a longer warm-up (--warmup-epochs); with your own model, check "
                     "that features and prototypes are L2-normalised.")


def load_trainer_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, TrainConfig]:
    """A checkpoint written by :meth:`Trainer.save <swav_ref.train.Trainer.save>`: its
    arrays, metadata and configuration (:class:`~swav_ref.checkpoint.CheckpointError` for
    any other file)."""
    arrays, meta = ckpt.load_checkpoint(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{path}: not a swav_ref trainer checkpoint (format {meta.get('format')!r})")
    if "config" not in meta:  # a worker's own state file (queue, memory bank) has the format but no model
        raise ckpt.CheckpointError(f"{path}: a worker's local state file (its queue or memory bank), not a "
                                   "checkpoint; load the checkpoint.npz beside it, which names it")
    return arrays, meta, TrainConfig.from_dict(meta["config"])


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
    ``_multicrop_config``, ``_new_queue``, ``_broadcast_parameters``).
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
                          f"epoch {epochs + 1}: the schedule carries on, but not bit for bit", stacklevel=4)
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
