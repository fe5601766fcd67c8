"""Server-sent events framing: bytes as they arrive from a backend -> (event, data) pairs, and
back. Only what the three protocols use: ``event:`` and ``data:`` fields (several data lines
join with newlines), comments and other fields ignored, ``\\n`` or ``\\r\\n`` line ends.

>>> d = SSEDecoder()
>>> d.feed(b"event: ping\\ndata: {}\\n"), d.feed(b"\\n")
([], [SSEEvent(event='ping', data='{}')])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from tagrouter_fast.serve.edge.wire import ProtocolError

__all__ = ["MAX_EVENT_BYTES", "DataParser", "SSEDecoder", "SSEEvent", "encode"]

#: An upstream event larger than this is a broken backend, not a long answer (each event is
#: one delta): the decoder refuses it rather than buffer without bound.
MAX_EVENT_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str | None
    data: str


def encode(data: str, event: str | None = None) -> bytes:
    """One event, framed (``data`` must be one line: compact JSON is)."""
    if event is None:
        return f"data: {data}\n\n".encode()
    return f"event: {event}\ndata: {data}\n\n".encode()


class SSEDecoder:
    """Incremental: `feed` takes chunks split anywhere (mid-line, mid-character) and returns
    the events they complete; `close` checks nothing was left half-sent."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        out: list[SSEEvent] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    out.append(SSEEvent(self._event, "\n".join(self._data)))
                self._event, self._data, self._size = None, [], 0
                continue
            self._size += len(line)
            if self._size > self._max:
                raise ProtocolError(502, "stream", f"an event is over {self._max} bytes")
            self._field(line)
        self._buf = buf[start:]
        if len(self._buf) > self._max:
            raise ProtocolError(502, "stream", f"a line is over {self._max} bytes")
        return out

    def _field(self, line: bytes) -> None:
        if line.startswith(b":"):
            return  # a comment (keep-alive)
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        try:
            text = value.decode()
        except UnicodeDecodeError:
            raise ProtocolError(502, "stream", "an event is not valid UTF-8") from None
        if name == b"data":
            self._data.append(text)
        elif name == b"event":
            self._event = text

    def close(self) -> list[SSEEvent]:
        """The event a stream ended without its blank line (servers do), if any."""
        out = self.feed(b"\n") if self._buf else []
        if self._data:
            out.append(SSEEvent(self._event, "\n".join(self._data)))
            self._event, self._data, self._size = None, [], 0
        return out


E = TypeVar("E")


class DataParser(Generic[E]):
    """A backend's stream read event by event: a protocol's parser turns each event's data into
    its own events (`_event`); `feed` and `_drain` are the SSE framing around it."""

    def __init__(self) -> None:
        self._sse = SSEDecoder()

    def feed(self, chunk: bytes) -> list[E]:
        out: list[E] = []
        for ev in self._sse.feed(chunk):
            self._event(ev.data, out)
        return out

    def _drain(self) -> list[E]:
        """The events of whatever the stream's last bytes complete (the framing checked)."""
        out: list[E] = []
        for ev in self._sse.close():
            self._event(ev.data, out)
        return out

    def _event(self, data: str, out: list[E]) -> None:
        raise NotImplementedError
