"""Gateway configuration: one TOML file, read into frozen dataclasses and checked at start-up.

Every mistake is reported as one :class:`ConfigError` naming the key, e.g.
``config error: backends[1].base_url: missing``; an unknown key is an error too (a typo such as
``timout_s`` would otherwise silently keep the default). Relative paths are relative to the
config file's folder.

>>> cfg = Config.from_dict({
...     "router": {"bundle": "bundle"},
...     "backends": [{"name": "small", "base_url": "http://127.0.0.1:9001/v1"}],
... })
>>> cfg.backends[0].model, cfg.fallback.max_attempts
('small', 2)
>>> Config.from_dict({"router": {"bundle": "b"}, "backends": [{"name": "x"}]})
Traceback (most recent call last):
...
tagrouter_fast.serve.config.ConfigError: config error: backends[0].base_url: missing
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast.serve.learn.keys import ClientKey
from tagrouter_fast.serve.shadow.spend import Price

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.key_budgets import BudgetsConfig
    from tagrouter_fast.serve.shadow.config import ShadowConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "FallbackConfig",
    "FeedbackConfig",
    "LimitsConfig",
    "RouterConfig",
    "ServerConfig",
    "SessionConfig",
    "SharedConfig",
    "load_config",
]


class ConfigError(ValueError):
    """The gateway config is invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


# ==== Sections ====


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    #: One JSON line per request on the ``tagrouter.access`` logger.
    access_log: bool = True
    #: How long an idle client connection stays open. Above the clients' own idle expiry
    #: (httpx, hence the openai SDK: 5 s), so that a client never reuses a connection the
    #: gateway is closing (a reset on the client's side).
    keepalive_s: int = 75
    #: A client that has not sent a request's complete headers this long after connecting (or
    #: after its first byte, on a kept-alive connection) gets 408 and is disconnected: a slow
    #: client must not hold a connection, and its descriptor, for ever.
    header_timeout_s: float = 10.0
    #: Client connections open at once. One more pushes out the connection that has waited
    #: longest for its next request (idle or still sending headers), or is refused with 503
    #: when every connection has a request in flight. Keep it, plus
    #: ``limits.max_connections``, below the process's descriptor limit (``ulimit -n``).
    max_client_connections: int = 1024
    #: A request's line and headers together; beyond it 431 and the connection is closed
    #: (uvicorn's httptools parser buffers a header of any length).
    max_header_bytes: int = 64 << 10


@dataclass(frozen=True)
class RouterConfig:
    #: Router bundle directory (`tagrouter build-store --out`).
    bundle: Path | None = None
    #: Request ``model`` values that ask for routing.
    aliases: tuple[str, ...] = ("tagrouter",)
    #: Overrides the bundle's theta.
    theta: float | None = None
    #: Routing text beyond this many characters is cut before tagging (the backend still gets
    #: the whole prompt): tagging cost grows with length, the intent sits at the start.
    max_query_chars: int = 20_000
    #: Add the previous user turn's tags (remembered per session) to the latest turn's.
    previous_turn_tags: bool = False
    #: Tag in a worker thread (``True``), on the event loop (``False``) or decide at start-up
    #: from a timed warm-up (``None``): a thread hop costs ~50-100 us, worth it only when
    #: tagging would block the loop longer than that.
    tag_in_thread: bool | None = None
    #: Most queries in one ``POST /v1/route`` batch.
    max_batch: int = 256
    #: Tag passthrough requests to a routed model too, so their outcomes (``/v1/feedback``
    #: with the response's decision id) update that model's counts. Costs one tagger pass on
    #: each such request.
    learn_passthrough: bool = False


@dataclass(frozen=True)
class BackendConfig:
    #: The router's model name (as in the bundle's store) and the passthrough name.
    name: str
    #: Base URL of its API, e.g. ``http://host:8000/v1``.
    base_url: str
    #: Model id sent upstream (default: ``name``).
    model: str = ""
    #: Environment variable holding the API key (sent as a bearer token); read at start-up.
    api_key_env: str | None = None
    #: Deadline of a non-streaming call, and of a stream's first event.
    timeout_s: float = 60.0
    #: Longest silence between two events of a stream before it counts as reset.
    stream_idle_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    #: Per-query cost; overrides the bundle's cost of this model (needed for a model that is
    #: not in the bundle).
    cost: float | None = None
    #: USD per 1k input and output tokens (``price = {input_per_1k, output_per_1k}``): what
    #: an answer of this backend is charged to the caller's key budget (``[budgets]``).
    price: Price | None = None
    #: What the backend speaks: "openai" (chat completions at ``base_url/chat/completions``)
    #: or "anthropic" (Messages at ``base_url/messages``, its key sent as ``x-api-key``).
    protocol: str = "openai"
    # Capabilities (docs/serving.md, "Routing by capability"). The defaults claim everything
    # and no limit, as the gateway assumed before they existed: declare what a backend lacks.
    #: Takes tool definitions and tool-call turns.
    tools: bool = True
    #: Takes images.
    vision: bool = True
    #: Honours a structured-output request (a JSON schema or JSON mode).
    json_schema: bool = True
    #: Prompt plus requested output tokens it can hold; None: not checked.
    max_context_tokens: int | None = None
    #: Most output tokens a request may ask of it (max_tokens); None: not checked.
    max_output_tokens: int | None = None
    #: A `tokenizers` JSON file that counts this backend's tokens for the context check; else
    #: the estimate (characters / 4, 1,600 per image: `edge.wire.Request`).
    tokenizer: Path | None = None


@dataclass(frozen=True)
class FallbackConfig:
    #: Backends tried, in this order, after the routed one fails.
    order: tuple[str, ...] = ()
    #: Backend calls per request, the first included.
    max_attempts: int = 2
    #: Whether a request naming a concrete backend may also fall back to another model.
    passthrough: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 1 << 20
    #: Largest non-streaming backend answer (body bytes, after decompression); reading stops
    #: there and the call fails (502, or the next backend of the fallback chain).
    max_answer_bytes: int = 32 << 20
    #: Requests in flight on the /v1 endpoints; more get 429 at once (no queue).
    max_concurrency: int = 256
    #: Pooled upstream connections, all backends together.
    max_connections: int = 512
    #: How long an idle upstream connection is kept for reuse. Below the backends' own
    #: keep-alive timeout (uvicorn, hence vLLM and most Python servers: 5 s), or a request may
    #: go out on a connection the backend is closing and fail as a reset.
    keepalive_s: float = 4.0


@dataclass(frozen=True)
class SessionConfig:
    #: A session moves to another model only if the new turn favours it by more than this
    #: (in Delta_q units relative to theta for M_LLM <-> M_SLM moves, in score units between two
    #: small models).
    switch_margin: float = 0.5
    max_sessions: int = 10_000
    ttl_s: float = 3600.0
    #: Finished Responses API answers kept for ``previous_response_id`` (per client key), and
    #: for how long: the oldest go first.
    max_stored_responses: int = 1000
    stored_response_ttl_s: float = 3600.0


@dataclass(frozen=True)
class FeedbackConfig:
    #: Where the outcome journal and snapshots live; feedback is off without it.
    state_dir: Path | None = None
    fsync: bool = True
    snapshot_every: int = 50_000
    decision_ttl_s: float = 3600.0
    max_decisions: int = 100_000


@dataclass(frozen=True)
class SharedConfig:
    """Replicas sharing their counts through Redis (docs/scaling.md); off without ``[shared]``."""

    #: ``redis://[:password@]host:port/db``, ``rediss://...`` or ``unix:///path.sock``.
    redis_url: str
    #: Every key lives under ``<key_prefix>:``; replicas of one bundle share one prefix.
    key_prefix: str = "tagrouter"
    #: Polling period of the shared version: the backstop of the pub/sub wake-ups.
    refresh_ms: int = 50
    #: Wake up on the version published by every counted outcome (latency ~1 ms on loopback).
    pubsub: bool = True
    #: Socket timeout of every Redis call: how long Redis may stall a feedback request.
    timeout_s: float = 1.0
    #: No effect since decision tokens (any replica verifies any replica's decision from its
    #: token, docs/scaling.md); accepted so that existing configs still load.
    share_decisions: bool = True


@dataclass(frozen=True)
class AdminConfig:
    #: Environment variable holding the admin bearer token; admin endpoints are off without it.
    token_env: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    """Who may call ``/v1`` and post outcomes (docs/serving.md, "Trust"); the decision secret.

    Keys come from ``keys`` (``[[auth.keys]]`` tables), ``keys_file`` and the variable named by
    ``keys_env``, all together: each a record ``{id, hash, scopes, feedback_per_s?,
    feedback_burst?}`` holding the key's sha256, never the key (`tagrouter keys new`)."""

    keys: tuple[ClientKey, ...] = ()
    #: One JSON key record per line (read at start-up).
    keys_file: Path | None = None
    #: Environment variable holding key records (lines, or one JSON array).
    keys_env: str | None = None
    #: Requests without a key are served (as the principal ``anonymous``), with scope
    #: ``route`` only unless the two below say more.
    allow_anonymous: bool = False
    anonymous_feedback: bool = False
    anonymous_override: bool = False
    #: All anonymous callers' feedback posts together, per second (a token bucket).
    anonymous_feedback_per_s: float | None = None
    #: The secret that signs decision tokens (replicas must share it); one or more secrets
    #: separated by whitespace or commas, the first signing. Without either, a single gateway
    #: generates one in its state directory.
    decision_secret_file: Path | None = None
    decision_secret_env: str | None = None


@dataclass(frozen=True)
class Config:
    router: RouterConfig
    backends: tuple[BackendConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    shared: SharedConfig | None = None
    #: Per-key spending budgets (``[budgets]``, `policy.key_budgets`); None: off.
    budgets: BudgetsConfig | None = None
    #: Shadow mode (``[shadow]``, docs/shadow.md); off without it.
    shadow: ShadowConfig | None = None
    #: Where the config was read from (for messages).
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base_dir: Path | None = None) -> Config:
        """Checks a parsed TOML document; ``base_dir`` anchors relative paths."""
        from tagrouter_fast.serve.config_parse import parse

        return parse(raw, base_dir or Path.cwd())

    def backend(self, name: str) -> BackendConfig | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Reads and checks a gateway config file.

    Raises:
        ConfigError: unreadable file, invalid TOML, or a bad key (the message names it).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read ({e.strerror or e})") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(str(p), f"not valid TOML ({e})") from None
    from tagrouter_fast.serve.config_parse import parse

    return replace(parse(raw, p.resolve().parent), source=str(p))
