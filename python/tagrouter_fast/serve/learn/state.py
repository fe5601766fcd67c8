"""The outcome store's state directory: file names, limits, errors, file helpers, and the
fields every layer of `OutcomeStore` shares (`StoreState`).

The store is built in layers, one file each, each adding to the one below:
`registry` (remembered decisions) <- `commit` (journal appends, group commit, applying to the
router) <- `snapshots` (cuts, snapshot files, compaction) <- `recovery` (opening a state
directory: manifest, registry, journal replay) <- `outcomes` (`OutcomeStore`: construction,
the journal reader's hooks, introspection, shutdown). docs/feedback.md describes the files.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast import journal
from tagrouter_fast.core import Record

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.learn.commit import _Pending
    from tagrouter_fast.serve.learn.registry import _Decision

__all__ = [
    "ACKED",
    "MANIFEST",
    "QUERY_ID_PREFIX",
    "DuplicateOutcome",
    "OutcomeStoreError",
    "StateError",
    "StoreState",
    "UnknownDecision",
    "fsync",
]

log = logging.getLogger("tagrouter.outcomes")

STATE_FORMAT = "tagrouter-outcomes"
STATE_VERSION = 1
MANIFEST = "MANIFEST.json"
LOCK_FILE = "LOCK"
#: The watermark of acknowledged outcomes (`journal.Watermark`): rewritten in place after every
#: group commit without an fsync of its own (one fsync per commit stays the journal's), fsynced
#: every `ACKED_SYNC_S` seconds, at snapshots and on close.
ACKED = "ACKED"
ACKED_SYNC_S = 1.0
#: `feedback_async` fsyncs on the event loop itself while the journal's fsyncs take less than
#: this (moving average): a fast fsync on the loop costs less than handing the group to a thread,
#: whose every return to the GIL waits up to the switch interval (5 ms) behind a busy loop. A
#: slower disk gets the committer thread, so the loop never stalls on it.
INLINE_FSYNC_MAX_S = 0.001
#: Background snapshots run at most 1/SNAPSHOT_DUTY of the time (see `_snapshot_worker`).
SNAPSHOT_DUTY = 20
#: A decision's outcome record uses ``QUERY_ID_PREFIX + decision_id`` as its query id, so it can
#: never collide with a query id of the judgments the store was built from (a collision with
#: another tag set would make `TagScorer.with_records` refuse the record).
QUERY_ID_PREFIX = "fb:"
OUTCOME_LABELS = ("win", "tie", "loss")
MAX_DECISION_ID_CHARS = 256
MAX_TAGS = 1024

_JOURNAL_RE = re.compile(r"journal-(\d{12})\.log")
_DECISIONS_RE = re.compile(r"decisions-(\d{8})\.log")
_STORE_RE = re.compile(r"store-(\d{8})\.trs")
_REGISTRY_RE = re.compile(r"registry-(\d{8})\.log")

# Indirection so tests can make fsync fail without patching the os module for everyone: every
# file call of the store goes through `fsync` below, which reads this at call time.
_fsync = os.fsync


def fsync(fd: int) -> None:
    """``os.fsync``, or whatever a test put in `_fsync` (a failing disk)."""
    _fsync(fd)


class UnknownDecision(KeyError):
    """No remembered decision has this id, or it expired (the gateway answers 404)."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else "unknown decision"


class DuplicateOutcome(ValueError):
    """The decision already has an outcome (the gateway answers 409); nothing was counted."""


class StateError(ValueError):
    """A file of the state directory is corrupt or inconsistent; the message names it (and the
    line). Never repaired silently: a wrong count is worse than a refusal to start."""


class OutcomeStoreError(RuntimeError):
    """The store is closed, or a journal write/fsync failed so it refuses further outcomes
    until it is reopened (the gateway answers 503)."""


# ==== Files (the discipline itself lives in tagrouter_fast.journal) ====


def _scan(path: Path, *, strict: bool, last: bool) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """The good lines of a log as ``(line number, payload)``, and the byte offset where the
    good part ends.

    A bad final line of the ``last`` file is a torn write and ends the good part. Any other bad
    line is a `StateError` when ``strict`` (a file written atomically), else skipped with a
    warning (the unsynced decisions logs, where a lost decision only means a later 404). The
    journal has its own, stricter rules (`OutcomeStore._replay_journal`).
    """
    lines = journal.scan(path)
    out: list[tuple[int, dict[str, Any]]] = []
    for i, line in enumerate(lines):
        if line.payload is not None:
            out.append((line.number, line.payload))
            continue
        if last and i == len(lines) - 1:
            return out, line.offset
        if strict:
            raise StateError(
                f"{path}:{line.number}: corrupt line at byte {line.offset} (checksum or JSON "
                "does not match); refusing to guess"
            )
        log.warning("%s:%d: skipping a corrupt line of an unsynced decisions log", path,
                    line.number)
    return out, lines[-1].end if lines else 0


def _numbered(d: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    out = []
    for p in d.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _cut(path: Path, size: int, *, durable: bool) -> None:
    log.warning("%s: dropping a torn last line at byte %d (%d bytes, never acknowledged)", path,
                size, path.stat().st_size - size)
    journal.truncate(path, size, durable=durable, fsync=fsync)


class StoreState:
    """The fields of an `OutcomeStore` that its layers share (set in `OutcomeStore.__init__`
    and `recovery`), and the few helpers every layer calls.

    Lock order (outer to inner): _snapshot_lock, _apply_lock, _sync_lock, _lock.
    """

    router: TagRouter
    state_dir: Path
    version: int
    _durable: bool
    _snapshot_every: int
    _ttl: float
    _max_decisions: int
    _win_at: float
    _tie_above: float
    _clock: Callable[[], float]
    _lock: threading.Lock
    _sync_lock: threading.Lock
    _apply_lock: threading.Lock
    _snapshot_lock: threading.Lock
    _registry: OrderedDict[str, _Decision]
    _unapplied: deque[_Pending]
    _next_seq: int
    _synced_seq: int
    _applied_seq: int
    _snap_seq: int
    _generation: int
    _next_generation: int
    _failed: BaseException | None
    _evicted_t: float
    _closed: bool
    _journal_fd: int
    _journal_bytes: int
    _journal_hold: int | None
    _acked: journal.Watermark | None
    _acked_written: int
    _acked_synced: int
    _decisions_fd: int
    _lock_fd: int
    _last_log_warning: float
    _fault: Callable[[str], None] | None
    _base_sha256: str
    _loop_waiters: dict[Any, list[tuple[_Pending, Any]]]
    _fsync_s: float
    _snap_wanted: threading.Event
    _stopping: bool
    _next_snapshot_at: float
    _commit_cv: threading.Condition
    _waiters: list[tuple[_Pending, Any]]
    _committer: threading.Thread | None
    _commit_stop: bool

    def _learn(self, records: list[Record]) -> None:
        """Adds outcomes to the router's counts in O(their tags) (`TagRouter.learn`): no query
        row per outcome; the decision id stays in the journal and the registry."""
        self.router.learn([(list(tags), model, label) for _q, tags, model, label in records])

    def _check_writable_locked(self) -> None:
        if self._closed:
            raise OutcomeStoreError("the outcome store is closed")
        if self._failed is not None:
            raise OutcomeStoreError(
                f"the outcome store failed ({self._failed}) and accepts no outcome until it is "
                "reopened; every acknowledged outcome is in the journal"
            )

    def _fail_locked(self, e: BaseException) -> None:
        # After a failed fsync the kernel may have dropped the dirty pages, and a retry can
        # report success without writing them (the PostgreSQL "fsyncgate" lesson): never retry,
        # refuse further outcomes; a restart replays what the disk really holds.
        if self._failed is None:
            self._failed = e
            log.error("outcome journal failed: %s; refusing feedback until restart", e)

    def _mark_acked(self, seq: int) -> None:
        """Raises the ACKED watermark to ``seq`` (caller holds _sync_lock; every line up to
        ``seq`` is fsynced). One pwrite, no fsync: it survives kill -9 at once and power loss
        within `ACKED_SYNC_S`. It only ever says less than the journal holds, so it never makes
        a sound journal look damaged."""
        if self._acked is None or seq <= self._acked_written:
            return
        try:
            self._acked.write({"acked": seq})
            self._acked_written = seq
        except OSError as e:
            # A detector, not the data: the outcome is durable in the journal. Failing the
            # store for it would refuse outcomes that are safe; say so and go on.
            now = self._clock()
            if now - self._last_log_warning > 60.0:
                self._last_log_warning = now
                log.warning("%s: cannot update (%s); a later loss of the newest outcomes may go "
                            "undetected at the next start", self._acked.path, e)

    def _sync_acked(self) -> None:
        """fsyncs the ACKED watermark if it moved (snapshot thread, every `ACKED_SYNC_S`)."""
        mark, written = self._acked, self._acked_written
        if mark is None or written <= self._acked_synced:
            return
        try:
            mark.sync(fsync=fsync)
            self._acked_synced = written
        except OSError as e:
            log.warning("%s: fsync failed (%s); it may say less than the journal holds after "
                        "a power loss", mark.path, e)

    def _step(self, name: str) -> None:
        if self._fault is not None:
            self._fault(name)
