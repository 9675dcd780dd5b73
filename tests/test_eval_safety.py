"""``swav-ref eval`` and ``demo`` on awkward inputs: unlabelled data, a train split smaller
than k, a stray --data-dir; and neither leaves folders behind."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest

from small_runs import write_digit_folder
from swav_ref.checkpoint import load_checkpoint
from swav_ref.cli import main
from swav_ref.evaluate import KNNResult
from swav_ref.results import format_results, results_table
from swav_ref.train import Trainer, TrainConfig

#: one process whatever runs the tests (conftest.single_process)
pytestmark = pytest.mark.usefixtures("single_process")

#: A small network and batch, so a Trainer (and its checkpoint) costs well under a second.
SMALL = dict(batch_size=32, n_crops=(2, 2), crop_sizes=(8, 6), min_scale=(0.5, 0.3), max_scale=(1.0, 0.6),
             hidden_dim=16, feat_dim=8, n_prototypes=(10,), epochs=1, warmup_epochs=0, progress=False)


@pytest.fixture
def scratch_tmp(tmp_path, monkeypatch):
    """The system temporary folder, redirected to an empty folder we can inspect."""
    folder = tmp_path / "system_tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def save_untrained_checkpoint(out, **config) -> tuple[str, Trainer]:
    """A checkpoint at step 0: eval's code paths do not need a trained network."""
    trainer = Trainer(TrainConfig(**SMALL, out_dir=str(out), **config))
    trainer.save(out / "checkpoint.npz")
    return str(out / "checkpoint.npz"), trainer


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("swav-ref: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


# -- 1. unlabelled data ---------------------------------------------------------------------
def test_eval_of_an_unlabelled_folder_says_it_needs_class_folders(tmp_path, capsys, scratch_tmp):
    images = write_digit_folder(tmp_path / "flat", 80, labelled=False)
    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run", dataset="folder", data_dir=str(images))
    assert main(["eval", checkpoint]) == 2
    err = one_line_error(capsys)
    assert "has no labels" in err and "one sub-folder per class" in err and str(images) in err
    assert list(scratch_tmp.iterdir()) == []  # the scratch out_dir goes on error too (3.)


def test_experiment_refuses_unlabelled_splits_by_name(tmp_path):
    from swav_ref.experiment import evaluate_raw_pixels, evaluate_trainer

    images = write_digit_folder(tmp_path / "flat", 80, labelled=False)
    _, trainer = save_untrained_checkpoint(tmp_path / "run", dataset="folder", data_dir=str(images))
    for evaluate in (evaluate_raw_pixels, evaluate_trainer):
        with pytest.raises(ValueError, match="has no labels.*one sub-folder per class"):
            evaluate(trainer)


# -- 2. k clipped to a small train split ----------------------------------------------------
def test_table_reports_the_k_actually_used():
    clipped = {"linear probe": 0.9, "kNN k=20": KNNResult(0.8, 20, 20, 0.07),
               "kNN k=200": [KNNResult(0.7, 72, 200, 0.07), KNNResult(0.75, 72, 200, 0.07)]}
    table = results_table([{"method": "SwAV", **clipped}])
    assert table.attrs["k_used"] == {"kNN k=200": [72]}
    assert table.at["SwAV", "kNN k=200"] == pytest.approx(0.725)  # the column keeps its name
    header = format_results(table).splitlines()[0]
    assert "kNN k=200 (k=72 used)" in header and "kNN k=20 (" not in header


def test_table_is_unchanged_when_nothing_is_clipped():
    full = {"kNN k=20": KNNResult(0.8, 20, 20, 0.07), "kNN k=200": KNNResult(0.7, 200, 200, 0.07)}
    table = results_table([{"method": "SwAV", **full}, {"method": "raw pixels", "kNN k=200": 0.6}])
    assert table.attrs["k_used"] == {}
    assert "used" not in format_results(table)


def test_eval_reports_clipped_k_in_table_and_json(tmp_path, capsys, scratch_tmp):
    images = write_digit_folder(tmp_path / "classes", 100, labelled=True)
    checkpoint, trainer = save_untrained_checkpoint(tmp_path / "run", dataset="folder", data_dir=str(images))
    n_train = len(trainer.train_set)
    assert n_train < 200
    assert main(["eval", checkpoint, "--out", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert f"kNN k=200 (k={n_train} used)" in printed
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["metadata"]["k_used"] == {"kNN k=200": [n_train]}
    assert data["metrics"] == ["linear probe", "kNN k=20", "kNN k=200"]  # keys stay stable
    assert all(0 <= r["kNN k=200"]["mean"] <= 1 for r in data["results"])
    # 3. the Trainer's scratch out_dir (with its metrics.jsonl) is gone once eval ends
    assert list(scratch_tmp.iterdir()) == []


def test_a_gpu_runs_checkpoint_evaluates_on_the_cpu(tmp_path, capsys, scratch_tmp):
    """A checkpoint trained with --backend cupy --tf32 evaluates with --backend numpy (TF32,
    a GPU setting, is dropped rather than refused); without --backend, on a machine where
    CuPy is unusable, the error says to add --backend numpy. (On 100 digits in a folder:
    the point is the backend, not the data.)"""
    from swav_ref.backend import BackendUnavailableError, get_backend
    from swav_ref.checkpoint import load_checkpoint, save_checkpoint

    images = write_digit_folder(tmp_path / "classes", 100, labelled=True)
    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run", dataset="folder", data_dir=str(images))
    arrays, meta = load_checkpoint(checkpoint)
    meta["config"].update(backend="cupy", tf32=True)  # as written by a GPU run
    save_checkpoint(checkpoint, arrays, meta)

    assert main(["eval", checkpoint, "--backend", "numpy", "--out", str(tmp_path / "eval.json")]) == 0
    assert "linear probe" in capsys.readouterr().out
    try:
        get_backend("cupy")
    except BackendUnavailableError:
        assert main(["eval", checkpoint, "--out", str(tmp_path / "eval2.json")]) == 2
        error = one_line_error(capsys)
        assert "trained with --backend cupy" in error and "add --backend numpy" in error


def test_eval_warns_when_the_data_are_not_those_trained_on(tiny, tmp_path, capsys, scratch_tmp):
    """Trained on arrays handed to the Trainer, the checkpoint's configuration still names
    the digits: eval scores it on them, and says the data differ from the training data."""
    from swav_ref.data.datasets import ImageDataset

    trainer = Trainer(TrainConfig(**SMALL, out_dir=str(tmp_path / "run")),
                      train_set=ImageDataset(tiny[0].images[:96], name="my arrays"))
    trainer.save(tmp_path / "run" / "checkpoint.npz")
    with pytest.warns(UserWarning, match=r"trained on 96 images of shape \(1, 8, 8\) \(my arrays\), but the data "
                                         r"loaded now \(digits.*\) has 1438"):
        assert main(["eval", str(tmp_path / "run" / "checkpoint.npz"), "--out", str(tmp_path / "e.json")]) == 0


def test_eval_of_a_run_on_arrays_says_to_use_python(tiny, tmp_path, capsys):
    trainer = Trainer(TrainConfig(**SMALL, dataset="arrays", out_dir=str(tmp_path / "run")), train_set=tiny[0])
    trainer.save(tmp_path / "run" / "checkpoint.npz")
    assert main(["eval", str(tmp_path / "run" / "checkpoint.npz")]) == 2
    assert "evaluate it from Python: swav_ref.encoder.load_encoder(path)" in one_line_error(capsys)


def test_the_same_command_resumes_a_run_whose_crops_an_older_version_chose(tmp_path, capsys, scratch_tmp):
    """A folder run checkpointed before the crops followed the data set (it holds the digits
    crops): `swav-ref train ... --resume` without crop options takes the checkpoint's
    values, not today's folder recipe; eval then names the step."""
    images = str(write_digit_folder(tmp_path / "classes", 100, labelled=True))
    old = dict(SMALL, epochs=1, freeze_prototypes_niters=22)  # the values an older version saved
    Trainer(TrainConfig(**old, dataset="folder", data_dir=images, out_dir=str(tmp_path / "run"))).fit()
    command = ["train", "--dataset", "folder", "--data-dir", images, "--batch-size", "32", "--hidden-dim", "16",
               "--feat-dim", "8", "--n-prototypes", "10", "--warmup-epochs", "0", "--epochs", "2", "--no-progress",
               "--no-evaluate", "--out-dir", str(tmp_path / "run"), "--resume", str(tmp_path / "run" / "checkpoint.npz")]
    with pytest.warns(UserWarning, match="--epochs 1 -> 2 changes the learning-rate schedule"):  # the run is longer
        assert main(command) == 0
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    saved = meta["config"]
    assert (saved["n_crops"], saved["crop_sizes"], saved["min_scale"]) == ([2, 2], [8, 6], [0.5, 0.3])
    assert meta["step"] == 4
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "checkpoint.npz"), "--out", str(tmp_path / "e.json")]) == 0
    assert "SwAV (step 4)" in capsys.readouterr().out


# -- 4. demo leaves no empty folders --------------------------------------------------------
@pytest.mark.slow
def test_comparison_leaves_no_empty_folders(tmp_path, scratch_tmp):
    from swav_ref.experiment import run_comparison

    images = write_digit_folder(tmp_path / "classes", 100, labelled=True)
    config = TrainConfig(**SMALL, dataset="folder", data_dir=str(images))
    out = tmp_path / "out"
    table, _ = run_comparison(config, out_dir=out, log=lambda msg: None)
    folders = [p for p in out.rglob("*") if p.is_dir()]
    assert not (out / "seed0" / "untrained").exists()
    assert [p for p in folders if not any(p.iterdir())] == []
    assert list(scratch_tmp.iterdir()) == []
    k_used = json.loads((out / "results.json").read_text())["metadata"]["k_used"]
    assert k_used == table.attrs["k_used"] == {"kNN k=200": [80]}


# -- 5. help shows each default once ----------------------------------------------------------
def test_eval_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert text.count("(default: eval.json next to the checkpoint)") == 1


# -- 6. --data-dir -------------------------------------------------------------------------
def test_eval_refuses_data_dir_for_digits(tmp_path, capsys):
    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run")
    assert main(["eval", checkpoint, "--data-dir", "/nonexistent"]) == 2
    err = one_line_error(capsys)
    assert "--data-dir /nonexistent" in err and "digits" in err and "cifar10 and folder checkpoints only" in err


def test_eval_names_a_missing_data_dir(tmp_path, capsys):
    images = write_digit_folder(tmp_path / "classes", 80, labelled=True)
    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run", dataset="folder", data_dir=str(images))
    missing = tmp_path / "moved"
    assert main(["eval", checkpoint, "--data-dir", str(missing)]) == 2
    assert f"--data-dir {missing} does not exist" in one_line_error(capsys)


def test_eval_shuffles_the_probes_folds_with_the_runs_seed(tmp_path, capsys, monkeypatch):
    """``train`` and ``demo`` score with the run's seed; ``eval`` used seed 0, so it could pick
    another C and report another accuracy for the same weights. (On 100 digits in a folder:
    the point is the seed, not the data.)"""
    import swav_ref.evaluate as E

    seeds = []
    probe = E.linear_probe
    monkeypatch.setattr(E, "linear_probe", lambda *a, **kw: seeds.append(kw.get("seed")) or probe(*a, **kw))
    images = write_digit_folder(tmp_path / "classes", 100, labelled=True)
    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run", seed=3, dataset="folder", data_dir=str(images))
    assert main(["eval", checkpoint, "--out", str(tmp_path / "eval.json")]) == 0
    assert seeds == [3, 3]  # raw pixels and the network
    probes = [r["linear probe"]["probe"][0] for r in json.loads((tmp_path / "eval.json").read_text())["results"]]
    assert [p["cv_folds"] for p in probes] == [5, 5]  # the probe's choices are in the file


# -- 5. forged metadata and weights, output paths that are folders --------------------------
def test_eval_of_forged_metadata_is_one_line_before_any_evaluation(tmp_path, capsys, monkeypatch):
    """A normalisation of std 0 ended in a ValueError deep in the evaluation; a missing step
    in a KeyError after the raw-pixel baseline had run. Refused now as the file's fault,
    before anything is evaluated."""
    from swav_ref import evaluate
    from swav_ref.checkpoint import save_checkpoint

    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run")
    arrays, meta = load_checkpoint(checkpoint)
    monkeypatch.setattr(evaluate, "evaluate_features", lambda *a, **k: pytest.fail("evaluated"))
    for change, match in ((dict(normalisation={"mean": [0.3], "std": [0.0]}), "its normalisation std is [0.0]"),
                          (dict(step=None), "its step is missing")):
        save_checkpoint(checkpoint, arrays, {k: v for k, v in {**meta, **change}.items() if v is not None})
        assert main(["eval", checkpoint, "--out", str(tmp_path / "e.json")]) == 2
        assert f"{checkpoint}: {match}" in one_line_error(capsys)


def test_eval_of_nan_weights_is_a_checkpoint_error(tmp_path, capsys):
    """load_encoder promised a CheckpointError for unusable weights, but NaN ones were a
    plain ValueError from load_state_dict, and eval printed a traceback."""
    from swav_ref.checkpoint import CheckpointError, save_checkpoint
    from swav_ref.encoder import load_encoder

    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run")
    arrays, meta = load_checkpoint(checkpoint)
    arrays["model.backbone.conv1.weight"] = np.full_like(arrays["model.backbone.conv1.weight"], np.nan)
    save_checkpoint(checkpoint, arrays, meta)
    with pytest.raises(CheckpointError, match=r"checkpoint\.npz: its model\.backbone\.\* entries: "):
        load_encoder(checkpoint)
    assert main(["eval", checkpoint, "--out", str(tmp_path / "e.json")]) == 2
    assert "its model.backbone.* entries" in one_line_error(capsys)


def test_eval_refuses_an_output_file_that_is_a_folder_before_evaluating(tmp_path, capsys, monkeypatch):
    """--out naming a folder, or an eval.json/ folder beside the checkpoint: an
    IsADirectoryError once the whole evaluation was done."""
    from swav_ref import evaluate

    checkpoint, _ = save_untrained_checkpoint(tmp_path / "run")
    monkeypatch.setattr(evaluate, "evaluate_features", lambda *a, **k: pytest.fail("evaluated"))
    assert main(["eval", checkpoint, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a folder" in one_line_error(capsys)
    (tmp_path / "run" / "eval.json").mkdir()
    assert main(["eval", checkpoint]) == 2
    assert f"{tmp_path / 'run' / 'eval.json'} is a folder" in one_line_error(capsys)
