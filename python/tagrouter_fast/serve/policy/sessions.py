"""Multi-turn stickiness: a conversation stays on its model unless a new turn clearly favours
another, and never moves mid tool-call loop.

Switching models mid-conversation has a price (the new model did not write the earlier turns,
prompt caches are lost), so a session moves only when the new turn's decision beats the current
model by more than ``switch_margin``:

- between M_LLM and a small model, on the decider's own axis: ``Delta_q - theta`` must pass
  ``+margin`` to leave M_LLM for M_SLM, and ``-margin`` to leave a small model for M_LLM;
- between two small models, on their score difference ``S(new) - S(current)``.

A turn with no known tag (NaN Delta_q) never moves a session. The table is bounded: least
recently used sessions are dropped first, and sessions idle longer than ``ttl_s`` expire.

>>> t = SessionTable(max_sessions=2, ttl_s=60.0)
>>> t.put("a", "small", ["Poetry Writing"]); t.get("a").model
'small'
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tagrouter_fast.core import Decision

__all__ = ["Session", "SessionTable", "in_tool_loop", "keep_or_switch"]


@dataclass(frozen=True)
class Session:
    model: str
    #: Tags of the session's last routed user turn.
    tags: tuple[str, ...]
    last_seen: float
    #: Capabilities the conversation has used (tools, vision, json_schema): the session never
    #: moves to a model without them.
    used: frozenset[str] = frozenset()


class SessionTable:
    """A bounded LRU of sessions with a time-to-live. Safe to use from several threads."""

    def __init__(self, max_sessions: int, ttl_s: float, clock: Any = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Session | None:
        now = self._clock()
        with self._lock:
            s = self._items.get(key)
            if s is None:
                return None
            if now - s.last_seen > self.ttl_s:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return s

    def put(self, key: str, model: str, tags: Sequence[str],
            used: Collection[str] = ()) -> None:
        now = self._clock()
        with self._lock:
            old = self._items.get(key)
            kept = old.used if old is not None and now - old.last_seen <= self.ttl_s \
                else frozenset()
            self._items[key] = Session(model, tuple(tags), now, kept | frozenset(used))
            self._items.move_to_end(key)
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
            # Expired sessions at the LRU end go now, so memory follows live traffic.
            while self._items:
                oldest = next(iter(self._items.values()))
                if now - oldest.last_seen <= self.ttl_s:
                    break
                self._items.popitem(last=False)

    def drop_model(self, model: str) -> None:
        """Forgets sessions on ``model`` (it was removed)."""
        with self._lock:
            for k in [k for k, s in self._items.items() if s.model == model]:
                del self._items[k]


def in_tool_loop(messages: Sequence[Mapping[str, Any]]) -> bool:
    """True while a conversation waits on tool results or the model's answer to them: the last
    message is a tool result, or an assistant turn that called tools."""
    if not messages:
        return False
    last = messages[-1]
    role = last.get("role")
    if role in ("tool", "function"):
        return True
    return role == "assistant" and bool(last.get("tool_calls") or last.get("function_call"))


def keep_or_switch(
    current: str, decision: Decision, margin: float, candidates: Sequence[str]
) -> tuple[str, bool]:
    """The session's model for this turn and whether it switched.

    Args:
        current: the session's model.
        decision: this turn's decision.
        margin: the switch margin (>= 0).
        candidates: models routable now; a session on a removed model follows the decision.
    """
    new = decision.model
    if new == current:
        return current, False
    if current not in candidates:
        return new, True
    delta = decision.delta
    if math.isnan(delta):
        return current, False  # no known tag: nothing says the current model is worse
    llm = decision.llm
    if current == llm:
        # Leaving M_LLM for M_SLM: the decision picked M_SLM because Delta_q >= theta.
        move = delta - decision.theta > margin
    elif new == llm:
        move = decision.theta - delta > margin
    else:
        scores = decision.scores
        move = scores.get(new, 0.0) - scores.get(current, 0.0) > margin
    return (new, True) if move else (current, False)
