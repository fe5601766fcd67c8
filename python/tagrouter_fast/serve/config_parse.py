"""Checking a gateway config: the raw TOML document (or dict) read key by key into the frozen
sections of `tagrouter_fast.serve.config`, each mistake one `ConfigError` naming the key, an
unknown key included."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tagrouter_fast.serve.config import (
    AdminConfig,
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    FallbackConfig,
    FeedbackConfig,
    LimitsConfig,
    RouterConfig,
    ServerConfig,
    SessionConfig,
    SharedConfig,
)
from tagrouter_fast.serve.learn.keys import KeySpecError, parse_key
from tagrouter_fast.serve.shadow.spend import Price

if TYPE_CHECKING:
    from tagrouter_fast.serve.shadow.config import ShadowConfig

__all__ = ["backend_from_dict", "parse"]


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers are errors."""

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(where, f"must be a table, got {type(raw).__name__}")
        self.raw = raw
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.raw.get(name, default)

    def required(self, name: str) -> Any:
        self.used.add(name)
        if name not in self.raw:
            raise ConfigError(self.key(name), "missing")
        return self.raw[name]

    def str_(self, name: str, default: str | None = None, *, required: bool = False) -> Any:
        v = self.required(name) if required else self.get(name, default)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(self.key(name), f"must be a non-empty string, got {v!r}")
        return v

    def number(
        self, name: str, default: float | None, *, lo: float = 0.0, allow_none: bool = False
    ) -> Any:
        v = self.get(name, default)
        if v is None and (allow_none or default is None):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(self.key(name), f"must be a finite number, got {v!r}")
        if v < lo:
            raise ConfigError(self.key(name), f"must be >= {lo}, got {v!r}")
        return float(v)

    def positive(self, name: str, default: float) -> float:
        v = self.number(name, default)
        if v <= 0:
            raise ConfigError(self.key(name), f"must be > 0, got {v!r}")
        return float(v)

    def int_(self, name: str, default: int, *, lo: int = 1, hi: int = 2**31) -> int:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(self.key(name), f"must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(self.key(name), f"must be between {lo} and {hi}, got {v}")
        return v

    def bool_(self, name: str, default: bool | None) -> Any:
        v = self.get(name, default)
        if v is None and default is None:
            return None
        if not isinstance(v, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {v!r}")
        return v

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.get(name, list(default))
        if not isinstance(v, list):
            raise ConfigError(self.key(name), f"must be a list of strings, got {v!r}")
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s:
                raise ConfigError(
                    f"{self.key(name)}[{i}]", f"must be a non-empty string, got {s!r}"
                )
        return tuple(v)

    def path(self, name: str, base: Path) -> Path | None:
        v = self.str_(name)
        if v is None:
            return None
        p = Path(v).expanduser()
        return p if p.is_absolute() else base / p

    def done(self) -> None:
        extra = sorted(set(map(str, self.raw)) - self.used)
        if extra:
            raise ConfigError(self.key(extra[0]), "unknown key")


def _section(raw: Mapping[str, Any], name: str, top: _Section) -> _Section:
    return _Section(top.get(name, {}), name)


def parse(raw: Mapping[str, Any], base: Path) -> Config:
    top = _Section(raw, "")

    s = _section(raw, "server", top)
    server = ServerConfig(
        host=s.str_("host", "127.0.0.1"),
        port=s.int_("port", 8000, lo=0, hi=65535),
        access_log=s.bool_("access_log", True),
        keepalive_s=s.int_("keepalive_s", 75),
        header_timeout_s=s.positive("header_timeout_s", 10.0),
        max_client_connections=s.int_("max_client_connections", 1024, hi=1_000_000),
        max_header_bytes=s.int_("max_header_bytes", 64 << 10, lo=1024),
    )
    s.done()

    r = _Section(top.get("router", {}), "router")
    aliases = r.str_list("aliases", ("tagrouter",))
    if not aliases:
        raise ConfigError("router.aliases", "must name at least one alias")
    tag_in_thread = r.get("tag_in_thread", "auto")
    if tag_in_thread == "auto":
        tag_in_thread = None
    elif not isinstance(tag_in_thread, bool):
        raise ConfigError("router.tag_in_thread", f"must be true, false or 'auto', got "
                          f"{tag_in_thread!r}")
    router = RouterConfig(
        bundle=r.path("bundle", base),
        aliases=aliases,
        theta=r.number("theta", None, lo=-math.inf, allow_none=True),
        max_query_chars=r.int_("max_query_chars", 20_000),
        previous_turn_tags=r.bool_("previous_turn_tags", False),
        tag_in_thread=tag_in_thread,
        max_batch=r.int_("max_batch", 256, hi=100_000),
        learn_passthrough=r.bool_("learn_passthrough", False),
    )
    r.done()

    raw_backends = top.required("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise ConfigError("backends", "must be a non-empty array of tables ([[backends]])")
    backends: list[BackendConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw_backends):
        b = _Section(item, f"backends[{i}]")
        backends.append(_backend(b, base))
        b.done()
        name = backends[-1].name
        if name in seen:
            raise ConfigError(f"backends[{i}].name", f"{name!r} is already backends[{seen[name]}]")
        if name in aliases:
            raise ConfigError(f"backends[{i}].name", f"{name!r} is also a router alias")
        seen[name] = i

    f = _section(raw, "fallback", top)
    fallback = FallbackConfig(
        order=f.str_list("order", ()),
        max_attempts=f.int_("max_attempts", 2, hi=16),
        passthrough=f.bool_("passthrough", False),
    )
    for i, name in enumerate(fallback.order):
        if name not in seen:
            raise ConfigError(f"fallback.order[{i}]", f"{name!r} is not a backend name")
    f.done()

    lim = _section(raw, "limits", top)
    limits = LimitsConfig(
        max_body_bytes=lim.int_("max_body_bytes", 1 << 20),
        max_answer_bytes=lim.int_("max_answer_bytes", 32 << 20),
        max_concurrency=lim.int_("max_concurrency", 256),
        max_connections=lim.int_("max_connections", 512),
        keepalive_s=lim.positive("keepalive_s", 4.0),
    )
    lim.done()

    se = _section(raw, "sessions", top)
    sessions = SessionConfig(
        switch_margin=se.number("switch_margin", 0.5),
        max_sessions=se.int_("max_sessions", 10_000),
        ttl_s=se.positive("ttl_s", 3600.0),
        max_stored_responses=se.int_("max_stored_responses", 1000, lo=0, hi=10_000_000),
        stored_response_ttl_s=se.positive("stored_response_ttl_s", 3600.0),
    )
    se.done()

    fb = _section(raw, "feedback", top)
    feedback = FeedbackConfig(
        state_dir=fb.path("state_dir", base),
        fsync=fb.bool_("fsync", True),
        snapshot_every=fb.int_("snapshot_every", 50_000),
        decision_ttl_s=fb.positive("decision_ttl_s", 3600.0),
        max_decisions=fb.int_("max_decisions", 100_000),
    )
    fb.done()

    a = _section(raw, "admin", top)
    admin = AdminConfig(token_env=a.str_("token_env"))
    a.done()

    shared = _shared(top, feedback)
    shadow = _shadow(top, feedback, seen)
    auth = _auth(_section(raw, "auth", top), base)
    budgets = None
    if top.get("budgets") is not None:
        from tagrouter_fast.serve.policy.key_budgets import BudgetsConfig

        budgets = BudgetsConfig.from_dict(top.get("budgets"), base, feedback.state_dir,
                                          tuple(backends))

    top.done()
    return Config(
        router=router,
        backends=tuple(backends),
        server=server,
        fallback=fallback,
        limits=limits,
        sessions=sessions,
        feedback=feedback,
        admin=admin,
        auth=auth,
        shared=shared,
        budgets=budgets,
        shadow=shadow,
    )


def _auth(a: _Section, base: Path) -> AuthConfig:
    raw_keys = a.get("keys", [])
    if not isinstance(raw_keys, list):
        raise ConfigError("auth.keys", "must be an array of tables ([[auth.keys]])")
    keys = []
    for i, item in enumerate(raw_keys):
        try:
            keys.append(parse_key(item))
        except KeySpecError as e:
            raise ConfigError(f"auth.keys[{i}].{e.field}", e.problem) from None
    out = AuthConfig(
        keys=tuple(keys),
        keys_file=a.path("keys_file", base),
        keys_env=a.str_("keys_env"),
        allow_anonymous=a.bool_("allow_anonymous", False),
        anonymous_feedback=a.bool_("anonymous_feedback", False),
        anonymous_override=a.bool_("anonymous_override", False),
        anonymous_feedback_per_s=a.number("anonymous_feedback_per_s", None, allow_none=True),
        decision_secret_file=a.path("decision_secret_file", base),
        decision_secret_env=a.str_("decision_secret_env"),
    )
    a.done()
    for name in ("anonymous_feedback", "anonymous_override", "anonymous_feedback_per_s"):
        if getattr(out, name) not in (None, False) and not out.allow_anonymous:
            raise ConfigError(f"auth.{name}", "needs allow_anonymous = true")
    if out.anonymous_feedback_per_s is not None and out.anonymous_feedback_per_s <= 0:
        raise ConfigError("auth.anonymous_feedback_per_s", "must be > 0")
    if out.decision_secret_file is not None and out.decision_secret_env is not None:
        raise ConfigError("auth.decision_secret_env", "give decision_secret_file or "
                          "decision_secret_env, not both")
    return out


def _shared(top: _Section, feedback: FeedbackConfig) -> SharedConfig | None:
    if top.get("shared") is None:
        return None
    sh = _Section(top.get("shared"), "shared")
    url = sh.str_("redis_url", required=True)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ConfigError("shared.redis_url", f"must be a redis://, rediss:// or unix:// URL, "
                          f"got {url!r}")
    prefix = sh.str_("key_prefix", "tagrouter")
    if any(c.isspace() for c in prefix):
        raise ConfigError("shared.key_prefix", f"must not contain whitespace, got {prefix!r}")
    out = SharedConfig(
        redis_url=url,
        key_prefix=prefix,
        refresh_ms=sh.int_("refresh_ms", 50, lo=1, hi=60_000),
        pubsub=sh.bool_("pubsub", True),
        timeout_s=sh.positive("timeout_s", 1.0),
        share_decisions=sh.bool_("share_decisions", True),
    )
    sh.done()
    if feedback.state_dir is None:
        # The local journal is what covers Redis outages: without it an outcome acknowledged
        # while Redis is down would live in memory only.
        raise ConfigError("shared", "needs [feedback] state_dir (the local journal that keeps "
                          "outcomes while Redis is unavailable)")
    return out


#: Longest backend name: it travels in a response header and a metric label.
MAX_NAME_CHARS = 200


def _check_name(key: str, name: str) -> None:
    """A backend name goes out in the ``x-tagrouter-model`` header (latin-1, one line), in
    metric labels and log lines: control characters (CR/LF would split the header), characters
    a header cannot carry and surrounding blanks (a client would read another name) are
    refused here, not found in every response."""
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ConfigError(key, f"must not contain control characters (found {bad!r}), got "
                          f"{name!r}")
    if name != name.strip():
        raise ConfigError(key, f"must not start or end with a blank, got {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(key, f"must be at most {MAX_NAME_CHARS} characters, got {len(name)}")
    try:
        name.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(key, f"must be latin-1 text (it is sent in a response header), got "
                          f"{name!r}") from None


#: What a backend may speak (``protocol``).
PROTOCOLS = ("openai", "anthropic")


def _backend(b: _Section, base: Path | None = None) -> BackendConfig:
    name = b.str_("name", required=True)
    _check_name(b.key("name"), name)
    url = b.str_("base_url", required=True)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(b.key("base_url"), f"must be an http(s) URL, got {url!r}")
    return BackendConfig(
        name=name,
        base_url=url.rstrip("/"),
        model=b.str_("model", name),
        api_key_env=b.str_("api_key_env"),
        timeout_s=b.positive("timeout_s", 60.0),
        stream_idle_timeout_s=b.positive("stream_idle_timeout_s", 60.0),
        connect_timeout_s=b.positive("connect_timeout_s", 5.0),
        cost=b.number("cost", None, allow_none=True),
        protocol=_protocol(b),
        tools=b.bool_("tools", True),
        vision=b.bool_("vision", True),
        json_schema=b.bool_("json_schema", True),
        max_context_tokens=_optional_int(b, "max_context_tokens"),
        max_output_tokens=_optional_int(b, "max_output_tokens"),
        tokenizer=b.path("tokenizer", base or Path.cwd()),
        price=_price(b),
    )


def _protocol(b: _Section) -> str:
    v = b.get("protocol", "openai")
    if v not in PROTOCOLS:
        raise ConfigError(b.key("protocol"), f"must be one of {', '.join(PROTOCOLS)}, got {v!r}")
    return str(v)


def _optional_int(b: _Section, name: str) -> int | None:
    return None if b.get(name) is None else b.int_(name, 1)


def _price(b: _Section) -> Price | None:
    raw = b.get("price")
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) != {"input_per_1k", "output_per_1k"}:
        raise ConfigError(b.key("price"), "must be a table with exactly input_per_1k and "
                          f"output_per_1k (USD per 1,000 tokens), got {raw!r}")
    try:
        return Price(raw["input_per_1k"], raw["output_per_1k"])
    except ValueError as e:
        raise ConfigError(b.key("price"), str(e)) from None


def backend_from_dict(raw: Mapping[str, Any], where: str = "body") -> BackendConfig:
    """A backend described in an admin request, checked like a ``[[backends]]`` table."""
    b = _Section(raw, where)
    out = _backend(b)
    b.done()
    return out


def _shadow(top: _Section, feedback: FeedbackConfig,
            backends: Mapping[str, int]) -> ShadowConfig | None:
    """``[shadow]`` (`ShadowConfig.from_dict` checks its own keys), and what it needs of the rest
    of the config: the default model is a backend, and a state directory holds its files."""
    if top.get("shadow") is None:
        return None
    from tagrouter_fast.serve.shadow.config import ShadowConfig

    cfg = ShadowConfig.from_dict(top.get("shadow"))
    if cfg.default_model not in backends:
        raise ConfigError("shadow.default_model", f"{cfg.default_model!r} is not a backend "
                          f"name (backends: {sorted(backends)})")
    if feedback.state_dir is None:
        # Decisions, judged pairs and the spend ledger live next to the outcome journal, and
        # the judged outcomes are learned through it.
        raise ConfigError("shadow", "needs [feedback] state_dir (where the shadow files and "
                          "the learned outcomes live)")
    return cfg
