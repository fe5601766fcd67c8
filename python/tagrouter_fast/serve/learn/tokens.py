"""Decision tokens: the decision id a client posts feedback with carries the decision itself,
signed, so that any replica can count the outcome at once without looking anything up.

A token holds what the outcome needs and who may post it: a random decision id (the journal's
and Redis' idempotency key), the issuing key's id, the model that answered, the query's tags, the
time of issue and the lifetime. It is signed with HMAC-SHA256 under a secret every replica shares
(``[auth] decision_secret_file`` / ``decision_secret_env``, or one generated in the state
directory for a single gateway). It is signed, not encrypted: a client can read the model and
tags of its own decision (both are in the explanation it may ask for anyway), but cannot change
a bit of it.

Layout (version 1), base64url without padding after the ``trd_`` prefix::

    u8 version | 12-byte decision id | varint issued (ms since the epoch) | varint lifetime (s)
    | 4-byte tag-table fingerprint | str key id | str model | varint n | n tags | 16-byte MAC

where ``str`` is a varint length and UTF-8 bytes, and a tag is ``varint (i + 1)`` for entry
``i`` of the tag table (the bundle store's tags: every aligned tag), or ``0`` and a ``str``. The
MAC is the first 16 bytes (128 bits) of HMAC-SHA256 over a domain prefix and all that precedes
it. A decision on two aligned tags is about 80 characters; `issue` refuses to make one over
`MAX_TOKEN_CHARS` (only possible with dozens of long unaligned tags), so the header always
stays far below the 4-8 KB that proxies allow for all response headers together.

>>> codec = DecisionTokens([b"s" * 32], ["Poetry Writing", "Creative Writing"], ttl_s=3600,
...                        clock=lambda: 1_800_000_000.0)
>>> token = codec.issue("app1", "small", ["Poetry Writing", "Creative Writing"])
>>> len(token) < 100, token.startswith("trd_")
(True, True)
>>> c = codec.verify(token)
>>> c.key, c.model, c.tags, c.expires - c.issued
('app1', 'small', ('Poetry Writing', 'Creative Writing'), 3600.0)
>>> try:
...     codec.verify(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
... except TokenError as e:
...     print(e.status, e.code)
404 forged_decision
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_TOKEN_CHARS",
    "PREFIX",
    "SECRET_FILE",
    "DecisionClaims",
    "DecisionTokens",
    "ExpiredToken",
    "ForgedToken",
    "NotAToken",
    "StaleToken",
    "TokenError",
    "load_secrets",
    "new_secret",
]

PREFIX = "trd_"
VERSION = 1
NONCE_BYTES = 12
MAC_BYTES = 16
#: Longest token `issue` makes; a longer decision gets no token (it cannot be scored).
MAX_TOKEN_CHARS = 2048
#: The name of the secret generated in the state directory when none is configured.
SECRET_FILE = "decision-secret"
#: Shortest secret accepted: 32 characters (e.g. ``tagrouter keys secret``: 43 base64url
#: characters, 256 bits).
MIN_SECRET_CHARS = 32
#: Earlier tag tables kept (a bundle reload makes a new one): their tokens still verify.
OLD_TABLES = 8
_DOMAIN = b"tagrouter decision token v1\x00"
_SPLIT = re.compile(r"[\s,]+")


class TokenError(Exception):
    """A decision id that cannot be scored; ``status`` and ``code`` are the gateway's answer."""

    status = 404
    code = "unknown_decision"


class NotAToken(TokenError):
    """Not a decision token at all (e.g. the id of an answer that cannot be scored)."""


class ForgedToken(TokenError):
    """Shaped like a token, but not signed under any secret this gateway holds."""

    code = "forged_decision"


class ExpiredToken(TokenError):
    """Genuine, but past its expiry."""

    status = 410
    code = "expired_decision"


class StaleToken(TokenError):
    """Genuine, but issued on a tag table this gateway no longer has (a bundle reload)."""

    status = 410
    code = "stale_decision"


@dataclass(frozen=True)
class DecisionClaims:
    """What a verified token proves: this gateway (or a replica sharing its secret) decided
    ``model`` for a query with ``tags``, for the caller with key ``key``, at ``issued``."""

    id: str
    key: str
    model: str
    tags: tuple[str, ...]
    issued: float
    expires: float


# ==== Varints ====


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_str(out: bytearray, s: str) -> None:
    raw = s.encode("utf-8", "surrogatepass")
    _put_varint(out, len(raw))
    out += raw


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise ValueError("truncated varint")
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def str_(self) -> str:
        return self.take(self.varint()).decode("utf-8", "surrogatepass")


def _fingerprint(tags: Sequence[str]) -> bytes:
    raw = json.dumps(list(tags), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()[:4]


# ==== The codec ====


class DecisionTokens:
    """Issues and verifies decision tokens.

    Args:
        secrets: the first signs; every one verifies (rotation: put the new secret first, keep
            the old one after it for one ``ttl_s``, then drop it).
        tags: the tag table (the bundle store's tags, identical on every replica): its tags
            travel as small numbers.
        ttl_s: how long a token may be scored.
        clock: wall-clock seconds (tests pass a fake).

    Raises:
        ValueError: no secret, or a short one.
    """

    def __init__(
        self, secrets: Sequence[bytes], tags: Sequence[str], *, ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("at least one decision secret is needed")
        for s in secrets:
            if len(s) < MIN_SECRET_CHARS:
                raise ValueError(f"a decision secret must be at least {MIN_SECRET_CHARS} "
                                 f"bytes, got {len(s)}")
        self._secrets = [bytes(s) for s in secrets]
        self._ttl = max(1, int(round(ttl_s)))
        self._clock = clock
        self._tables: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self._current: tuple[bytes, dict[str, int]] = (b"", {})
        self.use_tags(tags)

    def use_tags(self, tags: Sequence[str]) -> None:
        """Makes ``tags`` the table new tokens use; tokens on the previous tables still verify
        (up to `OLD_TABLES` of them)."""
        table = tuple(tags)
        fp = _fingerprint(table)
        self._tables[fp] = table
        self._tables.move_to_end(fp)
        while len(self._tables) > OLD_TABLES + 1:
            self._tables.popitem(last=False)
        # One reference swapped whole (an admin reload runs beside requests): `issue` never
        # pairs one table's fingerprint with another's numbers. The table is verifiable first.
        self._current = (fp, {t: i for i, t in enumerate(table)})

    def _mac(self, secret: bytes, body: bytes) -> bytes:
        return hmac.digest(secret, _DOMAIN + body, "sha256")[:MAC_BYTES]  # one-shot, in C

    def issue(self, key: str, model: str, tags: Sequence[str]) -> str | None:
        """A signed token for the decision, or None when it would exceed `MAX_TOKEN_CHARS`."""
        fp, index = self._current
        out = bytearray((VERSION,))
        out += secrets.token_bytes(NONCE_BYTES)
        _put_varint(out, int(self._clock() * 1000))
        _put_varint(out, self._ttl)
        out += fp
        _put_str(out, key)
        _put_str(out, model)
        _put_varint(out, len(tags))
        for t in tags:
            i = index.get(t)
            if i is not None:
                _put_varint(out, i + 1)
            else:
                out.append(0)
                _put_str(out, t)
        body = bytes(out)
        raw = body + self._mac(self._secrets[0], body)
        if (len(raw) * 4 + 2) // 3 + len(PREFIX) > MAX_TOKEN_CHARS:
            return None
        return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def verify(self, token: str, now: float | None = None) -> DecisionClaims:
        """The claims of a genuine, unexpired token.

        Raises:
            NotAToken: not a decision token (404 ``unknown_decision``).
            ForgedToken: no secret of this gateway signed it (404 ``forged_decision``).
            ExpiredToken: past its expiry (410 ``expired_decision``).
            StaleToken: made on a tag table this gateway no longer has (410
                ``stale_decision``).
        """
        if not token.startswith(PREFIX):
            raise NotAToken("decision_id: not a decision token of this gateway (answers that "
                            "cannot be scored carry a plain id)")
        text = token[len(PREFIX):]
        if len(text) > MAX_TOKEN_CHARS:
            raise _forged()
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise _forged() from None
        if len(raw) < 1 + NONCE_BYTES + MAC_BYTES or raw[0] != VERSION:
            raise _forged()
        body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if not any(hmac.compare_digest(self._mac(s, body), mac) for s in self._secrets):
            raise _forged()
        # Signed by us: what follows was written by `issue`, so a decoding error is a bug.
        r = _Reader(body, 1)
        nonce = r.take(NONCE_BYTES)
        issued = r.varint() / 1000.0
        lifetime = r.varint()
        fp = r.take(4)
        key, model = r.str_(), r.str_()
        table = self._tables.get(fp)
        n = r.varint()
        tags: list[str] = []
        stale = table is None
        for _ in range(n):
            i = r.varint()
            if i == 0:
                tags.append(r.str_())
            elif table is not None and i <= len(table):
                tags.append(table[i - 1])
            else:
                stale = True
        expires = issued + lifetime
        if (self._clock() if now is None else now) >= expires:
            raise ExpiredToken(f"decision_id: the decision expired (its outcome was due within "
                               f"{lifetime} s)")
        if stale:
            raise StaleToken("decision_id: decided on a store this gateway no longer routes with "
                             "(the bundle was reloaded)")
        return DecisionClaims(nonce.hex(), key, model, tuple(tags), issued, expires)


def _forged() -> ForgedToken:
    return ForgedToken("decision_id: not signed by this gateway (tampered, made up, or signed "
                       "with a secret it no longer holds)")


# ==== Secrets ====


def new_secret() -> str:
    """A fresh decision secret: 256 random bits, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def _split(text: str, where: str) -> list[bytes]:
    from tagrouter_fast.serve.config import ConfigError

    parts = [p for p in _SPLIT.split(text.strip()) if p]
    if not parts:
        raise ConfigError(where, "holds no secret")
    for i, p in enumerate(parts):
        if len(p) < MIN_SECRET_CHARS:
            raise ConfigError(where, f"secret {i + 1} has {len(p)} characters; at least "
                              f"{MIN_SECRET_CHARS} are needed (`tagrouter keys secret` makes one)")
    return [p.encode("utf-8") for p in parts]


def load_secrets(
    *, file: Path | None, env: str | None, state_dir: Path | None, replicas: bool
) -> tuple[list[bytes], str]:
    """The decision secrets, and where they came from (for the start-up log).

    From ``file`` or the environment variable ``env``: one or more secrets separated by
    whitespace or commas, the first signing. Without either, a single gateway keeps one it
    generates in ``state_dir`` (created with mode 0600 on first start); replicas
    (``replicas``) must share one, so it is an error; without a state directory (feedback off)
    the secret is a fresh random one held in memory.

    Raises:
        ConfigError: naming the key: unreadable or short secret, unset variable, replicas
            without a configured secret.
    """
    from tagrouter_fast.serve.config import ConfigError

    if file is not None:
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("auth.decision_secret_file", f"cannot read {file} ({e})") from None
        return _split(text, f"auth.decision_secret_file ({file})"), str(file)
    if env is not None:
        text = os.environ.get(env, "")
        if not text.strip():
            raise ConfigError("auth.decision_secret_env", f"environment variable {env} is not "
                              "set")
        return _split(text, f"auth.decision_secret_env ({env})"), f"${env}"
    if replicas:
        raise ConfigError(
            "auth.decision_secret_file",
            "replicas sharing counts ([shared]) must share one decision secret, so that each "
            "verifies the others' decisions: set decision_secret_file or decision_secret_env "
            "(`tagrouter keys secret` makes one)",
        )
    if state_dir is None:
        return [new_secret().encode("ascii")], "memory (feedback is off)"
    path = state_dir / SECRET_FILE
    if not path.exists():
        _create_secret(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("feedback.state_dir", f"cannot read {path} ({e})") from None
    return _split(text, f"feedback.state_dir ({path})"), str(path)


def _create_secret(path: Path) -> None:
    """Writes a new secret whole or not at all (temp file, fsync, link): two gateways starting
    on one directory end up with the same one, and a crash never leaves half a secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (new_secret() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process got there first: theirs wins
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
