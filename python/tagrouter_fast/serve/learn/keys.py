"""Who may use the gateway: client keys, their scopes, per-key feedback rate limits.

A client key is a random secret that a client sends as ``Authorization: Bearer <key>`` (the
OpenAI SDK's ``api_key``). The gateway holds only its sha256 (a keys file leaks no key), with an
id that journal lines and decision tokens name, and scopes:

- ``route``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/route``, ``/v1/models``;
- ``feedback``: ``/v1/feedback``, for decisions issued to this key only;
- ``override``: choose the operating point per request (``theta`` / ``llm_share``), or have a
  passthrough answer (the client chose the model) scored;
- ``admin``: the ``/admin`` endpoints.

A plain sha256 (no salt, no slow hash) is enough because keys are 256-bit random secrets: a
slow hash defends guessable passwords, and nothing guesses 2**256. Keys made by `new_key` read
``tr_<id>.<secret>``, so the gateway finds the key by its id and compares the hashes in constant
time; a key of another form (a secret from your own vault) is found by its hash.

>>> secret, key = new_key("app1", ["route", "feedback"], feedback_per_s=5)
>>> secret.startswith("tr_app1.") and key.line().startswith('{"id":"app1","hash":"sha256:')
True
>>> ring = Keyring([parse_key(json.loads(key.line()))])
>>> ring.authenticate(f"Bearer {secret}").id
'app1'
>>> ring.authenticate("Bearer tr_app1.guess")
Traceback (most recent call last):
...
tagrouter_fast.serve.learn.keys.Unauthenticated: invalid API key
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tagrouter_fast.serve.config import AuthConfig

__all__ = [
    "ADMIN",
    "ANONYMOUS",
    "ADMIN_TOKEN_ID",
    "FEEDBACK",
    "OVERRIDE",
    "ROUTE",
    "SCOPES",
    "ClientKey",
    "Forbidden",
    "KeySpecError",
    "Keyring",
    "Unauthenticated",
    "hash_secret",
    "announce",
    "keyring_from_config",
    "new_key",
    "parse_key",
    "parse_keys",
]

ROUTE, FEEDBACK, OVERRIDE, ADMIN = "route", "feedback", "override", "admin"
SCOPES = (ROUTE, FEEDBACK, OVERRIDE, ADMIN)
#: The id of callers without a key (``[auth] allow_anonymous``): they share one principal, so
#: one anonymous caller may score another's decisions (documented in docs/serving.md).
ANONYMOUS = "anonymous"
#: The id of the ``[admin] token_env`` bearer token, which holds every scope.
ADMIN_TOKEN_ID = "admin-token"
_RESERVED = frozenset({ANONYMOUS, ADMIN_TOKEN_ID})
#: Key ids travel in decision tokens and journal lines: short, and free of the ``.`` that ends
#: the id inside a ``tr_<id>.<secret>`` key.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})")
KEY_PREFIX = "tr_"


class KeySpecError(ValueError):
    """A key record is invalid; ``field`` names the offending field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


class Unauthenticated(Exception):
    """No key, or one the gateway does not know (401). ``code`` is the error's code."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.code = code


class Forbidden(Exception):
    """A known key without the scope the request needs (403)."""

    def __init__(self, message: str, code: str = "missing_scope") -> None:
        super().__init__(message)
        self.code = code


# ==== Keys ====


def hash_secret(secret: str) -> str:
    """The stored form of a key: ``sha256:<hex of sha256(secret as UTF-8)>``."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ClientKey:
    """One key as the gateway holds it: never the secret, only its sha256."""

    id: str
    digest: bytes
    scopes: frozenset[str]
    #: Feedback posts per second (a token bucket refilled at this rate); None: unlimited.
    feedback_per_s: float | None = None
    #: The bucket's size: posts allowed at once after a quiet spell.
    feedback_burst: int | None = None

    def line(self) -> str:
        """The key's line in a keys file (one JSON object per line)."""
        obj: dict[str, Any] = {
            "id": self.id, "hash": "sha256:" + self.digest.hex(),
            "scopes": [s for s in SCOPES if s in self.scopes],
        }
        if self.feedback_per_s is not None:
            obj["feedback_per_s"] = self.feedback_per_s
        if self.feedback_burst is not None:
            obj["feedback_burst"] = self.feedback_burst
        return json.dumps(obj, separators=(",", ":"))


def _check_id(key_id: Any) -> str:
    if not isinstance(key_id, str) or not _ID_RE.fullmatch(key_id):
        raise KeySpecError("id", f"must be 1-64 characters of A-Z a-z 0-9 _ -, got {key_id!r}")
    if key_id in _RESERVED:
        raise KeySpecError("id", f"{key_id!r} is reserved")
    return key_id


def _check_scopes(scopes: Any) -> frozenset[str]:
    if isinstance(scopes, str) or not isinstance(scopes, Sequence) or not scopes:
        raise KeySpecError("scopes", f"must be a non-empty list of {list(SCOPES)}, got {scopes!r}")
    for s in scopes:
        if s not in SCOPES:
            raise KeySpecError("scopes", f"unknown scope {s!r} (known: {', '.join(SCOPES)})")
    return frozenset(scopes)


def _check_rate(per_s: Any, burst: Any) -> tuple[float | None, int | None]:
    if per_s is not None and (
        isinstance(per_s, bool) or not isinstance(per_s, (int, float))
        or not math.isfinite(per_s) or per_s <= 0
    ):
        raise KeySpecError("feedback_per_s", f"must be a number > 0, got {per_s!r}")
    if burst is not None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise KeySpecError("feedback_burst", f"must be an integer >= 1, got {burst!r}")
        if per_s is None:
            raise KeySpecError("feedback_burst", "needs feedback_per_s")
    return (None if per_s is None else float(per_s)), burst


def parse_key(obj: Any) -> ClientKey:
    """One key record (``{"id", "hash", "scopes", "feedback_per_s"?, "feedback_burst"?}``).

    Raises:
        KeySpecError: naming the field.
    """
    if not isinstance(obj, Mapping):
        raise KeySpecError("key", f"must be an object, got {type(obj).__name__}")
    extra = sorted(set(map(str, obj)) - {"id", "hash", "scopes", "feedback_per_s",
                                         "feedback_burst"})
    if extra:
        raise KeySpecError(extra[0], "unknown key")
    key_id = _check_id(obj.get("id"))
    h = obj.get("hash")
    m = _HASH_RE.fullmatch(h) if isinstance(h, str) else None
    if m is None:
        # A secret pasted where its hash belongs must never be accepted (nor echoed back).
        raise KeySpecError("hash", "must be sha256:<64 lowercase hex> (the output of "
                           "`tagrouter keys new`), never the key itself")
    per_s, burst = _check_rate(obj.get("feedback_per_s"), obj.get("feedback_burst"))
    return ClientKey(key_id, bytes.fromhex(m.group(1)), _check_scopes(obj.get("scopes")),
                     per_s, burst)


def parse_keys(text: str, where: str) -> list[ClientKey]:
    """Keys from a keys file or variable: one JSON object per line (blank lines and ``#``
    comments skipped), or one JSON array of them (handy in a single-line variable).

    Raises:
        KeySpecError: the field named with its place, e.g. ``keys.jsonl:3.scopes``.
    """
    stripped = text.strip()
    items: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            arr = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise KeySpecError(where, f"not a JSON array of keys ({e})") from None
        items = [(f"{where}[{i}]", x) for i, x in enumerate(arr)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                items.append((f"{where}:{n}", json.loads(s)))
            except json.JSONDecodeError as e:
                raise KeySpecError(f"{where}:{n}", f"not a JSON object ({e.msg})") from None
    out: list[ClientKey] = []
    for place, obj in items:
        try:
            out.append(parse_key(obj))
        except KeySpecError as e:
            raise KeySpecError(f"{place}.{e.field}", e.problem) from None
    return out


def new_key(
    key_id: str, scopes: Iterable[str], *, feedback_per_s: float | None = None,
    feedback_burst: int | None = None,
) -> tuple[str, ClientKey]:
    """A fresh key: ``(secret, its record)``. The secret is shown once; only the record
    (its hash) is kept.

    Raises:
        KeySpecError: a bad id, scope or rate.
    """
    _check_id(key_id)
    scope_set = _check_scopes(list(scopes))
    per_s, burst = _check_rate(feedback_per_s, feedback_burst)
    secret = f"{KEY_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"
    digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return secret, ClientKey(key_id, digest, scope_set, per_s, burst)


# ==== Rate limits ====


@dataclass
class _Bucket:
    """Token bucket: ``burst`` posts at once, refilled at ``rate`` per second."""

    rate: float
    burst: float
    tokens: float
    t: float

    def take(self, now: float) -> float:
        """0.0 when a post may go now (and takes it), else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# ==== The keyring ====


@dataclass
class Keyring:
    """The keys a gateway accepts, and how a request becomes one of them.

    Args:
        keys: the client keys (unique ids and hashes).
        anonymous: the principal of requests without a key, or None when they are refused.
        admin_token: the ``[admin] token_env`` secret: a principal with every scope.
        clock: monotonic seconds, for the rate limits (tests pass a fake).

    Raises:
        KeySpecError: two keys with one id or one hash.
    """

    keys: Sequence[ClientKey] = ()
    anonymous: ClientKey | None = None
    admin_token: bytes | None = None
    clock: Callable[[], float] = time.monotonic
    _by_id: dict[str, ClientKey] = field(init=False, repr=False)
    _by_digest: dict[bytes, ClientKey] = field(init=False, repr=False)
    _admin: ClientKey | None = field(init=False, repr=False)
    _buckets: dict[str, _Bucket] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id, self._by_digest = {}, {}
        for k in self.keys:
            if k.id in self._by_id:
                raise KeySpecError("id", f"{k.id!r} is given twice")
            if k.digest in self._by_digest:
                raise KeySpecError("hash", f"keys {self._by_digest[k.digest].id!r} and {k.id!r} "
                                   "have the same hash (the same secret)")
            self._by_id[k.id] = k
            self._by_digest[k.digest] = k
        self._admin = None
        if self.admin_token is not None:
            self._admin = ClientKey(ADMIN_TOKEN_ID, hashlib.sha256(self.admin_token).digest(),
                                    frozenset(SCOPES))
        self._buckets = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def any_with(self, scope: str) -> bool:
        """Whether some key (the admin token included) holds ``scope``."""
        return self._admin is not None or any(scope in k.scopes for k in self.keys)

    def authenticate(self, authorization: str | None, *, anonymous: bool = True) -> ClientKey:
        """The principal of a request from its ``Authorization`` header.

        Without a header: the anonymous principal when allowed (and ``anonymous``). With
        anonymous callers allowed, a bearer value that is no key of this gateway and does not
        look like one (the OpenAI SDK insists on *some* api_key: "EMPTY", "unused") is
        anonymous too; a ``tr_`` key that fails is always refused, so a mistyped key is told.

        Raises:
            Unauthenticated: no key where one is needed, or a wrong one.
        """
        anon = self.anonymous if anonymous else None
        if not authorization:
            if anon is not None:
                return anon
            raise Unauthenticated("missing API key: send Authorization: Bearer <key>",
                                  "missing_api_key")
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise Unauthenticated("Authorization: must be 'Bearer <key>'")
        digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()
        # Constant-time comparisons: how long a check takes says nothing about how much of a
        # hash matched. The candidate is found by the (public) id inside our keys, else by the
        # hash itself (a dict lookup on a hash of a secret leaks nothing usable).
        admin = self._admin
        if admin is not None and hmac.compare_digest(digest, admin.digest):
            return admin
        cand = None
        if value.startswith(KEY_PREFIX):
            cand = self._by_id.get(value[len(KEY_PREFIX):].partition(".")[0])
        if cand is None:
            cand = self._by_digest.get(digest)
        if cand is not None and hmac.compare_digest(digest, cand.digest):
            return cand
        if anon is not None and not value.startswith(KEY_PREFIX):
            return anon
        raise Unauthenticated("invalid API key")

    @staticmethod
    def require(key: ClientKey, scope: str, what: str) -> None:
        """Raises `Forbidden` unless ``key`` holds ``scope`` (``what`` names the request)."""
        if scope not in key.scopes:
            who = "anonymous callers" if key.id == ANONYMOUS else f"key {key.id!r}"
            raise Forbidden(f"{what} needs the {scope!r} scope, which {who} do"
                            f"{'' if key.id == ANONYMOUS else 'es'} not have")

    def feedback_wait(self, key: ClientKey) -> float:
        """Charges one feedback post to ``key``'s bucket: 0.0 when it may go, else the seconds
        to wait (the post is refused, nothing taken). Called on the event loop only."""
        if key.feedback_per_s is None:
            return 0.0
        now = self.clock()
        b = self._buckets.get(key.id)
        if b is None:
            burst = float(key.feedback_burst or max(1, math.ceil(key.feedback_per_s)))
            b = self._buckets[key.id] = _Bucket(key.feedback_per_s, burst, burst, now)
        return b.take(now)


def announce(ring: Keyring, log: Any) -> None:
    """Says at start-up who may call: loudly when requests without a key are served. Called
    once the gateway has started, so that a start-up failure stays one line."""
    anonymous = ring.anonymous
    if anonymous is not None:
        # Loud on purpose: anyone who can reach the port may route (and maybe teach).
        log.warning(
            "[auth] allow_anonymous = true: requests WITHOUT A KEY are served (%s)%s",
            ", ".join(s for s in SCOPES if s in anonymous.scopes),
            "; anonymous callers may post outcomes that change everyone's routing"
            if FEEDBACK in anonymous.scopes else "",
        )
    log.info("auth: %d client key(s)%s", len(ring),
             ", admin token on" if ring.admin_token is not None else "")


def keyring_from_config(
    auth: AuthConfig, admin_token: bytes | None
) -> Keyring:
    """The gateway's keyring: the config's keys, its keys file and keys variable (read now),
    the anonymous principal when allowed, and the admin token.

    Raises:
        ConfigError: naming the key: an unreadable file, an unset variable, a bad record (with
            its line), a duplicate id or hash, or no way in at all (no key and no anonymous
            access: every ``/v1`` request would get 401).
    """
    from tagrouter_fast.serve.config import ConfigError

    keys = list(auth.keys)
    sources: list[tuple[str, str]] = []
    if auth.keys_file is not None:
        try:
            sources.append((auth.keys_file.read_text("utf-8"), str(auth.keys_file)))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("auth.keys_file", f"cannot read {auth.keys_file} ({e})") from None
    if auth.keys_env is not None:
        text = os.environ.get(auth.keys_env)
        if text is None:
            raise ConfigError("auth.keys_env", f"environment variable {auth.keys_env} is not set")
        sources.append((text, f"${auth.keys_env}"))
    for text, where in sources:
        try:
            keys += parse_keys(text, where)
        except KeySpecError as e:
            raise ConfigError("auth.keys_file" if where == str(auth.keys_file) else
                              "auth.keys_env", str(e)) from None
    anonymous = None
    if auth.allow_anonymous:
        scopes = {ROUTE}
        if auth.anonymous_feedback:
            scopes.add(FEEDBACK)
        if auth.anonymous_override:
            scopes.add(OVERRIDE)
        anonymous = ClientKey(ANONYMOUS, b"", frozenset(scopes), auth.anonymous_feedback_per_s)
    elif not keys:
        raise ConfigError(
            "auth", "no client keys and no anonymous access: every /v1 request would be "
            "refused. Add keys (keys_file, keys_env or [[auth.keys]]; `tagrouter keys new` "
            "makes one) or set allow_anonymous = true"
        )
    try:
        ring = Keyring(keys, anonymous, admin_token)
    except KeySpecError as e:
        raise ConfigError(f"auth.keys.{e.field}", e.problem) from None
    return ring
