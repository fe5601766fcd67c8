"""One file discipline for the files tagrouter_fast must trust after a crash.

Every writer of state goes through this module, so the rules live in one place: the outcome
journal, its snapshots, registry and decisions logs and MANIFEST (``serve/learn/``), the Redis
link's published mark (``serve/learn/shared.py``), the tag cache (``tagging/cache.py``), model
manifests (``tagging/manifest.py``), bundles (``router.py``) and batch outputs (``batch.py``).

- **Checksummed lines** (`encode_line`, `decode_line`): ``<crc32 of the payload, 8 hex> <JSON>\\n``.
  A damaged line is recognised as damaged, never parsed into wrong data.
- **Torn-tail scan** (`scan`): every line of a file with its byte offset and its payload, or
  ``None`` when it fails its check or lacks its newline. What a bad line *means* (a write that a
  crash cut short, to cut off, or damage to refuse) is the caller's policy: it depends on what
  the file promised, which only the caller knows.
- **Atomic replace** (`atomic_replace`; `temp_beside` + `commit` for files written as a
  stream): a temporary file in the same directory, fsync it, rename it over the target, fsync
  the directory. Readers, and a restart after a crash, see the old file or the new one, whole.
- **Appends** (`open_append`, `write_all`, `append`), `truncate`, `fsync_dir`, and a
  `Watermark`: one small checksummed record rewritten in place.

Each function that fsyncs takes ``fsync=``: a writer passes its own seam, so that its tests can
make exactly its fsyncs fail. The default is `os.fsync` and writes use `os.write`, both looked up
at call time, so a test may also patch those (e.g. a disk that fills up).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "log"
>>> fd = open_append(p)
>>> append(fd, encode_line({"seq": 1}) + encode_line({"seq": 2})[:5], durable=True)
>>> os.close(fd)
>>> [(line.offset, line.payload) for line in scan(p)]
[(0, {'seq': 1}), (19, None)]
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "Line",
    "Watermark",
    "append",
    "atomic_replace",
    "commit",
    "decode_line",
    "encode_line",
    "fsync_dir",
    "open_append",
    "scan",
    "scan_bytes",
    "temp_beside",
    "truncate",
    "write_all",
]

Fsync = Callable[[int], None]


def _fsync_of(fsync: Fsync | None) -> Fsync:
    # Looked up at call time, not bound at import: a test that patches os.fsync reaches every
    # writer that did not pass its own seam.
    return os.fsync if fsync is None else fsync


# ==== Checksummed lines ====


def encode_line(obj: dict[str, Any]) -> bytes:
    """One self-checking line: ``<crc32 of the payload, 8 hex digits> <JSON payload>\\n``.

    Keys are sorted and the JSON is compact and strict (no NaN): the same object always encodes
    to the same bytes. Lines written with other key orders (the Redis outbox wrote insertion
    order) decode the same.

    Raises:
        ValueError: the object holds a NaN or infinity.
        TypeError: it holds something JSON cannot encode.
    """
    payload = json.dumps(
        obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def decode_line(raw: bytes) -> dict[str, Any] | None:
    """The JSON object of one line (given without its newline), or None if it fails its check
    (checksum, JSON, or not an object)."""
    if len(raw) < 10 or raw[8:9] != b" ":
        return None
    try:
        crc = int(raw[:8], 16)
    except ValueError:
        return None
    payload = raw[9:]
    if zlib.crc32(payload) != crc:
        return None
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class Line(NamedTuple):
    """One line of a scanned file."""

    #: 1-based line number, for messages.
    number: int
    #: Byte offset of its first byte: where to cut the file to drop it and everything after.
    offset: int
    #: Byte offset just past its newline (or the end of the data when it has none).
    end: int
    #: Its object, or None: fails its check, or has no newline (a write cut short).
    payload: dict[str, Any] | None


def scan_bytes(data: bytes) -> list[Line]:
    """Every line of ``data``, good or bad, in order (see `scan`)."""
    out: list[Line] = []
    pos, number = 0, 0
    while pos < len(data):
        number += 1
        nl = data.find(b"\n", pos)
        if nl < 0:  # no newline: a write that did not finish, whatever its bytes say
            out.append(Line(number, pos, len(data), None))
            break
        out.append(Line(number, pos, nl + 1, decode_line(data[pos:nl])))
        pos = nl + 1
    return out


def scan(path: str | os.PathLike[str]) -> list[Line]:
    """Every line of the file at ``path``, good or bad, with its offset.

    A bad *last* line is what a crash in the middle of an append leaves; a bad line followed by
    good ones is damage. Which of them a caller may cut depends on what it acknowledged.

    Raises:
        OSError: the file cannot be read (the message names it).
    """
    return scan_bytes(Path(path).read_bytes())


# ==== Appends ====


def open_append(path: str | os.PathLike[str]) -> int:
    """An ``O_APPEND`` descriptor on ``path`` (created 0644 if missing): every write lands at
    the end, whole lines stay whole between writers of one process."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def write_all(fd: int, data: bytes) -> None:
    """Writes every byte (``os.write`` may write fewer than asked: a signal, a full disk).

    Raises:
        OSError: a write failed; a prefix of ``data`` may be in the file (the caller knows the
            offset before it and may `truncate` back to it).
    """
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def append(fd: int, data: bytes, *, durable: bool, fsync: Fsync | None = None) -> None:
    """`write_all`, then (``durable``) fsync: once this returns the bytes survive power loss.

    Raises:
        OSError: the write or the fsync failed. After a failed fsync never retry it on the same
            file: the kernel may have dropped the dirty pages and report the next fsync as a
            success (PostgreSQL's "fsyncgate").
    """
    write_all(fd, data)
    if durable:
        _fsync_of(fsync)(fd)


def truncate(
    path: str | os.PathLike[str], size: int, *, durable: bool, fsync: Fsync | None = None
) -> None:
    """Cuts the file at ``path`` to ``size`` bytes (e.g. a torn last line), fsynced if
    ``durable`` so that the cut holds before anything is appended after it.

    Raises:
        OSError: the file cannot be opened, cut or fsynced.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        if durable:
            _fsync_of(fsync)(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike[str], *, fsync: Fsync | None = None) -> None:
    """fsyncs a directory: makes the names created, renamed or removed in it durable (a renamed
    file whose rename is not on disk is, after power loss, the old file or no file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        _fsync_of(fsync)(fd)
    finally:
        os.close(fd)


# ==== Atomic replace ====


def temp_beside(path: str | os.PathLike[str]) -> Path:
    """A new empty file, mode 0644, with a unique hidden name ``.<name>.<random>.tmp`` in
    ``path``'s directory: write it, then `commit` it to ``path``. Same directory, because a
    rename is atomic only within one file system.

    Raises:
        OSError: the directory does not exist or is not writable.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; these files are read by other users too
    finally:
        os.close(fd)
    return Path(tmp)


def commit(
    tmp: str | os.PathLike[str], path: str | os.PathLike[str], *, durable: bool = True,
    fsync: Fsync | None = None,
) -> None:
    """Renames the finished temporary file ``tmp`` (from `temp_beside`) over ``path``.

    ``durable``: fsync ``tmp`` before the rename (else the rename may reach the disk before the
    data, leaving an empty or partial file under the final name after power loss) and the
    directory after it (else the old file may come back). Without it the replace is still
    atomic for readers and against a process crash.

    Raises:
        OSError: naming the file; ``tmp`` is removed and ``path`` keeps its old content.
    """
    tmp, path = Path(tmp), Path(path)
    try:
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                _fsync_of(fsync)(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _name(e, path)
        raise
    if durable:
        try:
            fsync_dir(path.parent, fsync=fsync)
        except OSError as e:
            _name(e, path.parent)
            raise


def atomic_replace(
    path: str | os.PathLike[str], data: bytes, *, durable: bool = True, fsync: Fsync | None = None
) -> None:
    """Writes ``data`` to ``path`` so that readers and a restart see the old file or the new
    one, never a mix: `temp_beside`, write, fsync, rename, fsync the directory (`commit`).
    Concurrent writers of one path each use their own temporary file; the last rename wins.

    Raises:
        OSError: naming the file (e.g. a full disk); ``path`` keeps its old content and no
            temporary file is left behind.
    """
    path = Path(path)
    tmp = temp_beside(path)
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _name(e, path)
        raise
    commit(tmp, path, durable=durable, fsync=fsync)


def _name(e: BaseException, path: Path) -> None:
    # os.write/os.fsync errors carry no file name; errors name the file (ARCHITECTURE.md).
    if isinstance(e, OSError) and e.filename is None:
        e.filename = str(path)


# ==== Watermark ====


class Watermark:
    """One small checksummed record, rewritten in place: a fixed-size line (`SIZE` bytes,
    `encode_line` padded with spaces) written with one ``pwrite`` at offset 0.

    For a value that changes often and must be cheap to update, like the last acknowledged
    sequence number of a journal: no rename, no new blocks (the file never grows, so a full disk
    does not stop it), and a torn write (a crash in the middle of a sector) fails the checksum
    instead of reading as another number. `write` does not fsync; `sync` does, when the caller
    decides the value must survive power loss.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "ACKED"
    >>> w = Watermark(p); w.write({"acked": 12}); w.close()
    >>> Watermark.read(p)
    {'acked': 12}
    """

    SIZE = 64

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    @classmethod
    def encode(cls, obj: dict[str, Any]) -> bytes:
        line = encode_line(obj)
        pad = cls.SIZE - len(line)
        if pad < 0:
            raise ValueError(f"a watermark record is at most {cls.SIZE} bytes, got {obj!r}")
        payload = line[9:-1] + b" " * pad  # JSON ignores trailing spaces; the crc covers them
        return b"%08x " % zlib.crc32(payload) + payload + b"\n"

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The record, or None if it fails its check (a torn write).

        Raises:
            FileNotFoundError: there is no such file.
            OSError: it cannot be read.
        """
        data = Path(path).read_bytes()
        return decode_line(data[: cls.SIZE].split(b"\n", 1)[0])

    def write(self, obj: dict[str, Any]) -> None:
        """Replaces the record (one ``pwrite``, no fsync).

        Raises:
            OSError: the write failed.
        """
        data = self.encode(obj)
        if os.pwrite(self._fd, data, 0) != len(data):  # 64 bytes in one block: never short
            raise OSError(f"{self.path}: short write")

    def sync(self, *, fsync: Fsync | None = None) -> None:
        """fsyncs the record.

        Raises:
            OSError: the fsync failed.
        """
        _fsync_of(fsync)(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
