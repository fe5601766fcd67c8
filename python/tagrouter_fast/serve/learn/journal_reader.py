"""Following the journal of an open `OutcomeStore`: `JournalReader`, the Redis link's outbox."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tagrouter_fast import journal
from tagrouter_fast.core import Record
from tagrouter_fast.serve.learn.registry import _check_decision_fields
from tagrouter_fast.serve.learn.state import (
    _JOURNAL_RE,
    OUTCOME_LABELS,
    QUERY_ID_PREFIX,
    StateError,
    _numbered,
    log,
)

if TYPE_CHECKING:
    from tagrouter_fast.serve.learn.outcomes import OutcomeStore

__all__ = ["JournalReader"]


class JournalReader:
    """Follows the journal of an open `OutcomeStore` from a sequence number on, reading each
    entry once the store has applied it.

    The Redis link publishes this replica's outcomes from here: the journal is its outbox (one
    fsync per group commit, no second file to keep in step). Open the store with
    ``keep_journal=True`` and `OutcomeStore.release_journal` what Redis confirmed, so no entry
    is compacted away before it was read and published.

    Args:
        store: the open store (the reader reads its files, never writes them).
        after_seq: the last entry already taken care of; reading starts after it. Entries that
            compaction removed before it started (published by an earlier process) are
            skipped: the reader goes on from the oldest entry the journal still holds.
    """

    def __init__(self, store: OutcomeStore, after_seq: int) -> None:
        self._dir = store.state_dir
        #: The next entry to read: every entry before it was returned (or compacted before).
        self.next_seq = after_seq + 1
        self._path: Path | None = None
        self._offset = 0
        self._warned = False

    def read(self, upto_seq: int) -> list[tuple[int, Record]]:
        """The entries from `next_seq` up to ``upto_seq`` (pass `OutcomeStore.applied_seq`)
        as ``(seq, record)``, in journal order; fewer if a line is damaged (logged once: the
        store's next start reports it)."""
        out: list[tuple[int, Record]] = []
        while self.next_seq <= upto_seq:
            if self._path is None:
                self._path, self._offset = self._segment_for(self.next_seq), 0
                if self._path is None:
                    break
            status = self._read_segment(upto_seq, out)
            if status == "gone":
                self._path = None  # compacted once read to its end: find the next one
                continue
            if status != "eof":
                break
            # The rest of the journal, if any, is in the segment named after the next entry.
            nxt = self._dir / f"journal-{self.next_seq:012d}.log"
            if nxt == self._path or not nxt.exists():
                break
            self._path, self._offset = nxt, 0
        return out

    def _segment_for(self, seq: int) -> Path | None:
        segments = _numbered(self._dir, _JOURNAL_RE)
        if not segments:
            return None
        before = [p for first, p in segments if first <= seq]
        return before[-1] if before else segments[0][1]

    def _read_segment(self, upto_seq: int, out: list[tuple[int, Record]]) -> str:
        assert self._path is not None
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return "gone"
        pos, status = 0, "eof"
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # the end, or a line being written: read again next time
            obj = journal.decode_line(data[pos:nl])
            try:
                if obj is None or not isinstance(obj.get("seq"), int):
                    raise StateError("corrupt line (checksum or JSON does not match)")
                seq = obj["seq"]
                did, tags, model, _ = _check_decision_fields(obj, f"{self._path}")
                label = obj.get("outcome")
                if label not in OUTCOME_LABELS:
                    raise StateError(f"bad outcome {label!r}")
            except StateError as e:
                if not self._warned:
                    self._warned = True
                    log.error("%s: byte %d: %s; outcomes after it are not published until "
                              "the journal is repaired", self._path, self._offset + pos, e)
                status = "bad"
                break
            if seq > upto_seq:
                status = "more"  # not applied yet: read again next time
                break
            if seq >= self.next_seq:
                out.append((seq, (QUERY_ID_PREFIX + did, list(tags), model, label)))
                self.next_seq = seq + 1
            pos = nl + 1
        self._offset += pos
        return status
