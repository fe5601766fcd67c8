"""Gateway replicas share what they learn through Redis.

Each replica keeps its durable local outcome journal (`OutcomeStore`) and routes on a local,
immutable store snapshot; Redis holds what all replicas learned, as additive increments:

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
once. Outcomes go to Redis from a durable outbox (``shared-outbox.log`` in the state
directory), written before the local acknowledgement and trimmed only once Redis confirmed, so
an outage or a restart loses none: they are replayed when Redis is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tagrouter_fast.core import Record, TagScorer

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.config import SharedConfig
    from tagrouter_fast.serve.outcomes import OutcomeStore

__all__ = ["SharedCounts", "SharedStateError"]

log = logging.getLogger("tagrouter.shared")

OUTBOX = "shared-outbox.log"
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


# ==== The outbox: outcomes acknowledged locally, not yet confirmed by Redis ====


def _line(obj: dict[str, Any]) -> bytes:
    payload = _dumps(obj).encode("utf-8")
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def _parse(raw: bytes) -> dict[str, Any] | None:
    if len(raw) < 10 or raw[8:9] != b" ":
        return None
    try:
        if int(raw[:8], 16) != zlib.crc32(raw[9:]):
            return None
        obj = json.loads(raw[9:])
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True)
class _Entry:
    qid: str
    tags: tuple[str, ...]
    model: str
    outcome: str

    @property
    def record(self) -> Record:
        return (self.qid, list(self.tags), self.model, self.outcome)

    @property
    def learned(self) -> tuple[list[str], str, str]:
        """The outcome as the store learns it: counts, no query row."""
        return (list(self.tags), self.model, self.outcome)

    def to_json(self) -> dict[str, Any]:
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


class _Outbox:
    """Append-only file of ``<crc32> <JSON>`` lines: outcomes (``{"q": ...}``) and Redis
    confirmations (``{"ack": qid}``). Outcomes are fsynced before the local ack (they are
    written from inside the outcome store's apply step); acks are not (a lost ack only means one
    idempotent re-send). Rewritten without the confirmed ones once they dominate."""

    def __init__(self, path: Path, *, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self.pending: dict[str, _Entry] = {}
        self.known: set[str] = set()  # ids in the file (pending or confirmed since the rewrite)
        acked = 0
        if path.exists():
            data = path.read_bytes()
            pos = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                obj = _parse(data[pos:nl]) if nl >= 0 else None
                if obj is None:
                    # A torn tail was being written when the process died: never acknowledged.
                    log.warning("%s: dropping a bad line at byte %d", path, pos)
                    if nl < 0:
                        break
                    pos = nl + 1
                    continue
                pos = nl + 1
                if "ack" in obj:
                    self.pending.pop(str(obj["ack"]), None)
                    acked += 1
                    continue
                e = _Entry.from_json(obj)
                if e is not None:
                    self.known.add(e.qid)
                    self.pending[e.qid] = e
            if pos != len(data):
                with open(path, "r+b") as f:
                    f.truncate(pos)
        self._acked = acked
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def add(self, entries: Sequence[_Entry]) -> None:
        new = [e for e in entries if e.qid not in self.known]
        if not new:
            return
        os.write(self._fd, b"".join(_line(e.to_json()) for e in new))
        if self.durable:
            os.fsync(self._fd)
        for e in new:
            self.known.add(e.qid)
            self.pending[e.qid] = e

    def ack(self, qids: Sequence[str]) -> None:
        done = [q for q in qids if self.pending.pop(q, None) is not None]
        if not done:
            return
        os.write(self._fd, b"".join(_line({"ack": q}) for q in done))
        self._acked += len(done)
        if self._acked > 1000 and self._acked > 4 * len(self.pending):
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(_line(e.to_json()) for e in self.pending.values()))
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.known = set(self.pending)
        self._acked = 0

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                if self.durable:
                    os.fsync(self._fd)
                os.close(self._fd)
            self._fd = -1


# ==== What the outcome store writes through ====


class _JournalRouter:
    """Stands in for the `TagRouter` the `OutcomeStore` writes to: every outcome it applies
    (after its journal fsync, before its ack) goes to the outbox first, then onto the routed
    store, under the same lock as the Redis refreshes, so a refresh never drops one."""

    def __init__(self, shared: SharedCounts) -> None:
        self._shared = shared

    @property
    def scorer(self) -> TagScorer:
        return self._shared.router.scorer

    def swap_store(self, scorer: TagScorer) -> None:
        self._shared.router.swap_store(scorer)  # the outcome store's snapshot, on open

    def learn_records(self, records: Iterable[Record]) -> None:
        self._shared._add_local(list(records))

    def update_store(self, fn: Callable[[TagScorer], TagScorer]) -> TagScorer:
        return self._shared._update_base(fn)


# ==== The shared counts ====


class SharedCounts:
    """One replica's link to the shared counts in Redis.

    Args:
        config: the ``[shared]`` table.
        router: the replica's router; its store at construction is the base (the bundle's).
        state_dir: the outcome store's directory (the outbox lives beside its journal).
        fsync: fsync the outbox like the journal.
        decision_ttl_s: how long a shared decision accepts feedback on any replica.

    Use: ``shared = SharedCounts(...)``; ``OutcomeStore(shared.journal_router, ...)``;
    ``shared.start()``; ... ``shared.close()`` after the outcome store's close.
    """

    def __init__(
        self, config: SharedConfig, router: TagRouter, state_dir: str | os.PathLike[str], *,
        fsync: bool = True, decision_ttl_s: float = 3600.0,
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

        # _lock guards the composition state below and every swap of the routed store.
        self._lock = threading.Lock()
        self._outbox_path, self._fsync = Path(state_dir) / OUTBOX, fsync
        self._opened: _Outbox | None = None
        self._shared: TagScorer | None = None  # base + log[:n], once synced
        self._n = 0  # log entries in _shared
        self._log_ids: set[str] = set()
        #: Confirmed by Redis, their log entries not applied yet.
        self._confirmed: dict[str, _Entry] = {}
        self._epoch: bytes | None = None
        self._diverged: str | None = None
        self._decisions: deque[tuple[str, bytes]] = deque(maxlen=MAX_QUEUED_DECISIONS)

        self.connected = False
        self.journal_router = cast("TagRouter", _JournalRouter(self))
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
        with self._lock:
            self._outbox()
        try:
            self._refresh()
            self._publish()
            self._refresh()
        except self._errors as e:
            log.warning("Redis at %s unavailable (%s); routing on the local state, outcomes "
                        "are kept in the outbox until it is back", self._where(), e)
        for name, target in (("publish", self._publisher), ("refresh", self._refresher)):
            t = threading.Thread(target=target, name=f"tagrouter-shared-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.pubsub:
            t = threading.Thread(target=self._listener, name="tagrouter-shared-events",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, flush_s: float = 1.0) -> None:
        """Tries to send what is pending for ``flush_s`` (the rest stays in the outbox for the
        next start), stops the threads, closes the outbox."""
        deadline = time.monotonic() + flush_s
        while self.connected and time.monotonic() < deadline and self.pending():
            self._publish_wanted.set()
            time.sleep(0.01)
        self._stop.set()
        self._publish_wanted.set()
        self._refresh_wanted.set()
        for t in self._threads:
            t.join(timeout=2.0 + self.config.timeout_s)
        with self._lock:
            if self._opened is not None:
                self._opened.close()
        with contextlib.suppress(Exception):
            self._redis.close()

    def _outbox(self) -> _Outbox:
        # Opened on first use, which comes after the outcome store took the state directory's
        # lock (its journal replay, or start()): a second process pointed at the same
        # directory must not read, let alone truncate, the owner's outbox.
        if self._opened is None:
            self._outbox_path.parent.mkdir(parents=True, exist_ok=True)
            self._opened = _Outbox(self._outbox_path, durable=self._fsync)
        return self._opened

    def _where(self) -> str:
        return f"shared.redis_url ({self.config.key_prefix!r})"

    # ---- introspection ----

    def pending(self) -> int:
        """Outcomes acknowledged locally and not yet confirmed by Redis."""
        with self._lock:
            return len(self._outbox().pending)

    @property
    def version(self) -> int:
        """Shared log entries this replica routes on."""
        return self._n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "version": self._n, "pending": len(self._outbox().pending),
                    "connected": self.connected, "diverged": self._diverged}

    # ---- routing side ----

    def remember(self, decision_id: str, tags: Sequence[str], model: str) -> None:
        """Queues the decision for sharing (never waits on Redis)."""
        if not self.config.share_decisions:
            return
        self._decisions.append(
            (decision_id, _dumps({"tags": list(tags), "model": model}).encode("utf-8"))
        )
        self._publish_wanted.set()

    def feedback(
        self, store: OutcomeStore, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """`OutcomeStore.feedback`, across replicas: an outcome Redis already counted is a
        `DuplicateOutcome` (409). The decision comes with the call (a verified decision token:
        any replica's, at once, Redis up or down), else from this replica's registry, else from
        Redis. Redis being down never fails feedback: the local journal takes it and the Lua
        script still counts it once when it is replayed."""
        from tagrouter_fast.serve.outcomes import (
            QUERY_ID_PREFIX,
            DuplicateOutcome,
            UnknownDecision,
        )

        store.outcome_label(outcome)  # a bad outcome is a 400 before any Redis round trip
        qid = QUERY_ID_PREFIX + decision_id
        if not store.has_outcome(decision_id) and self._ask(
            lambda: self._redis.hexists(self._k_decided, qid)
        ):
            raise DuplicateOutcome(
                f"decision {decision_id!r} already has an outcome (on another replica)"
            )
        try:
            return store.feedback(decision_id, outcome, decision=decision, key=key)
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
                store.remember(decision_id, tags, model)
            return store.feedback(decision_id, outcome)

    def _ask(self, fn: Callable[[], Any]) -> Any:
        """A request-path Redis call: None when Redis is down (the caller goes on locally)."""
        if not self.connected:
            return None
        try:
            return fn()
        except self._errors as e:
            self._lost(e)
            return None

    # ---- composing the routed store ----

    def _add_local(self, records: list[Record]) -> None:
        entries = [_Entry(str(q), tuple(t), m, o) for q, t, m, o in records]
        with self._lock:
            # Already counted through the log (the same decision posted to another replica
            # first): the store has it once, and Redis would refuse it anyway.
            fresh = [e for e in entries if e.qid not in self._log_ids]
            self._outbox().add(fresh)  # durable before the outcome store acknowledges
            if fresh:
                self.router.learn([e.learned for e in fresh])
        self._publish_wanted.set()

    def _update_base(self, fn: Callable[[TagScorer], TagScorer]) -> TagScorer:
        # Admin store changes (add/remove a model) are this replica's: they apply to its base
        # too, so that later refreshes keep them.
        with self._lock:
            new = self.router.update_store(fn)
            self._base = fn(self._base)
            if self._shared is not None:
                self._shared = fn(self._shared)
            return new

    def _compose_locked(self) -> None:
        assert self._shared is not None
        own = {**self._confirmed, **self._outbox().pending}
        extra = [e.learned for q, e in own.items() if q not in self._log_ids]
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
        if self._shared is not None and v == self._n:
            return
        if v < self._n:
            self._check_epoch(b"<lost>")
            return
        start = self._n if self._shared is not None else 0
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
        with self._lock:
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
            self._compose_locked()

    def _publish(self) -> None:
        """Sends the outbox and the queued decisions; confirms what Redis took."""
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
        while True:
            with self._lock:
                batch = list(self._outbox().pending.values())[:PUBLISH_CHUNK]
            if not batch:
                return
            pipe = self._redis.pipeline(transaction=False)
            keys = [self._k_decided, self._k_log, self._k_counts, self._k_version]
            for e in batch:
                args = [self._k_events, e.qid, _dumps(e.to_json()),
                        *count_fields(e.tags, e.model, e.outcome)]
                self._script(keys=keys, args=args, client=pipe)
            results = pipe.execute()
            dup = sum(1 for res in results if int(res[0]) == 0)
            with self._lock:
                self._outbox().ack([e.qid for e in batch])
                # Routed on until the refresh brings their log entries (no gap in between).
                self._confirmed.update((e.qid, e) for e in batch if e.qid not in self._log_ids)
                self._stats["published"] += len(batch) - dup
                self._stats["duplicates"] += dup
            self._refresh_wanted.set()
            if self._stop.is_set():
                return

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
                    self._publish_wanted.set()  # back: replay what waited in the outbox
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
