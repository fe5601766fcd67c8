"""The gateway's state (policy's first layer): router, backends, sessions, share budgets,
learner, keys and decision tokens, and their lifecycle (start-up: the learner's journal
replayed, the tagger warmed up; shutdown).

Readers take no lock: ``router`` and ``backends`` are references replaced whole by the named
mutators (`policy.gateway`), and a request reads each once, as the router swaps its store.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.to_thread
from starlette.applications import Starlette

from tagrouter_fast.serve.config import Config, ConfigError
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.forward.client import ClientPool
from tagrouter_fast.serve.forward.forwarder import Forwarder
from tagrouter_fast.serve.learn.keys import (
    ADMIN_TOKEN_ID,
    ANONYMOUS,
    announce,
    keyring_from_config,
)
from tagrouter_fast.serve.learn.tokens import DecisionTokens, load_secrets
from tagrouter_fast.serve.metrics import GatewayMetrics
from tagrouter_fast.serve.policy.budget import ShareBudget
from tagrouter_fast.serve.policy.sessions import SessionTable
from tagrouter_fast.serve.policy.spending import Spending
from tagrouter_fast.serve.telemetry import tracing_from_env

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.learn.learner import Learner
    from tagrouter_fast.serve.policy.gateway import Gateway
    from tagrouter_fast.serve.shadow.service import ShadowService

__all__ = ["GatewayState", "THREAD_TAGGING_ABOVE_S"]

log = logging.getLogger("tagrouter.serve")

#: Tagging slower than this (median of the warm-up) moves to a worker thread.
THREAD_TAGGING_ABOVE_S = 200e-6
_WARMUP_QUERY = "Write a short poem about the sea"


class GatewayState:
    """The state of one gateway app: router, backends, sessions, outcome store, metrics."""

    def __init__(self, config: Config, router: TagRouter) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.sessions = SessionTable(config.sessions.max_sessions, config.sessions.ttl_s)
        self.metrics.track_sessions(lambda: len(self.sessions))
        #: The traffic sample and per-request share budgets.
        self.budget = ShareBudget()
        self.backends: dict[str, Backend] = {}
        for i, b in enumerate(config.backends):
            self.backends[b.name] = Backend.from_config(b, f"backends[{i}]")
        self.aliases = frozenset(config.router.aliases)
        #: Prices, charges and per-key budgets (journal opened at start-up).
        self.spending = Spending(config, self.metrics)
        #: Spans per request when OpenTelemetry is on (`serve.telemetry`); None: off.
        self.tracing = tracing_from_env()
        self.router = self._prepare_router(router)
        self.forwarder: Forwarder | None = None
        #: Learns from /v1/feedback (local journal, or Redis-shared), opened at start-up; None:
        #: feedback is off.
        self.learner: Learner | None = None
        #: Shadow mode (``[shadow]``), opened at start-up after the learner; None: off.
        self.shadow: ShadowService | None = None
        self.ready = False
        self._started = False
        self.tag_in_thread = config.router.tag_in_thread is not False
        self.inflight = 0
        self._admin_lock = threading.Lock()  # admin writers, one at a time
        self.admin_token: bytes | None = None
        env = config.admin.token_env
        if env:
            token = os.environ.get(env)
            if not token:
                raise ConfigError("admin.token_env", f"environment variable {env} is not set")
            self.admin_token = token.encode()
        self.keyring = keyring_from_config(config.auth, self.admin_token)
        if config.budgets is not None:
            known = {k.id for k in self.keyring.keys} | {ANONYMOUS, ADMIN_TOKEN_ID}
            for key_id in config.budgets.keys:
                if key_id not in known:  # a typo would leave the real key unlimited
                    raise ConfigError(f"budgets.keys.{key_id}", f"no client key has the id "
                                      f"{key_id!r} (keys: {sorted(known)})")
        auth, fb = config.auth, config.feedback
        decision_secrets, where = load_secrets(
            file=auth.decision_secret_file, env=auth.decision_secret_env,
            state_dir=fb.state_dir, replicas=config.shared is not None,
        )
        self._secret_from = where  # said once started (a failing start stays one line)
        # The bundle's tags (the same on every replica) are the tag table of the tokens.
        self.tokens = DecisionTokens(decision_secrets, self.router.scorer.tags,
                                     ttl_s=fb.decision_ttl_s)
        self._token_warned = 0.0

    def _apply_costs(self, router: TagRouter) -> None:
        """A backend's configured cost overrides the bundle's, and makes a store model that the
        bundle did not route to (e.g. one added through the admin API before a restart) a
        candidate. Called again once the outcome store has loaded its snapshot."""
        in_store = set(router.scorer.models)
        costs = {
            b.name: b.cost for b in self.config.backends
            if b.cost is not None and b.name in in_store
        }
        if costs:
            router.update_decider(lambda d: d.with_store(d.scorer, costs=costs))

    def _prepare_router(self, router: TagRouter) -> TagRouter:
        cfg = self.config
        self._apply_costs(router)
        if cfg.router.theta is not None:
            theta = cfg.router.theta
            router.update_decider(lambda d: d.with_theta(theta))
        missing = [m for m in router.decider.models if m not in self.backends]
        if missing:
            raise ConfigError(
                "backends", f"no backend for routed model(s) {missing}: add a [[backends]] "
                "entry named after each model of the bundle"
            )
        return router

    # ---- lifecycle ----

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        lim = self.config.limits
        client = ClientPool(lim.max_connections, lim.keepalive_s)
        self.forwarder = Forwarder(client, self.metrics, max_answer_bytes=lim.max_answer_bytes)
        try:
            if not self._started:  # `serve` starts the gateway before uvicorn runs
                await anyio.to_thread.run_sync(self.start)
            if self.shadow is not None:
                await self.shadow.recover()
            self.ready = True
            yield
        finally:
            self.ready = False
            if self.shadow is not None:  # before the client and the learner it uses close
                await self.shadow.aclose()
            await client.aclose()
            await anyio.to_thread.run_sync(self.stop)

    def start(self) -> None:
        """The blocking part of start-up: the learner (its journal replayed) first, the
        quick check that fails most often, then the tagger's warm-up. Idempotent.

        Raises:
            StateError, OutcomeStoreError, SharedStateError, OSError: the state directory
                cannot be used (the message names the file).
        """
        if self._started:
            return
        if self.config.feedback.state_dir is not None:
            self.learner = self._open_learner(self.router)
        self.spending.open()
        if self.config.shadow is not None:
            from tagrouter_fast.serve.shadow.service import ShadowService

            self.shadow = ShadowService(cast("Gateway", self))
        self._started = True
        self._warm_up()
        # What start-up built (router, tagger, config, modules) lives as long as the process:
        # out of the collector's generations, so a full collection under load scans only what
        # requests made (measured: the tail of feedback latency under load shrinks).
        gc.collect()
        gc.freeze()
        announce(self.keyring, log)
        log.info("decision tokens signed with the secret from %s", self._secret_from)

    def stop(self) -> None:
        """Closes the learner (a final snapshot; the shared link after it) and the budget
        journal. Idempotent."""
        self.spending.close()
        if self.tracing is not None:
            self.tracing.close()
        if self.learner is not None:
            self.learner.close()

    def _open_learner(self, router: TagRouter) -> Learner:
        """The learner of ``[feedback]``: the local journal, owned by the Redis-shared learner
        when ``[shared]`` is set."""
        fb = self.config.feedback
        assert fb.state_dir is not None
        options: dict[str, Any] = {
            "fsync": fb.fsync, "snapshot_every": fb.snapshot_every,
            "decision_ttl_s": fb.decision_ttl_s, "max_decisions": fb.max_decisions,
        }
        learner: Learner
        if self.config.shared is None:
            from tagrouter_fast.serve.learn.outcomes import OutcomeStore

            learner = OutcomeStore(router, fb.state_dir, **options)
        else:
            from tagrouter_fast.serve.learn.shared import SharedLearner

            shared = SharedLearner(self.config.shared, router, fb.state_dir, **options)
            try:
                shared.start()  # routes on base + shared increments from the first request
            except BaseException:
                shared.close(flush_s=0)
                raise
            learner = shared
        self._apply_costs(router)
        self.metrics.track_store_version(lambda: float(self.learner.version)
                                         if self.learner is not None else 0.0)
        return learner

    def _warm_up(self) -> None:
        """Loads the tagger's model (and aligner) before the first request, and times it to
        decide whether tagging runs on the event loop or in a worker thread."""
        router = self.router
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            router.tags(_WARMUP_QUERY)
            times.append(time.perf_counter() - t0)
        median = sorted(times)[len(times) // 2]
        if self.config.router.tag_in_thread is None:
            self.tag_in_thread = median > THREAD_TAGGING_ABOVE_S
        log.info("tagging takes %.3f ms; in a worker thread: %s", median * 1e3,
                 self.tag_in_thread)

