"""The figures: what they draw, and the inputs they refuse instead of drawing them wrong."""

from __future__ import annotations

import numpy as np
import pytest

from swav_ref import plots


def test_training_curves_draws_the_collapse_level():
    steps = [{"step": s, "loss": 4.6 - 0.1 * s, "prototypes_used": 90, "code_entropy": 4.5} for s in range(5)]
    fig = plots.training_curves(steps, n_prototypes=100)
    loss_axes = fig.axes[0]
    assert [line.get_ydata()[0] for line in loss_axes.lines][-1] == pytest.approx(np.log(100))
    with pytest.raises(ValueError, match="n_prototypes must be a positive integer"):
        plots.training_curves(steps, n_prototypes=-3)


def test_training_curves_run_on_when_a_resume_on_other_workers_renumbers_the_steps():
    """Two epochs of 10 steps on one worker, then a resume on two workers at 5 steps per
    epoch: the log's steps go 0..19, then 10..19 again (epoch 2 starts at 2 x 5). The curves
    must run on after step 19, not draw back over the first epochs."""
    numbers = list(range(20)) + list(range(10, 20))
    steps = [{"step": s, "loss": 3.0 - 0.01 * i, "prototypes_used": 9} for i, s in enumerate(numbers)]
    fig = plots.training_curves(steps, n_prototypes=10)
    x = fig.axes[0].lines[0].get_xdata()
    assert list(x) == list(range(30))
    for ax in fig.axes[:2]:
        assert ax.get_xlabel() == "steps taken"
        assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [20]
    # back to one worker from epoch 4 (step 40, after 10..19 at two): forward, no gap either
    x, breaks = plots.steps_taken(np.array([*range(20), *range(10, 20), *range(40, 50)]))
    assert list(x) == list(range(40)) and list(breaks) == [20, 30]
    # an unbroken run keeps its own numbers, also resumed mid-way (starting past 0)
    x, breaks = plots.steps_taken(np.arange(7, 12))
    assert list(x) == [7, 8, 9, 10, 11] and breaks.size == 0
    assert plots.steps_taken(np.array([], dtype=np.int64))[0].size == 0
    assert plots.training_curves(steps[:20]).axes[0].get_xlabel() == "step"
    assert plots.training_curves(steps[:1]).axes[0].get_xlabel() == "step"


def test_image_grid_shows_uint8_and_unit_floats():
    rng = np.random.default_rng(0)
    grid = plots.image_grid(rng.integers(0, 256, (3, 1, 8, 8), dtype=np.uint8), 1, 3, titles=["a", "b", "c"])
    assert [ax.get_title() for ax in grid.axes] == ["a", "b", "c"]
    plots.image_grid(rng.random((2, 3, 8, 8)), 1, 2)


@pytest.mark.parametrize("images, message", [
    (np.full((2, 1, 8, 8), 200.0), r"float images must lie in \[0, 1\], got values in \[200, 200\]"),
    (np.zeros((2, 1, 8, 8), dtype=np.int16), "must be uint8 .* got dtype int16"),
    (np.zeros((2, 8, 8), dtype=np.uint8), r"\(N, C, H, W\) with 1 or 3 channels, got shape \(2, 8, 8\)"),
])
def test_image_grid_refuses_images_it_would_clip(images, message):
    with pytest.raises(ValueError, match=message):
        plots.image_grid(images, 1, 2)


def test_grid_titles_and_gallery_assignments_must_cover_the_images():
    images = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="1 titles for 4 images"):
        plots.image_grid(images, 2, 2, titles=["only one"])
    with pytest.raises(ValueError, match="one assignment per image"):
        plots.prototype_gallery(images, np.array([0, 1]))
    with pytest.raises(ValueError, match="at least one image"):
        plots.prototype_gallery(images[:0], np.array([], dtype=np.int64))
    fig = plots.prototype_gallery(images, np.array([0, 0, 1, 1]), n_prototypes=2, per_prototype=2)
    assert len(fig.axes) == 4


def test_gallery_leaves_the_rest_of_a_short_row_empty_and_draws_grey_as_stored():
    """A prototype with fewer images than the row leaves its cells empty (they were drawn as
    black squares once greyscale was shown as stored), and 0 is black, as in the crops."""
    images = np.full((4, 1, 8, 8), 200, dtype=np.uint8)
    fig = plots.prototype_gallery(images, np.array([0, 0, 0, 1]), n_prototypes=2, per_prototype=3)
    drawn = [len(ax.images) for ax in fig.axes]
    assert drawn == [1, 1, 1, 1, 0, 0]
    assert fig.axes[0].images[0].get_cmap().name == "gray"
    with pytest.raises(ValueError, match="uint8"):
        plots.image_grid([np.zeros((1, 8, 8), dtype=np.int16), None], 1, 2)
