"""The trainer: learning happens, resume is exact, failures are loud and lose nothing."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import required

import small_runs
from swav_ref import checkpoint as ckpt
from swav_ref.swav.diagnostics import CollapseMonitor, CollapseWarning
from swav_ref.train import Trainer, TrainConfig, TrainingDivergedError, crop_groups

pytestmark = pytest.mark.slow


def small_config(tmp_path, **changes) -> TrainConfig:
    """:func:`small_runs.small_config` writing to ``tmp_path / "run"`` (every test here
    names its epochs)."""
    return small_runs.small_config(tmp_path / "run", **changes)


def step_losses(trainer) -> list[float]:
    return [r["loss"] for r in trainer.log.steps()]


def interrupt_after_epoch(trainer, last_epoch: int) -> None:
    """Simulate Ctrl-C right after epoch ``last_epoch``'s checkpoint is written."""
    real_end = trainer._end_epoch

    def end_then_stop(epoch, *args):
        real_end(epoch, *args)
        if epoch == last_epoch:
            raise KeyboardInterrupt

    trainer._end_epoch = end_then_stop


def test_crop_groups_split_by_size():
    shapes = [(4, 1, 8, 8)] * 2 + [(4, 1, 6, 6)] * 3 + [(4, 1, 8, 8)]
    crops = [np.zeros(s) for s in shapes]
    assert crop_groups(crops) == [(0, 2), (2, 5), (5, 6)]


def test_training_decreases_the_loss(tiny, tmp_path):
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=6), train_set=train, test_set=test)
    trainer.fit()
    losses = step_losses(trainer)
    assert len(losses) == 6 * 5
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    epochs = trainer.log.epochs()
    assert [e["epoch"] for e in epochs] == list(range(6))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == len(trainer.log.records)
    assert all(0 < r["prototypes_used"] <= 10 for r in trainer.log.steps())


def test_training_and_evaluation_let_the_column_buffers_go_when_done(tiny, tmp_path):
    """The convolutions keep their column matrices for the next step (nn.functional.SCRATCH),
    gigabytes for resnet18 on a GPU; fit() and extract_features() let them go at the end, so
    what runs next (evaluation at another batch size) has that memory."""
    from swav_ref.evaluate import extract_features
    from swav_ref.nn import functional as F

    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=test)
    trainer._start_epoch(0)
    indices = trainer.batch_indices(0, 0)
    trainer.train_step(trainer.make_crops(indices), indices)
    assert F.SCRATCH.nbytes() > 0  # a step keeps them, for the next one
    trainer.fit()
    assert F.SCRATCH.nbytes() == 0
    extract_features(trainer.model.backbone, test.images, xp=np, batch_size=16,
                     normalize=(trainer.mean, trainer.std))  # its forwards use them too
    assert F.SCRATCH.nbytes() == 0


def test_prototypes_are_frozen_then_trained(tiny, tmp_path):
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, freeze_prototypes_niters=2, epochs=1), train_set=train, test_set=test)
    trainer.model.head.normalize_prototypes()
    before = np.array(trainer.model.head.prototype_weight(0))
    trainer._start_epoch(0)
    for s in range(2):
        idx = trainer.batch_indices(0, s)
        trainer.train_step(trainer.make_crops(idx), idx)
    # frozen: only the per-step re-normalisation touches them (rounding, ~1 ulp)
    np.testing.assert_allclose(np.array(trainer.model.head.prototype_weight(0)), before, atol=1e-6)
    assert trainer.optimizer.state_dict().get("head.prototypes0.weight") is None  # no momentum either
    idx = trainer.batch_indices(0, 2)
    trainer.train_step(trainer.make_crops(idx), idx)
    assert np.abs(np.array(trainer.model.head.prototype_weight(0)) - before).max() > 1e-4


def record_swav_loss_calls(monkeypatch, trainer) -> list[dict]:
    """Every call of swav_loss by the trainer: its step, scores, queue scores and codes."""
    import swav_ref.train as train_module

    calls, real = [], train_module.swav_loss

    def recording(scores, batch, **kwargs):
        out = real(scores, batch, **kwargs)
        calls.append({"step": trainer.step, "scores": np.array(scores), "codes": [np.array(c) for c in out.codes],
                      "queue_scores": kwargs["queue_scores"], "kwargs": kwargs,
                      "queue": None if trainer.queue is None else np.array(trainer.queue.embeddings),
                      "prototypes": np.array(trainer.model.head.prototype_weight(0))})
        return out

    monkeypatch.setattr(train_module, "swav_loss", recording)
    return calls


def test_the_queue_joins_sinkhorn_once_full_with_the_current_prototypes(tiny, tmp_path, monkeypatch):
    """Batches of 32, a queue of 64 from epoch 1: no queue in epoch 0, an unfilled queue for
    two steps, then the queue's 64 rows of each assignment crop scored against this step's
    prototypes, which change the codes."""
    from swav_ref.swav.codes import sinkhorn_codes

    train, test = tiny
    trainer = Trainer(small_config(tmp_path, queue_length=64, epoch_queue_starts=1, epochs=2),
                      train_set=train, test_set=test)
    calls = record_swav_loss_calls(monkeypatch, trainer)
    trainer.fit()
    assert [c["queue_scores"] is None for c in calls] == [True] * 7 + [False] * 3
    for call in calls[7:]:
        for i, crop in enumerate(trainer.config.crops_for_assign):
            expected = call["queue"][i] @ call["prototypes"].T  # all 64 rows, newest first
            np.testing.assert_allclose(np.array(call["queue_scores"][i]), expected, rtol=1e-5, atol=1e-6)
            batch_scores = call["scores"][crop * 32 : (crop + 1) * 32]
            alone = np.array(sinkhorn_codes(batch_scores, epsilon=trainer.config.epsilon,
                                            n_iters=trainer.config.sinkhorn_iterations))
            assert np.abs(call["codes"][i] - alone).max() > 1e-3  # the queue changed the codes


def test_the_configured_epsilon_and_iterations_make_the_codes(tiny, tmp_path, monkeypatch):
    from swav_ref.swav.codes import sinkhorn_codes

    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epsilon=0.1, sinkhorn_iterations=5, epochs=1),
                      train_set=train, test_set=test)
    calls = record_swav_loss_calls(monkeypatch, trainer)
    trainer._start_epoch(0)
    idx = trainer.batch_indices(0, 0)
    trainer.train_step(trainer.make_crops(idx), idx)
    call = calls[0]
    for i, crop in enumerate(trainer.config.crops_for_assign):
        batch_scores = call["scores"][crop * 32 : (crop + 1) * 32]
        np.testing.assert_allclose(call["codes"][i], sinkhorn_codes(batch_scores, epsilon=0.1, n_iters=5),
                                   rtol=1e-5, atol=1e-7)
        assert np.abs(call["codes"][i] - sinkhorn_codes(batch_scores)).max() > 1e-3  # not the defaults


def test_each_step_starts_from_unit_prototypes(tiny, tmp_path):
    """The trainer re-normalises the prototypes before every SwAV step (as officially), so
    the scores are cosines; frozen prototypes scaled by 3 come out of one step as unit rows."""
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, freeze_prototypes_niters=100, epochs=1), train_set=train, test_set=test)
    weight = trainer.model.head.prototype_weight(0)
    weight[...] = 3 * weight / np.linalg.norm(weight, axis=1, keepdims=True)
    trainer._start_epoch(0)
    idx = trainer.batch_indices(0, 0)
    trainer.train_step(trainer.make_crops(idx), idx)
    np.testing.assert_allclose(np.linalg.norm(trainer.model.head.prototype_weight(0), axis=1), 1.0, rtol=1e-6)


def test_a_checkpoint_is_never_overwritten_by_weights_with_nan(tiny, tmp_path):
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=test)
    path = tmp_path / "run" / "checkpoint.npz"
    trainer.save(path)
    good = path.read_bytes()
    _, module, key = next(trainer.model.backbone.named_parameters())
    module.params[key][0] = np.nan  # one weight of the first layer
    with pytest.raises(TrainingDivergedError, match=f"the last good checkpoint, {path}, is kept.*--final-lr"):
        trainer.save(path)  # (it said "was not written" of a checkpoint that was there, and kept)
    assert path.read_bytes() == good


@pytest.mark.parametrize("method,extra", [
    ("swav", {}),
    ("swav", {"queue_length": 64, "epoch_queue_starts": 1}),
    ("deepcluster-v2", {"n_prototypes": (10, 12)}),
    ("supervised", {}),
])
def test_resume_is_bit_identical(tiny, tmp_path, method, extra):
    train, test = tiny
    full = Trainer(small_config(tmp_path / "a", method=method, epochs=3, **extra), train_set=train, test_set=test)
    full.fit()
    first = Trainer(small_config(tmp_path / "b", method=method, epochs=3, **extra), train_set=train, test_set=test)
    interrupt_after_epoch(first, 1)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = Trainer(small_config(tmp_path / "b", method=method, epochs=3, **extra), train_set=train, test_set=test)
    resumed.fit(resume=tmp_path / "b" / "run" / "checkpoint.npz")
    assert step_losses(resumed) == step_losses(full)  # exact equality, float for float
    for k, v in full.model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(resumed.model.state_dict()[k]), err_msg=k)
    if extra.get("queue_length"):
        assert full.queue.is_full and resumed.queue.is_full
        np.testing.assert_array_equal(full.queue.embeddings, resumed.queue.embeddings)
    if method == "deepcluster-v2":
        np.testing.assert_array_equal(full.bank.embeddings, resumed.bank.embeddings)
        for a, b in zip(full.targets, resumed.targets):
            np.testing.assert_array_equal(a, b)


def test_crash_during_checkpoint_write_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    """The second checkpoint's write dies before its rename: the first one stays loadable."""
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=3), train_set=train, test_set=test)
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        if Path(dst).name != "checkpoint.npz":  # config.json is written atomically too
            return real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated power cut during rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="power cut"):
        trainer.fit()
    monkeypatch.undo()
    path = tmp_path / "run" / "checkpoint.npz"
    again = Trainer(small_config(tmp_path, epochs=3), train_set=train, test_set=test)
    again.load(path)
    assert again.step == 5  # the end of epoch 1, the last complete write
    assert not [p for p in path.parent.iterdir() if p.name.startswith("checkpoint.npz") and p != path]


def poison_the_loss(monkeypatch, trainer, from_step: int) -> None:
    """Make the SwAV loss NaN from the trainer's step ``from_step`` on."""
    import swav_ref.train as train_module

    real = train_module.swav_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return type(out)(out.loss * math.nan, out.grad, out.codes) if trainer.step >= from_step else out

    monkeypatch.setattr(train_module, "swav_loss", poisoned)


def test_nan_loss_stops_training_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch):
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=3), train_set=train, test_set=test)
    poison_the_loss(monkeypatch, trainer, from_step=7)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 7"):
        trainer.fit()
    arrays, meta = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert meta["step"] == 5
    assert all(np.all(np.isfinite(v)) for k, v in arrays.items() if k.startswith("model."))


def test_divergence_before_any_checkpoint_says_so_and_what_to_try(tiny, tmp_path, monkeypatch):
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=2), train_set=train, test_set=test)
    poison_the_loss(monkeypatch, trainer, from_step=2)
    with pytest.raises(TrainingDivergedError, match="no checkpoint had been written yet.*--base-lr"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.parametrize("method", ["swav", "deepcluster-v2"])
def test_a_learning_rate_that_really_diverges_stops_with_advice(tiny, tmp_path, method):
    """Not a poisoned loss: parameters blown up by the rate, then NaN scores reaching
    Sinkhorn (which must leave them to the trainer's check, not raise its own error)."""
    train, test = tiny
    config = small_config(tmp_path, method=method, optimizer="sgd", base_lr=1e30, warmup_epochs=0, epochs=3)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDivergedError, match="--base-lr"):
            Trainer(config, train_set=train, test_set=test).fit()


def test_a_run_shorter_than_the_warm_up_still_decays_its_rate(tiny, tmp_path):
    """--epochs 1 with --warmup-epochs 2: at most half a run warms up, so it does not end
    at the peak rate."""
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=1, warmup_epochs=2), train_set=train, test_set=test)
    rates = [trainer.learning_rate(s) for s in range(trainer.total_steps)]
    assert rates[0] == pytest.approx(trainer.config.base_lr) and rates[-1] < 0.5 * trainer.config.base_lr
    longer = Trainer(small_config(tmp_path, epochs=4, warmup_epochs=2), train_set=train, test_set=test)
    assert longer.learning_rate(2 * longer.steps_per_epoch - 1) == pytest.approx(longer.config.base_lr)


def test_collapse_warning(tiny, tmp_path):
    """A huge temperature makes every prediction uniform: the loss sits at ln K."""
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, temperature=1e4, epochs=2), train_set=train, test_set=test)
    trainer.monitor = CollapseMonitor(10, window=5, tolerance=0.01)
    with pytest.warns(CollapseWarning, match="ln K"):
        trainer.fit()


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    train, test = tiny
    Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=test).fit()
    other = Trainer(small_config(tmp_path / "other", epochs=1, n_prototypes=(12,), feat_dim=8), train_set=train,
                    test_set=test)
    # every mismatch in one message, as options (it used to name one per attempt, by field name)
    with pytest.raises(ckpt.CheckpointError, match="trained with --n-prototypes 10, --feat-dim 16; this run has "
                                                   "--n-prototypes 12, --feat-dim 8"):
        other.load(tmp_path / "run" / "checkpoint.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError):
        other.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("method", ["swav", "deepcluster-v2"])
def test_methods_run_under_array_api_strict(tiny, tmp_path, method):
    required.module("array_api_strict")
    train, test = tiny
    cfg = small_config(tmp_path / "strict", method=method, backend="array_api_strict", epochs=2, dtype="float64")
    trainer = Trainer(cfg, train_set=train, test_set=test)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit()
    reference = Trainer(small_config(tmp_path / "numpy", method=method, epochs=2, dtype="float64"),
                        train_set=train, test_set=test)
    reference.fit()
    # the same computation through the standard alone: the same losses, to rounding
    np.testing.assert_allclose(step_losses(trainer), step_losses(reference), rtol=1e-12)


def test_prototype_assignments_pick_the_prototype_of_largest_cosine(tiny, tmp_path):
    """After a training step the prototypes are off the unit sphere (they are re-normalised
    at the start of the next step); the assignment is still by cosine, and the model is left
    untouched."""
    from swav_ref.experiment import prototype_assignments

    train, test = tiny
    trainer = Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=test)
    trainer.model.eval()
    embeddings = trainer.model.head.forward(np.asarray(trainer.features(test.images)))[0]  # unit rows
    weight = trainer.model.head.prototype_weight(0)
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    by_cosine = np.argmax(embeddings @ unit.T, axis=1)
    weight[...] = unit
    weight[np.unique(by_cosine)] *= 0.01  # the nearest prototypes made short: raw scores would pick others
    before = weight.copy()
    got = prototype_assignments(trainer, test.images)
    np.testing.assert_array_equal(got, by_cosine)
    assert np.mean(np.argmax(embeddings @ before.T, axis=1) != by_cosine) > 0.5
    np.testing.assert_array_equal(trainer.model.head.prototype_weight(0), before)


def test_a_constant_channel_is_centred_not_scaled(tmp_path):
    """A channel that never changes (std 0) used to fail the crops' config with a traceback;
    it is now centred only (std 1), with a warning naming it, and training runs."""
    from swav_ref.data.datasets import ImageDataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 3, 8, 8), dtype=np.uint8)
    images[:, 1] = 7  # e.g. a red-only stain saved as RGB
    data = ImageDataset(images, rng.integers(0, 2, size=40), ("a", "b"), "stained")
    with pytest.warns(UserWarning, match="stained: channel 1 is the same in every training image"):
        trainer = Trainer(small_config(tmp_path, epochs=1, batch_size=8, n_prototypes=(4,), dataset="folder",
                                       data_dir=str(tmp_path)),
                          train_set=data, test_set=data)
    assert trainer.std[1] == 1.0 and trainer.std[0] > 0 and trainer.mean[1] == pytest.approx(7 / 255)
    trainer.fit()
    assert np.isfinite(trainer.log.steps()[-1]["loss"])


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_deepcluster_clusters_with_the_chosen_initialisation(tiny, tmp_path, monkeypatch, init):
    from swav_ref import train

    seen = []
    real = train.cluster_memory

    def recording(*args, **kwargs):
        seen.append(kwargs["init"])
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "cluster_memory", recording)
    trainer = Trainer(small_config(tmp_path, method="deepcluster-v2", kmeans_init=init, epochs=1),
                      train_set=tiny[0], test_set=tiny[1])
    trainer.fit()
    assert seen == [init]


def test_divergence_in_a_reused_out_dir_does_not_call_the_earlier_runs_checkpoint_kept(tiny, tmp_path, monkeypatch):
    """A fresh run into a folder that holds an earlier run's checkpoint warns at its start;
    diverging before its own first save, it says the checkpoint there is the earlier run's,
    not "the last good checkpoint ... is kept" (which invited a resume of the wrong run)."""
    train, test = tiny
    Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=test).fit()
    earlier = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    second = Trainer(small_config(tmp_path, epochs=2, seed=1), train_set=train, test_set=test)
    poison_the_loss(monkeypatch, second, from_step=2)
    with pytest.warns(UserWarning, match=r"holds a checkpoint of an earlier run.*replaces it at its first save.*"
                                         r"--resume .*checkpoint\.npz.*another --out-dir"):
        with pytest.raises(TrainingDivergedError, match="this run wrote no checkpoint; the .*checkpoint.npz there "
                                                        "belongs to an earlier run") as info:
            second.fit()
    assert "is kept" not in str(info.value)
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == earlier


def test_a_resumed_run_names_the_checkpoint_it_resumed_from_as_kept(tiny, tmp_path, monkeypatch):
    """Diverging before its first save, a resumed run's last good state is the checkpoint it
    resumed from (it said "no checkpoint had been written yet" when that lay in another
    folder); resumed in its own folder, it warns of nothing (the folder is its own)."""
    train, test = tiny
    Trainer(small_config(tmp_path, epochs=3, stop_after=1), train_set=train, test_set=test).fit()
    path = tmp_path / "run" / "checkpoint.npz"
    for out in (tmp_path / "elsewhere", tmp_path / "run"):
        resumed = Trainer(small_runs.small_config(out, epochs=3), train_set=train, test_set=test)
        poison_the_loss(monkeypatch, resumed, from_step=6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning at all: same settings, no earlier run in the folder
            with pytest.raises(TrainingDivergedError, match=f"the last good checkpoint, {path}, is kept"):
                resumed.fit(resume=path)


@pytest.mark.parametrize("shape, message", [
    ((40, 1, 16, 16), r"test_set 'other': images of 1 channel\(s\) of 16x16, but the training set \('digits/train'\) "
                      r"has 1 channel\(s\) of 8x8"),
    ((40, 3, 8, 8), r"test_set 'other': images of 3 channel\(s\) of 8x8"),  # failed only at the evaluation
])
def test_a_test_set_of_other_images_is_refused_at_construction(tiny, tmp_path, shape, message):
    from swav_ref.data.datasets import ImageDataset
    from swav_ref.train import ConfigError

    train, test = tiny
    other = ImageDataset(np.zeros(shape, dtype=np.uint8), test.labels, test.class_names, "other")
    with pytest.raises(ConfigError, match=message):
        Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=other)
    assert not (tmp_path / "run").exists()  # before anything is written


@pytest.mark.parametrize("channels, labels, method, message", [
    (2, None, "swav", "has 2 channels per image; training takes 1 .grey. or 3 .RGB."),  # NaN crops, then "lower --base-lr"
    (4, None, "swav", "has 4 channels per image"),  # trained as RGB plus an ignored fourth
    (1, "one class", "supervised", "--method supervised needs at least 2 classes"),  # a loss of 0 at every step
])
def test_data_that_cannot_train_is_refused_at_construction(tmp_path, channels, labels, method, message):
    from swav_ref.data.datasets import ImageDataset
    from swav_ref.train import ConfigError

    images = np.random.default_rng(0).integers(0, 256, (40, channels, 8, 8), dtype=np.uint8)
    data = ImageDataset(images, None if labels is None else np.zeros(40, dtype=np.int64), name="mine")
    config = small_config(tmp_path, dataset="arrays", method=method, batch_size=8, epochs=1)
    with pytest.raises(ConfigError, match=message):
        Trainer(config, train_set=data)
    assert not (tmp_path / "run").exists()  # before anything is written


def test_arrays_for_a_data_set_are_refused_naming_the_argument(tiny, tmp_path):
    train, test = tiny
    with pytest.raises(TypeError, match=r"Trainer\(test_set=...\): must be an ImageDataset, got ndarray"):
        Trainer(small_config(tmp_path, epochs=1), train_set=train, test_set=test.images)
    with pytest.raises(TypeError, match=r"Trainer\(train_set=...\): must be an ImageDataset, got ndarray.*"
                                        r"ImageDataset\(images, labels\)"):
        Trainer(small_config(tmp_path, epochs=1), train_set=train.images)


def test_a_test_set_given_alone_is_the_one_evaluated(tiny, tmp_path):
    """With the training data loaded by name, a test_set handed over is kept (it used to be
    replaced by the loaded split without a word)."""
    trainer = Trainer(small_config(tmp_path, epochs=1), test_set=tiny[1])
    assert trainer.test_set is tiny[1] and len(trainer.train_set) > len(tiny[0])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_random_stream_of_a_run_is_its_own(tiny, tmp_path, seed):
    """Within a run, the initial weights, the data orders, the crops, the memory bank and
    k-means draw from streams that share no bits. (SeedSequence ignores trailing zeros, so a key ending in 0
    can be another key in disguise: the weights' [seed, 0, 0] once was epoch 0's order.)"""
    train, test = tiny
    trainer = Trainer(small_config(tmp_path, seed=seed, epochs=1), train_set=train, test_set=test)
    streams = {
        "init": trainer._init_random().host().bit_generator,
        **{f"order {e}": trainer._order_generator(e).bit_generator for e in (0, 1)},
        **{f"crops {s}": trainer.random(1, s).host().bit_generator for s in (0, 1)},
        "memory bank": trainer.random(3).host().bit_generator,
        **{f"k-means {e}": trainer._cluster_random(e).host().bit_generator for e in (0, 1)},
    }
    first_draws = {name: tuple(bits.random_raw(4).tolist()) for name, bits in streams.items()}
    shared = [(a, b) for a in first_draws for b in first_draws if a < b and first_draws[a] == first_draws[b]]
    assert not shared, f"streams that draw the same numbers: {shared}"
