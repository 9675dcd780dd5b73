"""Multi-crop augmentation: reproducible, right shapes, and each operation against an oracle."""

from __future__ import annotations

import numpy as np
import pytest

import required
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from swav_ref.backend import Random, asarray, to_numpy
from swav_ref.data import multicrop as M
from swav_ref.data.multicrop import CropParams, MultiCrop, MultiCropConfig

#: no augmentation beyond the crop itself, and no normalisation
PLAIN = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def small_config(**changes):
    base = dict(n_crops=(2, 3), sizes=(8, 4), blur_p=0.5, mean=M.CIFAR10_MEAN, std=M.CIFAR10_STD)
    base.update(changes)
    return MultiCropConfig(**base)


def render_one(images, params, size, config, xp=np):
    """The crops of ``params`` for uint8 ``images``, as a host array (n, B, C, s, s)."""
    x = xp.astype(asarray(images, xp), xp.float64) / 255.0
    return to_numpy(M.render_crops(x, params, size, config))


# -- configuration -----------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="sizes has 1 entries but n_crops has 2"):
        MultiCropConfig(n_crops=(2, 6), sizes=(32,), min_scale=(0.1, 0.1), max_scale=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"scale range \(0.5, 0.2\)"):
        MultiCropConfig(min_scale=(0.5, 0.05), max_scale=(0.2, 0.14))
    with pytest.raises(ValueError, match="flip_p=1.5"):
        MultiCropConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="std"):
        MultiCropConfig(mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="unknown multi-crop recipe"):
        M.default_config("mnist")
    with pytest.raises(ValueError, match="image_size"):
        M.default_config("folder")


@pytest.mark.parametrize(
    "changes, shown",
    [
        (dict(std=(np.nan, 0.2, 0.2)), r"std .* must be finite .*got nan"),
        (dict(std=(0.2, 1e-320, 0.2)), r"std .* >= 1.18e-38 .*got 1e-320"),
        (dict(std=(0.2, 0.2, np.inf)), r"std .*got inf"),
        (dict(mean=(np.inf, 0.5, 0.5)), r"mean .* must be finite, got inf"),
        (dict(mean=(0.5, np.nan, 0.5)), r"mean .* must be finite, got nan"),
        (dict(ratio=(1.0, np.inf)), r"ratio .*< inf, got \(1.0, inf\)"),
        (dict(blur_sigma=(0.1, np.inf)), r"blur_sigma .*< inf, got \(0.1, inf\)"),
        (dict(sizes=(2.5, 4)), r"sizes must be integers >= 1, got \(2.5, 4\) \(2.5 is not\)"),
        (dict(n_crops=(1.5, 3)), r"n_crops must be integers >= 1, got \(1.5, 3\) \(1.5 is not\)"),
        (dict(n_crops=(True, 3)), r"n_crops must be integers >= 1.*\(True is not\)"),
        (dict(n_crops=(2, 0)), r"n_crops must be integers >= 1.*\(0 is not\)"),
    ],
)
def test_config_refuses_values_that_give_nan_crops_or_fail_in_numpy(changes, shown):
    # each was accepted, then gave crops of NaN or inf, or an error from inside NumPy
    with pytest.raises(ValueError, match="MultiCropConfig: " + shown):
        small_config(**changes)


def test_config_takes_numpy_integers():
    config = small_config(n_crops=(np.int64(2), np.int32(3)), sizes=np.array([8, 4]))
    assert config.n_crops == (2, 3) and config.sizes == (8, 4)
    assert all(type(v) is int for v in config.n_crops + config.sizes)


def test_folder_recipe_needs_two_pixels():
    with pytest.raises(ValueError, match=r"needs image_size >= 2 \(the side of the large crops\), got 1"):
        M.default_config("folder", image_size=1)


def test_default_configs():
    from swav_ref.data.datasets import channel_stats, load_digits_dataset

    official = M.default_config("imagenet")
    assert official.crop_sizes == (224, 224, 96, 96, 96, 96, 96, 96)
    assert (official.min_scale, official.max_scale) == ((0.14, 0.05), (1.0, 0.14))
    cifar = M.default_config("cifar10")
    assert cifar.crop_sizes == (32, 32) + (16,) * 6 and cifar.n_total_crops == 8
    digits = M.default_config("digits")
    mean, std = channel_stats(load_digits_dataset().images)
    np.testing.assert_allclose(digits.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(digits.std, std, rtol=1e-6)
    assert M.default_config("folder", image_size=64).sizes == (64, 27)
    assert M.default_config("cifar10", mean=(0.5,) * 3).mean == (0.5, 0.5, 0.5)


# -- the whole pipeline ------------------------------------------------------------------
def test_shapes_dtypes_ranges(backend):
    config = small_config()
    images = random_images((3, 3, 12, 10))
    crops = MultiCrop(config, xp=backend)(images, Random(0))
    assert len(crops) == config.n_total_crops == 5
    assert [c.shape for c in crops] == [(3, 3, 8, 8)] * 2 + [(3, 3, 4, 4)] * 3  # large first
    for crop in crops:
        assert crop.dtype == backend.float32
        host = to_numpy(crop)
        assert np.all(np.isfinite(host))
        unnormalised = host * np.reshape(config.std, (1, 3, 1, 1)) + np.reshape(config.mean, (1, 3, 1, 1))
        assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5


def test_same_seed_same_crops_on_every_backend(backend):
    config = small_config(grayscale_p=0.5, flip_p=0.5)
    images = random_images((4, 3, 9, 11), seed=1)
    expected = MultiCrop(config, xp=np)(images, Random(42))
    got = MultiCrop(config, xp=backend)(asarray(images, backend), Random(42, backend))
    for a, b in zip(expected, got):
        np.testing.assert_allclose(to_numpy(b), a, rtol=0, atol=1e-5)


def test_deterministic_under_a_seed():
    config = small_config()
    images = random_images((2, 3, 10, 10))
    first = MultiCrop(config)(images, Random(3))
    again = MultiCrop(config)(images, Random(3))
    other = MultiCrop(config)(images, Random(4))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, c) for a, c in zip(first, other))


def test_one_channel_images():
    config = M.default_config("digits").replace(jitter_p=1.0, blur_p=0.5, flip_p=0.5)
    images = random_images((5, 1, 8, 8))
    crops = MultiCrop(config)(images, Random(0))
    assert [c.shape for c in crops] == [(5, 1, 8, 8)] * 2 + [(5, 1, 6, 6)] * 4
    params = M.sample_crop_params(Random(0), 50, 8, 8, 0, config, n_channels=1)
    assert np.all(params.saturation == 1.0) and np.all(params.hue == 0.0) and not params.grayscale.any()
    assert np.any(params.brightness != 1.0)  # brightness and contrast still apply


def test_bad_inputs():
    mc = MultiCrop(small_config())
    with pytest.raises(ValueError, match="uint8"):
        mc(np.zeros((2, 3, 8, 8), dtype=np.float32), Random(0))
    with pytest.raises(ValueError, match="1 channels but the normalisation has 3"):
        mc(np.zeros((2, 1, 8, 8), dtype=np.uint8), Random(0))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        mc(np.zeros((3, 8, 8), dtype=np.uint8), Random(0))


@settings(max_examples=10, deadline=None)
@given(
    height=st.integers(3, 14),
    width=st.integers(3, 14),
    size=st.integers(1, 9),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_geometry_gives_valid_crops(height, width, size, batch, seed):
    config = small_config(n_crops=(1, 2), sizes=(size, max(1, size // 2)))
    crops = MultiCrop(config, dtype="float64")(random_images((batch, 3, height, width), seed % 97), Random(seed))
    for crop, s in zip(crops, config.crop_sizes):
        assert crop.shape == (batch, 3, s, s) and np.all(np.isfinite(crop))


# -- crop, resize and flip ---------------------------------------------------------------
def test_scale_one_without_augmentation_is_the_image(backend):
    config = MultiCropConfig(n_crops=(2,), sizes=(8,), min_scale=(1.0,), max_scale=(1.0,), ratio=(1.0, 1.0), **PLAIN)
    images = random_images((3, 3, 8, 8))
    crops = MultiCrop(config, xp=backend, dtype="float64")(images, Random(0))
    for crop in crops:
        np.testing.assert_allclose(to_numpy(crop), images / 255.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [5, 13])  # shrink and enlarge
def test_scale_one_resized_matches_pillow(size):
    """Pillow's bilinear resize (antialiased when shrinking) of the whole image."""
    config = MultiCropConfig(
        n_crops=(1,), sizes=(size,), min_scale=(1.0,), max_scale=(1.0,), ratio=(1.0, 1.0), **PLAIN
    )
    images = random_images((2, 3, 8, 8))
    crop = MultiCrop(config, dtype="float64")(images, Random(0))[0]
    for b in range(2):
        for c in range(3):
            picture = Image.fromarray((images[b, c] / 255.0).astype(np.float32), mode="F")
            expected = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR))
            np.testing.assert_allclose(crop[b, c], expected, atol=1e-6)


def test_box_crop_matches_torch_interpolate():
    """A crop of a box, shrunk and enlarged, against torch's antialiased bilinear resize."""
    torch = required.module("torch")
    images = random_images((2, 3, 11, 13), seed=3)
    x = images / 255.0
    boxes = dict(top=[2, 0], left=[3, 5], height=[6, 11], width=[7, 8])
    for size in (4, 12):
        params = CropParams.identity(2, 11, 13).replace(**boxes)
        got = render_one(images, params, size, MultiCropConfig(**PLAIN))[0]
        for b in range(2):
            t, l, h, w = (boxes[k][b] for k in ("top", "left", "height", "width"))
            crop = torch.tensor(x[b : b + 1, :, t : t + h, l : l + w])
            ref = torch.nn.functional.interpolate(
                crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            np.testing.assert_allclose(got[b], ref[0].numpy(), atol=1e-12)


def test_flip_really_flips(backend):
    """A flipped crop of a box, resized 1:1, is the hand-made slice mirrored."""
    images = random_images((2, 3, 8, 8), seed=5)
    params = CropParams.identity(2, 8, 8).replace(top=[1, 3], left=[2, 0], height=5, width=5, flip=[True, False])
    got = render_one(images, params, 5, MultiCropConfig(**PLAIN), xp=backend)[0]
    x = images / 255.0
    np.testing.assert_allclose(got[0], x[0, :, 1:6, 2:7][:, :, ::-1], atol=1e-12)
    np.testing.assert_allclose(got[1], x[1, :, 3:8, 0:5], atol=1e-12)


def test_flip_commutes_with_resizing():
    images = random_images((1, 3, 9, 7), seed=6)
    base = CropParams.identity(1, 9, 7).replace(top=1, left=1, height=7, width=5)
    plain = render_one(images, base, 6, MultiCropConfig(**PLAIN))
    flipped = render_one(images, base.replace(flip=True), 6, MultiCropConfig(**PLAIN))
    np.testing.assert_allclose(flipped, plain[..., ::-1], atol=1e-12)


def test_resize_rows_are_convex_weights_inside_the_box():
    start, length = np.array([2.0, 0.0]), np.array([5.0, 9.0])
    weights = M.resize_matrix(start, length, in_size=9, out_size=4)
    np.testing.assert_allclose(weights.sum(axis=2), 1.0)
    assert weights.min() >= 0
    assert np.all(weights[0][:, :2] == 0) and np.all(weights[0][:, 7:] == 0)


# -- random boxes ------------------------------------------------------------------------
def test_boxes_fit_and_follow_scale_and_ratio():
    gen = np.random.default_rng(0)
    height, width, scale, ratio = 40, 50, (0.05, 0.14), (3 / 4, 4 / 3)
    top, left, h, w = M.sample_boxes(gen, 2000, height, width, scale, ratio)
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= height) and np.all(left + w <= width)
    area = h * w / (height * width)
    # rounding each side to whole pixels moves the area by at most about one row and column
    slack = (h + w + 1) / (height * width)
    assert np.all(area >= scale[0] - slack) and np.all(area <= scale[1] + slack)
    aspect = w / h
    assert np.all(aspect >= ratio[0] * (1 - 1.0 / h) - 1.0 / h) and np.all(aspect <= ratio[1] * (1 + 1.0 / w) + 1.0 / h)
    assert area.std() > 0.01 and np.unique(left).size > 10  # they really vary


def test_boxes_fall_back_to_a_centred_crop():
    # a 4 x 64 strip: no box of area >= 90% has an aspect ratio within [3/4, 4/3]
    top, left, h, w = M.sample_boxes(np.random.default_rng(0), 5, 4, 64, (0.9, 1.0))
    np.testing.assert_array_equal(h, 4)
    np.testing.assert_array_equal(w, round(4 * 4 / 3))
    np.testing.assert_array_equal(left, (64 - 5) // 2)
    np.testing.assert_array_equal(top, 0)


def test_sampled_probabilities_and_ranges():
    config = small_config(flip_p=0.5, jitter_p=1.0, jitter_strength=1.0, grayscale_p=0.0, blur_p=0.0)
    p = M.sample_crop_params(Random(1), 4000, 20, 20, 0, config)
    assert 0.45 < p.flip.mean() < 0.55
    assert not p.grayscale.any() and not p.blur.any()
    for factor in (p.brightness, p.contrast, p.saturation):
        assert factor.min() >= 0.2 and factor.max() <= 1.8
    assert np.abs(p.hue).max() <= 0.2
    none = M.sample_crop_params(Random(1), 100, 20, 20, 0, config.replace(jitter_p=0.0))
    assert np.all(none.brightness == 1.0) and np.all(none.hue == 0.0)


# -- colour and blur ---------------------------------------------------------------------
def test_colour_operations(backend):
    rng = np.random.default_rng(0)
    host = rng.uniform(0.2, 0.8, size=(3, 3, 4, 5))
    x = asarray(host, backend)
    f = asarray(np.array([0.5, 1.0, 1.5]), backend)
    luma = 0.299 * host[:, 0] + 0.587 * host[:, 1] + 0.114 * host[:, 2]

    np.testing.assert_allclose(to_numpy(M.adjust_brightness(x, f)), np.clip(host * [[[[0.5]]], [[[1.0]]], [[[1.5]]]], 0, 1))

    zero = asarray(np.zeros(3), backend)
    grey = to_numpy(M.adjust_saturation(x, zero))
    for c in range(3):
        np.testing.assert_allclose(grey[:, c], luma, atol=1e-12)

    flat = to_numpy(M.adjust_contrast(x, zero))  # contrast 0: every pixel the mean grey
    np.testing.assert_allclose(flat, np.broadcast_to(luma.mean(axis=(1, 2))[:, None, None, None], host.shape))

    np.testing.assert_allclose(to_numpy(M.adjust_hue(x, zero)), host, atol=1e-12)
    mask = asarray(np.array([1.0, 0.0, 1.0]), backend)
    masked = to_numpy(M.grayscale(x, mask))
    np.testing.assert_allclose(masked[1], host[1])
    np.testing.assert_allclose(masked[2, 0], luma[2], atol=1e-12)


def test_contrast_and_saturation_clip_to_the_unit_range(backend):
    """At factor 1.8 on images spanning [0, 1] the blends leave the range; they must be clipped
    (1-channel digits get no saturation step after contrast to hide a missing clip)."""
    rng = np.random.default_rng(1)
    host = rng.uniform(0.0, 1.0, size=(2, 3, 6, 5))
    f = np.array([1.8, 1.8])
    luma = 0.299 * host[:, 0] + 0.587 * host[:, 1] + 0.114 * host[:, 2]
    contrast = to_numpy(M.adjust_contrast(asarray(host, backend), asarray(f, backend)))
    unclipped = 1.8 * host - 0.8 * luma.mean(axis=(1, 2))[:, None, None, None]
    assert unclipped.min() < 0 and unclipped.max() > 1  # the clip has work to do
    np.testing.assert_allclose(contrast, np.clip(unclipped, 0, 1), atol=1e-12)
    saturation = to_numpy(M.adjust_saturation(asarray(host, backend), asarray(f, backend)))
    np.testing.assert_allclose(saturation, np.clip(1.8 * host - 0.8 * luma[:, None], 0, 1), atol=1e-12)
    grey = host[:, :1]
    one_channel = to_numpy(M.adjust_contrast(asarray(grey, backend), asarray(f, backend)))
    assert one_channel.min() >= 0 and one_channel.max() <= 1


def test_hue_matches_colorsys(backend):
    """Per pixel: RGB -> HSV, hue + shift (mod 1), HSV -> RGB, with the standard library."""
    import colorsys

    host = np.random.default_rng(3).uniform(size=(4, 3, 3, 5))
    host[0, :, 0, 0] = 0.4  # a grey pixel
    host[1, :, 0, 0] = (0.9, 0.9, 0.1)  # two channels tie for the maximum
    shift = np.array([0.05, -0.3, 0.5, 0.9])
    got = to_numpy(M.adjust_hue(asarray(host, backend), asarray(shift, backend)))
    expected = np.empty_like(host)
    for n in range(4):
        for i in range(3):
            for j in range(5):
                h, s, v = colorsys.rgb_to_hsv(*host[n, :, i, j])
                expected[n, :, i, j] = colorsys.hsv_to_rgb((h + shift[n]) % 1.0, s, v)
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 4.0])  # 4.0: the kernel wraps the 7-pixel image twice
def test_blur_matches_scipy(backend, sigma):
    from scipy.ndimage import gaussian_filter

    images = random_images((1, 3, 7, 7), seed=2)
    params = CropParams.identity(1, 7, 7).replace(blur=True, sigma=sigma)
    got = render_one(images, params, 7, MultiCropConfig(**PLAIN), xp=backend)[0]
    expected = gaussian_filter(images / 255.0, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_blur_only_where_asked():
    images = random_images((2, 3, 6, 6), seed=4)
    params = CropParams.identity(2, 6, 6).replace(blur=[False, True], sigma=1.5)
    got = render_one(images, params, 6, MultiCropConfig(**PLAIN))[0]
    np.testing.assert_allclose(got[0], images[0] / 255.0, atol=1e-12)
    assert not np.allclose(got[1], images[1] / 255.0)


def test_normalisation_uses_mean_and_std():
    images = random_images((1, 3, 4, 4))
    config = MultiCropConfig(**{**PLAIN, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 2.0)})
    got = render_one(images, CropParams.identity(1, 4, 4), 4, config)[0]
    expected = (images / 255.0 - np.reshape([0.1, 0.2, 0.3], (1, 3, 1, 1))) / np.reshape([0.5, 0.25, 2.0], (1, 3, 1, 1))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    back = M.denormalize(got, config)
    np.testing.assert_allclose(back, images / 255.0, atol=1e-12)


# -- the figure --------------------------------------------------------------------------
def test_show_crops_figure():
    from matplotlib.figure import Figure

    config = M.default_config("digits")
    images = random_images((6, 1, 8, 8))
    fig = M.show_crops(images, MultiCrop(config), Random(0), n_images=3)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * (1 + config.n_total_crops)
    rgb = M.show_crops(random_images((2, 3, 12, 12)), MultiCrop(small_config()), Random(0))
    assert len(rgb.axes) == 2 * 6
