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
import gc
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tagrouter_fast import journal
from tagrouter_fast.core import Record, TagScorer

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter

try:  # POSIX; without it two processes on one state dir are not detected (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "QUERY_ID_PREFIX",
    "JournalReader",
    "DuplicateOutcome",
    "OutcomeStore",
    "OutcomeStoreError",
    "StateError",
    "UnknownDecision",
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
# file call of this module passes it to tagrouter_fast.journal.
_fsync = os.fsync


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
    journal.truncate(path, size, durable=durable, fsync=_fsync)


# ==== Registry ====


class _Decision:
    """One remembered decision."""

    __slots__ = ("tags", "model", "t", "seq", "applied", "line_open", "line_done")

    def __init__(self, tags: tuple[str, ...], model: str, t: float, seq: int = 0) -> None:
        self.tags, self.model, self.t = tags, model, t
        #: Its registry-file line without and with ``done``, encoded once (when it gets its
        #: outcome, or at its first snapshot) and reused by the snapshots after: a snapshot
        #: joins bytes instead of encoding JSON per entry (0.6 s at 100,000 entries, in the
        #: GIL). Bytes, not a list: the collector does not track them.
        self.line_open: bytes | None = None
        self.line_done: bytes | None = None
        #: Journal sequence number of its outcome; 0 while it has none, -1 when it got one
        #: before the snapshot its registry entry was loaded from. Set once, never cleared:
        #: that is what makes a retried POST a DuplicateOutcome instead of a second count.
        self.seq = seq
        self.applied = seq != 0


def _registry_line(did: str, dec: _Decision, done: bool) -> bytes:
    """The decision's line in a snapshot's registry file, encoded once and kept."""
    line = dec.line_done if done else dec.line_open
    if line is None:
        row: dict[str, Any] = {"id": did, "tags": list(dec.tags), "model": dec.model, "t": dec.t}
        if done:
            row["done"] = True
        line = journal.encode_line(row)
        if done:
            dec.line_done = line
        else:
            dec.line_open = line
    return line


def _resolve_group(items: list[tuple[Any, _Pending]], error: BaseException | None) -> None:
    """Wakes the callers of one group commit (on their event loop)."""
    for fut, p in items:
        if fut.done():  # the caller was cancelled; its outcome is counted all the same
            continue
        if error is not None:
            fut.set_exception(error if isinstance(error, OutcomeStoreError)
                              else OutcomeStoreError(f"journal commit failed: {error}"))
        else:
            fut.set_result(p.version)


class _Pending:
    """An outcome that is in the journal but not yet in the router's store."""

    __slots__ = ("seq", "record", "decision", "version")

    def __init__(self, seq: int, record: Record, decision: _Decision) -> None:
        self.seq, self.record, self.decision = seq, record, decision
        self.version = 0  # the store version once applied


@dataclass(frozen=True)
class _Cut:
    """What one snapshot holds: taken under the apply lock, written outside it."""

    generation: int
    seq: int
    version: int
    store: TagScorer
    registry: list[tuple[str, _Decision]]
    #: See `OutcomeStore._evicted_t`.
    evicted_t: float = 0.0


def _check_id(decision_id: object) -> str:
    if not isinstance(decision_id, str):
        raise ValueError(f"decision_id must be a str, got {type(decision_id).__name__}")
    if not decision_id or len(decision_id) > MAX_DECISION_ID_CHARS:
        raise ValueError(
            f"decision_id must be 1-{MAX_DECISION_ID_CHARS} characters, got {len(decision_id)}"
        )
    return decision_id


def _check_tags(tags: object) -> tuple[str, ...]:
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Sequence):
        raise TypeError(f"tags must be a sequence of str, got {type(tags).__name__}")
    tag_tuple = tuple(tags)
    if len(tag_tuple) > MAX_TAGS or not all(isinstance(t, str) for t in tag_tuple):
        raise TypeError(f"tags must be at most {MAX_TAGS} str, got {tags!r:.200}")
    return tag_tuple


def _check_decision_fields(
    obj: dict[str, Any], where: str
) -> tuple[str, tuple[str, ...], str, float]:
    did, tags, model, t = obj.get("id"), obj.get("tags"), obj.get("model"), obj.get("t")
    if (
        not isinstance(did, str)
        or not did
        or not isinstance(tags, list)
        or not all(isinstance(x, str) for x in tags)
        or not isinstance(model, str)
        or not model
        or isinstance(t, bool)
        or not isinstance(t, (int, float))
    ):
        raise StateError(f"{where}: a checksummed line with missing or ill-typed fields: {obj!r}")
    return did, tuple(tags), model, float(t)


# ==== The store ====


class OutcomeStore:
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

        self._registry: OrderedDict[str, _Decision] = OrderedDict()
        self._unapplied: deque[_Pending] = deque()
        self._next_seq = 1
        self._synced_seq = 0
        self._applied_seq = 0
        self._snap_seq = 0
        self._generation = 0
        self._next_generation = 1
        #: Store version: +1 per applied outcome and per `update_store`; persisted in the
        #: manifest, so it only grows across restarts.
        self.version = 0
        self._failed: BaseException | None = None
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
        self._journal_hold: int | None = 0 if keep_journal else None
        #: The ACKED watermark (durable stores only): last written and last fsynced values.
        self._acked: journal.Watermark | None = None
        self._acked_written = 0
        self._acked_synced = 0
        self._decisions_fd = -1
        self._lock_fd = -1
        self._last_log_warning = 0.0
        # Tests inject crashes between the snapshot steps through this hook.
        self._fault: Callable[[str], None] | None = None

        # Waiters of `feedback_async`'s on-loop group commit (one event loop: the gateway's),
        # and the moving average of the journal's fsync time that chooses it over the thread.
        # Per event loop (a library user may run several, in several threads), under
        # _commit_cv: each loop commits and wakes only its own waiters.
        self._loop_waiters: dict[Any, list[tuple[_Pending, Any]]] = {}
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
        self._waiters: list[tuple[_Pending, Any]] = []
        self._committer: threading.Thread | None = None
        self._commit_stop = False
        self._worker = threading.Thread(
            target=self._snapshot_worker, name="tagrouter-outcomes-snapshot", daemon=True
        )
        self._worker.start()

    # ---- routing side: remember decisions ----

    def remember(self, decision_id: str, tags: Sequence[str], model: str) -> None:
        """Remembers a routing decision so that an outcome can be posted for it.

        Cheap enough for the routing path: one append to the decisions log, without fsync (a
        process crash loses nothing; an OS crash may lose the newest decisions, whose feedback
        then gets `UnknownDecision`). The registry is bounded by ``max_decisions`` and
        ``decision_ttl_s``.

        Raises:
            ValueError: a bad or already remembered decision id, a bad model.
            TypeError: ``tags`` is not a sequence of str.
            OutcomeStoreError: the store is closed.
        """
        _check_id(decision_id)
        tag_tuple = _check_tags(tags)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        now = self._clock()
        line = journal.encode_line(
            {"id": decision_id, "tags": list(tag_tuple), "model": model, "t": now}
        )
        with self._lock:
            if self._closed:
                raise OutcomeStoreError("the outcome store is closed")
            self._expire_locked(now)
            if decision_id in self._registry:
                raise ValueError(f"decision id {decision_id!r} is already remembered")
            self._registry[decision_id] = _Decision(tag_tuple, model, now)
            self._evict_over_max_locked()
            try:
                journal.write_all(self._decisions_fd, line)
            except OSError as e:
                # Routing must not fail because the decisions log cannot grow: the decision
                # works in this process, it only would not survive a restart.
                if now - self._last_log_warning > 60.0:
                    self._last_log_warning = now
                    log.warning(
                        "cannot append to the decisions log (%s); decisions made now "
                        "will not survive a restart",
                        e,
                    )

    def _evict_over_max_locked(self) -> None:
        reg = self._registry
        while len(reg) > self._max_decisions:
            _, d = reg.popitem(last=False)
            self._evicted_t = max(self._evicted_t, d.t)

    def _expire_locked(self, now: float) -> None:
        # Insertion order is time order (up to clock steps), so expiry pops from the front.
        reg = self._registry
        while reg:
            first = next(iter(reg.values()))
            if first.t + self._ttl > now:
                break
            reg.popitem(last=False)

    # ---- feedback ----

    def outcome_label(self, outcome: str | float) -> tuple[str, float | None]:
        """``(label, score)``: "win"/"tie"/"loss" as given (score None), or a score in [0, 1]
        mapped by the thresholds (``>= win_at`` win, ``> tie_above`` tie, else loss).

        Raises:
            ValueError: anything else, naming the value.
        """
        if isinstance(outcome, str):
            if outcome in OUTCOME_LABELS:
                return outcome, None
        elif isinstance(outcome, (int, float)) and not isinstance(outcome, bool):
            x = float(outcome)
            if 0.0 <= x <= 1.0:  # NaN fails both comparisons
                label = "win" if x >= self._win_at else "tie" if x > self._tie_above else "loss"
                return label, x
        raise ValueError(
            f"outcome must be 'win', 'tie', 'loss' or a score in [0, 1], got {outcome!r}"
        )

    def feedback(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """Counts one outcome for a decision and returns the new store version.

        The decision is a remembered one, or ``decision = (tags, model, decided at)`` brought
        by the caller (the gateway's verified decision token: nothing needs remembering, so
        any replica takes it). Idempotency holds either way: the registry marks the id, and a
        brought decision that may have been marked and evicted since (``max_decisions``) is
        refused as expired. ``key`` (the client key's id) goes into the journal line.

        The outcome is appended to the journal and (``fsync=True``) fsynced before it is
        applied and before this returns: once it returns, the outcome survives kill -9 and
        power loss. Then the decision's tags get the outcome in the router's store, visible to
        the next routing call. Thread-safe; concurrent calls share fsyncs.

        Raises:
            UnknownDecision: no such decision, or it expired.
            DuplicateOutcome: the decision already has an outcome (also after a restart).
            ValueError: a bad outcome or decision id.
            TypeError: a bad ``decision``.
            OutcomeStoreError: the store is closed or failed earlier (journal write or fsync
                error): nothing was counted.
        """
        pending = self._append(decision_id, outcome, decision, key)
        self._sync(pending.seq)
        return self._apply(pending)

    async def feedback_async(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """`feedback` for an event loop: the same checks, journal line and durability, without
        a worker thread per call. The line is appended at once (one write), then the call waits
        for the committer thread, which fsyncs once for every outcome waiting (group commit),
        applies them to the router in one change and wakes their callers with one callback per
        loop. Same errors as `feedback`; an fsync failure raises `OutcomeStoreError` for every
        outcome of that group."""
        import asyncio

        pending = self._append(decision_id, outcome, decision, key)
        if self._synced_seq >= pending.seq:  # fsync off: written is all that was asked
            return self._apply(pending)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._fsync_s < INLINE_FSYNC_MAX_S:
            # On the loop: after the callbacks ready now (outcomes arriving together share the
            # fsync), one fsync, one apply, every waiter woken directly.
            with self._commit_cv:
                group = self._loop_waiters.setdefault(loop, [])
                group.append((pending, fut))
                first = len(group) == 1
            if first:
                loop.call_soon(self._commit_on_loop, loop)
            return int(await fut)
        self._to_committer([(pending, fut)])
        return int(await fut)

    def _commit_on_loop(self, loop: Any) -> None:
        with self._commit_cv:
            batch = self._loop_waiters.pop(loop, [])
        if not batch:
            return
        # The event loop must never wait for a snapshot: its capture holds the sync and apply
        # locks (a store copy, file rotation, two fsyncs). Holding the snapshot lock keeps one
        # from starting; while one runs, this group goes to the committer thread instead.
        if not self._snapshot_lock.acquire(blocking=False):
            self._to_committer(batch)
            return
        try:
            error = self._commit(batch)
        finally:
            self._snapshot_lock.release()
        _resolve_group([(fut, p) for p, fut in batch], error)

    def _commit(self, batch: list[tuple[_Pending, Any]]) -> BaseException | None:
        """One fsync and one apply for a group; the error every waiter of it hears, if any."""
        try:
            self._sync(max(p.seq for p, _ in batch))
            self._apply(None)
        except BaseException as e:
            return e
        return None

    def _to_committer(self, batch: list[tuple[_Pending, Any]]) -> None:
        """Hands waiting outcomes to the committer thread (started on first use)."""
        with self._commit_cv:
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._commit_worker, name="tagrouter-commit", daemon=True
                )
                self._committer.start()
            self._waiters.extend(batch)
            self._commit_cv.notify()

    def _commit_worker(self) -> None:
        """Group commit for `feedback_async`: one fsync and one apply for all waiting outcomes,
        then one wake-up callback per event loop."""
        while True:
            with self._commit_cv:
                while not self._waiters and not self._commit_stop:
                    self._commit_cv.wait()
                if not self._waiters:
                    return  # stopping, nothing left
                batch, self._waiters = self._waiters, []
            error = self._commit(batch)
            by_loop: dict[Any, list[tuple[Any, _Pending]]] = {}
            for p, fut in batch:
                by_loop.setdefault(fut.get_loop(), []).append((fut, p))
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(_resolve_group, items, error)

    def _append(
        self, decision_id: str, outcome: str | float,
        decision: tuple[Sequence[str], str, float] | None, key: str | None,
    ) -> _Pending:
        """Checks an outcome and appends its journal line (no fsync); see `feedback`."""
        label, score = self.outcome_label(outcome)
        _check_id(decision_id)
        if decision is not None:
            tags, model, t = decision
            tag_tuple = _check_tags(tags)
            if not isinstance(model, str) or not model:
                raise ValueError(f"model must be a non-empty str, got {model!r}")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise TypeError(f"decided-at must be a finite number, got {t!r}")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        now = self._clock()
        with self._lock:
            self._check_writable_locked()
            d = self._registry.get(decision_id)
            if d is None and decision is not None:
                if t <= self._evicted_t:
                    raise UnknownDecision(
                        f"decision id {decision_id!r} is older than the {self._max_decisions} "
                        "decisions kept for idempotency (max_decisions)"
                    )
                if t + self._ttl <= now:
                    raise UnknownDecision(
                        f"decision id {decision_id!r} expired (older than {self._ttl:g} s)"
                    )
                d = self._registry[decision_id] = _Decision(tag_tuple, model, float(t))
                self._evict_over_max_locked()
            if d is None:
                raise UnknownDecision(f"unknown or expired decision id {decision_id!r}")
            if d.seq:
                raise DuplicateOutcome(
                    f"decision {decision_id!r} already has an outcome; it is counted once"
                )
            if d.t + self._ttl <= now:
                raise UnknownDecision(
                    f"decision id {decision_id!r} expired (older than {self._ttl:g} s)"
                )
            seq = self._next_seq
            entry: dict[str, Any] = {
                "seq": seq, "id": decision_id, "tags": list(d.tags), "model": d.model,
                "outcome": label, "t": d.t, "at": now,
            }  # fmt: skip
            if score is not None:
                entry["score"] = score
            if key is not None:
                entry["key"] = key
            line = journal.encode_line(entry)
            try:
                journal.write_all(self._journal_fd, line)
            except OSError as e:
                # A full disk may have taken part of the line. Cut it off now (shrinking a file
                # needs no space), so the journal ends on a whole line; if that fails too, the
                # next start cuts it: a torn tail was never acknowledged. Either way no more
                # appends: a later line after a torn one would be damage inside the journal.
                try:
                    os.ftruncate(self._journal_fd, self._journal_bytes)
                except OSError as e2:
                    log.error("cannot cut the failed append off the journal (%s); the next "
                              "start will", e2)
                self._fail_locked(e)
                raise OutcomeStoreError(f"journal append failed: {e}") from e
            self._next_seq = seq + 1
            self._journal_bytes += len(line)
            d.seq = seq
            # Its snapshot line now, a few microseconds per outcome, rather than all of them in
            # the snapshot thread at once (which starved the event loop for ~0.4 s per 50,000).
            _registry_line(decision_id, d, True)
            record = (QUERY_ID_PREFIX + decision_id, list(d.tags), d.model, label)
            pending = _Pending(seq, record, d)
            self._unapplied.append(pending)
            if not self._durable:
                self._synced_seq = seq  # "written" is all the durability asked for
        return pending

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

    def _sync(self, seq: int) -> None:
        """Group commit: returns once the journal is durable up to ``seq``."""
        if self._synced_seq >= seq:
            return
        with self._sync_lock:
            if self._synced_seq >= seq:
                return  # another thread's fsync covered this line
            with self._lock:
                self._check_writable_locked()
                target, fd = self._next_seq - 1, self._journal_fd
            t0 = time.perf_counter()
            try:
                _fsync(fd)
            except OSError as e:
                with self._lock:
                    self._fail_locked(e)
                raise OutcomeStoreError(f"journal fsync failed: {e}") from e
            self._fsync_s += (time.perf_counter() - t0 - self._fsync_s) * 0.1
            with self._lock:
                self._synced_seq = max(self._synced_seq, target)
            self._mark_acked(target)

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
            mark.sync(fsync=_fsync)
            self._acked_synced = written
        except OSError as e:
            log.warning("%s: fsync failed (%s); it may say less than the journal holds after "
                        "a power loss", mark.path, e)

    def _apply(self, pending: _Pending | None) -> int:
        """Applies every durable outcome not yet applied (in journal order, one batch: one
        store copy for all of them) and returns ``pending``'s version."""
        with self._apply_lock:
            if pending is None or not pending.version:
                with self._lock:
                    batch = []
                    while self._unapplied and self._unapplied[0].seq <= self._synced_seq:
                        batch.append(self._unapplied.popleft())
                if batch:
                    try:
                        self._learn([p.record for p in batch])
                    except Exception as e:
                        # Records are checked at remember(); reaching here is a bug or a store
                        # the router refuses. Durable but unapplied: a restart replays them.
                        with self._lock:
                            self._fail_locked(e)
                        raise OutcomeStoreError(f"applying outcomes failed: {e}") from e
                    v = self.version
                    for p in batch:
                        v += 1
                        p.version = v
                        p.decision.applied = True
                    self.version = v
                    self._applied_seq = batch[-1].seq
            version = pending.version if pending is not None else self.version
            due = self._applied_seq - self._snap_seq >= self._snapshot_every
        if due:
            self._snap_wanted.set()
        return version

    # ---- admin ----

    def update_store(self, fn: Callable[[TagScorer], TagScorer]) -> int:
        """Replaces the router's store by ``fn(store)`` (e.g. ``lambda s: s.with_model(recs)``)
        and makes it durable with a snapshot before returning; returns the new version.

        Outcomes keep arriving meanwhile (journaled); they are applied after the swap, on top
        of it. Changing the router's store directly instead would be lost at restart.

        Raises:
            whatever ``fn`` or `TagRouter.update_store` raise (the store is unchanged), OSError
            from the snapshot (the change is then live but not yet durable).
        """
        with self._snapshot_lock, self._apply_lock:
            with self._lock:
                self._check_writable_locked()
            self.router.update_store(fn)
            self.version += 1
            cut = self._capture()
            # Still under the apply lock: no outcome is applied on top of a swap that is not
            # on disk yet.
            self._persist(cut)
            return self.version

    def snapshot(self) -> Path:
        """Writes a snapshot of the current store now (atomically, with the journal position
        it covers), then compacts the journal and logs it makes redundant. Outcomes keep
        flowing; only the in-memory cut briefly holds them. Returns the snapshot file.

        Raises:
            OutcomeStoreError: the store is closed.
            OSError: a file could not be written; the previous snapshot stays current.
        """
        if self._closed:
            raise OutcomeStoreError("the outcome store is closed")
        return self._snapshot_now()

    def _snapshot_now(self) -> Path:
        with self._snapshot_lock:
            with self._apply_lock:
                cut = self._capture()
            return self._persist(cut)

    def _snapshot_worker(self) -> None:
        while True:
            self._snap_wanted.wait(timeout=ACKED_SYNC_S if self._acked is not None else None)
            self._snap_wanted.clear()
            if self._stopping:
                return
            self._sync_acked()
            if self._applied_seq - self._snap_seq < self._snapshot_every:
                continue
            if time.monotonic() < self._next_snapshot_at:
                continue  # woken again by the next outcome, or within ACKED_SYNC_S
            t0 = time.monotonic()
            try:
                self._snapshot_now()
            except Exception:
                # Nothing is lost: the journal still holds every outcome since the last one.
                log.exception("background snapshot failed; will retry after more outcomes")
            # A snapshot's cost grows with the registry (up to max_decisions entries: ~0.6 s
            # at 100,000), and it competes with the event loop for the GIL: background
            # snapshots take at most 1/SNAPSHOT_DUTY of the time, whatever snapshot_every says.
            # The journal holds what they defer; a restart replays it.
            self._next_snapshot_at = time.monotonic() + (time.monotonic() - t0) * (
                SNAPSHOT_DUTY - 1)

    def _capture(self) -> _Cut:
        """The cut of one snapshot (caller holds _snapshot_lock and _apply_lock): the store and
        the journal sequence it covers, a registry copy, and fresh journal/decisions files so
        that compaction can later delete whole files."""
        gen = self._next_generation
        self._next_generation += 1
        # The store copy (O(store)) outside the locks that feedback's appends take: under
        # _apply_lock (held by the caller) nothing is applied meanwhile, so it is the state at
        # _applied_seq all the same.
        store = self.router.scorer
        with self._sync_lock:
            old_journal = -1
            with self._lock:
                now = self._clock()
                self._expire_locked(now)
                seq, version = self._applied_seq, self.version
                # A C-speed copy, encoded outside the lock; with the collector paused: its
                # 100,000 new tuples would otherwise set off a full collection here (measured:
                # 70 ms with the event loop waiting on this lock).
                was = gc.isenabled()
                gc.disable()
                try:
                    registry = list(self._registry.items())
                finally:
                    if was:
                        gc.enable()
                new_decisions = journal.open_append(self.state_dir / f"decisions-{gen:08d}.log")
                old_decisions, self._decisions_fd = self._decisions_fd, new_decisions
                # After a failed append or fsync nothing more goes into the journal, so there
                # is nothing to rotate for; and a new segment would make a torn tail of the old
                # one look like damage inside the journal.
                if self._journal_bytes and self._failed is None:
                    first = self._next_seq
                    fd = journal.open_append(self.state_dir / f"journal-{first:012d}.log")
                    old_journal, self._journal_fd = self._journal_fd, fd
                    self._journal_bytes = 0
            os.close(old_decisions)  # the registry dump covers it
            if old_journal >= 0:
                # Lines written to the old segment are made durable here (this holds the sync
                # lock, so no waiter can miss them), and the new segment's name before any
                # line in it is acknowledged.
                try:
                    if self._durable:
                        _fsync(old_journal)
                        journal.fsync_dir(self.state_dir, fsync=_fsync)
                except OSError as e:
                    with self._lock:
                        self._fail_locked(e)
                    raise OutcomeStoreError(f"journal fsync failed: {e}") from e
                finally:
                    os.close(old_journal)
                with self._lock:
                    self._synced_seq = max(self._synced_seq, first - 1)
                self._mark_acked(first - 1)
        return _Cut(gen, seq, version, store, registry, self._evicted_t)

    def _persist(self, cut: _Cut) -> Path:
        d = self.state_dir
        store_name = f"store-{cut.generation:08d}.trs"
        registry_name = f"registry-{cut.generation:08d}.log"
        data = cut.store.to_bytes()
        journal.atomic_replace(d / store_name, data, durable=self._durable, fsync=_fsync)
        self._step("store-written")
        now = self._clock()
        lines = []
        for i, (did, dec) in enumerate(cut.registry):
            if i % 1024 == 1023:
                # This thread holds the GIL while it walks the registry (tens of ms at 100,000
                # decisions); sleeping a moment hands it to the event loop, which would
                # otherwise stall for the whole walk.
                time.sleep(1e-4)
            if dec.t + self._ttl <= now:
                continue
            # 0 < seq <= cut.seq means applied before the cut (applied is a journal prefix),
            # seq < 0 done before an earlier snapshot;
            # an outcome after the cut is replayed from the journal, which marks it again.
            done = dec.seq < 0 or 0 < dec.seq <= cut.seq
            lines.append(_registry_line(did, dec, done))
        journal.atomic_replace(
            d / registry_name, b"".join(lines), durable=self._durable, fsync=_fsync
        )
        self._step("registry-written")
        manifest = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "generation": cut.generation,
            "store": store_name,
            "store_sha256": hashlib.sha256(data).hexdigest(),
            "registry": registry_name,
            "seq": cut.seq,
            "store_version": cut.version,
            "base_sha256": self._base_sha256,
            "evicted_t": cut.evicted_t,
            "created": now,
        }
        journal.atomic_replace(
            d / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"), durable=self._durable,
            fsync=_fsync,
        )
        self._step("manifest-written")
        self._snap_seq, self._generation = cut.seq, cut.generation
        self._compact(cut.generation, cut.seq)
        return d / store_name

    def _compact(self, generation: int, seq: int) -> None:
        """Deletes what the manifest of ``generation`` (covering the journal up to ``seq``)
        makes redundant. Each deletion is safe alone: a crash halfway leaves files that the
        next open skips (and deletes)."""
        d = self.state_dir
        segments = _numbered(d, _JOURNAL_RE)
        hold = self._journal_hold
        upto = seq if hold is None else min(seq, hold)
        # A segment's entries all precede the next segment's first seq; the last (current)
        # segment is never deleted.
        for (_, path), (next_first, _) in zip(segments, segments[1:], strict=False):
            if next_first - 1 <= upto:
                path.unlink(missing_ok=True)
                self._step("journal-compacted")
        for gen, path in _numbered(d, _DECISIONS_RE):
            if gen < generation:
                path.unlink(missing_ok=True)
        for pattern in (_STORE_RE, _REGISTRY_RE):
            for gen, path in _numbered(d, pattern):
                if gen != generation:
                    path.unlink(missing_ok=True)
        self._step("compacted")

    def _step(self, name: str) -> None:
        if self._fault is not None:
            self._fault(name)

    # ---- open / recover ----

    def _take_dir_lock(self) -> None:
        self._lock_fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutcomeStoreError(
                f"{self.state_dir} is in use by another outcome store (another gateway process?)"
            ) from None

    def _open(self, check_base: bool) -> None:
        d = self.state_dir
        base = self.router.scorer.to_bytes()
        base_sha = hashlib.sha256(base).hexdigest()
        self._base_sha256 = base_sha
        manifest_path = d / MANIFEST
        segments = _numbered(d, _JOURNAL_RE)
        acked = self._read_acked()
        if not manifest_path.is_file():
            if segments or _numbered(d, _REGISTRY_RE) or acked:
                raise StateError(
                    f"{d}: journal, registry or {ACKED} files without {MANIFEST}; the state "
                    "directory is damaged (restore the manifest, or move the directory away to "
                    "start over)"
                )
            # A fresh directory pins the router's current store as generation 0, so a restart
            # replays onto exactly the store these outcomes were counted on.
            self._snap_seq = 0
            self._persist(_Cut(0, 0, 0, self.router.scorer, []))
            segments = []
            manifest: dict[str, Any] = {"generation": 0, "seq": 0, "store_version": 0,
                                        "registry": None}  # fmt: skip
        else:
            manifest = self._read_manifest(manifest_path)
            if check_base and manifest["base_sha256"] != base_sha:
                raise StateError(
                    f"{manifest_path}: this state was started on another store than the "
                    "router's (the bundle changed); its snapshot would replace the new store. "
                    "Move the state directory away to start over, or pass check_base=False to "
                    "keep the learned store"
                )
            self._base_sha256 = manifest["base_sha256"]
            store_path = d / manifest["store"]
            try:
                data = store_path.read_bytes()
            except OSError as e:
                raise StateError(
                    f"{manifest_path}: cannot read its snapshot {store_path}: {e}"
                ) from e
            if hashlib.sha256(data).hexdigest() != manifest["store_sha256"]:
                raise StateError(f"{store_path}: does not match the sha256 in {manifest_path}")
            try:
                scorer = TagScorer.from_bytes(data)
                self.router.swap_store(scorer)
            except Exception as e:
                raise StateError(f"{store_path}: cannot be routed with: {e}") from e
        gen, snap_seq = int(manifest["generation"]), int(manifest["seq"])
        self._generation, self._snap_seq = gen, snap_seq
        evicted = manifest.get("evicted_t", 0.0)  # absent in manifests written before tokens
        self._evicted_t = float(evicted) if isinstance(evicted, (int, float)) else 0.0
        now = self._clock()

        if acked is None and self._durable and manifest_path.is_file() and segments:
            log.warning(
                "%s: no %s watermark (a state directory of an older version, or it was deleted "
                "to accept a loss): this start cannot tell whether acknowledged outcomes at the "
                "end of the journal are missing", d, ACKED,
            )
        self._load_registry(manifest.get("registry"), gen)
        records, last_seq = self._replay_journal(segments, snap_seq, acked)
        if records:
            try:
                self._learn(records)
            except Exception as e:
                raise StateError(
                    f"{d}: replaying {len(records)} journal entries failed: {e}"
                ) from e

        # Trim the registry to its bounds (the logs are unordered across files).
        for did in [k for k, v in self._registry.items() if v.t + self._ttl <= now]:
            del self._registry[did]
        self._evict_over_max_locked()

        self._next_seq = last_seq + 1
        self._synced_seq = self._applied_seq = last_seq
        self.version = int(manifest["store_version"]) + len(records)
        # Append to the last journal segment if it fits the sequence, else start one.
        if segments and (segments[-1][1].stat().st_size > 0 or segments[-1][0] == self._next_seq):
            jpath = segments[-1][1]
        else:
            if segments:
                segments[-1][1].unlink()  # empty and misnamed: nothing in it
            jpath = d / f"journal-{self._next_seq:012d}.log"
        self._journal_fd = journal.open_append(jpath)
        self._journal_bytes = jpath.stat().st_size
        if self._durable:
            # What the journal holds now is counted: it is the new floor. Durable before the
            # first acknowledgement, like the journal segment's name (one directory fsync).
            self._acked = journal.Watermark(d / ACKED)
            self._acked.write({"acked": last_seq})
            self._acked.sync(fsync=_fsync)
            self._acked_written = self._acked_synced = last_seq
            journal.fsync_dir(d, fsync=_fsync)
        existing = [g for g, _ in _numbered(d, _DECISIONS_RE)]
        dgen = max([gen, *existing])
        self._decisions_fd = journal.open_append(d / f"decisions-{dgen:08d}.log")
        self._next_generation = max([dgen, *(g for g, _ in _numbered(d, _STORE_RE))]) + 1
        for tmp in d.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        self._compact(gen, snap_seq)

    def _read_acked(self) -> int | None:
        """The ACKED watermark, or None when there is none to check against (missing, or a torn
        write: it only ever helps to detect a loss, so its own loss is a warning)."""
        path = self.state_dir / ACKED
        try:
            rec = journal.Watermark.read(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e}") from e
        value = rec.get("acked") if rec is not None else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            log.warning("%s: unreadable (a torn write?); this start cannot tell whether "
                        "acknowledged outcomes at the end of the journal are missing", path)
            return None
        return value

    def _load_registry(self, dump: str | None, gen: int) -> None:
        """The snapshot's registry file, then the decisions logs written since it."""
        d = self.state_dir
        if dump:
            for where, obj in self._lines(d / dump, strict=True, last=False):
                did, tags, model, t = _check_decision_fields(obj, where)
                self._registry[did] = _Decision(tags, model, t, -1 if obj.get("done") else 0)
        decision_logs = [(g, p) for g, p in _numbered(d, _DECISIONS_RE) if g >= gen]
        for i, (_, path) in enumerate(decision_logs):
            last = i == len(decision_logs) - 1
            lines, good = _scan(path, strict=False, last=last)
            for lineno, obj in lines:
                try:
                    did, tags, model, t = _check_decision_fields(obj, f"{path}:{lineno}")
                except StateError as e:
                    log.warning("skipping: %s", e)
                    continue
                self._registry.setdefault(did, _Decision(tags, model, t))
            if last and good < path.stat().st_size:
                _cut(path, good, durable=False)

    def _replay_journal(
        self, segments: list[tuple[int, Path]], snap_seq: int, acked: int | None
    ) -> tuple[list[Record], int]:
        """The records of every journal entry after the snapshot (marking their decisions) and
        the last sequence number seen.

        Entries must be strictly consecutive, from at most ``snap_seq + 1`` up to at least
        ``acked`` (the ACKED watermark; None when there is none to check against). A bad line
        followed by good ones is damage inside the journal. A bad *last* line of a segment is
        cut, with a warning, when the sequence numbers show that it held nothing acknowledged:
        the next segment goes on from the line before it (a failed append leaves its seq to the
        next line), or it ends the journal at or after ``acked``. Anything else stops the
        start with one line naming the file, the byte offset and how to recover; nothing is
        cut before every check passed, so a refused start leaves the files as they were.
        """
        records: list[Record] = []
        last_seq = snap_seq
        expect: int | None = None
        replayed: set[str] = set()
        torn: list[tuple[Path, journal.Line]] = []  # bad last lines, cut once all checks pass
        # The last segment, and the offset where its good part ends.
        end: tuple[Path | None, int] = (None, 0)
        for first, path in segments:
            try:
                lines = journal.scan(path)
            except OSError as e:
                raise StateError(f"{path}: cannot read: {e}") from e
            if lines and lines[-1].payload is None:
                torn.append((path, lines[-1]))
                lines = lines[:-1]
            for k, line in enumerate(lines):
                if line.payload is None:
                    raise StateError(
                        f"{path}:{line.number}: corrupt line at byte {line.offset} (checksum or "
                        f"JSON does not match) with {len(lines) - k} more lines after it: the "
                        "journal is damaged before its end and the outcomes from there on "
                        "cannot be trusted. To recover: restore the file from a backup, or "
                        + self._accept_loss(path, line.offset, segments)
                    )
            for n, line in enumerate(lines):
                obj = line.payload
                assert obj is not None
                where = f"{path}:{line.number}"
                seq, label = obj.get("seq"), obj.get("outcome")
                did, tags, model, t = _check_decision_fields(obj, where)
                if not isinstance(seq, int) or label not in OUTCOME_LABELS:
                    raise StateError(f"{where}: bad seq or outcome in {obj!r}")
                if n == 0 and seq != first:
                    raise StateError(
                        f"{where}: first entry has seq {seq}, the file name says {first}"
                    )
                if expect is None:
                    if seq > snap_seq + 1:
                        raise StateError(
                            f"{where}: journal entries {snap_seq + 1}..{seq - 1} after the "
                            f"snapshot of {MANIFEST} are missing: they were acknowledged. To "
                            "recover: restore the journal files from a backup, or "
                            + self._accept_loss(path, 0, segments)
                        )
                elif seq != expect:
                    prev = end[0]
                    hint = ""
                    if torn and prev is not None and torn[-1][0] == prev:
                        hint = f" ({prev.name} ends in a damaged line at byte {torn[-1][1].offset})"
                    raise StateError(
                        f"{where}: seq {seq} follows {expect - 1}: entries are missing or "
                        f"reordered{hint}, and outcomes {expect}..{seq - 1} were acknowledged. "
                        "To recover: restore the journal files from a backup, or "
                        + self._accept_loss(path, line.offset, segments)
                    )
                expect = seq + 1
                last_seq = max(last_seq, seq)
                if seq <= snap_seq:
                    continue  # in the snapshot already
                if did in replayed:
                    raise StateError(f"{where}: a second outcome for decision {did!r}")
                replayed.add(did)
                dec = self._registry.get(did)
                if dec is None:
                    dec = self._registry[did] = _Decision(tags, model, t)
                elif dec.seq != 0:
                    raise StateError(
                        f"{where}: decision {did!r} has an outcome after the snapshot, but the "
                        "snapshot's registry says it had one before"
                    )
                dec.seq, dec.applied = seq, True
                records.append((QUERY_ID_PREFIX + did, list(tags), model, label))
            end = (path, lines[-1].end if lines else 0)
        if acked is not None and acked > last_seq:
            last_path, offset = end
            if last_path is None:
                what = f"{self.state_dir}: no journal file holds them"
            elif torn and torn[-1][0] == last_path:
                what = f"{last_path}: ends in a damaged line at byte {offset}"
            elif offset == 0:
                what = f"{last_path}: is empty"
            else:
                what = f"{last_path}: ends at byte {offset} with seq {last_seq}"
            raise StateError(
                f"{what}, but {ACKED} says outcomes up to seq {acked} were acknowledged: "
                f"outcomes {last_seq + 1}..{acked} are lost (a journal cut, emptied, deleted or "
                "damaged at its end). To recover: restore the journal files from a backup, or "
                f"delete {self.state_dir / ACKED} to start without them"
            )
        for path, line in torn:
            _cut(path, line.offset, durable=self._durable)
        return records, last_seq

    def _accept_loss(self, path: Path, offset: int, segments: list[tuple[int, Path]]) -> str:
        """How to start without the outcomes from ``offset`` of ``path`` on (one line)."""
        later = [p.name for _, p in segments if p.name > path.name]
        steps = [f"truncate -s {offset} {path}" if offset else f"rm {path}"]
        if later:
            steps.append(f"remove the later journal files ({', '.join(later)})")
        steps.append(f"rm {self.state_dir / ACKED}")
        return "to start without those outcomes: " + "; ".join(steps)

    def _lines(self, path: Path, *, strict: bool, last: bool) -> list[tuple[str, dict[str, Any]]]:
        try:
            lines, good = _scan(path, strict=strict, last=last)
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e}") from e
        if good < path.stat().st_size:
            raise StateError(f"{path}: truncated last line (the file is written atomically)")
        return [(f"{path}:{n}", obj) for n, obj in lines]

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        try:
            m = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateError(f"{path}: unreadable ({e})") from e
        if not isinstance(m, dict) or m.get("format") != STATE_FORMAT:
            raise StateError(f"{path}: not a {STATE_FORMAT} manifest")
        if m.get("version") != STATE_VERSION:
            raise StateError(
                f"{path}: state version {m.get('version')!r}, this version reads {STATE_VERSION}"
            )
        for key, kind in (("generation", int), ("seq", int), ("store_version", int),
                          ("store", str), ("store_sha256", str), ("base_sha256", str)):  # fmt: skip
            if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
                raise StateError(f"{path}: {key!r} missing or not a {kind.__name__}")
        for key in ("store", "registry"):
            name = m.get(key)
            if name is not None and (not isinstance(name, str) or Path(name).name != name):
                raise StateError(f"{path}: {key!r} must be a file name in the directory")
        return m

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

    def has_outcome(self, decision_id: str) -> bool:
        """Whether a remembered (unexpired) decision already has an outcome."""
        with self._lock:
            d = self._registry.get(decision_id)
            return d is not None and d.seq != 0

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
                    _fsync(fd)
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
                        _fsync(self._decisions_fd)  # a clean shutdown keeps every decision
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


# ==== Following the journal ====


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
