"""An httpx transport whose connections and HTTP/1.1 wire are aiohttp's.

The gateway speaks to backends in httpx's types (`httpx.Request` with its per-phase timeouts,
`httpx.Response`, httpx's exceptions: the fallback chain classifies faults by them); only the
transport underneath is aiohttp. httpcore's pure-Python HTTP/1.1 (h11) and its per-request pool
walk were 35% of the gateway's CPU at 64 requests in flight (py-spy); aiohttp parses with llhttp
in C and keeps idle connections in a per-host deque: CPU per request -35% in one A/B run.

Faults are mapped by us, phase by phase, so that the kinds the fallback chain tells apart stay
apart: a refused or unreachable connection is `httpx.ConnectError` (never a timeout), a
connect that runs out of time `httpx.ConnectTimeout`, a read that does `httpx.ReadTimeout`, a
connection dropped or a response that is not HTTP `httpx.RemoteProtocolError` /
`httpx.ReadError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]

# Hop-by-hop and framing headers: aiohttp writes its own from the body it sends.
_DROP_REQUEST = frozenset({"host", "content-length", "transfer-encoding", "connection",
                           "keep-alive", "accept-encoding"})
# The body reaches httpx already decoded (aiohttp's auto_decompress): its encoding and length
# headers no longer describe it, and httpx must not decode it a second time.
_DROP_RESPONSE = frozenset({"content-encoding", "content-length", "transfer-encoding"})


@contextlib.contextmanager
def _mapped(request: httpx.Request, *, reading: bool) -> Iterator[None]:
    """aiohttp's exceptions as httpx's, by the phase they happened in."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as e:
        raise httpx.ConnectTimeout(str(e) or "connect timed out", request=request) from e
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as e:
        # ServerTimeoutError is the per-read limit; a bare TimeoutError from inside aiohttp can
        # only be a read too (no total limit is set: the caller owns the call's deadline).
        raise httpx.ReadTimeout(str(e) or "read timed out", request=request) from e
    except aiohttp.ClientConnectorError as e:
        raise httpx.ConnectError(str(e) or "connection failed", request=request) from e
    except aiohttp.ServerDisconnectedError as e:
        raise httpx.RemoteProtocolError(
            str(e) or "server disconnected without a complete response", request=request
        ) from e
    except aiohttp.ClientResponseError as e:
        # aiohttp raises it for a response that does not parse as HTTP.
        raise httpx.RemoteProtocolError(f"invalid HTTP response: {e.message}",
                                        request=request) from e
    except aiohttp.ClientPayloadError as e:
        raise httpx.RemoteProtocolError(f"incomplete body: {e}", request=request) from e
    except (aiohttp.ClientOSError, ConnectionError) as e:
        err = httpx.ReadError if reading else httpx.WriteError
        raise err(str(e) or "connection reset", request=request) from e
    except aiohttp.ClientError as e:
        raise httpx.TransportError(f"{type(e).__name__}: {e}", request=request) from e


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp delivers it; closing it gives the connection back (kept alive
    when the body was read to its end, closed otherwise)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        with _mapped(self._request, reading=True):
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk

    async def aclose(self) -> None:
        r = self._response
        if r.content.at_eof():
            r.release()
        else:
            r.close()  # a half-read connection is never reused


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Pooled keep-alive connections: at most ``max_connections`` in all, idle ones closed after
    ``keepalive_s``. The aiohttp session is made on first use, in the running event loop."""

    def __init__(self, max_connections: int, keepalive_s: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._session: aiohttp.ClientSession | None = None

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

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        t = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None, connect=t.get("pool"), sock_connect=t.get("connect"),
            sock_read=t.get("read"),
        )
        headers = [(k, v) for k, v in request.headers.multi_items()
                   if k not in _DROP_REQUEST]
        body = request.content if request.method != "GET" else None
        with _mapped(request, reading=False):
            resp = await session.request(
                request.method, str(request.url), data=body, headers=headers,
                allow_redirects=False, timeout=timeout, compress=None,
            )
        v = resp.version or aiohttp.HttpVersion11
        return httpx.Response(
            status_code=resp.status,
            headers=[(k, v) for k, v in resp.raw_headers
                     if k.decode("latin-1").lower() not in _DROP_RESPONSE],
            stream=_Body(resp, request),
            extensions={"http_version": b"HTTP/%d.%d" % (v.major, v.minor),
                        "reason_phrase": (resp.reason or "").encode("latin-1")},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
