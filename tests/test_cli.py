"""The command line: every option documented, train -> eval on a small image folder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from swav_ref.cli import OPTION_HELP, build_parser, main
from swav_ref.train import TrainConfig


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
    assert main(["eval", str(out / "checkpoint.npz"), "--out", str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "raw pixels" and methods[1].startswith("SwAV")
    assert all(0.0 <= r["linear probe"]["mean"] <= 1.0 for r in rows)
    assert np.isfinite([r["kNN k=20"]["mean"] for r in rows]).all()


@pytest.mark.parametrize("argv, message", [
    (["train", "--tf32"], "tf32 applies to the cupy backend only"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "CIFAR-10 folder not found: /nonexistent"),
    (["eval", "/nonexistent/checkpoint.npz"], "checkpoint not found: /nonexistent/checkpoint.npz"),
])
def test_user_errors_are_one_line_not_a_traceback(argv, message, capsys, monkeypatch):
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
                 "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)  # a single process, whatever runs the tests
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("swav-ref: error: ") and message in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the user's errors are shortened: anything else propagates unchanged."""
    import swav_ref.ot.desserts as desserts

    def broken(**kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(desserts, "run_dessert_example", broken)
    with pytest.raises(ZeroDivisionError):
        main(["dessert"])
