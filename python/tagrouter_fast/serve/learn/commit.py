"""The commit layer of `OutcomeStore`: an outcome is checked and appended to the journal, made
durable (one fsync per group of outcomes: group commit, on the event loop or in a committer
thread) and then applied to the router's counts in journal order."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from tagrouter_fast import journal
from tagrouter_fast.core import Record
from tagrouter_fast.serve.learn.registry import (
    Registry,
    _check_id,
    _check_tags,
    _Decision,
    _registry_line,
)
from tagrouter_fast.serve.learn.state import (
    INLINE_FSYNC_MAX_S,
    OUTCOME_LABELS,
    QUERY_ID_PREFIX,
    DuplicateOutcome,
    OutcomeStoreError,
    UnknownDecision,
    fsync,
    log,
)


class _Pending:
    """An outcome that is in the journal but not yet in the router's store."""

    __slots__ = ("seq", "record", "decision", "version")

    def __init__(self, seq: int, record: Record, decision: _Decision) -> None:
        self.seq, self.record, self.decision = seq, record, decision
        self.version = 0  # the store version once applied


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


class Commit(Registry):
    """The commit layer: feedback in, durable, applied."""

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
                fsync(fd)
            except OSError as e:
                with self._lock:
                    self._fail_locked(e)
                raise OutcomeStoreError(f"journal fsync failed: {e}") from e
            self._fsync_s += (time.perf_counter() - t0 - self._fsync_s) * 0.1
            with self._lock:
                self._synced_seq = max(self._synced_seq, target)
            self._mark_acked(target)

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

