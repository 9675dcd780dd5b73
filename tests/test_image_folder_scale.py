"""Image folders at scale: memory, JPEGs decoded at reduced scale, every bad file in one report.

From a review that loaded 3000 photos: the loader held the set about three times over, a
phone photo was decoded at full size to be shrunk to 224 pixels, and a bad file stopped the
load when reached, after every earlier image was decoded, one bad file per run.
"""

from __future__ import annotations

import io
import os
import re
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from swav_ref.data import datasets as D
from swav_ref.data import image_files as F
from swav_ref.data.datasets import DatasetError


def save(path, picture, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, **options)
    return path


def large_photo(width=1601, height=1203):
    """A smooth colour gradient with a pattern and sharp-edged squares: something a scaled
    decode could get wrong. The sides are not multiples of 8, so the image reduced to 1/8
    ends in a partial pixel."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 37) * np.cos(y / 23)], axis=-1)
    pixels[(x // 100 + y // 100) % 2 == 0] *= 0.6
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def full_decode(path, height, width):
    """What the loader gave before JPEGs were decoded at reduced scale: decode in full,
    turn upright, resize."""
    with Image.open(path) as picture:
        upright = ImageOps.exif_transpose(picture).convert("RGB")
    return np.transpose(np.asarray(upright.resize((width, height), Image.Resampling.BILINEAR)), (2, 0, 1))


@pytest.fixture
def drafts(monkeypatch):
    """The ``(requested size, result)`` of every JPEG ``draft`` call."""
    calls = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        calls.append((size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


@pytest.fixture
def decoded(monkeypatch):
    """The names of the image files Pillow decoded (``load``, past the header), in order."""
    names = []
    load = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:  # not yet decoded (a decoded image's load does nothing)
            names.append(os.path.basename(self.fp.name))
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return names


# -- memory --------------------------------------------------------------------------------
def colour_folder(root, n=24, height=96, width=128):
    rng = np.random.default_rng(0)
    for i in range(n):
        save(root / "ab"[i % 2] / f"{i:02d}.png", Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)))
    return root


@pytest.mark.parametrize("image_size", [None, 64])
@pytest.mark.parametrize("loader", ["load_image_folder", "load_dataset"])
def test_a_folder_is_held_once_while_loading(tmp_path, loader, image_size):
    # A list of per-image arrays stacked at the end held the set twice, and load_dataset's
    # split copied it once more beside the whole set (1342 MB at the peak for a 430 MB set).
    folder = colour_folder(tmp_path)

    def load():
        if loader == "load_image_folder":
            return [D.load_image_folder(folder, image_size=image_size).images]
        return [part.images for part in D.load_dataset("folder", folder, image_size=image_size)]

    load()  # Pillow's plugins imported outside the measurement
    tracemalloc.start()  # follows NumPy's allocations (not Pillow's, one image at a time)
    try:
        arrays = load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sum(a.nbytes for a in arrays)
    # the set, one image's temporaries, and Pillow's 64 KiB read buffer (a Python bytes)
    assert peak < 1.2 * size + 100_000, f"peak {peak} bytes for {size} bytes of images"


def mixed_folder(root):
    """Greyscale images first in each class, colour late, of two sizes: the array is widened
    to RGB part-way through, with the split's rows out of file order."""
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog", "owl"):
        for i in range(5):
            shape = (30, 40) if i < 4 else (30, 40, 3)
            save(root / cls / f"{i}.png", Image.fromarray(rng.integers(0, 256, shape, np.uint8)))
    save(root / "owl" / "deeper" / "x.png", Image.fromarray(rng.integers(0, 256, (30, 40), np.uint8) > 99))
    return root


@pytest.mark.parametrize("image_size", [None, 16, (12, 20)])
def test_load_dataset_gives_the_split_of_the_loaded_folder(tmp_path, image_size):
    # load_dataset splits from the file list and decodes each image into its part: the
    # same data sets as loading the folder and then splitting it
    folder = mixed_folder(tmp_path)
    expected = D.split_dataset(D.load_image_folder(folder, image_size=image_size), test_fraction=0.3, seed=4)
    got = D.load_dataset("folder", folder, image_size=image_size, test_fraction=0.3, seed=4)
    for want, part in zip(expected, got):
        assert (part.name, part.class_names) == (want.name, want.class_names)
        np.testing.assert_array_equal(part.labels, want.labels)
        assert part.images.shape == want.images.shape and part.images.dtype == np.uint8
        np.testing.assert_array_equal(part.images, want.images)


def test_load_dataset_checks_the_split_before_decoding(tmp_path, decoded):
    save(tmp_path / "single" / "cat" / "only.png", Image.new("L", (3, 3)))
    with pytest.raises(DatasetError, match="single: cannot split 1 image"):
        D.load_dataset("folder", tmp_path / "single")
    assert decoded == []


# -- JPEGs decoded at reduced scale -------------------------------------------------------
def test_a_large_jpeg_is_decoded_at_reduced_scale_close_to_a_full_decode(tmp_path, drafts):
    path = save(tmp_path / "photo.jpg", large_photo(), quality=90)
    loaded = D.load_image_folder(tmp_path, image_size=32).images[0]
    # asked for twice the output size; decoded at 1/8 (1601 x 1203 -> 201 x 151, at least 64)
    assert [(size, result[1]) for size, result in drafts] == [((64, 64), (0, 0, 1601 / 8, 1203 / 8))]
    difference = np.abs(loaded.astype(int) - full_decode(path, 32, 32))
    # about 0.4 grey levels on average; resizing without the box of the partial last pixel
    # stretched the picture by it and cost 2.5
    assert difference.mean() < 1, difference.mean()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_small_jpeg_gives_the_same_pixels_as_before(tmp_path, drafts, mode):
    # smaller than twice the output size: nothing to gain, decoded in full as before
    picture = large_photo(60, 50).convert(mode)
    path = save(tmp_path / "small.jpg", picture, quality=90)
    loaded = D.load_image_folder(tmp_path, image_size=32).images[0]
    expected = full_decode(path, 32, 32)
    np.testing.assert_array_equal(loaded, expected[:1] if mode == "L" else expected)
    assert all(result is None or result[1] == (0, 0, 60, 50) for _, result in drafts)


def test_without_image_size_a_jpeg_is_decoded_in_full(tmp_path, drafts):
    path = save(tmp_path / "photo.jpg", large_photo(), quality=90)
    loaded = D.load_image_folder(tmp_path).images[0]
    assert drafts == []
    with Image.open(path) as picture:
        np.testing.assert_array_equal(loaded, np.transpose(np.asarray(picture), (2, 0, 1)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_sideways_jpeg_decoded_at_reduced_scale_is_turned_upright(tmp_path, drafts, orientation):
    # The reduced size and the box of its partial last pixel are found before the image is
    # turned upright; both follow the EXIF orientation (5 to 8: stored sideways).
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "phone.jpg", large_photo(), quality=90, exif=exif)
    loaded = D.load_image_folder(tmp_path, image_size=(24, 40)).images[0]  # 24 high, 40 wide
    sideways = orientation >= 5
    assert [size for size, _ in drafts] == [(48, 80) if sideways else (80, 48)]  # twice, in stored axes
    assert loaded.shape == (3, 24, 40)
    difference = np.abs(loaded.astype(int) - full_decode(path, 24, 40))
    assert difference.mean() < 1, difference.mean()


# -- fitting an image of another shape: stretched, or cropped to the centre ---------------
def resized_box(picture, height, width, box):
    """The oracle: Pillow's bilinear resize of ``box`` (left, top, right, bottom) of
    ``picture`` to ``height`` x ``width``, as (C, H, W)."""
    out = picture.convert("RGB").resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.transpose(np.asarray(out), (2, 0, 1))


@pytest.mark.parametrize(("stored", "size", "box"), [
    ((60, 30), (10, 10), (15, 0, 45, 30)),    # wide, to a square: the middle 30 x 30
    ((30, 60), (10, 10), (0, 15, 30, 45)),    # tall, to a square
    ((60, 30), (12, 20), (5, 0, 55, 30)),     # wide, to a wide 20 x 12: the whole height, 50 wide
    ((40, 40), (10, 20), (0, 10, 40, 30)),    # square, to a wide 20 x 10: the middle 40 x 20
    ((40, 40), (16, 16), (0, 0, 40, 40)),     # the same shape: the whole image, as with stretch
])  # fmt: skip
def test_crop_resizes_the_largest_centred_box_of_the_sizes_shape(tmp_path, stored, size, box):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (stored[1], stored[0], 3), np.uint8))
    save(tmp_path / "a.png", picture)
    loaded = D.load_image_folder(tmp_path, image_size=size, image_fit="crop").images[0]
    np.testing.assert_array_equal(loaded, resized_box(picture, *size, box))
    stretched = D.load_image_folder(tmp_path, image_size=size).images[0]  # the default is unchanged
    np.testing.assert_array_equal(stretched, resized_box(picture, *size, None))
    assert (box == (0, 0, *stored)) == np.array_equal(loaded, stretched)


def test_a_large_jpeg_cropped_is_decoded_at_the_scale_its_crop_needs(tmp_path, drafts):
    """The centred 1203 x 1203 crop of a 1601 x 1203 photo must keep 64 pixels a side (twice
    32), which 1/8 scale (150.4 a side) does: the draft is asked for the size it reads as 1/8."""
    path = save(tmp_path / "photo.jpg", large_photo(), quality=90)
    loaded = D.load_image_folder(tmp_path, image_size=32, image_fit="crop").images[0]
    assert [(size, result[1]) for size, result in drafts] == [((200, 150), (0, 0, 1601 / 8, 1203 / 8))]
    with Image.open(path) as picture:
        expected = resized_box(picture, 32, 32, (199, 0, 1402, 1203))
    difference = np.abs(loaded.astype(int) - expected)
    assert difference.mean() < 1, difference.mean()


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_sideways_jpeg_is_cropped_once_upright(tmp_path, drafts, orientation):
    """Stored sideways (6), the photo is 1203 wide and 1601 high once upright: the crop is
    the middle of its height, and the draft asks for the crop's need in stored axes."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "phone.jpg", large_photo(), quality=90, exif=exif)
    loaded = D.load_image_folder(tmp_path, image_size=32, image_fit="crop").images[0]
    assert [size for size, _ in drafts] == [(200, 150)]  # 1/8, in stored axes (150 x 200 upright if sideways)
    with Image.open(path) as picture:
        upright = ImageOps.exif_transpose(picture)
        width, height = upright.size
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        expected = resized_box(upright, 32, 32, box)
    difference = np.abs(loaded.astype(int) - expected)
    assert difference.mean() < 1, difference.mean()


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("size", [(32, 32), (100, 30), (30, 100), (20, 40), (16, 64), (150, 150), (400, 400)])
def test_the_crop_is_decoded_at_the_smallest_scale_that_keeps_it_twice_the_size(tmp_path, drafts, orientation,
                                                                                 size):
    """The draft's scale 1/a is the largest a in 1, 2, 4, 8 at which the crop keeps twice
    ``size`` on each side: at 2a it would not (a review's case: 1/8 keeps a 60.04 x 200.1
    crop for (100, 30), which a need rounded up to whole pixels had lost)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    save(tmp_path / "phone.jpg", large_photo(), quality=90, exif=exif)
    loaded = D.load_image_folder(tmp_path, image_size=size, image_fit="crop").images[0]
    assert loaded.shape == (3, *size)
    (_, result), = drafts
    width, height = (1203, 1601) if orientation == 6 else (1601, 1203)  # upright
    scale = 1 if result is None else round(1601 / result[1][2])

    def crop_fits(a):
        left, top, right, bottom = F.centred_box((0, 0, width / a, height / a), size[1] / size[0])
        return right - left >= 2 * size[1] and bottom - top >= 2 * size[0]

    assert crop_fits(scale) and (scale == 8 or not crop_fits(2 * scale)), scale


@pytest.mark.parametrize(("image_size", "image_fit", "message"), [
    (None, "crop", "image_fit 'crop' needs image_size"),
    (16, "pad", "image_fit must be one of stretch, crop, got 'pad'"),
])
def test_a_fit_that_cannot_apply_is_refused_before_any_file_is_read(tmp_path, decoded, image_size, image_fit,
                                                                     message):
    save(tmp_path / "cat" / "a.png", Image.new("L", (3, 3)))
    save(tmp_path / "dog" / "b.png", Image.new("L", (3, 3)))
    for load in (lambda: D.load_image_folder(tmp_path, image_size=image_size, image_fit=image_fit),
                 lambda: D.load_dataset("folder", tmp_path, image_size=image_size, image_fit=image_fit)):
        with pytest.raises(ValueError, match=message):
            load()
    assert decoded == []


# -- every bad file in one report ---------------------------------------------------------
def good_images(root, n=3):
    for i in range(n):
        save(root / f"good{i}.png", Image.new("RGB", (8, 8), (10 * i, 0, 0)))


def truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_every_bad_header_is_reported_before_any_image_is_decoded(tmp_path, decoded):
    good_images(tmp_path)
    (tmp_path / "a_empty.png").write_bytes(b"")
    (tmp_path / "page.jpg").write_bytes(b"<html>404 Not Found</html>")  # a failed download
    (tmp_path / "zz_last.gif").write_bytes(b"GIF89a")  # cut inside its header
    with pytest.raises(DatasetError) as error:
        D.load_image_folder(tmp_path, image_size=8)
    assert decoded == []  # found from the headers: nothing was decoded first
    message = str(error.value)
    assert message.startswith(f"3 of the 6 images in {tmp_path} cannot be read (found from their headers")
    assert re.search(r"a_empty\.png: empty \(0 bytes\)", message)
    assert re.search(r"page\.jpg: UnidentifiedImageError: not a format Pillow knows", message)
    assert "zz_last.gif" in message


def test_every_image_that_fails_to_decode_is_reported_after_reading_the_rest(tmp_path, decoded):
    good_images(tmp_path)
    truncated_png(tmp_path / "cut1.png")
    truncated_png(tmp_path / "cut2.png")
    save(tmp_path / "deep.tif", Image.fromarray(np.full((8, 8), 1.5, dtype=np.float32)))
    with pytest.raises(DatasetError) as error:
        D.load_image_folder(tmp_path, image_size=8)
    assert decoded[-3:] == ["good0.png", "good1.png", "good2.png"]  # went on past the bad files
    lines = str(error.value).splitlines()
    assert lines[0] == f"3 of the 6 images in {tmp_path} cannot be read; fix or remove them:"
    assert re.fullmatch(r"  cannot read image .*cut1\.png: OSError: image file is truncated.*", lines[1])
    assert re.fullmatch(r"  cannot read image .*cut2\.png: OSError: .*", lines[2])
    assert re.fullmatch(r"  image .*deep\.tif is a floating-point image .*", lines[3])
    assert len(lines) == 4


def test_more_than_twenty_bad_files_are_listed_twenty_and_counted(tmp_path):
    good_images(tmp_path, 1)
    for i in range(25):
        (tmp_path / f"empty{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as error:
        D.load_image_folder(tmp_path)
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"25 of the 26 images in {tmp_path} cannot be read")
    assert lines[1:21] == [f"  cannot read image {tmp_path / f'empty{i:02d}.jpg'}: empty (0 bytes)" for i in range(20)]
    assert lines[21:] == ["  ... and 5 more"]


def test_one_bad_file_keeps_its_own_message(tmp_path):
    good_images(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"^cannot read image .*empty\.png: empty \(0 bytes\)$"):
        D.load_image_folder(tmp_path)


def test_read_image_calls_an_empty_file_empty(tmp_path):
    # it was "not a format Pillow knows", which sends one looking for the wrong problem
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot read image .*empty\.png: empty \(0 bytes\)"):
        F.read_image(tmp_path / "empty.png")


def test_an_image_of_another_size_names_the_files_that_failed_before_it(tmp_path):
    """Without image_size, an image of another size stops the load at once; the files
    found unreadable before it went unmentioned until the next run."""
    truncated_png(tmp_path / "a_cut.png")
    good_images(tmp_path)
    save(tmp_path / "z_wide.png", Image.new("RGB", (16, 8)))
    with pytest.raises(DatasetError) as error:
        D.load_image_folder(tmp_path)
    message = str(error.value)
    assert "z_wide.png is 16x8 (width x height)" in message and "pass image_size" in message
    assert "1 file(s) before it could not be read" in message and "a_cut.png" in message
