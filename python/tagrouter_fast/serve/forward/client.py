"""The gateway's one HTTP client for upstream calls: aiohttp's pooled connections.

aiohttp was measured against httpx on the shipped fake backend (``benches/http_clients.py``:
one request at a time on a kept-alive connection, interleaved): p50 0.28 ms vs 0.85 ms for a
JSON answer, p99 4.4 vs 6.5 ms, a third of the client CPU per request (llhttp parses in C;
httpcore's HTTP/1.1 is pure Python and its pool walks every connection per request). Its
faults are classified here, once, into our kinds (`faults.classify`): a refused connection is
``connect``, never a timeout.

Connections serve every user of the gateway: no cookies are kept, and proxy variables of the
environment are ignored (the upstreams are the config's).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from tagrouter_fast.serve.forward.faults import CLASSIFIED, classify

__all__ = ["ClientPool", "Timeouts", "Upstream", "trust_store"]


def trust_store() -> ssl.SSLContext:
    """The CAs upstream TLS certificates are checked against: ``SSL_CERT_FILE`` or
    ``SSL_CERT_DIR`` when set, else certifi's bundle (what the gateway trusted when its client
    was httpx: a slim container without a system store still reaches a public API), else the
    system's."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi comes with the serve extra
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


@dataclass(frozen=True)
class Timeouts:
    """Per-phase limits of one call, in seconds. The call's own deadline is the caller's
    (`anyio.fail_after` around it): these bound each phase inside it."""

    #: To open a TCP (and TLS) connection.
    connect_s: float
    #: Between two reads of the answer: for a stream, how long it may stay silent.
    read_s: float
    #: To get a connection at all (from the pool, or a new one).
    pool_s: float

    def aiohttp(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=self.pool_s,
                                     sock_connect=self.connect_s, sock_read=self.read_s)


class Upstream:
    """An upstream answer with its body still to read. `close` gives the connection back:
    kept alive when the body was read to its end, closed otherwise (a half-read connection is
    never reused). Reading raises `BackendError` (classified)."""

    def __init__(self, response: aiohttp.ClientResponse, backend: str) -> None:
        self._response = response
        self._backend = backend
        self._closed = False
        self.status = response.status

    def header(self, name: str, default: str) -> str:
        """A response header (the first, if repeated), or ``default``."""
        return self._response.headers.get(name, default)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, decoded (gzip and deflate, which the client offers)."""
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except CLASSIFIED as e:
            raise classify(self._backend, e) from e

    async def close(self) -> None:
        """Idempotent; does not wait (no shield needed when cancelled)."""
        if self._closed:
            return
        self._closed = True
        r = self._response
        if r.content.at_eof():
            r.release()
        else:
            r.close()


class ClientPool:
    """The app's pooled upstream connections (at most ``max_connections`` in all, idle ones
    closed after ``keepalive_s``) and a count of the calls holding one, so that a leaked answer
    (a stream never closed) is visible. The aiohttp session is made on first use, in the
    running event loop."""

    def __init__(self, max_connections: int, keepalive_s: float = 4.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.ssl_context = ssl_context or trust_store()
        self.in_flight = 0
        self._session: aiohttp.ClientSession | None = None

    def lease(self) -> Callable[[], None]:
        """Counts a call in; returns the callable that counts it out (idempotent)."""
        self.in_flight += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_flight -= 1

        return release

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=0, keepalive_timeout=self.keepalive_s,
            ssl=self.ssl_context,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Cookies are never kept: the pooled connections serve every user of the gateway.
            cookie_jar=aiohttp.DummyCookieJar(),
            # The upstreams are named in the gateway's config: no proxy variables.
            trust_env=False,
            auto_decompress=True,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def send(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts, *, backend: str = "upstream") -> Upstream:
        """The answer, its body still to read (`Upstream.chunks`, then `Upstream.close`).

        Raises:
            BackendError: the call failed before an answer (``backend`` names it).
        """
        session = self._session or self._open()
        try:
            resp = await session.request(
                method, url, data=body if method != "GET" else None, headers=dict(headers),
                allow_redirects=False, timeout=timeouts.aiohttp(), compress=None,
            )
        except CLASSIFIED as e:
            raise classify(backend, e) from e
        return Upstream(resp, backend)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
