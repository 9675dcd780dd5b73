"""The small training run the trainer tests share: a few steps on 160 digits, in seconds.

The data come from the ``tiny`` fixture (``conftest.py``); the settings from
:func:`small_config`.
"""

from __future__ import annotations

from swav_ref.train import TrainConfig


def small_config(out_dir, **changes) -> TrainConfig:
    """Batches of 32 (5 steps per epoch on ``tiny``), 2 + 2 crops, a narrow head, 10
    prototypes, 2 epochs, a log record every step; ``changes`` override any field."""
    base = dict(batch_size=32, n_crops=(2, 2), crop_sizes=(8, 6), min_scale=(0.5, 0.3), max_scale=(1.0, 0.6),
                hidden_dim=32, feat_dim=16, n_prototypes=(10,), epochs=2, warmup_epochs=1, base_lr=0.5,
                freeze_prototypes_niters=3, log_every=1, progress=False, out_dir=str(out_dir))
    base.update(changes)
    return TrainConfig(**base)
