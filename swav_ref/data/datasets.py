"""Image datasets: scikit-learn's digits, CIFAR-10 (binary version) and image folders.

Every loader returns :class:`ImageDataset` objects that hold the whole set on the host as
``uint8`` images ``(N, C, H, W)``. Images stay ``uint8`` on the host until a batch is
moved to the backend, where :mod:`swav_ref.data.multicrop` turns them into float crops:
moving bytes is four times cheaper than moving float32.

Loaders
-------
``load_digits_dataset()``
    the 1797 8x8 digits that ship with scikit-learn (nothing to download).
``load_cifar10(data_dir)``
    CIFAR-10's *binary* version, read with NumPy alone (no pickle).
``load_image_folder(data_dir, image_size=None, image_fit="stretch")``
    a folder of images, one sub-folder per class or flat without labels, read with Pillow,
    each resized to ``image_size`` when given: stretched, or cropped to its shape.
``load_dataset(name, data_dir=None)``
    the three above by name, returning ``(train, test)``.

Bad data raise :class:`DatasetError` (a ``ValueError``) naming the file and what is wrong
with it, so that a broken download fails at load time with a message a user can act on,
rather than as a shape error deep inside training.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swav_ref.data.errors import DatasetError, is_integer
from swav_ref.data.image_files import (
    FILE,
    IMAGE_EXTENSIONS,
    IMAGE_FITS,
    check_header,
    find_images,
    folder_id,
    is_folder,
    open_regular_file,
    path_kind,
    pick_images,
    read_pixels,
    unreadable_images_error,
    visible_entries,
    warn_skipped,
)

__all__ = [
    "ARRAYS",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DatasetError",
    "FOLDER_DECODER",
    "IMAGE_EXTENSIONS",
    "IMAGE_FITS",
    "ImageDataset",
    "channel_stats",
    "load_cifar10",
    "load_dataset",
    "load_digits_dataset",
    "load_image_folder",
    "split_dataset",
]

#: The CIFAR-10 class names in label order (used when ``batches.meta.txt`` is absent).
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


_CIFAR_SIDE = 32
_CIFAR_RECORD = 1 + 3 * _CIFAR_SIDE * _CIFAR_SIDE  # one label byte + 3072 pixel bytes
_CIFAR_RECORDS_PER_FILE = 10000  # in every file of the real data set
_CIFAR_FOLDER = "cifar-10-batches-bin"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch.bin"
_CIFAR_META_FILE = "batches.meta.txt"
#: The largest batch file read: every real one is exactly 10000 records; a larger one is not
#: CIFAR-10 (and a sparse 10 GB file would otherwise be read into memory whole).
_CIFAR_MAX_FILE_BYTES = 10000 * _CIFAR_RECORD
#: The largest ``batches.meta.txt`` read; the real one is 61 bytes (ten names).
_CIFAR_MAX_META_BYTES = 64 * 1024


@dataclass
class ImageDataset:
    """A labelled (or unlabelled) set of images held on the host.

    Attributes
    ----------
    images : numpy.ndarray, uint8, (N, C, H, W)
        pixel values 0..255, channels first (PyTorch's layout).
    labels : numpy.ndarray, int64, (N,), or None
        class indices into ``class_names``; ``None`` for unlabelled data. Given as integers,
        or as floats holding whole numbers (``1.0`` is class 1, as ``np.loadtxt`` or a
        pandas column gives them); any other float (``1.7``, NaN) is refused, not truncated.
    class_names : tuple of str
        empty for unlabelled data; for labels given without names, ``"0"``, ``"1"``, ...
        up to the largest label.
    name : str
        a short description for logs and plots, e.g. ``"digits/train"``.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = field(default_factory=tuple)
    name: str = "images"

    def __post_init__(self):
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: the images must be a uint8 NumPy array, got "
                f"{type(self.images).__name__} of dtype {getattr(self.images, 'dtype', None)}"
            )
        if self.images.ndim != 4:
            hint = "; for one channel, add its axis: images[:, None]" if self.images.ndim == 3 else ""
            raise ValueError(f"{self.name}: the images must be (N, C, H, W), got shape {self.images.shape}{hint}")
        if self.images.shape[1] > 4 and self.images.shape[-1] in (1, 3, 4):
            raise ValueError(
                f"{self.name}: images of shape {self.images.shape} look channels-last (N, H, W, C); "
                "ImageDataset takes channels first (N, C, H, W): pass "
                "np.ascontiguousarray(images.transpose(0, 3, 1, 2))"
            )
        self.class_names = tuple(self.class_names)
        if self.labels is not None:
            self.labels = _integer_labels(self.labels, self.name)
            if self.labels.shape != (self.images.shape[0],):
                raise ValueError(
                    f"{self.name}: labels of shape {self.labels.shape} do not match "
                    f"{self.images.shape[0]} images"
                )
            if not self.class_names and self.labels.size:  # default names "0", "1", ...
                self.class_names = tuple(str(i) for i in range(max(int(self.labels.max()) + 1, 0)))
            n_classes = len(self.class_names)
            if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= n_classes):
                raise ValueError(
                    f"{self.name}: labels span {self.labels.min()}..{self.labels.max()}, "
                    f"outside 0..{n_classes - 1} ({n_classes} class names)"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        # The dataclass's own would print every pixel.
        n, c, h, w = self.images.shape
        labels = f"{len(self.class_names)} classes" if self.labels is not None else "unlabelled"
        return f"ImageDataset({self.name!r}: {n} images of {c}x{h}x{w} uint8, {labels})"

    @property
    def n_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.images.shape[2], self.images.shape[3]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def subset(self, indices: np.ndarray, name: str | None = None) -> ImageDataset:
        """The images (and labels) at ``indices``, as a new data set (copies)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names,
            name=name or self.name,
        )


def _integer_labels(labels, name: str) -> np.ndarray:
    """``labels`` as int64, refusing what a cast would change: a cast truncates ``1.7`` to 1
    and turns NaN into -2**63 without a word."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        # whole numbers within int64's range; NaN and inf fail both tests
        whole = (labels == np.round(labels)) & (np.abs(labels) < 2.0**63)
        if not whole.all():
            index = int(np.flatnonzero(~whole.ravel())[0])
            raise ValueError(
                f"{name}: label {labels.ravel()[index]} (at index {index}) is not a whole number; labels are "
                "class indices 0, 1, ..."
            )
    elif labels.dtype.kind not in "biu":
        raise ValueError(f"{name}: labels must be integers (class indices), got dtype {labels.dtype}")
    return labels.astype(np.int64)


# -- splits and statistics --------------------------------------------------------------
def split_dataset(
    dataset: ImageDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Split into ``(train, test)``, stratified by label when labels exist.

    The split is a pure function of ``(labels, test_fraction, seed)``:

    1. one NumPy ``PCG64`` generator is seeded with ``seed``;
    2. labelled data: for each class in increasing label order, the indices of that class
       (in data order) are permuted with that generator and the first
       ``round(test_fraction * n_class)`` go to the test set (at least one image of a
       class stays in training). Unlabelled data: one permutation of all indices, the
       first ``round(test_fraction * N)`` (at least 1, at most N - 1) go to the test set;
    3. both index sets are sorted, so the images keep their original order.

    So every class keeps its proportion up to rounding, and the same seed gives the same
    split on every machine (PCG64's stream is fixed by NumPy's compatibility policy).

    Raises
    ------
    ValueError
        ``test_fraction`` outside ``(0, 1)`` (a mistake in the calling code).
    DatasetError
        fewer than 2 images (a property of the data, so the command line reports it like any
        other bad data set; :class:`DatasetError` is a ``ValueError`` too).
    """
    train_idx, test_idx = _split_indices(dataset.labels, len(dataset), test_fraction, seed, dataset.name)
    train = dataset.subset(train_idx, name=f"{dataset.name}/train")
    test = dataset.subset(test_idx, name=f"{dataset.name}/test")
    return train, test


def _split_indices(
    labels: np.ndarray | None, n: int, test_fraction: float, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted ``(train, test)`` indices of :func:`split_dataset`'s rule for ``n`` images
    with these labels: a function of the labels alone, so that an image folder can be split
    from its file list, before any image is read."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if n < 2:
        raise DatasetError(
            f"{name}: cannot split {n} image(s) into train and test; the data set needs at least 2 images"
        )
    gen = np.random.Generator(np.random.PCG64(seed))
    if labels is None:
        order = gen.permutation(n)
        n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
        test_idx = order[:n_test]
    else:
        parts = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            n_test = min(int(round(test_fraction * members.size)), members.size - 1)
            parts.append(gen.permutation(members)[:n_test])
        test_idx = np.concatenate(parts)
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    r"""Per-channel mean and standard deviation of ``uint8`` images, on the 0..1 scale.

    Parameters
    ----------
    images : uint8 (N, C, H, W)
    chunk
        images summed at a time (bounds the int64 temporary to ``chunk * C * H * W``).

    Returns
    -------
    mean, std : tuples of C floats
        for :class:`~swav_ref.data.multicrop.MultiCropConfig`.

    Notes
    -----
    With :math:`S_c = \sum x` and :math:`Q_c = \sum x^2` over the :math:`n` pixels of
    channel :math:`c` (values 0..255),

    .. math:: \mu_c = \frac{S_c}{255\,n}, \qquad
              \sigma_c = \frac{\sqrt{n Q_c - S_c^2}}{255\,n}

    (the population standard deviation, ddof = 0). The sums are exact integers, so the
    usual cancellation in :math:`nQ - S^2` cannot happen.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"channel_stats needs non-empty uint8 images (N, C, H, W), got dtype {images.dtype} "
            f"and shape {images.shape}"
        )
    n_channels = images.shape[1]
    sums = [0] * n_channels
    squares = [0] * n_channels
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].astype(np.int64)
        block_sums = block.sum(axis=(0, 2, 3))
        block_squares = (block * block).sum(axis=(0, 2, 3))
        for c in range(n_channels):
            sums[c] += int(block_sums[c])
            squares[c] += int(block_squares[c])
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = tuple(s / (255.0 * n) for s in sums)
    std = tuple(float(np.sqrt(n * q - s * s)) / (255.0 * n) for s, q in zip(sums, squares))
    return mean, std


# -- digits ------------------------------------------------------------------------------
def load_digits_dataset() -> ImageDataset:
    """scikit-learn's 1797 handwritten digits as ``uint8`` images ``(1797, 1, 8, 8)``.

    The originals count ink in 4x4 blocks, 0..16; they are mapped to 0..255 by
    ``round(v * 255 / 16)``, so 16 becomes 255 and the scale matches every other data set.
    The data ship inside scikit-learn: nothing is downloaded. Split with
    :func:`split_dataset` (or use ``load_dataset("digits")``).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return ImageDataset(
        images=images,
        labels=bunch.target.astype(np.int64),
        class_names=tuple(str(int(t)) for t in bunch.target_names),
        name="digits",
    )


# -- CIFAR-10 (binary version) -----------------------------------------------------------
def _cifar_folder(data_dir: str | os.PathLike) -> Path:
    """The ``cifar-10-batches-bin`` folder, given it or the folder that contains it."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 folder not found: {root} does not exist or is not a folder")
    if (root / _CIFAR_FOLDER).is_dir():
        return root / _CIFAR_FOLDER
    if any((root / f).exists() for f in (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE)):
        return root
    raise DatasetError(
        f"{root} holds neither a {_CIFAR_FOLDER!r} folder nor the CIFAR-10 binary files "
        f"({_CIFAR_TRAIN_FILES[0]}, ..., {_CIFAR_TEST_FILE}); download the *binary* version "
        "(cifar-10-binary.tar.gz) and extract it there"
    )


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` int64 of one CIFAR-10 ``.bin``.

    Each record is one label byte followed by the 1024 red, 1024 green and 1024 blue
    values of a 32x32 image, rows first: exactly our ``(C, H, W)`` layout.
    """
    with open_regular_file(path, "CIFAR-10 file") as file:  # not a folder, a named pipe, a device
        size = os.fstat(file.fileno()).st_size
        if size > _CIFAR_MAX_FILE_BYTES:
            raise DatasetError(
                f"CIFAR-10 file {path} is {size} bytes, more than the {_CIFAR_MAX_FILE_BYTES} bytes "
                f"({_CIFAR_RECORDS_PER_FILE} records of {_CIFAR_RECORD}) of every real batch file: "
                "it is not a CIFAR-10 binary batch"
            )
        if size == 0 or size % _CIFAR_RECORD:
            raise DatasetError(
                f"CIFAR-10 file {path} is truncated or not a CIFAR-10 binary batch: its size "
                f"{size} bytes is not a positive multiple of the {_CIFAR_RECORD}-byte record"
            )
        records = np.fromfile(file, dtype=np.uint8, count=size)  # no more than was checked
    if records.size != size:
        raise DatasetError(f"CIFAR-10 file {path} changed while it was read ({records.size} of {size} bytes)")
    records = records.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(
            f"CIFAR-10 file {path}: record {bad[0]} has label {labels[bad[0]]}, outside 0..9 "
            f"({bad.size} bad records); the file is corrupt or not CIFAR-10"
        )
    images = records[:, 1:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    return np.ascontiguousarray(images), labels


def _warn_if_not_full(path: Path, n_records: int) -> None:
    """Warn (pointing at the caller of :func:`load_cifar10`) when a file is not 10000 records."""
    if n_records != _CIFAR_RECORDS_PER_FILE:
        warnings.warn(
            f"CIFAR-10 file {path} holds {n_records} records, but every file of the real data set "
            f"holds {_CIFAR_RECORDS_PER_FILE}; it may be truncated at a record boundary",
            UserWarning,
            stacklevel=3,
        )


def _read_cifar_classes(folder: Path) -> tuple[str, ...]:
    meta = folder / _CIFAR_META_FILE
    if path_kind(meta) != FILE:  # absent, or a folder, named pipe, ...: never opened
        return CIFAR10_CLASSES  # the names are fixed; the file only restates them
    with open_regular_file(meta, "CIFAR-10 class-name file") as file:
        size = os.fstat(file.fileno()).st_size
        if size > _CIFAR_MAX_META_BYTES:
            raise DatasetError(
                f"CIFAR-10 class-name file {meta} is {size} bytes, more than the {_CIFAR_MAX_META_BYTES} "
                "read: it cannot be a list of ten names; restore it or delete it (the names are built in)"
            )
        data = file.read(_CIFAR_MAX_META_BYTES + 1)
    if len(data) > _CIFAR_MAX_META_BYTES:
        raise DatasetError(f"CIFAR-10 class-name file {meta} grew past {_CIFAR_MAX_META_BYTES} bytes while read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"CIFAR-10 class-name file {meta} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "the file is corrupt: restore it or delete it (the names are fixed and built in)"
        ) from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 10:
        raise DatasetError(f"CIFAR-10 class-name file {meta} lists {len(names)} names, expected 10")
    return names


def load_cifar10(data_dir: str | os.PathLike) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 from its binary version: ``(train, test)`` of 50000 and 10000 images.

    Parameters
    ----------
    data_dir
        the ``cifar-10-batches-bin`` folder or the folder containing it. It must hold
        ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``;
        ``batches.meta.txt`` (class names) is read when present.

    Raises
    ------
    DatasetError
        missing folder or file, a path that is not a regular file (a folder, a named pipe,
        a device), a file whose size is not a multiple of 3073 bytes or is over 10000
        records, a ``batches.meta.txt`` over 64 KiB, a label outside 0..9; the message names
        the file.

    Warns
    -----
    UserWarning
        for each file that does not hold exactly 10000 records, as every real one does: a
        file cut at a record boundary has a valid size but lost images. (A warning, not an
        error, so that small hand-made files in the CIFAR-10 format still load.)

    Notes
    -----
    Read with ``np.fromfile``: the Python version of CIFAR-10 is a pickle, and unpickling a
    downloaded file can run arbitrary code, so it is not supported.
    """
    folder = _cifar_folder(data_dir)
    classes = _read_cifar_classes(folder)
    names = (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE)
    parts = [_read_cifar_file(folder / name) for name in names]
    for name, (_, labels) in zip(names, parts):
        _warn_if_not_full(folder / name, labels.size)
    *train_parts, (test_images, test_labels) = parts
    train = ImageDataset(
        images=np.concatenate([p[0] for p in train_parts]),
        labels=np.concatenate([p[1] for p in train_parts]),
        class_names=classes,
        name="cifar10/train",
    )
    test = ImageDataset(images=test_images, labels=test_labels, class_names=classes, name="cifar10/test")
    return train, test


# -- image folders -----------------------------------------------------------------------
def _size_pair(image_size) -> tuple[int, int] | None:
    """``image_size`` (``None``, an integer or ``(height, width)``) as ``(height, width)``."""
    if image_size is None:
        return None
    pair = (image_size, image_size) if is_integer(image_size) else image_size
    try:
        height, width = pair
    except (TypeError, ValueError):  # not a pair: a float, a string of another length, ...
        height = width = None
    if not (is_integer(height) and is_integer(width) and height >= 1 and width >= 1):
        raise ValueError(
            f"image_size must be a positive integer or a pair (height, width) of them, got {image_size!r}"
        )
    return int(height), int(width)


def _check_fit(image_fit: str, size: tuple[int, int] | None) -> None:
    """``image_fit`` one of :data:`~swav_ref.data.image_files.IMAGE_FITS`, and ``"crop"`` only
    with a size to crop to."""
    if image_fit not in IMAGE_FITS:
        raise ValueError(f"image_fit must be one of {', '.join(IMAGE_FITS)}, got {image_fit!r}")
    if image_fit == "crop" and size is None:
        raise ValueError("image_fit 'crop' needs image_size, the size to crop to")


#: The version of :func:`load_image_folder`'s decoding, kept in trainer checkpoints (the
#: pixels of the same files change with it): 2 decodes a JPEG of at least 4 ``image_size``
#: on each side at reduced scale before resizing it; 1 (and checkpoints without it)
#: decoded every image at full size.
FOLDER_DECODER = 2


def load_image_folder(data_dir: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
                      image_fit: str = "stretch") -> ImageDataset:
    """Images from a folder: one sub-folder per class, or flat without labels.

    Layouts
    -------
    ``data_dir/<class>/<image>``, ``data_dir/<class>/<any/sub/folders>/<image>``
        labelled; classes are the sub-folder names in order (label = position). A class
        folder is read recursively, as torchvision's ``ImageFolder`` does: its own images
        first, then each sub-folder's. Order is the code-point order of the names,
        case-sensitive, the same on every OS
        (:func:`~swav_ref.data.image_files.name_order`).
    ``data_dir/<image>``
        unlabelled (``labels`` is ``None``), when ``data_dir`` has no sub-folders.

    Hidden files and folders (names starting with ``.``) and OS metadata such as
    ``__MACOSX`` or ``Thumbs.db`` are ignored. Other files without an image extension
    (:data:`~swav_ref.data.image_files.IMAGE_EXTENSIONS`, case-insensitive) are skipped with one ``UserWarning`` that
    counts them by extension. Links are followed.

    Each image is turned upright by its EXIF orientation tag. Transparent pixels become
    white, as most viewers show them (the image is composited onto a white background).
    16-bit greyscale is scaled to 8 bits by keeping the high byte (``v >> 8``). If every
    image is greyscale the data set has one channel (Pillow mode ``L``), otherwise every
    image is converted to ``RGB``.

    With ``image_size`` N, a JPEG at least 4N pixels on each side is decoded at 1/2, 1/4 or
    1/8 scale, the smallest that keeps both sides at least 2N (Pillow's draft mode; libjpeg
    scales in the DCT domain), and then resized: a phone photo loads 2 to 3x faster, and its pixels differ
    from those of a full decode by a fraction of a grey level on average (up to about ten at
    a sharp edge, as if shrunk with a slightly softer filter). Smaller JPEGs, other formats,
    and loads without ``image_size`` decode in full.

    Each image is written into one array allocated for the whole set as it is read, so the
    memory needed is that of the data set plus one decoded image (up to a third more while
    a set whose first images are greyscale is widened to RGB at its first colour image).

    Parameters
    ----------
    data_dir : str or os.PathLike
        the folder to read, in one of the two layouts above.
    image_size : None, int or (height, width)
        ``None``: every image must have the size of the first one. Otherwise each image is
        resized to it (bilinear, with Pillow's antialiasing when shrinking). Integers >= 1
        (Python or NumPy, not ``bool``).
    image_fit : {"stretch", "crop"}
        with ``image_size``, how an image of another shape fits it
        (:func:`~swav_ref.data.image_files.read_pixels`): ``"stretch"`` resizes the whole
        image and distorts it; ``"crop"`` keeps its shape, resizing its largest centred box
        of ``image_size``'s shape (for a square, the shorter side to the size, the middle of
        the longer side kept).

    Raises
    ------
    ValueError
        an ``image_size`` that is not a positive integer or a pair of them, or an unknown
        ``image_fit`` or ``"crop"`` without ``image_size`` (before any file is read).
    DatasetError
        missing or empty folder, a class folder without images, image files beside class
        folders, a broken link or a link that loops with an image name, a folder link that
        loops, a folder reached a second time through a link (its images would be read
        twice), a folder that cannot be listed, or (``image_size=None``) an image of another
        size; the message names the file. Unreadable images are reported together, in one
        error that lists every one with its reason (the first 20, and a count of the rest):
        empty files (``empty (0 bytes)``), files of a format Pillow does not know and broken
        headers are found from the headers, read first, before any image is decoded; corrupt
        or truncated data, images too large to decode in the memory available and 32-bit
        integer or floating-point images (modes ``I``, ``F``) when decoding, which goes on to
        the last file.

    Warns
    -----
    UserWarning
        when files were skipped for their extension (``.heic``, ``.txt``, ...), and when
        entries that are not regular files (a named pipe, a device) were skipped unopened.
    """
    image_size = _size_pair(image_size)  # before a file is read: a bad size fails at once
    _check_fit(image_fit, image_size)
    root = Path(data_dir)
    files, labels, class_names = _list_image_folder(root)
    return ImageDataset(
        images=_read_images(files, image_size, root, fit=image_fit),
        labels=labels,
        class_names=class_names,
        name=root.name or str(root),
    )


def _list_image_folder(root: Path) -> tuple[list[Path], np.ndarray | None, tuple[str, ...]]:
    """The image files of a folder, their labels (``None`` for a flat folder) and the class
    names: :func:`load_image_folder`'s layouts and checks, without opening an image."""
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root} does not exist or is not a folder")
    entries = visible_entries(root)
    is_class = [is_folder(p) for p in entries]
    class_dirs = [p for p, sub in zip(entries, is_class) if sub]
    skipped: list[Path] = []
    loose = pick_images([p for p, sub in zip(entries, is_class) if not sub], skipped)
    if not class_dirs:
        warn_skipped(skipped, root)
        if not loose:
            raise DatasetError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return loose, None, ()
    if loose:
        raise DatasetError(
            f"{root} mixes class sub-folders with loose images (e.g. {loose[0]}); put every "
            "image in a class folder, or use a flat folder without sub-folders"
        )
    root_id = folder_id(root)
    seen = {root_id: root}  # over all classes: a folder reached twice is an error, also across classes
    members = [find_images(class_dir, skipped, frozenset({root_id}), seen) for class_dir in class_dirs]
    warn_skipped(skipped, root)  # first: it may explain an empty class folder
    for class_dir, found in zip(class_dirs, members):
        if not found:
            raise DatasetError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int64), [len(found) for found in members])
    return [path for found in members for path in found], labels, tuple(p.name for p in class_dirs)


def _check_headers(files: list[Path], root: Path) -> None:
    """Every file's header read (:func:`~swav_ref.data.image_files.check_header`, about 1% of
    the time decoding takes), and one error naming every empty file, file of an unknown
    format or broken header, before anything is decoded."""
    problems = []
    for path in files:
        try:
            check_header(path)
        except DatasetError as exc:
            problems.append(str(exc))
    if problems:
        raise unreadable_images_error(problems, len(files), root, " (found from their headers, before decoding any)")


def _widened(images: np.ndarray, filled: list[int]) -> np.ndarray:
    """One-channel ``images`` as a new three-channel array, the rows in ``filled`` copied into
    R, G and B (as converting each grey image to RGB before the resize would give: Pillow's
    bilinear resize treats every channel alike); the other rows are not written yet."""
    wide = np.empty((images.shape[0], 3, *images.shape[2:]), dtype=np.uint8)
    for row in filled:
        wide[row] = images[row]
    return wide


def _read_images(files: list[Path], size: tuple[int, int] | None, root: Path, rows=None,
                 fit: str = "stretch") -> np.ndarray:
    """The pixels of ``files`` in one ``uint8`` array ``(N, C, H, W)``, file ``i`` in row
    ``rows[i]`` (``i`` by default).

    One image at a time is decoded, converted, resized and written into an array allocated
    once, from the first image's shape: the peak is the array and one decoded image (a list
    of images stacked at the end took three times the array; a folder of phone photos would
    not fit in memory decoded). The array starts with one channel and is widened to RGB at
    the first colour image; ``np.empty`` takes no memory until written, so a colour set
    never fills the one-channel array.

    Headers are checked first (:func:`_check_headers`). An image that fails to decode is
    noted and the others are still read, so that one error names every bad file; an image
    of another size (``size=None``) fails at once, as ``image_size`` is the remedy for all.
    """
    _check_headers(files, root)
    rows = range(len(files)) if rows is None else rows
    images, first, filled, problems = None, None, [], []
    for path, row in zip(files, rows):
        try:
            pixels = read_pixels(path, size, fit)
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        if images is None:
            images, first = np.empty((len(files), *pixels.shape), dtype=np.uint8), path
        elif pixels.shape[1:] != images.shape[2:]:
            unreadable = (f"; and {len(problems)} file(s) before it could not be read:\n" + "\n".join(problems[:20])
                          if problems else "")
            raise DatasetError(
                f"image {path} is {pixels.shape[2]}x{pixels.shape[1]} (width x height) but {first} is "
                f"{images.shape[3]}x{images.shape[2]}; pass image_size (--image-size on the command line) "
                f"to resize them all{unreadable}"
            )
        if pixels.shape[0] > images.shape[1]:  # the first colour image: every image RGB (grey: R = G = B)
            images = _widened(images, filled)
        images[row] = pixels  # a grey image into an RGB array: broadcast into R, G and B
        filled.append(row)
    if problems:
        raise unreadable_images_error(problems, len(files), root)
    return images


def _load_split_folder(
    data_dir: str | os.PathLike, image_size, test_fraction: float, seed: int, image_fit: str = "stretch"
) -> tuple[ImageDataset, ImageDataset | None]:
    """:func:`split_dataset` of :func:`load_image_folder`, the same data sets, without a copy.

    The split depends only on the labels, which the file list gives before any image is
    read: each image is decoded straight into its place in one array, training images
    first, and train and test are views of its two parts. Loading and then splitting held
    the set twice (the whole set beside train and test). A flat folder is not split.
    """
    image_size = _size_pair(image_size)
    _check_fit(image_fit, image_size)
    root = Path(data_dir)
    files, labels, class_names = _list_image_folder(root)
    name = root.name or str(root)
    if labels is None:  # no labels: nothing could score a held-out part
        return ImageDataset(images=_read_images(files, image_size, root, fit=image_fit), name=name), None
    train_idx, test_idx = _split_indices(labels, len(files), test_fraction, seed, name)
    order = np.concatenate([train_idx, test_idx])
    rows = np.empty_like(order)
    rows[order] = np.arange(order.size)  # file order[r] goes to row r
    images = _read_images(files, image_size, root, rows, image_fit)
    n_train = train_idx.size
    train = ImageDataset(images[:n_train], labels[train_idx], class_names, f"{name}/train")
    test = ImageDataset(images[n_train:], labels[test_idx], class_names, f"{name}/test")
    return train, test


# -- by name -----------------------------------------------------------------------------
DATASETS = ("digits", "cifar10", "folder")
#: ``TrainConfig.dataset`` for images handed to the Trainer (``train_set=``) rather than loaded.
ARRAYS = "arrays"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    image_fit: str = "stretch",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[ImageDataset, ImageDataset | None]:
    """``(train, test)`` for ``name`` in ``"digits" | "cifar10" | "folder"``.

    - ``digits``: :func:`load_digits_dataset` split by :func:`split_dataset`
      (stratified, ``test_fraction``, ``seed``).
    - ``cifar10``: :func:`load_cifar10` on ``data_dir`` (its own train/test split).
    - ``folder``: :func:`load_image_folder` on ``data_dir`` (``image_size``, ``image_fit``:
      the others have one size); one sub-folder per class is
      split by :func:`split_dataset`. A flat folder has no labels, so nothing could score
      a held-out part: every image trains, and ``test`` is None (a linear probe or kNN
      evaluation needs labels and is skipped). The split is made from the file list, and
      each image decoded straight into its part: ``train.images`` and ``test.images`` are
      the two parts of one array (views), so the set is never held twice.

    Raises
    ------
    ValueError
        an unknown name, or ``data_dir`` missing for cifar10/folder.
    DatasetError
        bad data (see the loaders).
    """
    if name == "digits":
        return split_dataset(load_digits_dataset(), test_fraction=test_fraction, seed=seed)
    if name == ARRAYS:
        raise ValueError("dataset 'arrays' is not loaded: its images are handed to the Trainer (train_set=...)")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (the folder holding the data)")
    if name == "cifar10":
        return load_cifar10(data_dir)
    return _load_split_folder(data_dir, image_size, test_fraction, seed, image_fit)
