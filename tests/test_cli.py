"""The command line: every option documented, train -> eval on a small image folder."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import swav_ref
from swav_ref.cli import OPTION_HELP, build_parser, main
from swav_ref.train import TrainConfig

#: one process whatever runs the tests (conftest.single_process); the tests of launches set
#: the launchers' variables themselves
pytestmark = pytest.mark.usefixtures("single_process")


def test_every_train_option_is_documented_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
        assert field.name in OPTION_HELP, f"{field.name} has no help text"
    assert "(default: 0.05)" in text  # epsilon, as ArgumentDefaultsHelpFormatter shows it


def test_unknown_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--backend", "jax"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_eval_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    from swav_ref.data.datasets import load_digits_dataset

    digits = load_digits_dataset()
    for i in range(120):
        folder = tmp_path / "images" / str(digits.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i, 0]).save(folder / f"{i}.png")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--epochs", "2",
                 "--batch-size", "32", "--n-crops", "2", "2", "--hidden-dim", "16", "--feat-dim", "8",
                 "--n-prototypes", "12", "--no-progress", "--out-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and (out / "checkpoint.npz").exists()
    assert (out / "training_curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"step", "epoch"}
    # one line per epoch that stays (the bar goes, and a log file has none), from the epoch's record
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["images"] for r in epochs] == [epochs[0]["step"] * 32, (epochs[1]["step"] - epochs[0]["step"]) * 32]
    for r in epochs:
        assert (f"epoch {r['epoch'] + 1}/2: loss {r['loss']:.4f}, " in printed
                and f"{r['images'] / r['seconds']:.0f} images/s, prototypes used " in printed)
    # the printed table is kept too (a batch job's log may be lost): the same numbers
    kept = json.loads((out / "eval.json").read_text())
    assert [r["method"] for r in kept["results"]] == ["SwAV"] and kept["metadata"]["config"]["epochs"] == 2
    assert kept["metadata"]["written_by"] == f"swav_ref {swav_ref.__version__}"
    assert f"{100 * kept['results'][0]['linear probe']['mean']:.1f}" in printed and kept["metadata"]["step"] > 0
    # a run that replaces this one's checkpoint without evaluating takes its scores away too
    assert main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--epochs", "1",
                 "--batch-size", "32", "--n-crops", "2", "2", "--hidden-dim", "16", "--feat-dim", "8",
                 "--n-prototypes", "12", "--no-progress", "--no-evaluate", "--out-dir", str(tmp_path / "again")]) == 0
    (tmp_path / "again" / "eval.json").write_text(json.dumps(kept))
    with pytest.warns(UserWarning, match="earlier run"):
        assert main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--epochs", "1",
                     "--batch-size", "32", "--n-crops", "2", "2", "--hidden-dim", "16", "--feat-dim", "8",
                     "--n-prototypes", "12", "--no-progress", "--no-evaluate", "--out-dir", str(tmp_path / "again"),
                     "--seed", "1"]) == 0
    assert not (tmp_path / "again" / "eval.json").exists()
    assert main(["eval", str(out / "checkpoint.npz"), "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    rows = evaluated["results"]
    # which version wrote the checkpoint and which evaluated it (a checkpoint outlives a release)
    assert evaluated["metadata"]["written_by"] == evaluated["metadata"]["evaluated_by"] == kept["metadata"]["written_by"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "raw pixels" and methods[1].startswith("SwAV")
    assert all(0.0 <= r["linear probe"]["mean"] <= 1.0 for r in rows)
    assert np.isfinite([r["kNN k=20"]["mean"] for r in rows]).all()


@pytest.mark.parametrize("argv, message", [
    (["train", "--tf32"], "tf32 applies to the cupy backend only"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "CIFAR-10 folder not found: /nonexistent"),
    (["eval", "/nonexistent/checkpoint.npz"], "checkpoint not found: /nonexistent/checkpoint.npz"),
    # values out of range, refused before anything is built or written
    (["train", "--feat-dim", "0"], "--feat-dim 0: must be at least 1"),
    (["train", "--log-every", "0"], "--log-every 0: must be at least 1"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every 0: must be at least 1"),
    (["train", "--stop-after", "-1"], "--stop-after -1: must be at least 0"),
    (["train", "--kmeans-restarts", "0"], "--kmeans-restarts 0: must be at least 1"),
    (["train", "--n-prototypes", "30", "0"], "--n-prototypes 30 0: every entry must be at least 2"),
    (["train", "--n-prototypes", "1"], "--n-prototypes 1: every entry must be at least 2"),
    (["demo", "--seeds", "0", "-1"], "seed -1: each seed must be a whole number >= 0"),
    (["train", "--temperature", "0"], "--temperature 0.0: must be a positive number"),
    (["train", "--epsilon", "nan"], "--epsilon nan: must be a positive number"),
    (["train", "--momentum", "-1"], "--momentum -1.0: must be a number >= 0"),
    (["train", "--momentum", "1"], "--momentum 1.0: must be below 1"),  # trained to garbage, exit 0
    (["train", "--batch-size", "1"], "--batch-size 1: must be at least 2 to train: BatchNorm"),  # crashed in BatchNorm
    (["train", "--epsilon", "0.001"], "--epsilon 0.001: must be at least 0.003"),  # a traceback, at some step
    (["train", "--n-crops", "1", "--crop-sizes", "8", "--min-scale", "0.5", "--max-scale", "1", "--crops-for-assign",
      "0"], "--n-crops 1: SwAV needs at least 2 crops"),  # crashed at the first step
    (["train", "--min-scale", "0.9", "0.3", "--max-scale", "0.5", "0.6"], "0 < min-scale <= max-scale <= 1"),
    (["train", "--crops-for-assign", "0", "6"], "--crops-for-assign 0 6: needs distinct crop indices in 0..5"),
    (["train", "--crop-sizes", "32"], "--crop-sizes 32 gives 1 crop size(s), but the digits recipe"),
    (["train", "--n-prototypes", "50", "50"], "SwAV has one set of prototypes"),
    (["train", "--threads", "-1"], "--threads -1: must be at least 0"),
    (["train", "--dataset", "folder"], "--dataset folder: needs --data-dir"),
    (["demo", "--epochs", "0"], "--epochs 0: must be at least 1"),
    (["dessert", "--lam", "0"], "--lam 0.0: the regularisation strength must be a positive number"),
    (["train", "--resume", "/nonexistent/checkpoint.npz"], "--resume /nonexistent/checkpoint.npz: no such"),
    (["train", "--data-dir", "/tmp"], "--data-dir /tmp: the digits are embedded"),
    (["train", "--image-size", "32"], "--image-size 32: applies to --dataset folder only"),
    # settings that do not fit the data, refused before the first step
    (["train", "--batch-size", "5000"], "the training set has 1438 images, fewer than one global batch"),
    (["train", "--queue-length", "100"], "--queue-length 100: queue_length=100 is not a multiple"),
    (["train", "--method", "deepcluster-v2", "--n-prototypes", "2000"], "the memory bank holds 1408"),
])
def test_user_errors_are_one_line_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("swav-ref: error: ") and message in err and "Traceback" not in err


def test_an_output_path_through_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for argv in (["train", "--out-dir", str(tmp_path / "afile" / "run")], ["demo", "--out", str(tmp_path / "afile")],
                 ["dessert", "--out", str(tmp_path / "afile")]):
        assert main(argv) == 2
        assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where even root cannot write")
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(capsys):
    for argv in (["train", "--out-dir", "/proc/swav_ref_run"], ["demo", "--out", "/proc/swav_ref_run"],
                 ["dessert", "--out", "/proc/swav_ref_run/figs"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "cannot write into /proc" in err and "Traceback" not in err, err


def test_a_diverged_run_is_one_line_with_its_advice(tmp_path, capsys, monkeypatch):
    from swav_ref import train

    def diverge(self, resume=None):
        raise train.TrainingDivergedError(f"the loss is not finite at step 3. {train.DIVERGENCE_ADVICE}")

    monkeypatch.setattr(train.Trainer, "fit", diverge)
    assert main(["train", "--no-evaluate", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swav-ref: error: the loss is not finite") and "--base-lr" in err and "Traceback" not in err


def test_threads_beyond_the_usable_cpus_are_refused(capsys):
    from swav_ref.cli import _usable_cpus

    cpus = _usable_cpus()
    assert 1 <= cpus <= os.cpu_count()
    assert main(["train", "--threads", str(cpus + 1)]) == 2
    assert f"--threads {cpus + 1}: this process may use {cpus} CPU(s)" in capsys.readouterr().err


def test_a_queue_the_run_never_reaches_warns(tmp_path):
    from swav_ref.train import Trainer

    config = TrainConfig(epochs=2, batch_size=64, queue_length=3840, out_dir=str(tmp_path), progress=False)
    with pytest.warns(UserWarning, match=r"--queue-length 3840 is never used: .* full 60 steps later, at step 390, "
                                         r"but the run has 44 steps") as record:
        Trainer(config)  # starts at epoch 15 (the default) of 2
    # nor does the queue count towards the samples per Sinkhorn problem, then
    assert any("100 prototypes but only 64 samples" in str(w.message) for w in record)
    assert not any("longer than the 1438 training images" in str(w.message) for w in record)  # never made
    with pytest.warns(UserWarning, match="full 60 steps later, at step 60, but the run has 44 steps"):
        Trainer(dataclasses.replace(config, epoch_queue_starts=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(dataclasses.replace(config, epochs=3, epoch_queue_starts=0, queue_length=1280))  # used from step 20
    # a queue longer than the data holds its images twice (256,000,000 once failed, epochs in, out of memory)
    with pytest.warns(UserWarning, match=r"--queue-length 1472 is longer than the 1438 training images: the queue "
                                         r"will hold the same images more than once .* in 1 MiB per worker"):
        Trainer(dataclasses.replace(config, epochs=3, epoch_queue_starts=0, queue_length=1472))


def test_a_corrupt_resume_file_is_refused_before_the_out_dir_is_made(tmp_path, capsys):
    (tmp_path / "checkpoint.npz").write_bytes(b"PK\x03\x04 not a checkpoint")
    out = tmp_path / "run"
    assert main(["train", "--resume", str(tmp_path / "checkpoint.npz"), "--out-dir", str(out)]) == 2
    assert "checkpoint.npz" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("layout, message", [
    ("one_class", "has 1 class (all); a classifier needs 2 or more"),
    ("single_image_class", "class b has a single training image"),
    ("two_images_per_class", "is empty: the split holds out a fraction of each class"),
])
def test_data_that_cannot_be_evaluated_is_refused_before_training(layout, message, tmp_path, capsys):
    """Evaluation needs 2 classes and 2 training images of each; the run is refused up front
    (not after the training, as before), and --no-evaluate trains anyway."""
    sizes = [(8, 8)] * 16
    if layout == "one_class":
        _write_images(tmp_path / "images" / "all", sizes, labelled=False)
    elif layout == "two_images_per_class":  # 20 % of 2 rounds to no test image at all
        for name in "abcd":
            _write_images(tmp_path / "images" / name, sizes[:2], labelled=False)
    else:
        _write_images(tmp_path / "images" / "a", sizes, labelled=False)
        _write_images(tmp_path / "images" / "b", sizes[:1], labelled=False)
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), *SMALL_RUN]
    argv.remove("--no-evaluate")
    assert main([*argv, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "--no-evaluate" in err
    assert not (tmp_path / "run" / "checkpoint.npz").exists()  # no training happened
    assert main([*argv, "--no-evaluate", "--out-dir", str(tmp_path / "run")]) == 0
    assert main(["eval", str(tmp_path / "run" / "checkpoint.npz"), "--out", str(tmp_path / "e.json")]) == 2
    assert message in capsys.readouterr().err


def _write_images(folder, sizes, labelled=True):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        where = folder / str(i % 2) if labelled else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8)).save(where / f"{i}.png")


def test_arrays_of_one_pixel_are_refused_with_advice_that_fits_and_tiny_crops_still_train(tmp_path):
    from swav_ref.data.datasets import ImageDataset
    from swav_ref.train import ConfigError, Trainer

    tiny = ImageDataset(np.zeros((40, 1, 1, 1), dtype=np.uint8), name="my arrays")
    config = TrainConfig(dataset="arrays", out_dir=str(tmp_path), progress=False, batch_size=8, n_prototypes=(4,))
    with pytest.raises(ConfigError, match="my arrays: the images are 1 pixel.*scale them up before handing them over"):
        Trainer(config, train_set=tiny)
    # a crop size of 1 on larger images is the user's call: the recipe's own sizes are replaced
    images = ImageDataset(np.zeros((40, 1, 16, 16), dtype=np.uint8), name="arrays")
    crops = {"n_crops": (2,), "crop_sizes": (1,), "min_scale": (0.5,), "max_scale": (1.0,)}
    trainer = Trainer(dataclasses.replace(config, **crops), train_set=images)
    assert trainer.multicrop.config.sizes == (1,)


def test_one_pixel_images_ask_for_image_size(tmp_path, capsys):
    _write_images(tmp_path / "tiny", [(1, 1)] * 8)
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "tiny"), "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("swav-ref: error: ") and "are 1 pixel(s) on their shorter side" in err, err
    assert "--image-size N" in err and "Traceback" not in err


def test_demo_refuses_a_seed_or_method_twice_and_sets_swav_cannot_use(tmp_path, capsys):
    """A repeated seed counted twice gave a table of "± 0.0" that looked like two seeds
    agreeing; these are refused before any training."""
    out = str(tmp_path / "demo")
    for argv, message in ((["--seeds", "0", "0"], "seed 0 given twice"),
                          (["--methods", "swav", "swav"], "method swav given twice"),
                          (["--n-prototypes", "50", "50"], "SwAV has one set of prototypes")):
        assert main(["demo", *argv, "--out", out]) == 2
        error = capsys.readouterr().err
        assert message in error
        assert "--method " not in error  # train's option, which demo spells --methods
    assert not (tmp_path / "demo" / "results.json").exists()


SMALL_RUN = ["--epochs", "1", "--batch-size", "8", "--n-crops", "2", "2", "--hidden-dim", "8", "--feat-dim", "8",
             "--n-prototypes", "8", "--no-progress", "--no-evaluate"]


def test_images_of_different_sizes_train_with_image_size(tmp_path, capsys):
    _write_images(tmp_path / "images", [(8, 8), (10, 12)] * 8)
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), *SMALL_RUN]
    assert main([*argv, "--out-dir", str(tmp_path / "a")]) == 2
    assert "--image-size" in capsys.readouterr().err  # the message says what to do
    assert main([*argv, "--image-size", "8", "--out-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "checkpoint.npz").exists()
    # eval checks where its results go before it evaluates anything
    (tmp_path / "afile").write_text("")
    assert main(["eval", str(tmp_path / "b" / "checkpoint.npz"), "--out", str(tmp_path / "afile" / "e.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_images_cropped_to_the_size_in_training_are_cropped_alike_in_eval(tmp_path, monkeypatch, capsys):
    """--image-fit crop is a setting of the run: the checkpoint keeps it, and training, a
    resume and eval load the images alike (also when eval's --image-size changes the size);
    without --image-size it is refused in one line."""
    from swav_ref import train
    from swav_ref.data import datasets

    loads = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        loads.append((kwargs.get("image_size"), kwargs.get("image_fit")))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)  # eval's (imported when it runs)
    monkeypatch.setattr(train, "load_dataset", spy)  # the Trainer's (imported with the module)
    _write_images(tmp_path / "images", [(8, 8), (10, 12)] * 8)
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), *SMALL_RUN]
    assert main([*argv, "--image-fit", "crop", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--image-fit crop: applies with --image-size" in capsys.readouterr().err
    assert main([*argv, "--image-size", "8", "--image-fit", "crop", "--epochs", "2", "--stop-after", "1",
                 "--out-dir", str(tmp_path / "b")]) == 0
    checkpoint = str(tmp_path / "b" / "checkpoint.npz")
    assert main(["train", "--resume", checkpoint, "--no-progress"]) == 0
    assert main(["eval", checkpoint, "--out", str(tmp_path / "e.json")]) == 0
    assert main(["eval", checkpoint, "--image-size", "6", "--out", str(tmp_path / "e6.json")]) == 0
    assert loads == [(8, "crop"), (8, "crop"), (8, "crop"), (6, "crop")]
    assert json.loads((tmp_path / "e.json").read_text())["metadata"]["config"]["image_fit"] == "crop"


def test_supervised_training_on_unlabelled_images_is_refused(tmp_path, capsys):
    _write_images(tmp_path / "flat", [(8, 8)] * 16, labelled=False)
    assert main(["train", "--method", "supervised", "--dataset", "folder", "--data-dir", str(tmp_path / "flat"),
                 *SMALL_RUN, "--out-dir", str(tmp_path / "run")]) == 2
    assert "--method supervised needs labels" in capsys.readouterr().err


def test_more_prototypes_than_samples_per_sinkhorn_problem_warns(tmp_path):
    from swav_ref.train import Trainer

    config = TrainConfig(batch_size=16, n_prototypes=(500,), out_dir=str(tmp_path), progress=False)
    with pytest.warns(UserWarning, match="500 prototypes but only 16 samples per Sinkhorn problem"):
        Trainer(config)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the user's errors are shortened: anything else propagates unchanged."""
    import swav_ref.ot.desserts as desserts

    def broken(**kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(desserts, "run_dessert_example", broken)
    with pytest.raises(ZeroDivisionError):
        main(["dessert"])


def test_threads_caps_numpys_blas_pool():
    """--threads N reaches the BLAS library NumPy really uses (checked in a fresh process, so
    the cap does not outlive the test)."""
    import subprocess
    import sys

    code = ("from swav_ref.cli import _limit_threads; _limit_threads(1); from threadpoolctl import threadpool_info; "
            "from swav_ref.evaluate import linear_probe; "  # the probe's libraries (scikit-learn, SciPy) too
            "print(sorted({p['num_threads'] for p in threadpool_info()}), len(threadpool_info()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    counts, n_pools = out.split("] ")
    assert counts == "[1" and int(n_pools) >= 2, out  # NumPy's BLAS and at least one more, all at 1


@pytest.mark.parametrize("command", [["demo"], ["eval", "checkpoint.npz"], ["dessert"]])
def test_demo_eval_and_dessert_refuse_to_run_once_per_rank(command, monkeypatch, capsys):
    """Under mpiexec -n 2 every rank would run the whole job and write the same files."""
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2
    assert f"{command[0]} runs in one process; start it without mpiexec" in capsys.readouterr().err


def test_eval_runs_in_a_slurm_batch_script(monkeypatch, capsys):
    """The batch script's shell sees the allocation (SLURM_PROCID 0 of SLURM_NTASKS 4)
    without being one of srun's tasks: eval runs (and here stops at the missing file)."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert main(["eval", "/nonexistent/checkpoint.npz"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("seeds, methods, message", [
    ([0], ["supervised"], "method supervised: the supervised baseline is trained in every comparison already"),
    ([0], ["swav", "supervised"], "give the self-supervised methods only .swav, deepcluster-v2."),
    ([0, -1], ["swav"], "seed -1: each seed must be a whole number >= 0"),
    ([0, 1.5], ["swav"], "seed 1.5: each seed must be a whole number >= 0"),
    ([0, "a"], ["swav"], "seed 'a': each seed must be a whole number >= 0"),
    ([True], ["swav"], "seed True: each seed must be a whole number >= 0"),
])
def test_a_comparison_refuses_the_baseline_as_a_method_and_seeds_that_are_no_seeds(seeds, methods, message,
                                                                                   tmp_path, monkeypatch):
    """The supervised baseline asked for again was trained twice into one folder and shown
    as "2 seeds, std 0.0"; seed -1 failed after seed 0 had trained every method, leaving no
    results.json. Both are refused before anything trains."""
    from swav_ref import experiment

    def no_training(self, resume=None):
        raise AssertionError("trained before the comparison was checked")

    monkeypatch.setattr(experiment.Trainer, "fit", no_training)
    with pytest.raises(ValueError, match=message):
        experiment.run_comparison(TrainConfig(epochs=1), seeds=seeds, methods=methods, out_dir=tmp_path / "out",
                                  log=lambda msg: None)
    assert not (tmp_path / "out").exists()
    experiment.check_comparison(TrainConfig(), np.arange(3), ["swav", "deepcluster-v2"])  # NumPy seeds are seeds


@pytest.mark.slow
def test_a_comparison_rerun_into_its_folder_says_once_that_it_replaces_the_earlier_one(tiny, tmp_path, monkeypatch):
    """As `swav-ref demo` twice in a row: the second run works, and warns once (not once per
    trained model) that it replaces the first one's runs."""
    from swav_ref import experiment

    monkeypatch.setattr(experiment, "load_dataset", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(experiment, "write_figures", lambda *args: [])  # not what is tested: seconds saved
    config = TrainConfig(epochs=1, batch_size=32, n_crops=(2, 2), crop_sizes=(8, 6), min_scale=(0.5, 0.3),
                         max_scale=(1.0, 0.6), hidden_dim=16, feat_dim=8, n_prototypes=(10,), progress=False)
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*earlier")  # a first run replaces nothing
        experiment.run_comparison(config, out_dir=out, log=lambda msg: None)
    with pytest.warns(UserWarning) as record:
        table, _ = experiment.run_comparison(config, out_dir=out, log=lambda msg: None)
    earlier = [str(w.message) for w in record if "earlier" in str(w.message)]
    assert len(earlier) == 1 and "holds the runs of an earlier comparison (seed0/swav, seed0/supervised)" in earlier[0]
    assert set(table.index) >= {"SwAV", "supervised"} and (out / "results.json").exists()


def test_each_method_trains_into_its_own_default_folder(tmp_path, monkeypatch):
    """Every method's default was runs/swav: a DeepCluster-v2 or supervised run replaced the
    SwAV run there (with a warning, once it had started)."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--epochs", "1", "--batch-size", "32", "--n-crops", "2", "2", "--hidden-dim", "8", "--feat-dim", "8",
            "--n-prototypes", "12", "--no-progress", "--no-evaluate"]
    for method in ("supervised", "swav"):
        assert main(["train", "--method", method, *tiny]) == 0
    assert (tmp_path / "runs" / "supervised" / "checkpoint.npz").is_file()
    assert (tmp_path / "runs" / "swav" / "checkpoint.npz").is_file()
    assert json.loads((tmp_path / "runs" / "supervised" / "config.json").read_text())["method"] == "supervised"


def test_the_progress_bar_is_shown_on_a_terminal_only_unless_asked(tmp_path, capsys, monkeypatch):
    """Into a log file every redraw of the bar was kept (the quick start's demo wrote 41 KB
    of them); on a terminal it shows as before, and --progress shows it anywhere."""
    tiny = ["train", "--epochs", "1", "--batch-size", "32", "--n-crops", "2", "2", "--hidden-dim", "8",
            "--feat-dim", "8", "--n-prototypes", "12", "--no-evaluate"]
    assert main([*tiny, "--out-dir", str(tmp_path / "a")]) == 0
    assert "epoch 1/1" not in capsys.readouterr().err  # pytest's capture is not a terminal
    assert main([*tiny, "--progress", "--out-dir", str(tmp_path / "b")]) == 0
    assert "epoch 1/1" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main([*tiny, "--out-dir", str(tmp_path / "c")]) == 0
    assert "epoch 1/1" in capsys.readouterr().err


def test_a_run_refused_for_its_evaluation_leaves_no_folder_behind(tmp_path, capsys):
    from small_runs import write_digit_folder

    write_digit_folder(tmp_path / "data" / "only_class", 40, labelled=False)  # one class: nothing to score
    out = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "8",
            "--batch-size", "8", "--n-prototypes", "4", "--epochs", "1", "--out-dir", str(out)]
    assert main(argv) == 2
    assert "a classifier needs 2 or more" in capsys.readouterr().err
    assert not out.exists()  # the trainer had made it, empty


@pytest.mark.parametrize("argv, unused", [
    (["--method", "supervised", "--epsilon", "0.5", "--queue-length", "256"],
     "--n-prototypes, --epsilon, --queue-length"),
    (["--method", "deepcluster-v2", "--sinkhorn-iterations", "5"], "--sinkhorn-iterations"),
    (["--kmeans-iters", "3"], "--kmeans-iters"),
])
def test_an_option_the_method_does_not_use_is_warned_of(tmp_path, argv, unused):
    """They trained without a word: a typo'd --method, or a recipe copied across methods."""
    method = argv[1] if argv[0] == "--method" else "swav"
    with pytest.warns(UserWarning, match=f"^{unused}: not used by --method {method}, so given for nothing$"):
        assert main(["train", *argv, "--epochs", "1", "--batch-size", "256", "--n-prototypes", "30",
                     "--no-evaluate", "--out-dir", str(tmp_path / "run")]) == 0


def test_list_defaults_are_shown_as_they_are_typed(capsys):
    for argv, shown in ((["train", "--help"], "(default: 0 1)"), (["demo", "--help"], "(default: swav)")):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert shown in " ".join(out.split()), argv  # (help wraps lines)
        assert "(default: [" not in out and "(default: ['" not in out, argv
