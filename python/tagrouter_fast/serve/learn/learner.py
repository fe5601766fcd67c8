"""The learner: the one seam between the gateway and everything that learns from outcomes.

One learn path, composed one way::

    request -> Learner -> journal (fsync, group commit) -> router's store

Two implementations:

- `tagrouter_fast.serve.learn.outcomes.OutcomeStore`, the *local* learner: a durable journal plus
  snapshots in a state directory (docs/feedback.md);
- `tagrouter_fast.serve.learn.shared.SharedLearner`, for replicas sharing their counts through Redis
  (docs/scaling.md). It *owns* a local learner: it checks Redis for idempotency and for
  decisions routed by other replicas, hands the outcome to its local learner, and publishes from
  that learner's journal. The local learner never calls back into it.

The gateway holds one ``Learner | None`` (None: feedback is off) and calls nothing else.

Errors, the same for both (defined in `tagrouter_fast.serve.learn.state`): `UnknownDecision` (a
`KeyError`; 404), `DuplicateOutcome` (a `ValueError`; 409), `ValueError` for a bad outcome or id
(400), `OutcomeStoreError` when the learner cannot record outcomes (503; `Learner.failure`
says why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tagrouter_fast.core import TagScorer

__all__ = ["Learner"]


class Learner(Protocol):
    """What the gateway needs from whatever learns from outcomes."""

    @property
    def version(self) -> int:
        """The store version: +1 per applied outcome and per `update_store`; it only grows,
        across restarts too."""
        ...

    @property
    def failure(self) -> str | None:
        """Why outcomes cannot be recorded now (closed, the journal failed), or None while they
        can. Readiness checks read it."""
        ...

    @property
    def writable(self) -> bool:
        """``failure is None``."""
        ...

    def remember(self, decision_id: str, tags: Sequence[str], model: str) -> None:
        """Remembers a routing decision so that an outcome can be posted for it (cheap enough
        for the routing path: no fsync, no network wait)."""
        ...

    def feedback(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """Records one outcome (``win``/``tie``/``loss`` or a score in [0, 1]) for a decision:
        durable before it returns, then in the router's counts (O(its tags)). ``decision`` is
        the verified token's ``(tags, model, issued)`` (no registry lookup: any replica's
        decision, at once); ``key`` is the posting key's id, journalled with the outcome.
        Returns the store version that includes it."""
        ...

    async def feedback_async(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        """`feedback` from an event loop (the gateway): the same contract, without blocking
        the loop on the fsync."""
        ...

    def update_store(self, fn: Callable[[TagScorer], TagScorer]) -> int:
        """Replaces the router's store by ``fn(store)`` durably (admin: add or remove a model);
        returns the new version."""
        ...

    def snapshot(self) -> Path:
        """Writes a snapshot now; returns its file."""
        ...

    def stats(self) -> dict[str, Any]:
        """Numbers for /readyz and /metrics (a shared learner adds ``"shared"``)."""
        ...

    def close(self) -> None:
        """Finishes what is in flight, snapshots, releases the state directory. Idempotent."""
        ...
