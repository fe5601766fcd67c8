"""The listening side of `tagrouter serve`: uvicorn's HTTP/1.1 protocol (httptools) with the
limits uvicorn does not have: a header timeout, a bound on client connections and one on the
size of a request's headers.

uvicorn (0.30 to at least 0.55) times out only idle keep-alive connections, and only after a
first response: a client that connects and sends its headers a byte at a time, or not at all,
holds its connection and its file descriptor for ever. With the descriptors gone, the process
can accept nobody, open no connection to a backend and write no journal. Its
``limit_concurrency`` answers 503 once headers are complete, which a slow client never reaches.

Here each connection must complete a request's headers within ``header_timeout_s`` of
connecting (or of its first byte, on a kept-alive connection; uvicorn's keep-alive timeout
covers the idle time before that byte), else it gets a 408 and is closed. At most
``max_connections`` are open: one more pushes out the connection that has waited longest for a
request (idle, or still sending headers; a request in flight is never cut), and when every
connection has a request in flight the newcomer gets a 503. And httptools buffers a header of
any length (a 200 MiB header line: 440 MB of RSS), so the bytes received while a request's
headers are incomplete are counted: past ``max_header_bytes`` the client gets a 431 and the
connection is closed. Every answer is in the gateway's error shape, uvicorn's 400 for bytes
that are not HTTP included; after a 408, 431 or 400 the connection is half-closed and lingers
up to ``LINGER_S`` (still counted, and the first to go when a newcomer needs room), so that the
client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["http_protocol"]

log = logging.getLogger("tagrouter.serve")

#: Connections dropped by a limit are summed into one warning at most this often: a flood of
#: slow clients must not become a flood of log lines.
WARN_EVERY_S = 60.0
#: After an error answer the connection is half-closed and what the client still sends is
#: read and dropped for at most this long: closing with unread bytes sends a reset, which
#: can destroy the answer before the client reads it (nginx's "lingering close").
LINGER_S = 2.0


def _error_response(status: int, reason: str, message: str, kind: str, code: str,
                    extra: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n")
    return head.encode("latin-1") + body


class _Limits:
    """The state the connections of one server share (the event loop's thread only)."""

    def __init__(self, header_timeout_s: float, max_connections: int,
                 max_header_bytes: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        #: Connections with no request in flight, longest waiting first: the ones a newcomer
        #: may push out.
        self.waiting: OrderedDict[Any, None] = OrderedDict()
        #: Connections answered and half-closed (lingering): a newcomer closes these first,
        #: so lingering never takes the process past the bound.
        self.lingering: OrderedDict[Any, None] = OrderedDict()
        #: Connections closed by a limit whose close has not completed yet: no longer counted.
        self.closing: set[Any] = set()
        self.dropped = {"header_timeout": 0, "pushed_out": 0, "refused": 0,
                        "headers_too_large": 0}
        self._warned_at = 0.0
        self.timeout_answer = _error_response(
            408, "Request Timeout",
            f"request headers not complete within {header_timeout_s:g} s "
            "(server.header_timeout_s)", "invalid_request_error", "header_timeout")
        self.refused_answer = _error_response(
            503, "Service Unavailable",
            f"over the limit of {max_connections} client connections, every one with a "
            "request in flight (server.max_client_connections)", "server_error",
            "connection_limit", "retry-after: 1\r\n")
        self.too_large_answer = _error_response(
            431, "Request Header Fields Too Large",
            f"request line and headers over {max_header_bytes} bytes (server.max_header_bytes)",
            "invalid_request_error", "headers_too_large")
        self.pushed_answer = _error_response(
            503, "Service Unavailable",
            f"over the limit of {max_connections} client connections: this one had waited "
            "longest for its request headers (server.max_client_connections)", "server_error",
            "connection_limit", "retry-after: 1\r\n")

    def note(self, what: str) -> None:
        self.dropped[what] += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            counts = ", ".join(f"{k}: {v}" for k, v in self.dropped.items() if v)
            log.warning("client connections dropped by the listening limits since the last "
                        "report (%s); see server.header_timeout_s, "
                        "server.max_client_connections, server.max_header_bytes", counts)
            for k in self.dropped:
                self.dropped[k] = 0


def http_protocol(header_timeout_s: float, max_connections: int,
                  max_header_bytes: int = 64 << 10) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the listening limits, for ``uvicorn.Config(http=...)``.
    One class per server: its connections share the limits.

    Args:
        header_timeout_s: seconds a connection has to send a request's complete headers.
        max_connections: client connections open at once.
        max_header_bytes: most bytes of a request line and headers.
    """
    if header_timeout_s <= 0 or max_connections < 1 or max_header_bytes < 1:
        raise ValueError(f"need header_timeout_s > 0, max_connections >= 1 and "
                         f"max_header_bytes >= 1, got {header_timeout_s!r}, "
                         f"{max_connections!r}, {max_header_bytes!r}")
    limits = _Limits(header_timeout_s, max_connections, max_header_bytes)

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._begun = False  # bytes of a request arrived: a 408 is owed, not a bare close
            self._in_headers = True  # between a request's first byte and its headers' end
            self._discarding = False  # answered and half-closed: input is read and dropped
            self._header_bytes = 0

        # ---- the connection bound ----

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) - len(limits.closing) > limits.max_connections:
                done = next(iter(limits.lingering), None)
                victim = next(iter(limits.waiting), None)
                if done is not None:  # already answered: its lingering ends now
                    done._close(None)
                elif victim is not None:
                    limits.note("pushed_out")
                    victim._close(limits.pushed_answer if victim._begun else None)
                else:
                    # Every connection has a request in flight: none is cut, this one is not
                    # taken.
                    limits.note("refused")
                    self._close(limits.refused_answer)
                    return
            limits.waiting[self] = None
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            limits.waiting.pop(self, None)
            limits.lingering.pop(self, None)
            limits.closing.discard(self)
            super().connection_lost(exc)

        def _close(self, answer: bytes | None) -> None:
            """Closes at once (``answer`` first, if any): to make room under the bound, where
            lingering would keep the descriptor."""
            self._disarm()
            limits.waiting.pop(self, None)
            limits.lingering.pop(self, None)
            if not self.transport.is_closing():
                if answer is not None:
                    self.transport.write(answer)
                limits.closing.add(self)
                self.transport.close()

        def _drop(self, answer: bytes | None) -> None:
            """Ends the connection, with ``answer`` first when the client has sent part of a
            request (one that sent nothing, or only finished requests, just sees it close, as
            at the end of a keep-alive). Answered, it lingers half-closed (still counted, and
            the first to go when a newcomer needs the room)."""
            self._disarm()
            limits.waiting.pop(self, None)
            self._in_headers = False
            transport = self.transport
            if transport.is_closing():
                return
            if answer is None:
                limits.closing.add(self)
                transport.close()
                return
            transport.write(answer)
            self._discarding = True
            try:
                transport.write_eof()  # the answer, then FIN
            except (NotImplementedError, RuntimeError, OSError):  # TLS cannot half-close
                limits.closing.add(self)
                transport.close()
                return
            limits.lingering[self] = None
            self.loop.call_later(LINGER_S, transport.close)

        # ---- the header size ----

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            if self._in_headers:
                # Whole reads are counted, so a read that also holds the body may pass the
                # bound; only a read after which the headers are still incomplete is refused:
                # the parser then holds at most the bound plus one read (256 KiB).
                self._header_bytes += len(data)
                super().data_received(data)
                if self._in_headers and self._header_bytes > limits.max_header_bytes:
                    limits.note("headers_too_large")
                    self._drop(limits.too_large_answer)
                return
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to bytes that do not parse as HTTP/1.1, in the error shape.
            self._drop(_error_response(400, "Bad Request", f"{msg} (not HTTP/1.1)",
                                       "invalid_request_error", "invalid_http"))

        # ---- the header timeout ----

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout_s,
                                                          self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            limits.note("header_timeout")
            self._drop(limits.timeout_answer if self._begun else None)

        def on_message_begin(self) -> None:
            # A kept-alive connection's next request: its clock starts at its first byte.
            self._begun = True
            self._in_headers = True  # counted from its next read (the count was reset at the end
            # of the last one's headers)
            self._arm()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._begun = False
            self._in_headers = False
            self._header_bytes = 0
            limits.waiting.pop(self, None)
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle until the next request (uvicorn armed its keep-alive timer): it may be
            # pushed out by a newcomer, after the connections that have waited longer.
            if self.timeout_keep_alive_task is not None and not self.transport.is_closing():
                limits.waiting[self] = None

    return LimitedHttpToolsProtocol
