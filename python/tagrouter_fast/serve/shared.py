"""Gateway replicas share what they learn through Redis: `SharedLearner`.

A `SharedLearner` is the gateway's `Learner` when ``[shared]`` is set. It owns the replica's
local learner (`OutcomeStore`: durable journal + snapshots) and composes one way::

    request -> SharedLearner -> OutcomeStore (journal, fsync) -> router
    publisher thread: that journal -> Redis;  refresher thread: Redis's log -> router

Each replica routes on a local, immutable store snapshot; Redis holds what all replicas learned,
as additive increments:

- ``<prefix>:log``: one list entry per counted outcome (the record itself, JSON), in the one order
  every replica applies them: a replica's store is *base bundle + this log + its own outcomes not
  yet in the log*, so every replica converges to the same store, byte for byte;
- ``<prefix>:counts``: a hash of HINCRBY counters per (model, tag, outcome), per tag (``count_t``:
  distinct queries carrying it; every decision is a new query) and per (model, outcome), plus
  ``queries``: the live counts for humans and tools. Never read-modify-written, so concurrent
  replicas never lose an increment;
- ``<prefix>:decided``: a hash with one field per counted decision: the idempotency marks;
- ``<prefix>:version``: INCR'ed once per counted outcome (equal to the log's length), published
  on ``<prefix>:events`` so replicas refresh at once (and poll every ``refresh_ms`` as a
  backstop, e.g. while the pub/sub connection is re-established);
- ``<prefix>:base``: sha256 of the base store: replicas of another bundle refuse to share;
- ``<prefix>:epoch``: a random id set once, so a Redis that lost its data is noticed;
- ``<prefix>:dec:<decision id>``: the decision (tags, model) for ``decision_ttl_s``, so feedback
  may reach any replica, not only the one that routed.

One Lua script checks the mark and does the increments, the log append, the version bump and
the publish atomically: a replay, a retry, or the same decision posted to two replicas counts
once. **The local journal is the outbox**: a publisher thread follows it (`JournalReader`) from
the last entry Redis confirmed (``shared-published`` in the state directory, rewritten without
fsync: a lost update only re-sends entries that Redis then refuses as duplicates), and the local
store keeps every journal segment holding an entry Redis has not confirmed. So an outage or a
restart loses no outcome, and an acknowledgement costs the journal's one fsync, not a second one
for an outbox file. (Earlier versions kept a separate ``shared-outbox.log``; its pending entries
are read and sent once at start, then the file is removed.)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast import journal
from tagrouter_fast.core import Record, TagScorer
from tagrouter_fast.serve.outcomes import (
    QUERY_ID_PREFIX,
    DuplicateOutcome,
    JournalReader,
    OutcomeStore,
    UnknownDecision,
)

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.config import SharedConfig

__all__ = ["SharedLearner", "SharedStateError", "count_fields"]

log = logging.getLogger("tagrouter.shared")

#: The last journal entry Redis confirmed (every entry up to it is in Redis).
PUBLISHED = "shared-published"
#: The outbox file of earlier versions: read once at start, removed once Redis has it all.
LEGACY_OUTBOX = "shared-outbox.log"
#: Log entries fetched per LRANGE when catching up (a new replica reads the whole log).
FETCH_CHUNK = 10_000
#: Outcomes sent per pipelined round trip.
PUBLISH_CHUNK = 500
#: Decisions queued for sharing at most; beyond, the oldest are dropped (their feedback then
#: works on the replica that routed them only): routing must never wait on Redis.
MAX_QUEUED_DECISIONS = 100_000
#: Longest wait between two reconnection attempts.
MAX_BACKOFF_S = 2.0

# KEYS: decided, log, counts, version. ARGV: channel, query id, record JSON, count fields...
_PUBLISH_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[2], '1') == 0 then
  return {0, tonumber(redis.call('GET', KEYS[4]) or '0')}
end
redis.call('RPUSH', KEYS[2], ARGV[3])
for i = 4, #ARGV do
  redis.call('HINCRBY', KEYS[3], ARGV[i], 1)
end
local v = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[1], v)
return {1, v}
"""


class SharedStateError(RuntimeError):
    """Redis holds shared state this replica must not join (another base store, a lost
    epoch); the message names the key."""


def count_fields(tags: Iterable[str], model: str, outcome: str) -> list[str]:
    """The ``<prefix>:counts`` fields one outcome increments: JSON arrays, so any tag or model
    name is a field without escaping rules. Tags are a set per query, as in the store."""
    dumps = _dumps
    out = [dumps(["c", model, t, outcome]) for t in sorted(set(tags))]
    out += [dumps(["t", t]) for t in sorted(set(tags))]
    out += [dumps(["m", model, outcome]), "queries"]
    return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))



# ==== Outcomes on their way to Redis ====


@dataclass(frozen=True)
class _Entry:
    qid: str
    tags: tuple[str, ...]
    model: str
    outcome: str
    #: Its local journal sequence number; None for a shared log entry or a legacy outbox entry.
    seq: int | None = None

    @property
    def record(self) -> Record:
        return (self.qid, list(self.tags), self.model, self.outcome)

    @property
    def learned(self) -> tuple[list[str], str, str]:
        """The outcome as the store learns it: counts, no query row (the qid is only the
        idempotency key)."""
        return (list(self.tags), self.model, self.outcome)

    def to_json(self) -> dict[str, Any]:
        """The shared log's entry (no local seq: every replica reads the same bytes)."""
        return {"q": self.qid, "tags": list(self.tags), "model": self.model, "o": self.outcome}

    @classmethod
    def from_json(cls, obj: Any) -> _Entry | None:
        if not isinstance(obj, dict):
            return None
        q, tags, model, o = obj.get("q"), obj.get("tags"), obj.get("model"), obj.get("o")
        if not (isinstance(q, str) and isinstance(model, str) and isinstance(o, str)
                and isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            return None
        return cls(q, tuple(tags), model, o)


def _read_published(path: Path) -> int:
    """The last journal entry Redis confirmed; 0 (re-send everything the journal holds: Redis
    refuses the duplicates) when the file is missing or unreadable."""
    try:
        lines = journal.scan(path)
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.warning("%s: cannot read (%s); re-sending the journal to Redis", path, e)
        return 0
    seq = lines[0].payload.get("seq") if lines and lines[0].payload is not None else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        log.warning("%s: unreadable; re-sending the journal to Redis (duplicates are refused)",
                    path)
        return 0
    return seq


def _read_legacy_outbox(path: Path) -> dict[str, _Entry]:
    """The entries an earlier version's ``shared-outbox.log`` still had to send: outcome lines
    minus their ``{"ack": qid}`` confirmations. Bad lines are skipped (a torn tail was never
    acknowledged; an entry is also in the journal, or re-sent as a duplicate)."""
    pending: dict[str, _Entry] = {}
    try:
        lines = journal.scan(path)
    except FileNotFoundError:
        return pending
    for line in lines:
        obj = line.payload
        if obj is None:
            log.warning("%s: skipping a bad line at byte %d", path, line.offset)
            continue
        if "ack" in obj:
            pending.pop(str(obj["ack"]), None)
            continue
        e = _Entry.from_json(obj)
        if e is not None:
            pending[e.qid] = e
    return pending


# ==== The shared learner ====


class SharedLearner:
    """The `Learner` of a replica that shares its counts through Redis.

    It owns the replica's local learner (an `OutcomeStore` on ``state_dir``, opened here with
    ``keep_journal=True``): feedback goes request -> this -> the local learner's journal ->
    router, and a publisher thread sends what that journal acknowledged to Redis. The router's
    store is, once Redis answered, *base bundle + shared log + this replica's outcomes not yet
    in the log*.

    Args:
        config: the ``[shared]`` table.
        router: the replica's router; its store at construction is the base (the bundle's),
            before the local learner replaces it with its snapshot.
        state_dir: the local learner's state directory.
        fsync, snapshot_every, decision_ttl_s, max_decisions, **local: the local learner's
            options (`OutcomeStore`). ``decision_ttl_s`` is also how long a decision shared
            through Redis accepts feedback on any replica.

    Use: ``learner = SharedLearner(...)``; ``learner.start()`` (joins Redis); ...
    ``learner.close()``.

    Raises:
        ConfigError: the redis package is missing, or a bad ``redis_url``.
        StateError, OutcomeStoreError: from opening the local learner.
    """

    def __init__(
        self, config: SharedConfig, router: TagRouter, state_dir: str | os.PathLike[str], *,
        fsync: bool = True, snapshot_every: int = 1000, decision_ttl_s: float = 3600.0,
        max_decisions: int = 100_000, **local: Any,
    ) -> None:
        try:
            import redis
        except ImportError:
            from tagrouter_fast.serve.config import ConfigError

            raise ConfigError("shared", "needs the redis package: pip install "
                              "'tagrouter-fast[serve]'") from None

        self.config = config
        self.router = router
        self._ttl_s = max(1, int(round(decision_ttl_s)))
        self._base = router.scorer
        self._base_sha = hashlib.sha256(self._base.to_bytes()).hexdigest()
        p = config.key_prefix
        self._k_decided, self._k_log = f"{p}:decided", f"{p}:log"
        self._k_counts, self._k_version = f"{p}:counts", f"{p}:version"
        self._k_base, self._k_epoch, self._k_events = f"{p}:base", f"{p}:epoch", f"{p}:events"
        self._k_dec = f"{p}:dec:"
        timeout = config.timeout_s
        try:
            # Any: redis-py's stubs type every reply as bytes | str whatever decode_responses.
            self._redis: Any = redis.Redis.from_url(
                config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                health_check_interval=0, decode_responses=False,
            )
        except ValueError as e:
            from tagrouter_fast.serve.config import ConfigError

            raise ConfigError("shared.redis_url", str(e)) from None
        self._script = self._redis.register_script(_PUBLISH_LUA)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

        state = Path(state_dir)
        self._published_path = state / PUBLISHED
        self._legacy_path = state / LEGACY_OUTBOX
        # Read before the local learner takes the directory's lock, and only read: a second
        # process pointed at the same directory fails there without having changed a file.
        published = _read_published(self._published_path)
        try:
            self.local = OutcomeStore(
                router, state, fsync=fsync, snapshot_every=snapshot_every,
                decision_ttl_s=decision_ttl_s, max_decisions=max_decisions, keep_journal=True,
                **local,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._redis.close()
            raise

        # _lock guards the composition state below and every swap of the routed store. Lock
        # order: the local learner's apply lock (`OutcomeStore.hold_applies`), then _lock;
        # nothing holding _lock calls into the local learner's locks.
        self._lock = threading.Lock()
        self._published = published
        self.local.release_journal(published)
        self._reader = JournalReader(self.local, published)
        #: Outcomes to send, in journal order (legacy outbox entries first).
        self._pending: dict[str, _Entry] = _read_legacy_outbox(self._legacy_path)
        self._legacy = set(self._pending)
        #: (seq, qid) of the journal entries read, oldest first, until Redis confirmed them.
        self._seqs: deque[tuple[int, str]] = deque()
        self._shared: TagScorer | None = None  # base + log[:n], once synced
        self._n = 0  # log entries in _shared
        self._log_ids: set[str] = set()
        #: Confirmed by Redis, their log entries not applied yet.
        self._confirmed: dict[str, _Entry] = {}
        self._recompose = False
        self._epoch: bytes | None = None
        self._diverged: str | None = None
        self._decisions: deque[tuple[str, bytes]] = deque(maxlen=MAX_QUEUED_DECISIONS)

        self.connected = False
        self._stop = threading.Event()
        self._publish_wanted = threading.Event()
        self._refresh_wanted = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stats = {"published": 0, "duplicates": 0, "applied": 0, "errors": 0}

    # ---- lifecycle ----

    def start(self) -> None:
        """Joins the shared state (once, synchronously when Redis answers: a new replica routes
        on base + shared increments from its first request) and starts the publisher, the
        refresher and the pub/sub listener.

        Raises:
            SharedStateError: Redis holds the counts of another base store.
        """
        try:
            self._refresh()
            self._publish()
            self._refresh()
        except self._errors as e:
            log.warning("Redis at %s unavailable (%s); routing on the local state, outcomes "
                        "wait in the journal until it is back", self._where(), e)
        for name, target in (("publish", self._publisher), ("refresh", self._refresher)):
            t = threading.Thread(target=target, name=f"tagrouter-shared-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.pubsub:
            t = threading.Thread(target=self._listener, name="tagrouter-shared-events",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, flush_s: float = 1.0, *, snapshot: bool = True) -> None:
        """Tries to send what is pending for ``flush_s`` (the rest waits in the journal for the
        next start), stops the threads, closes the local learner (``snapshot``: with a final
        snapshot) and the Redis connection. Idempotent."""
        deadline = time.monotonic() + flush_s
        while self.connected and time.monotonic() < deadline and self.pending():
            self._publish_wanted.set()
            time.sleep(0.01)
        self._stop.set()
        self._publish_wanted.set()
        self._refresh_wanted.set()
        for t in self._threads:
            t.join(timeout=2.0 + self.config.timeout_s)
        self._threads.clear()
        with self._lock:
            self._write_published_locked()
        self.local.close(snapshot=snapshot)
        with contextlib.suppress(Exception):
            self._redis.close()

    def _where(self) -> str:
        return f"shared.redis_url ({self.config.key_prefix!r})"

    # ---- the Learner interface ----

    @property
    def version(self) -> int:
        return self.local.version

    @property
    def failure(self) -> str | None:
        return self.local.failure

    @property
    def writable(self) -> bool:
        return self.local.writable

    def remember(self, decision_id: str, tags: Sequence[str], model: str) -> None:
        """Remembers the decision locally, then queues it for sharing (never waits on Redis)."""
        self.local.remember(decision_id, tags, model)
        if not self.config.share_decisions:
            return
        self._decisions.append(
            (decision_id, _dumps({"tags": list(tags), "model": model}).encode("utf-8"))
        )
        self._publish_wanted.set()

    def feedback(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """`OutcomeStore.feedback`, across replicas: an outcome Redis already counted is a
        `DuplicateOutcome` (409). The decision comes with the call (a verified decision token:
        any replica's, at once, Redis up or down), else from this replica's registry, else from
        Redis. Redis being down never fails feedback: the local journal takes it and the Lua
        script still counts it once when it is sent."""
        local = self.local
        local.outcome_label(outcome)  # a bad outcome is a 400 before any Redis round trip
        qid = QUERY_ID_PREFIX + decision_id
        if not local.has_outcome(decision_id) and (
            qid in self._log_ids
            or self._ask(lambda: self._redis.hexists(self._k_decided, qid))
        ):
            raise DuplicateOutcome(
                f"decision {decision_id!r} already has an outcome (on another replica)"
            )
        try:
            version = local.feedback(decision_id, outcome, decision=decision, key=key)
        except UnknownDecision:
            if decision is not None:
                raise  # the store refused the decision itself (expired): Redis cannot help
            raw = self._ask(lambda: self._redis.get(self._k_dec + decision_id))
            if not raw:
                raise
            try:
                d = json.loads(raw)
                tags, model = [str(t) for t in d["tags"]], str(d["model"])
            except (ValueError, KeyError, TypeError):
                raise UnknownDecision(f"shared decision {decision_id!r} is unreadable") from None
            with contextlib.suppress(ValueError):  # remembered meanwhile by a concurrent post
                local.remember(decision_id, tags, model)
            version = local.feedback(decision_id, outcome)
        self._publish_wanted.set()
        return version

    async def feedback_async(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """`feedback` in a worker thread: its Redis idempotency check is a blocking call."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(
            lambda: self.feedback(decision_id, outcome, decision=decision, key=key))

    def update_store(self, fn: Callable[[TagScorer], TagScorer]) -> int:
        """`OutcomeStore.update_store`; the change applies to this replica's base too, so later
        refreshes keep it (admin store changes are per replica)."""

        def both(store: TagScorer) -> TagScorer:
            new = fn(store)
            # Runs under the local learner's apply lock, so no refresh composes in between.
            with self._lock:
                self._base = fn(self._base)
                if self._shared is not None:
                    self._shared = fn(self._shared)
            return new

        return self.local.update_store(both)

    def snapshot(self) -> Path:
        return self.local.snapshot()

    def stats(self) -> dict[str, Any]:
        """The local learner's numbers, and under ``"shared"``: ``version`` (log entries routed
        on), ``pending`` (outcomes not yet confirmed by Redis), ``connected``, ``published``,
        ``duplicates``, ``applied``, ``errors``, ``diverged``."""
        return {**self.local.stats(), "shared": self.shared_stats()}

    # ---- introspection ----

    def pending(self) -> int:
        """Outcomes acknowledged locally and not yet confirmed by Redis."""
        with self._lock:
            self._catch_up_locked(self.local.applied_seq)
            return len(self._pending)

    @property
    def log_version(self) -> int:
        """Shared log entries this replica routes on."""
        return self._n

    def shared_stats(self) -> dict[str, Any]:
        pending = self.pending()
        with self._lock:
            return {**self._stats, "version": self._n, "pending": pending,
                    "connected": self.connected, "diverged": self._diverged}

    def _ask(self, fn: Callable[[], Any]) -> Any:
        """A request-path Redis call: None when Redis is down (the caller goes on locally)."""
        if not self.connected:
            return None
        try:
            return fn()
        except self._errors as e:
            self._lost(e)
            return None

    # ---- the journal as the outbox ----

    def _catch_up_locked(self, upto_seq: int) -> None:
        """Takes the local journal's entries up to ``upto_seq`` into the pending ones."""
        for seq, (q, tags, model, outcome) in self._reader.read(upto_seq):
            e = _Entry(str(q), tuple(tags), model, outcome, seq)
            self._seqs.append((seq, e.qid))
            self._pending.setdefault(e.qid, e)

    def _confirm_locked(self, batch: Sequence[_Entry]) -> None:
        """Redis has ``batch``: advance the published mark over every entry it completes."""
        for e in batch:
            self._pending.pop(e.qid, None)
        seqs = self._seqs
        while seqs and seqs[0][1] not in self._pending:
            seqs.popleft()
        published = seqs[0][0] - 1 if seqs else self._reader.next_seq - 1
        if published > self._published:
            self._published = published
            # Compaction may now delete what Redis has (the journal stays the outbox of the
            # rest); the mark itself is written when it is cheap to lose (see PUBLISHED).
            self.local.release_journal(published)
        if self._legacy and not self._legacy & self._pending.keys():
            self._legacy.clear()
            with contextlib.suppress(OSError):
                self._legacy_path.unlink()
                log.info("%s: every entry is in Redis; removed", self._legacy_path)

    def _write_published_locked(self) -> None:
        # No fsync: after a power loss an older mark only re-sends entries, which the Lua
        # script refuses as duplicates; an fsync here would be a second one per batch.
        try:
            journal.atomic_replace(self._published_path,
                                   journal.encode_line({"seq": self._published}), durable=False)
        except OSError as e:
            log.warning("%s: cannot write (%s); the next start re-sends more", self._published_path,
                        e)

    # ---- composing the routed store ----

    def _compose_locked(self, applied_seq: int) -> None:
        """Routes on the shared store plus this replica's outcomes not in the log yet. Caller
        holds the local learner's apply lock (so ``applied_seq`` is exactly what the router
        holds of the journal) and _lock."""
        assert self._shared is not None
        self._catch_up_locked(applied_seq)
        own = {**self._confirmed, **self._pending}
        extra = [
            e.learned for q, e in own.items()
            if q not in self._log_ids and (e.seq is None or e.seq <= applied_seq)
        ]
        store = self._shared.with_learned(extra) if extra else self._shared
        self.router.update_store(lambda _old: store)

    # ---- Redis side ----

    def _lost(self, e: BaseException) -> None:
        if self.connected:
            log.warning("lost Redis at %s (%s); routing on the last snapshot, outcomes kept "
                        "locally until it is back", self._where(), e)
        self.connected = False
        self._stats["errors"] += 1

    def _join(self) -> None:
        """Checks (and on a fresh Redis, sets) the base and the epoch."""
        r = self._redis
        r.set(self._k_base, self._base_sha, nx=True)
        r.set(self._k_epoch, uuid.uuid4().hex, nx=True)
        base, epoch = r.mget([self._k_base, self._k_epoch])
        if base is not None and base.decode() != self._base_sha:
            raise SharedStateError(
                f"{self._where()}: Redis holds the shared counts of another base store "
                f"({self._k_base} = {base.decode()[:12]}..., this bundle is "
                f"{self._base_sha[:12]}...); give this bundle its own shared.key_prefix"
            )
        self._check_epoch(epoch)

    def _check_epoch(self, epoch: bytes | None) -> None:
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch and self._diverged is None:
            # Redis came back without the data this replica already routes on (no AOF?).
            self._diverged = (
                f"{self._where()}: the shared state was lost ({self._k_epoch} changed); this "
                "replica keeps routing on its last snapshot and stops sharing until restarted"
            )
            log.error("%s", self._diverged)

    def _refresh(self) -> None:
        """Applies the shared log entries this replica has not seen (all of them on the first
        call), then re-composes the routed store."""
        r = self._redis
        if not self.connected:
            self._join()
            self.connected = True
            log.info("connected to Redis at %s", self._where())
        version, epoch = r.mget([self._k_version, self._k_epoch])
        self._check_epoch(epoch)
        if self._diverged is not None:
            return
        v = int(version or 0)
        with self._lock:
            n, synced, recompose = self._n, self._shared is not None, self._recompose
        if synced and v == n and not recompose:
            return
        if v < n:
            self._check_epoch(b"<lost>")
            return
        start = n if synced else 0
        raw: list[bytes] = []
        while start + len(raw) < v:
            lo = start + len(raw)
            chunk = r.lrange(self._k_log, lo, min(v, lo + FETCH_CHUNK) - 1)
            if not chunk:
                break
            raw.extend(chunk)
        entries = []
        for i, item in enumerate(raw):
            e = _Entry.from_json(json.loads(item))
            if e is None:
                raise SharedStateError(f"{self._k_log}[{start + i}]: not an outcome entry")
            entries.append(e)
        with self.local.hold_applies() as applied_seq, self._lock:
            if start != (self._n if self._shared is not None else 0):
                return  # another refresh got here first
            shared = self._shared if self._shared is not None else self._base
            new = [e for e in entries if e.qid not in self._log_ids]
            if new:
                shared = shared.with_learned([e.learned for e in new])
            self._shared = shared
            self._n = start + len(raw)
            self._log_ids.update(e.qid for e in entries)
            for e in entries:
                self._confirmed.pop(e.qid, None)
            self._stats["applied"] += len(new)
            self._recompose = False
            self._compose_locked(applied_seq)

    def _publish(self) -> None:
        """Sends the queued decisions and the pending outcomes; confirms what Redis took."""
        if not self.connected:
            self._refresh()  # rejoins (checks base and epoch) before sending anything
        if self._diverged is not None:
            return
        decisions = []
        while self._decisions:
            decisions.append(self._decisions.popleft())
        if decisions:
            pipe = self._redis.pipeline(transaction=False)
            for did, val in decisions:
                pipe.set(self._k_dec + did, val, ex=self._ttl_s)
            pipe.execute()
        sent = False
        while True:
            with self._lock:
                self._catch_up_locked(self.local.applied_seq)
                batch = list(itertools.islice(self._pending.values(), PUBLISH_CHUNK))
            if not batch:
                break
            pipe = self._redis.pipeline(transaction=False)
            keys = [self._k_decided, self._k_log, self._k_counts, self._k_version]
            for e in batch:
                args = [self._k_events, e.qid, _dumps(e.to_json()),
                        *count_fields(e.tags, e.model, e.outcome)]
                self._script(keys=keys, args=args, client=pipe)
            results = pipe.execute()
            dup = sum(1 for res in results if int(res[0]) == 0)
            with self._lock:
                self._confirm_locked(batch)
                # Routed on until the refresh brings their log entries (no gap in between).
                self._confirmed.update((e.qid, e) for e in batch if e.qid not in self._log_ids)
                self._stats["published"] += len(batch) - dup
                self._stats["duplicates"] += dup
                if dup:
                    # Counted before (another replica, or a confirmation this replica lost):
                    # the routed store may hold it twice until it is composed again.
                    self._recompose = True
            sent = True
            self._refresh_wanted.set()
            if self._stop.is_set():
                break
        if sent:
            with self._lock:
                self._write_published_locked()

    def _publisher(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            self._publish_wanted.wait(timeout=backoff if not self.connected else 1.0)
            self._publish_wanted.clear()
            if self._stop.is_set():
                return
            try:
                self._publish()
                backoff = 0.05
            except self._errors as e:
                self._lost(e)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except Exception:
                log.exception("publishing outcomes to Redis failed; will retry")
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    def _refresher(self) -> None:
        period = self.config.refresh_ms / 1000.0
        while not self._stop.is_set():
            self._refresh_wanted.wait(timeout=period)
            self._refresh_wanted.clear()
            if self._stop.is_set():
                return
            was = self.connected
            try:
                self._refresh()
                if not was and self.connected:
                    self._publish_wanted.set()  # back: send what waited in the journal
            except self._errors as e:
                self._lost(e)
            except Exception:
                log.exception("refreshing from Redis failed; routing on the last snapshot")

    def _listener(self) -> None:
        """Wakes the refresher on every published version (pub/sub is fire-and-forget: the
        polling in `_refresher` covers messages missed while reconnecting)."""
        backoff = 0.05
        while not self._stop.is_set():
            ps = None
            try:
                ps = self._redis.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(self._k_events)
                backoff = 0.05
                while not self._stop.is_set():
                    if ps.get_message(timeout=0.2) is not None:
                        self._refresh_wanted.set()
            except self._errors:
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            finally:
                if ps is not None:
                    with contextlib.suppress(Exception):
                        ps.close()
