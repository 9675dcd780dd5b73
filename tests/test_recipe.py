"""The data set's recipe: crop settings and prototype freeze left as None in TrainConfig are
filled in for the images at hand, so CIFAR-10 or a folder never trains with the crops of
8x8 digits (which it did while the digits values were TrainConfig's defaults)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from swav_ref import checkpoint as ckpt
from swav_ref.data.datasets import ImageDataset
from swav_ref.train import ConfigError, Trainer, TrainConfig

OFFICIAL_SCALES = {"min_scale": (0.14, 0.05), "max_scale": (1.0, 0.14)}


def crops_of(config: TrainConfig) -> dict:
    return {name: getattr(config, name) for name in ("n_crops", "crop_sizes", "min_scale", "max_scale")}


def test_each_data_set_gets_its_own_crops():
    assert crops_of(TrainConfig().with_crop_recipe()) == {
        "n_crops": (2, 4), "crop_sizes": (8, 6), "min_scale": (0.5, 0.3), "max_scale": (1.0, 0.6)}
    cifar = TrainConfig(dataset="cifar10", data_dir="unused").with_crop_recipe()
    assert crops_of(cifar) == {"n_crops": (2, 6), "crop_sizes": (32, 16), **OFFICIAL_SCALES}
    folder = TrainConfig(dataset="folder", data_dir="unused", image_size=64).with_crop_recipe()
    assert crops_of(folder) == {"n_crops": (2, 6), "crop_sizes": (64, 27), **OFFICIAL_SCALES}  # 64 * 96 / 224


def test_changing_the_data_set_of_a_config_does_not_keep_the_digits_crops():
    digits = TrainConfig()
    cifar = dataclasses.replace(digits, dataset="cifar10", data_dir="unused").with_crop_recipe()
    assert cifar.min_scale == OFFICIAL_SCALES["min_scale"] and cifar.crop_sizes == (32, 16)


def test_an_option_given_is_kept_and_the_rest_comes_from_the_recipe():
    config = TrainConfig(dataset="cifar10", data_dir="unused", min_scale=(0.2, 0.08)).with_crop_recipe()
    assert config.min_scale == (0.2, 0.08)
    assert (config.n_crops, config.crop_sizes, config.max_scale) == ((2, 6), (32, 16), (1.0, 0.14))
    mine = dict(n_crops=(4,), crop_sizes=(8,), min_scale=(0.3,), max_scale=(1.0,))
    assert crops_of(TrainConfig(**mine).with_crop_recipe()) == mine  # all four: the recipe is not used


@pytest.mark.parametrize("given, message", [
    (dict(crop_sizes=(32,)), "--crop-sizes 32 gives 1 crop size(s), but the digits recipe for digits has 2 "
                             "(--n-crops 2 4, --min-scale 0.5 0.3, --max-scale 1.0 0.6)"),
    (dict(min_scale=(0.7, 0.7)), "--min-scale 0.7 0.7, --max-scale 1.0 0.6: a crop's area fraction needs"),
    (dict(crops_for_assign=(0, 6)), "--crops-for-assign 0 6: needs distinct crop indices in 0..5"),
])
def test_a_recipe_that_no_longer_fits_the_options_given_is_refused(given, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**given).with_crop_recipe()
    assert message in str(info.value)


def test_a_folder_without_an_image_size_needs_the_images_for_its_crops():
    with pytest.raises(ConfigError, match="give --image-size"):
        TrainConfig(dataset="folder", data_dir="unused").with_crop_recipe()


def test_the_trainer_fills_the_recipe_from_the_images_and_saves_it(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(96, 3, 20, 12), dtype=np.uint8)  # the shorter side, 12, sets the crops
    data = ImageDataset(images, rng.integers(0, 2, 96), class_names=("a", "b"), name="my images")
    config = TrainConfig(dataset="folder", data_dir="unused", batch_size=16, epochs=1, hidden_dim=16,
                         feat_dim=8, n_prototypes=(8,), out_dir=str(tmp_path), progress=False)
    trainer = Trainer(config, train_set=data)
    assert crops_of(trainer.config) == {"n_crops": (2, 6), "crop_sizes": (12, 5), **OFFICIAL_SCALES}
    assert trainer.config.freeze_prototypes_niters == trainer.steps_per_epoch == 6  # one epoch
    assert trainer.multicrop.config.sizes == (12, 5)
    trainer.save(tmp_path / "checkpoint.npz")
    saved = TrainConfig.from_dict(ckpt.load_checkpoint(tmp_path / "checkpoint.npz")[1]["config"])
    assert crops_of(saved) == crops_of(trainer.config) and saved.freeze_prototypes_niters == 6


def test_digits_keep_their_two_epochs_of_frozen_prototypes(tiny, tmp_path):
    train, test = tiny
    config = TrainConfig(batch_size=32, n_prototypes=(10,), out_dir=str(tmp_path), progress=False)
    trainer = Trainer(config, train_set=train, test_set=test)
    assert trainer.steps_per_epoch == 5 and trainer.config.freeze_prototypes_niters == 10
    assert trainer.config.n_crops == (2, 4)


def test_images_handed_over_as_arrays_get_the_general_recipe(tmp_path):
    """dataset="arrays": the general (folder) recipe at the arrays' size, flips and blur
    included, without a data folder; without the arrays it is a clear error."""
    rng = np.random.default_rng(1)
    data = ImageDataset(rng.integers(0, 256, size=(64, 3, 16, 16), dtype=np.uint8), rng.integers(0, 3, 64))
    config = TrainConfig(dataset="arrays", batch_size=16, epochs=1, n_prototypes=(8,), out_dir=str(tmp_path),
                         progress=False)
    trainer = Trainer(config, train_set=data)
    assert trainer.config.crop_sizes == (16, 7) and trainer.multicrop.config.flip_p == 0.5
    assert data.class_names == ("0", "1", "2")  # labels without names are numbered
    with pytest.raises(ConfigError, match="dataset 'arrays': hand the images to the trainer"):
        Trainer(config)
    with pytest.raises(ConfigError, match=r"give image_side \(the arrays' shorter side\)"):
        config.with_crop_recipe()
    with pytest.raises(ConfigError, match="arrays are handed to the Trainer; --data-dir applies"):
        TrainConfig(dataset="arrays", data_dir="somewhere")
