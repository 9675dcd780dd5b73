"""Multi-crop augmentation, batched on the backend (so it runs on the GPU under CuPy).

SwAV compares a few large views of an image with several small ones (Caron et al. 2020,
section 3.2). Each view is a random-resized crop, maybe mirrored, colour-distorted,
maybe greyscale, maybe blurred, then normalised::

    multicrop = MultiCrop(default_config("cifar10"), xp=np)
    crops = multicrop(images_uint8, Random(0))    # 2 x (B, 3, 32, 32) then 6 x (B, 3, 16, 16)

Two halves
----------
1. **Parameters, on the host.** Every random number (crop boxes, flips, jitter factors,
   blur widths) is drawn by NumPy's PCG64 through :class:`swav_ref.backend.Random`, into a
   :class:`CropParams` of small host arrays. The same seed therefore gives the same crops
   on NumPy, CuPy and array_api_strict.
2. **Pixels, on the backend.** The parameters travel to the device in one small array
   and every pixel operation is an Array-API call: no loop over images, no gather.

Crop and resize as two matrix products
--------------------------------------
Cropping the box ``[top, top + h) x [left, left + w)`` of an image :math:`X` (H x W) and
resizing it to s x s with a separable filter is

.. math:: Y = A_y \\, X \\, A_x^\\top, \\qquad A_y \\in \\mathbb{R}^{s \\times H},
          \\; A_x \\in \\mathbb{R}^{s \\times W}

where row :math:`o` of :math:`A_y` holds the interpolation weights of output row
:math:`o` over the input rows (zero outside the box). Mirroring reverses the rows of
:math:`A_x`. A batch is two batched ``xp.matmul`` calls,
``(N, 1, s, H) @ (N, C, H, W) @ (N, 1, W, s)``; the Gaussian blur is two more products with
``(s, s)`` matrices. This costs ``O(s H W)`` per
channel instead of ``O(s^2)`` for a gather, which is nothing at CIFAR sizes and keeps
the code free of fancy indexing (which the Array API lacks).

Differences from the official torchvision pipeline (documented simplifications)
-------------------------------------------------------------------------------
- the four colour-jitter operations run in a fixed order (brightness, contrast,
  saturation, hue) rather than a random order per image;
- everything stays in floating point: the official pipeline works on PIL images, which
  round to 8-bit integers after every colour operation (and PIL's hue shift to 1/255 of a
  turn); greyscale uses the same ITU-R 601 luma weights (0.299, 0.587, 0.114) as PIL;
- the Gaussian blur (p = 0.5, sigma uniform in [0.1, 2], as the official) is a true
  Gaussian with scipy's conventions (a kernel of radius ``int(4 sigma + 0.5)``, edges
  mirrored with the edge pixel repeated). The official code's current version
  (``PILRandomGaussianBlur``) calls Pillow's ``ImageFilter.GaussianBlur(radius=sigma)``,
  which approximates the Gaussian by repeated box blurs of the 8-bit image; its first
  release called OpenCV's ``cv2.GaussianBlur`` with a fixed 23 x 23 kernel. The three
  filters differ only in the kernel's shape at the tails and at the border.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from swav_ref.backend import Random, array_namespace, asarray, to_numpy
from swav_ref.data.errors import is_integer

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CropParams",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCrop",
    "MultiCropConfig",
    "STD_MIN",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_matrix",
    "default_config",
    "denormalize",
    "grayscale",
    "render_crops",
    "resize_matrix",
    "sample_boxes",
    "sample_crop_params",
    "show_crops",
]

#: Normalisation of the official SwAV recipe (their std of red is 0.228, not 0.229).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)
#: CIFAR-10 training-set statistics (population std of the 50000 images, 0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: scikit-learn digits, all 1797 images after scaling to 0..255 (``channel_stats``).
DIGITS_MEAN = (0.3053087,)
DIGITS_STD = (0.3758859,)

#: The smallest ``std`` accepted: float32's smallest normal number, so that ``std`` and
#: ``1 / std`` are both finite and non-zero in the crops' default dtype (a smaller one gives
#: crops of inf or NaN).
STD_MIN = float(np.finfo(np.float32).tiny)

#: ITU-R 601 luma weights (torchvision's ``rgb_to_grayscale`` rounds red to 0.2989).
_LUMA = (0.299, 0.587, 0.114)


# -- configuration -----------------------------------------------------------------------
@dataclass(frozen=True)
class MultiCropConfig:
    """What views to make. The defaults are the official ImageNet recipe.

    Attributes
    ----------
    n_crops
        crops per size group, e.g. ``(2, 6)``: 2 large, 6 small.
    sizes
        output side per group, e.g. ``(224, 96)``; crops are square.
    min_scale, max_scale
        per group, the fraction of the image area a crop covers is drawn
        uniformly in ``[min_scale, max_scale]`` (torchvision's ``scale``).
    ratio
        range of the box's width / height, drawn log-uniformly.
    flip_p
        probability of a horizontal mirror.
    jitter_strength
        ``s`` in SwAV's ``get_color_distortion(s)``: brightness, contrast and
        saturation factors in ``[1 - 0.8 s, 1 + 0.8 s]``, hue shift in ``[-0.2 s, 0.2 s]``
        (fractions of a full turn). Saturation and hue are skipped for 1-channel images.
    jitter_p
        probability that an image is colour-jittered at all.
    grayscale_p
        probability of greyscale (RGB only).
    blur_p, blur_sigma
        probability of a Gaussian blur, and the range of its sigma in pixels.
    mean, std
        per-channel normalisation on the 0..1 scale, ``(x - mean) / std``; finite,
        and ``std >= STD_MIN``.

    Notes
    -----
    Counts and sizes must be integers (Python or NumPy, not ``bool``) and ranges finite:
    a bad value is refused here, naming it, not found later as NaN crops or a NumPy error.
    """

    n_crops: tuple[int, ...] = (2, 6)
    sizes: tuple[int, ...] = (224, 96)
    min_scale: tuple[float, ...] = (0.14, 0.05)
    max_scale: tuple[float, ...] = (1.0, 0.14)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        for name in ("n_crops", "sizes", "min_scale", "max_scale", "ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        groups = len(self.n_crops)
        for name in ("sizes", "min_scale", "max_scale"):
            if len(getattr(self, name)) != groups:
                raise ValueError(
                    f"MultiCropConfig: {name} has {len(getattr(self, name))} entries but n_crops "
                    f"has {groups}; give one per size group"
                )
        if groups == 0:
            raise ValueError("MultiCropConfig: n_crops is empty; give at least one size group")
        for name in ("n_crops", "sizes"):
            values = getattr(self, name)
            bad = [v for v in values if not (is_integer(v) and v >= 1)]
            if bad:
                raise ValueError(f"MultiCropConfig: {name} must be integers >= 1, got {values} ({bad[0]!r} is not)")
            object.__setattr__(self, name, tuple(int(v) for v in values))  # NumPy integers become int
        for lo, hi in zip(self.min_scale, self.max_scale):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MultiCropConfig: scale range ({lo}, {hi}) must satisfy 0 < min <= max <= 1")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1] < math.inf:
            raise ValueError(f"MultiCropConfig: ratio must be (low, high) with 0 < low <= high < inf, got {self.ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MultiCropConfig: {name}={getattr(self, name)} is not a probability")
        if not 0.0 <= self.jitter_strength <= 1.25:
            raise ValueError(
                f"MultiCropConfig: jitter_strength={self.jitter_strength} outside [0, 1.25] "
                "(1 - 0.8 s must stay >= 0)"
            )
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1] < math.inf:
            raise ValueError(
                f"MultiCropConfig: blur_sigma must be (low, high) with 0 < low <= high < inf, got {self.blur_sigma}"
            )
        if len(self.mean) != len(self.std):
            raise ValueError(f"MultiCropConfig: mean {self.mean} and std {self.std} need equal lengths")
        bad_mean = [m for m in self.mean if not math.isfinite(m)]
        if bad_mean:
            raise ValueError(f"MultiCropConfig: mean {self.mean} must be finite, got {bad_mean[0]}")
        bad_std = [s for s in self.std if not STD_MIN <= s < math.inf]  # NaN fails too
        if bad_std:
            raise ValueError(
                f"MultiCropConfig: std {self.std} must be finite and >= {STD_MIN:.3g} (so that 1 / std is finite "
                f"in float32), got {bad_std[0]}"
            )

    @property
    def n_total_crops(self) -> int:
        return sum(self.n_crops)

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        """The side of every crop, in output order (all large crops first): one entry per
        crop, ``(8, 8, 6, 6, 6, 6)``, where :class:`~swav_ref.config.TrainConfig`'s
        ``crop_sizes`` (and ``--crop-sizes``) has one per size group, ``(8, 6)``, as
        :attr:`sizes` here."""
        return tuple(s for n, s in zip(self.n_crops, self.sizes) for _ in range(n))

    def replace(self, **changes) -> MultiCropConfig:
        """A copy with some fields changed (the config is frozen)."""
        return dataclasses.replace(self, **changes)


def default_config(
    name: str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> MultiCropConfig:
    """The multi-crop recipe for a data set: ``"digits"``, ``"cifar10"``, ``"imagenet"``,
    or ``"folder"`` (needs ``image_size``, the side of the large crops).

    Choices (the official recipe is ``"imagenet"``)
    -----------------------------------------------
    digits (8x8)
        2 crops of 8 at scale (0.5, 1) and 4 of 6 at scale (0.3, 0.6). At 8x8 the official
        small-crop scale (0.05, 0.14) keeps 3 to 9 pixels, not enough to tell a digit, so
        both ranges are raised; 6 rather than 4 pixels for the small side keeps a 3x3
        convolution meaningful. No flip (handwritten digits are not mirror-symmetric, and a
        mirrored 3 is no digit), no blur (one pixel is an eighth of the image), and a
        milder jitter (s = 0.5; only brightness and contrast apply to grey images).
    cifar10 (32x32)
        the official numbers and scales, sizes 32 and 16 (the official 224:96 would give
        14; 16 halves evenly through resnet18's strides), jitter s = 0.5 and no blur, as
        SimCLR does for CIFAR: at 32
        pixels a blur of sigma up to 2 removes most of the signal.
    folder
        the official recipe with the large side ``image_size`` and the small one
        ``round(image_size * 96 / 224)``.

    ``mean``/``std`` override the normalisation (e.g. from
    :func:`swav_ref.data.datasets.channel_stats`).
    """
    if name == "digits":
        config = MultiCropConfig(
            n_crops=(2, 4), sizes=(8, 6), min_scale=(0.5, 0.3), max_scale=(1.0, 0.6),
            flip_p=0.0, jitter_strength=0.5, grayscale_p=0.0, blur_p=0.0,
            mean=DIGITS_MEAN, std=DIGITS_STD,
        )  # fmt: skip
    elif name == "cifar10":
        config = MultiCropConfig(
            n_crops=(2, 6), sizes=(32, 16), jitter_strength=0.5, blur_p=0.0,
            mean=CIFAR10_MEAN, std=CIFAR10_STD,
        )  # fmt: skip
    elif name == "imagenet":
        config = MultiCropConfig()
    elif name == "folder":
        if image_size is None or image_size < 2:
            # (the trainer refuses one-pixel images itself, with the advice that fits them)
            raise ValueError(
                f"default_config('folder') needs image_size >= 2 (the side of the large crops), got {image_size}"
            )
        config = MultiCropConfig(sizes=(image_size, max(1, round(image_size * 96 / 224))))
    else:
        raise ValueError(f"unknown multi-crop recipe {name!r}; choose digits, cifar10, imagenet or folder")
    if mean is not None or std is not None:
        config = config.replace(mean=tuple(mean or config.mean), std=tuple(std or config.std))
    return config


# -- random parameters, on the host ------------------------------------------------------
@dataclass
class CropParams:
    """The random choices for ``N`` crops, as host NumPy arrays of shape ``(N,)``.

    ``top, left, height, width`` (int64) is the box in input pixels; ``flip``,
    ``grayscale``, ``blur`` are booleans; ``brightness, contrast, saturation`` are
    multiplicative factors (1 = unchanged); ``hue`` is a shift in turns (0 = unchanged);
    ``sigma`` is the blur's standard deviation in output pixels (used where ``blur``).
    """

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    grayscale: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray

    #: the order of the columns in :meth:`packed`
    FIELDS = (
        "top", "left", "height", "width", "flip", "brightness", "contrast",
        "saturation", "hue", "grayscale", "blur", "sigma",
    )  # fmt: skip

    def __len__(self) -> int:
        return self.top.shape[0]

    @classmethod
    def identity(cls, n: int, height: int, width: int) -> CropParams:
        """``n`` crops of the whole ``height x width`` image with no augmentation at all."""
        full = lambda v, dtype: np.full(n, v, dtype=dtype)  # noqa: E731
        return cls(
            top=full(0, np.int64), left=full(0, np.int64), height=full(height, np.int64),
            width=full(width, np.int64), flip=full(False, bool), brightness=full(1.0, float),
            contrast=full(1.0, float), saturation=full(1.0, float), hue=full(0.0, float),
            grayscale=full(False, bool), blur=full(False, bool), sigma=full(1.0, float),
        )  # fmt: skip

    def replace(self, **changes) -> CropParams:
        """A copy with some fields changed; scalars are broadcast to ``(N,)``."""
        n = len(self)
        changes = {k: np.broadcast_to(np.asarray(v), (n,)).copy() for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def packed(self) -> np.ndarray:
        """All fields as one float64 host array ``(N, 12)``: a single host-to-device copy."""
        return np.stack([np.asarray(getattr(self, f), dtype=np.float64) for f in self.FIELDS], axis=1)


def sample_boxes(
    gen: np.random.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random-resized-crop boxes ``(top, left, h, w)``, each an int64 array ``(n,)``.

    The rule of torchvision's ``RandomResizedCrop``, vectorised over ``n`` crops: up to
    ``attempts`` tries draw an area fraction uniformly in ``scale`` and an aspect ratio
    ``w / h`` log-uniformly in ``ratio``, round to whole pixels, and keep the first box
    that fits the image; its position is uniform over the places it fits. A crop whose
    tries all fail falls back to the largest centred box whose ratio lies in ``ratio``.
    (All tries are drawn at once, so the stream of random numbers differs from
    torchvision's; the distribution of boxes is the same.)
    """
    area = height * width
    target = area * gen.uniform(scale[0], scale[1], size=(n, attempts))
    aspect = np.exp(gen.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    w_try = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h_try = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w_try >= 1) & (w_try <= width) & (h_try >= 1) & (h_try <= height)
    rows = np.arange(n)
    first = np.argmax(fits, axis=1)  # index of the first fitting try (0 if none fits)
    found = fits[rows, first]
    h = np.where(found, h_try[rows, first], 0)
    w = np.where(found, w_try[rows, first], 0)
    position = gen.uniform(size=(n, 2))

    # fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred
    image_ratio = width / height
    if image_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    h = np.where(found, h, fallback_h)
    w = np.where(found, w, fallback_w)
    top = np.where(found, np.floor(position[:, 0] * (height - h + 1)), (height - h) // 2).astype(np.int64)
    left = np.where(found, np.floor(position[:, 1] * (width - w + 1)), (width - w) // 2).astype(np.int64)
    return top, left, h, w


def sample_crop_params(
    rng: Random | np.random.Generator,
    n: int,
    height: int,
    width: int,
    group: int,
    config: MultiCropConfig,
    n_channels: int = 3,
) -> CropParams:
    """Draw the random choices for ``n`` crops of size group ``group``, on the host.

    Order of the draws (fixed, so that a seed is reproducible): boxes, flips, the jitter
    coin, the four jitter factors, the greyscale coin, the blur coin, the blur sigma.
    For 1-channel images saturation, hue and greyscale are set to no-ops.
    """
    gen = rng.host() if isinstance(rng, Random) else rng
    if not isinstance(gen, np.random.Generator):
        raise TypeError(f"rng must be swav_ref.backend.Random or numpy.random.Generator, got {type(rng).__name__}")
    top, left, h, w = sample_boxes(
        gen, n, height, width, (config.min_scale[group], config.max_scale[group]), config.ratio
    )
    flip = gen.uniform(size=n) < config.flip_p
    jitter = gen.uniform(size=n) < config.jitter_p
    s = config.jitter_strength
    spread = (0.8 * s, 0.8 * s, 0.8 * s)
    brightness, contrast, saturation = (
        np.where(jitter, gen.uniform(1.0 - d, 1.0 + d, size=n), 1.0) for d in spread
    )
    hue = np.where(jitter, gen.uniform(-0.2 * s, 0.2 * s, size=n), 0.0)
    gray = gen.uniform(size=n) < config.grayscale_p
    blur = gen.uniform(size=n) < config.blur_p
    sigma = gen.uniform(config.blur_sigma[0], config.blur_sigma[1], size=n)
    if n_channels == 1:
        saturation = np.ones(n)
        hue = np.zeros(n)
        gray = np.zeros(n, dtype=bool)
    return CropParams(top, left, h, w, flip, brightness, contrast, saturation, hue, gray, blur, sigma)


# -- pixel operations, on the backend ----------------------------------------------------
def resize_matrix(start: Any, length: Any, in_size: int, out_size: int, flip: Any = None) -> Any:
    r"""Interpolation weights ``(N, out_size, in_size)`` that crop and resize one axis.

    Parameters
    ----------
    start, length : float arrays (N,) on the backend
        the box ``[start, start + length)`` in input pixels.
    in_size : int
        the length of the axis in the input, in pixels.
    out_size : int
        the length of the axis in the output, in pixels.
    flip : float array (N,) of 0/1, or None
        1 mirrors the output.

    Notes
    -----
    Pixel :math:`i` covers :math:`[i, i+1)`, so its centre is :math:`i + \tfrac12`. With
    :math:`r = \text{length} / \text{out\_size}`, output pixel :math:`o` is centred at
    :math:`c_o = \text{start} + (o + \tfrac12)\,r`, and its weights are a triangle

    .. math:: w_{oi} \propto \max\!\Bigl(0,\; 1 - \frac{|i + \tfrac12 - c_o|}{\max(r, 1)}\Bigr),
              \qquad \text{start} \le i < \text{start} + \text{length}

    normalised so each row sums to 1. Enlarging (:math:`r \le 1`) this is bilinear
    interpolation (PyTorch's ``align_corners=False``); shrinking, the triangle widens to
    :math:`r` pixels and averages what it spans, which is Pillow's antialiased bilinear
    filter. Pixels outside the box get no weight (crop first, then resize). A mirrored
    output uses :math:`o' = \text{out\_size} - 1 - o` in place of :math:`o`.
    """
    xp = array_namespace(start, length, flip)
    dtype = start.dtype
    start = xp.reshape(start, (-1, 1, 1))
    length = xp.reshape(length, (-1, 1, 1))
    out_pos = xp.reshape(xp.arange(out_size, dtype=dtype), (1, -1, 1))
    if flip is not None:
        out_pos = out_pos + xp.reshape(flip, (-1, 1, 1)) * (out_size - 1 - 2 * out_pos)
    ratio = length / out_size
    centre = start + (out_pos + 0.5) * ratio
    in_centre = xp.reshape(xp.arange(in_size, dtype=dtype), (1, 1, -1)) + 0.5
    weights = xp.maximum(1.0 - xp.abs(in_centre - centre) / xp.maximum(ratio, 1.0), 0.0)
    inside = (in_centre > start) & (in_centre < start + length)
    weights = weights * xp.astype(inside, dtype)
    return weights / xp.sum(weights, axis=2, keepdims=True)


def blur_matrix(sigma: Any, size: int, max_sigma: float) -> Any:
    r"""Gaussian blur weights ``(N, size, size)`` along one axis, mirrored edges.

    Parameters
    ----------
    sigma
        float array (N,) on the backend, > 0, in pixels.
    size
        the side of the images to blur.
    max_sigma
        a host number >= every ``sigma``. It only decides how many mirror images of
        the kernel to sum (a kernel wider than the image folds over more than once), and is
        passed in because reading it off ``sigma`` would be a device-to-host sync.

    Notes
    -----
    The kernel is :math:`g(d) = e^{-d^2 / 2\sigma^2}` for :math:`|d| \le R`,
    :math:`R = \lfloor 4\sigma + \tfrac12 \rfloor`, normalised to sum 1 (scipy's
    ``gaussian_filter1d`` with ``mode="reflect"``). Edges are mirrored
    (``d c b a | a b c d | d c b a``): a position :math:`p` outside the image reads input
    :math:`i` when :math:`p \equiv i` or :math:`p \equiv -1 - i \pmod{2\,\text{size}}`, so

    .. math:: B_{oi} = \sum_{m} g(o - i - 2 m\,\text{size}) + g(o + 1 + i - 2 m\,\text{size})

    over the few integers :math:`m` whose terms fall inside the kernel.
    """
    xp = array_namespace(sigma)
    dtype = sigma.dtype
    max_radius = math.floor(4.0 * max_sigma + 0.5)
    n_images = math.ceil((max_radius + size) / (2 * size)) + 1
    sigma = xp.reshape(sigma, (-1, 1, 1))
    radius = xp.floor(4.0 * sigma + 0.5)
    out_pos = xp.reshape(xp.arange(size, dtype=dtype), (1, -1, 1))
    in_pos = xp.reshape(xp.arange(size, dtype=dtype), (1, 1, -1))
    weights = xp.zeros((sigma.shape[0], size, size), dtype=dtype)
    for m in range(-n_images, n_images + 1):
        for source in (in_pos + 2 * m * size, -1.0 - in_pos + 2 * m * size):
            d = out_pos - source
            in_kernel = xp.astype(xp.abs(d) <= radius, dtype)
            weights = weights + in_kernel * xp.exp(-(d * d) / (2.0 * sigma * sigma))
    return weights / xp.sum(weights, axis=2, keepdims=True)


def _luma(x: Any) -> Any:
    """Grey level ``(N, 1, h, w)`` of ``x`` (N, C, h, w): the luma of RGB, or the single channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = _LUMA
    return r * x[:, 0:1, ...] + g * x[:, 1:2, ...] + b * x[:, 2:3, ...]


def _per_image(factor: Any) -> Any:
    xp = array_namespace(factor)
    return xp.reshape(factor, (-1, 1, 1, 1))


def adjust_brightness(x: Any, factor: Any) -> Any:
    r"""``clip(f x, 0, 1)`` per image; ``x`` (N, C, h, w) in [0, 1], ``factor`` (N,)."""
    xp = array_namespace(x, factor)
    return xp.clip(_per_image(factor) * x, 0.0, 1.0)


def adjust_contrast(x: Any, factor: Any) -> Any:
    r"""Blend each image with its mean grey level.

    Notes
    -----
    .. math:: x' = \operatorname{clip}(f x + (1 - f)\,\bar y, 0, 1)

    with :math:`\bar y` the mean luma of the image (torchvision's ``adjust_contrast``).
    """
    xp = array_namespace(x, factor)
    f = _per_image(factor)
    mean_grey = xp.mean(_luma(x), axis=(1, 2, 3), keepdims=True)
    return xp.clip(f * x + (1.0 - f) * mean_grey, 0.0, 1.0)


def adjust_saturation(x: Any, factor: Any) -> Any:
    r"""Blend each RGB image with its greyscale version: :math:`\operatorname{clip}(f x + (1-f) y, 0, 1)`,
    :math:`y` the luma; factor 0 gives grey, 1 the image. 1-channel images are returned as they are."""
    xp = array_namespace(x, factor)
    if x.shape[1] == 1:
        return x
    f = _per_image(factor)
    return xp.clip(f * x + (1.0 - f) * _luma(x), 0.0, 1.0)


def adjust_hue(x: Any, shift: Any) -> Any:
    r"""Turn the hue of RGB images by ``shift`` (N,) turns, keeping saturation and value.

    Notes
    -----
    The HSV hexcone, written with array operations instead of per-pixel branches. With
    :math:`V = \max(r, g, b)` and chroma :math:`C = V - \min(r, g, b)`, the hue in sixths
    of a turn is

    .. math:: h = \begin{cases} (g - b)/C \bmod 6 & V = r \\
                                (b - r)/C + 2     & V = g \\
                                (r - g)/C + 4     & V = b \end{cases}

    It is moved to :math:`h' = (h + 6\,\text{shift}) \bmod 6`, and converted back with

    .. math:: f(n) &= V - C \,\operatorname{clip}(\min(k, 4 - k), 0, 1), \qquad
              k = (n + h') \bmod 6, \\
              (r', g', b') &= (f(5), f(3), f(1))

    Grey pixels (:math:`C = 0`) stay as they are whatever :math:`h`. This is what
    torchvision's ``adjust_hue`` computes; 1-channel images are returned as they are.
    """
    xp = array_namespace(x, shift)
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1, ...], x[:, 1:2, ...], x[:, 2:3, ...]
    value = xp.maximum(xp.maximum(r, g), b)
    chroma = value - xp.minimum(xp.minimum(r, g), b)
    safe_chroma = xp.where(chroma > 0, chroma, xp.ones_like(chroma))  # grey: any hue will do
    hue = xp.where(
        value == r,
        (g - b) / safe_chroma,
        xp.where(value == g, (b - r) / safe_chroma + 2.0, (r - g) / safe_chroma + 4.0),
    )
    hue = xp.remainder(hue + 6.0 * _per_image(shift), 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = xp.remainder(n + hue, 6.0)
        channels.append(value - chroma * xp.clip(xp.minimum(k, 4.0 - k), 0.0, 1.0))
    return xp.concat(channels, axis=1)


def grayscale(x: Any, mask: Any) -> Any:
    """Replace the images where ``mask`` (N,) is 1 by their luma in every channel."""
    if x.shape[1] == 1:
        return x
    m = _per_image(mask)
    return m * _luma(x) + (1.0 - m) * x


def render_crops(x: Any, params: CropParams, size: int, config: MultiCropConfig) -> Any:
    """Render ``len(params) = n * B`` crops of the batch ``x``, normalised.

    Parameters
    ----------
    x : float (B, C, H, W) on the backend
        values in [0, 1].
    params
        the random choices; crop ``k * B + b`` is the ``k``-th view of image ``b``.
    size
        output side ``s``.
    config : MultiCropConfig
        supplies the normalisation ``mean`` and ``std`` (one per channel of ``x``).

    Returns
    -------
    float array (n, B, C, s, s)
        crop, flip, colour jitter, greyscale, blur, normalise, in that order (the official
        order).
    """
    xp = array_namespace(x)
    batch, channels, height, width = x.shape
    n_views, rest = divmod(len(params), batch)
    if rest or n_views == 0:
        raise ValueError(f"render_crops: {len(params)} crop parameters are not a multiple of the batch {batch}")
    if len(config.mean) != channels:
        raise ValueError(f"normalisation mean/std have {len(config.mean)} channels, images have {channels}")
    p = xp.asarray(params.packed(), dtype=x.dtype)  # one host-to-device copy per size group
    col = {name: p[:, j] for j, name in enumerate(CropParams.FIELDS)}

    # crop + resize + flip: (n, B, 1, s, H) @ (1, B, C, H, W) @ (n, B, 1, W, s)
    rows = resize_matrix(col["top"], col["height"], height, size)
    cols = resize_matrix(col["left"], col["width"], width, size, flip=col["flip"])
    rows = xp.reshape(rows, (n_views, batch, 1, size, height))
    cols_t = xp.reshape(xp.permute_dims(cols, (0, 2, 1)), (n_views, batch, 1, width, size))
    out = xp.matmul(xp.matmul(rows, xp.reshape(x, (1, batch, channels, height, width))), cols_t)
    out = xp.reshape(out, (n_views * batch, channels, size, size))

    # the decisions are host arrays: skipping an unused operation costs no device sync
    if np.any(params.brightness != 1.0) or np.any(params.contrast != 1.0):
        out = adjust_contrast(adjust_brightness(out, col["brightness"]), col["contrast"])
    if channels == 3 and (np.any(params.saturation != 1.0) or np.any(params.hue != 0.0)):
        out = adjust_hue(adjust_saturation(out, col["saturation"]), col["hue"])
    if channels == 3 and np.any(params.grayscale):
        out = grayscale(out, col["grayscale"])
    if np.any(params.blur):
        kernel = blur_matrix(col["sigma"], size, max_sigma=float(np.max(params.sigma)))
        blur = xp.reshape(col["blur"], (-1, 1, 1))
        kernel = blur * kernel + (1.0 - blur) * xp.eye(size, dtype=x.dtype)  # identity where not blurred
        kernel = xp.reshape(kernel, (n_views * batch, 1, size, size))
        out = xp.matmul(xp.matmul(kernel, out), xp.permute_dims(kernel, (0, 1, 3, 2)))

    mean = xp.reshape(xp.asarray(config.mean, dtype=x.dtype), (1, channels, 1, 1))
    std = xp.reshape(xp.asarray(config.std, dtype=x.dtype), (1, channels, 1, 1))
    out = (out - mean) / std
    return xp.reshape(out, (n_views, batch, channels, size, size))


def denormalize(crop: Any, config: MultiCropConfig) -> np.ndarray:
    """Undo the normalisation of a crop ``(B, C, s, s)``: a host array clipped to [0, 1],
    for display."""
    host = to_numpy(crop).astype(np.float64)
    channels = host.shape[1]
    mean = np.asarray(config.mean).reshape(1, channels, 1, 1)
    std = np.asarray(config.std).reshape(1, channels, 1, 1)
    return np.clip(host * std + mean, 0.0, 1.0)


class MultiCrop:
    """``crops = MultiCrop(config, xp)(images_uint8, rng)``: the SwAV views of a batch.

    Parameters
    ----------
    config : MultiCropConfig
    xp
        the backend namespace the crops are made on (numpy, cupy, array_api_strict).
    dtype
        float dtype of the crops (name or ``xp`` dtype), default float32.

    Notes
    -----
    Calling it with ``images`` uint8 ``(B, C, H, W)`` (host NumPy or already on ``xp``) and
    ``rng`` (:class:`swav_ref.backend.Random` or a NumPy Generator) returns a list of
    ``config.n_total_crops`` arrays ``(B, C, s, s)`` on ``xp``: all large crops first,
    then the small ones (the official order, which the loss relies on: the assignment
    crops are the first ones).
    """

    def __init__(self, config: MultiCropConfig, xp: types.ModuleType = np, dtype: Any = "float32"):
        self.config = config
        self.xp = xp
        self.dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype

    def sample(self, rng: Random | np.random.Generator, batch: int, height: int, width: int, n_channels: int):
        """The host-side random choices: one :class:`CropParams` of ``n * batch`` per size group."""
        return [
            sample_crop_params(rng, n * batch, height, width, group, self.config, n_channels)
            for group, n in enumerate(self.config.n_crops)
        ]

    def render(self, images: Any, params: list[CropParams]) -> list[Any]:
        """The crops for given random choices (see :meth:`sample`)."""
        xp = self.xp
        if isinstance(images, np.ndarray) and images.dtype != np.uint8:
            raise ValueError(f"MultiCrop expects uint8 images (0..255), got dtype {images.dtype}")
        x = asarray(images, xp)
        if x.dtype != xp.uint8:
            raise ValueError(f"MultiCrop expects uint8 images (0..255), got dtype {x.dtype}")
        x = xp.astype(x, self.dtype) / 255.0  # bytes travel, floats are made on the device
        crops = []
        for size, group_params in zip(self.config.sizes, params):
            views = render_crops(x, group_params, size, self.config)
            crops += [views[k, ...] for k in range(views.shape[0])]
        return crops

    def __call__(self, images: Any, rng: Random | np.random.Generator) -> list[Any]:
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[0] == 0:
            raise ValueError(f"MultiCrop expects a non-empty batch (B, C, H, W), got shape {shape}")
        batch, channels, height, width = shape
        if channels != len(self.config.mean):
            raise ValueError(
                f"images have {channels} channels but the normalisation has {len(self.config.mean)} "
                f"(mean={self.config.mean}); use a config made for this data set"
            )
        return self.render(images, self.sample(rng, batch, height, width, channels))


def show_crops(images: Any, multicrop: MultiCrop, rng: Random | np.random.Generator, n_images: int = 4):
    """A figure: one row per image, the original then its crops (large crops first).

    Built with :class:`matplotlib.figure.Figure`, so no GUI backend is needed; in a notebook
    the returned figure displays itself. Crops are de-normalised for display.
    """
    from matplotlib.figure import Figure

    images = images[:n_images]
    crops = [denormalize(c, multicrop.config) for c in multicrop(images, rng)]
    originals = to_numpy(images).astype(np.float64) / 255.0
    n_rows, n_cols = originals.shape[0], 1 + len(crops)
    fig = Figure(figsize=(1.2 * n_cols, 1.2 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    sizes = multicrop.config.crop_sizes
    for row in range(n_rows):
        for col in range(n_cols):
            picture = originals[row] if col == 0 else crops[col - 1][row]
            ax = axes[row, col]
            if picture.shape[0] == 1:
                ax.imshow(picture[0], cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(np.transpose(picture, (1, 2, 0)))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("image" if col == 0 else f"{sizes[col - 1]}px", fontsize=8)
    fig.suptitle(f"{multicrop.config.n_total_crops} crops per image (large first)", fontsize=9)
    return fig
