"""The gateway's one upstream client (aiohttp's pool, `serve.forward.client`): pooling, headers,
bodies, and every fault classified once into the kind the fallback chain goes by.

The faulty servers are raw asyncio TCP servers on loopback: they answer with exactly the bytes
a test scripts (no HTTP library would send a broken response on purpose)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable

import pytest

pytest.importorskip("aiohttp")

from serve_helpers import dead_url  # noqa: E402

from tagrouter_fast.serve.forward.client import ClientPool, Timeouts, Upstream  # noqa: E402
from tagrouter_fast.serve.forward.faults import BackendError  # noqa: E402

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A loopback TCP server running ``handler`` per connection; counts connections and keeps
    the request heads it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return await reader.readexactly(length)

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def ok_response(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + extra + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def timeouts(read_s: float = 5.0, pool_s: float = 5.0) -> Timeouts:
    return Timeouts(connect_s=5.0, read_s=read_s, pool_s=pool_s)


async def body_of(r: Upstream) -> bytes:
    try:
        return b"".join([c async for c in r.chunks()])
    finally:
        await r.close()


async def post(pool: ClientPool, url: str, t: Timeouts | None = None) -> bytes:
    return await body_of(await pool.send("POST", url, b"{}", {}, t or timeouts(), backend="b"))


def test_keep_alive_headers_and_body() -> None:
    async def main() -> None:
        got: list[bytes] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                got.append(await srv.read_request(reader))
                writer.write(ok_response(b'{"choices": []}', b"set-cookie: a=b\r\n"))
                await writer.drain()

        srv = Scripted(handler)
        async with srv as url:
            pool = ClientPool(4)  # the gateway's pooled connections, as it sends on them
            for i in range(3):
                r = await pool.send("POST", url + "/v1/chat", b'{"n": %d}' % i,
                                    {"authorization": "Bearer k",
                                     "content-type": "application/json"}, timeouts())
                assert r.status == 200 and r.header("content-type", "") == "application/json"
                assert json.loads(await body_of(r)) == {"choices": []}
            await pool.aclose()
        assert got == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
        assert srv.connections == 1  # one kept-alive connection for all three
        head = srv.heads[0].lower()
        assert b"authorization: bearer k" in head and b"content-length: 8" in head
        # Only encodings the transport decodes are offered.
        assert b"accept-encoding: gzip, deflate\r\n" in head
        assert b"cookie" not in srv.heads[-1].lower()  # the set-cookie was not kept

    run(main())


def test_compressed_body_arrives_decoded() -> None:
    async def main() -> None:
        raw = b'{"choices": ["' + b"x" * 2000 + b'"]}'

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(ok_response(gzip.compress(raw), b"content-encoding: gzip\r\n"))
            await writer.drain()

        srv = Scripted(handler)
        pool = ClientPool(4)
        async with srv as url:
            # The bytes read (what the stream relay passes on) are the decoded ones.
            assert await post(pool, url) == raw
        await pool.aclose()

    run(main())


def test_half_read_stream_closes_its_connection() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            writer.write(b"d\r\ndata: first\n\n\r\n")
            await writer.drain()
            # Waits for the client to hang up: the read returns b"" at its close.
            assert await reader.read(1) == b""
            srv.closed_by_client.set()

        srv = Scripted(handler)
        pool = ClientPool(4)
        async with srv as url:
            r = await pool.send("POST", url, b"{}", {}, timeouts())
            chunks = r.chunks()
            assert await chunks.__anext__() == b"data: first\n\n"
            await r.close()
            await asyncio.wait_for(srv.closed_by_client.wait(), 5)
        await pool.aclose()

    run(main())


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def _not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"\x00\xffSSH-2.0-OpenSSH\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.5)


async def _truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4096\r\n\r\n{\"id\": ")
    await writer.drain()


# (handler, the fallback chain's kind)
FAULTS = {
    "hang": (_hang, "timeout"),
    "closed before answering": (_close_at_once, "reset"),
    "not HTTP": (_not_http, "reset"),
    "body cut short": (_truncated, "reset"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_are_classified_once(fault: str) -> None:
    handler, kind = FAULTS[fault]

    async def main() -> None:
        pool = ClientPool(4)
        async with Scripted(handler) as url:
            with pytest.raises(BackendError) as e:
                await post(pool, url, timeouts(read_s=0.5))
            assert e.value.kind == kind and e.value.backend == "b"
        await pool.aclose()

    run(main())


def test_connection_refused_is_connect_error() -> None:
    async def main() -> None:
        pool = ClientPool(4)
        with pytest.raises(BackendError) as e:
            await post(pool, dead_url() + "/v1/chat/completions")
        assert e.value.kind == "connect"  # never a timeout: a 502, not a 504
        await pool.aclose()

    run(main())


def test_no_free_connection_in_time_is_a_timeout() -> None:
    async def main() -> None:
        pool = ClientPool(1)
        async with Scripted(_hang) as url:
            holder = asyncio.create_task(post(pool, url, timeouts(read_s=10)))
            await asyncio.sleep(0.2)  # the only connection is taken
            with pytest.raises(BackendError) as e:
                await post(pool, url, timeouts(read_s=10, pool_s=0.3))
            assert e.value.kind == "timeout"
            holder.cancel()
        await pool.aclose()

    run(main())


def test_session_made_in_the_loop_and_closed() -> None:
    pool = ClientPool(2)

    async def main() -> None:
        async with Scripted(_close_at_once) as url:
            with pytest.raises(BackendError):
                await post(pool, url)
            assert pool._session is not None
            await pool.aclose()
            assert pool._session is None

    run(main())


def test_the_shadow_judge_asks_on_the_same_client() -> None:
    from tagrouter_fast.builder.judge import JudgeConfig, JudgeError
    from tagrouter_fast.serve.shadow.judge import PairwiseJudge, http_ask

    bodies: list[dict[str, object]] = []
    status = {"code": b"200 OK"}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            bodies.append(json.loads(await srv.read_request(reader)))
            reply = {"choices": [{"message": {"content": '{"compare result": "A"}'}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
            body = json.dumps(reply).encode()
            writer.write(ok_response(body).replace(b"200 OK", status["code"]))
            await writer.drain()

    async def main() -> None:
        pool = ClientPool(4)
        async with srv as url:
            cfg = JudgeConfig(url=url + "/v1", model="judge-model", api_key="k", timeout_s=5)
            judge = PairwiseJudge(http_ask(pool, cfg))
            outcome, usage = await judge("q", "answer a", "answer b")
            # "A" first and second: each order prefers the answer shown first, so a tie.
            assert outcome == "tie" and usage == {"prompt_tokens": 20, "completion_tokens": 4}
            assert {b["model"] for b in bodies} == {"judge-model"} and len(bodies) == 2
            assert b"authorization: bearer k" in srv.heads[0].lower()
            status["code"] = b"500 Internal Server Error"
            with pytest.raises(JudgeError, match="HTTP 500"):
                await judge("q", "a", "b")
        await pool.aclose()

    srv = Scripted(handler)
    run(main())


def test_one_translation_of_faults_to_client_errors() -> None:
    from tagrouter_fast.serve.forward.faults import (
        AllBackendsFailed,
        client_error,
        retryable_status,
        stream_error,
    )

    def last(*kinds: str) -> tuple[int, str]:
        e = client_error(AllBackendsFailed([BackendError(f"b{i}", k, "x")
                                            for i, k in enumerate(kinds)]))
        assert e.kind == "upstream_error" and e.message.startswith("no backend answered: b0: ")
        return e.status, e.code

    # The last try decides: a client that waited out a timeout gets 504, else 502.
    assert last("connect", "timeout") == (504, "upstream_timeout")
    assert last("timeout", "connect") == (502, "upstream_error")
    assert last("status", "too_large") == (502, "upstream_too_large")
    mid = stream_error(BackendError("small", "reset", "x"))
    assert mid.code == "upstream_reset" and "small" in mid.message
    assert [s for s in (200, 400, 404, 408, 409, 425, 429, 500, 503) if retryable_status(s)] \
        == [408, 409, 425, 429, 500, 503]
