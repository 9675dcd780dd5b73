"""Figures shared by the command line, the notebooks and the docs.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so it
works headless (the CLI saves it) and in a notebook (the figure displays itself when it is
the last expression of a cell). Inputs are host NumPy arrays or lists: plotting is a
logging boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def training_curves(steps: Sequence[dict], n_prototypes: int | None = None) -> Figure:
    """Loss and code usage against the training step.

    A run resumed on another number of workers renumbers its steps from the epoch it
    resumes at (``step = epoch x steps per epoch``), so its step numbers fall back (more
    workers) or jump ahead (fewer). The curves then run on against the steps taken
    (:func:`steps_taken`), with a dotted line where the numbering broke off, instead of
    drawing back over the earlier epochs or leaving a gap.

    Parameters
    ----------
    steps
        the per-step records of the metrics log (dicts with ``step``, ``loss`` and,
        when present, ``prototypes_used`` and ``code_entropy``).
    n_prototypes
        K; draws the collapse level ``ln K`` on the loss panel.
    """
    if n_prototypes is not None and not (isinstance(n_prototypes, (int, np.integer)) and n_prototypes >= 1):
        raise ValueError(f"training_curves: n_prototypes must be a positive integer (K) or None, got {n_prototypes!r}")
    step, breaks = steps_taken(np.array([r["step"] for r in steps], dtype=np.int64))
    xlabel = "steps taken" if breaks.size else "step"
    loss = np.array([r["loss"] for r in steps], dtype=float)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_use = fig.subplots(1, 2)
    ax_loss.plot(step, loss, lw=1.2)
    if n_prototypes:
        ax_loss.axhline(math.log(n_prototypes), ls="--", c="grey", lw=1, label=r"$\ln K$ (collapse)")
    for ax in (ax_loss, ax_use):
        for i, at in enumerate(step[breaks]):
            ax.axvline(at, ls=":", c="grey", lw=1, label="resumed on other workers" if i == 0 else None)
    if n_prototypes or breaks.size:
        ax_loss.legend(loc="upper right")
    ax_loss.set(xlabel=xlabel, ylabel="loss", title="training loss")
    if steps and "prototypes_used" in steps[0]:
        used = np.array([r["prototypes_used"] for r in steps], dtype=float)
        ax_use.plot(step, used, lw=1.2, label="prototypes used")
        if n_prototypes:
            ax_use.axhline(n_prototypes, ls="--", c="grey", lw=1, label="K")
        ax_use.set(xlabel=xlabel, ylabel="prototypes used (argmax)", title="code usage")
        if "code_entropy" in steps[0]:
            ax_ent = ax_use.twinx()
            ent = np.array([r["code_entropy"] for r in steps], dtype=float)
            ax_ent.plot(step, ent, c="C1", lw=1, alpha=0.8, label="entropy of mean code")
            ax_ent.set_ylabel("entropy of the mean code (nats)")
        ax_use.legend(loc="lower right")
    else:
        ax_use.set_visible(False)
    return fig


def steps_taken(step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logged step numbers (N,) as an axis of the steps taken, and where the numbering
    broke off.

    Every step is logged, so within a run the numbers go up by one; a resume on another
    number of workers renumbers from the epoch it resumes at, back (more workers, fewer
    steps per epoch) or forward (fewer workers). Each stretch is placed to follow the one
    before by one step. Returns ``(x, breaks)``: ``x`` (N,) int64, equal to ``step`` when
    the numbering never broke off, and the indices (R,) of the records that start a
    stretch after a break."""
    breaks = np.flatnonzero(np.diff(step) != 1) + 1
    x = step[0] + np.arange(step.size, dtype=np.int64) if step.size else step.copy()
    return x, breaks


def image_grid(images: np.ndarray, nrows: int, ncols: int, titles: Sequence[str] | None = None,
               figsize: tuple[float, float] | None = None) -> Figure:
    """A grid of images (N, C, H, W), uint8 or float in [0, 1], greyscale or RGB, filled row
    by row; one title per shown image when ``titles`` is given. ``images`` may also be a list
    of (C, H, W) images in which ``None`` leaves its cell empty (a short row)."""
    cells = list(images)
    present = [image for image in cells if image is not None]
    stacked = np.stack([np.asarray(image) for image in present]) if present else np.asarray(images)
    _check_images(stacked)
    shown = min(len(cells), nrows * ncols)
    if titles is not None and len(titles) < shown:
        raise ValueError(f"image_grid: {len(titles)} titles for {shown} images")
    fig = Figure(figsize=figsize or (1.2 * ncols, 1.2 * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= len(cells) or cells[i] is None:
            continue
        img = np.asarray(cells[i])
        img = img.astype(float) / 255.0 if stacked.dtype == np.uint8 else np.clip(img, 0.0, 1.0)
        if img.shape[0] == 1:
            # as stored, 0 black: the same digit looks the same here and in the crops' figure
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(np.transpose(img, (1, 2, 0)))
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    return fig


def prototype_gallery(images: np.ndarray, assignments: np.ndarray, n_prototypes: int = 10,
                      per_prototype: int = 10) -> Figure:
    """Images grouped by the prototype they are assigned to: one row per prototype.

    Rows are the ``n_prototypes`` most used prototypes, each showing up to
    ``per_prototype`` of its images; a row of one digit class means the prototype has
    discovered that class without labels.
    """
    images, assignments = np.asarray(images), np.asarray(assignments)
    if len(images) == 0 or assignments.shape != (len(images),):
        raise ValueError(f"prototype_gallery: needs one assignment per image and at least one image, got "
                         f"{len(images)} images and assignments of shape {assignments.shape}")
    counts = np.bincount(assignments)
    top = np.argsort(counts)[::-1][:n_prototypes]
    cells, titles = [], []
    for k in top:
        members = np.flatnonzero(assignments == k)[:per_prototype]
        for j in range(per_prototype):
            cells.append(images[members[j]] if j < len(members) else None)  # None: an empty cell
            titles.append(f"proto {k} (n={counts[k]})" if j == 0 else "")
    return image_grid(cells, len(top), per_prototype, titles=titles)


def _check_images(images: np.ndarray) -> None:
    """(N, C, H, W) with 1 or 3 channels, uint8 or float in [0, 1]: anything else would be
    clipped to white or black without a word (float pixels on the 0..255 scale, int16)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with 1 or 3 channels, got shape {images.shape}")
    if images.dtype == np.uint8:
        return
    if images.dtype.kind != "f":
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
    if images.size and (np.nanmin(images) < 0 or np.nanmax(images) > 1):
        raise ValueError(f"float images must lie in [0, 1], got values in [{np.nanmin(images):g}, "
                         f"{np.nanmax(images):g}]; divide 0..255 pixels by 255 (or pass uint8)")
