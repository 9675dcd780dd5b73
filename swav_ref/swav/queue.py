r"""The feature queue: past embeddings that enlarge the Sinkhorn problem of a small batch.

Sinkhorn spreads a batch of B samples equally over K prototypes, B/K each. When B is
smaller than K (or not much larger) that constraint is too coarse to be meaningful, and the
codes become noisy. SwAV's remedy: keep the embeddings of the last L samples of each
assignment crop, score them against the *current* prototypes, and solve Sinkhorn on
``L + B`` samples; only the current batch's codes are used.

Embeddings (not scores) are stored, because the prototypes move every step. The official
code pushes with a shift (``queue[i, bs:] = queue[i, :-bs]; queue[i, :bs] = new``): the
newest batch sits at the front, the oldest falls off the end.

The training loop, per assignment crop ``i`` (as in main_swav.py)::

    queued = queue.scores(i, weight) if queue.is_full else None   # before pushing
    ...                                                          # swav_loss(..., queue_scores)
    queue.push(embeddings_of_assignment_crops)                    # after scoring
"""

from __future__ import annotations

import numbers
import operator
import types
from typing import Any, Sequence

import numpy as np

from swav_ref.backend import python_int
from swav_ref.checkpoint import CheckpointError, entry_problem, finite_copy

__all__ = ["Queue", "queue_length_per_worker"]


def queue_length_per_worker(queue_length: int, batch_size: int, world_size: int = 1) -> int:
    """The per-worker queue length, checking the official divisibility rule.

    The official code keeps ``queue_length // world_size`` embeddings per worker and rounds
    ``queue_length`` down to a multiple of ``batch_size * world_size``, so that pushes of
    whole batches fill each worker's queue exactly. We ask for that multiple instead of
    changing the number silently.

    Raises
    ------
    ValueError
        if ``queue_length`` is not a positive multiple of ``batch_size * world_size``; the
        message gives the nearest valid lengths.
    """
    queue_length, batch_size, world_size = (
        python_int(queue_length, "queue_length"),
        python_int(batch_size, "batch_size"),
        python_int(world_size, "world_size"),
    )
    step = batch_size * world_size
    if queue_length % step != 0:
        lower, upper = (queue_length // step) * step, (queue_length // step + 1) * step
        raise ValueError(
            f"queue_length={queue_length} is not a multiple of batch_size * world_size = "
            f"{batch_size} * {world_size} = {step}; use {upper}"
            + (f" or {lower}" if lower > 0 else "")
        )
    return queue_length // world_size


class Queue:
    """Per-assignment-crop FIFO of L2-normalised embeddings, on the backend.

    Parameters
    ----------
    n_assign_crops : int
        Number of assignment crops (``len(crops_for_assign)``).
    length : int
        L, embeddings kept per crop on this worker; a multiple of ``batch_size``
        (see :func:`queue_length_per_worker`).
    dim : int
        d, the embedding size.
    batch_size : int
        Rows pushed per crop per step.
    xp : namespace
        The backend (numpy, cupy, array_api_strict).
    dtype : dtype or str
        Default float32.

    Attributes
    ----------
    embeddings : array (n_assign_crops, L, d)
        Newest first; rows past ``filled`` are zeros.
    filled : int
        How many rows per crop hold real embeddings. A host-side counter: asking
        ``is_full`` never reads the device.
    """

    def __init__(self, n_assign_crops: int, length: int, dim: int, batch_size: int, *, xp: types.ModuleType = np,
                 dtype: Any = "float32"):
        self.n_assign_crops = python_int(n_assign_crops, "n_assign_crops")
        self.length = python_int(length, "length")
        self.dim = python_int(dim, "dim")
        self.batch_size = python_int(batch_size, "batch_size")
        if self.length % self.batch_size != 0:
            raise ValueError(
                f"queue length {self.length} is not a multiple of batch_size {self.batch_size}; "
                "pushes of whole batches must fill it exactly"
            )
        self.xp = xp
        self.dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
        self.embeddings = xp.zeros((self.n_assign_crops, self.length, self.dim), dtype=self.dtype)
        self.filled = 0

    @property
    def is_full(self) -> bool:
        """True once ``length`` embeddings per crop have been pushed (host counter, no sync)."""
        return self.filled >= self.length

    def push(self, embeddings_per_crop: Sequence[Any] | Any) -> None:
        """Put the newest batch at the front, shifting the older rows back by one batch.

        Parameters
        ----------
        embeddings_per_crop
            sequence of n_assign_crops arrays (batch_size, d), or an array
            (n_assign_crops, batch_size, d). L2-normalised embeddings of the assignment crops.
        """
        xp, bs = self.xp, self.batch_size
        new = self._stack(embeddings_per_crop)
        # a fresh array (not an overlapping in-place shift, which is unsafe on some backends)
        self.embeddings = xp.concat((new, self.embeddings[:, : self.length - bs, :]), axis=1)
        self.filled = min(self.filled + bs, self.length)

    def scores(self, crop: int, prototype_weight: Any) -> Any:
        r"""Scores of the filled rows of crop ``crop``'s queue against the current prototypes.

        Returns
        -------
        array (filled, K)
            :math:`E_{\text{queue}}\, C^\top`, newest rows first. The official code uses
            them only once the queue is full (check :attr:`is_full`).
        """
        if isinstance(crop, bool) or not isinstance(crop, numbers.Integral):  # 1.5 would be an IndexError
            raise ValueError(f"crop index must be an integer, got {crop!r}")
        if not 0 <= crop < self.n_assign_crops:
            raise ValueError(f"crop index {crop} out of range for a queue of {self.n_assign_crops} crops")
        if prototype_weight.ndim != 2 or prototype_weight.shape[1] != self.dim:
            raise ValueError(
                f"prototype weight must be (K, {self.dim}), got shape {tuple(prototype_weight.shape)}"
            )
        return self.embeddings[crop, : self.filled, :] @ prototype_weight.T

    def all_scores(self, prototype_weight: Any) -> list:
        """``[scores(i, weight) for each crop]``, the ``queue_scores`` of :func:`~swav_ref.swav.loss.swav_loss`."""
        return [self.scores(i, prototype_weight) for i in range(self.n_assign_crops)]

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"embeddings": array (n_assign_crops, L, d), "filled": int}`` for a checkpoint."""
        return {"embeddings": self.embeddings, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (the arrays may come from the host).

        Raises :class:`~swav_ref.checkpoint.CheckpointError` (a ``ValueError``) naming the
        entry, and changes nothing, unless ``embeddings`` is an array of a floating dtype
        (integers would be cast silently) and of this queue's shape, finite once cast (a NaN
        would poison every later Sinkhorn problem, and the run would seem to diverge), and
        ``filled`` an integer (not a bool or 2.5) that whole batches reach: a multiple of
        ``batch_size`` in ``[0, length]``. Not a hot path: one read-back for the finiteness.
        """
        missing = {"embeddings", "filled"} - set(state)
        if missing:
            raise CheckpointError(f"queue state lacks {sorted(missing)}")
        emb, filled = state["embeddings"], state["filled"]
        problem = entry_problem(emb, "f")
        if problem:
            raise CheckpointError(f"queue state 'embeddings' {problem}")
        want = (self.n_assign_crops, self.length, self.dim)
        if tuple(emb.shape) != want:
            raise CheckpointError(f"queue state has embeddings of shape {tuple(emb.shape)}, this queue is {want}")
        try:
            if isinstance(filled, bool):
                raise TypeError
            filled = operator.index(filled)  # an int, a NumPy integer or a 0-d integer array
        except TypeError:
            raise CheckpointError(f"queue state 'filled' must be an integer, got {filled!r}") from None
        if not 0 <= filled <= self.length or filled % self.batch_size:
            raise CheckpointError(f"queue state has filled={filled}, not a multiple of batch_size "
                                  f"{self.batch_size} in [0, {self.length}]")
        self.embeddings = finite_copy(emb, self.xp, self.dtype, "queue state 'embeddings'")
        self.filled = filled

    def _stack(self, embeddings_per_crop) -> Any:
        xp, want = self.xp, (self.batch_size, self.dim)
        if hasattr(embeddings_per_crop, "ndim"):
            if tuple(embeddings_per_crop.shape) != (self.n_assign_crops, *want):
                raise ValueError(
                    f"push: expected an array of shape {(self.n_assign_crops, *want)}, got "
                    f"{tuple(embeddings_per_crop.shape)}"
                )
            stacked = embeddings_per_crop
        else:
            arrays = list(embeddings_per_crop)
            if len(arrays) != self.n_assign_crops:
                raise ValueError(f"push: expected {self.n_assign_crops} arrays (one per crop), got {len(arrays)}")
            for i, a in enumerate(arrays):
                if tuple(a.shape) != want:
                    raise ValueError(f"push: crop {i} has shape {tuple(a.shape)}, expected {want}")
            stacked = xp.stack(arrays, axis=0)
        return stacked if stacked.dtype == self.dtype else xp.astype(stacked, self.dtype)

    def __repr__(self) -> str:
        return (
            f"Queue(n_assign_crops={self.n_assign_crops}, length={self.length}, dim={self.dim}, "
            f"batch_size={self.batch_size}, filled={self.filled})"
        )

