"""The SwAV objective, built on :mod:`swav_ref.nn`'s layers.

- :mod:`~swav_ref.swav.codes` -- :func:`sinkhorn_codes`, equal-partition codes (the official
  Sinkhorn-Knopp iterations).
- :mod:`~swav_ref.swav.loss` -- :func:`swav_loss`, the swapped prediction over multi-crop,
  forward and hand-derived backward.
- :mod:`~swav_ref.swav.head` -- the prototype layer (scores = normalize(z) @ C^T) and its
  upkeep (re-normalisation, freezing); :class:`SwAVHead` and :class:`ClassifierHead`.
- :mod:`~swav_ref.swav.queue` -- :class:`Queue`, past embeddings for small batches.
- :mod:`~swav_ref.swav.diagnostics` -- prototype usage and the collapse watchdog.
"""

from swav_ref.swav.codes import FLOAT32_SAFE_EPSILON, sinkhorn_codes
from swav_ref.swav.diagnostics import CodeUsage, CollapseMonitor, CollapseWarning, code_usage
from swav_ref.swav.head import (
    ClassifierHead,
    PrototypesCache,
    SwAVHead,
    normalize_prototypes,
    prototypes_backward,
    prototypes_forward,
    prototypes_frozen,
)
from swav_ref.swav.loss import SwAVLossOutput, swapped_prediction_loss, swav_loss
from swav_ref.swav.queue import Queue, queue_length_per_worker

__all__ = [
    "FLOAT32_SAFE_EPSILON",
    "ClassifierHead",
    "CodeUsage",
    "CollapseMonitor",
    "CollapseWarning",
    "PrototypesCache",
    "Queue",
    "SwAVHead",
    "SwAVLossOutput",
    "code_usage",
    "normalize_prototypes",
    "prototypes_backward",
    "prototypes_forward",
    "prototypes_frozen",
    "queue_length_per_worker",
    "sinkhorn_codes",
    "swapped_prediction_loss",
    "swav_loss",
]
