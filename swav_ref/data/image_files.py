"""The files of an image folder: which are images, and how one is read into 8-bit pixels.

Used by :func:`swav_ref.data.datasets.load_image_folder`. A folder a person brings holds
more than images (``.DS_Store``, a README, phone photos in ``.heic``), and its images come
in many forms (sideways with an EXIF tag, with transparency, 16-bit); the rules for each
are here, one function per rule, each saying what it does and why.

Order: class folders and files are taken in code-point order of their names, case-sensitive,
the same on every OS (:func:`visible_entries`), so that labels, image order and a seeded
train/test split do not depend on where the folder is read.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from swav_ref.data.errors import DatasetError

__all__ = ["GREY_MODES", "IMAGE_EXTENSIONS", "IMAGE_FITS", "centred_box", "check_header", "decode_smaller",
           "find_images", "folder_id", "is_folder", "name_order", "open_regular_file", "path_kind", "pick_images",
           "read_image", "read_pixels", "unreadable_images_error", "visible_entries", "warn_skipped"]

#: File name endings read as images by :func:`~swav_ref.data.datasets.load_image_folder` (case-insensitive).
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)  # fmt: skip

#: How :func:`read_pixels` fits an image to a size of another shape: resize the whole image
#: (``"stretch"``, distorting it) or its largest centred box of that shape (``"crop"``).
IMAGE_FITS = ("stretch", "crop")

#: Names that operating systems and archivers leave in folders; skipped without a warning,
#: like hidden names (starting with ".").
_OS_METADATA = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information"})

#: Pillow modes of 16-bit greyscale images (scaled to 8 bits when read).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

#: Pillow modes with one channel once :func:`read_image` has normalised an image; a folder
#: of only these loads as 1-channel images.
GREY_MODES = frozenset({"1", "L"})

#: Pixels per block in :func:`flatten_alpha`.
_BLEND_BLOCK_PIXELS = 1 << 18

#: The EXIF tag that says how a photo is stored, and its values for a photo stored sideways
#: (upright width = stored height).
_ORIENTATION, _SIDEWAYS = 0x0112, frozenset({5, 6, 7, 8})

#: Unreadable images listed by name in :func:`unreadable_images_error`; the rest are counted.
_LISTED_PROBLEMS = 20


def is_ignored(path: Path) -> bool:
    """Hidden names and OS metadata: left out without a word."""
    return path.name.startswith(".") or path.name in _OS_METADATA


#: What :func:`path_kind` calls a regular file and a folder; anything else gets a phrase
#: such as ``"named pipe (FIFO)"`` or ``"broken link"``, made to follow "is a".
FILE, FOLDER = "regular file", "folder"
BROKEN_LINK, LINK_LOOP, MISSING = "broken link", "link that loops", "missing"


def path_kind(path: Path) -> str:
    """What ``path`` is, links followed, found with one ``stat`` and without opening it.

    ``FILE``, ``FOLDER``, ``MISSING``, ``BROKEN_LINK`` (a link whose target is gone),
    ``LINK_LOOP`` (a chain of links that comes back to itself), the module's constants, or a
    phrase for a special file: ``"named pipe (FIFO)"``, ``"socket"``, ``"character device"``, ``"block
    device"``. Opening a named pipe blocks until something writes to it and a device reads
    forever, so the loaders look before they open. A path that cannot be inspected (no
    permission on its folder) raises :class:`~swav_ref.data.errors.DatasetError` naming it.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP or getattr(exc, "winerror", None) == 1921:  # (Windows: "cannot be resolved")
            return LINK_LOOP
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return BROKEN_LINK if os.path.islink(path) else MISSING
        raise DatasetError(f"cannot inspect {path}: {exc.strerror or exc}") from exc
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return FOLDER
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def is_folder(path: Path) -> bool:
    """``path`` is a folder or a link to one (:func:`path_kind`; unlike ``Path.is_dir``, a
    permission error is a :class:`~swav_ref.data.errors.DatasetError` naming the path, not
    a raw ``PermissionError``)."""
    return path_kind(path) == FOLDER


def open_regular_file(path: Path, what: str = "file"):
    """``path`` opened for binary reading, after making sure it is a regular file.

    Anything else raises :class:`~swav_ref.data.errors.DatasetError` saying what the path
    really is (``"{what} {path} is a named pipe (FIFO), not a regular file"``, ``"{what}
    missing: {path}"``, ...), without opening it: opening a named pipe would block. The file
    is opened non-blocking and checked again with ``fstat``, in case it was swapped between
    the look and the open.
    """
    kind = path_kind(path)
    if kind == MISSING:
        raise DatasetError(f"{what} missing: {path}")
    if kind != FILE:
        raise DatasetError(f"{what} {path} is a {kind}, not a regular file")
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        file = open(path, "rb", opener=lambda name, flags: os.open(name, flags | nonblocking))  # noqa: SIM115
    except OSError as exc:
        raise DatasetError(f"cannot open {what} {path}: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise DatasetError(f"{what} {path} is not a regular file")
        if nonblocking:
            os.set_blocking(file.fileno(), True)
        return file
    except BaseException:
        file.close()
        raise


def folder_id(folder: Path) -> tuple[int, Any]:
    """``(st_dev, st_ino)`` of ``folder``, links followed: the same for every path (link,
    ``..``, bind mount) that leads to one folder on disk. Some network and FUSE file systems
    report inode 0 for every folder; there the resolved path stands in for the inode."""
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise DatasetError(f"cannot read folder {folder}: {exc.strerror or exc}") from exc
    return st.st_dev, (st.st_ino or os.path.realpath(folder))


def name_order(path: Path) -> tuple[str, str]:
    """The sort key of a folder entry: its name in code-point order, case-sensitive, the same
    on every OS.

    Not ``Path`` order: Windows paths compare case-insensitively (``"a" < "B"``) and POSIX
    ones by code point (``"B" < "a"``), so class labels, image order and the seeded
    train/test split would differ between OSes (a model trained on Windows would find its
    training images in the test split on Linux). The name is compared in NFC form first, so
    that a name macOS hands back decomposed (NFD: ``e`` + combining accent) sorts as the
    composed name does elsewhere; the raw name breaks ties. For NFC names (what Linux and
    Windows almost always hold) this is the order ``sorted(paths)`` gives on Linux.
    """
    return unicodedata.normalize("NFC", path.name), path.name


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, less hidden ones and OS metadata, in code-point order of
    their names, case-sensitive, the same on every OS (:func:`name_order`).

    A folder that cannot be listed (no permission) raises :class:`~swav_ref.data.errors.DatasetError` naming it."""
    try:
        return sorted((p for p in folder.iterdir() if not is_ignored(p)), key=name_order)
    except OSError as exc:
        raise DatasetError(f"cannot list folder {folder}: {exc.strerror or exc}") from exc


def pick_images(paths: list[Path], skipped: list[Path]) -> list[Path]:
    """The image files among ``paths`` (no folders), in the given order.

    A path is an image when it names a regular file (a link to one included) with an
    extension in :data:`IMAGE_EXTENSIONS`; the others are appended to ``skipped``, special
    files (a named pipe, a device) too: they are never opened. A link with an image name
    whose target is gone, or that loops back to itself, raises
    :class:`~swav_ref.data.errors.DatasetError`: it was meant to be an image.
    """
    images = []
    for path in paths:
        is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
        kind = path_kind(path)
        if is_image_name and kind == BROKEN_LINK:
            raise DatasetError(f"broken link {path} -> {os.readlink(path)}: its target does not exist")
        if is_image_name and kind == LINK_LOOP:
            raise DatasetError(
                f"link {path} -> {os.readlink(path)} loops: following it leads back to a link already "
                "followed, never to a file"
            )
        if is_image_name and kind == FILE:
            images.append(path)
        else:
            skipped.append(path)
    return images


def find_images(
    folder: Path,
    skipped: list[Path],
    _outer: frozenset = frozenset(),
    seen: dict[tuple[int, int], Path] | None = None,
) -> list[Path]:
    """Every image under ``folder``, sub-folders included, in a fixed order.

    A folder's own images come first, then those of each sub-folder, recursively, both in
    code-point order of their names (:func:`visible_entries`: the same on every OS). Links
    to folders are followed (as torchvision does), but each folder on disk is read once:
    one that leads back into a folder being read raises
    :class:`~swav_ref.data.errors.DatasetError` (a loop), and so does one reached a second
    time by another way (``seen`` maps the :func:`folder_id` of each folder read so far, over
    the whole walk, to the path it was first reached by; pass the same dict for the class
    folders of one data set). A second way in is an error, not a skip: it would put the same
    images in the data set twice (or in two classes), and links that fan out (a folder with
    six links to the next, six levels deep) would otherwise make one image thousands and take
    exponential time to walk.
    """
    seen = {} if seen is None else seen
    key = folder_id(folder)
    if key in _outer:
        raise DatasetError(f"folder link {folder} leads back to {folder.resolve()}, which contains it: a loop")
    if key in seen:
        raise DatasetError(
            f"folder {folder} is the folder {seen[key]} again (both lead to {folder.resolve()}, reached a "
            "second time through a link); its images would be read twice: remove one of the links"
        )
    seen[key] = folder
    entries = visible_entries(folder)
    is_sub_folder = [is_folder(p) for p in entries]
    folders = [p for p, sub in zip(entries, is_sub_folder) if sub]
    images = pick_images([p for p, sub in zip(entries, is_sub_folder) if not sub], skipped)
    for sub_folder in folders:
        images += find_images(sub_folder, skipped, _outer | {key}, seen)
    return images


def warn_skipped(skipped: list[Path], root: Path) -> None:
    """One warning (pointing at the caller of :func:`~swav_ref.data.datasets.load_image_folder`) that lists the
    files left out by extension, e.g. ``.heic x2, .txt x1``, so a folder of unsupported
    photos does not shrink without a word; a second one lists what is not a regular file
    (a named pipe, a device, a broken link) by name and kind."""
    if not skipped:
        return
    kinds = {p: path_kind(p) for p in skipped}
    files = [p for p in skipped if kinds[p] == FILE]
    others = [p for p in skipped if kinds[p] != FILE]
    if files:
        counts = Counter(p.suffix.lower() or "(no extension)" for p in files)
        summary = ", ".join(f"{ext} x{n}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        what = "file that is not an image" if len(files) == 1 else "files that are not images"
        warnings.warn(
            f"skipped {len(files)} {what} of a known type: {summary} (in {root})",
            UserWarning,
            stacklevel=3,
        )
    if others:  # a named pipe called x.png is not "an image of an unknown type": say what it is
        listed = "; ".join(f"{p} is a {kinds[p]}" for p in others[:5]) + ("; ..." if len(others) > 5 else "")
        what = "entry that is not a regular file" if len(others) == 1 else "entries that are not regular files"
        warnings.warn(f"skipped {len(others)} {what} in {root}, without opening: {listed}", UserWarning, stacklevel=3)


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
    Greyscale stays greyscale (``LA`` -> ``L``), colour becomes ``RGB``. The blend is exact
    integer arithmetic in ``uint16``, a block of rows at a time written into the result: a
    large image costs about its own size again, not 16 bytes a pixel.
    """
    from PIL import Image

    if picture.mode not in ("RGBA", "RGBa", "LA", "La", "PA") and "transparency" not in picture.info:
        return picture
    grey = picture.mode in ("L", "LA", "La")
    with_alpha = "LA" if grey else "RGBA"
    source = picture if picture.mode == with_alpha else picture.convert(with_alpha)
    width, height = source.size
    flat = Image.new("L" if grey else "RGB", source.size)
    rows = max(1, _BLEND_BLOCK_PIXELS // max(width, 1))
    for top in range(0, height, rows):  # a block of rows at a time: no full-size array beside the image
        box = (0, top, width, min(top + rows, height))
        block = np.asarray(source.crop(box)).astype(np.uint16)  # 255 * 255 + 127 = 65152 fits
        colour, alpha = block[..., :-1], block[..., -1:]
        blended = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # rounded alpha blend
        flat.paste(Image.fromarray(blended[..., 0] if grey else blended), box)
    return flat


def _open_image(file, path: Path):
    """``Image.open`` on an open image file: its header only, nothing decoded yet. An empty
    file is named as such: Pillow would call it a format it does not know."""
    from PIL import Image

    if os.fstat(file.fileno()).st_size == 0:
        raise DatasetError(f"cannot read image {path}: empty (0 bytes)")
    return Image.open(file)


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    """The error for an image Pillow could not open or decode, naming the file (Pillow's own
    text for an unknown format names the file object instead)."""
    from PIL import Image

    if isinstance(exc, Image.UnidentifiedImageError):
        return DatasetError(f"cannot read image {path}: {type(exc).__name__}: not a format Pillow knows")
    return DatasetError(f"cannot read image {path}: {type(exc).__name__}: {exc}")


def check_header(path: Path) -> None:
    """Raise :class:`~swav_ref.data.errors.DatasetError`, as :func:`read_image` would, when
    ``path`` is empty, not a format Pillow knows, or has a broken header.

    Only the header is read (about 40 microseconds a file, against milliseconds to decode
    one), so a folder with such files fails before any image is decoded. A file whose
    header reads but whose data is cut short is found only by :func:`read_image`.
    """
    from PIL import Image

    try:
        with open_regular_file(path, "image") as file:
            _open_image(file, path)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from exc


def unreadable_images_error(problems: list[str], n_images: int, root: Path, note: str = "") -> DatasetError:
    """One error for every image of a folder that could not be read, so that a folder with
    several bad files is fixed in one go rather than one file per run.

    ``problems`` holds one message per file, each naming it. A single one is the error as it
    stands; several are listed, one a line, the first 20 of them, and the rest counted.
    ``note`` follows "cannot be read" in the first line.
    """
    if len(problems) == 1:
        return DatasetError(problems[0])
    listed = "\n  ".join(problems[:_LISTED_PROBLEMS])
    rest = len(problems) - _LISTED_PROBLEMS
    more = f"\n  ... and {rest} more" if rest > 0 else ""
    return DatasetError(
        f"{len(problems)} of the {n_images} images in {root} cannot be read{note}; fix or remove them:"
        f"\n  {listed}{more}"
    )


#: Where a point (x, y) of an image stored ``w`` x ``h`` lands once the image is turned
#: upright for each EXIF orientation (the transposes of ``ImageOps.exif_transpose``).
_UPRIGHT = {
    1: lambda x, y, w, h: (x, y), 2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y), 4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x), 6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x), 8: lambda x, y, w, h: (y, w - x),
}  # fmt: skip


def decode_smaller(picture, min_size: tuple[int, int],
                   crop_aspect: float | None = None) -> tuple[float, float, float, float] | None:
    """Have a JPEG decode at 1/2, 1/4 or 1/8 of its size, as long as it stays at least
    ``min_size`` (width, height) once upright; other images are left alone. With
    ``crop_aspect`` (width / height), it is the image's centred crop of that aspect
    (:func:`centred_box`) that must stay at least ``min_size``.

    libjpeg then scales in the DCT domain and skips most of the inverse transform, and what
    follows (upright, resize) starts from an image 4 to 64 times smaller: a 4032x3024 phone
    photo shrunk to 32 or 224 pixels loads 2 to 3x faster. Pillow's ``draft`` picks the smallest
    such scale; a JPEG smaller than twice ``min_size`` decodes in full, to the same pixels as
    without it. Call it after ``Image.open`` and before ``load``; ``min_size`` is swapped for a
    photo stored sideways (EXIF orientation 5 to 8), turned upright only after decoding.

    Returns the box of the reduced image, upright, that holds the whole picture, for
    ``resize(..., box=)``; ``None`` when the image decodes in full. A side that is not a
    multiple of the scale ends in a pixel that stands for fewer source pixels: resizing
    without the box would stretch the picture by up to that fraction of a pixel, which
    costs several grey levels at sharp gradients (with it, a fraction of a grey level).
    """
    from PIL import JpegImagePlugin

    if not isinstance(picture, JpegImagePlugin.JpegImageFile):  # MPO (most phone photos) included
        return None
    orientation = picture.getexif().get(_ORIENTATION, 1)  # the header's EXIF: nothing decoded
    width, height = min_size
    if crop_aspect is not None:
        # The largest scale 1/a at which the crop keeps min_size, asked for as the size Pillow
        # reads as that scale (its draft picks a from whole-number quotients of the sides; a
        # need rounded up to whole pixels could cost a scale the crop still fits).
        upright_width, upright_height = picture.size[::-1] if orientation in _SIDEWAYS else picture.size
        left, top, right, bottom = centred_box((0, 0, upright_width, upright_height), crop_aspect)
        need_width = width * upright_width / (right - left)  # the whole image, as much larger as the crop
        need_height = height * upright_height / (bottom - top)
        scale = next((a for a in (8, 4, 2) if upright_width / a >= need_width and upright_height / a >= need_height),
                     1)
        width, height = upright_width // scale, upright_height // scale
    if orientation in _SIDEWAYS:
        width, height = height, width
    drafted = picture.draft(None, (width, height))  # None: keep the mode (a colour JPEG stays colour)
    if drafted is None:
        return None
    left, top, right, bottom = drafted[1]
    stored_width, stored_height = picture.size  # reduced, rounded up
    if (right, bottom) == (stored_width, stored_height):  # scale 1: decoded in full
        return None
    upright = _UPRIGHT.get(orientation, _UPRIGHT[1])  # exif_transpose ignores other values too
    (x0, y0), (x1, y1) = (upright(x, y, stored_width, stored_height) for x, y in ((left, top), (right, bottom)))
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def centred_box(box: tuple[float, float, float, float], aspect: float) -> tuple[float, float, float, float]:
    """The largest box of ``aspect`` (width / height) centred in ``box`` (left, top, right,
    bottom): the whole height of a wider box, the whole width of a taller one."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if width > height * aspect:
        margin = (width - height * aspect) / 2
        return left + margin, top, right - margin, bottom
    margin = (height - width / aspect) / 2
    return left, top + margin, right, bottom - margin


def _decode(path: Path, min_size: tuple[int, int] | None = None, crop_aspect: float | None = None):
    """:func:`read_image`, and the box of :func:`decode_smaller` (``None`` without ``min_size``)."""
    from PIL import Image, ImageOps

    size = None
    try:
        with open_regular_file(path, "image") as file:  # a named pipe would block Image.open
            picture = _open_image(file, path)
            size = picture.size  # from the header, before decoding
            box = None if min_size is None else decode_smaller(picture, min_size, crop_aspect)
            picture.load()  # decode now: a truncated file fails here, not later
            file_format = picture.format
            ImageOps.exif_transpose(picture, in_place=True)  # in place: no second full-size copy
        picture = to_8_bit(picture, path, file_format)
        return flatten_alpha(picture), box
    except DatasetError:
        raise
    except MemoryError as exc:
        shown = "" if size is None else f" ({size[0]}x{size[1]} pixels)"
        raise DatasetError(
            f"image {path}{shown} is too large to decode in the memory available; shrink it or leave it out"
        ) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from exc


def read_image(path: Path):
    """A fully decoded Pillow image, upright, 8 bits per channel, without alpha.

    The EXIF orientation tag is applied (phone photos are often stored sideways with a tag
    that says so), 16-bit greyscale is scaled to 8 bits and transparency is flattened onto
    white (the module's helpers ``to_8_bit`` and ``flatten_alpha``). Anything unreadable
    (an empty file, whose reason reads "empty (0 bytes)", included), not a regular file
    (checked before opening), or too large for the memory available raises
    :class:`~swav_ref.data.errors.DatasetError` naming the file (and its size in pixels).
    """
    return _decode(path)[0]


def read_pixels(path: Path, size: tuple[int, int] | None = None, fit: str = "stretch") -> np.ndarray:
    """One image (:func:`read_image`) as ``uint8`` ``(C, H, W)``: ``C`` is 1 for greyscale
    (modes in :data:`GREY_MODES`) and 3 for colour (anything else, converted to ``RGB``),
    resized to ``size`` (height, width) when given (bilinear, with Pillow's antialiasing
    when shrinking). How it fits (:data:`IMAGE_FITS`): ``"stretch"`` resizes the whole
    image, so one of another shape is distorted; ``"crop"`` resizes its largest centred box
    of the shape of ``size`` (for a square, the shorter side to ``size`` and the middle of
    the longer one: torchvision's ``Resize`` then ``CenterCrop``), so nothing is distorted
    and the ends of the longer side are cut.

    With ``size``, a JPEG is decoded at no less than twice it (:func:`decode_smaller`): a
    phone photo loads 2 to 3x faster, and once shrunk by that further factor of two
    or more it differs from a full decode by a fraction of a grey level on average (up to
    about ten at a sharp edge: the DCT-domain scaling and the resize together act as a
    slightly softer filter than one resize). Smaller JPEGs and other formats decode in full,
    to the same pixels.
    """
    from PIL import Image

    if fit not in IMAGE_FITS:
        raise ValueError(f"fit must be one of {', '.join(IMAGE_FITS)}, got {fit!r}")
    wanted = None if size is None else (size[1], size[0])  # Pillow: (w, h)
    aspect = wanted[0] / wanted[1] if wanted is not None and fit == "crop" else None
    picture, box = _decode(path, None if wanted is None else (2 * wanted[0], 2 * wanted[1]), aspect)
    mode = "L" if picture.mode in GREY_MODES else "RGB"
    if picture.mode != mode:  # (converting to its own mode would only copy it)
        picture = picture.convert(mode)
    if wanted is not None:
        if aspect is not None:  # within the (reduced) picture's own box
            box = centred_box(box or (0, 0, *picture.size), aspect)
        picture = picture.resize(wanted, Image.Resampling.BILINEAR, box=box)
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.transpose(pixels, (2, 0, 1))
