"""Key budgets shared by replicas through Redis (``[shared]``): `SharedBudgets`.

Each key's spend per period is one Redis hash, ``<prefix>:budget:<key id>:<period>`` (period
``d:YYYY-MM-DD`` or ``m:YYYY-MM``) with the fields ``usd`` and ``tokens``, incremented with
HINCRBYFLOAT / HINCRBY in one MULTI/EXEC per charge: replicas never read-modify-write, so none
loses another's increment. Day hashes expire after 3 days and month hashes after 40.

A thread sends the charges (the request path only queues them) and, every ``refresh_ms``
(at least 100 ms), reads back the totals of the keys this replica has checked, so a charge on
one replica is seen by the others within that period. A charge Redis has not confirmed stays
in this replica's view (``total`` adds it) and is sent again until Redis takes it; it lives in
memory only (this replica's journal keeps it for this replica's own totals), so charges queued
during an outage are lost to the other replicas if the process stops before Redis is back. A
reply lost after EXEC applied is sent again: it then counts twice, which errs on the side of the
budget.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from tagrouter_fast.serve.policy.key_budgets import periods

if TYPE_CHECKING:
    from tagrouter_fast.serve.config import SharedConfig

__all__ = ["SharedBudgets"]

log = logging.getLogger("tagrouter.serve")

#: Seconds a period's hash outlives its period's start (a day, a month, and slack).
_TTL_S = {"d": 3 * 86400, "m": 40 * 86400}


class SharedBudgets:
    """The Redis side of `policy.key_budgets.BudgetBook`.

    Raises:
        ConfigError: the redis package is missing, or a bad ``redis_url``.
    """

    def __init__(self, config: SharedConfig) -> None:
        from tagrouter_fast.serve.config import ConfigError

        try:
            import redis
        except ImportError:
            raise ConfigError("shared", "needs the redis package: pip install "
                              "'tagrouter-fast[serve]'") from None
        self.config = config
        t = config.timeout_s
        try:
            self._redis: Any = redis.Redis.from_url(
                config.redis_url, socket_timeout=t, socket_connect_timeout=t,
                health_check_interval=0, decode_responses=False,
            )
        except ValueError as e:
            raise ConfigError("shared.redis_url", str(e)) from None
        self._errors = (redis.RedisError, OSError)
        self._prefix = f"{config.key_prefix}:budget:"
        self._lock = threading.Lock()
        #: (key, period) -> [usd, tokens] as Redis last said.
        self._cache: dict[tuple[str, str], list[float]] = {}
        #: (key, period) -> [usd, tokens] charged here, not confirmed by Redis yet.
        self._unsent: dict[tuple[str, str], list[float]] = {}
        #: Keys whose totals are refreshed, with the periods last asked about.
        self._tracked: dict[str, None] = {}
        self.connected = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _hash(self, key_id: str, period: str) -> str:
        return self._prefix + key_id + ":" + period

    # ---- the request path (no Redis call) ----

    def track(self, key_id: str) -> None:
        """Refresh ``key_id``'s totals from now on (a key with limits, once checked)."""
        if key_id not in self._tracked:
            with self._lock:
                self._tracked[key_id] = None
            self._wake.set()

    def total(self, key_id: str, period: str) -> tuple[float, float] | None:
        """``(usd, tokens)`` of all replicas as last read, plus this replica's unsent charges;
        None before Redis answered for this key and period."""
        with self._lock:
            c = self._cache.get((key_id, period))
            u = self._unsent.get((key_id, period))
        if c is None:
            return None
        return c[0] + (u[0] if u else 0.0), c[1] + (u[1] if u else 0.0)

    def push(self, key_id: str, day_month: tuple[str, str], usd: float, tokens: int) -> None:
        """Queues a charge for its day and month."""
        with self._lock:
            for p in day_month:
                u = self._unsent.setdefault((key_id, p), [0.0, 0])
                u[0] += usd
                u[1] += tokens
        self._wake.set()

    # ---- the thread ----

    def start(self) -> None:
        """One synchronous round (a replica starts with the shared totals when Redis answers),
        then the thread."""
        self._round()
        self._thread = threading.Thread(target=self._run, name="tagrouter-shared-budgets",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period_s = max(0.1, self.config.refresh_ms / 1000.0)
        while not self._stop.is_set():
            self._wake.wait(period_s)
            self._wake.clear()
            self._round()

    def _round(self) -> None:
        try:
            self._send()
            self._refresh()
            if not self.connected:
                log.info("key budgets shared through Redis")
            self.connected = True
        except self._errors as e:
            if self.connected:
                log.warning("key budgets: lost Redis (%s); charges wait in memory", e)
            self.connected = False

    def _send(self) -> None:
        with self._lock:
            batch = {k: (v[0], int(v[1])) for k, v in self._unsent.items()}
        if not batch:
            return
        pipe = self._redis.pipeline(transaction=True)
        order: list[tuple[str, str]] = []
        for (key_id, period), (usd, tokens) in batch.items():
            h = self._hash(key_id, period)
            pipe.hincrbyfloat(h, "usd", usd)
            pipe.hincrby(h, "tokens", tokens)
            pipe.expire(h, _TTL_S[period[0]])
            order.append((key_id, period))
        replies = pipe.execute()
        with self._lock:
            for i, k in enumerate(order):
                usd, tokens = batch[k]
                u = self._unsent.get(k)
                if u is not None:  # what was charged while the batch travelled stays
                    u[0] -= usd
                    u[1] -= tokens
                    if u[1] <= 0 and abs(u[0]) < 1e-12:
                        del self._unsent[k]
                self._cache[k] = [float(replies[3 * i]), float(replies[3 * i + 1])]

    def _refresh(self) -> None:
        with self._lock:
            keys = list(self._tracked)
        if not keys:
            return
        pairs = [(k, p) for k in keys for p in periods(time.time())]
        pipe = self._redis.pipeline(transaction=False)
        for k, p in pairs:
            pipe.hmget(self._hash(k, p), ["usd", "tokens"])
        replies = pipe.execute()
        with self._lock:
            for (k, p), (usd, tokens) in zip(pairs, replies, strict=True):
                self._cache[(k, p)] = [float(usd or 0.0), float(tokens or 0)]

    def close(self, flush_s: float = 1.0) -> None:
        """Sends what is queued (one try), stops the thread, closes the connection."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=flush_s + self.config.timeout_s)
        with contextlib.suppress(*self._errors):
            self._send()
        with contextlib.suppress(Exception):
            self._redis.close()
