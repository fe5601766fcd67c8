"""The Redis side of `SharedLearner`: the local journal as the outbox, composing the routed
store (shared log + this replica's outcomes not in it yet), and the threads that publish,
refresh and listen. `shared` holds the learner itself and its lifecycle."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast import journal
from tagrouter_fast.core import TagScorer
from tagrouter_fast.serve.learn.journal_reader import JournalReader
from tagrouter_fast.serve.learn.outcomes import OutcomeStore
from tagrouter_fast.serve.learn.shared_log import (
    FETCH_CHUNK,
    MAX_BACKOFF_S,
    PUBLISH_CHUNK,
    SharedStateError,
    _dumps,
    _Entry,
    count_fields,
    log,
)

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.config import SharedConfig


class SharedSync:
    """The fields `SharedLearner.__init__` sets that the Redis side reads and writes, and the
    Redis side itself. ``_lock`` guards the composition state and every swap of the routed
    store; lock order: the local learner's apply lock, then ``_lock``."""

    config: SharedConfig
    router: TagRouter
    local: OutcomeStore
    connected: bool
    _redis: Any  # redis-py's stubs type every reply as bytes | str whatever decode_responses
    _script: Any
    _errors: tuple[type[BaseException], ...]
    _ttl_s: int
    _base: TagScorer
    _base_sha: str
    _k_decided: str
    _k_log: str
    _k_counts: str
    _k_version: str
    _k_base: str
    _k_epoch: str
    _k_events: str
    _k_dec: str
    _published_path: Path
    _legacy_path: Path
    _lock: threading.Lock
    _published: int
    _reader: JournalReader
    _pending: dict[str, _Entry]
    _legacy: set[str]
    _seqs: deque[tuple[int, str]]
    _shared: TagScorer | None
    _n: int
    _log_ids: set[str]
    _confirmed: dict[str, _Entry]
    _recompose: bool
    _epoch: bytes | None
    _diverged: str | None
    _decisions: deque[tuple[str, bytes]]
    _stop: threading.Event
    _publish_wanted: threading.Event
    _refresh_wanted: threading.Event
    _stats: dict[str, int]

    def _where(self) -> str:
        return f"shared.redis_url ({self.config.key_prefix!r})"

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
