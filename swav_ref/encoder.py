"""A trained backbone with its input normalisation, read from a checkpoint without the data.

What a researcher needs after training: features of new images, for a classifier of their
own, a plot, a retrieval index::

    from swav_ref.encoder import load_encoder

    encoder = load_encoder("runs/digits/checkpoint.npz")
    features = encoder.features(images)  # (N, C, H, W) uint8 -> (N, D), eval mode

A checkpoint holds the run's configuration (which names the architecture), the weights,
and the per-channel mean and std its crops were normalised with, so no data set is
loaded. Checkpoints written before the normalisation was saved need their training data
to compute it from: ``load_encoder(path, train_set=...)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from swav_ref import checkpoint as ckpt
from swav_ref.backend import Random, get_backend
from swav_ref.evaluate import extract_features
from swav_ref.config import TrainConfig
from swav_ref.resume import load_trainer_checkpoint
from swav_ref.train import build_backbone, input_normalisation

__all__ = ["Encoder", "encoder_from_loaded", "load_encoder"]

_BACKBONE = "model.backbone."


@dataclass
class Encoder:
    """A frozen backbone and the input transform it was trained with.

    Attributes
    ----------
    backbone
        the ResNet (:mod:`swav_ref.nn.resnet`), in eval mode.
    mean, std
        per-channel normalisation of the [0, 1] pixels, ``(x - mean) / std``.
    xp, dtype
        the backend and floating type the backbone runs in.
    config
        the training run's :class:`~swav_ref.config.TrainConfig`.
    image_shape
        ``(H, W)`` of the training images, or None (not recorded: checkpoints
        written before the data were, or an Encoder built by hand).
    """

    backbone: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    xp: Any
    dtype: Any
    config: TrainConfig
    image_shape: tuple[int, int] | None = None

    def features(self, images: Any, batch_size: int = 512) -> Any:
        """Features (N, D) on ``xp`` of uint8 images (N, C, H, W), host or device arrays.

        Images of another channel count are refused (ValueError). Images of another size
        than the training images (:attr:`image_shape`) are warned about, as ``swav-ref eval``
        warns about other data: the network runs on any size (it pools over the whole
        image), so a 1x1 or 32x32 image gives features from an 8x8 model without an error,
        but its filters learned the training images' scale, and such features are not
        those the model was trained to give; resize the images first.
        """
        if getattr(images, "ndim", None) != 4 or images.shape[1] != self.backbone.in_channels:
            raise ValueError(f"the encoder takes (N, {self.backbone.in_channels}, H, W) uint8 images, as it was "
                             f"trained on; got shape {tuple(getattr(images, 'shape', ()))}")
        if self.image_shape is not None and tuple(images.shape[2:]) != tuple(self.image_shape):
            (h, w), (got_h, got_w) = self.image_shape, images.shape[2:]
            warnings.warn(f"the encoder was trained on {h}x{w} images, these are {got_h}x{got_w}: the network runs "
                          "on any size, but its filters learned the training images' scale, so these features are "
                          f"not those it was trained to give; resize the images to {h}x{w} first", stacklevel=2)
        return extract_features(self.backbone, images, xp=self.xp, dtype=self.dtype, batch_size=batch_size,
                                normalize=(self.mean, self.std))


def load_encoder(path: Any, backend: str | None = None, train_set: Any = None) -> Encoder:
    """The backbone of a :class:`~swav_ref.train.Trainer` checkpoint, ready for features.

    Parameters
    ----------
    path
        a ``checkpoint.npz`` written by ``swav-ref train`` (or ``Trainer.save``).
    backend
        ``"numpy"`` or ``"cupy"``; default the run's own.
    train_set
        the run's training :class:`~swav_ref.data.datasets.ImageDataset`, needed
        only for a checkpoint written before checkpoints kept their input normalisation
        (it is then computed from these images, as the trainer did); ignored otherwise.

    Raises
    ------
    swav_ref.checkpoint.CheckpointError : not a trainer checkpoint, weights that do not fit
        the architecture, or a checkpoint too old to hold its normalisation given without
        ``train_set``.
    """
    return encoder_from_loaded(path, load_trainer_checkpoint(path), backend, train_set)


def encoder_from_loaded(path: Any, loaded: tuple[dict, dict, TrainConfig], backend: str | None = None,
                        train_set: Any = None) -> Encoder:
    """:func:`load_encoder` of a checkpoint already read by
    :func:`~swav_ref.resume.load_trainer_checkpoint` (its ``(arrays, metadata, config)``),
    so that a caller who needs the metadata too reads the file once. ``path`` names the
    file in errors."""
    arrays, meta, config = loaded
    if "normalisation" in meta:
        mean, std = tuple(meta["normalisation"]["mean"]), tuple(meta["normalisation"]["std"])
    elif train_set is not None:
        mean, std = input_normalisation(train_set)
    else:
        raise ckpt.CheckpointError(
            f"{path}: written before checkpoints kept their input normalisation; give its training data: "
            "load_encoder(path, train_set=...)")
    xp = get_backend(backend or config.backend)
    dtype = getattr(xp, config.dtype)
    weights = {k[len(_BACKBONE):]: v for k, v in arrays.items() if k.startswith(_BACKBONE)}
    if "conv1.weight" not in weights:
        raise ckpt.CheckpointError(f"{path}: holds no backbone weights (model.backbone.conv1.weight is missing)")
    in_channels = weights["conv1.weight"].shape[1]
    backbone = build_backbone(config.arch, in_channels, xp, dtype, Random(np.random.SeedSequence(0), xp))
    try:
        ckpt.check_compatible(weights, {k: tuple(v.shape) for k, v in backbone.state_dict().items()})
    except ckpt.CheckpointError as exc:  # which file, and that these are the backbone's weights
        raise ckpt.CheckpointError(f"{path}: its {_BACKBONE}* entries: {exc}") from exc
    try:  # bad values (NaN, complex or text weights) are the file's fault: a CheckpointError naming it
        backbone.load_state_dict(weights)
    except ValueError as exc:
        raise ckpt.CheckpointError(f"{path}: its {_BACKBONE}* entries: {exc}") from exc
    backbone.eval()
    trained_on = (meta.get("data") or {}).get("image_shape")  # (C, H, W); absent in early checkpoints
    image_shape = None if not trained_on else (int(trained_on[-2]), int(trained_on[-1]))
    return Encoder(backbone, mean, std, xp, dtype, config, image_shape)
