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
    file (the results JSON and a run's ``config.json`` use it too), text as UTF-8 with
    ``\\n`` line ends, so a file is the same bytes on every OS.

    Two platforms need more. On macOS ``fsync`` leaves the data in the drive's cache, so the
    file and the folder are flushed with ``F_FULLFSYNC``, which empties it. On Windows a file
    another program holds open (a virus scanner or search indexer looking at the new
    checkpoint, a notebook reading the old one) cannot be replaced for a moment: the rename
    is tried again a few times, for under a second in all, before an error names the file.

What a loader refuses, and why
    A checkpoint may come from someone else, and the SHA-256 is no defence (anyone can
    compute it), so before reading any member's data the loader checks the zip's directory
    and refuses (:class:`CheckpointError` naming the file and the member) anything
    :func:`save_checkpoint` never writes that could make reading cost more than the file:

    - a member that is compressed (a deflated member of zeros expands a thousandfold: a
      3.7 MiB file read as 2.6 GB) or encrypted: members are stored;
    - members whose declared sizes add up to more than the file, or whose bytes overlap
      (member a's data holding member b: nested n deep, a file is read n times over;
      Python's zipfile checks this only from 3.11.8/3.12.2);
    - a ``.npy`` member whose header's shape and dtype do not account for exactly its bytes
      (a header declaring a terabyte over a few bytes is refused before anything is
      allocated; data after the array is refused too), and object arrays (never unpickled);
    - metadata over :data:`MAX_METADATA_BYTES`, or metadata :func:`save_checkpoint` would
      refuse (not a dict, nested deeper than :data:`MAX_METADATA_DEPTH`, or JSON Python
      cannot read, such as an integer of more than 4300 digits), so that what loads saves.

    So the arrays and bytes a file makes the loader hold are at most about the file's own
    size; parsing the JSON metadata costs a bounded multiple of its size (Python objects
    are larger than their text), which the cap bounds. The reserved members are read first:
    a file of another format or version is refused before its arrays are read.

Loading never unpickles (``allow_pickle=False``). Every way a file can be wrong raises
:class:`CheckpointError` (a ``ValueError``) naming the file and the problem.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import secrets
import struct
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np

from swav_ref.backend import asarray, host_dtype, to_numpy

try:  # POSIX only; used for macOS's F_FULLFSYNC
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "FORMAT_VERSION",
    "MAX_METADATA_BYTES",
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

#: Largest metadata, in bytes of UTF-8 JSON (64 MiB): far beyond a real run's config, RNG
#: states and training log, and refused on save as on load. It bounds what parsing the
#: JSON of a file from someone else can cost: Python objects take more memory than their
#: text (up to some 20 times, for a text of nothing but ``[],``).
MAX_METADATA_BYTES = 64 * 2**20

#: Longest ``.npy`` header read (NumPy's own ``max_header_size`` default).
_MAX_NPY_HEADER = 10_000


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


def _check_metadata(metadata: Any, shared: bool = True) -> dict:
    """Refuse metadata that would not come back as given: not a dict, a key that is not a
    string (JSON would turn ``1`` into ``'1'``), or nesting deeper than MAX_METADATA_DEPTH.
    Walks depth first without recursion, holding one iterator per level (memory grows with
    the depth, not the size); values are left for ``json.dumps`` to judge. ``shared``:
    containers may appear more than once (given by a caller, perhaps circular), so each is
    remembered with the deepest level it was checked at; JSON just parsed shares nothing."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"checkpoint metadata must be a dict (or None), got {type(metadata).__name__}: {metadata!r:.80}"
        )
    metadata = dict(metadata)
    deepest: dict[int, int] = {}  # id -> deepest level it was checked at (shared lists, cycles)
    keys: list[Any] = []  # the key or index of each open container below the metadata dict
    stack: list[tuple[Any, bool]] = [(iter(metadata.items()), True)]  # (iterator of (key, item), is a dict)

    def where(extra: list[Any]) -> str:
        return ("metadata" + "".join(f"[{key!r}]" for key in keys + extra))[:200]

    while stack:
        items, in_dict = stack[-1]
        for key, item in items:
            if in_dict and not isinstance(key, str):
                raise ValueError(
                    f"checkpoint metadata key {key!r} ({type(key).__name__}) in {where([])} is not a "
                    f"string; JSON object keys are strings, so it would not come back as {key!r}"
                )
            if isinstance(item, (dict, list, tuple)):
                depth = len(stack) + 1
                if depth > MAX_METADATA_DEPTH:  # (a cycle ends here too)
                    raise ValueError(
                        f"checkpoint metadata is nested more than {MAX_METADATA_DEPTH} levels deep, or is "
                        f"circular (at {where([key])}...)"
                    )
                if not item:
                    continue  # nothing inside
                if shared:
                    if deepest.get(id(item), 0) >= depth:
                        continue  # already checked here or deeper: the same keys, no deeper nesting
                    deepest[id(item)] = depth
                keys.append(key)
                stack.append((iter(item.items()), True) if isinstance(item, dict) else (enumerate(item), False))
                break
        else:  # this container is done
            stack.pop()
            if keys:
                keys.pop()
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


def _flush_to_disk(fd: int) -> None:
    """``os.fsync``, except on macOS, where fsync hands the data to the drive, whose cache can
    still lose it in a power cut: ``F_FULLFSYNC`` has the drive write its cache out too (as
    SQLite does). Elsewhere (no such call: Linux, whose fsync flushes the drive's cache
    itself, and Windows), or where the file system refuses it (some network and FAT
    volumes), plain ``os.fsync``."""
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass  # not supported by this file system: fsync is the best there is
    os.fsync(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Not possible on every platform (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        _flush_to_disk(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: The waits, in seconds, between tries of the rename on Windows while another program holds
#: the file (5 tries, 0.75 s of waiting in all): a scanner or indexer lets go within that.
_REPLACE_WAITS = (0.05, 0.1, 0.2, 0.4)


def _on_windows() -> bool:
    """Whether a file held open by another program refuses to be replaced (a function, so
    that a test elsewhere can take the Windows path)."""
    return os.name == "nt"


def _replace(source: str, path: Path) -> None:
    """``os.replace(source, path)``, tried again on Windows while another program holds
    ``path`` open (PermissionError there: Windows refuses to replace a file that a virus
    scanner, search indexer or notebook has open, for as long as it has it). POSIX replaces
    open files, so a PermissionError there is a real one, raised at once."""
    for wait in (*_REPLACE_WAITS, None):
        try:
            os.replace(source, path)
            return
        except PermissionError as exc:
            if not _on_windows():
                raise
            if wait is None:
                raise PermissionError(
                    f"cannot replace {path}: another program holds it open (a virus scanner, a search indexer, "
                    f"or a notebook or viewer reading it), or it is read-only; tried {len(_REPLACE_WAITS) + 1} "
                    f"times over {sum(_REPLACE_WAITS):.2f} s. Close that program (or write elsewhere) and try "
                    f"again; {path} is unchanged"
                ) from exc
            time.sleep(wait)


# -- save ---------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``arrays`` and ``metadata`` to ``path`` atomically; return the path.

    Parameters
    ----------
    path
        the final file name (``.npz`` by convention; the name is used as given).
    arrays
        name -> array of any backend (moved to the host with ``to_numpy``). Names are
        non-empty strings not starting with ``__swav_ref_``, without NUL or backslash, at
        most :data:`MAX_NAME_BYTES` bytes in UTF-8, and never both ``x`` and ``x.npy`` (the
        zip member of ``x``); object arrays are refused.
    metadata : dict
        JSON-serialisable (nested dicts with string keys, lists, str, bool, None, floats and
        ints of up to 4300 digits; at most :data:`MAX_METADATA_DEPTH` levels and
        :data:`MAX_METADATA_BYTES` bytes of JSON). Tuples come back as lists.

    Raises
    ------
    ValueError
        an empty path or a folder; a reserved, empty, over-long or colliding name; an
        object array; or metadata that JSON cannot hold exactly, or over
        MAX_METADATA_BYTES. Nothing is written.
    TypeError
        ``arrays`` or ``metadata`` is not a dict. Nothing is written.

    Notes
    -----
    Once the file is in place, the temporary files of earlier saves to ``path`` that were
    killed midway are removed (see "Atomic writes" in the module's notes).
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
    if len(metadata_bytes) > MAX_METADATA_BYTES:
        raise ValueError(
            f"checkpoint metadata is {len(metadata_bytes)} bytes as JSON, more than MAX_METADATA_BYTES "
            f"({MAX_METADATA_BYTES}); keep large data in arrays"
        )

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
    earlier writes of ``path`` that were killed midway are removed. Returns ``path``.

    Text (``mode="w"``) is written as UTF-8 with ``\\n`` line ends whatever the OS (not the
    locale's code page and ``\\r\\n`` on Windows), so a results file or ``config.json`` is
    the same bytes everywhere and reads back anywhere. On Windows a ``path`` another program
    holds open is waited for, briefly (see "Atomic writes" in the module's notes)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    fd, tmp_name = create_temp_beside(path)
    started_ns = os.fstat(fd).st_mtime_ns  # this write's start on the file system's clock
    try:
        with os.fdopen(fd, mode, **text) as f:
            write(f)
            f.flush()
            _flush_to_disk(f.fileno())
        _replace(tmp_name, path)
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
    arrays : dict
        name -> host NumPy array (move to a backend with ``swav_ref.backend.asarray``).
    metadata : dict
        as saved (tuples became lists).

    Raises
    ------
    CheckpointError
        the file is missing; is not a zip/npz; is truncated or damaged (bad zip structure or
        CRC); lacks the reserved entries (not a swav_ref checkpoint); has an unknown format
        version; fails its SHA-256; holds what save_checkpoint never writes (compressed,
        encrypted or overlapping members, a .npy header that does not match its member's
        size, an object array, metadata over MAX_METADATA_BYTES or metadata save_checkpoint
        would refuse: see "What a loader refuses" in the module's notes). The message names
        the file and which of these it is.
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
        member = None  # the member being read, for the message
        try:
            with zipfile.ZipFile(f) as zf:
                # Read by member name (``x.npy``), never by the short name: ``x.npy`` is the member
                # of ``x`` when both ``x`` and ``x.npy`` are stored (files written before
                # save_checkpoint refused such pairs). A name stored twice: the last one, as zipfile.
                infos = {info.filename: info for info in _checked_members(path, f, zf, size)}
                # (_checked_members has refused a file without the format member: not a checkpoint)
                missing = [k for k in (_METADATA_KEY, _CHECKSUM_KEY) if k + ".npy" not in infos]
                member = _FORMAT_KEY + ".npy"
                version = _read_member(zf, infos[member], size)
                if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
                    raise CheckpointError(
                        f"{path} has unknown format version {version.tolist()!r}; this swav_ref reads version "
                        f"{FORMAT_VERSION}"
                    )
                if missing:
                    raise CheckpointError(f"{path} is damaged: missing keys {missing}")
                member = _METADATA_KEY + ".npy"
                metadata_bytes = _read_member(zf, infos[member], size, max_bytes=MAX_METADATA_BYTES).tobytes()
                member = _CHECKSUM_KEY + ".npy"
                stored_digest = _read_member(zf, infos[member], size).tobytes()
                contents = {}
                for member, info in infos.items():
                    if member not in (_FORMAT_KEY + ".npy", _METADATA_KEY + ".npy", _CHECKSUM_KEY + ".npy"):
                        contents[member.removesuffix(".npy")] = _read_member(zf, info, size)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            # A flipped or missing byte can surface from zipfile, zlib or NumPy's .npy reader as
            # almost any exception (BadZipFile, a CRC error, ValueError for a bad header,
            # EOFError, ...). All mean the same here.
            where = f"member {member!r}: " if member is not None else ""
            raise CheckpointError(
                f"{path} is truncated or corrupt ({size} bytes): {where}{type(exc).__name__}: {exc}"
            ) from exc

    if _digest(contents, metadata_bytes) != stored_digest:
        raise CheckpointError(f"{path} is corrupt: checksum mismatch (SHA-256 of arrays and metadata)")
    try:
        metadata = json.loads(metadata_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (ValueError: also an int past Python's digit limit)
        raise CheckpointError(f"{path} is corrupt: metadata is not valid JSON ({exc})") from exc
    try:
        metadata = _check_metadata(metadata, shared=False)  # what save refuses: so that it saves again
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds metadata that save_checkpoint would refuse: {exc}") from None
    return contents, metadata


def _checked_members(path: Path, f: IO[bytes], zf: zipfile.ZipFile, size: int) -> list[zipfile.ZipInfo]:
    """``zf``'s members, or :class:`CheckpointError` naming the first that could make reading
    it cost more than the file's own ``size`` (see "What a loader refuses" in the module's
    notes). Reads only the zip's directory and the members' 30-byte local headers."""

    def refuse(info: zipfile.ZipInfo, why: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is refused ({size} bytes): member {info.filename!r} {why}; save_checkpoint writes "
            "each member once, stored (not compressed, not encrypted), one after another"
        )

    infos = zf.infolist()
    if _FORMAT_KEY + ".npy" not in {info.filename for info in infos}:  # another program's .npz, say
        raise CheckpointError(f"{path} is not a swav_ref checkpoint: missing keys [{_FORMAT_KEY!r}] (an .npz "
                              "saved some other way?)")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise refuse(info, f"is compressed (zip method {info.compress_type})")
        if info.flag_bits & 0x1:
            raise refuse(info, "is encrypted")
        if info.compress_size != info.file_size:
            raise refuse(info, f"declares {info.file_size} bytes but {info.compress_size} stored")
    total = sum(info.file_size for info in infos)
    if total > size:
        raise refuse(max(infos, key=lambda i: i.file_size), f"is the largest of members declaring {total} bytes in all")
    end, previous = 0, None
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end:
            where = f"overlaps member {previous.filename!r}" if previous else "starts before the file"
            raise refuse(info, f"{where} (its bytes are another member's too)")
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != _ZIP_MAGIC:
            raise refuse(info, f"has no local header at offset {info.header_offset}")
        name_length, extra_length = struct.unpack("<2H", local[26:30])
        end = info.header_offset + 30 + name_length + extra_length + info.compress_size
        if end > size:
            raise refuse(info, f"ends at byte {end}, past the end of the file")
        previous = info
    return infos


def _npy_header(fp: IO[bytes]) -> tuple[tuple, np.dtype]:
    """The shape and dtype a ``.npy`` stream's header declares (the stream left after it)."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    elif version == (3, 0):  # as 2.0 but UTF-8 (structured field names beyond Latin-1): no public reader
        (length,) = struct.unpack("<I", fp.read(4))
        if length > _MAX_NPY_HEADER:
            raise ValueError(f".npy header of {length} bytes is too long")
        header = ast.literal_eval(fp.read(length).decode("utf-8"))
        if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
            raise ValueError(f".npy header is not a dict of descr, fortran_order and shape: {header!r:.200}")
        shape, dtype = header["shape"], np.lib.format.descr_to_dtype(header["descr"])
        if not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
            raise ValueError(f".npy header shape is not a tuple of ints: {shape!r:.200}")
    else:
        raise ValueError(f"unknown .npy format version {version}")
    return shape, dtype


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, max_bytes: int | None = None) -> np.ndarray:
    """Read one ``.npy`` member as NumPy's npz reader does, once its header is shown to
    declare exactly the member's bytes: its shape times its itemsize plus the header's length
    is the member's size (so the array costs no more than the member, and is read to its end,
    where zipfile checks the CRC-32). Object arrays are refused (never unpickled);
    ``max_bytes`` caps the data's size (the metadata's)."""
    with zf.open(info) as fp:
        shape, dtype = _npy_header(fp)
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        count = math.prod(shape)  # exact, as Python ints (NumPy's int64 product can wrap)
        data_bytes = count * dtype.itemsize
        if min(shape, default=0) < 0 or count > size or fp.tell() + data_bytes != info.file_size:
            raise ValueError(
                f"its .npy header declares shape {shape} of {dtype} ({data_bytes} bytes after a "
                f"{fp.tell()}-byte header), but the member holds {info.file_size} bytes"
            )
        if max_bytes is not None and data_bytes > max_bytes:
            raise ValueError(f"it holds {data_bytes} bytes, more than the {max_bytes} allowed")
        fp.seek(0)
        return np.asarray(np.lib.format.read_array(fp, allow_pickle=False))


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
    arrays
        name -> array (what :func:`load_checkpoint` returned).
    expected_shapes
        name -> shape tuple, or an array whose ``.shape`` is used (e.g. the
        model's current parameters).

    Notes
    -----
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
