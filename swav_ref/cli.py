"""The command line: ``swav-ref COMMAND [options]`` (or ``python -m swav_ref``).

Commands
--------
demo      the main job: SwAV on digits on the CPU, evaluated against baselines (minutes).
train     train SwAV, DeepCluster-v2 or the supervised baseline, with every option.
eval      evaluate a checkpoint: linear probe and kNN, with the raw-pixel baseline.
dessert   the optimal-transport dessert example: prints the plan, writes figures.

``swav-ref COMMAND --help`` documents every option with its default. Under ``mpiexec -n N``
``train`` runs data-parallel over N processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from swav_ref.backend import BACKENDS
from swav_ref.data.datasets import ARRAYS, DATASETS
from swav_ref.data.multicrop import default_config
from swav_ref.config import CHOICES, METHODS, UNUSED_BY, TrainConfig

#: Help for each TrainConfig field, shown by ``swav-ref train --help``.
OPTION_HELP = {
    "method": f"training method: one of {', '.join(METHODS)} (supervised: the same network trained with the labels, "
              "on the recipe's crops; the demo's supervised row uses the large crops only)",
    "dataset": "digits (embedded), cifar10 (binary version, needs --data-dir) or folder (needs --data-dir)",
    "data_dir": "folder holding the data set (cifar-10-batches-bin, or images / one sub-folder per class)",
    "backend": "array backend: numpy (CPU) or cupy (GPU, the gpu extra)",
    "dtype": "floating-point type of the model and data: float32 or float64",
    "tf32": "cupy only: float32 matrix products on TF32 tensor cores (faster on Ampere and later GPUs, "
            "about 3 significant digits per product; PyTorch's convolutions do the same by default)",
    "arch": "backbone: resnet_tiny (small, for 8x8 digits; the default on every data set) or resnet18 (CIFAR "
            "layout)",
    "epochs": "number of epochs",
    "batch_size": "images per batch per worker",
    "n_crops": "number of crops of each size (large first), e.g. 2 6",
    "crop_sizes": "side of the crops of each size in pixels, e.g. 32 16",
    "min_scale": "smallest area fraction of a crop, per size",
    "max_scale": "largest area fraction of a crop, per size",
    "crops_for_assign": "indices of the crops whose codes are predicted (the assignment crops)",
    "hidden_dim": "width of the projection MLP (0 = one linear layer)",
    "feat_dim": "embedding dimension d",
    "n_prototypes": "number of prototypes K (several numbers = several prototype sets, as DeepCluster-v2)",
    "epsilon": "SwAV: entropic regularisation of Sinkhorn (smaller = sharper codes)",
    "temperature": "softmax temperature tau of the swapped prediction (DeepCluster-v2: of its prediction of the "
                   "cluster)",
    "sinkhorn_iterations": "SwAV: Sinkhorn-Knopp iterations per batch",
    "queue_length": "SwAV: embeddings kept in the queue per assignment crop, all workers together (each keeps "
                    "its share); 0 = no queue",
    "epoch_queue_starts": "SwAV: epoch at which the queue is created (it joins the codes once full)",
    "freeze_prototypes_niters": "SwAV: iterations during which the prototypes are not updated (DeepCluster-v2's, "
                                "the k-means centroids, never are)",
    "optimizer": "lars (as SwAV) or sgd",
    "base_lr": "peak learning rate after warm-up",
    "final_lr": "learning rate at the end of the cosine schedule",
    "warmup_epochs": "epochs of linear warm-up (capped at half of --epochs, so that the rate also decays)",
    "start_warmup": "learning rate at the start of the warm-up",
    "weight_decay": "weight decay",
    "momentum": "SGD momentum",
    "kmeans_iters": "DeepCluster-v2: k-means iterations per epoch",
    "kmeans_restarts": "DeepCluster-v2: k-means restarts (the best objective wins)",
    "kmeans_init": "DeepCluster-v2: initial centroids, k-means++ seeding or random rows (the official code's)",
    "sync_bn": "synchronise BatchNorm statistics across MPI workers",
    "seed": "random seed (data order, augmentation, initialisation)",
    "out_dir": "output folder: checkpoint.npz, metrics.jsonl, config.json, eval.json, training_curves.png "
               "(runs/<method> for a --method other than swav)",
    "log_every": "every N steps, bring the losses to the host, check them for NaN and collapse, write them to "
                 "metrics.jsonl and update the bar (every step is recorded; a GPU waits only at these steps)",
    "checkpoint_every": "write a checkpoint every N epochs (and always after this run's last epoch)",
    "stop_after": "stop after N epochs in this run (0 = train to the end); the learning-rate schedule still spans "
                  "--epochs, so --resume carries on (for time-limited cluster jobs)",
    "progress": "show the progress bar (default: when the error stream is a terminal; not into a log file, "
                "where each redraw would be a line, nor under mpiexec, which pipes it)",
    "image_size": "folder data: resize every image to this square size in pixels (0 = keep the files' size, "
                  "which must then be the same for all)",
    "image_fit": "with --image-size: stretch each image to the square (its whole content, distorted if it is "
                 "not square), or crop: its shorter side to the size and the middle of the longer side kept",
}


#: The options whose default is the data set's recipe (TrainConfig leaves them None): value type, nargs.
RECIPE_OPTIONS = {"n_crops": (int, "+"), "crop_sizes": (int, "+"), "min_scale": (float, "+"),
                  "max_scale": (float, "+"), "freeze_prototypes_niters": (int, None)}


def _recipe_help() -> dict[str, str]:
    """What each recipe option defaults to, read from the recipes themselves
    (:func:`~swav_ref.data.multicrop.default_config`; a folder shares CIFAR-10's counts and
    scales, at its own size)."""
    digits, cifar = default_config("digits"), default_config("cifar10")

    def show(values) -> str:
        return " ".join(f"{v:g}" for v in values)

    return {
        "n_crops": f"digits {show(digits.n_crops)}; cifar10 and folder {show(cifar.n_crops)}",
        "crop_sizes": f"digits {show(digits.sizes)}; cifar10 {show(cifar.sizes)}; folder S and S*96/224, "
                      "S the image side",
        "min_scale": f"digits {show(digits.min_scale)}; cifar10 and folder {show(cifar.min_scale)}, "
                     "as the official code",
        "max_scale": f"digits {show(digits.max_scale)}; cifar10 and folder {show(cifar.max_scale)}, "
                     "as the official code",
        "freeze_prototypes_niters": "the steps of one epoch, two on digits",
    }


RECIPE_HELP = _recipe_help()


def _add_config_options(parser: argparse.ArgumentParser, defaults: TrainConfig, skip: tuple[str, ...] = ()) -> None:
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        help_text = OPTION_HELP.get(field.name, field.name)
        if isinstance(default, bool):  # --progress: None, decided by the terminal (_bar_shown)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=None if field.name == "progress" else default, help=help_text)
        elif field.name in RECIPE_OPTIONS:  # default None: the data set's recipe, said in the help
            kind, nargs = RECIPE_OPTIONS[field.name]
            parser.add_argument(flag, type=kind, nargs=nargs, default=None,
                                help=f"{help_text} (default: the data set's recipe: {RECIPE_HELP[field.name]})")
        elif isinstance(default, tuple):
            kind = type(default[0])
            parser.add_argument(flag, type=kind, nargs="+", default=list(default), help=help_text)
        elif field.name == "data_dir":
            parser.add_argument(flag, default=default, help=help_text)
        else:
            choices = {**CHOICES, "backend": BACKENDS, "dataset": DATASETS}.get(field.name)
            parser.add_argument(flag, type=type(default), default=default, choices=choices, help=help_text)
    parser.set_defaults(_config_fields=[f.name for f in dataclasses.fields(TrainConfig) if f.name not in skip])


def _config_from_args(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    values = {name: getattr(args, name) for name in args._config_fields}
    return dataclasses.replace(base, **values)  # a bad value raises ConfigError, reported in one line


def _output_folder(path: str, option: str) -> Path:
    """``path`` as a folder to write into, checked before any work is done (and without
    making it yet): an existing file in its place (or on the way to it), or a place where
    nothing can be written, is reported now, not after training."""
    folder = Path(path)
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise UserError(f"{option} {path}: {part} is a file, not a folder")
    existing = next(part for part in (folder, *folder.parents) if part.exists())
    try:
        # A trial folder, removed at once: the one sure test of permissions, read-only
        # mounts and pseudo file systems such as /proc (where even root cannot write).
        os.rmdir(tempfile.mkdtemp(prefix=".swav_ref_write_test_", dir=existing))
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write into {existing} ({exc.strerror or exc})") from exc
    return folder


def _output_files(folder: Path, names: tuple[str, ...], option: str) -> None:
    """The files a command will write into ``folder``, checked before any work is done:
    a folder in the place of one (``checkpoint.npz/``) would fail only when it is written,
    after the training or the evaluation."""
    for name in names:
        if (folder / name).is_dir():
            raise UserError(f"{option}: {folder / name} is a folder, where this command writes its {name} file; "
                            "move it away or choose another folder")


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N",
        help="threads for NumPy's matrix products (BLAS) on the CPU; 0 = the library's default, one per core. "
             "On a machine busy with other work, 1 can be several times faster: idle BLAS threads spin "
             "and compete with the other programs for the cores. (NumPy's macOS wheels use Apple's "
             "Accelerate, which this cannot reach once started: set VECLIB_MAXIMUM_THREADS=N in the "
             "environment instead)")


def _epoch_line_printer(trainer: Any) -> Callable[[dict], None]:
    """What ``train`` prints after each epoch, one line that stays (the bar of the epoch
    goes, and a batch job's log has no bar): the epoch, its mean loss, the learning rate
    reached, how long it took, the throughput, and for SwAV and DeepCluster-v2 how many
    prototypes the last step's codes used (fewer and fewer: collapse); ``swav-ref train
    --epochs 3`` on the digits, on a 2-core CPU::

        epoch 2/3: loss 4.6032, lr 1.14, 0.9 s, 1579 images/s, prototypes used 60 of 100
    """
    def print_epoch(record: dict) -> None:
        epochs, seconds = trainer.config.epochs, record["seconds"]
        line = (f"epoch {record['epoch'] + 1}/{epochs}: loss {record['loss']:.4f}, "
                f"lr {trainer.learning_rate(record['step'] - 1):.3g}, {seconds:.1f} s")
        if seconds > 0:
            line += f", {record['images'] / seconds:.0f} images/s"
        last = next((r for r in reversed(trainer.log.records) if r.get("kind") == "step"), {})
        if "prototypes_used" in last:
            line += f", prototypes used {last['prototypes_used']} of {trainer.config.n_prototypes[0]}"
        print(line, flush=True)
    return print_epoch


def _bar_shown() -> bool:
    """Whether progress bars are shown by default: only on a terminal. Into a file (a batch
    job's log, ``> log.txt``) every redraw of a bar would be kept, thousands of lines of
    ``\r``-joined text; ``--progress`` shows them anyway."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _limit_threads(n: int) -> None:
    """Cap every BLAS and OpenMP thread pool for the rest of the command: NumPy's, and
    SciPy's and scikit-learn's (the linear probe), loaded first so that threadpoolctl (a
    dependency of scikit-learn) reaches them too; the environment variables cover any
    library loaded later."""
    if n < 0:
        raise UserError(f"--threads {n}: must be at least 0 (0 = the BLAS library's default)")
    cpus = _usable_cpus()
    if cpus and n > cpus:  # threads past the CPUs only spin and take turns with the busy ones
        raise UserError(f"--threads {n}: this process may use {cpus} CPU(s); use at most {cpus} "
                        "(0 = the BLAS library's default)")
    if n:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(n)
        import scipy.linalg  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)


def _usable_cpus() -> int | None:
    """The CPUs this process may run on (its affinity: taskset, a Slurm allocation), which
    can be fewer than the machine's ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _one_process_only(command: str) -> None:
    """``demo``, ``eval`` and ``dessert`` run in one process: under ``mpiexec -n N`` every
    rank would run the whole job and write the same files. Each rank stops alike (exit status 2, no
    collective to hang in); rank 0 says why."""
    from swav_ref.distributed import detect_mpi_launch

    # SLURM_NTASKS alone is no launch: a batch script's own shell sees the allocation's task
    # count without being one of srun's tasks. Rank 0 of a launch of unannounced size runs.
    launched, rank, size = detect_mpi_launch({k: v for k, v in os.environ.items() if k != "SLURM_NTASKS"})
    if launched and ((size or 1) > 1 or (rank or 0) > 0):
        if not rank:
            print(f"swav-ref: error: {command} runs in one process; start it without mpiexec/srun "
                  "(data-parallel training is swav-ref train)", file=sys.stderr)
        raise SystemExit(2)


class UserError(Exception):
    """A problem with what the user asked for (options, data, checkpoint, machine), reported
    as one line, ``swav-ref: error: ...``, with exit status 2, instead of a traceback."""

    exit_status = 2


class Interrupted(UserError):
    """Training stopped by Ctrl-C: one line saying which checkpoint is kept and how to go
    on, and the shell's exit status for an interrupt (130)."""

    exit_status = 130


# -- dessert -------------------------------------------------------------------------------
def _add_dessert(sub) -> None:
    p = sub.add_parser("dessert", help="optimal transport on the dessert example (Sinkhorn vs exact)",
                       formatter_class=_DefaultsInHelp)
    p.add_argument("--lam", type=float, default=10.0,
                   help="lambda of the plan P ~ exp(-lambda M): larger = less entropy, closer to the exact plan")
    p.add_argument("--out", default="dessert_out", help="folder for the figures")
    p.set_defaults(func=_run_dessert)


def _run_dessert(args: argparse.Namespace) -> int:
    import math

    from swav_ref.ot.desserts import run_dessert_example

    _one_process_only("dessert")
    if not (math.isfinite(args.lam) and args.lam > 0):
        raise UserError(f"--lam {args.lam}: the regularisation strength must be a positive number")
    run_dessert_example(lam=args.lam, out_dir=_output_folder(args.out, "--out"))
    return 0


# -- train ---------------------------------------------------------------------------------
class _DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default as it is typed (``0 1``, not ``[0, 1]``),
    except where the default is None: the help of those says in words what happens (the
    data set's recipe, no data folder)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        shown = super()._get_help_string(action)
        if isinstance(action.default, (list, tuple)):
            shown = shown.replace("%(default)s", " ".join(map(str, action.default)))
        return shown


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train SwAV, DeepCluster-v2 or the supervised baseline",
                       formatter_class=_DefaultsInHelp)
    _add_config_options(p, TrainConfig())
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run of this checkpoint (e.g. OUT_DIR/checkpoint.npz), bit for bit: every option "
                        "not given takes the checkpoint's value (but --stop-after and --progress, which belong to "
                        "this job: give --stop-after again), and the output goes to its folder unless --out-dir "
                        "is given")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the trained backbone (linear probe, kNN) at the end")
    _add_threads_option(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from swav_ref import plots
    from swav_ref.distributed import get_communicator, install_abort_on_exception
    from swav_ref.experiment import METHOD_NAMES, check_evaluable, evaluate_trainer
    from swav_ref.results import format_results, results_table, save_results_json
    from swav_ref.resume import WRITTEN_BY
    from swav_ref.train import Trainer

    _limit_threads(args.threads)
    args.comm = comm = get_communicator()  # (kept for main, which ends the job on an error)
    install_abort_on_exception(comm)
    if not comm.is_root:  # every rank loads the same data and settings: rank 0 warns of them for all
        warnings.simplefilter("ignore", UserWarning)  # (a RuntimeWarning, such as a shared GPU's, is a machine's)
    given = _options_given(args.command_args)
    if args.progress is None:
        args.progress = _bar_shown()
    if args.resume is None:
        config = _config_from_args(args, TrainConfig())
        config.check_trainable()  # before anything is loaded, built or written
        if "out_dir" not in given and config.method != "swav":
            # Each method its own default folder: a DeepCluster-v2 or supervised run would
            # otherwise replace the SwAV run in runs/swav (it would warn first, but why risk it).
            config = dataclasses.replace(config, out_dir=f"runs/{config.method}")
    else:
        if not Path(args.resume).is_file():
            raise UserError(f"--resume {args.resume}: no such checkpoint file")
        # read before anything is written, so a corrupt file is refused first
        config, changed = _resumed_config(args, args.resume, given, comm.size)
        if "data_dir" not in given:  # the checkpoint's folder, perhaps another machine's (C:\... on Linux)
            from swav_ref.resume import check_recorded_data_dir

            check_recorded_data_dir(args.resume, config)
        if comm.is_root:
            print(f"resuming {args.resume} with its settings" + (f", except {changed} (given here)" if changed else "")
                  + f"; writing to {config.out_dir}")
    _output_folder(config.out_dir, "--out-dir")
    _output_files(Path(config.out_dir), ("checkpoint.npz", "metrics.jsonl", "config.json", "training_curves.png",
                                         "eval.json"),
                  f"--out-dir {config.out_dir}")
    if "warmup_epochs" in given and config.warmup_epochs > config.epochs // 2:
        warnings.warn(f"--warmup-epochs {config.warmup_epochs} is more than half of --epochs {config.epochs}: the "
                      f"warm-up is capped at {config.epochs // 2} epoch(s), so that the rate also decays", stacklevel=2)
    unused = [name for name in UNUSED_BY[config.method] if name in given]
    if unused:
        warnings.warn(f"{', '.join('--' + n.replace('_', '-') for n in unused)}: not used by --method "
                      f"{config.method}, so given for nothing", stacklevel=2)
    if comm.is_root:
        print(comm.describe(gpu=config.backend == "cupy"))
    out_dir_existed = Path(config.out_dir).exists()
    trainer = Trainer(config, comm=comm)
    trainer.on_epoch_end = _epoch_line_printer(trainer)
    evaluate = args.evaluate and trainer.test_set is not None and trainer.test_set.has_labels
    if evaluate and comm.is_root:
        try:  # before training, not after it
            check_evaluable(trainer.train_set, trainer.test_set)
        except ValueError as exc:
            if not out_dir_existed:  # the trainer made it; leave nothing behind a refusal
                with contextlib.suppress(OSError):
                    Path(config.out_dir).rmdir()
            raise UserError(f"{exc}; or pass --no-evaluate to train without the evaluation") from exc
    elif args.evaluate and comm.is_root:
        print(f"no evaluation at the end: {trainer.train_set.name} has no labels (a flat image folder); the linear "
              "probe and kNN need one sub-folder per class")
    stale = Path(config.out_dir) / "eval.json"
    if comm.is_root and stale.is_file():  # the scores of the checkpoint this run replaces
        stale.unlink()
    try:
        trainer.fit(resume=args.resume)
    except KeyboardInterrupt:  # (under mpiexec every rank gets it, and main ends the job)
        kept = trainer.last_checkpoint
        launcher = f"mpiexec -n {comm.size} " if comm.size > 1 else ""
        raise Interrupted(f"interrupted at step {trainer.step}; {trainer.what_is_kept()}"
                          + (f"; to continue: {launcher}swav-ref train --resume {kept}" if kept else "")) from None
    if not comm.is_root:
        return 0
    out = Path(config.out_dir)
    steps = trainer.log.steps()
    if steps:
        fig = plots.training_curves(steps, None if config.method == "supervised" else config.n_prototypes[0])
        fig.savefig(out / "training_curves.png", dpi=110)
    print(f"checkpoint: {out / 'checkpoint.npz'}\nmetrics:    {out / 'metrics.jsonl'}")
    if evaluate:
        row = {"method": METHOD_NAMES[config.method], **evaluate_trainer(trainer, config.seed)}
        table = results_table([row])
        print(format_results(table))
        # kept, not only printed: a batch job's log may be lost (swav-ref eval writes the same
        # file, with the raw-pixel baseline beside it)
        save_results_json(out / "eval.json", [row], metadata={"checkpoint": str(out / "checkpoint.npz"),
                                                               "written_by": WRITTEN_BY, "evaluated_by": WRITTEN_BY,
                                                               "step": trainer.step, "config": config.to_dict(),
                                                               "k_used": table.attrs["k_used"]})
        print(f"results:    {out / 'eval.json'}")
    return 0


# -- eval ----------------------------------------------------------------------------------
def _add_eval(sub) -> None:
    # No ArgumentDefaultsHelpFormatter: each default is "what the checkpoint says", which the
    # help states in words; the formatter would add a second, meaningless "(default: None)".
    p = sub.add_parser("eval", help="evaluate a checkpoint: linear probe and kNN against raw pixels")
    p.add_argument("checkpoint", help="a checkpoint.npz written by swav-ref train")
    p.add_argument("--backend", default=None, choices=("numpy", "cupy"),
                   help="array backend (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None,
                   help="where the data of a cifar10 or folder checkpoint now lies (default: the checkpoint's "
                        "data folder); not for digits, which is embedded")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="folder data: resize every image to N x N, stretched or cropped as the checkpoint's "
                        "--image-fit says (default: the checkpoint's --image-size)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: eval.json next to the checkpoint)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="score the raw pixels too, the baseline the model must beat (default: yes); a linear probe "
                        "on C x H x W inputs is slow on large images: about an hour for CIFAR-10 on one core, far "
                        "more at 224 px, so --no-baseline skips it once it is known")
    _add_threads_option(p)
    p.set_defaults(func=_run_eval)


def _eval_data(args: argparse.Namespace, config: TrainConfig):
    """``(train, test)`` for ``swav-ref eval``: the checkpoint's data, split as training split
    them (the same seed), or the folder of ``--data-dir`` (at ``--image-size``), checked to
    be labelled and evaluable. Only the data: an evaluation needs no optimiser, batch or
    queue, so none of training's checks on them apply."""
    from swav_ref.data.datasets import load_dataset
    from swav_ref.experiment import check_evaluable

    data_dir, image_size = config.data_dir, config.image_size
    if args.data_dir is not None:
        if config.dataset == "digits":
            raise UserError(f"--data-dir {args.data_dir}: {args.checkpoint} was trained on digits, which is "
                            "embedded; --data-dir applies to cifar10 and folder checkpoints only, so leave it out")
        if not Path(args.data_dir).is_dir():
            problem = "is not a folder" if Path(args.data_dir).exists() else "does not exist"
            raise UserError(f"--data-dir {args.data_dir} {problem}; give the folder holding the "
                            f"{config.dataset} data of {args.checkpoint}")
        data_dir = args.data_dir
    if args.image_size is not None:
        if config.dataset != "folder":
            raise UserError(f"--image-size {args.image_size}: applies to image-folder checkpoints only "
                            f"({args.checkpoint} was trained on {config.dataset})")
        if args.image_size < 1:
            raise UserError(f"--image-size {args.image_size}: must be at least 1 pixel")
        image_size = args.image_size
    if config.dataset != "digits" and not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}, the folder {args.checkpoint} was trained on, is not there any more; if the "
                        "data moved, give their folder with --data-dir")
    # (a configuration holds "crop" only with an image size: config.image_fit applies as it is)
    train, test = load_dataset(config.dataset, data_dir, image_size=image_size or None, image_fit=config.image_fit,
                               seed=0)
    if not (train.has_labels and test is not None and test.has_labels):
        raise UserError(f"the data set of {args.checkpoint} ({config.dataset} in {data_dir}) has no labels, so there "
                        "is nothing to score against: evaluation needs one sub-folder per class "
                        "(DATA_DIR/<class>/<image>); pass such a folder with --data-dir")
    try:
        check_evaluable(train, test)
    except ValueError as exc:
        raise UserError(f"cannot evaluate {args.checkpoint}: {exc}") from exc
    return train, test


def _run_eval(args: argparse.Namespace) -> int:
    from swav_ref.backend import BackendUnavailableError, get_backend, set_tf32
    from swav_ref.encoder import encoder_from_loaded
    from swav_ref.evaluate import evaluate_features, raw_pixel_features
    from swav_ref.results import format_results, results_table, save_results_json
    from swav_ref.experiment import METHOD_NAMES
    from swav_ref.resume import WRITTEN_BY, load_trainer_checkpoint

    _one_process_only("eval")
    _limit_threads(args.threads)
    loaded = load_trainer_checkpoint(args.checkpoint)  # read once: the encoder is built from it below
    _, meta, config = loaded
    if config.dataset == ARRAYS:
        raise UserError(f"{args.checkpoint} was trained on images handed to the Trainer from Python "
                        "(dataset 'arrays'), which the command line cannot load; evaluate it from Python: "
                        "swav_ref.encoder.load_encoder(path).features(images), then swav_ref.evaluate.evaluate_features "
                        "(linear probe and kNN) or a classifier of your choice")
    if args.out and args.out.endswith(("/", os.sep)) and not Path(args.out).is_dir():  # (a folder: below)
        raise UserError(f"--out {args.out}: a folder; eval's --out is the JSON file to write (train's and demo's "
                        f"are folders), e.g. --out {Path(args.out) / 'eval.json'}")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("eval.json")
    # before the evaluation, not after it
    _output_folder(str(out.parent), "--out" if args.out else "eval.json goes next to the checkpoint (give --out): its folder")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the results' file name (e.g. {out / 'eval.json'})" if args.out
                        else f"{out} is a folder, where the results go by default; move it away or give --out FILE")
    backend = args.backend or config.backend
    try:
        xp = get_backend(backend)
    except BackendUnavailableError as exc:
        if args.backend:
            raise UserError(f"--backend {args.backend}: {exc}") from exc
        raise UserError(f"{args.checkpoint} was trained with --backend cupy, which is not usable here "
                        f"({exc}); to evaluate it on the CPU, add --backend numpy") from exc
    set_tf32(xp, config.tf32 and backend == "cupy")  # as in training: a GPU setting, off on the CPU
    train, test = _eval_data(args, config)
    encoder = encoder_from_loaded(args.checkpoint, loaded, backend=backend, train_set=train)
    if train.images.shape[1] != encoder.backbone.in_channels:
        raise UserError(f"{args.checkpoint} takes images of {encoder.backbone.in_channels} channel(s), but "
                        f"{train.name} has {train.images.shape[1]}: evaluate it on data like those it was trained on")
    _warn_if_other_data(args.checkpoint, meta.get("data"), train)
    with warnings.catch_warnings():
        # Images of another size were just warned about, with the checkpoint's name; the
        # encoder would say it again for the training and the test images.
        warnings.filterwarnings("ignore", message="the encoder was trained on ")
        train_features, test_features = encoder.features(train.images), encoder.features(test.images)
    # The probe's folds are shuffled by the run's seed, as in training's own evaluation,
    # so that eval reproduces the accuracy that training reported.
    rows = [{"method": "raw pixels", **evaluate_features(raw_pixel_features(train.images), train.labels,
                                                         raw_pixel_features(test.images), test.labels,
                                                         seed=config.seed)}] if args.baseline else []
    rows.append({"method": f"{METHOD_NAMES[config.method]} (step {int(meta['step'])})",
                 **evaluate_features(train_features, train.labels, test_features, test.labels, seed=config.seed)})
    table = results_table(rows)
    print(format_results(table))
    save_results_json(out, rows, metadata={"checkpoint": str(args.checkpoint),
                                           "written_by": meta.get("written_by"), "evaluated_by": WRITTEN_BY,
                                           "config": config.to_dict(),
                                           "k_used": table.attrs["k_used"]})
    print(f"results: {out}")
    return 0


#: The settings a resume leaves to this command line even when it does not give them: how
#: long this job runs and whether it shows a bar. (Of the others, those a resume may change
#: without a word are :data:`swav_ref.resume.RESUME_MAY_CHANGE`; the trainer warns of the rest.)
RESUME_KEEPS_THIS_RUNS = ("stop_after", "progress")


def _resumed_config(args: argparse.Namespace, checkpoint: str, given: set[str],
                    workers: int = 1) -> tuple[TrainConfig, str]:
    """Resuming continues the checkpoint's run: its configuration, with the settings given
    on this command line (and :data:`RESUME_KEEPS_THIS_RUNS`) in their place, so that every
    other one is the checkpoint's (its recipe, its data, and its ``--epochs``, so that the
    learning-rate schedule goes on unchanged); the output goes to the checkpoint's folder
    unless ``--out-dir`` is given. The given settings are checked against the checkpoint's
    configuration, not the command line's defaults (``--data-dir`` fits a folder run).
    :meth:`~swav_ref.train.Trainer.load` refuses those that do not fit the checkpoint's state
    and warns of the others; a checkpoint with per-worker state (a queue, a memory bank) is
    refused here, before anything is built or removed, unless ``workers`` as many resume it.
    Returns the configuration and, as options, the given settings that differ from the
    checkpoint's."""
    from swav_ref.config import ConfigError, as_options
    from swav_ref.resume import SHAPE_THE_STATE, check_workers_for_local_state, load_trainer_checkpoint

    _, meta, saved = load_trainer_checkpoint(checkpoint)
    check_workers_for_local_state(checkpoint, meta, workers)
    here = {name: getattr(args, name) for name in args._config_fields
            if name in given or name in RESUME_KEEPS_THIS_RUNS}
    if "out_dir" not in given:
        here["out_dir"] = str(Path(checkpoint).parent)
    config = dataclasses.replace(saved, **here)  # a bad value raises ConfigError, reported in one line
    try:  # a checkpoint of an earlier version, which trained with settings this one refuses
        config.check_trainable()
    except ConfigError as exc:
        if exc.field in given:  # this command's own value
            raise
        # (a setting that shapes the state, as the batch, no resume can change)
        way_on = ("" if exc.field in SHAPE_THE_STATE else
                  f"give --{exc.field.replace('_', '-')} with a value that trains, to resume it under that value, or ")
        raise UserError(f"{exc}. {checkpoint} was trained with it, by an earlier version that accepted it; "
                        f"{way_on}evaluate it: swav-ref eval {checkpoint}") from None
    changed = {name: getattr(config, name) for name in sorted(given)
               if name != "out_dir" and getattr(config, name) != getattr(saved, name)}
    return config, as_options(changed)


_NOT_GIVEN = object()


def _options_given(argv: list[str]) -> set[str]:
    """The TrainConfig fields written on the train command's line ``argv``, as opposed to
    left to their defaults (which a resume takes from the checkpoint instead)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_config_options(probe, TrainConfig())
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    probe.set_defaults(**dict.fromkeys(names, _NOT_GIVEN))
    values = vars(probe.parse_known_args(argv)[0])  # the other options (--resume, --threads) are not config
    return {name for name in names if values[name] is not _NOT_GIVEN}


def _warn_if_other_data(checkpoint: str, trained_on: dict | None, data) -> None:
    """Warn when the data set loaded for evaluation is not the one the checkpoint was
    trained on (another number of images or image shape): e.g. a model trained on arrays
    handed to ``Trainer(train_set=...)``, whose checkpoint names the digits by default."""
    if not trained_on:  # written before the data were recorded
        return
    from swav_ref.resume import data_record, trained_on_same

    now = data_record(data)
    if not trained_on_same(trained_on, data):
        warnings.warn(f"{checkpoint} was trained on {trained_on['n_images']} images of shape "
                      f"{tuple(trained_on['image_shape'])} ({trained_on.get('name')}), but the data loaded now "
                      f"({data.name}) has {now['n_images']} of shape {tuple(now['image_shape'])}: the scores below "
                      "are on other data than the model was trained on", stacklevel=2)


# -- demo ----------------------------------------------------------------------------------
DEMO_EPOCHS = 20


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: SwAV on digits (CPU, minutes), evaluated against baselines",
                       formatter_class=_DefaultsInHelp)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table shows mean ± std")
    p.add_argument("--methods", nargs="+", default=["swav"], choices=("swav", "deepcluster-v2"),
                   help="self-supervised methods to train (each compared with the same baselines)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs for every trained model")
    p.add_argument("--n-prototypes", type=int, nargs="+", default=list(TrainConfig.n_prototypes), metavar="K",
                   help="prototypes per set, one value per set (several sets: DeepCluster-v2 only)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"), help="array backend")
    p.add_argument("--out", default="swav_out",
                   help="folder for results.json, the figures, and each run's seed<N>/<method>/ folder (checkpoint, "
                        "metrics, config: swav-ref eval takes the checkpoint)")
    _add_threads_option(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from swav_ref.results import format_results
    from swav_ref.experiment import check_comparison, run_comparison

    _one_process_only("demo")
    _limit_threads(args.threads)
    t0 = time.perf_counter()
    try:
        config = TrainConfig(method=args.methods[0], epochs=args.epochs, backend=args.backend,
                             n_prototypes=tuple(args.n_prototypes), progress=_bar_shown(),
                             out_dir=str(_output_folder(args.out, "--out")))
        check_comparison(config, args.seeds, args.methods)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
    print(f"swav_ref demo: {', '.join(args.methods)} on digits ({args.backend}), {epochs}, "
          f"seeds {args.seeds}; baselines: raw pixels, random init, supervised")
    table, _ = run_comparison(config, seeds=args.seeds, methods=args.methods, out_dir=args.out)
    print("\nTop-1 accuracy on the digits test split (%), mean ± std over seeds:\n")
    print(format_results(table))
    print(f"\nresults and figures in {args.out}/ ({time.perf_counter() - t0:.0f} s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake in the options is one line, ``swav-ref: error: ...``, like
    every other error of the command line, and points to ``--help``: argparse's own
    prints the whole usage first (32 lines for ``train``), which buries the error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("swav-ref").strip()  # "train", or "" at the top level
        self.exit(2, f"swav-ref: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="swav-ref",
        description="SwAV from first principles: optimal transport, training and evaluation.",
        allow_abbrev=False,
    )
    # No abbreviations (--epoch for --epochs): a shortened option that works today breaks
    # when a new option shares its prefix; a typo gets a suggestion instead (main).
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=lambda **kwargs: _Parser(allow_abbrev=False, **kwargs))
    for add in (_add_demo, _add_train, _add_eval, _add_dessert):
        add(sub)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


#: Options other tools spell differently, and what this one calls them.
OTHER_TOOLS_OPTIONS = {"--gpu": "--backend cupy", "--cuda": "--backend cupy", "--device": "--backend",
                       "--lr": "--base-lr", "--learning-rate": "--base-lr", "--output": "--out-dir",
                       "--output-dir": "--out-dir", "--workers": "mpiexec -n N swav-ref ...",
                       "--world-size": "mpiexec -n N swav-ref ..."}


#: Words that ask for an option's ``--no-`` form.
NEGATIONS = {"skip", "disable", "without", "off", "no", "dont"}


def _nearest_options(flag: str, options: list[str]) -> list[str]:
    """The options a mistyped ``flag`` most likely meant: another tool's name for one
    (``--gpu``), else the ``--no-`` form of one it asks to turn off (``--skip-baseline``:
    ``--no-baseline``), else a near-identical spelling (``--epoch``: ``--epochs``, not
    ``--epoch-queue-starts``), else those it is the beginning of (``--batch``:
    ``--batch-size``), else those that begin it (``--out-dir``: ``--out``), else those with
    all its words (``--size``: every ``--*-size``), else the closest spelling."""
    wanted = OTHER_TOOLS_OPTIONS.get(flag)
    if wanted and (not wanted.startswith("--") or wanted.split()[0] in options):
        return [wanted]
    words = set(flag.removeprefix("--").split("-"))
    if words & NEGATIONS:  # --skip-baseline, --disable-progress: the --no- form
        rest = words - NEGATIONS
        negated = [o for o in options if o.startswith("--no-") and rest and rest <= set(o[5:].split("-"))]
        if negated:
            return sorted(negated, key=len)[:3]
    near_identical = difflib.get_close_matches(flag, options, n=1, cutoff=0.85)
    if near_identical:
        return near_identical
    for found in ([o for o in options if o.startswith(flag + "-")],
                  [o for o in options if flag.startswith(o + "-")],
                  [o for o in options if words <= set(o.removeprefix("--").split("-"))]):
        if found:
            return sorted(found, key=len)[:3]
    return difflib.get_close_matches(flag, options, n=1, cutoff=0.6)


def _unrecognised(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments no option takes, with the nearest options to each unknown one."""
    options = [s for action in parser._actions for s in action.option_strings]  # argparse lists them nowhere public
    hints = []
    for word in extra:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            near = _nearest_options(flag, options)
            hints.append(f"{flag}: did you mean {' or '.join(near)}?" if near else f"{flag}: no such option")
    return f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else "")


def _one_line_warnings(original):
    """``warnings.formatwarning`` for the command line: the library's warnings as one line,
    ``swav-ref: warning: ...``, like its errors (not a source path and a line of code, which
    look like a crash); warnings from elsewhere keep Python's format, which says where."""
    package = Path(__file__).resolve().parent

    def format_warning(message, category, filename, lineno, line=None):
        if Path(filename).resolve().is_relative_to(package):
            return f"swav-ref: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    return format_warning


def _never_fail_to_print() -> None:
    """Print what the terminal cannot show as escapes (``\\xb1`` for ±) rather than fail:
    on Windows, output sent to a file or a pipe is encoded in the ANSI code page, which
    lacks some of the table's characters (cp874 has no ±), and a ``UnicodeEncodeError``
    after a whole training run would lose its results table."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", "strict") == "strict":
            stream.reconfigure(errors="backslashreplace")


def _end_the_mpi_job(exc: Exception, comm: Any) -> None:
    """Under mpiexec, end every rank for a user's error (or Ctrl-C) with its one line and
    exit status, not a traceback from each rank; a rank that returned instead would leave
    the others waiting in a collective forever. Usually every rank has the same error (the
    same settings and data): rank 0 says it, and the other ranks wait a moment for its
    abort to end them, so that it is said once. ``comm`` is the command's communicator
    (making another would be a collective call, which the other ranks may never join);
    ``None`` if the error came before it: the process exits, and the launcher ends the
    others."""
    message, code = f"swav-ref: error: {exc}", getattr(exc, "exit_status", 2)
    if comm is None:
        print(message, file=sys.stderr, flush=True)
        os._exit(code)
    if not comm.is_root:
        time.sleep(3.0)  # rank 0's abort usually ends this process first
    comm.abort(message, code=code)


def main(argv: list[str] | None = None) -> int:
    from swav_ref.backend import BackendUnavailableError
    from swav_ref.checkpoint import CheckpointError
    from swav_ref.data.datasets import DatasetError
    from swav_ref.distributed import MPIUnavailableError, detect_mpi_launch
    from swav_ref.config import ConfigError
    from swav_ref.resume import TrainingDivergedError

    argv = sys.argv[1:] if argv is None else list(argv)
    _never_fail_to_print()
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # the command's own usage and a suggestion, not the top level's bare error
        args.command_parser.error(_unrecognised(extra, args.command_parser))
    args.command_args = argv[argv.index(args.command) + 1:]
    warnings.simplefilter("default")
    original_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(original_format)
    try:
        return args.func(args)
    except (UserError, ConfigError, BackendUnavailableError, CheckpointError, DatasetError, MPIUnavailableError,
            TrainingDivergedError) as exc:
        # The user's to fix, and the message says how; a bug anywhere else keeps its traceback.
        # Under MPI a training error ends every rank (_end_the_mpi_job: one rank quietly
        # returning would leave the others waiting in a collective forever); the other
        # commands run in one process, with nobody to leave waiting.
        launched, _, size = detect_mpi_launch()
        if args.command == "train" and launched and (size is None or size > 1):
            _end_the_mpi_job(exc, getattr(args, "comm", None))
        print(f"swav-ref: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    finally:
        warnings.formatwarning = original_format


if __name__ == "__main__":
    sys.exit(main())
