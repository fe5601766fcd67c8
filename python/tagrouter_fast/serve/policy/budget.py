"""Operating points by share: the theta that sends a given share of the traffic to M_LLM,
calibrated on the tags of the queries actually routed.

A request may carry its own ``llm_share`` (``tagrouter.llm_share`` or the
``x-tagrouter-llm-share`` header), and ``POST /admin/theta {"llm_share": s}`` sets the router's;
both are computed here on the last `RECENT_TAGS` routed queries.
"""

from __future__ import annotations

from collections import deque

import anyio.to_thread

from tagrouter_fast.core import TagDecider
from tagrouter_fast.serve.edge.errors import bad

__all__ = ["RECENT_TAGS", "SHARE_REFRESH", "ShareBudget"]

#: Recent routed tag lists kept for ``/admin/theta {"llm_share": s}``: the budget is set on
#: the traffic actually seen.
RECENT_TAGS = 10_000
#: A per-request ``llm_share`` budget's theta is recomputed after this many decisions.
SHARE_REFRESH = 1000


class ShareBudget:
    """The traffic sample (tags of the last `RECENT_TAGS` routed queries) and the per-request
    share budgets computed on it (cached per decider and share, recomputed every
    `SHARE_REFRESH` decisions). Event-loop state: no lock."""

    def __init__(self) -> None:
        self.recent_tags: deque[list[str]] = deque(maxlen=RECENT_TAGS)
        # Per-request llm_share budgets: share -> (theta, the decider it was set on, at decision).
        self._share_cache: dict[float, tuple[float, TagDecider, int]] = {}
        self._decisions = 0

    def note(self, tags: list[str]) -> None:
        """One routed query's tags into the traffic sample that share budgets use."""
        self.recent_tags.append(tags)
        self._decisions += 1

    def sample(self) -> list[list[str]]:
        return list(self.recent_tags)

    async def request_theta(
        self, decider: TagDecider, theta: float | None, share: float | None
    ) -> float | None:
        """The theta of a request: its own, or the one that sends ``share`` of the recent
        traffic to M_LLM under ``decider`` (the router's current one).

        Raises:
            ApiError: a share with no traffic seen yet to calibrate it on (400).
        """
        if share is None:
            return theta
        key = round(share, 4)
        hit = self._share_cache.get(key)
        seen = self._decisions
        if hit is not None and hit[1] is decider and seen - hit[2] < SHARE_REFRESH:
            return hit[0]
        sample = self.sample()
        if not sample:
            raise bad("tagrouter.llm_share", "no traffic seen yet to calibrate a share budget "
                      "on: send theta, or set one with POST /admin/theta {llm_share, queries}")
        value = await anyio.to_thread.run_sync(decider.theta_for_llm_share, sample, key)
        if len(self._share_cache) > 256:
            self._share_cache.clear()
        self._share_cache[key] = (value, decider, seen)
        return value

