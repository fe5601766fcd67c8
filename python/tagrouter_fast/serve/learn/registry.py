"""The decision registry of `OutcomeStore`: remembered decisions (id -> tags, model, time,
whether it has an outcome), bounded by ``max_decisions`` and ``decision_ttl_s``, and the checks
of what goes into it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tagrouter_fast import journal
from tagrouter_fast.serve.learn.state import (
    MAX_DECISION_ID_CHARS,
    MAX_TAGS,
    OutcomeStoreError,
    StateError,
    StoreState,
    log,
)


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


class Registry(StoreState):
    """The registry layer: decisions remembered on the routing path."""

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

    def has_outcome(self, decision_id: str) -> bool:
        """Whether a remembered (unexpired) decision already has an outcome."""
        with self._lock:
            d = self._registry.get(decision_id)
            return d is not None and d.seq != 0

