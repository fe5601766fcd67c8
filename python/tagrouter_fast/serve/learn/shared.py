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
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast.core import TagScorer
from tagrouter_fast.serve.learn.journal_reader import JournalReader
from tagrouter_fast.serve.learn.outcomes import OutcomeStore
from tagrouter_fast.serve.learn.shared_log import (
    _PUBLISH_LUA,
    LEGACY_OUTBOX,
    MAX_QUEUED_DECISIONS,
    PUBLISHED,
    SharedStateError,
    _dumps,
    _read_legacy_outbox,
    _read_published,
    count_fields,
    log,
)
from tagrouter_fast.serve.learn.shared_sync import SharedSync
from tagrouter_fast.serve.learn.state import QUERY_ID_PREFIX, DuplicateOutcome, UnknownDecision

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.config import SharedConfig

__all__ = ["SharedLearner", "SharedStateError", "count_fields"]


class SharedLearner(SharedSync):
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
            self._redis = redis.Redis.from_url(
                config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                health_check_interval=0, decode_responses=False,
            )
        except ValueError as e:
            from tagrouter_fast.serve.config import ConfigError

            raise ConfigError("shared.redis_url", str(e)) from None
        self._script = self._redis.register_script(_PUBLISH_LUA)
        self._errors = (redis.RedisError, OSError)

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
        self._pending = _read_legacy_outbox(self._legacy_path)
        self._legacy = set(self._pending)
        #: (seq, qid) of the journal entries read, oldest first, until Redis confirmed them.
        self._seqs = deque()
        self._shared = None  # base + log[:n], once synced
        self._n = 0  # log entries in _shared
        self._log_ids = set()
        #: Confirmed by Redis, their log entries not applied yet.
        self._confirmed = {}
        self._recompose = False
        self._epoch = None
        self._diverged = None
        self._decisions = deque(maxlen=MAX_QUEUED_DECISIONS)

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
