"""Resuming never goes quietly wrong: missing per-worker files, file modes, leaked file
handles, a reused output folder's metrics, and a resume with nothing left to train."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from small_runs import small_config
from swav_ref import checkpoint as ckpt
from swav_ref.results import save_results_json
from swav_ref.train import Trainer, TrainConfig, scheduled_rate

#: Most tests here resume a short run for more epochs, which warns of the new learning-rate
#: schedule; the test that checks that warning records it itself.
NEW_SCHEDULE = "ignore:--resume .* changes the learning-rate schedule:UserWarning"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(NEW_SCHEDULE)]


def trainer(tiny, out_dir, **changes) -> Trainer:
    train, test = tiny
    return Trainer(small_config(out_dir, **changes), train_set=train, test_set=test)


def file_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# -- 1. the per-worker queue / memory bank file ------------------------------------------
LOCAL_STATE = {"queue": dict(queue_length=64, epoch_queue_starts=1), "deepcluster": dict(method="deepcluster-v2")}


# Runs that several tests start from, trained once per module; each test works on its own
# copy of the folder (some rewrite the checkpoint or delete its files).
@pytest.fixture(scope="module")
def finished_runs(tiny, tmp_path_factory) -> dict:
    """Folders with ``checkpoint.npz``: ``"one_epoch"`` of SwAV, and two epochs of each
    ``LOCAL_STATE`` run (``"queue"``, ``"deepcluster"``), with their per-worker files."""
    root = tmp_path_factory.mktemp("finished_runs")
    trainer(tiny, root / "one_epoch", epochs=1).fit()
    for kind, extra in LOCAL_STATE.items():
        trainer(tiny, root / kind, **extra).fit()
    return {name: root / name for name in ("one_epoch", *LOCAL_STATE)}


def copy_of(finished_runs, name, tmp_path):
    """A copy of the finished run ``name`` in ``tmp_path / "run"``."""
    return shutil.copytree(finished_runs[name], tmp_path / "run")


@pytest.mark.parametrize("kind", LOCAL_STATE)
def test_resume_without_the_local_file_is_refused(tiny, finished_runs, tmp_path, kind):
    extra = LOCAL_STATE[kind]
    copy_of(finished_runs, kind, tmp_path)
    # named by rank and step; the file of the first epoch's checkpoint (step 5) is gone
    assert [f.name for f in (tmp_path / "run").glob("*.local.npz")] == ["checkpoint.rank0.step10.local.npz"]
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoint.npz", copy)
    resumed = trainer(tiny, tmp_path / "resumed", epochs=3, **extra)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.rank0\.step10\.local\.npz is missing.*copy"):
        resumed.fit(resume=copy / "checkpoint.npz")
    shutil.copy(tmp_path / "run" / "checkpoint.rank0.step10.local.npz", copy)  # both files: resumes
    trainer(tiny, tmp_path / "resumed", epochs=3, **extra).fit(resume=copy / "checkpoint.npz")


def test_old_checkpoint_without_the_local_list_still_loads(tiny, finished_runs, tmp_path):
    """Written before ``local_ranks`` existed: nothing to check, the file is used if present."""
    copy_of(finished_runs, "one_epoch", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    assert meta.pop("local_ranks") == []  # no queue, no bank
    ckpt.save_checkpoint(path, arrays, meta)
    again = trainer(tiny, tmp_path / "again", epochs=1)
    again.load(path)
    assert again.step == 5 and again.queue is None


def test_a_job_killed_while_saving_leaves_a_checkpoint_whose_files_are_all_there(tiny, tmp_path, monkeypatch):
    """Killed after the workers wrote their step-10 files but before the checkpoint that
    names them: the step-5 checkpoint and its files are intact and resume (the local file
    used to be overwritten in place, leaving step 5's checkpoint with step 10's bank)."""
    run = trainer(tiny, tmp_path / "run", **LOCAL_STATE["deepcluster"])
    real_save = ckpt.save_checkpoint

    def killed_at_step_10(path, arrays, meta):
        if meta.get("step") == 10 and path.name == "checkpoint.npz":
            raise KeyboardInterrupt  # the job's time limit
        real_save(path, arrays, meta)

    monkeypatch.setattr(ckpt, "save_checkpoint", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    resumed = trainer(tiny, tmp_path / "run", epochs=3, **LOCAL_STATE["deepcluster"])
    resumed.load(tmp_path / "run" / "checkpoint.npz")
    assert resumed.step == 5 and resumed.bank is not None


def test_saving_removes_only_this_checkpoints_earlier_files(tiny, tmp_path):
    """The clean-up matches the checkpoint's own name literally: brackets in it are no
    pattern, and another checkpoint's files in the same folder stay."""
    run = trainer(tiny, tmp_path / "run", **LOCAL_STATE["deepcluster"])
    run.fit()
    folder = tmp_path / "run"
    decoy = folder / "ckpt1.rank0.step5.local.npz"  # what the pattern "ckpt[1]" would also match
    decoy.write_bytes(b"another checkpoint's file")
    run.save(folder / "ckpt[1].npz")
    run.step += 1
    run.save(folder / "ckpt[1].npz")
    assert decoy.exists() and (folder / "checkpoint.rank0.step10.local.npz").exists()
    assert sorted(f.name for f in folder.glob("ckpt?1?.*")) == ["ckpt[1].npz", "ckpt[1].rank0.step11.local.npz"]



def test_an_earlier_file_held_open_does_not_fail_the_save(tiny, tmp_path, monkeypatch):
    """On Windows a file another program holds (a scanner, an indexer) cannot be removed:
    the new checkpoint is already in place, so the old file is left for the next save."""
    real_unlink = Path.unlink

    def held(self, missing_ok=False):
        if self.name.endswith(".local.npz"):
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held)
    run = trainer(tiny, tmp_path / "run", **LOCAL_STATE["deepcluster"])
    run.fit()  # the step-10 save could not remove step 5's file
    folder = tmp_path / "run"
    assert sorted(f.name for f in folder.glob("*.local.npz")) == ["checkpoint.rank0.step10.local.npz",
                                                                  "checkpoint.rank0.step5.local.npz"]
    monkeypatch.undo()
    run.step += 1
    run.save(folder / "checkpoint.npz")  # let go: the next save removes both earlier files
    assert [f.name for f in folder.glob("*.local.npz")] == ["checkpoint.rank0.step11.local.npz"]


@pytest.mark.parametrize("recorded", ["C:\\Users\\x\\data", "/home/x/gone"])
def test_a_recorded_data_folder_that_is_not_there_says_to_give_it(tmp_path, recorded):
    """A checkpoint from another machine (perhaps another OS) names a folder not here: the
    resume says to give the data's folder with --data-dir, as eval does."""
    from swav_ref.data.datasets import DatasetError
    from swav_ref.resume import check_recorded_data_dir

    config = small_config(tmp_path, dataset="folder", data_dir=recorded)
    with pytest.raises(DatasetError, match=rf"{re.escape(recorded)}, the image folder the checkpoint was trained "
                                           r"on, is not there.*give their folder with --data-dir") as error:
        check_recorded_data_dir("run/checkpoint.npz", config)
    if os.name != "nt":
        assert ("(a Windows path: the checkpoint was written on Windows)" in str(error.value)) == (recorded[1] == ":")
    check_recorded_data_dir("run/checkpoint.npz", small_config(tmp_path, dataset="folder", data_dir=str(tmp_path)))
    check_recorded_data_dir("run/checkpoint.npz", small_config(tmp_path))  # digits: no folder

def test_eval_loads_the_weights_without_the_workers_files(tiny, finished_runs, tmp_path):
    """The per-worker files matter to a resume only: evaluation of a queue or DeepCluster
    checkpoint needs none of them (it was refused when written by other workers)."""
    copy_of(finished_runs, "deepcluster", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    meta["world_size"] = 4  # as if written by four workers
    ckpt.save_checkpoint(path, arrays, meta)
    for local in (tmp_path / "run").glob("*.local.npz"):
        local.unlink()
    evaluator = trainer(tiny, tmp_path / "eval", method="deepcluster-v2")
    evaluator.load(path, weights_only=True)
    np.testing.assert_array_equal(evaluator.model.backbone.state_dict()["conv1.weight"],
                                  arrays["model.backbone.conv1.weight"])
    with pytest.raises(ckpt.CheckpointError, match="written by 4 workers, resumed by 1"):
        trainer(tiny, tmp_path / "resume", method="deepcluster-v2").load(path)


def test_the_cli_refuses_other_workers_for_local_state_before_touching_the_run(finished_runs, tmp_path, capsys):
    """Refused before the data are loaded, the model built or eval.json removed; on 3 of 2
    workers a queue run said "--queue-length 128 is not a multiple", which it was not given."""
    from swav_ref.cli import main

    copy_of(finished_runs, "queue", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    files = [meta["local_files"][0], meta["local_files"][0].replace("rank0", "rank1")]
    meta.update(world_size=2, local_ranks=[0, 1], local_files=files)
    ckpt.save_checkpoint(path, arrays, meta)
    (tmp_path / "run" / "eval.json").write_text("{}")  # the scores of that run
    assert main(["train", "--resume", str(path)]) == 2
    assert "written by 2 workers, resumed by 1; the per-worker queues" in capsys.readouterr().err
    assert (tmp_path / "run" / "eval.json").exists()


def test_a_save_removes_the_files_of_workers_an_earlier_run_had_and_this_one_lacks(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    absent = [out / "checkpoint.rank2.step28.local.npz", out / "checkpoint.rank1.local.npz"]
    for f in absent:
        f.write_bytes(b"an earlier 3-worker run's memory bank")
    unrelated = out / "other.rank2.step28.local.npz"
    unrelated.write_bytes(b"not this checkpoint's")
    trainer(tiny, out, epochs=1, method="deepcluster-v2").fit()
    assert not any(f.exists() for f in absent)
    assert unrelated.exists()
    assert [f.name for f in out.glob("checkpoint.*local.npz")] == ["checkpoint.rank0.step5.local.npz"]


def test_a_checkpoint_of_settings_that_no_longer_train_evaluates_and_says_how_to_resume(
        tiny, finished_runs, tmp_path, capsys):
    """Epsilon 0.002 trained without a NaN before MIN_EPSILON: its weights still load, and a
    resume names the way on instead of blaming the user for a value never typed."""
    from swav_ref.cli import main
    from swav_ref.train import ConfigError

    copy_of(finished_runs, "one_epoch", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    meta["config"]["epsilon"] = 0.002
    ckpt.save_checkpoint(path, arrays, meta)
    saved = Trainer(TrainConfig.from_dict(meta["config"]), train_set=tiny[0], test_set=tiny[1])
    saved.load(path, weights_only=True)  # (the constructor refused it for a while)
    with pytest.raises(ConfigError, match="--epsilon 0.002: must be at least 0.003"):
        saved.fit()
    assert main(["train", "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert (f"was trained with it, by an earlier version that accepted it; give --epsilon with a value that "
            f"trains, to resume it under that value, or evaluate it: swav-ref eval {path}") in err


def test_a_queue_setting_that_differs_from_the_checkpoints_is_refused(tiny, finished_runs, tmp_path):
    copy_of(finished_runs, "queue", tmp_path)
    other = trainer(tiny, tmp_path / "other", queue_length=0)
    with pytest.raises(ckpt.CheckpointError, match="trained with --queue-length 64; this run has --queue-length 0"):
        other.load(tmp_path / "run" / "checkpoint.npz")


def test_resuming_with_other_steps_per_epoch_continues_at_the_next_epoch(tiny, finished_runs, tmp_path):
    """As on another number of workers: 2 epochs of 2 steps (step 4) become 2 epochs of
    this run's 5 steps (step 10), with a warning; mid-epoch it is refused."""
    copy_of(finished_runs, "one_epoch", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    meta.update(step=4, steps_per_epoch=2, world_size=2)
    ckpt.save_checkpoint(path, arrays, meta)
    resumed = trainer(tiny, tmp_path / "resumed", epochs=3)
    with pytest.warns(UserWarning, match="2 epochs of 2 steps .2 workers. continue with 5 steps per epoch.*"
                                         "the prototype freeze, 3 steps there, is 8 here"):
        resumed.load(path)
    assert resumed.step == 10
    assert resumed.config.freeze_prototypes_niters == 8  # 1.5 epochs of 2 steps: 7.5 of 5, rounded up
    meta.update(step=3)
    ckpt.save_checkpoint(path, arrays, meta)
    with pytest.raises(ckpt.CheckpointError, match="in the middle of an epoch"):
        trainer(tiny, tmp_path / "again", epochs=3).load(path)


def test_resuming_on_other_data_is_refused_not_blamed_on_the_workers(tiny, finished_runs, tmp_path):
    """Another number of images used to resume with a warning about "1 workers"; another
    image shape too; the same count and shape of other images warns."""
    from swav_ref.data.datasets import ImageDataset
    from swav_ref.train import ConfigError

    train, test = tiny
    copy_of(finished_runs, "one_epoch", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    fewer = train.subset(np.arange(128), name="fewer")
    larger = ImageDataset(np.repeat(np.repeat(train.images, 2, axis=2), 2, axis=3), train.labels, train.class_names,
                          "larger")
    for data, now in ((fewer, r"has 128 of shape \(1, 8, 8\)"), (larger, r"has 160 of shape \(1, 16, 16\)")):
        resumed = Trainer(small_config(tmp_path / "resumed", epochs=2), train_set=data)
        with pytest.raises(ConfigError, match=r"trained on 160 images of shape \(1, 8, 8\) \(digits/train\), "
                                              rf"but this run's training set \({data.name}\) {now}"):
            resumed.fit(resume=path)
    shuffled = train.subset(np.arange(160)[::-1], name="reversed")
    resumed = Trainer(small_config(tmp_path / "resumed", epochs=2), train_set=shuffled)
    with pytest.warns(UserWarning, match=r"training images \(or their order or labels\) differ from those the "
                                         r"checkpoint was trained on \(digits/train\)"):
        resumed.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same data, copied: no warning
        trainer(tiny, tmp_path / "same", epochs=1).load(path)


def test_resuming_under_another_recipe_lists_every_difference(tiny, finished_runs, tmp_path):
    """A resume with another seed, rate, temperature, optimiser or dtype used to continue
    silently; what a resume is for (another folder, logging) warns of nothing, and more
    epochs only of the learning-rate schedule they change, with the jump in the rate."""
    copy_of(finished_runs, "one_epoch", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    other = trainer(tiny, tmp_path / "other", epochs=2, seed=3, base_lr=0.1, temperature=0.5, optimizer="sgd",
                    dtype="float64")
    with pytest.warns(UserWarning, match="settings differ from the checkpoint's") as record:
        other.load(path)
    [message] = [str(w.message) for w in record if "settings differ" in str(w.message)]  # one warning for all
    for change in ("--seed 0 -> 3", "--base-lr 0.5 -> 0.1", "--temperature 0.2 -> 0.5", "--optimizer lars -> sgd",
                   "--dtype float32 -> float64"):
        assert change in message, message
    assert "--epochs" not in message and "--out-dir" not in message
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tiny, tmp_path / "longer", epochs=4, stop_after=1, log_every=2, checkpoint_every=2,
                progress=False).fit(resume=path)
    [message] = [str(w.message) for w in record]
    saved, longer = small_config(tmp_path, epochs=1), small_config(tmp_path, epochs=4)
    was, now = scheduled_rate(saved, 5, 4), scheduled_rate(longer, 5, 5)  # the checkpoint is at step 5 of 5
    assert "--epochs 1 -> 4 changes the learning-rate schedule" in message
    assert f"at step 5 the rate is {now:.4g}, where the checkpoint's run was at {was:.4g}" in message
    assert now > 5 * was  # the point of the warning: the rate jumps back up


def test_stop_after_always_checkpoints_its_last_epoch(tiny, tmp_path):
    run = trainer(tiny, tmp_path / "run", epochs=4, stop_after=1, checkpoint_every=3)
    run.fit()
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.npz")[1]["step"] == 5


# -- 2. file modes ------------------------------------------------------------------------
@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_mode_not_owner_only(tmp_path, umask):
    old = os.umask(umask)
    try:
        written = [
            ckpt.save_checkpoint(tmp_path / "c.npz", {"w": np.ones(3)}, {"step": 1}),
            save_results_json(tmp_path / "results.json", [{"method": "swav", "knn": 0.5}]),
        ]
        plain = tmp_path / "plain.txt"
        with open(plain, "w"):
            pass
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert plain.stat().st_mode & 0o777 == expected
    for path in written:
        assert path.stat().st_mode & 0o777 == expected, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "plain.txt", "results.json"]  # no temp left


# -- 3. no leaked file handle -------------------------------------------------------------
def test_truncated_checkpoint_closes_its_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c.npz", {"w": np.arange(1000.0)}, {"step": 1})
    data = path.read_bytes()
    for size in (10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:size])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ckpt.load_checkpoint(path)
            except ckpt.CheckpointError as exc:
                assert "truncated or corrupt" in str(exc)
            else:
                pytest.fail(f"{size} bytes of {len(data)} loaded")
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], size


# -- 4. metrics.jsonl holds one run -------------------------------------------------------
def test_fresh_run_in_a_reused_out_dir_starts_a_new_metrics_file(tiny, tmp_path):
    """It also says so first: the earlier run, its checkpoint included, is replaced."""
    trainer(tiny, tmp_path, epochs=1).fit()
    second = trainer(tiny, tmp_path, epochs=1)
    with pytest.warns(UserWarning, match="holds a checkpoint of an earlier run") as record:
        second.fit()
    assert len([w for w in record if "earlier run" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        second.fit()  # its own checkpoint now: no warning about the folder (only "nothing to train")
    assert not [w for w in again if "earlier run" in str(w.message)]
    records = file_records(tmp_path)
    assert records == second.log.records
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]


def test_resume_after_a_crash_past_the_checkpoint_logs_each_step_once(tiny, tmp_path):
    """The checkpoint is at epoch 2 of 4; epoch 3 was logged, then the job died. The records
    after the checkpoint are dropped and logged again by the resumed run, once."""
    full = trainer(tiny, tmp_path / "full", epochs=4, checkpoint_every=2)
    full.fit()
    first = trainer(tiny, tmp_path / "run", epochs=4, checkpoint_every=2)
    real_end = first._end_epoch

    def end_then_crash(epoch, *args):
        real_end(epoch, *args)
        if epoch == 2:  # after epoch 3's records, no checkpoint since epoch 2
            raise KeyboardInterrupt

    first._end_epoch = end_then_crash
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = trainer(tiny, tmp_path / "run", epochs=4, checkpoint_every=2)
    resumed.fit(resume=tmp_path / "run" / "checkpoint.npz")

    def key(r):
        return r["kind"], r["epoch"], r["step"], r["loss"]

    assert [key(r) for r in file_records(tmp_path / "run")] == [key(r) for r in file_records(tmp_path / "full")]


# -- 5. nothing left to train -------------------------------------------------------------
def test_resume_with_nothing_left_to_train_says_so(tiny, tmp_path):
    trainer(tiny, tmp_path / "run", epochs=2).fit()
    done = trainer(tiny, tmp_path / "again", epochs=1)
    with pytest.warns(UserWarning, match="nothing to train.*already trained 2 epochs.*--epochs is 1"):
        done.fit(resume=tmp_path / "run" / "checkpoint.npz")
    assert done.step == 10


# -- 6. what a resume carries besides the arrays --------------------------------------------
def test_collapse_is_seen_across_jobs_shorter_than_the_monitors_window(tiny, tmp_path):
    """The monitor's window restarted empty at every resume, so a run split into jobs
    shorter than the window never warned of a collapse the same run in one job warned of."""
    from swav_ref.swav import CollapseMonitor, CollapseWarning

    collapsing = dict(temperature=1000.0, epochs=4)  # the predictions are uniform: the loss sits at ln K

    def with_window(run):
        run.monitor = CollapseMonitor(10, window=8)  # 8 steps; each job below is 5
        return run

    with pytest.warns(CollapseWarning):
        with_window(trainer(tiny, tmp_path / "one_job", **collapsing)).fit()
    path = tmp_path / "jobs" / "checkpoint.npz"
    with_window(trainer(tiny, tmp_path / "jobs", stop_after=1, **collapsing)).fit()
    with pytest.warns(CollapseWarning):
        with_window(trainer(tiny, tmp_path / "jobs", stop_after=1, **collapsing)).fit(resume=path)


@pytest.mark.parametrize("log_every", [1, 4])
def test_an_epoch_resumed_in_its_middle_logs_every_step_and_the_whole_epochs_mean_loss(tiny, tmp_path, log_every):
    """Saved from Python at step 2 of 5: the epoch's record averaged only the 3 steps after
    the resume; and with log_every 4 the 2 steps not yet logged were lost for good (the
    checkpoint's log did not hold them), and the epoch's mean (summed on the device in
    float32 uninterrupted, on the host resumed) differed in the 7th digit."""
    full = trainer(tiny, tmp_path / "full", epochs=1, log_every=log_every)
    full.fit()
    first = trainer(tiny, tmp_path / "run", epochs=1, log_every=log_every)
    real_step = first.train_step

    def save_at_step_2_then_stop(crops, indices):
        if first.step == 2:
            first.save(tmp_path / "run" / "checkpoint.npz")
            raise KeyboardInterrupt
        return real_step(crops, indices)

    first.train_step = save_at_step_2_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = trainer(tiny, tmp_path / "run", epochs=1, log_every=log_every)
    resumed.fit(resume=tmp_path / "run" / "checkpoint.npz")

    def without_time(records):  # seconds and images: what each run did of the epoch
        return [{k: v for k, v in r.items() if k not in ("seconds", "images")} for r in records]

    assert full.steps_per_epoch == 5 and len(resumed.log.steps()) == 5
    batch = full.config.batch_size  # the resumed run took the epoch's last 3 steps, the full run all 5
    assert [r["images"] for r in resumed.log.epochs()] == [3 * batch]
    assert [r["images"] for r in full.log.epochs()] == [5 * batch]
    assert without_time(resumed.log.records) == without_time(full.log.records)  # bit for bit, the epoch's mean too
    assert without_time(file_records(tmp_path / "run")) == without_time(file_records(tmp_path / "full"))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[:-1], r"targets.0 is int\w+ of shape \(159,\), not one integer per training image \(160\)"),
    (lambda t: t.astype(np.float64), "targets.0 is float64"),
    (lambda t: np.full_like(t, 10), r"targets.0 holds values outside 0..9"),
])
def test_deepcluster_targets_that_would_index_past_the_scores_are_refused(tiny, finished_runs, tmp_path, damage,
                                                                          message):
    copy_of(finished_runs, "deepcluster", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, {**arrays, "targets.0": damage(arrays["targets.0"])}, meta)
    with pytest.raises(ckpt.CheckpointError, match=message):
        trainer(tiny, tmp_path / "resumed", epochs=3, **LOCAL_STATE["deepcluster"]).load(path)


def test_nan_weights_are_a_checkpoint_error_naming_the_file(tiny, finished_runs, tmp_path):
    copy_of(finished_runs, "one_epoch", tmp_path)
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    weight = arrays["model.backbone.conv1.weight"].copy()
    weight[0] = np.nan
    ckpt.save_checkpoint(path, {**arrays, "model.backbone.conv1.weight": weight}, meta)
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: its model.. entries: .*conv1.weight"):
        trainer(tiny, tmp_path / "resumed", epochs=1).load(path, weights_only=True)


def test_more_epochs_of_a_constant_rate_warn_of_nothing(tiny, tmp_path):
    """The schedule warning is about the rate: a run at a constant rate follows the same
    schedule whatever --epochs says (it used to warn "the rate is 0.5, where ... was at 0.5")."""
    constant = dict(warmup_epochs=0, final_lr=0.5)  # small_config's base_lr is 0.5
    trainer(tiny, tmp_path / "run", epochs=1, **constant).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(tiny, tmp_path / "more", epochs=2, **constant).load(tmp_path / "run" / "checkpoint.npz")


# -- the metrics log a checkpoint carries ----------------------------------------------------
def _records(n_steps: int, steps_per_epoch: int, codes: bool = True) -> list[dict]:
    """A log as training writes it: a record per step, an epoch record after each epoch."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(n_steps):
        epoch = step // steps_per_epoch
        record = {"kind": "step", "step": step, "epoch": epoch, "loss": float(rng.random() * 5), "lr": 0.1 * step}
        if codes:
            record.update(prototypes_used=int(rng.integers(1, 10)), code_entropy=float(rng.random()),
                          code_row_entropy=float(rng.random()))
        records.append(record)
        if (step + 1) % steps_per_epoch == 0:
            records.append({"kind": "epoch", "epoch": epoch, "step": step + 1, "loss": 1.5, "seconds": 0.25})
    return records


@pytest.mark.parametrize("n_steps, codes", [(0, True), (7, True), (10, True), (13, False)])
def test_the_log_as_columns_gives_back_the_same_records_in_their_order(n_steps, codes):
    """Ends of epochs, the middle of one (no epoch record yet), supervised steps (no codes)."""
    from swav_ref.resume import log_as_arrays, log_from_arrays

    records = _records(n_steps, 5, codes)
    arrays, others = log_as_arrays(records)
    assert all(len(a) == n_steps for a in arrays.values()) and all(r["kind"] == "epoch" for r in others)
    assert log_from_arrays(arrays, others) == records


def test_the_log_keeps_its_order_when_a_resume_on_other_workers_numbers_steps_anew():
    """Resumed on 2 workers after 2 epochs of 4 steps on 1, epoch 3 starts at step 4 (its
    new steps per epoch, 2, times 2): ordered by step, the epoch records of epochs 1 and 2
    went after the later epochs' steps."""
    from swav_ref.resume import log_as_arrays, log_from_arrays

    records = _records(8, 4)
    for step in (4, 5):  # epoch 2 (the third), 2 steps per epoch
        records.append({"kind": "step", "step": step, "epoch": 2, "loss": 1.0, "lr": 0.5})
    records.append({"kind": "epoch", "epoch": 2, "step": 6, "loss": 1.0, "seconds": 0.25})
    records.append({"kind": "step", "step": 6, "epoch": 3, "loss": 1.0, "lr": 0.5})  # mid-epoch
    assert log_from_arrays(*log_as_arrays(records)) == records


def test_a_fit_resumed_after_an_interruption_logs_each_step_once(tiny, tmp_path):
    """The steps an interrupted fit had not yet logged stayed pending on the Trainer: fit
    (resume=...) logged them beside the steps taken again, and the epoch's mean counted both."""
    full = trainer(tiny, tmp_path / "full", epochs=1, log_every=4)
    full.fit()
    run = trainer(tiny, tmp_path / "run", epochs=1, log_every=4, checkpoint_every=1)
    path = tmp_path / "run" / "checkpoint.npz"
    run.save(path)  # step 0
    real_step = run.train_step

    def stop_at_step_3(crops, indices):
        if run.step == 3:
            raise KeyboardInterrupt
        return real_step(crops, indices)

    run.train_step = stop_at_step_3
    with pytest.raises(KeyboardInterrupt):
        run.fit(resume=path)
    run.train_step = real_step
    run.fit(resume=path)
    steps = [r["step"] for r in run.log.steps()]
    assert steps == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in run.log.epochs()] == [r["loss"] for r in full.log.epochs()]


def test_a_long_runs_log_is_kept_without_filling_the_metadata(tiny, tmp_path):
    """350,000 step records as JSON were 69 MB of metadata: past MAX_METADATA_BYTES, the save
    at the end of the next epoch failed, and the run with it."""
    run = trainer(tiny, tmp_path / "run", epochs=1)
    run.log.records = _records(350_000, 781)  # CIFAR-10 at batch 64: 448 epochs
    path = tmp_path / "run" / "checkpoint.npz"
    run.save(path)
    arrays, meta = ckpt.load_checkpoint(path)
    assert len(json.dumps(meta)) < 1_000_000 and arrays["log.loss"].shape == (350_000,)
    resumed = trainer(tiny, tmp_path / "run", epochs=1)
    resumed.load(path)
    assert resumed.log.records == run.log.records


def test_a_checkpoint_with_its_log_in_the_metadata_still_resumes(tiny, tmp_path):
    """Checkpoints written before the log's columns kept every record in the metadata."""
    run = trainer(tiny, tmp_path / "run", epochs=1)
    run.fit()
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, {k: v for k, v in arrays.items() if not k.startswith("log.")},
                         {**meta, "log": run.log.records})
    resumed = trainer(tiny, tmp_path / "run", epochs=1)
    resumed.load(path)
    assert resumed.log.records == run.log.records and len(resumed.log.steps()) == 5


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.pop("log.lr"), r"its metrics log is incomplete \(log.lr missing\)"),
    (lambda a: a.update({"log.loss": a["log.loss"][:-1]}), r"its log.loss is float64 of shape \(4,\), not float64 "
                                                           r"of one value per logged step \(5\)"),
    (lambda a: a.update({"log.step": a["log.step"].astype(np.float64)}), "its log.step is float64"),
    (lambda a: a["log.loss"].__setitem__(2, np.nan), "its log.loss holds a loss that is not finite"),
])
def test_a_damaged_log_is_refused_with_its_column_named(tiny, tmp_path, damage, message):
    run = trainer(tiny, tmp_path / "run", epochs=1)
    run.fit()
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    damage(arrays)
    ckpt.save_checkpoint(path, arrays, meta)
    with pytest.raises(ckpt.CheckpointError, match=message):
        trainer(tiny, tmp_path / "run", epochs=1).load(path)
