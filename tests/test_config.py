"""TrainConfig takes what a Python user naturally passes (NumPy scalars from a sweep, a
path, one number for a sequence) and refuses the rest by the option's name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from swav_ref.train import ConfigError, TrainConfig


def test_numpy_scalars_and_paths_become_plain_values():
    config = TrainConfig(batch_size=np.int64(64), epsilon=np.float32(0.05), base_lr=1, n_crops=[2, np.int64(4)],
                         n_prototypes=50, out_dir=Path("runs") / "x")
    assert type(config.batch_size) is int and type(config.epsilon) is float and type(config.base_lr) is float
    assert config.n_crops == (2, 4) and all(type(n) is int for n in config.n_crops)
    assert config.n_prototypes == (50,) and config.out_dir == str(Path("runs") / "x")
    assert TrainConfig.from_dict(config.to_dict()) == config  # and it survives JSON-like dicts


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 2.5, "--epochs 2.5: must be a whole number"),
    ("epochs", "5", "--epochs '5': must be a number"),
    ("batch_size", True, "--batch-size True: must be a number"),
    ("n_crops", (2, 4.5), "--n-crops 4.5: must be a whole number"),
    ("sync_bn", 2, "--sync-bn 2: must be True or False"),
    ("arch", 18, "--arch 18: must be text"),
])
def test_a_value_of_the_wrong_kind_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert str(info.value) == message


def test_switches_saved_as_0_or_1_still_load():
    """Configurations written before the kinds were checked may hold 0 and 1 for a switch."""
    config = TrainConfig.from_dict({"progress": 0, "sync_bn": 1})
    assert config.progress is False and config.sync_bn is True
    with pytest.raises(ConfigError, match="--progress 2: must be True or False"):
        TrainConfig(progress=2)


def test_from_dict_names_the_keys_it_ignores():
    with pytest.warns(UserWarning, match="ignores 'base-lr', 'epoch': no such setting"):
        config = TrainConfig.from_dict({"epoch": 5, "base-lr": 0.1, "seed": 3})
    assert config.seed == 3 and config.epochs == TrainConfig().epochs


@pytest.mark.parametrize("value, message", [
    ((), "--n-prototypes: needs at least one value, got none"),  # was min() of an empty sequence
    ((1,), "--n-prototypes 1: every entry must be at least 2"),  # was refused only by CollapseMonitor
    ((30, 1), "--n-prototypes 30 1: every entry must be at least 2"),
])
def test_prototype_counts_that_cannot_train_are_refused_by_name(value, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(method="deepcluster-v2", n_prototypes=value)
    assert str(info.value).startswith(message)


def test_a_zero_dimensional_array_is_one_number():
    """np.array(5), as a sweep's grid hands it over, is one number like np.int64(5)."""
    config = TrainConfig(n_prototypes=np.array(5), epochs=np.array(3), n_crops=np.array([2, 4]))
    assert config.n_prototypes == (5,) and config.epochs == 3 and type(config.epochs) is int
    assert config.n_crops == (2, 4)
    with pytest.raises(ConfigError, match="--crop-sizes: needs at least one value"):
        TrainConfig(crop_sizes=[])


def test_what_is_not_a_configuration_is_refused_with_what_it_got():
    from swav_ref.train import Trainer

    with pytest.raises(TypeError, match="from_dict takes a dict of settings.*got NoneType"):
        TrainConfig.from_dict(None)
    with pytest.raises(TypeError, match=r"Trainer\(config\): config must be a TrainConfig, got dict.*from_dict"):
        Trainer({"epochs": 1})


def test_names_that_moved_out_of_train_still_import_with_a_warning():
    """train.py was split into config.py, train.py and resume.py; the names users may have
    imported from swav_ref.train keep working, told where they are now."""
    import swav_ref.config
    import swav_ref.resume

    with pytest.warns(DeprecationWarning, match="swav_ref.resume.RESUME_MAY_CHANGE"):
        from swav_ref.train import RESUME_MAY_CHANGE
    assert RESUME_MAY_CHANGE is swav_ref.resume.RESUME_MAY_CHANGE
    with pytest.warns(DeprecationWarning, match="swav_ref.config.as_options"):
        from swav_ref.train import as_options
    assert as_options is swav_ref.config.as_options
    import swav_ref.train

    with pytest.raises(AttributeError, match="no attribute 'numbers'"):
        swav_ref.train.numbers  # a module config.py happens to import is no name of train's


def test_settings_that_cannot_train_still_load_for_evaluation():
    """A checkpoint's configuration from before the trainability checks (epsilon 0.002 trained
    without a NaN) must still load, for eval and load_encoder; only training refuses it."""
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), "epsilon": 0.002, "momentum": 1.0, "batch_size": 1})
    with pytest.raises(ConfigError, match="--momentum 1.0: must be below 1"):
        config.check_trainable()
    with pytest.raises(ConfigError, match="--epsilon 0.002: must be at least 0.003"):
        dataclasses.replace(config, momentum=0.9, batch_size=2).check_trainable()


def test_image_fit_crops_only_to_a_size_and_old_configurations_stretch():
    """``image_fit`` came after ``image_size``: a saved configuration without it is what
    every earlier run did (stretch); ``crop`` needs a size to crop to."""
    saved = TrainConfig(dataset="folder", data_dir="images", image_size=32).to_dict()
    del saved["image_fit"]
    assert TrainConfig.from_dict(saved).image_fit == "stretch"
    assert TrainConfig(dataset="folder", data_dir="images", image_size=32, image_fit="crop").image_fit == "crop"
    with pytest.raises(ConfigError, match="--image-fit crop: applies with --image-size") as info:
        TrainConfig(dataset="folder", data_dir="images", image_fit="crop")
    assert info.value.field == "image_fit"
    with pytest.raises(ConfigError, match="--image-fit pad: choose one of stretch, crop"):
        TrainConfig(dataset="folder", data_dir="images", image_size=32, image_fit="pad")
