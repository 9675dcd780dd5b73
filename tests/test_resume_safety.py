"""Resuming never goes quietly wrong: missing per-worker files, file modes, leaked file
handles, a reused output folder's metrics, and a resume with nothing left to train."""

from __future__ import annotations

import gc
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from small_runs import small_config
from swav_ref import checkpoint as ckpt
from swav_ref.evaluate import save_results_json
from swav_ref.train import Trainer

pytestmark = pytest.mark.slow


def trainer(tiny, out_dir, **changes) -> Trainer:
    train, test = tiny
    return Trainer(small_config(out_dir, **changes), train_set=train, test_set=test)


def file_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# -- 1. the per-worker queue / memory bank file ------------------------------------------
LOCAL_STATE = {"queue": dict(queue_length=64, epoch_queue_starts=1), "deepcluster": dict(method="deepcluster-v2")}


@pytest.mark.parametrize("kind", LOCAL_STATE)
def test_resume_without_the_local_file_is_refused(tiny, tmp_path, kind):
    extra = LOCAL_STATE[kind]
    trainer(tiny, tmp_path / "run", **extra).fit()
    assert (tmp_path / "run" / "checkpoint.rank0.local.npz").is_file()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoint.npz", copy)
    resumed = trainer(tiny, tmp_path / "resumed", epochs=3, **extra)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.rank0\.local\.npz is missing.*copy"):
        resumed.fit(resume=copy / "checkpoint.npz")
    shutil.copy(tmp_path / "run" / "checkpoint.rank0.local.npz", copy)  # both files: resumes
    trainer(tiny, tmp_path / "resumed", epochs=3, **extra).fit(resume=copy / "checkpoint.npz")


def test_old_checkpoint_without_the_local_list_still_loads(tiny, tmp_path):
    """Written before ``local_ranks`` existed: nothing to check, the file is used if present."""
    trainer(tiny, tmp_path / "run", epochs=1).fit()
    path = tmp_path / "run" / "checkpoint.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    assert meta.pop("local_ranks") == []  # no queue, no bank
    ckpt.save_checkpoint(path, arrays, meta)
    again = trainer(tiny, tmp_path / "again", epochs=1)
    again.load(path)
    assert again.step == 5 and again.queue is None


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
    trainer(tiny, tmp_path, epochs=1).fit()
    second = trainer(tiny, tmp_path, epochs=1)
    second.fit()
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
