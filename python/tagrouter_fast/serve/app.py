"""The gateway: an OpenAI-compatible ASGI app (starlette) that routes each request with the
router and forwards it to the chosen backend, learning from feedback.

Endpoints (see docs/serving.md): ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/route``, ``POST /v1/feedback``, ``GET /v1/models``, ``/admin/*`` (bearer token),
``GET /metrics``, ``GET /healthz``, ``GET /readyz``. ``/v1`` callers present a client key
(`tagrouter_fast.serve.learn.keys`) unless the config allows anonymous calls; every scored decision
id is a signed decision token (`tagrouter_fast.serve.learn.tokens`).

Per request the event loop does: read the body (bounded), check it, tag the latest user turn
(in a worker thread when tagging is slow enough to be worth the hop), decide on the current
store snapshot (no lock), forward through the pooled client, and pass the answer back as it
came. Feedback is written to the durable journal in a worker thread, so routing never waits on
a disk.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagrouter_fast.core import Decision, TagDecider, TagRouterError, finite_for_json
from tagrouter_fast.serve.backends import (
    AllBackendsFailed,
    Answer,
    Backend,
    ClientPool,
    Forwarder,
    OpenStream,
)
from tagrouter_fast.serve.config import (
    BackendConfig,
    Config,
    ConfigError,
    backend_from_dict,
)
from tagrouter_fast.serve.learn.keys import (
    ADMIN,
    FEEDBACK,
    OVERRIDE,
    ROUTE,
    ClientKey,
    Forbidden,
    Unauthenticated,
    announce,
    keyring_from_config,
)
from tagrouter_fast.serve.learn.tokens import (
    DecisionClaims,
    DecisionTokens,
    TokenError,
    load_secrets,
)
from tagrouter_fast.serve.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from tagrouter_fast.serve.sessions import SessionTable, in_tool_loop, keep_or_switch

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.learn.learner import Learner

__all__ = ["ApiError", "Gateway", "StartupError", "create_app", "serve"]

access_log = logging.getLogger("tagrouter.access")
log = logging.getLogger("tagrouter.serve")

#: Recent routed tag lists kept for ``/admin/theta {"llm_share": s}``: the budget is set on
#: the traffic actually seen.
RECENT_TAGS = 10_000
#: A per-request ``llm_share`` budget's theta is recomputed after this many decisions.
SHARE_REFRESH = 1000
#: Tagging slower than this (median of the warm-up) moves to a worker thread.
THREAD_TAGGING_ABOVE_S = 200e-6
_WARMUP_QUERY = "Write a short poem about the sea"


# ==== Errors ====


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None,
        kind: str = "invalid_request_error", code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message, "type": self.kind, "param": self.param, "code": self.code
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad(param: str, problem: str) -> ApiError:
    return ApiError(400, f"{param}: {problem}", param=param)


def _too_deep() -> ApiError:
    return ApiError(400, "body: nested too deeply (JSON deeper than the parser recurses, about "
                    "900 levels)", param="body", code="json_too_deep")


class StartupError(ValueError):
    """`serve` could not start: the message names the config key, file or address. A
    ValueError, like `ConfigError`: a given value cannot be used (the CLI prints one line and
    exits 2)."""


def _explanation(d: Decision, tags: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = finite_for_json(d.to_dict())
    out["tags"] = list(tags)
    return out


# ==== Request bodies ====


async def read_json(request: Request, limit: int, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object, read with the size limit enforced twice: on the declared
    Content-Length (cheap, before reading) and while reading (a client may lie or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "content-length: not an integer", param="content-length") from None
        if n > limit:
            raise ApiError(413, f"request body of {n} bytes is over the {limit}-byte limit",
                           kind="request_too_large")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the {limit}-byte limit",
                               kind="request_too_large")
            parts.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; a 400 keeps a client's hang-up out of the error log.
        raise ApiError(400, "body: the client went away before sending all of it",
                       param="body") from None
    raw = b"".join(parts)
    if allow_empty and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", param="body") from None
    except RecursionError:
        # ~1,000 levels fit in a 2 KB body. Python recovers from the recursion limit, so the
        # interpreter's own bound is the check: no walk over every body to count its depth.
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise _bad("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def _content_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise _bad(f"{where}[{i}]", "must be an object")
            if part.get("type") == "text":
                t = part.get("text")
                if not isinstance(t, str):
                    raise _bad(f"{where}[{i}].text", "must be a string")
                texts.append(t)
        return "\n".join(texts)
    raise _bad(where, f"must be a string, a list of content parts or null, got "
               f"{type(content).__name__}")


def chat_turn(body: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The latest user turn's text and the checked messages."""
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "missing")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty array")
    text: str | None = None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role", "missing" if role is None else "must be a string")
        t = _content_text(m.get("content"), f"messages[{i}].content")
        if role == "user":
            text = t
    return text or "", msgs


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a completions request is routed on (token-id prompts have none)."""
    if "prompt" not in body:
        raise _bad("prompt", "missing")
    p = body["prompt"]
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        if all(isinstance(x, str) for x in p):
            return "\n".join(p)
        if all(isinstance(x, int) for x in p) or all(isinstance(x, list) for x in p):
            return ""  # token ids: nothing to tag, the decider's fallback takes it
    raise _bad("prompt", "must be a string, an array of strings or token ids")


def _number(value: Any, where: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, f"must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(where, f"must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _route_options(body: dict[str, Any], request: Request) -> tuple[float | None, float | None]:
    """The request's own operating point: ``(theta, llm_share)``, at most one of them set.

    From the body's ``"tagrouter": {"theta": x}`` / ``{"llm_share": s}`` (ours: never sent
    upstream) or the ``x-tagrouter-theta`` / ``x-tagrouter-llm-share`` headers (the headers
    win)."""
    opts = body.pop("tagrouter", None)
    got: dict[str, Any] = {}
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("tagrouter", "must be an object")
        extra = sorted(set(opts) - {"theta", "llm_share"})
        if extra:
            raise _bad(f"tagrouter.{extra[0]}", "unknown option (known: theta, llm_share)")
        got = {k: (f"tagrouter.{k}", v) for k, v in opts.items() if v is not None}
    for key, header in (("theta", "x-tagrouter-theta"), ("llm_share", "x-tagrouter-llm-share")):
        raw = request.headers.get(header)
        if raw is not None:
            try:
                got[key] = (header, float(raw))
            except ValueError:
                raise _bad(header, f"not a number: {raw!r}") from None
    if len(got) > 1:
        raise _bad("tagrouter.llm_share", "give theta or llm_share, not both")
    theta = _number(got["theta"][1], got["theta"][0]) if "theta" in got else None
    share = (
        _number(got["llm_share"][1], got["llm_share"][0], 0.0, 1.0) if "llm_share" in got else None
    )
    return theta, share


# ==== The gateway ====


@dataclass
class Routed:
    """How one request is sent: the backends to try, and why the first."""

    chain: list[Backend]
    reason: str
    tags: list[str] = field(default_factory=list)
    decision: Decision | None = None
    session: str | None = None


class Gateway:
    """The state of one gateway app: router, backends, sessions, outcome store, metrics.

    Readers take no lock: ``router`` and ``backends`` are references replaced whole by the
    admin endpoints (a request reads each once), as the router swaps its store.
    """

    def __init__(self, config: Config, router: TagRouter) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.sessions = SessionTable(config.sessions.max_sessions, config.sessions.ttl_s)
        self.metrics.track_sessions(lambda: len(self.sessions))
        self.recent_tags: deque[list[str]] = deque(maxlen=RECENT_TAGS)
        # Per-request llm_share budgets: share -> (theta, the decider it was set on, at decision).
        self._share_cache: dict[float, tuple[float, TagDecider, int]] = {}
        self._decisions = 0
        self.backends: dict[str, Backend] = {}
        for i, b in enumerate(config.backends):
            self.backends[b.name] = Backend.from_config(b, f"backends[{i}]")
        self.aliases = frozenset(config.router.aliases)
        self.router = self._prepare_router(router)
        self.forwarder: Forwarder | None = None
        #: Learns from /v1/feedback (local journal, or Redis-shared), opened at start-up; None:
        #: feedback is off.
        self.learner: Learner | None = None
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
            self.ready = True
            yield
        finally:
            self.ready = False
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
        """Closes the learner (a final snapshot; the shared link after it). Idempotent."""
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

    # ---- routing ----

    def _note(self, tags: list[str]) -> None:
        """One routed query's tags into the traffic sample that share budgets use."""
        self.recent_tags.append(tags)
        self._decisions += 1

    async def request_theta(self, theta: float | None, share: float | None) -> float | None:
        """The theta of a request: its own, or the one that sends ``share`` of the recent
        traffic to M_LLM (calibrated on the last ``RECENT_TAGS`` routed queries; cached per
        decider and share, recomputed every ``SHARE_REFRESH`` decisions)."""
        if share is None:
            return theta
        decider = self.router.decider
        key = round(share, 4)
        hit = self._share_cache.get(key)
        seen = self._decisions
        if hit is not None and hit[1] is decider and seen - hit[2] < SHARE_REFRESH:
            return hit[0]
        sample = list(self.recent_tags)
        if not sample:
            raise _bad("tagrouter.llm_share", "no traffic seen yet to calibrate a share budget "
                       "on: send theta, or set one with POST /admin/theta {llm_share, queries}")
        value = await anyio.to_thread.run_sync(decider.theta_for_llm_share, sample, key)
        if len(self._share_cache) > 256:
            self._share_cache.clear()
        self._share_cache[key] = (value, decider, seen)
        return value

    def _decide(
        self, text: str, theta: float | None, extra: Sequence[str] = ()
    ) -> tuple[list[str], Decision]:
        t0 = time.perf_counter()
        batch = self.router.decide_many(
            [text], theta=theta, extra_tags=[extra] if extra else None,
            max_query_chars=self.config.router.max_query_chars, on_tagger_error="untagged",
        )
        d = batch.decisions()[0]
        self.metrics.decision_seconds.observe(time.perf_counter() - t0)
        return batch.tags[0], d

    async def decide(
        self, text: str, theta: float | None, extra: Sequence[str] = ()
    ) -> tuple[list[str], Decision]:
        if self.tag_in_thread and text.strip():
            return await anyio.to_thread.run_sync(self._decide, text, theta, extra)
        return self._decide(text, theta, extra)

    def chain(self, first: str, *, fallback: bool) -> list[Backend]:
        backends = self.backends
        b = backends.get(first)
        if b is None:
            raise ApiError(503, f"model {first!r} has no backend", kind="server_error")
        out = [b]
        if fallback:
            limit = self.config.fallback.max_attempts
            for name in self.config.fallback.order:
                if len(out) >= limit:
                    break
                nb = backends.get(name)
                if nb is not None and nb not in out:
                    out.append(nb)
        return out

    def passthrough(self, model: str) -> Backend | None:
        backends = self.backends
        if model in backends:
            return backends[model]
        for b in backends.values():
            if b.model == model:
                return b
        return None

    async def route_request(
        self, request: Request, body: dict[str, Any], text: str,
        messages: Sequence[Mapping[str, Any]] | None, caller: ClientKey,
    ) -> Routed:
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("model", "missing" if model is None else "must be a string")
        theta, share = _route_options(body, request)
        self._check_override(caller, theta, share)
        if model not in self.aliases:
            b = self.passthrough(model)
            if b is None:
                known = sorted(self.aliases) + sorted(self.backends)
                raise ApiError(400, f"model: unknown model {model!r}; known: {known}",
                               param="model", code="model_not_found")
            fb = self.config.fallback.passthrough
            tags: list[str] = []
            if self.config.router.learn_passthrough and b.name in self.router.decider.models \
                    and OVERRIDE in caller.scopes:
                # Tagged only to learn from the outcome: the model is the client's choice, so
                # scoring it is an override (else "pick small, report a win" teaches the router).
                tags, _ = await self.decide(text, None)
            return Routed(self.chain(b.name, fallback=fb), "passthrough", tags)
        key = request.headers.get("x-session-id")
        if key is None:
            user = body.get("user")
            key = user if isinstance(user, str) and user else None
        sess = self.sessions.get(key) if key is not None else None
        if sess is not None and sess.model in self.backends and messages is not None \
                and in_tool_loop(messages):
            # Mid tool-call loop: the model that issued the calls reads their results.
            return Routed(self.chain(sess.model, fallback=True), "tool_loop", list(sess.tags),
                          None, key)
        extra = sess.tags if (sess is not None and self.config.router.previous_turn_tags) else ()
        theta = await self.request_theta(theta, share)
        tags, d = await self.decide(text, theta, extra)
        self._note(tags)
        chosen, reason = d.model, d.reason
        if sess is not None:
            chosen, _ = keep_or_switch(
                sess.model, d, self.config.sessions.switch_margin, self.router.decider.models
            )
            if chosen != d.model:
                reason = "session"
        return Routed(self.chain(chosen, fallback=True), reason, tags, d, key)

    # ---- keys and decision tokens ----

    def authenticate(self, request: Request, scope: str, what: str) -> ClientKey:
        """The caller's key, which must hold ``scope`` (401 / 403 otherwise)."""
        try:
            key = self.keyring.authenticate(request.headers.get("authorization"))
            self.keyring.require(key, scope, what)
        except Unauthenticated as e:
            self.metrics.rejected.labels("unauthenticated").inc()
            raise ApiError(401, str(e), kind="authentication_error", code=e.code,
                           headers={"www-authenticate": "Bearer"}) from None
        except Forbidden as e:
            self.metrics.rejected.labels("forbidden").inc()
            raise ApiError(403, str(e), kind="permission_error", code=e.code) from None
        return key

    def _check_override(self, key: ClientKey, theta: float | None, share: float | None) -> None:
        if theta is not None or share is not None:
            try:
                self.keyring.require(key, OVERRIDE, "a per-request theta or llm_share")
            except Forbidden as e:
                self.metrics.rejected.labels("forbidden").inc()
                raise ApiError(403, str(e), kind="permission_error", code=e.code,
                               param="tagrouter.theta" if theta is not None
                               else "tagrouter.llm_share") from None

    def remember(self, decision_id: str, tags: Sequence[str], model: str, key: ClientKey) -> str:
        """The id of a decision that may be scored: a signed token carrying the tags, the
        model and the key (any replica verifies it; nothing is stored until an outcome comes).
        ``decision_id`` (a plain id) when the token would be too long."""
        token = self.tokens.issue(key.id, model, tags)
        if token is None:
            now = time.monotonic()
            if now - self._token_warned > 60.0:
                self._token_warned = now
                log.warning("decision %s: %d tags make a decision token over the size limit; "
                            "this answer cannot be scored", decision_id, len(tags))
            return decision_id
        return token

    # ---- headers ----

    def headers(
        self, request: Request, decision_id: str, routed: Routed, answered: str,
        errors: Sequence[Any],
    ) -> dict[str, str]:
        h = {
            "x-tagrouter-model": answered,
            "x-tagrouter-decision-id": decision_id,
            "x-tagrouter-reason": "failover" if errors else routed.reason,
        }
        if errors:
            h["x-tagrouter-attempts"] = ",".join([e.backend for e in errors] + [answered])
        if routed.decision is not None and request.headers.get("x-tagrouter-explain", "") in (
            "1", "true", "yes"
        ):
            d = routed.decision
            # Compact and ASCII (header values are latin-1): tags, per-model scores, Delta_q
            # and each tag's contribution per model.
            h["x-tagrouter-explanation"] = json.dumps(
                finite_for_json({
                    "model": d.model, "reason": d.reason, "tags": routed.tags,
                    "scores": d.scores, "delta": d.delta, "theta": d.theta,
                    "contributions": d.contributions,
                }),
                separators=(",", ":"), ensure_ascii=True,
            )
        return h

    # ---- completions ----

    async def completion(self, request: Request, *, chat: bool) -> Response:
        key = self.authenticate(request, ROUTE, f"POST /v1/{'chat/' if chat else ''}completions")
        body = await read_json(request, self.config.limits.max_body_bytes)
        if chat:
            text, messages = chat_turn(body)
        else:
            text, messages = prompt_text(body), None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream", "must be a boolean")
        routed = await self.route_request(request, body, text, messages, key)
        # A plain id until the answer is in: only an answered decision gets a token to score.
        decision_id = uuid.uuid4().hex
        path = "/chat/completions" if chat else "/completions"

        def payload_for(b: Backend) -> bytes:
            body["model"] = b.model
            try:
                return json.dumps(body, separators=(",", ":")).encode()
            except RecursionError:
                # Parsed a few frames up the stack, encoded deeper: a body just under the
                # parser's limit can be over the encoder's.
                raise _too_deep() from None

        assert self.forwarder is not None
        try:
            if stream:
                opened, errors = await self.forwarder.open_stream_chain(
                    routed.chain, path, payload_for
                )
            else:
                answer, errors = await self.forwarder.complete_chain(
                    routed.chain, path, payload_for
                )
                opened = answer
        except AllBackendsFailed as e:
            last = e.errors[-1].kind if e.errors else None
            raise ApiError(
                e.http_status,
                f"no backend answered: {e}",
                kind="upstream_error",
                code="upstream_timeout" if e.http_status == 504
                else "upstream_too_large" if last == "too_large" else "upstream_error",
                headers={"x-tagrouter-decision-id": decision_id,
                         "x-tagrouter-reason": routed.reason},
            ) from None
        answered = opened.backend.name
        if isinstance(opened, Answer):
            if opened.status == 200:
                decision_id = self._answered(decision_id, routed, answered, errors, key)
            headers = self.headers(request, decision_id, routed, answered, errors)
            return Response(opened.body, status_code=opened.status, headers=headers,
                            media_type=opened.content_type)
        try:
            decision_id = self._answered(decision_id, routed, answered, errors, key)
            headers = self.headers(request, decision_id, routed, answered, errors)
        except BaseException:
            # Nothing will relay this stream: its connection goes back now.
            with anyio.CancelScope(shield=True):
                await opened.close()
            raise
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"  # proxies in front must not buffer the stream
        return _Relay(self.forwarder.relay(opened), opened, headers=headers,
                      media_type="text/event-stream")

    def _answered(self, decision_id: str, routed: Routed, answered: str, errors: Sequence[Any],
                  key: ClientKey) -> str:
        """Book-keeping of an answered request; returns the id its headers carry."""
        self.metrics.routed.labels(answered, "failover" if errors else routed.reason).inc()
        if routed.reason != "passthrough" or (routed.tags and not errors):
            # A passthrough is remembered only when tagged (learn_passthrough) and answered by
            # the model the client asked for.
            decision_id = self.remember(decision_id, routed.tags, answered, key)
        if routed.session is not None:
            self.sessions.put(routed.session, answered, routed.tags)
        return decision_id

    # ---- /v1/route ----

    async def route_only(self, request: Request) -> Response:
        key = self.authenticate(request, ROUTE, "POST /v1/route")
        body = await read_json(request, self.config.limits.max_body_bytes)
        theta, share = _route_options(body, request)
        self._check_override(key, theta, share)
        extra = sorted(set(body) - {"query", "queries"})
        if extra:
            raise _bad(extra[0], "unknown field (known: query, queries, tagrouter)")
        if ("query" in body) == ("queries" in body):
            raise _bad("query", "give exactly one of query (a string) or queries (an array)")
        if "query" in body:
            q = body["query"]
            if not isinstance(q, str):
                raise _bad("query", "must be a string")
            theta = await self.request_theta(theta, share)
            tags, d = await self.decide(q, theta)
            return JSONResponse(self._route_answer(tags, d, key))
        qs = body["queries"]
        if not isinstance(qs, list) or not qs:
            raise _bad("queries", "must be a non-empty array of strings")
        limit = self.config.router.max_batch
        if len(qs) > limit:
            raise _bad("queries", f"{len(qs)} queries is over the batch limit of {limit}")
        for i, q in enumerate(qs):
            if not isinstance(q, str):
                raise _bad(f"queries[{i}]", "must be a string")
        theta = await self.request_theta(theta, share)
        results = await anyio.to_thread.run_sync(self._decide_many, qs, theta)
        return JSONResponse({"decisions": [self._route_answer(t, d, key) for t, d in results]})

    def _decide_many(self, qs: list[str], theta: float | None) -> list[tuple[list[str], Decision]]:
        t0 = time.perf_counter()
        batch = self.router.decide_many(
            qs, theta=theta, max_query_chars=self.config.router.max_query_chars,
            on_tagger_error="untagged",
        )
        out = list(zip(batch.tags, batch.decisions(), strict=True))
        self.metrics.decision_seconds.observe((time.perf_counter() - t0) / len(qs))
        return out

    def _route_answer(self, tags: list[str], d: Decision, key: ClientKey) -> dict[str, Any]:
        self._note(tags)
        # Remembered like a forwarded decision: a client that calls the model itself can
        # still report the outcome.
        decision_id = self.remember(uuid.uuid4().hex, tags, d.model, key)
        self.metrics.routed.labels(d.model, d.reason).inc()
        return {
            "decision_id": decision_id, "model": d.model, "reason": d.reason, "tags": tags,
            "explanation": _explanation(d, tags),
        }

    # ---- /v1/feedback ----

    async def feedback(self, request: Request) -> Response:
        from tagrouter_fast.serve.learn.outcomes import (
            DuplicateOutcome,
            OutcomeStoreError,
            UnknownDecision,
        )

        key = self.authenticate(request, FEEDBACK, "POST /v1/feedback")
        body = await read_json(request, self.config.limits.max_body_bytes)
        learner = self.learner
        if learner is None:
            self.metrics.feedback.labels("unavailable").inc()
            raise ApiError(503, "feedback is off: set [feedback] state_dir in the config",
                           kind="server_error")
        extra = sorted(set(body) - {"decision_id", "outcome"})
        if extra:
            raise _bad(extra[0], "unknown field (known: decision_id, outcome)")
        did = body.get("decision_id")
        if not isinstance(did, str) or not did:
            self.metrics.feedback.labels("invalid").inc()
            raise _bad("decision_id", "missing" if did is None else "must be a non-empty string")
        outcome = body.get("outcome")
        if outcome is None:
            self.metrics.feedback.labels("invalid").inc()
            raise _bad("outcome", "missing (win, tie, loss or a score)")
        if isinstance(outcome, bool) or not isinstance(outcome, (str, int, float)):
            self.metrics.feedback.labels("invalid").inc()
            raise _bad("outcome", "must be win, tie, loss or a number")
        wait = self.keyring.feedback_wait(key)
        if wait > 0:
            self.metrics.feedback.labels("rate_limited").inc()
            raise ApiError(429, f"feedback rate limit of key {key.id!r} "
                           f"({key.feedback_per_s:g}/s): retry in {wait:.2f} s",
                           kind="rate_limit_error", code="feedback_rate_limit",
                           headers={"retry-after": str(max(1, math.ceil(wait)))})
        claims = self._verify_decision(did, key)
        decision = (claims.tags, claims.model, claims.issued)
        try:
            # The local learner appends on the loop and waits for its group commit (no worker
            # thread per request); the shared one checks Redis in a worker thread.
            version = await learner.feedback_async(claims.id, outcome, decision=decision,
                                                   key=key.id)
        except UnknownDecision as e:
            # With the decision in hand the store only refuses one past its idempotency window
            # (decision_ttl_s, or evicted by max_decisions): counting it could count it twice.
            self.metrics.feedback.labels("expired").inc()
            raise ApiError(410, f"decision_id: {e}", param="decision_id",
                           code="expired_decision") from None
        except DuplicateOutcome:
            self.metrics.feedback.labels("duplicate").inc()
            raise ApiError(409, f"decision_id: decision {did!r} already has an outcome",
                           param="decision_id", code="duplicate_outcome") from None
        except ValueError as e:
            self.metrics.feedback.labels("invalid").inc()
            raise _bad("outcome", str(e)) from None
        except OutcomeStoreError as e:
            self.metrics.feedback.labels("unavailable").inc()
            raise ApiError(503, f"feedback not recorded: {e}", kind="server_error") from None
        self.metrics.feedback.labels("accepted").inc()
        return JSONResponse({"decision_id": did, "outcome": outcome, "version": version})

    def _verify_decision(self, did: str, key: ClientKey) -> DecisionClaims:
        """The claims of ``did``, a decision token issued to ``key`` for a model still routed.
        No lookup: any replica holding the secret verifies any replica's token at once."""
        try:
            claims = self.tokens.verify(did)
        except TokenError as e:
            self.metrics.feedback.labels(e.code.removesuffix("_decision")).inc()
            raise ApiError(e.status, str(e), param="decision_id", code=e.code) from None
        if claims.key != key.id:
            self.metrics.feedback.labels("forbidden").inc()
            raise ApiError(403, f"decision_id: issued to another key than {key.id!r}; a key "
                           "may post outcomes only for its own decisions", param="decision_id",
                           kind="permission_error", code="not_your_decision")
        if claims.model not in self.router.decider.store_models:  # no store snapshot
            self.metrics.feedback.labels("stale").inc()
            raise ApiError(410, f"decision_id: its model {claims.model!r} is no longer in the "
                           "store", param="decision_id", code="stale_decision")
        return claims

    # ---- admin ----

    def check_admin(self, request: Request) -> None:
        """The admin token (``[admin] token_env``) or a client key with the ``admin`` scope;
        never an anonymous caller. Hashes are compared in constant time (`Keyring`)."""
        if not self.keyring.any_with(ADMIN):
            raise ApiError(403, "admin endpoints are off: set [admin] token_env in the config "
                           "and that environment variable, or give a key the admin scope",
                           kind="permission_error")
        try:
            key = self.keyring.authenticate(request.headers.get("authorization"),
                                            anonymous=False)
        except Unauthenticated:
            raise ApiError(401, "admin: missing or wrong bearer token",
                           kind="authentication_error",
                           headers={"www-authenticate": "Bearer"}) from None
        try:
            self.keyring.require(key, ADMIN, "an admin endpoint")
        except Forbidden as e:
            raise ApiError(403, str(e), kind="permission_error", code=e.code) from None

    def _update_decider(self, fn: Callable[[TagDecider], TagDecider]) -> TagDecider:
        """Replaces the router's decider (theta, candidates) without losing a concurrent store
        update (`TagRouter.update_decider` is serialised with store writers). Readers never
        wait."""
        return self.router.update_decider(fn)

    def _update_store(self, fn: Callable[[Any], Any]) -> None:
        if self.learner is not None:
            self.learner.update_store(fn)
        else:
            self.router.update_store(fn)

    async def admin(self, request: Request) -> Response:
        self.check_admin(request)
        action = request.path_params["action"]
        body = await read_json(request, self.config.limits.max_body_bytes, allow_empty=True)
        handler = {
            ("POST", "models"): self._admin_add_model,
            ("POST", "theta"): self._admin_theta,
            ("POST", "snapshot"): self._admin_snapshot,
            ("POST", "reload"): self._admin_reload,
        }.get((request.method, action))
        if handler is None:
            raise ApiError(404, f"no admin endpoint {request.method} /admin/{action}",
                           code="not_found")
        from tagrouter_fast.serve.learn.outcomes import OutcomeStoreError

        try:
            result = await anyio.to_thread.run_sync(self._locked, handler, body)
        except ConfigError as e:
            raise ApiError(400, str(e), param=e.key) from None
        except KeyError as e:
            raise ApiError(400, str(e.args[0] if e.args else e)) from None
        except (ValueError, TagRouterError) as e:
            raise ApiError(400, str(e)) from None
        except OutcomeStoreError as e:
            raise ApiError(503, f"admin {action}: {e}", kind="server_error") from None
        except OSError as e:
            # A file of the gateway's own (a snapshot on a failing disk): the operator's to
            # fix, named in the answer; not a bug, so no traceback.
            raise ApiError(500, f"admin {action}: {e}", kind="server_error",
                           code="file_error") from None
        return JSONResponse(finite_for_json(result))

    async def admin_remove(self, request: Request) -> Response:
        self.check_admin(request)
        name = request.path_params["name"]
        result = await anyio.to_thread.run_sync(self._locked, self._admin_remove_model, name)
        return JSONResponse(result)

    def _locked(self, fn: Callable[[Any], dict[str, Any]], arg: Any) -> dict[str, Any]:
        with self._admin_lock:
            return fn(arg)

    def _admin_add_model(self, body: dict[str, Any]) -> dict[str, Any]:
        from tagrouter_fast.add_model import AddModelError, ModelExistsError, add_model
        from tagrouter_fast.data.table import load_table

        raw = body.get("backend")
        if not isinstance(raw, dict):
            raise _bad("backend", "missing (an object like a [[backends]] table)")
        cfg: BackendConfig = backend_from_dict(raw, "backend")
        name = cfg.name
        if name in self.backends or name in self.aliases:
            raise ApiError(409, f"backend.name: {name!r} exists already", param="backend.name")
        like = body.get("like")
        if like == "pool":
            like = list(self.router.decider.models)
        elif like is not None and not (
            isinstance(like, str)
            or (isinstance(like, list) and like and all(isinstance(m, str) for m in like))
        ):
            raise _bad("like", f"a model name, a list of names or \"pool\", got {like!r}")
        as_llm = body.get("as_llm", False)
        if not isinstance(as_llm, bool):
            raise _bad("as_llm", f"true or false, got {as_llm!r}")
        judgments = body.get("judgments")
        if not isinstance(judgments, str) and not (judgments is None and like is not None):
            raise _bad("judgments", "missing (a routing-table directory: queries.csv and "
                       "outcomes.csv; may be left out only with like=)")
        cost = body.get("cost", cfg.cost)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(
            cost
        ) or cost < 0:
            raise _bad("cost", f"missing or not a finite number >= 0: {cost!r}")
        table_model = body.get("table_model", name)
        backend = Backend.from_config(cfg, "backend")
        try:
            table = None if judgments is None else load_table(Path(judgments))
        except OSError as e:
            raise _bad("judgments", f"cannot read {e.filename or judgments} "
                       f"({e.strerror or e})") from None
        if table is not None and table_model not in table.models:
            raise _bad("table_model", f"{table_model!r} is not in {judgments} (models: "
                       f"{table.models})")
        # The backend first, so that a decision for the new model always finds it.
        self.backends = {**self.backends, name: backend}
        try:
            # The one add-model path (also `TagRouter.add_model`, `tagrouter add-model`). The
            # store change goes through the outcome store when there is one, which makes it
            # durable (a snapshot) before answering; then the new model becomes a candidate.
            added = add_model(self.router, table, name, cost=float(cost),
                              table_model=None if table is None else table_model, like=like,
                              as_llm=as_llm, update_store=self._update_store)
        except ModelExistsError as e:
            self.backends = {k: v for k, v in self.backends.items() if k != name}
            raise ApiError(409, str(e), param="backend.name") from None
        except AddModelError as e:
            self.backends = {k: v for k, v in self.backends.items() if k != name}
            raise ApiError(400, str(e)) from None
        except BaseException:
            self.backends = {k: v for k, v in self.backends.items() if k != name}
            raise
        return {"model": name, "judgments": added.judgments, "copied": added.copied,
                "models": added.models, "llm": added.llm}

    def _admin_remove_model(self, name: str) -> dict[str, Any]:
        if name not in self.backends:
            raise ApiError(404, f"no backend named {name!r}")
        dec = self.router.decider
        if name in dec.models:
            if len(dec.models) <= 1:
                raise ApiError(409, f"{name!r} is the only routed model")

            def drop(d: TagDecider) -> TagDecider:
                # First out of the candidates (same store), so the store swap below is legal.
                return TagDecider(
                    d.scorer, costs={m: c for m, c in d.costs.items() if m != name},
                    llm=None if d.llm == name else d.llm, theta=d.theta,
                    fallback=None if d.fallback == name else d.fallback,
                    aggregation=d.aggregation,
                )

            self._update_decider(drop)
        if name in self.router.scorer.models:
            self._update_store(lambda s: s.without_model(name))
        # The backend goes after the decider no longer picks it.
        self.backends = {k: v for k, v in self.backends.items() if k != name}
        self.sessions.drop_model(name)
        return {"removed": name, "models": self.router.decider.models}

    def _admin_theta(self, body: dict[str, Any]) -> dict[str, Any]:
        extra = sorted(set(body) - {"theta", "llm_share", "queries"})
        if extra:
            raise _bad(extra[0], "unknown field (known: theta, llm_share, queries)")
        if ("theta" in body) == ("llm_share" in body):
            raise _bad("theta", "give exactly one of theta or llm_share")
        if "theta" in body:
            theta = body["theta"]
            if isinstance(theta, bool) or not isinstance(theta, (int, float)) \
                    or not math.isfinite(theta):
                raise _bad("theta", f"must be a finite number, got {theta!r}")
            dec = self._update_decider(lambda d: d.with_theta(float(theta)))
            return {"theta": dec.theta}
        share = body["llm_share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise _bad("llm_share", f"must be a number in [0, 1], got {share!r}")
        queries = body.get("queries")
        if queries is not None:
            if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
                raise _bad("queries", "must be an array of strings")
            sample = self.router.tags_batch(queries)
        else:
            sample = list(self.recent_tags)
        if not sample:
            raise _bad("queries", "no traffic seen yet: give queries to set the budget on")
        holder: dict[str, float] = {}

        def budget(d: TagDecider) -> TagDecider:
            holder["theta"] = d.theta_for_llm_share(sample, float(share))
            return d.with_theta(holder["theta"])

        self._update_decider(budget)
        return {"theta": holder["theta"], "llm_share": share, "queries": len(sample)}

    def _admin_snapshot(self, body: dict[str, Any]) -> dict[str, Any]:
        learner = self.learner
        if learner is None:
            raise ApiError(503, "feedback is off: set [feedback] state_dir in the config")
        path = learner.snapshot()
        return {"snapshot": str(path), "version": learner.version}

    def _admin_reload(self, body: dict[str, Any]) -> dict[str, Any]:
        from tagrouter_fast.router import TagRouter

        bundle = self.config.router.bundle
        if bundle is None:
            raise ApiError(409, "router.bundle is not set: nothing to reload")
        from tagrouter_fast.serve.learn.outcomes import StateError
        from tagrouter_fast.serve.learn.shared import SharedStateError

        # The running tagger is kept (no second encoder load); the bundle's fingerprint check
        # still refuses a store built with another tagger.
        try:
            loaded = TagRouter.load(bundle, tagger=self.router.tagger)
        except (ValueError, TagRouterError, OSError) as e:
            raise ApiError(409, f"reload refused: {e}; still routing with the previous bundle",
                           code="reload_refused") from None
        fresh = self._prepare_router(loaded)
        bundle_tags = fresh.scorer.tags  # before the learner swaps in its snapshot
        old = self.learner
        if old is not None:
            # One process per state directory: the old learner lets go before the new one opens
            # (and replays the journal onto the fresh bundle). A state directory started on
            # another store refuses (its snapshot would replace the new bundle's): the old
            # learner reopens and the reload is refused with the reason.
            old.close()
            self.learner = None
            try:
                self.learner = self._open_learner(fresh)
            except (StateError, SharedStateError) as e:
                self.learner = self._open_learner(self.router)
                raise ApiError(409, f"reload refused: {e}") from None
        self.router = fresh
        # New decisions travel with the new bundle's tags; tokens on the old ones still verify.
        self.tokens.use_tags(bundle_tags)
        return {"models": fresh.decider.models, "theta": fresh.decider.theta}


# ==== ASGI pieces ====


class _Relay(StreamingResponse):
    """A streaming response that closes its upstream however it ends: finished, failed, or
    cancelled because the client went away (which is what cancels the backend's work)."""

    def __init__(self, content: AsyncIterator[bytes], stream: OpenStream, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._upstream = stream
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._upstream.close()


class _Guard:
    """Outermost middleware: the concurrency limit (429 at once, no queue), the in-flight
    gauge and one JSON access-log line per request."""

    def __init__(self, app: ASGIApp, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.limit = gw.config.limits.max_concurrency
        self.log = gw.config.server.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw = self.gw
        path: str = scope["path"]
        limited = path.startswith("/v1/")
        logging_on = self.log and access_log.isEnabledFor(logging.INFO)
        if limited and gw.inflight >= self.limit:
            gw.metrics.rejected.labels("concurrency").inc()
            await ApiError(429, f"over the concurrency limit of {self.limit} requests",
                           kind="rate_limit_error", code="concurrency_limit",
                           headers={"retry-after": "1"}).response()(scope, receive, send)
            if logging_on:
                self._log(scope, 429, 0.0, {})
            return
        t0 = time.perf_counter()
        status = 500
        seen: dict[str, str] = {}

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if logging_on:
                    for k, v in message.get("headers", ()):
                        if k.startswith(b"x-tagrouter-") and k != b"x-tagrouter-explanation":
                            seen[k[12:].decode()] = v.decode("latin-1")
            await send(message)

        if limited:
            gw.inflight += 1
            gw.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if limited:
                gw.inflight -= 1
                gw.metrics.inflight.dec()
            if logging_on:
                self._log(scope, status, time.perf_counter() - t0, seen)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float, seen: dict[str, str]) -> None:
        client = scope.get("client")
        access_log.info(json.dumps({
            "ts": round(time.time(), 3),
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "ms": round(seconds * 1e3, 3),
            "decision_id": seen.get("decision-id"),
            "model": seen.get("model"),
            "reason": seen.get("reason"),
            "client": client[0] if client else None,
        }, separators=(",", ":")))


def create_app(config: Config, *, router: TagRouter | None = None) -> Starlette:
    """The gateway app for ``config``.

    Args:
        config: the checked config (`load_config`).
        router: route with this router instead of loading ``config.router.bundle`` (tests,
            embedding).

    Raises:
        ConfigError: no bundle and no router, a routed model without a backend, an API key or
            admin token environment variable that is not set.
    """
    if router is None:
        from tagrouter_fast.router import TagRouter

        if config.router.bundle is None:
            raise ConfigError("router.bundle", "missing")
        router = TagRouter.load(config.router.bundle)
    gw = Gateway(config, router)

    async def chat(request: Request) -> Response:
        return await gw.completion(request, chat=True)

    async def completions(request: Request) -> Response:
        return await gw.completion(request, chat=False)

    async def models(request: Request) -> Response:
        gw.authenticate(request, ROUTE, "GET /v1/models")
        now = int(time.time())
        ids = list(gw.config.router.aliases) + list(gw.backends)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "tagrouter"} for m in ids
        ]})

    async def metrics(request: Request) -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not gw.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        learner = gw.learner
        stats = learner.stats() if learner is not None else {}
        state = {
            "models": gw.router.decider.models,
            "store_version": learner.version if learner is not None else None,
            **({"shared": stats["shared"]} if "shared" in stats else {}),
        }
        failure = learner.failure if learner is not None else None
        if failure is not None:
            # Routing still works, but every feedback gets 503 until a restart: a replica that
            # cannot learn is taken out of rotation rather than silently dropping outcomes.
            return JSONResponse({
                "status": "degraded",
                "reason": f"feedback cannot be recorded: {failure}; restart the gateway once "
                          "its state directory is writable",
                **state,
            }, status_code=503)
        return JSONResponse({"status": "ready", **state})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no route) and 405 (route, other method), in our error shape.
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {request.url.path[:200]}"
        if exc.status_code == 404:
            return ApiError(404, f"no endpoint {where} (see docs/serving.md)",
                            code="not_found").response()
        if exc.status_code == 405:
            allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"),
                           "")
            return ApiError(405, f"{where}: method not allowed (allowed: {allowed})",
                            code="method_not_allowed", headers=exc.headers).response()
        return ApiError(exc.status_code, f"{where}: {exc.detail}",
                        headers=exc.headers).response()

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug: the client gets the documented shape and nothing of the internals; starlette
        # re-raises after this answer, so the server logs the traceback once.
        return ApiError(500, "internal error in the gateway (logged on the server)",
                        kind="server_error", code="internal_error").response()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/route", gw.route_only, methods=["POST"]),
            Route("/v1/feedback", gw.feedback, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/admin/models/{name}", gw.admin_remove, methods=["DELETE"]),
            Route("/admin/{action}", gw.admin, methods=["POST"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                            Exception: on_unexpected},
        lifespan=gw.lifespan,
    )
    app.state.gateway = gw
    app.add_middleware(_Guard, gw=gw)  # type: ignore[arg-type]
    return app


# ==== Running it ====


def configure_logging(config: Config) -> None:
    """Access lines as bare JSON on stderr (one per request), other gateway logs plain."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.handlers[:] = [handler]
    access_log.propagate = False
    access_log.setLevel(logging.INFO if config.server.access_log else logging.WARNING)
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        for name in ("tagrouter.serve", "tagrouter.outcomes"):
            lg = logging.getLogger(name)
            lg.addHandler(h)
            lg.setLevel(logging.INFO)


#: Descriptors kept beyond the connections (clients and backends): journal, snapshots,
#: registry, tagger files, the event loop's own.
FD_RESERVE = 64


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as uvicorn would bind them),
    made before the slow part of start-up, so that a port in use is reported at once.

    Raises:
        StartupError: the host does not resolve, or an address cannot be bound.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on {where}: {e.strerror} (server.host / --host)") \
            from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" and "0.0.0.0" may both be bound, separately
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
    except OSError as e:
        for sock in socks:
            sock.close()
        reason = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise StartupError(f"cannot listen on {where}: {reason} (server.host, server.port / "
                           "--host, --port)") from None
    return socks


def _raise_fd_limit(config: Config) -> None:
    """Raises the soft descriptor limit towards what the connection limits may use (up to the
    hard limit, as Go's runtime does); warns when even that is short, since running out of
    descriptors stops accepting clients, connecting to backends and writing the journal."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    need = config.server.max_client_connections + config.limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < need:
        log.warning(
            "the descriptor limit (%d, ulimit -n) is below server.max_client_connections (%d) "
            "+ limits.max_connections (%d) + %d: lower those or raise the limit, or the gateway "
            "may run out of descriptors under load", soft,
            config.server.max_client_connections, config.limits.max_connections, FD_RESERVE)


def _start_error(config: Config, e: BaseException) -> StartupError:
    """One line for a start-up failure of the state directory, naming the key and the path."""
    state = config.feedback.state_dir
    if isinstance(e, OSError) and state is not None:
        if state.exists() and not state.is_dir():
            return StartupError(f"feedback.state_dir: {state} is not a directory")
        return StartupError(f"feedback.state_dir: cannot use {state}: {e}")
    return StartupError(" ".join(str(e).split()) or type(e).__name__)


def serve(
    config: Config, *, router: TagRouter | None = None, host: str | None = None,
    port: int | None = None, on_ready: Callable[[], None] | None = None,
) -> None:
    """Runs the gateway under uvicorn (one worker: the outcome store owns its state directory
    and the router lives in this process) until interrupted.

    The start-up that can fail runs before uvicorn does: bind the port, load the router, open
    the outcome store, warm up the tagger. Then uvicorn serves on the bound sockets with the
    listening limits of `serve.listener` (header timeout and size, connection bound).

    Args:
        on_ready: called once the gateway is listening and started, before it serves (the
            demo prints how to try it).

    Raises:
        StartupError: the port, the config, the bundle or the state directory cannot be used;
            the message names which (the CLI prints it as one line and exits 2).
    """
    import uvicorn

    from tagrouter_fast.serve.learn.outcomes import OutcomeStoreError
    from tagrouter_fast.serve.learn.shared import SharedStateError
    from tagrouter_fast.serve.listener import http_protocol

    configure_logging(config)
    host = config.server.host if host is None else host
    port = config.server.port if port is None else port
    backlog = 4096
    sockets = _listen(host, port, backlog)
    gw: Gateway | None = None
    try:
        try:
            app = create_app(config, router=router)
        except (ValueError, TagRouterError, OSError) as e:
            # The decision secret is kept in the state directory: its errors name that key.
            raise _start_error(config, e) from None
        gw = app.state.gateway
        try:
            gw.start()
        except (ValueError, TagRouterError, OSError, OutcomeStoreError, SharedStateError) as e:
            raise _start_error(config, e) from None
        _raise_fd_limit(config)
        server = uvicorn.Server(uvicorn.Config(
            app,
            http=http_protocol(config.server.header_timeout_s,
                               config.server.max_client_connections,
                               config.server.max_header_bytes),
            lifespan="on",  # opens the backend pool, and closes everything at the end
            access_log=False,  # ours is the structured one, with the decision id
            log_level="info",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=config.server.keepalive_s,
            backlog=backlog,
        ))
        for sock in sockets:
            name = sock.getsockname()
            log.info("listening on http://%s:%d", *name[:2])
        if on_ready is not None:
            on_ready()
        with contextlib.suppress(KeyboardInterrupt):  # the SIGINT uvicorn stopped on, raised
            server.run(sockets=sockets)               # again for the caller: a clean stop
    finally:
        for sock in sockets:
            sock.close()
        if gw is not None:
            gw.stop()  # after a normal stop the lifespan did it already
