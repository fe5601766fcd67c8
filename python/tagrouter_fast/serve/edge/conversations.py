"""The Responses API's stored conversations: what a later request's ``previous_response_id``
names, kept by the gateway (its backends speak chat completions or Messages, which store
nothing).

Bounded both ways (``[sessions] max_stored_responses`` and ``stored_response_ttl_s``): the
least recently stored go first, and an entry older than the TTL is gone. A conversation is
visible only to the client key that made it: another key's id reads as unknown, so ids leak
nothing. A request whose id is unknown or expired gets a 400 saying so (`ResponseStore.get`).

>>> s = ResponseStore(max_items=1, ttl_s=60.0)
>>> s.put("resp_1", "key", ())
>>> s.get("resp_1", "key")
()
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from tagrouter_fast.serve.edge.wire import Message, ProtocolError

__all__ = ["ResponseStore"]


class ResponseStore:
    """Finished responses' conversations by response id, bounded by count and age. Safe to use
    from several threads."""

    def __init__(self, max_items: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[str, float, tuple[Message, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, owner: str, conversation: tuple[Message, ...]) -> None:
        """Keeps ``conversation`` (the request's turns and the answer) under ``response_id`` for
        the key ``owner``."""
        now = self._clock()
        with self._lock:
            self._items[response_id] = (owner, now, conversation)
            self._items.move_to_end(response_id)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            while self._items:  # expired entries at the old end go now
                _, stored, _ = next(iter(self._items.values()))
                if now - stored <= self.ttl_s:
                    break
                self._items.popitem(last=False)

    def get(self, response_id: str, owner: str) -> tuple[Message, ...]:
        """The conversation stored under ``response_id`` for ``owner``.

        Raises:
            ProtocolError: 400 on ``previous_response_id``: unknown (never stored, stored for
                another key, or pushed out by newer ones) or expired.
        """
        now = self._clock()
        with self._lock:
            item = self._items.get(response_id)
            if item is not None and now - item[1] > self.ttl_s:
                del self._items[response_id]
                item = None
        if item is None or item[0] != owner:
            raise ProtocolError(
                400, "previous_response_id",
                f"unknown or expired response {response_id[:100]!r}: the gateway keeps the "
                f"last {self.max_items} responses for {self.ttl_s:g} s, per client key "
                "(docs/serving.md, \"POST /v1/responses\"); send the whole conversation as "
                "input instead")
        return item[2]
