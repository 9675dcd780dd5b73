"""load_encoder: a checkpoint's backbone and input normalisation, without its data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from small_runs import small_config
from swav_ref import checkpoint as ckpt
from swav_ref.data.datasets import ImageDataset
from swav_ref.encoder import load_encoder
from swav_ref.train import Trainer


@pytest.fixture(scope="module")
def dark_run(tmp_path_factory):
    """One epoch on dark images given as an array: their normalisation is not the digits'."""
    out = tmp_path_factory.mktemp("dark")
    rng = np.random.default_rng(0)
    images = (rng.random((160, 1, 8, 8)) * 90).astype(np.uint8)
    trainer = Trainer(small_config(out, epochs=1), train_set=ImageDataset(images, name="dark images"))
    trainer.fit()
    return trainer, images, out / "checkpoint.npz"


def test_the_encoder_gives_the_trainers_features_without_the_data(dark_run):
    trainer, images, path = dark_run
    encoder = load_encoder(path)
    assert encoder.mean == trainer.mean and encoder.std == trainer.std
    assert encoder.mean[0] < 0.2  # dark images: not the digits' statistics
    np.testing.assert_array_equal(encoder.features(images), trainer.features(images))
    assert encoder.backbone.training is False


def test_a_trainer_on_other_data_takes_the_checkpoints_normalisation(dark_run, tiny, tmp_path):
    """Reloaded by a trainer built on the digits (as `swav-ref eval` does), the features
    are still the trained model's: the normalisation comes from the checkpoint."""
    trainer, images, path = dark_run
    other = Trainer(small_config(tmp_path, epochs=1), train_set=tiny[0], test_set=tiny[1])
    assert other.mean != trainer.mean
    other.load(path, weights_only=True)
    np.testing.assert_array_equal(other.features(images), trainer.features(images))


def test_the_encoder_refuses_images_of_another_channel_count(dark_run):
    _, images, path = dark_run
    with pytest.raises(ValueError, match=r"takes \(N, 1, H, W\) uint8 images.*got shape \(4, 3, 8, 8\)"):
        load_encoder(path).features(np.zeros((4, 3, 8, 8), dtype=np.uint8))


def test_an_old_checkpoint_without_its_normalisation_is_explained(dark_run, tmp_path):
    _, _, path = dark_run
    arrays, meta = ckpt.load_checkpoint(path)
    del meta["normalisation"]
    ckpt.save_checkpoint(tmp_path / "old.npz", arrays, meta)
    with pytest.raises(ckpt.CheckpointError, match="written before checkpoints kept their input normalisation"):
        load_encoder(tmp_path / "old.npz")
    # given its training data, it computes the normalisation as the trainer did
    trainer, images, _ = dark_run
    old = load_encoder(tmp_path / "old.npz", train_set=ImageDataset(images, name="dark images"))
    assert (old.mean, old.std) == (trainer.mean, trainer.std)
    np.testing.assert_array_equal(old.features(images[:8]), trainer.features(images[:8]))


@pytest.mark.parametrize("side", [1, 16])
def test_images_of_another_size_than_the_training_images_warn(dark_run, side):
    """The network pools globally, so 1x1 or 16x16 images give features from an 8x8 model
    without an error; as `swav-ref eval` does for other data, the encoder says so."""
    _, images, path = dark_run
    encoder = load_encoder(path)
    assert encoder.image_shape == (8, 8)
    with pytest.warns(UserWarning, match=rf"trained on 8x8 images, these are {side}x{side}.*resize the images to 8x8"):
        encoder.features(np.zeros((4, 1, side, side), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training images' size: no warning
        encoder.features(images[:4])
