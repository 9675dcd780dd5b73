"""Datasets: digits, CIFAR-10 binary, image folders, splits, statistics.

Every test builds its own tiny data in tmp_path: nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import unicodedata
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from swav_ref.data import datasets as D
from swav_ref.data import image_files as F
from swav_ref.data.datasets import DatasetError, ImageDataset


# -- helpers -----------------------------------------------------------------------------
def write_cifar_file(path, images, labels):
    """Records of 1 label byte + 3072 pixel bytes, as the CIFAR-10 binary version has."""
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())


def make_cifar(root, n_per_file=3, seed=0):
    """A tiny CIFAR-10 tree under root/cifar-10-batches-bin; returns what was written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, (n_per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_file)
        write_cifar_file(folder / name, images, labels)
        written[name] = (images, labels)
    (folder / "batches.meta.txt").write_text("\n".join(D.CIFAR10_CLASSES) + "\n\n")
    return folder, written


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def save_image(path, picture, **options):
    """Save a Pillow image (any mode, any format Pillow picks from the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, **options)
    return path


#: The tiny CIFAR files built here hold a few records, not the real 10000 per file.
small_cifar = pytest.mark.filterwarnings(r"ignore:CIFAR-10 file .* holds \d+ records:UserWarning")


# -- ImageDataset and splits -------------------------------------------------------------
def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        ImageDataset(images=np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.uint8), labels=np.zeros(3), class_names=("a",))
    with pytest.raises(ValueError, match="outside 0..1"):
        ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.uint8), labels=[0, 2], class_names=("a", "b"))


def test_image_dataset_rejects_channels_last_images():
    # (N, H, W, C) was taken as 16 channels of 16 x 3 images
    with pytest.raises(ValueError, match=r"channels-last.*transpose\(0, 3, 1, 2\)"):
        ImageDataset(images=np.zeros((300, 16, 16, 3), dtype=np.uint8))
    for shape in ((2, 3, 16, 16), (2, 4, 3, 3), (2, 1, 8, 1)):  # channels first: accepted
        assert ImageDataset(images=np.zeros(shape, dtype=np.uint8)).n_channels == shape[1]


def test_image_dataset_names_classes_when_only_labels_are_given():
    ds = ImageDataset(images=np.zeros((3, 1, 4, 4), dtype=np.uint8), labels=[0, 2, 1])
    assert ds.class_names == ("0", "1", "2")
    assert ds.subset([0, 1]).class_names == ("0", "1", "2")
    with pytest.raises(ValueError, match="outside 0..1"):  # given names still bound the labels
        ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.uint8), labels=[0, 2], class_names=("a", "b"))
    with pytest.raises(ValueError, match="-1"):
        ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.uint8), labels=[-1, 1])


@pytest.mark.parametrize(
    "labels, shown",
    [([0.2, 1.7], r"label 0\.2 \(at index 0\)"), ([0.0, np.nan], r"label nan \(at index 1\)"),
     ([np.inf, 1.0], r"label inf \(at index 0\)"), ([0.0, 1e20], r"label 1e\+20")],
)
def test_image_dataset_refuses_labels_that_are_not_whole_numbers(labels, shown):
    # a cast to int64 made 1.7 class 1 and NaN -2**63
    with pytest.raises(ValueError, match=shown + ".*not a whole number"):
        ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.uint8), labels=labels)


def test_image_dataset_takes_whole_float_labels_as_classes():
    ds = ImageDataset(images=np.zeros((2, 1, 4, 4), dtype=np.uint8), labels=np.array([1.0, 0.0]))
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [1, 0] and ds.class_names == ("0", "1")


def test_digits_scaled_to_bytes():
    from sklearn.datasets import load_digits

    ds = D.load_digits_dataset()
    raw = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    # 0..16 -> 0..255: every raw value v maps to round(v * 255 / 16), 16 -> 255
    for v in range(17):
        mask = raw.images == v
        if mask.any():
            assert np.all(ds.images[:, 0][mask] == round(v * 255 / 16))
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert ds.class_names == tuple(str(i) for i in range(10))


def indexed(labels, n_classes=10):
    """A data set whose image i spells i in two pixels, so a split's indices can be read back."""
    n = len(labels)
    idx = np.arange(n)
    images = np.stack([idx // 256, idx % 256], axis=1).astype(np.uint8).reshape(n, 1, 1, 2)
    return ImageDataset(images=images, labels=labels, class_names=tuple(map(str, range(n_classes))))


def indices_of(ds):
    return ds.images[:, 0, 0, 0].astype(int) * 256 + ds.images[:, 0, 0, 1]


def test_split_is_stratified_disjoint_and_seeded():
    labels = D.load_digits_dataset().labels
    ds = indexed(labels)
    train, test = D.split_dataset(ds, test_fraction=0.2, seed=0)
    train_idx, test_idx = indices_of(train), indices_of(test)
    assert set(train_idx).isdisjoint(test_idx)
    assert sorted(np.concatenate([train_idx, test_idx])) == list(range(len(labels)))
    np.testing.assert_array_equal(train.labels, labels[train_idx])
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.round(0.2 * counts))
    again_train, again_test = D.split_dataset(ds, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(indices_of(again_test), test_idx)
    _, other = D.split_dataset(ds, test_fraction=0.2, seed=1)
    assert not np.array_equal(indices_of(other), test_idx)


def test_split_follows_the_documented_rule():
    """Per class in label order: permute that class's indices with one PCG64(seed), the
    first round(f * n_class) go to test."""
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1, 1])
    _, test = D.split_dataset(indexed(labels, 3), test_fraction=0.25, seed=7)
    gen = np.random.Generator(np.random.PCG64(7))
    expected = []
    for c in range(3):
        members = np.flatnonzero(labels == c)
        expected += list(gen.permutation(members)[: round(0.25 * members.size)])
    np.testing.assert_array_equal(indices_of(test), sorted(expected))


def test_split_keeps_original_order_and_handles_unlabelled():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    train, test = D.split_dataset(ImageDataset(images=images), test_fraction=0.3, seed=5)
    assert train.labels is None and test.labels is None
    assert len(test) == 3 and len(train) == 7
    values = np.concatenate([train.images.ravel(), test.images.ravel()])
    assert sorted(values) == list(range(10))
    assert np.all(np.diff(train.images.ravel().astype(int)) > 0)  # original order kept
    with pytest.raises(ValueError, match="test_fraction"):
        D.split_dataset(ImageDataset(images=images), test_fraction=1.0)


@pytest.mark.parametrize("n", [0, 1])
def test_split_of_too_few_images_is_a_dataset_error(n):
    # a DatasetError (which the command line reports) rather than a bare ValueError
    ds = ImageDataset(images=np.zeros((n, 1, 2, 2), dtype=np.uint8), name="tiny")
    with pytest.raises(DatasetError, match=f"tiny: cannot split {n} image.*at least 2 images"):
        D.split_dataset(ds)


def test_split_keeps_one_training_image_per_class():
    images = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    ds = ImageDataset(images=images, labels=[0, 1, 1], class_names=("a", "b"))
    train, test = D.split_dataset(ds, test_fraction=0.9, seed=0)
    assert set(train.labels) == {0, 1}


def test_channel_stats_match_float_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 3, 5, 4), dtype=np.uint8)
    mean, std = D.channel_stats(images, chunk=8)  # several chunks
    x = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-12)
    with pytest.raises(ValueError, match="uint8"):
        D.channel_stats(x)


# -- CIFAR-10 ----------------------------------------------------------------------------
@small_cifar
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_reads_records(tmp_path, point_at):
    folder, written = make_cifar(tmp_path)
    train, test = D.load_cifar10(tmp_path if point_at == "parent" else folder)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    expected_train = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    np.testing.assert_array_equal(train.images, expected_train)
    np.testing.assert_array_equal(test.labels, written["test_batch.bin"][1])
    assert train.class_names == D.CIFAR10_CLASSES


@small_cifar
def test_cifar10_pixel_layout_is_channel_planes(tmp_path):
    # one record whose red plane is 1, green 2, blue 3, with pixel (0, 1) of red = 9
    record = np.concatenate([[7], np.full(1024, 1), np.full(1024, 2), np.full(1024, 3)]).astype(np.uint8)
    record[1 + 1] = 9
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (tmp_path / name).write_bytes(record.tobytes())
    train, _ = D.load_cifar10(tmp_path)
    assert train.labels[0] == 7
    assert train.images[0, 0, 0, 1] == 9 and train.images[0, 0, 0, 0] == 1
    assert train.images[0, 1].max() == 2 and train.images[0, 2].min() == 3


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found.*nowhere"):
        D.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="binary"):
        D.load_cifar10(tmp_path)  # exists, but holds nothing


def test_cifar10_missing_file(tmp_path):
    folder, _ = make_cifar(tmp_path)
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DatasetError, match="missing.*test_batch.bin"):
        D.load_cifar10(tmp_path)


def test_cifar10_truncated_file(tmp_path):
    folder, _ = make_cifar(tmp_path)
    data = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(data[:-100])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin.*truncated.*9119 bytes"):
        D.load_cifar10(tmp_path)


def test_cifar10_file_cut_at_a_record_boundary_warns(tmp_path, monkeypatch):
    # real files hold 10000 records; pretend that is 3 so the test files stay tiny
    assert D._CIFAR_RECORDS_PER_FILE == 10000
    monkeypatch.setattr(D, "_CIFAR_RECORDS_PER_FILE", 3)
    folder, written = make_cifar(tmp_path)
    images, labels = written["data_batch_4.bin"]
    write_cifar_file(folder / "data_batch_4.bin", images[:2], labels[:2])  # a valid size, one image short
    with pytest.warns(UserWarning) as record:
        train, _ = D.load_cifar10(tmp_path)
    assert len(train) == 14
    assert [str(w.message) for w in record] == [
        f"CIFAR-10 file {folder / 'data_batch_4.bin'} holds 2 records, but every file of the real data "
        "set holds 3; it may be truncated at a record boundary"
    ]
    assert record[0].filename == __file__  # points at the caller, not at the library


def test_cifar10_bad_label(tmp_path):
    folder, written = make_cifar(tmp_path)
    images, labels = written["data_batch_2.bin"]
    labels = labels.copy()
    labels[1] = 10
    write_cifar_file(folder / "data_batch_2.bin", images, labels)
    with pytest.raises(DatasetError, match=r"data_batch_2\.bin.*record 1 has label 10"):
        D.load_cifar10(tmp_path)


def test_cifar10_bad_meta(tmp_path):
    folder, _ = make_cifar(tmp_path)
    (folder / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match="batches.meta.txt.*2 names"):
        D.load_cifar10(folder)


def test_cifar10_meta_that_is_not_utf8_names_the_file(tmp_path):
    folder, _ = make_cifar(tmp_path)
    (folder / "batches.meta.txt").write_bytes(b"airplane\n\xff\xfe\xfa\n")
    with pytest.raises(DatasetError, match=r"batches\.meta\.txt is not UTF-8"):
        D.load_cifar10(folder)


# -- image folders -----------------------------------------------------------------------
def test_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    pictures = {}
    for cls, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            array = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)  # H=5, W=4, RGB
            save_png(tmp_path / cls / f"{i}.png", array)
            pictures[(cls, i)] = array
    (tmp_path / "cat" / "notes.txt").write_text("not an image")  # skipped, with a warning
    with pytest.warns(UserWarning, match=r"skipped 1 file that is not an image of a known type: \.txt x1"):
        ds = D.load_image_folder(tmp_path)
    assert ds.class_names == ("cat", "dog")  # sorted
    assert ds.images.shape == (5, 3, 5, 4)
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ds.images[3], np.transpose(pictures[("dog", 0)], (2, 0, 1)))


def test_flat_folder_greyscale_has_no_labels(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", np.full((4, 4), 10 * i, dtype=np.uint8))
    ds = D.load_image_folder(tmp_path)
    assert ds.labels is None and ds.class_names == ()
    assert ds.images.shape == (3, 1, 4, 4)
    assert ds.images[2].max() == 20


def test_folder_mixed_modes_become_rgb(tmp_path):
    save_png(tmp_path / "a.png", np.full((4, 4), 100, dtype=np.uint8))
    save_png(tmp_path / "b.png", np.zeros((4, 4, 3), dtype=np.uint8))
    ds = D.load_image_folder(tmp_path)
    assert ds.images.shape == (2, 3, 4, 4)
    assert np.all(ds.images[0] == 100)  # grey replicated into R, G, B


def test_folder_resize(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((4, 6, 3), dtype=np.uint8))
    save_png(tmp_path / "b.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    ds = D.load_image_folder(tmp_path, image_size=5)
    assert ds.images.shape == (2, 3, 5, 5)
    assert np.all(ds.images[1] == 200)


def test_folder_resize_takes_numpy_integers_and_pairs(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((4, 6, 3), dtype=np.uint8))
    assert D.load_image_folder(tmp_path, image_size=np.int64(3)).images.shape == (1, 3, 3, 3)
    assert D.load_image_folder(tmp_path, image_size=(np.int32(2), 5)).images.shape == (1, 3, 2, 5)


@pytest.mark.parametrize("image_size", [0, -3, True, 2.5, (8,), (8, 0), (8, 8.0), "8"])
def test_folder_bad_image_size_is_refused_before_reading(tmp_path, image_size):
    (tmp_path / "bad.png").write_bytes(b"not a png: decoding it would fail with another message")
    with pytest.raises(ValueError, match=r"image_size must be a positive integer .*got"):
        D.load_image_folder(tmp_path, image_size=image_size)


def test_folder_wrong_size_names_file(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    save_png(tmp_path / "b.png", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"b\.png is 5x4.*a\.png is 4x4.*image_size"):
        D.load_image_folder(tmp_path)


def test_folder_corrupt_image_names_file(tmp_path):
    save_png(tmp_path / "good.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError, match=r"cannot read image .*bad\.png"):
        D.load_image_folder(tmp_path)


def test_folder_truncated_image_names_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png"):
        D.load_image_folder(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        D.load_image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="holds no images"):
        D.load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class holds no images"):
        D.load_image_folder(tmp_path)
    save_png(tmp_path / "empty_class" / "x.png", np.zeros((2, 2), dtype=np.uint8))
    save_png(tmp_path / "loose.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(DatasetError, match="mixes class sub-folders"):
        D.load_image_folder(tmp_path)


def test_folder_applies_exif_orientation(tmp_path):
    # stored 32 wide x 16 high, left half black; orientation 6 says "turn 90 degrees clockwise
    # to view", which puts the stored left half on top of a 16 wide x 32 high picture
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    save_image(tmp_path / "phone.jpg", Image.fromarray(stored), exif=exif, quality=95)
    ds = D.load_image_folder(tmp_path)
    assert ds.images.shape == (1, 1, 32, 16)
    upright = ds.images[0, 0].astype(int)
    assert upright[:14].max() < 40 and upright[18:].min() > 215  # JPEG blurs the edge a little


def test_folder_reads_jpeg_aliases_and_warns_about_the_rest(tmp_path):
    for i, name in enumerate(["a.jfif", "b.JPE", "c.png"]):
        save_image(tmp_path / name, Image.fromarray(np.full((8, 8), 50 * i, dtype=np.uint8)), format="PNG" if i == 2 else "JPEG")
    for name in ["x.heic", "y.heic", "notes.txt"]:
        (tmp_path / name).write_bytes(b"not readable here")
    # hidden files and OS metadata stay silent (and __MACOSX does not make the folder labelled)
    (tmp_path / ".DS_Store").write_bytes(b"")
    (tmp_path / "Thumbs.db").write_bytes(b"")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._a.jfif").write_bytes(b"")
    with pytest.warns(UserWarning) as record:
        ds = D.load_image_folder(tmp_path)
    assert ds.images.shape == (3, 1, 8, 8) and ds.labels is None
    assert [str(w.message) for w in record] == [
        f"skipped 3 files that are not images of a known type: .heic x2, .txt x1 (in {tmp_path})"
    ]


def test_folder_of_only_images_and_hidden_files_is_silent(tmp_path):
    save_png(tmp_path / "cat" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = D.load_image_folder(tmp_path)
    assert ds.class_names == ("cat",)


def test_class_folders_are_read_recursively(tmp_path):
    save_png(tmp_path / "cat" / "b.png", np.full((2, 2), 1, dtype=np.uint8))
    save_png(tmp_path / "cat" / "2019" / "x.png", np.full((2, 2), 2, dtype=np.uint8))
    save_png(tmp_path / "cat" / "2019" / "deeper" / "y.png", np.full((2, 2), 3, dtype=np.uint8))
    save_png(tmp_path / "cat" / ".thumbnails" / "z.png", np.full((2, 2), 99, dtype=np.uint8))  # hidden
    save_png(tmp_path / "dog" / "2020" / "a.png", np.full((2, 2), 4, dtype=np.uint8))  # only nested
    ds = D.load_image_folder(tmp_path)
    assert ds.class_names == ("cat", "dog")
    # a folder's own images first, then each sub-folder's in name order
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1])



# -- the same order on every OS ------------------------------------------------------------
#: Names whose case-insensitive order (Windows paths) differs from their code-point order.
MIXED_CASE_NAMES = ("One", "Three", "deux", "zéro", "_x", "B", "a")
CODE_POINT_ORDER = ["B", "One", "Three", "_x", "a", "deux", "zéro"]


class ListedFolder:
    """A folder whose listing is given, as paths of one OS's flavour: PureWindowsPath
    objects compare case-insensitively, as Path does on Windows, so the order a Windows
    machine would give can be checked on any machine."""

    def __init__(self, paths):
        self.paths = list(paths)

    def iterdir(self):
        return iter(self.paths)


@pytest.mark.parametrize("flavour", ["windows", "posix"])
def test_folder_entries_are_in_code_point_order_on_every_os(flavour):
    # Path order is case-insensitive on Windows: labels and the seeded split would differ
    # between a model trained on Windows and evaluated on Linux.
    from pathlib import PurePosixPath, PureWindowsPath

    parent = PureWindowsPath("C:/data") if flavour == "windows" else PurePosixPath("/data")
    entries = F.visible_entries(ListedFolder(parent / name for name in reversed(MIXED_CASE_NAMES)))
    assert [p.name for p in entries] == CODE_POINT_ORDER == sorted(MIXED_CASE_NAMES)


def test_a_decomposed_name_sorts_as_its_composed_form():
    # macOS may hand back names decomposed (NFD: "e" + U+0301); "zéro" composed sorts after
    # "zf" (é is U+00E9), decomposed before it (e is U+0065) unless normalised.
    from pathlib import PurePosixPath

    decomposed = unicodedata.normalize("NFD", "zéro")
    assert decomposed != "zéro"
    entries = F.visible_entries(ListedFolder(PurePosixPath("/data") / n for n in (decomposed, "zf", "zeta")))
    assert [p.name for p in entries] == ["zeta", "zf", decomposed]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(exclude_characters="/\0", exclude_categories=("Cs",)), min_size=1,
                        max_size=6).map(lambda n: unicodedata.normalize("NFC", n)).filter(lambda n: n[0] != "."),
                unique=True, max_size=8))
def test_composed_names_keep_the_order_linux_gave(names):
    # The key changed, the order of NFC names (all Linux and Windows normally hold) did not:
    # a folder read on Linux before the change gives the same labels and split after it.
    from pathlib import PurePosixPath

    paths = [PurePosixPath("/data/some folder") / name for name in names]
    assert F.visible_entries(ListedFolder(paths)) == sorted(p for p in paths if not F.is_ignored(p))


def test_class_labels_follow_code_point_order(tmp_path):
    for value, name in enumerate(MIXED_CASE_NAMES):
        save_png(tmp_path / name / "0.png", np.full((2, 2), value, dtype=np.uint8))
    ds = D.load_image_folder(tmp_path)
    assert ds.class_names == tuple(CODE_POINT_ORDER)
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [MIXED_CASE_NAMES.index(n) for n in CODE_POINT_ORDER])


def make_link(link, target, target_is_directory=False):
    try:
        os.symlink(target, link, target_is_directory=target_is_directory)
    except (OSError, NotImplementedError) as exc:
        pytest.skip(f"cannot make symbolic links here: {exc}")


def test_broken_link_with_an_image_name_is_an_error(tmp_path):
    save_png(tmp_path / "cat" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    make_link(tmp_path / "cat" / "gone.png", tmp_path / "elsewhere" / "gone.png")
    with pytest.raises(DatasetError, match=r"broken link .*cat.gone\.png -> .*elsewhere"):
        D.load_image_folder(tmp_path)


def test_folder_link_loop_is_an_error(tmp_path):
    save_png(tmp_path / "cat" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    make_link(tmp_path / "cat" / "again", tmp_path / "cat", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"folder link .*again leads back"):
        D.load_image_folder(tmp_path)


def test_transparent_pixels_become_white_in_colour(tmp_path):
    # transparent red, half-transparent red, opaque blue
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    save_png(tmp_path / "rgba.png", rgba)
    # a palette image whose entry 0 (red) is transparent, next to opaque green
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 1])
    save_image(tmp_path / "palette.png", palette, transparency=0)
    ds = D.load_image_folder(tmp_path)
    assert ds.images.shape == (2, 3, 1, 3)
    pixels = np.transpose(ds.images, (0, 2, 3, 1))[:, 0]  # (image, x, rgb)
    np.testing.assert_array_equal(pixels[0], [[255, 255, 255], [0, 255, 0], [0, 255, 0]])  # palette.png
    np.testing.assert_array_equal(pixels[1], [[255, 255, 255], [255, 127, 127], [0, 0, 255]])  # rgba.png


def test_transparent_pixels_become_white_in_greyscale(tmp_path):
    la = np.array([[[0, 0], [100, 255]]], dtype=np.uint8)  # transparent black, opaque grey
    save_image(tmp_path / "la.png", Image.fromarray(la, "LA"))
    save_png(tmp_path / "l.png", np.full((1, 2), 7, dtype=np.uint8))
    ds = D.load_image_folder(tmp_path)
    assert ds.images.shape == (2, 1, 1, 2)  # still one channel
    np.testing.assert_array_equal(ds.images[0, 0, 0], [7, 7])
    np.testing.assert_array_equal(ds.images[1, 0, 0], [255, 100])


@pytest.mark.parametrize("name", ["ramp.png", "ramp.tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, name):
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    picture = Image.fromarray(ramp)
    assert picture.mode.startswith("I;16")
    save_image(tmp_path / name, picture)
    ds = D.load_image_folder(tmp_path)
    loaded = ds.images[0, 0].ravel()
    assert ds.images.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(loaded, ramp.ravel() >> 8)  # the high byte
    assert loaded[0] == 0 and loaded[-1] == 255 and np.all(np.diff(loaded.astype(int)) >= 0)
    assert len(np.unique(loaded)) == 256


@pytest.mark.parametrize(("dtype", "kind"), [(np.float32, "floating-point"), (np.int32, "32-bit integer")])
def test_32_bit_images_are_refused(tmp_path, dtype, kind):
    save_png(tmp_path / "fine.png", np.zeros((2, 2), dtype=np.uint8))
    save_image(tmp_path / "deep.tif", Image.fromarray(np.full((2, 2), 1000, dtype=dtype)))
    with pytest.raises(DatasetError, match=rf"deep\.tif is a {kind} image .*convert it to an 8- or 16-bit"):
        D.load_image_folder(tmp_path)


# -- by name -----------------------------------------------------------------------------
@small_cifar
def test_load_dataset_dispatch(tmp_path):
    train, test = D.load_dataset("digits")
    assert len(train) + len(test) == 1797 and test.name == "digits/test"
    (tmp_path / "c").mkdir()
    make_cifar(tmp_path / "c")
    c_train, c_test = D.load_dataset("cifar10", tmp_path / "c")
    assert len(c_train) == 15 and len(c_test) == 3
    for i in range(5):
        save_png(tmp_path / "flat" / f"{i}.png", np.zeros((3, 3), dtype=np.uint8))
    f_train, f_test = D.load_dataset("folder", tmp_path / "flat")
    assert len(f_train) == 5 and f_test is None  # no labels: no held-out part, which nothing could score
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("mnist")
    with pytest.raises(ValueError, match="needs data_dir"):
        D.load_dataset("cifar10")
    save_png(tmp_path / "single" / "cat" / "only.png", np.zeros((3, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="single: cannot split 1 image"):
        D.load_dataset("folder", tmp_path / "single")


# -- robustness: memory, link fan-out, sizes, odd entries ---------------------------------
def test_mixed_grey_and_colour_resized_match_converting_each_to_rgb(tmp_path):
    # Greyscale images are resized as one channel and widened at the end: the same pixels
    # as converting every image to RGB before the (bilinear, antialiased) resize.
    rng = np.random.default_rng(3)
    save_png(tmp_path / "a.png", rng.integers(0, 256, (37, 23), dtype=np.uint8))
    save_png(tmp_path / "b.png", rng.integers(0, 256, (19, 41, 3), dtype=np.uint8))
    save_png(tmp_path / "c.png", rng.integers(0, 256, (30, 30), dtype=np.uint8) > 100)  # mode "1"
    for size in (8, (13, 50)):
        ds = D.load_image_folder(tmp_path, image_size=size)
        height, width = (size, size) if isinstance(size, int) else size
        for i, name in enumerate(("a.png", "b.png", "c.png")):
            with Image.open(tmp_path / name) as img:
                expected = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(ds.images[i], np.transpose(np.asarray(expected), (2, 0, 1)))


def test_folder_holds_one_full_size_image_at_a_time(tmp_path, monkeypatch):
    import weakref

    for i in range(4):
        save_png(tmp_path / f"{i}.png", np.full((64, 48), 10 * i, dtype=np.uint8))
    save_png(tmp_path / "4.png", np.zeros((64, 48, 3), dtype=np.uint8))
    alive, most = [0], [0]

    decode = F._decode

    def counted_decode(path, *args):
        picture, box = decode(path, *args)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(picture, lambda: alive.__setitem__(0, alive[0] - 1))
        return picture, box

    monkeypatch.setattr(F, "_decode", counted_decode)
    ds = D.load_image_folder(tmp_path, image_size=8)
    assert ds.images.shape == (5, 3, 8, 8)
    assert most[0] == 1  # each decoded image is gone before the next is read


def test_flattening_alpha_does_not_widen_to_16_bytes_a_pixel():
    import tracemalloc

    pixels = np.random.default_rng(0).integers(0, 256, (1000, 1000, 4), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    tracemalloc.start()
    try:
        flat = F.flatten_alpha(picture)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * pixels.nbytes  # the uint32 blend alone took 4x, its temporaries 11x in all
    colour, alpha = pixels[..., :3].astype(np.int64), pixels[..., 3:].astype(np.int64)
    np.testing.assert_array_equal(np.asarray(flat), (colour * alpha + 255 * (255 - alpha) + 127) // 255)


def test_image_too_large_for_memory_names_file_and_size(tmp_path, monkeypatch):
    save_image(tmp_path / "big.png", Image.new("RGBA", (30, 20)))

    def no_memory(picture):
        raise MemoryError

    monkeypatch.setattr(F, "flatten_alpha", no_memory)
    with pytest.raises(DatasetError, match=r"big\.png \(30x20 pixels\) is too large"):
        D.load_image_folder(tmp_path)


def test_folder_links_that_fan_out_are_an_error(tmp_path):
    # L0 holds 3 links to L1, L1 holds 3 links to L2, which holds one image: no loop, but 9
    # ways to one image (6 levels of 6 made one image 46656, and the walk exponential)
    for k in range(3):
        (tmp_path / f"L{k}").mkdir()
    save_png(tmp_path / "L2" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    for k in range(2):
        for j in range(3):
            make_link(tmp_path / f"L{k}" / f"l{j}", tmp_path / f"L{k + 1}", target_is_directory=True)
    (tmp_path / "data").mkdir()
    make_link(tmp_path / "data" / "cls", tmp_path / "L0", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"folder .*cls.l0.l1 is the folder .*cls.l0.l0 again \(both lead to .*L2,"):
        D.load_image_folder(tmp_path / "data")


def test_two_classes_linking_to_one_folder_is_an_error(tmp_path):
    save_png(tmp_path / "shared" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "data").mkdir()
    make_link(tmp_path / "data" / "cat", tmp_path / "shared", target_is_directory=True)
    make_link(tmp_path / "data" / "dog", tmp_path / "shared", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"data.dog is the folder .*data.cat again"):
        D.load_image_folder(tmp_path / "data")


def test_unreadable_sub_folder_is_a_dataset_error(tmp_path, monkeypatch):
    import pathlib

    save_png(tmp_path / "cat" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    save_png(tmp_path / "cat" / "locked" / "b.png", np.zeros((2, 2), dtype=np.uint8))
    iterdir = pathlib.Path.iterdir

    def refuse_locked(self):  # chmod 000 does not stop root, so refuse the listing here
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", refuse_locked)
    with pytest.raises(DatasetError, match=r"cannot list folder .*cat.locked: Permission denied"):
        D.load_image_folder(tmp_path)


def test_entry_that_cannot_be_inspected_is_a_dataset_error(tmp_path, monkeypatch):
    save_png(tmp_path / "cat" / "a.png", np.zeros((2, 2), dtype=np.uint8))
    save_png(tmp_path / "cat" / "b.png", np.zeros((2, 2), dtype=np.uint8))
    stat = os.stat

    def refuse_b(path, *args, **kwargs):
        if os.fspath(path).endswith("b.png"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refuse_b)
    with pytest.raises(DatasetError, match=r"cannot inspect .*cat.b\.png: Permission denied"):
        D.load_image_folder(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_with_an_image_name_is_skipped_and_called_what_it_is(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((2, 2), dtype=np.uint8))
    os.mkfifo(tmp_path / "b.png")  # opening it would block until something writes
    with pytest.warns(UserWarning) as record:
        ds = D.load_image_folder(tmp_path)
    assert len(ds) == 1
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "named pipe" in messages[0] and "b.png" in messages[0], messages
    assert "of a known type" not in messages[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_read_image_refuses_a_named_pipe_without_opening_it(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "b.png")

    def no_open(*args, **kwargs):  # opening the pipe would hang the test
        raise AssertionError("opened a named pipe")

    monkeypatch.setattr(Image, "open", no_open)
    monkeypatch.setattr(os, "open", no_open)
    with pytest.raises(DatasetError, match=r"b\.png is a named pipe \(FIFO\), not a regular file"):
        F.read_image(tmp_path / "b.png")


def test_file_link_that_loops_is_not_called_broken(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((2, 2), dtype=np.uint8))
    make_link(tmp_path / "b.png", "b.png")
    with pytest.raises(DatasetError, match=r"link .*b\.png -> b\.png loops"):
        D.load_image_folder(tmp_path)


@small_cifar
def test_cifar10_batch_file_larger_than_a_real_one_names_its_size(tmp_path):
    folder, _ = make_cifar(tmp_path)
    size = (D._CIFAR_RECORDS_PER_FILE + 1) * D._CIFAR_RECORD
    with open(folder / "data_batch_2.bin", "r+b") as f:
        f.truncate(size)
    with pytest.raises(DatasetError, match=rf"data_batch_2\.bin is {size} bytes, more than the 30730000"):
        D.load_cifar10(tmp_path)


@small_cifar
def test_cifar10_huge_meta_file_is_refused_before_reading(tmp_path):
    folder, _ = make_cifar(tmp_path)
    with open(folder / "batches.meta.txt", "r+b") as f:
        f.truncate(2**20)
    with pytest.raises(DatasetError, match=r"batches\.meta\.txt is 1048576 bytes, more than the 65536"):
        D.load_cifar10(tmp_path)


@small_cifar
def test_cifar10_batch_that_is_not_a_regular_file_says_what_it_is(tmp_path):
    folder, _ = make_cifar(tmp_path)
    (folder / "data_batch_1.bin").unlink()
    (folder / "data_batch_1.bin").mkdir()
    with pytest.raises(DatasetError, match=r"data_batch_1\.bin is a folder, not a regular file"):
        D.load_cifar10(tmp_path)
    (folder / "data_batch_1.bin").rmdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "data_batch_1.bin")
        with pytest.raises(DatasetError, match=r"data_batch_1\.bin is a named pipe \(FIFO\), not a regular file"):
            D.load_cifar10(tmp_path)
        (folder / "data_batch_1.bin").unlink()
    make_link(folder / "data_batch_1.bin", "data_batch_1.bin")
    with pytest.raises(DatasetError, match=r"data_batch_1\.bin is a link that loops, not a regular file"):
        D.load_cifar10(tmp_path)


def test_folders_on_a_file_system_without_inode_numbers_are_told_apart(tmp_path, monkeypatch):
    """Some network and FUSE file systems report inode 0 for every folder: the second class
    folder was then 'the same folder again' and the load refused (review of the walk)."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        save_png(tmp_path / name / "a.png", np.full((8, 8), 100, dtype=np.uint8))
    real_stat = os.stat

    class NoInode:
        def __init__(self, result):
            self._result = result

        def __getattr__(self, name):
            return 0 if name == "st_ino" else getattr(self._result, name)

    monkeypatch.setattr(F.os, "stat", lambda path, *args, **kwargs: NoInode(real_stat(path, *args, **kwargs)))
    assert F.folder_id(tmp_path / "cat") != F.folder_id(tmp_path / "dog")
    assert D.load_image_folder(tmp_path).class_names == ("cat", "dog")
