"""The snapshot layer of `OutcomeStore`: a cut of the store and registry taken under the apply
lock (rotating the journal and decisions files), written outside it (store, registry, manifest,
each atomically), then compaction of what the new manifest makes redundant."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tagrouter_fast import journal
from tagrouter_fast.core import TagScorer
from tagrouter_fast.serve.learn.commit import Commit
from tagrouter_fast.serve.learn.registry import _Decision, _registry_line
from tagrouter_fast.serve.learn.state import (
    _DECISIONS_RE,
    _JOURNAL_RE,
    _REGISTRY_RE,
    _STORE_RE,
    ACKED_SYNC_S,
    MANIFEST,
    SNAPSHOT_DUTY,
    STATE_FORMAT,
    STATE_VERSION,
    OutcomeStoreError,
    _numbered,
    fsync,
    log,
)


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


class Snapshots(Commit):
    """The snapshot layer: admin store changes, snapshots (on demand and in the background),
    compaction."""

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
                        fsync(old_journal)
                        journal.fsync_dir(self.state_dir, fsync=fsync)
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
        journal.atomic_replace(d / store_name, data, durable=self._durable, fsync=fsync)
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
            d / registry_name, b"".join(lines), durable=self._durable, fsync=fsync
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
            fsync=fsync,
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
