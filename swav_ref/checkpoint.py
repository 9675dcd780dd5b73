"""Atomic, pickle-free checkpoints: one ``.npz`` of arrays plus JSON metadata.

::

    save_checkpoint("run/last.npz", {"conv1.weight": w, ...}, {"epoch": 3, "rng": rng.get_state()})
    arrays, metadata = load_checkpoint("run/last.npz")

Format (version 1)
------------------
A NumPy ``.npz`` (a zip of ``.npy`` files) holding the caller's arrays under their own
names and three reserved entries:

``__swav_ref_format__``
    int64 scalar, the format version (1).
``__swav_ref_metadata__``
    uint8 array: the metadata as UTF-8 JSON (so big integers such as a PCG64 state survive
    exactly, and nothing is ever unpickled).
``__swav_ref_sha256__``
    uint8 (32,): SHA-256 over every array's name, dtype, shape and bytes (in sorted name
    order) and the metadata bytes.

Why a checksum on top of the zip's CRC-32
    Python's ``zipfile`` does check each member's CRC-32 when the member is read to its end,
    so a flipped bit inside an array is usually caught there already. The SHA-256 adds what
    CRCs cannot: it covers the *set* of arrays and their names, dtypes and shapes together
    with the metadata, so a member dropped, renamed or swapped for another valid one (say
    by a tool that rewrites the zip) is caught too, and the check does not depend on how a
    reader walks the container.

Atomic writes
    The file is written to a temporary name in the same folder, flushed and ``fsync``-ed,
    then moved over the final name with ``os.replace`` (atomic on POSIX and Windows), and
    the folder is ``fsync``-ed so the rename itself survives a power cut. A crash at any
    moment leaves either the old checkpoint or the new one at the final path, never a
    mixture; at worst a hidden ``.<name>.<16 hex digits>.tmp`` file is left beside it, which
    the next successful save to the same name removes (only names of exactly that form for
    that name, and only files last written before that save began: a concurrent save to the
    same name, which is a race anyway, is not disturbed while it writes). The file gets the
    permissions ``open(path, "w")`` would give it (``0o666`` less the umask), not
    ``tempfile.mkstemp``'s owner-only ``0o600``. :func:`write_atomically` does this for any
    file (the results JSON and a run's ``config.json`` use it too).

Loading never unpickles: ``np.load(..., allow_pickle=False)``. Every way a file can be
wrong raises :class:`CheckpointError` (a ``ValueError``) naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np

from swav_ref.backend import asarray, host_dtype, to_numpy

__all__ = [
    "FORMAT_VERSION",
    "MAX_METADATA_DEPTH",
    "MAX_NAME_BYTES",
    "CheckpointError",
    "check_compatible",
    "entry_problem",
    "finite_copy",
    "load_checkpoint",
    "save_checkpoint",
    "write_atomically",
]

#: The version this module writes and the only one it reads.
FORMAT_VERSION = 1

_PREFIX = "__swav_ref_"
_FORMAT_KEY = "__swav_ref_format__"
_METADATA_KEY = "__swav_ref_metadata__"
_CHECKSUM_KEY = "__swav_ref_sha256__"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, of an unknown version, or does not fit."""


# -- helpers ------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    """Let NumPy scalars (a metric computed with NumPy, say) into the JSON metadata."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


#: Longest array name: a zip entry name is at most 65535 bytes (a 16-bit length field), and
#: each array is stored as ``NAME.npy``.
MAX_NAME_BYTES = 0xFFFF - len(".npy")

#: Most dicts and lists nested inside one another in the metadata (the metadata dict itself
#: included). Far beyond any real use; it keeps ``json`` away from Python's recursion limit
#: when the file is written *and* when it is read back (perhaps from deeper inside a call
#: stack), so a file that saves also loads.
MAX_METADATA_DEPTH = 100


def _check_names(names: list[Any]) -> None:
    """Refuse, before anything is written, array names that would not come back as given.

    Each array is stored as the zip member ``NAME.npy``, and NumPy's npz reader answers a
    name that is itself a member before adding ``.npy``: with both ``x`` and ``x.npy`` saved,
    asking for ``x.npy`` returns ``x``'s data (the file then fails its checksum). The zip
    format also cuts a name at a NUL, turns ``\\`` into ``/`` on Windows, and limits names to
    65535 bytes.
    """
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(_PREFIX):
            raise ValueError(f"checkpoint array name {name!r} is empty, not a string, or reserved ({_PREFIX}*)")
        if "\0" in name:
            raise ValueError(f"checkpoint array name {name!r} contains a NUL character, which zip names cannot hold")
        if "\\" in name:
            raise ValueError(
                f"checkpoint array name {name!r} contains a backslash, which zip readers on Windows turn "
                "into '/' (use '/' or '.')"
            )
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(f"checkpoint array name {name!r} cannot be encoded as UTF-8: {exc}") from None
        if size > MAX_NAME_BYTES:
            raise ValueError(
                f"checkpoint array name {name[:40]!r}... is {size} bytes in UTF-8; a zip entry name "
                f"holds at most {MAX_NAME_BYTES} (65535 less '.npy')"
            )
    given = set(names)
    clashes = sorted((name[:-4], name) for name in names if name.endswith(".npy") and name[:-4] in given)
    if clashes:
        pairs = ", ".join(f"{a!r} and {b!r}" for a, b in clashes)
        raise ValueError(
            f"checkpoint array names collide: {pairs} (each array is stored as NAME.npy, so "
            "'x.npy' is the member of array 'x'); rename one of each pair"
        )


def _check_metadata(metadata: Any) -> dict:
    """Refuse metadata that would not come back as given: not a dict, a key that is not a
    string (JSON would turn ``1`` into ``'1'``), or nesting deeper than MAX_METADATA_DEPTH.
    Walks iteratively (no recursion); values are left for ``json.dumps`` to judge."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"checkpoint metadata must be a dict (or None), got {type(metadata).__name__}: {metadata!r:.80}"
        )
    metadata = dict(metadata)
    deepest: dict[int, int] = {}  # id -> deepest level it was checked at (shared lists, cycles)
    stack: list[tuple[Any, str, int]] = [(metadata, "metadata", 1)]
    while stack:
        value, where, depth = stack.pop()
        if deepest.get(id(value), 0) >= depth:
            continue  # already checked here or deeper: the same keys, no deeper nesting
        deepest[id(value)] = depth
        if depth > MAX_METADATA_DEPTH:  # (a cycle ends here too)
            raise ValueError(
                f"checkpoint metadata is nested more than {MAX_METADATA_DEPTH} levels deep, or is circular "
                f"(at {where[:200]}...)"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(
                        f"checkpoint metadata key {key!r} ({type(key).__name__}) in {where[:200]} is not a "
                        f"string; JSON object keys are strings, so it would not come back as {key!r}"
                    )
                if isinstance(item, (dict, list, tuple)):
                    stack.append((item, f"{where}[{key!r}]", depth + 1))
        else:
            containers = (i for i, item in enumerate(value) if isinstance(item, (dict, list, tuple)))
            stack.extend((value[i], f"{where}[{i}]", depth + 1) for i in containers)
    return metadata


def _digest(arrays: Mapping[str, np.ndarray], metadata_bytes: bytes) -> bytes:
    """SHA-256 over (name, dtype, shape, bytes) of each array in name order, then the metadata."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name], order="C")
        header = json.dumps([name, a.dtype.str, list(a.shape)]).encode("utf-8")
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(a.reshape(-1).view(np.uint8))  # the raw bytes, without a copy
    h.update(metadata_bytes)
    return h.digest()


def _write_npz(f, members: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez`` does (a stored zip of ``.npy`` members), written out so that any
    array name works (``np.savez(f, **members)`` breaks on a name such as ``file``) and
    so that pickling is refused on the way in as well as out."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in members.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


_TOKEN_BYTES = 8  # the random part of a temporary name: 16 hex digits


def create_temp_beside(path: Path) -> tuple[int, str]:
    """Create a new hidden ``.<name>.<random>.tmp`` in ``path``'s folder, to be renamed over
    ``path``; return (a file descriptor open for writing, its name).

    Like ``tempfile.mkstemp`` (created exclusively, so never someone else's file) but with
    the mode ``open(path, "w")`` gives: the OS applies the umask (and any default ACL) to
    ``0o666`` at creation. mkstemp's ``0o600`` would survive the rename and leave the
    result readable by its owner only; changing the mode afterwards would need the umask,
    which can only be read by setting it (a race with other threads).
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(tmp, flags, 0o666), str(tmp)


def _remove_stale_temps(folder: Path, name: str, started_ns: int) -> None:
    """Remove the temporary files that earlier saves to ``folder / name`` left behind (a
    process killed mid-save leaves one, as large as a checkpoint, that nothing else removes).

    Only names exactly as :func:`create_temp_beside` makes them for this target, plain files
    last written before this save began (``started_ns``, on the file system's own clock): a
    save to the same path still writing in another process keeps its file (one that has
    finished writing and is about to rename it may not; two processes saving one checkpoint
    at once is a race whatever this does). (That clock
    ticks coarsely, some milliseconds, so a file last written in the tick this save began
    is left for the next save.) Best effort: the checkpoint is already in place, so a file
    that cannot be removed is left.
    """
    pattern = re.compile(re.escape(f".{name}.") + f"[0-9a-f]{{{2 * _TOKEN_BYTES}}}" + re.escape(".tmp"))
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:
        return
    for entry in entries:
        try:
            if (pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime_ns < started_ns):
                os.unlink(entry.path)
        except OSError:  # removed meanwhile, or not ours to remove
            pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Not possible on every platform (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- save ---------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``arrays`` and ``metadata`` to ``path`` atomically; return the path.

    Parameters
    ----------
    path : the final file name (``.npz`` by convention; the name is used as given).
    arrays : name -> array of any backend (moved to the host with ``to_numpy``). Names are
        non-empty strings not starting with ``__swav_ref_``, without NUL or backslash, at
        most :data:`MAX_NAME_BYTES` bytes in UTF-8, and never both ``x`` and ``x.npy`` (the
        zip member of ``x``); object arrays are refused.
    metadata : dict
        JSON-serialisable (nested dicts with string keys, lists, str, bool, None, floats and
        ints of any size; at most :data:`MAX_METADATA_DEPTH` levels). Tuples come back as lists.

    Once the file is in place, the temporary files of earlier saves to ``path`` that were
    killed midway are removed (see "Atomic writes" in the module's notes).

    Raises
    ------
    ValueError
        an empty path or a folder; a reserved, empty, over-long or colliding name; an
        object array; or metadata that JSON cannot hold exactly. Nothing is written.
    TypeError
        ``arrays`` or ``metadata`` is not a dict. Nothing is written.
    """
    if not os.fspath(path):
        raise ValueError("checkpoint path is empty")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint path {path} is a folder; give a file name such as {path / 'last.npz'}")
    if not isinstance(arrays, Mapping):
        raise TypeError(f"checkpoint arrays must be a dict of name -> array, got {type(arrays).__name__}")
    _check_names(list(arrays))
    metadata = _check_metadata(metadata)
    host: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        a = np.asarray(to_numpy(value), order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype.hasobject:
            raise ValueError(f"checkpoint array {name!r} has dtype {a.dtype}; object arrays would need pickle")
        host[name] = a
    try:
        metadata_bytes = json.dumps(metadata, sort_keys=True, default=_json_default).encode("utf-8")
    except RecursionError as exc:  # (only from a very deep call stack: the depth is checked above)
        raise ValueError(f"checkpoint metadata is nested too deeply for JSON: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata cannot be stored as JSON: {exc}") from exc

    members = dict(host)
    members[_FORMAT_KEY] = np.asarray(FORMAT_VERSION, dtype=np.int64)
    members[_METADATA_KEY] = np.frombuffer(metadata_bytes, dtype=np.uint8)
    members[_CHECKSUM_KEY] = np.frombuffer(_digest(host, metadata_bytes), dtype=np.uint8)

    return write_atomically(path, lambda f: _write_npz(f, members))


def write_atomically(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "wb") -> Path:
    """Write ``path`` so that a crash at any moment leaves either the old file or the new one
    whole, never a part: ``write(f)`` fills a temporary file beside it (opened with
    ``mode``, ``"wb"`` or ``"w"``), which is flushed, ``fsync``-ed and renamed over ``path``;
    the folder is ``fsync``-ed so the rename survives a power cut. Temporary files left by
    earlier writes of ``path`` that were killed midway are removed. Returns ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = create_temp_beside(path)
    started_ns = os.fstat(fd).st_mtime_ns  # this write's start on the file system's clock
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    _remove_stale_temps(folder, path.name, started_ns)
    return path


# -- load ---------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    arrays : dict name -> host NumPy array (move to a backend with ``swav_ref.backend.asarray``).
    metadata : dict, as saved (tuples became lists).

    Raises
    ------
    CheckpointError
        the file is missing; is not a zip/npz; is truncated or damaged (bad zip structure or
        CRC); lacks the reserved entries (not a swav_ref checkpoint); has an unknown format
        version; or fails its SHA-256. The message names the file and which of these it is.
    """
    if not os.fspath(path):
        raise CheckpointError("checkpoint path is empty")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    # We open the file, not np.load: np.load(path) leaves it open when the zip is unreadable.
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
        if head != _ZIP_MAGIC:
            raise CheckpointError(f"{path} is not a checkpoint: not a zip/npz file (starts with {head!r}, {size} bytes)")
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as npz:
                # Read by member name (``x.npy``), never by the short name: npz["x.npy"] is the
                # member of ``x`` when both ``x`` and ``x.npy`` are stored (files written before
                # save_checkpoint refused such pairs).
                contents = {m.removesuffix(".npy"): np.asarray(npz[m]) for m in npz.zip.namelist()}
        except Exception as exc:  # noqa: BLE001
            # A flipped or missing byte can surface from zipfile, zlib or NumPy's .npy reader as
            # almost any exception (BadZipFile, a CRC error, NotImplementedError for a "new"
            # compression method, RuntimeError for an "encrypted" member, ValueError for a bad
            # header, EOFError, MemoryError for an absurd shape, ...). All mean the same here.
            raise CheckpointError(
                f"{path} is truncated or corrupt ({size} bytes): {type(exc).__name__}: {exc}"
            ) from exc

    missing = [k for k in (_FORMAT_KEY, _METADATA_KEY, _CHECKSUM_KEY) if k not in contents]
    if _FORMAT_KEY in missing:
        raise CheckpointError(
            f"{path} is not a swav_ref checkpoint: missing keys {missing} (an .npz saved some other way?)"
        )
    version = contents[_FORMAT_KEY]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has unknown format version {version.tolist()!r}; this swav_ref reads version {FORMAT_VERSION}"
        )
    if missing:
        raise CheckpointError(f"{path} is damaged: missing keys {missing}")

    metadata_bytes = contents.pop(_METADATA_KEY).tobytes()
    stored_digest = contents.pop(_CHECKSUM_KEY).tobytes()
    del contents[_FORMAT_KEY]
    if _digest(contents, metadata_bytes) != stored_digest:
        raise CheckpointError(f"{path} is corrupt: checksum mismatch (SHA-256 of arrays and metadata)")
    try:
        metadata = json.loads(metadata_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # only if written corrupt
        raise CheckpointError(f"{path} is corrupt: metadata is not valid JSON ({exc})") from exc
    return contents, metadata


#: The dtype kinds a loaded state's entry may be asked to have, as the messages name them.
_KIND_NAMES = {"f": "floating", "i": "signed integer"}


def entry_problem(value: Any, kind: str) -> str | None:
    """Why ``value``, a state entry read back from a checkpoint, is not an array of the
    dtype kind ``kind`` (``"f"`` floating, ``"i"`` signed integer), in words that follow its
    name (``"is a list, not an array"``, ``"has dtype int32, not a floating dtype"``); None
    if it is one. An integer array is no embedding: a cast would hide the mistake."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        return f"is a {type(value).__name__}, not an array"
    if host_dtype(value.dtype).kind != kind:
        return f"has dtype {host_dtype(value.dtype).name}, not a {_KIND_NAMES[kind]} dtype"
    return None


def finite_copy(value: Any, xp: Any, dtype: Any, what: str) -> Any:
    """``value`` (any backend's floating array) cast to ``dtype`` on ``xp``, as a copy that
    shares no memory with it, or :class:`CheckpointError` naming ``what`` when it holds NaN
    or infinity once cast (a float64 too large for float32 becomes inf). One read-back
    from the device: for loading state, not for a hot path."""
    with np.errstate(over="ignore"):  # the overflow is refused below, by name
        copy = xp.astype(asarray(value, xp), dtype)
    if not bool(xp.all(xp.isfinite(copy))):
        raise CheckpointError(f"{what} holds NaN or infinity (or values too large for {host_dtype(dtype).name})")
    return copy


def check_compatible(arrays: Mapping[str, Any], expected_shapes: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless ``arrays`` has exactly the expected names and shapes.

    Parameters
    ----------
    arrays : name -> array (what :func:`load_checkpoint` returned).
    expected_shapes : name -> shape tuple, or an array whose ``.shape`` is used (e.g. the
        model's current parameters).

    The message lists every missing key, unexpected key and shape mismatch at once, so a
    user sees the whole difference between the checkpoint and the model in one go.
    """
    expected = {k: tuple(getattr(v, "shape", v)) for k, v in expected_shapes.items()}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(arrays[k].shape)} vs expected {expected[k]}"
        for k in sorted(set(expected) & set(arrays))
        if tuple(arrays[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError("checkpoint does not fit: " + "; ".join(problems))
