"""The command line as a user meets it: --resume continues the checkpoint's own run, eval
needs only the encoder and labelled data, typos get a suggestion, warnings and Ctrl-C are
one line, and a flat image folder trains on every image."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from small_runs import write_digit_folder
from swav_ref.checkpoint import load_checkpoint, save_checkpoint
from swav_ref.cli import main
from swav_ref.train import TrainConfig, scheduled_rate

#: one process whatever runs the tests (conftest.single_process)
pytestmark = pytest.mark.usefixtures("single_process")

#: 160 training digits at batch 32: 5 steps per epoch, a second an epoch.
SMALL = ["--batch-size", "32", "--n-crops", "2", "2", "--hidden-dim", "16", "--feat-dim", "8", "--n-prototypes", "10",
         "--no-progress", "--no-evaluate", "--log-every", "1", "--checkpoint-every", "1"]


@pytest.fixture
def small_digits(monkeypatch):
    """``swav-ref train`` on the first 200 digits (160 to train), so that a run takes seconds."""
    from swav_ref.data import datasets

    real = datasets.load_digits_dataset
    monkeypatch.setattr(datasets, "load_digits_dataset", lambda: real().subset(np.arange(200)))


def step_losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


# -- --resume takes the checkpoint's settings ------------------------------------------------
@pytest.mark.slow
def test_a_bare_resume_continues_the_checkpoints_run_in_its_folder(small_digits, tmp_path, capsys):
    """`--resume CHECKPOINT` alone used to take every default: --epochs 100 recomputed the
    learning-rate schedule (the rate jumped back to its peak), --out-dir runs/swav wrote
    elsewhere, and the checkpoint was overwritten with epochs = 100."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", *SMALL, "--seed", "3", "--epochs", "3", "--out-dir", str(full)]) == 0
    assert main(["train", *SMALL, "--seed", "3", "--epochs", "3", "--stop-after", "2", "--out-dir", str(split)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(split / "checkpoint.npz")]) == 0
    out = capsys.readouterr().out
    assert f"resuming {split / 'checkpoint.npz'} with its settings; writing to {split}" in out
    meta = load_checkpoint(split / "checkpoint.npz")[1]
    assert meta["step"] == 15 and meta["config"]["epochs"] == 3 and meta["config"]["seed"] == 3
    assert step_losses(split) == step_losses(full)  # bit for bit, as if never interrupted


@pytest.mark.slow
def test_a_resume_says_what_it_changes_and_warns_of_a_new_schedule(small_digits, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--out-dir", str(run)]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="--epochs 2 -> 3 changes the learning-rate schedule") as record:
        assert main(["train", "--resume", str(run / "checkpoint.npz"), "--epochs", "3", "--out-dir",
                     str(tmp_path / "longer")]) == 0
    assert f"with its settings, except --epochs 3 (given here); writing to {tmp_path / 'longer'}" in \
        capsys.readouterr().out
    config = TrainConfig(**{**load_checkpoint(run / "checkpoint.npz")[1]["config"]})
    now = scheduled_rate(TrainConfig(**{**config.to_dict(), "epochs": 3}), 5, 10)
    assert f"at step 10 the rate is {now:.4g}" in str(record[0].message)


def test_a_resume_that_does_not_fit_lists_every_difference_as_options(small_digits, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoint.npz"), "--feat-dim", "4", "--batch-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "trained with --feat-dim 8, --batch-size 32; this run has --feat-dim 4, --batch-size 16" in err, err
    assert main(["eval", str(run / "checkpoint.npz"), "--image-size", "16"]) == 2  # digits are 8x8, embedded
    assert "--image-size 16: applies to image-folder checkpoints only" in capsys.readouterr().err


def test_a_checkpoint_whose_step_is_no_whole_number_is_refused(small_digits, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out-dir", str(run)]) == 0
    arrays, meta = load_checkpoint(run / "checkpoint.npz")
    save_checkpoint(run / "checkpoint.npz", arrays, {**meta, "step": 4.5})  # was truncated to 4, silently
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoint.npz"), "--epochs", "2"]) == 2
    assert "its step is 4.5, not a whole number of steps" in capsys.readouterr().err


# -- Ctrl-C ----------------------------------------------------------------------------------
def test_ctrl_c_says_which_checkpoint_is_kept_and_how_to_go_on(small_digits, tmp_path, capsys, monkeypatch):
    from swav_ref.train import Trainer

    real = Trainer._train_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        real(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted_in_epoch_2)
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "3", "--out-dir", str(run)]) == 130
    err = capsys.readouterr().err
    kept = run / "checkpoint.npz"
    assert err == (f"swav-ref: error: interrupted at step 5; the last good checkpoint, {kept}, is kept; "
                   f"to continue: swav-ref train --resume {kept}\n")


# -- typos -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, command, hint", [
    (["train", "--batchsize", "16"], "train", "--batchsize: did you mean --batch-size?"),
    (["demo", "--epoch", "1"], "demo", "--epoch: did you mean --epochs?"),  # no abbreviations
    (["train", "--epoch", "3"], "train", "--epoch: did you mean --epochs?"),  # not --epoch-queue-starts
    (["eval", "x.npz", "--bakend", "numpy"], "eval", "--bakend: did you mean --backend?"),
    # the beginning of an option: difflib alone named --arch, --resume and --resume
    (["train", "--batch", "64"], "train", "--batch: did you mean --batch-size?"),
    (["train", "--queue", "64"], "train", "--queue: did you mean --queue-length?"),
    (["train", "--freeze", "3"], "train", "--freeze: did you mean --freeze-prototypes-niters?"),
    (["eval", "x.npz", "--out-dir", "d"], "eval", "--out-dir: did you mean --out?"),
    # a word of several options, and another tool's name for one
    (["train", "--size", "8"], "train", "--size: did you mean --batch-size or --image-size?"),
    (["train", "--gpu"], "train", "--gpu: did you mean --backend cupy?"),
    (["train", "--lr", "0.1"], "train", "--lr: did you mean --base-lr?"),
    # asking to turn one off: difflib named the option itself
    (["eval", "x.npz", "--skip-baseline"], "eval", "--skip-baseline: did you mean --no-baseline?"),
    (["train", "--disable-progress"], "train", "--disable-progress: did you mean --no-progress?"),
])
def test_an_unknown_option_is_one_line_with_the_nearest_option(argv, command, hint, capsys):
    """argparse printed the command's whole usage (32 lines for train) above the error."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"swav-ref: error: {command}: unrecognized arguments") and hint in err, err
    assert err.endswith(f"(see swav-ref {command} --help)\n") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "abc"], "swav-ref: error: train: argument --epochs: invalid int value: 'abc'"),
    (["train", "--optimizer", "adam"], "swav-ref: error: train: argument --optimizer: invalid choice: 'adam'"),
    ([], "swav-ref: error: the following arguments are required: COMMAND (see swav-ref --help)"),
])
def test_a_malformed_option_is_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_a_table_the_terminal_cannot_encode_is_printed_with_escapes(tmp_path):
    """On Windows, output redirected to a file is encoded in the ANSI code page; one with
    no ± (cp874) crashed the command after the whole run, its results table unprinted."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-m", "swav_ref", "demo", "--help"], capture_output=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert b"mean \\xb1 std" in done.stdout


# -- warnings --------------------------------------------------------------------------------
def test_the_librarys_warnings_are_one_line_on_the_command_line(tmp_path):
    """They used to print a source path and a line of code, like a crash; here an
    explicit --warmup-epochs that the schedule caps (silently, before) comes first."""
    done = subprocess.run([sys.executable, "-m", "swav_ref", "train", "--warmup-epochs", "5", "--epochs", "4",
                           "--batch-size", "100000", "--out-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""})
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[0] == ("swav-ref: warning: --warmup-epochs 5 is more than half of --epochs 4: the warm-up is capped "
                        "at 2 epoch(s), so that the rate also decays"), done.stderr
    assert lines[1].startswith("swav-ref: error: ") and len(lines) == 2, done.stderr


def test_warnings_from_elsewhere_keep_pythons_format():
    import warnings

    from swav_ref import cli

    one_line = cli._one_line_warnings(warnings.formatwarning)
    assert one_line("careful", UserWarning, cli.__file__, 10) == "swav-ref: warning: careful\n"
    assert one_line("careful", UserWarning, "/elsewhere/lib.py", 10).startswith("/elsewhere/lib.py:10: UserWarning")


# -- a flat image folder ---------------------------------------------------------------------
def test_a_flat_folder_trains_on_every_image_and_says_why_nothing_is_evaluated(tmp_path, capsys):
    """It used to hold out 20 % of the images, which nothing used, and to skip the
    evaluation without a word."""
    write_digit_folder(tmp_path / "flat", 40, labelled=False)
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "flat"), *SMALL[:-5], "--batch-size", "40",
            "--epochs", "1", "--crop-sizes", "8", "6", "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no evaluation at the end: flat has no labels (a flat image folder)" in out, out
    meta = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[1]
    assert meta["data"]["n_images"] == 40 and meta["step"] == 1  # all 40, one batch of 40


# -- eval ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_scores_a_checkpoint_on_other_data_without_training_checks(small_digits, tmp_path, capsys):
    """eval built a whole trainer: a labelled folder smaller than the run's batch was refused
    with advice to lower --batch-size, which eval does not have; another channel count got
    an internal shape message; a moved data folder gave no hint; --image-size was missing."""
    run = tmp_path / "run"
    folder = tmp_path / "images"
    write_digit_folder(folder, 100, labelled=True)
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), *SMALL, "--batch-size", "64",
                 "--crop-sizes", "8", "6", "--epochs", "1", "--out-dir", str(run)]) == 0
    checkpoint = str(run / "checkpoint.npz")
    few = tmp_path / "few"
    write_digit_folder(few, 60, labelled=True)  # 48 training images: fewer than the batch of 64
    capsys.readouterr()
    assert main(["eval", checkpoint, "--data-dir", str(few), "--out", str(tmp_path / "few.json")]) == 0
    rows = json.loads((tmp_path / "few.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["raw pixels", "SwAV (step 1)"]
    # the baseline (slow on large images) can be left out once it is known: the model's row is the same
    assert main(["eval", checkpoint, "--data-dir", str(few), "--no-baseline", "--out", str(tmp_path / "nb.json")]) == 0
    alone = json.loads((tmp_path / "nb.json").read_text())["results"]
    assert [r["method"] for r in alone] == ["SwAV (step 1)"] and alone[0] == rows[1]
    colour = tmp_path / "colour"
    write_digit_folder(colour, 60, labelled=True, channels=3)
    assert main(["eval", checkpoint, "--data-dir", str(colour)]) == 2
    assert "takes images of 1 channel(s), but colour/train has 3" in capsys.readouterr().err
    assert main(["eval", checkpoint, "--image-size", "0"]) == 2
    assert "--image-size 0: must be at least 1 pixel" in capsys.readouterr().err
    with pytest.warns(UserWarning) as warned:  # accepted, and warned of once: not the training size
        assert main(["eval", checkpoint, "--data-dir", str(few), "--image-size", "16", "--out",
                     str(tmp_path / "big.json")]) == 0
    sizes = [str(w.message) for w in warned if "16, 16" in str(w.message) or "16x16" in str(w.message)]
    assert len(sizes) == 1 and "checkpoint.npz was trained on" in sizes[0], [str(w.message) for w in warned]
    folder.rename(tmp_path / "moved")
    assert main(["eval", checkpoint]) == 2
    assert "is not there any more; if the data moved, give their folder with --data-dir" in capsys.readouterr().err
    assert main(["eval", checkpoint, "--data-dir", str(tmp_path / "moved"), "--out", str(tmp_path / "e.json")]) == 0


# -- resuming a folder run ---------------------------------------------------------------------
def test_a_resume_checks_the_given_options_against_the_checkpoint_and_keeps_its_freeze(tmp_path, capsys):
    """The given options used to be checked against the command line's defaults (--data-dir
    was refused as "the digits are embedded" for a folder run whose data had moved), and
    an explicit --freeze-prototypes-niters fell back to the recipe's."""
    folder = tmp_path / "images"
    write_digit_folder(folder, 100, labelled=True)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), *SMALL, "--crop-sizes", "8", "6",
                 "--freeze-prototypes-niters", "7", "--epochs", "2", "--stop-after", "1", "--out-dir", str(run)]) == 0
    folder.rename(tmp_path / "moved")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same run: nothing to warn of
        assert main(["train", "--resume", str(run / "checkpoint.npz"), "--data-dir", str(tmp_path / "moved")]) == 0
    assert f"with its settings, except --data-dir {tmp_path / 'moved'} (given here)" in capsys.readouterr().out
    config = load_checkpoint(run / "checkpoint.npz")[1]["config"]
    assert config["freeze_prototypes_niters"] == 7 and config["data_dir"] == str(tmp_path / "moved")


def test_a_flat_folder_checkpoint_of_the_80_percent_split_says_how_to_resume_it(tmp_path, capsys):
    """Versions before flat folders trained on every image held out 20 %; their checkpoints
    no longer match the folder's images, and the refusal says how to resume them exactly."""
    from swav_ref.data.datasets import load_image_folder, split_dataset
    from swav_ref.train import Trainer

    write_digit_folder(tmp_path / "flat", 50, labelled=False)
    config = TrainConfig(dataset="folder", data_dir=str(tmp_path / "flat"), batch_size=20, n_crops=(2, 2),
                         crop_sizes=(8, 6), hidden_dim=16, feat_dim=8, n_prototypes=(10,), epochs=2, stop_after=1,
                         progress=False, out_dir=str(tmp_path / "run"))
    old_split, _ = split_dataset(load_image_folder(tmp_path / "flat"), seed=0)  # as those versions trained
    Trainer(config, train_set=old_split).fit()
    path = tmp_path / "run" / "checkpoint.npz"
    assert main(["train", "--resume", str(path), "--no-evaluate"]) == 2
    err = capsys.readouterr().err
    assert "trained on 40 images" in err and "written before a flat image folder trained on every image" in err, err
    resumed = Trainer(dataclasses.replace(config, stop_after=0), train_set=old_split)  # what the message says
    resumed.fit(resume=path)
    assert resumed.step == 4


# -- forged checkpoints and output files that are folders ---------------------------------------
def _untrained_checkpoint(folder) -> str:
    """A checkpoint at step 0 of a small run on the digits, without training."""
    from swav_ref.train import Trainer

    config = TrainConfig(batch_size=32, n_crops=(2, 2), hidden_dim=16, feat_dim=8, n_prototypes=(10,),
                         progress=False, out_dir=str(folder))
    Trainer(config).save(folder / "checkpoint.npz")
    return str(folder / "checkpoint.npz")


@pytest.mark.parametrize(("change", "match"), [
    (dict(hidden_dim=10**9), "the configuration disagrees with the checkpoint's own weights (model.head.projection.0"),
    (dict(n_prototypes=[10**9]), "the configuration disagrees with the checkpoint's own weights (model.head.prototypes0"),
])
def test_a_resume_refuses_a_configuration_its_weights_contradict_before_building(tmp_path, capsys, change, match):
    """The model was built from the checkpoint's configuration before its shapes were
    compared: hidden_dim 10**9 was a MemoryError traceback."""
    checkpoint = _untrained_checkpoint(tmp_path / "run")
    arrays, meta = load_checkpoint(checkpoint)
    save_checkpoint(checkpoint, arrays, {**meta, "config": {**meta["config"], **change}})
    assert main(["train", "--resume", checkpoint, "--out-dir", str(tmp_path / "more"), "--no-evaluate"]) == 2
    err = capsys.readouterr().err
    assert f"swav-ref: error: {checkpoint}: {match}" in err and "Traceback" not in err, err


def test_a_resume_refuses_per_worker_files_outside_the_checkpoints_folder(tmp_path, capsys):
    """local_files ['../../etc/passwd'] was a raw ValueError from pathlib; ['/etc/passwd'] too."""
    checkpoint = _untrained_checkpoint(tmp_path / "run")
    arrays, meta = load_checkpoint(checkpoint)
    for files in (["../../etc/passwd"], ["/etc/passwd"]):
        save_checkpoint(checkpoint, arrays, {**meta, "local_ranks": [0], "local_files": files})
        assert main(["train", "--resume", checkpoint, "--out-dir", str(tmp_path / "more"), "--no-evaluate"]) == 2
        assert f"{checkpoint}: its local_files is {files!r}, not a list of file names" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["checkpoint.npz", "metrics.jsonl", "config.json"])
def test_train_refuses_an_out_dir_whose_output_file_is_a_folder_before_training(tmp_path, capsys, monkeypatch, name):
    """A checkpoint.npz/ (or metrics.jsonl/, config.json/) folder in --out-dir failed only
    after the first epoch, with a traceback."""
    from swav_ref.train import Trainer

    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("a trainer was built"))
    (tmp_path / "run" / name).mkdir(parents=True)
    assert main(["train", *SMALL, "--epochs", "1", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run' / name} is a folder, where this command writes its {name} file" in err, err


def test_a_resume_whose_recorded_data_folder_is_another_machines_says_to_give_it(tmp_path, capsys):
    """A checkpoint from Windows names C:\\...; the resume said only "image folder not found"."""
    folder = tmp_path / "images"
    write_digit_folder(folder, 100, labelled=True)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), *SMALL, "--crop-sizes", "8", "6",
                 "--epochs", "2", "--stop-after", "1", "--no-evaluate", "--out-dir", str(run)]) == 0
    arrays, meta = load_checkpoint(run / "checkpoint.npz")
    meta["config"]["data_dir"] = "C:\\Users\\x\\data"
    save_checkpoint(run / "checkpoint.npz", arrays, meta)
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoint.npz")]) == 2
    err = capsys.readouterr().err
    assert "C:\\Users\\x\\data" in err and "give their folder with --data-dir" in err, err
    assert main(["train", "--resume", str(run / "checkpoint.npz"), "--data-dir", str(folder), "--no-evaluate"]) == 0


def test_a_resume_across_the_jpeg_decoder_change_says_that_may_be_the_whole_difference(tmp_path):
    """A checkpoint of a resized folder, written before large JPEGs were decoded at reduced
    scale, sees other pixels from the same files: the warning blamed the data alone."""
    folder = tmp_path / "images"
    write_digit_folder(folder, 100, labelled=True)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "8", *SMALL,
                 "--crop-sizes", "8", "6", "--epochs", "2", "--stop-after", "1", "--out-dir", str(run)]) == 0
    arrays, meta = load_checkpoint(run / "checkpoint.npz")
    assert meta["data"]["folder_decoder"] == 2
    del meta["data"]["folder_decoder"]  # as written before it was recorded
    meta["data"]["fingerprint"] = "0" * 64  # the pixels the old decoder gave
    save_checkpoint(run / "checkpoint.npz", arrays, meta)
    with pytest.warns(UserWarning, match="differ from those the checkpoint was trained on") as warned:
        assert main(["train", "--resume", str(run / "checkpoint.npz")]) == 0
    assert any("written by an earlier swav_ref, which decoded JPEGs at full size" in str(w.message) for w in warned)


def test_eval_out_is_a_file_and_a_folder_is_refused(tmp_path, capsys):
    """``--out evalout/`` once wrote a JSON file named evalout (train's and demo's --out are folders)."""
    checkpoint = _untrained_checkpoint(tmp_path / "run")
    assert main(["eval", checkpoint, "--out", str(tmp_path / "evalout") + "/"]) == 2
    assert "a folder; eval's --out is the JSON file to write" in capsys.readouterr().err
    assert not (tmp_path / "evalout").exists()  # (an existing folder: test_eval_safety.py)
