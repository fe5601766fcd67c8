"""Learning from live outcomes: a durable, lossless outcome store for the gateway.

The gateway routes a query, `OutcomeStore.remember`\\ s the decision (its id, tags and model) and
later receives ``POST /v1/feedback {decision_id, outcome}``; `OutcomeStore.feedback` appends the
outcome to a journal, makes it durable, and only then adds the record ``(decision, tags, model,
outcome)`` to the router's store (`TagRouter.add_records`: a lock-free swap for readers), so the
next decision sees it. On start the store loads the latest snapshot and replays the journal
after it. docs/feedback.md describes the files, the fsync policy and the recovery rules.

State directory::

    MANIFEST.json              which snapshot is current: generation, journal sequence it covers
    store-<gen>.trs            snapshot of the store (TagScorer file, docs/store-format.md)
    registry-<gen>.log         the decision registry at that snapshot (with "already has an
                               outcome" marks), so idempotency survives journal compaction
    journal-<first seq>.log    outcomes, one self-checking line each, fsynced before the ack
    decisions-<gen>.log        remembered decisions, appended without fsync (see below)
    LOCK                       held (flock) by the one process that owns the directory

Every line of the journal and logs is ``<crc32 of payload, 8 hex> <JSON payload>\\n``, so a torn
last line (a write that a crash cut short) is recognised and dropped, while a bad line anywhere
else in the journal is an error naming the file and line, never silently wrong counts.

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
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tagrouter_fast.core import Record, TagScorer

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter

try:  # POSIX; without it two processes on one state dir are not detected (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "QUERY_ID_PREFIX",
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

# Indirection so tests can make fsync fail without patching the os module for everyone.
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


# ==== Self-checking lines ====


def _encode_line(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(
        obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def _decode_line(raw: bytes) -> dict[str, Any] | None:
    """The payload of one line (without its newline), or None if it fails its check."""
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
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _scan(path: Path, *, strict: bool, last: bool) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """The good lines of a log as ``(line number, payload)``, and the byte offset where the
    good part ends.

    A bad final line of the ``last`` file is a torn write (the crash came before the ack, which
    waits for fsync) and ends the good part. Any other bad line is a `StateError` when
    ``strict`` (the journal), else skipped with a warning (the unsynced decisions logs, where a
    lost decision only means a later 404).
    """
    data = path.read_bytes()
    out: list[tuple[int, dict[str, Any]]] = []
    pos, lineno = 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        obj = _decode_line(data[pos:nl]) if nl >= 0 else None
        if obj is None:
            at_end = nl < 0 or nl == len(data) - 1
            if at_end and last:
                return out, pos
            if strict:
                raise StateError(
                    f"{path}:{lineno}: corrupt line (checksum or JSON does not match); the "
                    "journal is damaged before its end, refusing to guess the counts"
                )
            log.warning("%s:%d: skipping a corrupt line of an unsynced decisions log", path, lineno)
            pos = len(data) if nl < 0 else nl + 1
            continue
        out.append((lineno, obj))
        pos = nl + 1
    return out, pos


# ==== Files ====


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, *, durable: bool) -> None:
    """Temp file in the same directory, (fsync), rename, (fsync the directory): readers and a
    restart after a crash see the old file or the new one whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            if durable:
                _fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _numbered(d: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    out = []
    for p in d.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _truncate(path: Path, size: int, *, durable: bool) -> None:
    log.warning("%s: dropping a torn last line (%d bytes)", path, path.stat().st_size - size)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        if durable:
            _fsync(fd)
    finally:
        os.close(fd)


# ==== Registry ====


class _Decision:
    """One remembered decision."""

    __slots__ = ("tags", "model", "t", "seq", "applied")

    def __init__(self, tags: tuple[str, ...], model: str, t: float, seq: int = 0) -> None:
        self.tags, self.model, self.t = tags, model, t
        #: Journal sequence number of its outcome; 0 while it has none, -1 when it got one
        #: before the snapshot its registry entry was loaded from. Set once, never cleared:
        #: that is what makes a retried POST a DuplicateOutcome instead of a second count.
        self.seq = seq
        self.applied = seq != 0


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


def _check_id(decision_id: object) -> str:
    if not isinstance(decision_id, str):
        raise ValueError(f"decision_id must be a str, got {type(decision_id).__name__}")
    if not decision_id or len(decision_id) > MAX_DECISION_ID_CHARS:
        raise ValueError(
            f"decision_id must be 1-{MAX_DECISION_ID_CHARS} characters, got {len(decision_id)}"
        )
    return decision_id


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
        self._closed = False
        self._journal_fd = -1
        self._journal_bytes = 0
        self._decisions_fd = -1
        self._lock_fd = -1
        self._last_log_warning = 0.0
        # Tests inject crashes between the snapshot steps through this hook.
        self._fault: Callable[[str], None] | None = None

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_dir_lock()
        try:
            self._open(check_base)
        except BaseException:
            self._close_files()
            raise
        self._snap_wanted = threading.Event()
        self._stopping = False
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
        if isinstance(tags, (str, bytes)) or not isinstance(tags, Sequence):
            raise TypeError(f"tags must be a sequence of str, got {type(tags).__name__}")
        tag_tuple = tuple(tags)
        if len(tag_tuple) > MAX_TAGS or not all(isinstance(t, str) for t in tag_tuple):
            raise TypeError(f"tags must be at most {MAX_TAGS} str, got {tags!r:.200}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        now = self._clock()
        line = _encode_line({"id": decision_id, "tags": list(tag_tuple), "model": model, "t": now})
        with self._lock:
            if self._closed:
                raise OutcomeStoreError("the outcome store is closed")
            self._expire_locked(now)
            if decision_id in self._registry:
                raise ValueError(f"decision id {decision_id!r} is already remembered")
            self._registry[decision_id] = _Decision(tag_tuple, model, now)
            while len(self._registry) > self._max_decisions:
                self._registry.popitem(last=False)
            try:
                _write_all(self._decisions_fd, line)
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

    def feedback(self, decision_id: str, outcome: str | float) -> int:
        """Counts one outcome for a remembered decision and returns the new store version.

        The outcome is appended to the journal and (``fsync=True``) fsynced before it is
        applied and before this returns: once it returns, the outcome survives kill -9 and
        power loss. Then the decision's tags get the outcome in the router's store, visible to
        the next routing call. Thread-safe; concurrent calls share fsyncs.

        Raises:
            UnknownDecision: no such decision, or it expired.
            DuplicateOutcome: the decision already has an outcome (also after a restart).
            ValueError: a bad outcome or decision id.
            OutcomeStoreError: the store is closed or failed earlier (journal write or fsync
                error): nothing was counted.
        """
        label, score = self.outcome_label(outcome)
        _check_id(decision_id)
        now = self._clock()
        with self._lock:
            self._check_writable_locked()
            d = self._registry.get(decision_id)
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
            line = _encode_line(entry)
            try:
                _write_all(self._journal_fd, line)
            except OSError as e:
                # A partly written line would sit in the middle of the journal: stop here.
                self._fail_locked(e)
                raise OutcomeStoreError(f"journal append failed: {e}") from e
            self._next_seq = seq + 1
            self._journal_bytes += len(line)
            d.seq = seq
            record = (QUERY_ID_PREFIX + decision_id, list(d.tags), d.model, label)
            pending = _Pending(seq, record, d)
            self._unapplied.append(pending)
            if not self._durable:
                self._synced_seq = seq  # "written" is all the durability asked for
        self._sync(seq)
        return self._apply(pending)

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
            try:
                _fsync(fd)
            except OSError as e:
                with self._lock:
                    self._fail_locked(e)
                raise OutcomeStoreError(f"journal fsync failed: {e}") from e
            with self._lock:
                self._synced_seq = max(self._synced_seq, target)

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
                        self.router.add_records([p.record for p in batch])
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
            self._snap_wanted.wait()
            self._snap_wanted.clear()
            if self._stopping:
                return
            if self._applied_seq - self._snap_seq < self._snapshot_every:
                continue
            try:
                self._snapshot_now()
            except Exception:
                # Nothing is lost: the journal still holds every outcome since the last one.
                log.exception("background snapshot failed; will retry after more outcomes")

    def _capture(self) -> _Cut:
        """The cut of one snapshot (caller holds _snapshot_lock and _apply_lock): the store and
        the journal sequence it covers, a registry copy, and fresh journal/decisions files so
        that compaction can later delete whole files."""
        gen = self._next_generation
        self._next_generation += 1
        with self._sync_lock:
            old_journal = -1
            with self._lock:
                now = self._clock()
                self._expire_locked(now)
                seq, version, store = self._applied_seq, self.version, self.router.scorer
                registry = list(self._registry.items())  # C-speed copy; encoded outside
                new_decisions = _open_append(self.state_dir / f"decisions-{gen:08d}.log")
                old_decisions, self._decisions_fd = self._decisions_fd, new_decisions
                if self._journal_bytes:
                    first = self._next_seq
                    fd = _open_append(self.state_dir / f"journal-{first:012d}.log")
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
                        _fsync_dir(self.state_dir)
                except OSError as e:
                    with self._lock:
                        self._fail_locked(e)
                    raise OutcomeStoreError(f"journal fsync failed: {e}") from e
                finally:
                    os.close(old_journal)
                with self._lock:
                    self._synced_seq = max(self._synced_seq, first - 1)
        return _Cut(gen, seq, version, store, registry)

    def _persist(self, cut: _Cut) -> Path:
        d = self.state_dir
        store_name = f"store-{cut.generation:08d}.trs"
        registry_name = f"registry-{cut.generation:08d}.log"
        data = cut.store.to_bytes()
        _atomic_write(d / store_name, data, durable=self._durable)
        self._step("store-written")
        now = self._clock()
        lines = []
        for did, dec in cut.registry:
            if dec.t + self._ttl <= now:
                continue
            # 0 < seq <= cut.seq means applied before the cut (applied is a journal prefix),
            # seq < 0 done before an earlier snapshot;
            # an outcome after the cut is replayed from the journal, which marks it again.
            done = dec.seq < 0 or 0 < dec.seq <= cut.seq
            row = {"id": did, "tags": list(dec.tags), "model": dec.model, "t": dec.t}
            if done:
                row["done"] = True
            lines.append(_encode_line(row))
        _atomic_write(d / registry_name, b"".join(lines), durable=self._durable)
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
            "created": now,
        }
        _atomic_write(
            d / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"), durable=self._durable
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
        # A segment's entries all precede the next segment's first seq; the last (current)
        # segment is never deleted.
        for (_, path), (next_first, _) in zip(segments, segments[1:], strict=False):
            if next_first - 1 <= seq:
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
        if not manifest_path.is_file():
            if segments or _numbered(d, _REGISTRY_RE):
                raise StateError(
                    f"{d}: journal or registry files without {MANIFEST}; the state directory "
                    "is damaged (restore the manifest, or move the directory away to start over)"
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
        now = self._clock()

        self._load_registry(manifest.get("registry"), gen)
        records, last_seq = self._replay_journal(segments, snap_seq)
        if records:
            try:
                self.router.add_records(records)
            except Exception as e:
                raise StateError(
                    f"{d}: replaying {len(records)} journal entries failed: {e}"
                ) from e

        # Trim the registry to its bounds (the logs are unordered across files).
        for did in [k for k, v in self._registry.items() if v.t + self._ttl <= now]:
            del self._registry[did]
        while len(self._registry) > self._max_decisions:
            self._registry.popitem(last=False)

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
        self._journal_fd = _open_append(jpath)
        self._journal_bytes = jpath.stat().st_size
        if self._durable:
            _fsync_dir(d)
        existing = [g for g, _ in _numbered(d, _DECISIONS_RE)]
        dgen = max([gen, *existing])
        self._decisions_fd = _open_append(d / f"decisions-{dgen:08d}.log")
        self._next_generation = max([dgen, *(g for g, _ in _numbered(d, _STORE_RE))]) + 1
        for tmp in d.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        self._compact(gen, snap_seq)

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
                _truncate(path, good, durable=False)

    def _replay_journal(
        self, segments: list[tuple[int, Path]], snap_seq: int
    ) -> tuple[list[Record], int]:
        """The records of every journal entry after the snapshot (marking their decisions) and
        the last sequence number seen. Entries must be strictly consecutive."""
        records: list[Record] = []
        last_seq = snap_seq
        expect: int | None = None
        replayed: set[str] = set()
        for i, (first, path) in enumerate(segments):
            last = i == len(segments) - 1
            lines, good = _scan(path, strict=True, last=last)
            for n, (lineno, obj) in enumerate(lines):
                where = f"{path}:{lineno}"
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
                            f"snapshot of {MANIFEST} are missing"
                        )
                elif seq != expect:
                    raise StateError(
                        f"{where}: seq {seq} follows {expect - 1}; entries are missing or reordered"
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
            if last and good < path.stat().st_size:
                _truncate(path, good, durable=self._durable)
        return records, last_seq

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

    # ---- introspection ----

    def has_outcome(self, decision_id: str) -> bool:
        """Whether a remembered (unexpired) decision already has an outcome."""
        with self._lock:
            d = self._registry.get(decision_id)
            return d is not None and d.seq != 0

    @property
    def failure(self) -> BaseException | None:
        """The journal write or fsync error after which the store refuses every outcome until
        it is reopened; None while it accepts them (the gateway's readiness reports it)."""
        return self._failed  # one reference, set once: read without the lock

    def stats(self) -> dict[str, int]:
        """Numbers for /metrics: version, journal position, snapshot position, decisions."""
        with self._lock:
            return {
                "version": self.version,
                "journal_seq": self._next_seq - 1,
                "applied_seq": self._applied_seq,
                "snapshot_seq": self._snap_seq,
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
