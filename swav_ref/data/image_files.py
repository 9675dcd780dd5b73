"""The files of an image folder: which are images, and how one is read into 8-bit pixels.

Used by :func:`swav_ref.data.datasets.load_image_folder`. A folder a person brings holds
more than images (``.DS_Store``, a README, phone photos in ``.heic``), and its images come
in many forms (sideways with an EXIF tag, with transparency, 16-bit); the rules for each
are here, one function per rule, each saying what it does and why.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from swav_ref.data.errors import DatasetError

__all__ = ["GREY_MODES", "IMAGE_EXTENSIONS", "find_images", "pick_images", "read_image", "visible_entries",
           "warn_skipped"]

#: File name endings read as images by :func:`~swav_ref.data.datasets.load_image_folder` (case-insensitive).
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)  # fmt: skip

#: Names that operating systems and archivers leave in folders; skipped without a warning,
#: like hidden names (starting with ".").
_OS_METADATA = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information"})

#: Pillow modes of 16-bit greyscale images (scaled to 8 bits when read).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

#: Pillow modes with one channel once :func:`read_image` has normalised an image; a folder
#: of only these loads as 1-channel images.
GREY_MODES = frozenset({"1", "L"})


def is_ignored(path: Path) -> bool:
    """Hidden names and OS metadata: left out without a word."""
    return path.name.startswith(".") or path.name in _OS_METADATA


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` in sorted name order, less hidden ones and OS metadata."""
    return sorted(p for p in folder.iterdir() if not is_ignored(p))


def pick_images(paths: list[Path], skipped: list[Path]) -> list[Path]:
    """The image files among ``paths`` (no folders), in the given order.

    A path is an image when it names an existing file with an extension in
    :data:`IMAGE_EXTENSIONS`; the others are appended to ``skipped``. A link with an image
    name whose target is gone raises :class:`~swav_ref.data.errors.DatasetError`: it was meant to be an image.
    """
    images = []
    for path in paths:
        is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
        if is_image_name and path.is_symlink() and not path.exists():
            raise DatasetError(f"broken link {path} -> {os.readlink(path)}: its target does not exist")
        if is_image_name and path.is_file():
            images.append(path)
        else:
            skipped.append(path)
    return images


def find_images(folder: Path, skipped: list[Path], _outer: frozenset = frozenset()) -> list[Path]:
    """Every image under ``folder``, sub-folders included, in a fixed order.

    A folder's own images come first (sorted by name), then those of each sub-folder in
    name order, recursively. Links to folders are followed (as torchvision does); one that
    leads back into a folder being read raises :class:`~swav_ref.data.errors.DatasetError` instead of looping.
    """
    real = folder.resolve()
    if real in _outer:
        raise DatasetError(f"folder link {folder} leads back to {real}, which contains it: a loop")
    entries = visible_entries(folder)
    images = pick_images([p for p in entries if not p.is_dir()], skipped)
    for sub_folder in (p for p in entries if p.is_dir()):
        images += find_images(sub_folder, skipped, _outer | {real})
    return images


def warn_skipped(skipped: list[Path], root: Path) -> None:
    """One warning (pointing at the caller of :func:`~swav_ref.data.datasets.load_image_folder`) that lists the
    files left out by extension, e.g. ``.heic x2, .txt x1``, so a folder of unsupported
    photos does not shrink without a word."""
    if not skipped:
        return
    counts = Counter(p.suffix.lower() or "(no extension)" for p in skipped)
    summary = ", ".join(f"{ext} x{n}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    what = "file that is not an image" if len(skipped) == 1 else "files that are not images"
    warnings.warn(
        f"skipped {len(skipped)} {what} of a known type: {summary} (in {root})",
        UserWarning,
        stacklevel=3,
    )


def to_8_bit(picture, path: Path, file_format: str | None):
    """16-bit greyscale scaled to 8 bits by keeping the high byte; 32-bit modes refused.

    ``v >> 8`` (``floor(v / 256)``) maps 0..65535 onto 0..255, and an 8-bit image widened
    the usual way (``v * 257``) reads back exactly. Pillow's own conversion would clip every
    value above 255 to white. Older Pillow opens 16-bit PNGs as mode ``I``; PNG holds no
    32-bit integers, so ``I`` from a PNG is 16-bit too.
    """
    from PIL import Image

    mode = picture.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and file_format == "PNG"):
        values = np.asarray(picture).astype(np.uint32)
        return Image.fromarray((values >> 8).astype(np.uint8))
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise DatasetError(
            f"image {path} is a {kind} image (Pillow mode {mode}), whose values have no fixed range "
            "to map onto 0..255; convert it to an 8- or 16-bit image"
        )
    return picture


def flatten_alpha(picture):
    """An image with transparency composited onto white; others unchanged.

    Transparent pixels become white, as most viewers show them: dropping the alpha channel
    would instead show whatever colour happens to be stored under a transparent pixel.
    Greyscale stays greyscale (``LA`` -> ``L``), colour becomes ``RGB``.
    """
    from PIL import Image

    if picture.mode not in ("RGBA", "RGBa", "LA", "La", "PA") and "transparency" not in picture.info:
        return picture
    grey = picture.mode in ("L", "LA", "La")
    pixels = np.asarray(picture.convert("LA" if grey else "RGBA"), dtype=np.uint32)
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    flat = (colour * alpha + 255 * (255 - alpha) + 127) // 255  # rounded alpha blend
    flat = flat.astype(np.uint8)
    return Image.fromarray(flat[..., 0] if grey else flat)


def read_image(path: Path):
    """A fully decoded Pillow image, upright, 8 bits per channel, without alpha.

    The EXIF orientation tag is applied (phone photos are often stored sideways with a tag
    that says so), 16-bit greyscale is scaled to 8 bits and transparency is flattened onto
    white (the module's helpers ``to_8_bit`` and ``flatten_alpha``). Anything unreadable
    raises :class:`~swav_ref.data.errors.DatasetError` naming the file.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            file_format = img.format
            picture = ImageOps.exif_transpose(img)  # a new image, also when nothing turns
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return flatten_alpha(to_8_bit(picture, path, file_format))
