"""The small training run the trainer tests share: a few steps on 160 digits, in seconds.

The data come from the ``tiny`` fixture (``conftest.py``); the settings from
:func:`small_config`. :func:`write_digit_folder` makes an image folder of digits for the
tests of ``--dataset folder``.
"""

from __future__ import annotations

import numpy as np

from swav_ref.train import TrainConfig


def small_config(out_dir, **changes) -> TrainConfig:
    """Batches of 32 (5 steps per epoch on ``tiny``), 2 + 2 crops, a narrow head, 10
    prototypes, 2 epochs, a log record every step; ``changes`` override any field."""
    base = dict(batch_size=32, n_crops=(2, 2), crop_sizes=(8, 6), min_scale=(0.5, 0.3), max_scale=(1.0, 0.6),
                hidden_dim=32, feat_dim=16, n_prototypes=(10,), epochs=2, warmup_epochs=1, base_lr=0.5,
                freeze_prototypes_niters=3, log_every=1, progress=False, out_dir=str(out_dir))
    base.update(changes)
    return TrainConfig(**base)


def write_digit_folder(root, n: int, labelled: bool, channels: int = 1):
    """The first ``n`` digits as PNGs (grey, or the grey copied into ``channels`` = 3): one
    sub-folder per class, or all in ``root`` (unlabelled). Returns ``root``."""
    from PIL import Image

    from swav_ref.data.datasets import load_digits_dataset

    digits = load_digits_dataset()
    for i in range(n):
        folder = root / str(digits.labels[i]) if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        image = digits.images[i, 0]
        Image.fromarray(np.stack([image] * 3, axis=-1) if channels == 3 else image).save(folder / f"{i}.png")
    return root
