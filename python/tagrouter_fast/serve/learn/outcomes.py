"""Learning from live outcomes: a durable, lossless outcome store for the gateway.

The gateway routes a query, `OutcomeStore.remember`\\ s the decision (its id, tags and model) and
later receives ``POST /v1/feedback {decision_id, outcome}``; `OutcomeStore.feedback` appends the
outcome to a journal, makes it durable, and only then adds the record ``(decision, tags, model,
outcome)`` to the router's counts (`TagRouter.learn`: O(its tags); readers never block), so the
next decision sees it. On start the store loads the latest snapshot and replays the journal
after it. docs/feedback.md describes the files, the fsync policy and the recovery rules.

State directory::

    MANIFEST.json              which snapshot is current: generation, journal sequence it covers
    store-<gen>.trs            snapshot of the store (TagScorer file, docs/store-format.md)
    registry-<gen>.log         the decision registry at that snapshot (with "already has an
                               outcome" marks), so idempotency survives journal compaction
    journal-<first seq>.log    outcomes, one self-checking line each, fsynced before the ack
    ACKED                      the last acknowledged journal sequence number (a watermark)
    decisions-<gen>.log        remembered decisions, appended without fsync (see below)
    LOCK                       held (flock) by the one process that owns the directory

Every line of the journal and logs is ``<crc32 of payload, 8 hex> <JSON payload>\\n``
(`tagrouter_fast.journal` owns the codec, the scan and the atomic writes). The snapshot says
which sequence number it covers, the journal's sequence numbers run without gaps and ``ACKED``
says where they must at least reach, so a torn, never-acknowledged tail (a write that a crash
or a full disk cut short) is cut with a warning, while damage that may hold an acknowledged
outcome stops the start with a `StateError` naming the file, the byte offset and how to
recover: never silently wrong counts.

>>> import tempfile
>>> from tagrouter_fast.core import TagDecider, TagScorer
>>> from tagrouter_fast.router import TagRouter
>>> base = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
>>> router = TagRouter(TagDecider(TagScorer.from_records(base), {"big": 10.0, "small": 1.0}),
...                    align=False)
>>> store = OutcomeStore(router, tempfile.mkdtemp())
>>> store.remember("d1", ["Poem"], "small")
>>> store.feedback("d1", "win")
1
>>> router.scorer.counts("small", "Poem")
(1, 0, 1)
>>> store.close()
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from tagrouter_fast.serve.learn.recovery import Recovery
from tagrouter_fast.serve.learn.state import (
    MANIFEST,
    QUERY_ID_PREFIX,
    DuplicateOutcome,
    OutcomeStoreError,
    StateError,
    UnknownDecision,
    fsync,
)

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter

__all__ = [
    "MANIFEST",
    "QUERY_ID_PREFIX",
    "DuplicateOutcome",
    "OutcomeStore",
    "OutcomeStoreError",
    "StateError",
    "UnknownDecision",
]


class OutcomeStore(Recovery):
    """Durable, idempotent outcome feedback for a `TagRouter`.

    Args:
        router: the router whose store learns; on open its store is replaced by the state
            directory's snapshot plus the replayed journal (`TagRouter.swap_store`).
        state_dir: where the journal, logs and snapshots live (created if missing). One process
            at a time: a second one gets `OutcomeStoreError`.
        fsync: fsync each journal append before `feedback` returns (group commit: one fsync
            covers every outcome written meanwhile). ``False`` survives a process crash (kill
            -9) but not an OS crash or power loss.
        snapshot_every: take a snapshot in a background thread after this many outcomes.
        decision_ttl_s: a remembered decision accepts an outcome for this long.
        max_decisions: at most this many decisions are remembered; the oldest go first.
        win_at: a numeric score ``>= win_at`` is a win ...
        tie_above: ... a score ``> tie_above`` (and below ``win_at``) a tie, anything lower a
            loss. The defaults are the tie band of the AlpacaEval table (1/3, 2/3).
        check_base: refuse to open a state directory that was started on another store than
            the router's (the bundle changed): its snapshot would silently replace the new one.
        keep_journal: keep every journal segment until `release_journal` says it may go, even
            once a snapshot covers it: for a reader that follows the journal (the Redis link
            publishes from it, `JournalReader`).
        clock: wall-clock seconds, for TTLs (tests pass a fake).

    Raises:
        StateError: a corrupt or inconsistent state file (named), or another base store.
        OutcomeStoreError: another process holds the state directory.
        ValueError: a bad argument.
    """

    def __init__(
        self,
        router: TagRouter,
        state_dir: str | os.PathLike[str],
        *,
        fsync: bool = True,
        snapshot_every: int = 1000,
        decision_ttl_s: float = 3600.0,
        max_decisions: int = 100_000,
        win_at: float = 2 / 3,
        tie_above: float = 1 / 3,
        check_base: bool = True,
        keep_journal: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("snapshot_every", snapshot_every), ("max_decisions", max_decisions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(decision_ttl_s, (int, float)) and 0 < decision_ttl_s < math.inf):
            raise ValueError(f"decision_ttl_s must be a finite number > 0, got {decision_ttl_s!r}")
        if not (0.0 <= tie_above < win_at <= 1.0):
            raise ValueError(
                f"need 0 <= tie_above < win_at <= 1, got tie_above={tie_above!r}, win_at={win_at!r}"
            )
        self.router = router
        self.state_dir = Path(state_dir)
        self._durable = bool(fsync)
        self._snapshot_every = snapshot_every
        self._ttl = float(decision_ttl_s)
        self._max_decisions = max_decisions
        self._win_at = float(win_at)
        self._tie_above = float(tie_above)
        self._clock = clock

        # Lock order (outer to inner): _snapshot_lock, _apply_lock, _sync_lock, _lock.
        # _lock: registry, sequence numbers, appends (held for microseconds, no fsync).
        self._lock = threading.Lock()
        # _sync_lock: group commit, one fsync at a time; journal rotation.
        self._sync_lock = threading.Lock()
        # _apply_lock: outcomes reach the router in journal order, so "applied" is always a
        # prefix of the journal and a snapshot can name the sequence number it covers.
        self._apply_lock = threading.Lock()
        # _snapshot_lock: one snapshot at a time.
        self._snapshot_lock = threading.Lock()

        self._registry = OrderedDict()
        self._unapplied = deque()
        self._next_seq = 1
        self._synced_seq = 0
        self._applied_seq = 0
        self._snap_seq = 0
        self._generation = 0
        self._next_generation = 1
        #: Store version: +1 per applied outcome and per `update_store`; persisted in the
        #: manifest, so it only grows across restarts.
        self.version = 0
        self._failed = None
        #: The newest decision time among decisions evicted by ``max_decisions``: an outcome
        #: brought with its decision (a decision token) that is not in the registry and not
        #: newer than this may be one that was counted and evicted, so it is refused, never
        #: counted twice. Persisted in the manifest.
        self._evicted_t = 0.0
        self._closed = False
        self._journal_fd = -1
        #: Size of the current journal segment: where a failed append is cut back to.
        self._journal_bytes = 0
        #: Compaction keeps journal entries above this (None: what the snapshot covers goes).
        self._journal_hold = 0 if keep_journal else None
        #: The ACKED watermark (durable stores only): last written and last fsynced values.
        self._acked = None
        self._acked_written = 0
        self._acked_synced = 0
        self._decisions_fd = -1
        self._lock_fd = -1
        self._last_log_warning = 0.0
        # Tests inject crashes between the snapshot steps through this hook.
        self._fault = None

        # Waiters of `feedback_async`'s on-loop group commit (one event loop: the gateway's),
        # and the moving average of the journal's fsync time that chooses it over the thread.
        # Per event loop (a library user may run several, in several threads), under
        # _commit_cv: each loop commits and wakes only its own waiters.
        self._loop_waiters = {}
        self._fsync_s = 0.0

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_dir_lock()
        try:
            self._open(check_base)
        except BaseException:
            self._close_files()
            raise
        self._snap_wanted = threading.Event()
        self._stopping = False
        self._next_snapshot_at = 0.0
        # `feedback_async`'s group commit: waiting outcomes and their futures, one thread.
        self._commit_cv = threading.Condition()
        self._waiters = []
        self._committer = None
        self._commit_stop = False
        self._worker = threading.Thread(
            target=self._snapshot_worker, name="tagrouter-outcomes-snapshot", daemon=True
        )
        self._worker.start()

    # ---- for a reader of the journal (the Redis link) ----

    def release_journal(self, upto_seq: int) -> None:
        """With ``keep_journal``: journal entries up to ``upto_seq`` may be compacted away once
        a snapshot covers them (the reader is done with them). Takes effect at the next
        compaction."""
        if self._journal_hold is not None:
            self._journal_hold = max(self._journal_hold, int(upto_seq))

    @property
    def applied_seq(self) -> int:
        """Journal sequence number of the last outcome in the router's store: every entry up to
        it is durable and applied (the outcomes applied are always a prefix of the journal)."""
        return self._applied_seq

    @contextlib.contextmanager
    def hold_applies(self) -> Iterator[int]:
        """Holds outcomes back from the router while the caller replaces the router's store by
        one derived from the applied outcomes; yields `applied_seq`, which stays put meanwhile.
        (The Redis link composes *shared log + this replica's outcomes* this way: without it,
        an outcome applied between its read and its swap would vanish from the routed store.)
        Feedback keeps being journaled meanwhile; only its acknowledgement waits."""
        with self._apply_lock:
            yield self._applied_seq

    # ---- introspection ----

    @property
    def failure(self) -> str | None:
        """Why the store accepts no outcome (closed, or a journal write/fsync failed), or None
        while it does."""
        if self._closed:
            return "the outcome store is closed"
        failed = self._failed
        return None if failed is None else f"the outcome journal failed: {failed}"

    @property
    def writable(self) -> bool:
        """Whether `feedback` can record outcomes (`failure` says why not)."""
        return self.failure is None

    def stats(self) -> dict[str, int]:
        """Numbers for /metrics: version, journal position, snapshot position, decisions."""
        with self._lock:
            return {
                "version": self.version,
                "journal_seq": self._next_seq - 1,
                "applied_seq": self._applied_seq,
                "snapshot_seq": self._snap_seq,
                "acked_seq": self._acked_written,
                "decisions": len(self._registry),
                "failed": int(self._failed is not None),
            }

    # ---- shutdown ----

    def close(self, *, snapshot: bool = True) -> None:
        """Applies what is in flight, takes a final snapshot (so the next start replays
        nothing), and releases the state directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # refuses new outcomes; ones in flight finish below
        self._stopping = True
        with self._commit_cv:  # outcomes already waiting are committed first
            self._commit_stop = True
            self._commit_cv.notify()
        if self._committer is not None:
            self._committer.join()
        self._snap_wanted.set()
        self._worker.join()
        try:
            with self._sync_lock:
                with self._lock:
                    target, fd = self._next_seq - 1, self._journal_fd
                if self._durable and self._failed is None and target > self._synced_seq:
                    fsync(fd)
                if self._failed is None:
                    with self._lock:
                        self._synced_seq = max(self._synced_seq, target)
                    self._mark_acked(target)
                self._sync_acked()
            self._apply(None)
            if snapshot and self._failed is None and self._applied_seq > self._snap_seq:
                self._snapshot_now()
        finally:
            with self._snapshot_lock, self._apply_lock, self._sync_lock, self._lock:
                if self._durable and self._decisions_fd >= 0:
                    with contextlib.suppress(OSError):
                        fsync(self._decisions_fd)  # a clean shutdown keeps every decision
                self._close_files()

    def _close_files(self) -> None:
        if self._acked is not None:
            self._acked.close()
            self._acked = None
        for name in ("_journal_fd", "_decisions_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, -1)

    def __enter__(self) -> OutcomeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


