"""tagrouter_fast.journal: the one file discipline (checksummed lines, torn-tail scan, atomic
replace with file and directory fsync, appends, watermark)."""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import Any

import pytest

from tagrouter_fast import journal


def _kinds(fds: list[int]) -> list[str]:
    return ["dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file" for fd in fds]


class Recorder:
    """An fsync that records what it synced (the kind of each descriptor, taken while it is
    open) and the order of events around it."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.kinds: list[str] = []
        self.events = events if events is not None else []

    def __call__(self, fd: int) -> None:
        kind = _kinds([fd])[0]
        self.kinds.append(kind)
        self.events.append(f"fsync-{kind}")
        os.fsync(fd)


# ==== Lines ====


def test_line_codec_round_trip_and_format() -> None:
    obj = {"seq": 3, "id": "d\u00e9", "tags": ["a", "b"], "x": 0.5}
    line = journal.encode_line(obj)
    payload = b'{"id":"d\xc3\xa9","seq":3,"tags":["a","b"],"x":0.5}'
    assert line == b"%08x " % zlib.crc32(payload) + payload + b"\n"  # the format on disk
    assert journal.decode_line(line[:-1]) == obj
    assert journal.encode_line({"b": 1, "a": 2}) == journal.encode_line({"a": 2, "b": 1})
    with pytest.raises(ValueError):
        journal.encode_line({"x": float("nan")})


def test_lines_of_both_former_codecs_decode() -> None:
    # Lines as serve/learn/ (sorted keys) and the Redis outbox of serve/learn/shared.py
    # (insertion order) wrote them before this module: existing state directories still open.
    outcomes = b'3c44c363 {"id":"d1","model":"small","outcome":"win","seq":1,"t":1.0,"tags":[]}'
    outbox = b'bad05969 {"q":"fb:d1","tags":["Poem"],"model":"big","o":"win"}'
    assert journal.decode_line(outcomes) == {
        "id": "d1", "model": "small", "outcome": "win", "seq": 1, "t": 1.0, "tags": []
    }
    assert journal.decode_line(outbox) == {
        "q": "fb:d1", "tags": ["Poem"], "model": "big", "o": "win"
    }
    assert journal.encode_line(journal.decode_line(outcomes) or {})[:-1] == outcomes


@pytest.mark.parametrize(
    "raw",
    [b"", b"short", b"zzzzzzzz {}", b"00000000{}", b"%08x [1]" % zlib.crc32(b"[1]"),
     b"%08x {bad" % zlib.crc32(b"{bad"), b"%08x \xff" % zlib.crc32(b"\xff")],
)
def test_bad_lines_decode_to_none(raw: bytes) -> None:
    assert journal.decode_line(raw) is None


def test_any_flipped_byte_fails_the_check() -> None:
    line = journal.encode_line({"seq": 12, "outcome": "win"})[:-1]
    for i in range(len(line)):
        flipped = line[:i] + bytes([line[i] ^ 0x01]) + line[i + 1 :]
        assert journal.decode_line(flipped) is None, i


def test_scan_offsets_torn_tail_and_bad_middle_line(tmp_path: Path) -> None:
    a, b, c = (journal.encode_line({"seq": i}) for i in (1, 2, 3))
    p = tmp_path / "log"
    p.write_bytes(a + b"garbage\n" + b + c[:7])
    lines = journal.scan(p)
    assert [(x.number, x.offset, x.end) for x in lines] == [
        (1, 0, len(a)), (2, len(a), len(a) + 8), (3, len(a) + 8, len(a) + 8 + len(b)),
        (4, len(a) + 8 + len(b), len(a) + 8 + len(b) + 7),
    ]
    assert [x.payload for x in lines] == [{"seq": 1}, None, {"seq": 2}, None]
    # A whole line without its newline is still a write that did not finish.
    assert journal.scan_bytes(a[:-1])[0].payload is None
    assert journal.scan_bytes(b"") == []


# ==== Appends and truncate ====


def test_write_all_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    fd = journal.open_append(tmp_path / "log")
    try:
        journal.write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert (tmp_path / "log").read_bytes() == b"0123456789"


def test_append_fsyncs_when_durable_and_truncate_cuts(tmp_path: Path) -> None:
    rec = Recorder()
    p = tmp_path / "log"
    fd = journal.open_append(p)
    try:
        journal.append(fd, b"one\n", durable=False, fsync=rec)
        assert rec.kinds == []
        journal.append(fd, b"two\n", durable=True, fsync=rec)
        assert rec.kinds == ["file"]
    finally:
        os.close(fd)
    journal.truncate(p, 4, durable=True, fsync=rec)
    assert p.read_bytes() == b"one\n" and rec.kinds == ["file", "file"]


# ==== Atomic replace ====


def test_atomic_replace_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    rec = Recorder(events)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "MANIFEST.json"
    target.write_bytes(b"old")
    journal.atomic_replace(target, b"new", fsync=rec)
    assert target.read_bytes() == b"new"
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["MANIFEST.json"]  # no temporary left
    # Not durable: still atomic, no fsync at all.
    events.clear()
    journal.atomic_replace(target, b"newer", durable=False, fsync=rec)
    assert events == ["rename"] and target.read_bytes() == b"newer"


def test_atomic_replace_default_fsync_reaches_the_directory_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a seam, os.fsync (looked up at call time) is what runs: the Redis outbox's old
    # rewrite forgot the directory, and nothing caught it.
    fds: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fds.extend(_kinds([fd])), real(fd))[1])
    journal.atomic_replace(tmp_path / "x", b"data")
    assert fds == ["file", "dir"]


def test_failed_atomic_replace_keeps_the_old_file_and_names_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "store.trs"
    target.write_bytes(b"old")

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        journal.atomic_replace(target, b"new")
    assert e.value.filename == str(target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.trs"]

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        journal.atomic_replace(target, b"new", fsync=broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.trs"]


def test_temp_beside_and_commit_for_streamed_files(tmp_path: Path) -> None:
    events: list[str] = []
    rec = Recorder(events)
    out = tmp_path / "routed.jsonl"
    tmp = journal.temp_beside(out)
    assert tmp.parent == tmp_path and tmp.name.startswith(".routed.jsonl.")
    assert tmp.name.endswith(".tmp") and stat.S_IMODE(tmp.stat().st_mode) == 0o644
    with tmp.open("w") as f:
        f.write('{"a": 1}\n')
    journal.commit(tmp, out, fsync=rec)
    assert out.read_text() == '{"a": 1}\n' and not tmp.exists()
    assert events == ["fsync-file", "fsync-dir"]
    missing = journal.temp_beside(out)
    missing.unlink()
    with pytest.raises(FileNotFoundError):
        journal.commit(missing, out)
    assert out.read_text() == '{"a": 1}\n'


# ==== Watermark ====


def test_watermark_is_rewritten_in_place_and_a_torn_one_reads_as_none(tmp_path: Path) -> None:
    p = tmp_path / "ACKED"
    w = journal.Watermark(p)
    ino = p.stat().st_ino
    for v in (1, 123456789012, 7):  # shorter after longer: the padding leaves nothing behind
        w.write({"acked": v})
        assert journal.Watermark.read(p) == {"acked": v}
        assert p.stat().st_size == journal.Watermark.SIZE and p.stat().st_ino == ino
    rec = Recorder()
    w.sync(fsync=rec)
    assert rec.kinds == ["file"]
    w.close()
    data = bytearray(p.read_bytes())
    data[12] ^= 0x04
    p.write_bytes(bytes(data))
    assert journal.Watermark.read(p) is None
    with pytest.raises(FileNotFoundError):
        journal.Watermark.read(tmp_path / "nope")
    with pytest.raises(ValueError, match="at most 64 bytes"):
        journal.Watermark.encode({"x": "y" * 60})
