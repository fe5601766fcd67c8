"""The store file: round trip, versioning, corruption, truncation, atomic save."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from skip_policy import platform_lacks

from tagrouter_fast import _core
from tagrouter_fast.core import StoreFormatError, TagDecider, TagRouterError, TagScorer

RECORDS = [
    ("q1", ["Poem", "Humor"], "big", "win"),
    ("q1", ["Poem", "Humor"], "small", "tie"),
    ("q2", ["Math"], "big", "loss"),
    ("q2", ["Math"], "small", "win"),
    ("q3", ["Math", "Ünïcode"], "mid", "tie"),
]


@pytest.fixture
def scorer() -> TagScorer:
    return TagScorer.from_records(RECORDS, s_tie=0.2, weighting="shrunk", prior_strength=1.5)


def test_round_trip_keeps_counts_params_and_scores(scorer, tmp_path):
    path = tmp_path / "store.trs"
    scorer.save(path)
    back = TagScorer.load(path)
    assert back.to_bytes() == scorer.to_bytes() == path.read_bytes()
    assert back.models == scorer.models and back.tags == scorer.tags
    assert (back.s_tie, back.weighting, back.prior_strength) == (0.2, "shrunk", 1.5)
    np.testing.assert_array_equal(back.score_matrix(), scorer.score_matrix())
    assert back.counts("small", "Poem") == (0, 1, 0)
    # Counts, not only scores: a loaded store can still be re-weighted and merged exactly.
    assert (
        back.reweighted(weighting="paper").to_bytes()
        == TagScorer.from_records(RECORDS, s_tie=0.2, prior_strength=1.5).to_bytes()
    )
    merged = back.merged(TagScorer.from_records([("q9", ["Math"], "big", "win")]))
    assert merged.tag_count("Math") == 3
    costs = {"big": 3.0, "mid": 2.0, "small": 1.0}
    queries = [["Poem"], ["Math", "x"], []]
    assert TagDecider(TagScorer.load(path), costs).route_tags_batch(queries) == TagDecider(
        scorer, costs
    ).route_tags_batch(queries)


def test_accepts_str_and_pathlike(scorer, tmp_path):
    scorer.save(str(tmp_path / "a.trs"))
    assert TagScorer.load(str(tmp_path / "a.trs")).models == scorer.models


def test_layout_matches_docs(scorer):
    data = scorer.to_bytes()
    magic, version, flags, body_len = struct.unpack_from("<8sIIQ", data)
    assert (magic, version, flags) == (b"TAGRSTOR", _core.STORE_FORMAT_VERSION, 0)
    assert len(data) == 24 + body_len + 4
    # The trailer is zlib's CRC-32 of everything before it.
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    s_win, s_tie, s_loss, prior, weighting = struct.unpack_from("<ddddB", data, 24)
    assert (s_win, s_tie, s_loss, prior, weighting) == (1.0, 0.2, -1.0, 1.5, 2)
    n_models, n_tags, n_queries = struct.unpack_from("<III", data, 24 + 40)
    assert (n_models, n_tags, n_queries) == (3, 4, 3)


def write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bad.trs"
    p.write_bytes(data)
    return p


def test_counts_that_disagree_with_the_queries_are_an_error(scorer):
    # A file edited and re-sealed with a valid checksum (crafted, or a writer bug): the stored
    # counts must agree with the per-query outcomes they are sums of.
    data = bytearray(scorer.to_bytes())
    names = sum(4 + len(x.encode()) for x in scorer.models + scorer.tags)
    first_total = 24 + 40 + 16 + names
    data[first_total] ^= 1
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    with pytest.raises(StoreFormatError, match="model totals disagree"):
        TagScorer.from_bytes(bytes(data))


def test_other_version_is_a_clear_error(scorer, tmp_path):
    data = bytearray(scorer.to_bytes())
    data[8:12] = struct.pack("<I", 7)
    with pytest.raises(StoreFormatError, match=r"version 7.*reads versions 1 to 2"):
        TagScorer.load(write(tmp_path, bytes(data)))


def test_not_a_store(tmp_path):
    with pytest.raises(StoreFormatError, match="not a tagrouter store"):
        TagScorer.load(write(tmp_path, b"query_id,tags\nq1,Poem\n"))


@pytest.mark.parametrize("keep", [0, 5, 23, 24, 60, -5, -1])
def test_truncated_file_is_an_error(scorer, tmp_path, keep):
    data = scorer.to_bytes()
    with pytest.raises(StoreFormatError, match="truncated|not a tagrouter store"):
        TagScorer.load(write(tmp_path, data[:keep]))


def test_every_corrupted_byte_is_detected(scorer):
    data = scorer.to_bytes()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(StoreFormatError):
            TagScorer.from_bytes(bytes(bad))


def test_trailing_garbage_is_an_error(scorer):
    with pytest.raises(StoreFormatError, match="trailing"):
        TagScorer.from_bytes(scorer.to_bytes() + b"\0")


def test_store_format_error_is_a_tagrouter_error(tmp_path):
    with pytest.raises(TagRouterError):
        TagScorer.load(write(tmp_path, b"TAGRSTOR"))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        TagScorer.load(tmp_path / "nope.trs")
    assert e.value.filename == str(tmp_path / "nope.trs")


def test_save_leaves_no_temporary_files(scorer, tmp_path):
    for _ in range(3):
        scorer.save(tmp_path / "store.trs")
    assert os.listdir(tmp_path) == ["store.trs"]


def test_failed_save_cleans_up_and_keeps_the_target(scorer, tmp_path):
    target = tmp_path / "store.trs"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(OSError):
        scorer.save(target)
    assert (target / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["store.trs"]
    with pytest.raises(FileNotFoundError):
        scorer.save(tmp_path / "no-such-dir" / "store.trs")


def test_save_replaces_an_old_file_whole(scorer, tmp_path):
    path = tmp_path / "store.trs"
    path.write_bytes(b"x" * 100_000)
    scorer.save(path)
    assert TagScorer.load(path).to_bytes() == scorer.to_bytes()


# ==== Only regular files, never more than they hold ====


def _load_in_thread(path: Path, timeout: float = 10.0) -> BaseException | None:
    """Loads ``path`` in a daemon thread, so that a load that blocks fails the test instead of
    hanging it; returns the exception raised (None if it loaded)."""
    import threading

    out: list[BaseException | None] = []

    def target() -> None:
        try:
            TagScorer.load(path)
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"TagScorer.load({path}) did not return within {timeout} s"
    return out[0]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason=platform_lacks("no /dev/zero"))
def test_dev_zero_is_refused_without_reading_it():
    e = _load_in_thread(Path("/dev/zero"))
    assert isinstance(e, StoreFormatError)
    assert "/dev/zero" in str(e) and "not a regular file" in str(e)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason=platform_lacks("no FIFOs (os.mkfifo)"))
def test_fifo_is_refused_promptly(tmp_path):
    fifo = tmp_path / "store.fifo"
    os.mkfifo(fifo)
    e = _load_in_thread(fifo)
    assert isinstance(e, StoreFormatError)
    assert str(fifo) in str(e) and "not a regular file" in str(e)


def test_directory_is_refused(tmp_path):
    with pytest.raises(StoreFormatError, match="not a regular file"):
        TagScorer.load(tmp_path)


def test_header_announcing_more_than_the_file_is_refused(scorer, tmp_path):
    data = bytearray(scorer.to_bytes())
    data[16:24] = struct.pack("<Q", 2**62)
    path = tmp_path / "liar.trs"
    path.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match="truncated"):
        TagScorer.load(path)
