"""What replicas share through Redis, as bytes: the shared log's entries, the counts fields one
outcome increments, the Lua script that counts an outcome once, and the replica's two files
(the published mark and an earlier version's outbox). `SharedLearner` (`shared`) uses them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagrouter_fast import journal
from tagrouter_fast.core import Record

__all__ = ["SharedStateError", "count_fields"]

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
