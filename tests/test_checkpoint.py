"""Checkpoints: exact round trips, atomic writes under crashes, and every kind of damage named."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import numpy as np
import pytest

from swav_ref.backend import Random, asarray
from swav_ref import checkpoint
from swav_ref.checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "conv1.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(5,)),
        "step": np.asarray(12345678901234, dtype=np.int64),  # 0-d
        "lr": np.float64(0.125),  # NumPy scalar
        "mask": np.array([True, False, True]),
        "pixels": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": np.arange(12.0).reshape(3, 4).T,  # not C-contiguous
        "big_endian": np.arange(3, dtype=">i4"),
        "layer1/0/bn": np.ones(2),
    }


def sample_metadata():
    rng = Random(7)
    rng.uniform((3,))
    return {
        "epoch": 3,
        "config": {"sizes": [32, 16], "nested": {"eps": 0.05, "name": "swav", "flag": None}},
        "rng": rng.get_state(),  # PCG64 state: 128-bit integers
        "big": 2**200 + 1,
        "history": [0.5, float("inf")],
        "text": "σ = 0.1 ✓",
        "numpy_float": np.float32(0.25),
    }


def assert_same_arrays(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        value = np.asarray(value)
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)


def temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- round trips -------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "ckpt.npz"
    arrays, metadata = sample_arrays(), sample_metadata()
    assert save_checkpoint(path, arrays, metadata) == path
    got_arrays, got_metadata = load_checkpoint(path)
    assert_same_arrays(got_arrays, arrays)
    expected_metadata = json.loads(json.dumps({**metadata, "numpy_float": 0.25}))
    assert got_metadata == expected_metadata
    assert got_metadata["rng"]["state"]["state"] == metadata["rng"]["state"]["state"]
    assert got_metadata["big"] == 2**200 + 1
    # the restored generator continues exactly where the saved one would have
    restored = Random(0)
    restored.set_state(got_metadata["rng"])
    original = Random(7)
    original.uniform((3,))
    np.testing.assert_array_equal(restored.normal((4,)), original.normal((4,)))
    assert temp_files(tmp_path) == []


def test_round_trip_from_any_backend(tmp_path, backend):
    host = np.arange(12, dtype=np.float64).reshape(3, 4)
    save_checkpoint(tmp_path / "b.npz", {"w": asarray(host, backend)}, {})
    arrays, metadata = load_checkpoint(tmp_path / "b.npz")
    assert isinstance(arrays["w"], np.ndarray) and metadata == {}
    np.testing.assert_array_equal(arrays["w"], host)


def test_overwrite_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "run" / "deep" / "last.npz"
    save_checkpoint(path, {"a": np.zeros(3)}, {"epoch": 1})
    save_checkpoint(path, {"b": np.ones(2)}, {"epoch": 2})
    arrays, metadata = load_checkpoint(path)
    assert list(arrays) == ["b"] and metadata == {"epoch": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.npz"]


def test_bad_contents_are_refused_before_writing(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {"__swav_ref_format__": np.zeros(1)}, {})
    with pytest.raises(ValueError, match="object arrays would need pickle"):
        save_checkpoint(path, {"o": np.array([{"a": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="JSON.*set"):
        save_checkpoint(path, {"a": np.zeros(1)}, {"s": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def assert_previous_checkpoint_kept(tmp_path, path):
    arrays, metadata = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["good"], np.arange(3.0))
    assert metadata == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


@pytest.mark.parametrize(
    "names, match",
    [
        (["layer", "layer.npy"], r"names collide: 'layer' and 'layer.npy'"),  # npz["layer.npy"] is layer's member
        (["x.npy", "x.npy.npy"], r"names collide: 'x.npy' and 'x.npy.npy'"),
        (["w", "x", "x.npy", "x.npy.npy"], r"collide: 'x' and 'x.npy', 'x.npy' and 'x.npy.npy'"),
        (["a\0b"], r"'a\\x00b' contains a NUL"),  # zip cuts the name at the NUL: stored as 'a'
        (["a\0b", "a\0c"], r"contains a NUL"),
        (["a\\b"], r"'a\\\\b' contains a backslash"),  # 'a/b' when read on Windows
        (["x" * 70_000], r"is 70000 bytes in UTF-8; a zip entry name holds at most 65531"),
        (["é" * 32_766], r"is 65532 bytes in UTF-8"),  # bytes, not characters
    ],
)
def test_names_that_would_not_come_back_are_refused_before_writing(tmp_path, names, match):
    """Each array is stored as NAME.npy, so 'x' and 'x.npy' collide; the new file used to
    replace a good one atomically and then fail its checksum on every load."""
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"good": np.arange(3.0)}, {"epoch": 1})
    with pytest.raises(ValueError, match=match):
        save_checkpoint(path, {name: np.full(2, i) for i, name in enumerate(names)}, {"epoch": 2})
    assert_previous_checkpoint_kept(tmp_path, path)


def test_longest_name_and_npy_suffixes_round_trip(tmp_path):
    path = tmp_path / "ckpt.npz"
    arrays = {
        "x" * checkpoint.MAX_NAME_BYTES: np.zeros(1),
        "a.npy": np.ones(2),  # a '.npy' suffix alone is fine: no 'a' beside it
        "b.npy.npy": np.arange(3),
        "__swav_ref": np.ones(1),  # only the full reserved prefix is reserved
    }
    save_checkpoint(path, arrays, {})
    assert_same_arrays(load_checkpoint(path)[0], arrays)


def test_file_with_colliding_members_still_loads(tmp_path):
    """A file written before such names were refused holds the right data: it is read by
    member name, so it loads (it used to fail its checksum)."""
    arrays = {"layer": np.zeros(2), "layer.npy": np.ones(3), "layer.npy.npy": np.arange(4)}
    metadata_bytes = b'{"epoch": 1}'
    members = {
        **arrays,
        "__swav_ref_format__": np.asarray(1, dtype=np.int64),
        "__swav_ref_metadata__": np.frombuffer(metadata_bytes, np.uint8),
        "__swav_ref_sha256__": np.frombuffer(checkpoint._digest(arrays, metadata_bytes), np.uint8),
    }
    with open(tmp_path / "old.npz", "wb") as f:
        checkpoint._write_npz(f, members)
    got, metadata = load_checkpoint(tmp_path / "old.npz")
    assert_same_arrays(got, arrays)
    assert metadata == {"epoch": 1}


@pytest.mark.parametrize(
    "metadata, error, match",
    [
        ({1: "a"}, ValueError, r"metadata key 1 \(int\) in metadata is not a string"),  # came back as {'1': 'a'}
        ({1: "a", "b": 2}, ValueError, r"key 1 \(int\)"),  # was "'<' not supported"
        ({"c": [{"ok": 1}, {2.5: 1}]}, ValueError, r"key 2.5 \(float\) in metadata\['c'\]\[1\] is not a"),
        ({"c": {None: 1}}, ValueError, r"key None \(NoneType\)"),
        ([("epoch", 1)], TypeError, r"metadata must be a dict \(or None\), got list"),  # was "dictionary update..."
        ("epoch", TypeError, r"metadata must be a dict"),
    ],
)
def test_metadata_must_be_a_dict_with_string_keys(tmp_path, metadata, error, match):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"good": np.arange(3.0)}, {"epoch": 1})
    with pytest.raises(error, match=match):
        save_checkpoint(path, {"good": np.zeros(3)}, metadata)
    assert_previous_checkpoint_kept(tmp_path, path)


def test_deep_or_circular_metadata_is_refused_clearly(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"good": np.arange(3.0)}, {"epoch": 1})

    def nested(levels):
        value = []
        for _ in range(levels - 1):
            value = [value]
        return value

    with pytest.raises(ValueError, match=r"metadata is nested more than 100 levels deep"):
        save_checkpoint(path, {}, {"deep": nested(100_000)})  # was an unwrapped RecursionError
    with pytest.raises(ValueError, match=r"more than 100 levels deep"):
        save_checkpoint(path, {}, {"deep": nested(checkpoint.MAX_METADATA_DEPTH)})  # + the metadata dict
    circular = {"a": []}
    circular["a"].append(circular)
    with pytest.raises(ValueError, match=r"or is circular"):
        save_checkpoint(path, {}, circular)
    assert_previous_checkpoint_kept(tmp_path, path)
    shared = [[1, 2]] * 1000  # one list many times over: checked quickly, stored 1000 times
    save_checkpoint(path, {}, {"deep": nested(checkpoint.MAX_METADATA_DEPTH - 1), "shared": shared})
    assert load_checkpoint(path)[1] == {"deep": nested(checkpoint.MAX_METADATA_DEPTH - 1), "shared": shared}


def test_bad_arguments_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"checkpoint arrays must be a dict of name -> array, got NoneType"):
        save_checkpoint(tmp_path / "a.npz", None)  # was AttributeError
    with pytest.raises(TypeError, match=r"got list"):
        save_checkpoint(tmp_path / "a.npz", [("w", np.zeros(2))])
    with pytest.raises(ValueError, match=r"checkpoint path is empty"):
        save_checkpoint("", {"w": np.zeros(2)})  # was "Device or resource busy" on a rename to '.'
    with pytest.raises(ValueError, match=r"is a folder"):
        save_checkpoint(tmp_path, {"w": np.zeros(2)})
    with pytest.raises(CheckpointError, match=r"checkpoint path is empty"):
        load_checkpoint("")
    assert list(tmp_path.iterdir()) == []


# -- crashes while writing ---------------------------------------------------------------
def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros(4)}, {"epoch": 1})

    def crash(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(path, {"w": np.ones(4)}, {"epoch": 2})
    monkeypatch.undo()
    arrays, metadata = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.zeros(4))
    assert metadata == {"epoch": 1}
    assert temp_files(tmp_path) == []  # the half-done temporary file was removed


def test_write_atomically_keeps_the_old_text_file_when_writing_fails(tmp_path):
    """The results JSON and a run's config.json go through write_atomically too: a failure
    halfway through the text leaves the previous file whole, and no temporary file."""
    path = tmp_path / "sub" / "results.json"
    assert checkpoint.write_atomically(path, lambda f: f.write('{"a": 1}\n'), mode="w") == path
    assert path.read_text() == '{"a": 1}\n'

    def half_then_fail(f):
        f.write('{"a": ')
        raise ValueError("not JSON")

    with pytest.raises(ValueError, match="not JSON"):
        checkpoint.write_atomically(path, half_then_fail, mode="w")
    assert path.read_text() == '{"a": 1}\n'
    assert temp_files(path.parent) == []



# -- the same file on every OS -------------------------------------------------------------
TEXT = "zéro → ∞\nligne 2 «ok»\n"

WRITE_TEXT = textwrap.dedent(
    f"""
    import sys
    from swav_ref import checkpoint

    checkpoint.write_atomically(sys.argv[1], lambda f: f.write({ascii(TEXT)}), mode="w")
    """
)  # the text in ASCII escapes: a command line in a C locale cannot carry it


def test_text_is_written_as_utf8_with_newlines_whatever_the_locale(tmp_path):
    """Text went out in the locale's encoding and line ends: cp1252 and \\r\\n on Windows,
    ASCII (an error for "é") in a C locale, so config.json and the results differed by OS."""
    path = tmp_path / "results.json"
    checkpoint.write_atomically(path, lambda f: f.write(TEXT), mode="w")
    assert path.read_bytes() == TEXT.encode("utf-8")
    # A process whose locale is not UTF-8 (the C locale, as Windows's code page would be):
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-c", WRITE_TEXT, str(path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == TEXT.encode("utf-8")


def test_rename_is_tried_again_while_another_program_holds_the_file(tmp_path, monkeypatch):
    """On Windows os.replace fails with PermissionError while a scanner, an indexer or a
    notebook has the file open: a few tries with a doubling wait ride that out."""
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros(4)}, {"epoch": 1})
    real_replace, calls, waits = os.replace, [], []

    def held_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "_on_windows", lambda: True)
    monkeypatch.setattr(os, "replace", held_twice)
    monkeypatch.setattr(checkpoint.time, "sleep", waits.append)
    save_checkpoint(path, {"w": np.ones(4)}, {"epoch": 2})
    assert len(calls) == 3 and waits == [0.05, 0.1]
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"epoch": 2}
    assert temp_files(tmp_path) == []


def test_a_file_held_for_good_is_named_and_left_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros(4)}, {"epoch": 1})
    calls, waits = [], []

    def held(src, dst):
        calls.append(dst)
        raise PermissionError(13, "Access is denied", str(dst))

    monkeypatch.setattr(checkpoint, "_on_windows", lambda: True)
    monkeypatch.setattr(os, "replace", held)
    monkeypatch.setattr(checkpoint.time, "sleep", waits.append)
    with pytest.raises(PermissionError, match=rf"cannot replace {re.escape(str(path))}: another program holds it"):
        save_checkpoint(path, {"w": np.ones(4)}, {"epoch": 2})
    assert len(calls) == 5 and waits == [0.05, 0.1, 0.2, 0.4]
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"epoch": 1}
    assert temp_files(tmp_path) == []


def test_a_permission_error_off_windows_is_raised_at_once(tmp_path, monkeypatch):
    """POSIX replaces open files: a PermissionError there is a real one, not worth waiting for."""
    calls = []

    def refused(src, dst):
        calls.append(dst)
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(checkpoint, "_on_windows", lambda: False)
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError, match="Permission denied"):
        save_checkpoint(tmp_path / "ckpt.npz", {"w": np.ones(4)})
    assert len(calls) == 1
    assert temp_files(tmp_path) == []


class FakeFcntl:
    """fcntl with macOS's F_FULLFSYNC, recording what it is asked to flush."""

    F_FULLFSYNC = 51

    def __init__(self, fails=False):
        self.flushed, self.fails = [], fails

    def fcntl(self, fd, command):
        assert command == self.F_FULLFSYNC
        if self.fails:
            raise OSError(45, "Operation not supported")
        self.flushed.append(fd)
        return 0


@pytest.mark.parametrize("fails", [False, True], ids=["full_fsync", "not_supported"])
def test_full_fsync_where_the_platform_has_it(tmp_path, monkeypatch, fails):
    """macOS's fsync leaves the data in the drive's cache; F_FULLFSYNC flushes it (the file
    and the folder); a file system that refuses it gets os.fsync."""
    fake, fsynced = FakeFcntl(fails), []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint, "fcntl", fake)
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    save_checkpoint(tmp_path / "ckpt.npz", {"w": np.ones(4)})
    assert (len(fake.flushed), len(fsynced)) == ((0, 2) if fails else (2, 0))  # the file, then its folder


@pytest.mark.parametrize("fcntl_module", [None, object()], ids=["windows", "linux"])
def test_plain_fsync_without_full_fsync(tmp_path, monkeypatch, fcntl_module):
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint, "fcntl", fcntl_module)
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    save_checkpoint(tmp_path / "ckpt.npz", {"w": np.ones(4)})
    assert len(fsynced) == 2


def test_crash_midway_through_the_data_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros(4)}, {"epoch": 1})
    real_write = np.lib.format.write_array
    calls = []

    def write_then_fail(fp, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # second member: some bytes are already in the file
            raise KeyboardInterrupt
        real_write(fp, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": np.ones(4), "v": np.ones(3)}, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"epoch": 1}
    assert temp_files(tmp_path) == []


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from swav_ref import checkpoint

    path, where = sys.argv[1], sys.argv[2]
    if where == "before_rename":       # all data written and fsync-ed, then the process dies
        real_flush = checkpoint._flush_to_disk  # (os.fsync, or F_FULLFSYNC on macOS)
        def flush_then_die(fd):
            real_flush(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint._flush_to_disk = flush_then_die
    else:                              # dies half-way through writing an array
        real_write = np.lib.format.write_array
        def write_half_then_die(fp, array, **kwargs):
            fp.write(array.tobytes()[: array.nbytes // 2])
            fp.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.lib.format.write_array = write_half_then_die
    checkpoint.save_checkpoint(path, {"w": np.ones((512, 512))}, {"epoch": 2})
    print("not killed")
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("where", ["mid_write", "before_rename"])
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, where):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros((2, 2))}, {"epoch": 1})
    result = subprocess.run([sys.executable, "-c", KILLER, str(path), where], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    arrays, metadata = load_checkpoint(path)
    assert metadata == {"epoch": 1}
    np.testing.assert_array_equal(arrays["w"], np.zeros((2, 2)))
    leftovers = temp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.npz.")  # hidden debris, never the final name


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_next_save_removes_what_a_killed_save_left(tmp_path):
    """A killed save leaves a temporary file as large as a checkpoint; it used to stay for ever."""
    path = tmp_path / "ckpt.npz"
    result = subprocess.run([sys.executable, "-c", KILLER, str(path), "mid_write"], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    (leftover,) = temp_files(tmp_path)
    # The next save comes a while later (here within the file system's clock tick, some
    # milliseconds, which the cleanup would take for a save still writing): age it.
    age = (tmp_path / leftover).stat().st_mtime_ns - 10**9
    os.utime(tmp_path / leftover, ns=(age, age))
    save_checkpoint(path, {"w": np.ones(2)}, {"epoch": 3})
    assert temp_files(tmp_path) == []
    assert load_checkpoint(path)[1] == {"epoch": 3}


def test_stale_temp_cleanup_touches_only_this_targets_temporary_files(tmp_path):
    path = tmp_path / "ckpt.npz"
    hex16 = "0123456789abcdef"
    stale = [f".ckpt.npz.{hex16}.tmp", ".ckpt.npz.fedcba9876543210.tmp"]
    kept = [
        f".other.npz.{hex16}.tmp",  # another target's
        f".ckpt.npz.{hex16[:15]}.tmp", f".ckpt.npz.{hex16}0.tmp", f".ckpt.npz.{hex16.upper()}.tmp",  # not 16 hex
        f".ckpt.npz.{hex16}.tmp.bak", f"ckpt.npz.{hex16}.tmp", f"x.ckpt.npz.{hex16}.tmp",  # not exactly the form
        ".ckpt.npz.zzzzzzzzzzzzzzzz.tmp", "notes.txt",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"old")
        age = (tmp_path / name).stat().st_mtime_ns - 10**9  # left by saves killed a while ago
        os.utime(tmp_path / name, ns=(age, age))
    (tmp_path / ".ckpt.npz.aaaaaaaaaaaaaaaa.tmp").mkdir()  # a folder is never removed
    busy = tmp_path / ".ckpt.npz.bbbbbbbbbbbbbbbb.tmp"  # written after this save began: a concurrent save's
    busy.write_bytes(b"being written")
    future = busy.stat().st_mtime_ns + 3600 * 10**9
    os.utime(busy, ns=(future, future))
    save_checkpoint(path, {"w": np.ones(2)})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*kept, "ckpt.npz", ".ckpt.npz.aaaaaaaaaaaaaaaa.tmp", busy.name])
    assert all((tmp_path / name).read_bytes() == b"old" for name in kept)


# -- damaged files -----------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found.*nope.npz"):
        load_checkpoint(tmp_path / "nope.npz")


def test_not_a_zip(tmp_path):
    (tmp_path / "a.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="a.npz is not a checkpoint: not a zip/npz"):
        load_checkpoint(tmp_path / "a.npz")
    np.save(tmp_path / "b.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="not a zip/npz"):
        load_checkpoint(tmp_path / "b.npy")


def test_every_truncation_is_caught(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.arange(40.0), "b": np.ones(3)}, {"epoch": 1})
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    for length in range(4, len(data), 7):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(cut)


def test_every_bit_flip_is_caught_or_harmless(tmp_path):
    """Flip one bit in every third byte (a different bit each time): load must raise
    CheckpointError or return the original data exactly (a flip in, say, a zip timestamp
    changes nothing we keep)."""
    path = tmp_path / "ckpt.npz"
    arrays, metadata = {"w": np.arange(6.0), "s": np.int64(3)}, {"epoch": 1, "name": "x"}
    save_checkpoint(path, arrays, metadata)
    data = bytearray(path.read_bytes())
    damaged = tmp_path / "flip.npz"
    caught, tried = 0, 0
    for i in range(0, len(data), 3):
        tried += 1
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        damaged.write_bytes(flipped)
        try:
            got_arrays, got_metadata = load_checkpoint(damaged)
        except CheckpointError:
            caught += 1
            continue
        assert_same_arrays(got_arrays, arrays)
        assert got_metadata == metadata
    assert caught > tried // 2


def test_flipped_array_byte_is_named_corrupt(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.full(64, 7.0)}, {})
    data = bytearray(path.read_bytes())
    i = data.find(np.float64(7.0).tobytes())  # inside w's data
    data[i + 3] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def reserved(version=1, metadata=b"{}", digest=None):
    members = {"__swav_ref_format__": np.asarray(version), "__swav_ref_metadata__": np.frombuffer(metadata, np.uint8)}
    if digest is not None:
        members["__swav_ref_sha256__"] = np.frombuffer(digest, np.uint8)
    return members


def test_checksum_mismatch(tmp_path):
    # a well-formed zip (valid CRCs) whose content does not match its SHA-256
    np.savez(tmp_path / "c.npz", w=np.zeros(3), **reserved(digest=bytes(32)))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "c.npz")


def test_array_swapped_after_writing_fails_checksum(tmp_path):
    save_checkpoint(tmp_path / "a.npz", {"w": np.zeros(3)}, {"k": 1})
    with np.load(tmp_path / "a.npz") as npz:
        members = {k: npz[k] for k in npz.files}
    members["w"] = np.ones(3)  # a valid member, rewritten by some other tool
    np.savez(tmp_path / "b.npz", **members)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "b.npz")


def test_unknown_version_and_missing_keys(tmp_path):
    np.savez(tmp_path / "v2.npz", **reserved(version=2, digest=bytes(32)))
    with pytest.raises(CheckpointError, match="unknown format version 2"):
        load_checkpoint(tmp_path / "v2.npz")
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a swav_ref checkpoint: missing keys"):
        load_checkpoint(tmp_path / "plain.npz")
    np.savez(tmp_path / "nosum.npz", **reserved())
    with pytest.raises(CheckpointError, match=r"missing keys \['__swav_ref_sha256__'\]"):
        load_checkpoint(tmp_path / "nosum.npz")


def test_pickled_member_is_never_unpickled(tmp_path):
    np.savez(tmp_path / "p.npz", evil=np.array([{"a": 1}], dtype=object), **reserved(digest=bytes(32)))
    with pytest.raises(CheckpointError, match="corrupt.*allow_pickle=False"):
        load_checkpoint(tmp_path / "p.npz")


# -- compatibility with a model ----------------------------------------------------------
def test_check_compatible_names_every_difference():
    arrays = {"a": np.zeros((3, 4)), "b": np.zeros(5), "extra": np.zeros(1)}
    check_compatible({"a": np.zeros((3, 4))}, {"a": (3, 4)})
    check_compatible({"a": np.zeros((3, 4))}, {"a": np.ones((3, 4))})  # arrays as expectations
    with pytest.raises(CheckpointError) as info:
        check_compatible(arrays, {"a": (4, 3), "b": (5,), "c": (2,)})
    message = str(info.value)
    assert "missing keys ['c']" in message
    assert "unexpected keys ['extra']" in message
    assert "a: checkpoint (3, 4) vs expected (4, 3)" in message
    assert "b:" not in message


# -- files from someone else: bounded work before anything is trusted ---------------------
def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def crafted_members(arrays, metadata_bytes=b"{}"):
    """The .npy members of a checkpoint of ``arrays``, with a valid SHA-256 (it is unkeyed)."""
    members = {**arrays, **reserved(metadata=metadata_bytes, digest=checkpoint._digest(arrays, metadata_bytes))}
    return {name + ".npy": npy_bytes(array) for name, array in members.items()}


def write_members(path, members, mode="w"):
    with zipfile.ZipFile(path, mode) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def local_header(name, data):
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
                       len(name), 0) + name


def raw_zip(path, blob, entries):
    """``blob`` (local headers and data, laid out by the caller) and a central directory of
    ``entries`` (name, data, offset of its local header in blob): zip members may overlap."""
    directory = b"".join(
        struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
                    len(name), 0, 0, 0, 0, 0, offset) + name
        for name, data, offset in entries
    )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(blob), 0)
    path.write_bytes(blob + directory + end)


@pytest.fixture
def member_bytes_read(monkeypatch):
    """How many bytes of member data the loader read (a refusal should read none)."""
    count = [0]
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        data = real_read(self, n)
        count[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    return count


def test_compressed_or_encrypted_members_are_refused_unread(tmp_path, member_bytes_read):
    """A deflated member can expand a thousandfold (a 3.7 MiB file loaded as 2.6 GB, and
    1 MiB of compressed JSON as 1.6 GB); save_checkpoint stores members, so any other method
    is refused before a byte of data is read."""
    path = tmp_path / "bomb.npz"
    members = crafted_members({"bomb": np.zeros(2**20, np.uint8)})  # 1 MiB of zeros: ~1 KiB deflated
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name == "bomb.npy" else zipfile.ZIP_STORED)
    assert path.stat().st_size < 2**15
    with pytest.raises(CheckpointError, match=r"bomb.npz is refused .*member 'bomb.npy' is compressed \(zip method 8\)"):
        load_checkpoint(path)
    assert member_bytes_read[0] == 0

    save_checkpoint(path, {"w": np.zeros(3)}, {})
    data = bytearray(path.read_bytes())
    flags = data.find(b"PK\x01\x02") + 8  # the first member's flag bits, in the central directory
    data[flags] |= 0x01
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"member '.*\.npy' is encrypted"):
        load_checkpoint(path)
    assert member_bytes_read[0] == 0


@pytest.mark.parametrize("gap", [True, False])
def test_overlapping_members_are_refused_unread(tmp_path, member_bytes_read, gap):
    """Stored members whose data regions overlap (member a's data holds member b whole) make
    the loader read the same bytes twice; nested n deep, an 8 MiB file read as 2.4 GB. With a
    gap of unused bytes the declared sizes fit in the file and only the overlap shows."""
    b_data = npy_bytes(np.zeros(4096, np.uint8))
    b_local = local_header(b"b.npy", b_data) + b_data
    a_data = npy_bytes(np.frombuffer(b_local, np.uint8))  # its .npy header, then b's local header and data
    a_local = local_header(b"a.npy", a_data) + a_data
    entries = [(b"a.npy", a_data, 0), (b"b.npy", b_data, len(a_local) - len(b_local))]
    blob = a_local + (bytes(len(b_local) + 1024) if gap else b"")
    arrays = {"a": np.frombuffer(b_local, np.uint8), "b": np.zeros(4096, np.uint8)}
    for name, data in crafted_members(arrays).items():
        if name not in ("a.npy", "b.npy"):
            entries.append((name.encode(), data, len(blob)))
            blob += local_header(name.encode(), data) + data
    path = tmp_path / "overlap.npz"
    raw_zip(path, blob, entries)
    declared = sum(len(data) for _, data, _ in entries)
    assert (declared <= path.stat().st_size) == gap
    match = r"member 'b.npy' overlaps member 'a.npy'" if gap else r"member 'a.npy' is the largest of members declaring"
    with pytest.raises(CheckpointError, match=r"overlap.npz is refused .*" + match):
        load_checkpoint(path)
    assert member_bytes_read[0] == 0


def test_npy_header_must_declare_exactly_the_members_bytes(tmp_path):
    """An array costs no more memory than its member holds: a header declaring 2**40 bytes
    over a few is refused before anything is allocated, and so is data after the array
    (which a reader stopping early would also skip the member's CRC-32 for)."""
    path = tmp_path / "h.npz"
    members = crafted_members({"w": np.arange(4.0)})
    write_members(path, {**members, "w.npy": members["w.npy"] + b"trailing"})
    with pytest.raises(CheckpointError, match=r"member 'w.npy'.*declares shape \(4,\) of float64 \(32 bytes after a "
                                              r"128-byte header\), but the member holds 168 bytes"):
        load_checkpoint(path)

    header = io.BytesIO()  # the header alone: 1 TiB declared
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**20, 2**20)})
    write_members(path, {**members, "w.npy": header.getvalue() + bytes(32)})
    with pytest.raises(CheckpointError, match=r"member 'w.npy'.*declares shape \(1048576, 1048576\) of uint8"):
        load_checkpoint(path)


def test_metadata_size_is_capped_on_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_METADATA_BYTES", 100)
    path = tmp_path / "m.npz"
    save_checkpoint(path, {}, {"text": "x" * 80})  # 92 bytes of JSON
    assert load_checkpoint(path)[1] == {"text": "x" * 80}
    with pytest.raises(ValueError, match=r"metadata is 112 bytes as JSON, more than MAX_METADATA_BYTES \(100\)"):
        save_checkpoint(path, {}, {"text": "x" * 100})
    write_members(path, crafted_members({}, b'{"text": "' + b"x" * 100 + b'"}'))
    with pytest.raises(CheckpointError, match=r"member '__swav_ref_metadata__.npy'.*112 bytes, more than the 100"):
        load_checkpoint(path)


def test_structured_array_with_a_utf8_field_name_round_trips(tmp_path):
    """NumPy stores it as .npy version 3.0 (a UTF-8 header), which the header check reads too."""
    arrays = {"s": np.array([(1.5, 2)], dtype=[("σ", "f4"), ("n", "i8")])}
    with pytest.warns(UserWarning, match="format 3.0"):
        save_checkpoint(tmp_path / "s.npz", arrays, {})
    assert_same_arrays(load_checkpoint(tmp_path / "s.npz")[0], arrays)


@pytest.mark.parametrize(
    "metadata_bytes, match",
    [
        (b'{"step": ' + b"9" * 5000 + b"}", r"metadata is not valid JSON \(Exceeds the limit"),  # was a bare ValueError
        (b'{"log": ' + b"[" * 100 + b"]" * 100 + b"}", r"nested more than 100 levels deep.*\['log'\]\[0\]\[0\]"),
        (b"[1, 2]", r"metadata must be a dict \(or None\), got list"),
    ],
    ids=["5000-digit int", "101 deep", "a list"],
)
def test_loaded_metadata_is_checked_as_on_save(tmp_path, metadata_bytes, match):
    """What save_checkpoint refuses is refused on load too, as a CheckpointError naming the
    file: a training log nested 101 deep used to load, resume, and fail at the next save."""
    path = tmp_path / "meta.npz"
    write_members(path, crafted_members({"w": np.zeros(2)}, metadata_bytes))
    with pytest.raises(CheckpointError, match=r"meta.npz .*" + match):
        load_checkpoint(path)
    nested = b'{"log": ' + b"[" * 99 + b"]" * 99 + b"}"  # the deepest a save accepts
    write_members(path, crafted_members({"w": np.zeros(2)}, nested))
    assert load_checkpoint(path)[1] == json.loads(nested)
