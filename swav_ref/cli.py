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
import dataclasses
import os
import sys
import tempfile
import warnings
from pathlib import Path

from swav_ref.backend import BACKENDS
from swav_ref.data.datasets import ARRAYS, DATASETS
from swav_ref.data.multicrop import default_config
from swav_ref.train import CHOICES, METHODS, TrainConfig

#: Help for each TrainConfig field, shown by ``swav-ref train --help``.
OPTION_HELP = {
    "method": f"training method: one of {', '.join(METHODS)}",
    "dataset": "digits (embedded), cifar10 (binary version, needs --data-dir) or folder (needs --data-dir)",
    "data_dir": "folder holding the data set (cifar-10-batches-bin, or images / one sub-folder per class)",
    "backend": "array backend: numpy (CPU) or cupy (GPU, the gpu extra)",
    "dtype": "floating-point type of the model and data: float32 or float64",
    "tf32": "cupy only: float32 matrix products on TF32 tensor cores (faster on Ampere and later GPUs, "
            "about 3 significant digits per product; PyTorch's convolutions do the same by default)",
    "arch": "backbone: resnet_tiny (8x8 digits) or resnet18 (CIFAR layout)",
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
    "epsilon": "entropic regularisation of Sinkhorn (smaller = sharper codes)",
    "temperature": "softmax temperature tau of the swapped prediction",
    "sinkhorn_iterations": "Sinkhorn-Knopp iterations per batch",
    "queue_length": "embeddings kept in the queue per assignment crop (0 = no queue)",
    "epoch_queue_starts": "epoch from which the queue is used",
    "freeze_prototypes_niters": "SwAV: iterations during which the prototypes are not updated (DeepCluster-v2's, "
                                "the k-means centroids, never are)",
    "optimizer": "lars (as SwAV) or sgd",
    "base_lr": "peak learning rate after warm-up",
    "final_lr": "learning rate at the end of the cosine schedule",
    "warmup_epochs": "epochs of linear warm-up (at most half of --epochs)",
    "start_warmup": "learning rate at the start of the warm-up",
    "weight_decay": "weight decay",
    "momentum": "SGD momentum",
    "kmeans_iters": "DeepCluster-v2: k-means iterations per epoch",
    "kmeans_restarts": "DeepCluster-v2: k-means restarts (the best objective wins)",
    "kmeans_init": "DeepCluster-v2: initial centroids, k-means++ seeding or random rows (the official code's)",
    "sync_bn": "synchronise BatchNorm statistics across MPI workers",
    "seed": "random seed (data order, augmentation, initialisation)",
    "out_dir": "output folder: metrics.jsonl, checkpoint.npz, figures",
    "log_every": "log (and check for NaN and collapse) every N steps",
    "checkpoint_every": "write a checkpoint every N epochs",
    "stop_after": "stop after N epochs in this run (0 = train to the end); the learning-rate schedule still spans "
                  "--epochs, so --resume carries on (for time-limited cluster jobs)",
    "progress": "show the progress bar",
    "image_size": "folder data: resize every image to this square size in pixels (0 = keep the files' size, "
                  "which must then be the same for all)",
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
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
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


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N",
        help="threads for NumPy's matrix products (BLAS) on the CPU; 0 = the library's default, one per core. "
             "On a machine busy with other work, 1 can be several times faster: idle BLAS threads spin "
             "and compete with the other programs for the cores")


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
    """``demo`` and ``eval`` run in one process: under ``mpiexec -n N`` every rank would run
    the whole job and write the same files. Each rank stops alike (exit status 2, no
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


# -- dessert -------------------------------------------------------------------------------
def _add_dessert(sub) -> None:
    p = sub.add_parser("dessert", help="optimal transport on the dessert example (Sinkhorn vs exact)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lam", type=float, default=10.0, help="entropic regularisation strength lambda")
    p.add_argument("--out", default="dessert_out", help="folder for the figures")
    p.set_defaults(func=_run_dessert)


def _run_dessert(args: argparse.Namespace) -> int:
    import math

    from swav_ref.ot.desserts import run_dessert_example

    if not (math.isfinite(args.lam) and args.lam > 0):
        raise UserError(f"--lam {args.lam}: the regularisation strength must be a positive number")
    run_dessert_example(lam=args.lam, out_dir=_output_folder(args.out, "--out"))
    return 0


# -- train ---------------------------------------------------------------------------------
class _DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where the default is None: the
    help of those says in words what happens (the data set's recipe, no data folder)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train SwAV, DeepCluster-v2 or the supervised baseline",
                       formatter_class=_DefaultsInHelp)
    _add_config_options(p, TrainConfig())
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue from this checkpoint (e.g. OUT_DIR/checkpoint.npz); the loss continues bit for bit")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the trained backbone (linear probe, kNN) at the end")
    _add_threads_option(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from swav_ref import plots
    from swav_ref.distributed import get_communicator, install_abort_on_exception
    from swav_ref.experiment import METHOD_NAMES, check_evaluable, evaluate_trainer
    from swav_ref.evaluate import format_results, results_table
    from swav_ref.train import Trainer

    _limit_threads(args.threads)
    comm = get_communicator()
    install_abort_on_exception(comm)
    config = _config_from_args(args, TrainConfig())
    _output_folder(config.out_dir, "--out-dir")
    if args.resume is not None:
        if not Path(args.resume).is_file():
            raise UserError(f"--resume {args.resume}: no such checkpoint file")
        # read here, so a corrupt file is refused before --out-dir is made
        config = _with_the_checkpoints_recipe(config, args.resume)
    if comm.is_root:
        print(comm.describe())
    trainer = Trainer(config, comm=comm)
    evaluate = args.evaluate and trainer.test_set is not None and trainer.test_set.has_labels
    if evaluate and comm.is_root:
        try:  # before training, not after it
            check_evaluable(trainer.train_set, trainer.test_set)
        except ValueError as exc:
            raise UserError(f"{exc}; or pass --no-evaluate to train without the evaluation") from exc
    trainer.fit(resume=args.resume)
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
        print(format_results(results_table([row])))
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
    p.add_argument("--out", default=None, help="JSON file for the results (default: eval.json next to the checkpoint)")
    _add_threads_option(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import tempfile

    from swav_ref.backend import BackendUnavailableError, get_backend
    from swav_ref.evaluate import format_results, results_table, save_results_json
    from swav_ref.experiment import METHOD_NAMES, check_evaluable, evaluate_raw_pixels, evaluate_trainer
    from swav_ref.train import Trainer, load_trainer_checkpoint

    _one_process_only("eval")
    _limit_threads(args.threads)
    _, meta, config = load_trainer_checkpoint(args.checkpoint)
    if config.dataset == ARRAYS:
        raise UserError(f"{args.checkpoint} was trained on images handed to the Trainer from Python "
                        "(dataset 'arrays'), which the command line cannot load; evaluate it from Python: "
                        "swav_ref.encoder.load_encoder(path).features(images), then a classifier of your choice")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("eval.json")
    # before the evaluation, not after it
    _output_folder(str(out.parent), "--out" if args.out else "eval.json goes next to the checkpoint (give --out): its folder")
    changes = {"progress": False}
    if args.backend:
        changes["backend"] = args.backend
        if args.backend != "cupy":
            changes["tf32"] = False  # a GPU setting: a --tf32 run's checkpoint evaluates on the CPU too
    elif config.backend == "cupy":
        try:
            get_backend("cupy")
        except BackendUnavailableError as exc:
            raise UserError(f"{args.checkpoint} was trained with --backend cupy, which is not usable here "
                            f"({exc}); to evaluate it on the CPU, add --backend numpy") from exc
    if args.data_dir is not None:
        if config.dataset == "digits":
            raise UserError(f"--data-dir {args.data_dir}: {args.checkpoint} was trained on digits, which is "
                            "embedded; --data-dir applies to cifar10 and folder checkpoints only, so leave it out")
        if not Path(args.data_dir).is_dir():
            problem = "is not a folder" if Path(args.data_dir).exists() else "does not exist"
            raise UserError(f"--data-dir {args.data_dir} {problem}; give the folder holding the "
                            f"{config.dataset} data of {args.checkpoint}")
        changes["data_dir"] = args.data_dir
    # A Trainer needs an out_dir (loading the checkpoint rewrites its metrics.jsonl there);
    # eval keeps nothing of it, so the folder goes when eval ends, even on error.
    with tempfile.TemporaryDirectory(prefix="swav_ref_eval_") as scratch:
        trainer = Trainer(dataclasses.replace(config, out_dir=scratch, **changes))
        train, test = trainer.train_set, trainer.test_set
        if not (train.has_labels and test is not None and test.has_labels):
            raise UserError(f"the data set of {args.checkpoint} ({trainer.config.dataset} in "
                            f"{trainer.config.data_dir}) has no labels, so there is nothing to score against: "
                            "evaluation needs one sub-folder per class (DATA_DIR/<class>/<image>); "
                            "pass such a folder with --data-dir")
        try:
            check_evaluable(train, test)
        except ValueError as exc:
            raise UserError(f"cannot evaluate {args.checkpoint}: {exc}") from exc
        # The probe's folds are shuffled by the run's seed, as in training's own evaluation,
        # so that eval reproduces the accuracy that training reported.
        rows = [{"method": "raw pixels", **evaluate_raw_pixels(trainer, config.seed)}]
        _warn_if_other_data(args.checkpoint, meta.get("data"), train)
        trainer.load(args.checkpoint, weights_only=True)  # any number of workers may have written it
        trainer.step = int(meta["step"])  # which step's weights these are, for the label
        rows.append({"method": f"{METHOD_NAMES[config.method]} (step {trainer.step})", **evaluate_trainer(trainer, config.seed)})
    table = results_table(rows)
    print(format_results(table))
    save_results_json(out, rows, metadata={"checkpoint": str(args.checkpoint), "config": config.to_dict(),
                                           "k_used": table.attrs["k_used"]})
    print(f"results: {out}")
    return 0


def _with_the_checkpoints_recipe(config: TrainConfig, checkpoint: str) -> TrainConfig:
    """Resuming: the crop settings left to the data set's recipe (None) take the
    checkpoint's values, so the same command resumes a run whatever recipe its version
    filled in (one written before the recipe existed holds the digits crops for any data).
    A crop setting given on the command line is kept, and the resume refuses one that
    differs from the checkpoint's. (The prototype freeze is left to this run's recipe: it
    counts this run's steps, which differ on another number of workers.)"""
    from swav_ref.train import CROP_FIELDS, load_trainer_checkpoint

    saved = load_trainer_checkpoint(checkpoint)[2]
    return dataclasses.replace(config, **{name: getattr(saved, name) for name in CROP_FIELDS
                                          if getattr(config, name) is None and getattr(saved, name) is not None})


def _warn_if_other_data(checkpoint: str, trained_on: dict | None, data) -> None:
    """Warn when the data set loaded for evaluation is not the one the checkpoint was
    trained on (another number of images or image shape): e.g. a model trained on arrays
    handed to ``Trainer(train_set=...)``, whose checkpoint names the digits by default."""
    if not trained_on:  # written before the data were recorded
        return
    from swav_ref.train import data_record, trained_on_same

    now = data_record(data)
    if not trained_on_same(trained_on, data):
        warnings.warn(f"{checkpoint} was trained on {trained_on['n_images']} images of shape "
                      f"{tuple(trained_on['image_shape'])} ({trained_on['name']}), but the data loaded now "
                      f"({data.name}) has {now['n_images']} of shape {tuple(now['image_shape'])}: the scores below "
                      "are on other data than the model was trained on", stacklevel=2)


# -- demo ----------------------------------------------------------------------------------
DEMO_EPOCHS = 20


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: SwAV on digits (CPU, minutes), evaluated against baselines",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table shows mean ± std")
    p.add_argument("--methods", nargs="+", default=["swav"], choices=("swav", "deepcluster-v2"),
                   help="self-supervised methods to train (each compared with the same baselines)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs for every trained model")
    p.add_argument("--n-prototypes", type=int, nargs="+", default=list(TrainConfig.n_prototypes), metavar="K",
                   help="prototypes per set, one value per set (several sets: DeepCluster-v2 only)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"), help="array backend")
    p.add_argument("--out", default="swav_out", help="folder for results.json and the figures")
    _add_threads_option(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from swav_ref.evaluate import format_results
    from swav_ref.experiment import check_comparison, run_comparison

    _one_process_only("demo")
    _limit_threads(args.threads)
    t0 = time.perf_counter()
    try:
        config = TrainConfig(method=args.methods[0], epochs=args.epochs, backend=args.backend,
                             n_prototypes=tuple(args.n_prototypes),
                             out_dir=str(_output_folder(args.out, "--out")))
        check_comparison(config, args.seeds, args.methods)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(f"swav_ref demo: {', '.join(args.methods)} on digits ({args.backend}), {args.epochs} epochs, "
          f"seeds {args.seeds}; baselines: raw pixels, random init, supervised")
    table, _ = run_comparison(config, seeds=args.seeds, methods=args.methods, out_dir=args.out)
    print("\nTop-1 accuracy on the digits test split (%), mean ± std over seeds:\n")
    print(format_results(table))
    print(f"\nresults and figures in {args.out}/ ({time.perf_counter() - t0:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swav-ref",
        description="SwAV from first principles: optimal transport, training and evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_dessert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from swav_ref.backend import BackendUnavailableError
    from swav_ref.checkpoint import CheckpointError
    from swav_ref.data.datasets import DatasetError
    from swav_ref.distributed import MPIUnavailableError, detect_mpi_launch
    from swav_ref.train import ConfigError, TrainingDivergedError

    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return args.func(args)
    except (UserError, ConfigError, BackendUnavailableError, CheckpointError, DatasetError, MPIUnavailableError,
            TrainingDivergedError) as exc:
        # The user's to fix, and the message says how; a bug anywhere else keeps its traceback.
        # Under MPI a training error goes on to the abort hook, which stops every rank (one
        # rank quietly returning would leave the others waiting in a collective forever);
        # the other commands run in one process, with nobody to leave waiting.
        launched, _, size = detect_mpi_launch()
        if args.command == "train" and launched and (size is None or size > 1):
            raise
        print(f"swav-ref: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
