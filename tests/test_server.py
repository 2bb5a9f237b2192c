"""The h11 server loop's writes: one system call per small response, framing, worker field."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import h11
import pytest
import trio
from trio.testing import MemoryReceiveStream, MemorySendStream

from proxychain.clock import Clock
from proxychain.connection import BIG_WRITE_BYTES, BIG_WRITE_LOWAT, TRIO_NOTSENT_LOWAT, _Connection
from proxychain.http import Headers, Request, ResponseHead
from proxychain.listen import ACCEPT_BURST, _accept_loop
from proxychain.requesthead import (
    SHARED_HEADER_BLOCK_MAX_BYTES,
    RequestHead,
    _has_body,
    _plain_head,
)
from proxychain.responsehead import _direct_head, prepare
from proxychain.server import IDLE_CHECK_MAX_INTERVAL, ClientInfo, Exchange, Server
from proxychain.settings import ServerSettings
from proxychain.sink import COALESCE_MAX_BYTES, H11Sink, _sendfile_some

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
WALL_ANCHOR = 1_700_000_000.0


class _Answer:
    """A handler that answers every request with one status and body, in given chunks."""

    def __init__(self, status: int, chunks: list[bytes], reason: str = "") -> None:
        self.status = status
        self.chunks = chunks
        self.reason = reason
        self.server: Server | None = None  # set: start draining while the request is served

    async def handle(
        self,
        request: Request,
        body: AsyncIterator[bytes] | None,
        sink: H11Sink,
        client: ClientInfo,
        exchange: Exchange,
    ) -> None:
        if self.server is not None:
            self.server.start_draining()
        length = sum(map(len, self.chunks))
        headers = Headers([("content-length", str(length))])
        await sink.start(ResponseHead(status=self.status, headers=headers, reason=self.reason))
        for chunk in self.chunks:
            await sink.send(chunk)
        await sink.end()


async def _writes(
    request: bytes,
    handler: _Answer,
    *,
    worker_id: str | None = None,
    drain: bool = False,
    writes: list[bytes] | None = None,
) -> list[bytes]:
    """Serve ``request`` on an in-memory connection; each ``send_all`` the server made."""
    writes = [] if writes is None else writes
    send = MemorySendStream()

    async def record() -> None:
        writes.append(bytes(send.get_data_nowait()))

    send.send_all_hook = record
    receive = MemoryReceiveStream()
    receive.put_data(request)
    receive.put_eof()
    server = Server(handler, ServerSettings(), Clock(WALL_ANCHOR), worker_id)
    if drain:
        handler.server = server
    await server.handle_connection(trio.StapledStream(send, receive))
    return writes


async def test_small_response_is_one_write() -> None:
    body = b"x" * 1024
    writes = await _writes(GET, _Answer(200, [body]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n" + body]


async def test_head_of_a_big_body_goes_first() -> None:
    body = b"y" * (COALESCE_MAX_BYTES + 1)
    writes = await _writes(GET, _Answer(200, [body]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 65537\r\n\r\n", body]


async def test_head_of_a_streamed_body_is_not_held_for_its_first_chunk() -> None:
    writes: list[bytes] = []

    class _Streamer(_Answer):
        async def handle(self, *args: object) -> None:
            sink = args[2]
            assert isinstance(sink, H11Sink)
            size = COALESCE_MAX_BYTES + 1
            await sink.start(
                ResponseHead(status=200, headers=Headers([("content-length", str(size))]))
            )
            self.seen = list(writes)  # what the client had before the (slow) first chunk
            await sink.send(b"s" * size)
            await sink.end()

    handler = _Streamer(200, [])
    await _writes(GET, handler, writes=writes)
    assert handler.seen == [b"HTTP/1.1 200 OK\r\ncontent-length: 65537\r\n\r\n"]


async def test_head_joins_only_the_first_chunk() -> None:
    writes = await _writes(GET, _Answer(200, [b"ab", b"cd"]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd"]


async def test_head_request_writes_the_head_at_end() -> None:
    writes = await _writes(HEAD, _Answer(200, [b"body"]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"]


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        (404, "", b"HTTP/1.1 404 Not Found\r\n"),
        (200, "Fine", b"HTTP/1.1 200 Fine\r\n"),
        (299, "", b"HTTP/1.1 299 \r\n"),  # no registered phrase: empty, as RFC 9112 allows
    ],
)
async def test_reason_phrase(status: int, reason: str, line: bytes) -> None:
    writes = await _writes(GET, _Answer(status, [b"z"], reason=reason))
    assert writes == [line + b"content-length: 1\r\n\r\nz"]


async def test_worker_field_names_the_process() -> None:
    writes = await _writes(GET, _Answer(200, [b"z"]), worker_id="4242")
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nx-proxychain-worker: 4242\r\n\r\nz"]


async def test_shutdown_during_a_request_closes_after_its_response() -> None:
    writes = await _writes(GET, _Answer(200, [b"z"]), drain=True)
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n", b"z"]


async def test_pipelined_requests_are_answered_in_order() -> None:
    writes = await _writes(GET + GET.replace(b"/x", b"/y"), _Answer(200, [b"z"]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz"] * 2


PLAIN_HEADS = [
    GET,
    HEAD,
    b"GET /a?b=c&d HTTP/1.1\r\nHost: a:8080\r\nUser-Agent: x y\r\nX-Empty:\r\n\r\n",
    b"GET http://a/x HTTP/1.1\r\nhost:a\r\nAccept:  */* \t\r\nRange: bytes=0-1\r\n\r\n",
]
NOT_PLAIN_HEADS = [
    GET + GET,  # pipelined: h11 keeps the rest
    GET[:-2],  # incomplete
    b"GET /x HTTP/1.1\nHost: a\n\n",  # bare LF
    b"GET /x HTTP/1.1\r\nHost: a\rb\r\n\r\n",  # bare CR
    b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
    b"get /x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET /x y HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x HTTP/1.1\r\n\r\n",  # no Host: h11 answers 400
    b"GET /x HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n",  # obs-fold
    b"GET /x HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n",  # obs-text
    b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
    b"",  # the client's end
]


def _h11_head(data: bytes) -> RequestHead:
    """What h11 makes of ``data``: the request, and nothing else taken from it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert conn.next_event() == h11.EndOfMessage()  # no body
    assert conn.trailing_data == (b"", False)
    return RequestHead(event.method, event.target, tuple(event.headers.raw_items()))


@pytest.mark.parametrize("data", PLAIN_HEADS)
def test_plain_head_is_what_h11_makes_of_it(data: bytes) -> None:
    assert _plain_head(data) == _h11_head(data)


@pytest.mark.parametrize("data", NOT_PLAIN_HEADS)
def test_other_heads_are_left_to_h11(data: bytes) -> None:
    assert _plain_head(data) is None


class _Reads(trio.abc.ReceiveStream):
    """A client stream that returns one given chunk per read, then its end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        pass


async def _serve_reads(chunks: list[bytes], handler: _Answer) -> bytes:
    """Serve requests that arrive one read each; everything the server wrote."""
    send = MemorySendStream()
    server = Server(handler, ServerSettings(), Clock(WALL_ANCHOR))
    await server.handle_connection(trio.StapledStream(send, _Reads(chunks)))
    return bytes(send.get_data_nowait())


async def test_plain_heads_are_served_without_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    fed: list[bytes] = []
    receive_data = h11.Connection.receive_data

    def record(conn: h11.Connection, data: bytes) -> None:
        fed.append(data)
        receive_data(conn, data)

    monkeypatch.setattr(h11.Connection, "receive_data", record)
    out = await _serve_reads([GET, HEAD], _Answer(200, [b"z"]))
    assert out == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nzHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"
    )
    assert fed == [b""]  # only the client's end


async def test_plain_head_answered_through_h11_keeps_the_connection() -> None:
    class _Unframed(_Answer):
        async def handle(self, *args: object) -> None:
            sink = args[2]
            assert isinstance(sink, H11Sink)
            await sink.start(ResponseHead(status=200, headers=Headers([("x", "y")])))
            await sink.send(b"ab")
            await sink.end()

    out = await _serve_reads([GET, GET, GET + GET], _Unframed(200, []))
    chunked = b"HTTP/1.1 200 OK\r\nx: y\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    assert out == chunked * 4


async def test_bad_head_after_plain_ones_gets_400() -> None:
    out = await _serve_reads([GET, b"GET /x HTTP/1.1\r\n\r\n", GET], _Answer(200, [b"z"]))
    first, rest = out.split(b"\r\n\r\nz", 1)
    assert first == b"HTTP/1.1 200 OK\r\ncontent-length: 1"
    assert rest.startswith(b"HTTP/1.1 400 ")
    assert b"HTTP/1.1 200" not in rest  # the connection closed after the 400


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.0\r\n\r\n",
    ],
)
async def test_h11_frames_requests_that_end_the_connection(request_head: bytes) -> None:
    # A second request after the first must go unanswered: the connection closes.
    writes = await _writes(request_head + GET, _Answer(200, [b"z"]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nConnection: close\r\n\r\n", b"z"]


@pytest.mark.parametrize("chunks", [[b"ab", b"cde"], [b"ab"]], ids=["too much", "too little"])
async def test_body_not_matching_content_length_cuts_the_connection(
    chunks: list[bytes],
) -> None:
    class _Liar(_Answer):
        async def handle(self, *args: object) -> None:
            sink = args[2]
            assert isinstance(sink, H11Sink)
            await sink.start(ResponseHead(status=200, headers=Headers([("content-length", "3")])))
            for chunk in self.chunks:
                await sink.send(chunk)
            await sink.end()

    writes = await _writes(GET + GET, _Liar(200, chunks))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab"]


@pytest.mark.parametrize(
    ("status", "fields", "expected"),
    [
        (200, [(b"content-length", b"2")], (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", 2)),
        (200, [], None),  # no length: h11 chooses the framing
        (200, [(b"content-length", b"2"), (b"content-length", b"2")], None),
        (200, [(b"content-length", b"-1")], None),
        (200, [(b"content-length", b"2"), (b"transfer-encoding", b"chunked")], None),
        (200, [(b"content-length", b"2"), (b"connection", b"close")], None),
        (200, [(b"content-length", b"2"), (b"x-evil", b"a\r\nset-cookie: b")], None),
        (200, [(b"content-length", b"2"), (b"x-evil", b"a\nb")], None),
        (200, [(b"content-length", b"2"), (b"x-evil", b"a\0b")], None),
        (304, [(b"content-length", b"2")], None),
        (204, [(b"content-length", b"0")], None),
    ],
)
def test_direct_head(
    status: int, fields: list[tuple[bytes, bytes]], expected: tuple[bytes, int] | None
) -> None:
    assert _direct_head(status, b"OK", fields) == expected


async def test_plain_exchange_is_written_without_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise AssertionError("h11 framed a plain response")

    monkeypatch.setattr(h11, "Response", refuse)
    writes = await _writes(GET + GET, _Answer(200, [b"z"]))
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz"] * 2


class _Endless:
    """Starts a streamed response and sends until the client goes away."""

    async def handle(
        self,
        request: Request,
        body: AsyncIterator[bytes] | None,
        sink: H11Sink,
        client: ClientInfo,
        exchange: Exchange,
    ) -> None:
        await sink.start(ResponseHead(status=200, headers=Headers([("x", "y")])))
        while True:
            await sink.send(b"z" * 65536)


async def test_client_gone_mid_response_closes_the_server_socket() -> None:
    client, server_side = trio.testing.memory_stream_pair()
    server = Server(_Endless(), ServerSettings(), Clock(wall_anchor=1_700_000_000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side)
        await client.send_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
        assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server_side.send_all(b"after")


class _Prepared(_Answer):
    """Answers from a head prepared once, with per-response fields appended."""

    def __init__(self, extra: Headers, body: bytes = b"abc") -> None:
        super().__init__(200, [body])
        self.prepared = prepare(200, "", Headers([("content-length", str(len(body)))]))
        self.extra = extra

    async def handle(self, *args: object) -> None:
        sink = args[2]
        assert isinstance(sink, H11Sink)
        if self.server is not None:
            self.server.start_draining()
        await sink.start_prepared(self.prepared, self.extra)
        for chunk in self.chunks:
            await sink.send(chunk)
        await sink.end()


async def test_prepared_head_is_the_block_plus_the_extra_fields() -> None:
    writes = await _writes(GET, _Prepared(Headers([("age", "7")])), worker_id="w1")
    assert writes == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nage: 7\r\nx-proxychain-worker: w1\r\n\r\nabc"
    ]


async def test_prepared_head_goes_through_h11_when_the_connection_closes() -> None:
    writes = await _writes(GET, _Prepared(Headers([("age", "7")])), drain=True)
    assert writes == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nage: 7\r\nconnection: close\r\n\r\n",
        b"abc",
    ]


async def test_prepared_head_refuses_injected_extra_fields() -> None:
    # Fields with CR/LF fall back to h11, which rejects them: the connection is cut.
    writes = await _writes(GET, _Prepared(Headers([("age", "7\r\nx-evil: 1")])))
    assert writes == []


def test_prepare_leaves_h11_framed_heads_alone() -> None:
    chunked = prepare(200, "", Headers([("transfer-encoding", "chunked")]))
    assert (chunked.block, chunked.length) == (None, 0)
    plain = prepare(203, "Fine", Headers([("content-length", "5")]))
    assert (plain.block, plain.length) == (b"HTTP/1.1 203 Fine\r\ncontent-length: 5\r\n", 5)


def test_sendfile_some_sends_until_the_socket_is_full_or_the_file_ends(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "body"
    path.write_bytes(data)
    a, b = socket.socketpair()
    with a, b, path.open("rb") as file:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        first = _sendfile_some(a.fileno(), file.fileno(), 0, len(data))
        assert first is not None
        assert 0 < first < len(data)  # stopped at a full socket
        assert _sendfile_some(a.fileno(), file.fileno(), first, len(data)) is None
        received = b""
        while len(received) < first:
            received += b.recv(1 << 20)
        assert received == data[:first]
        # Past the end of the file: 0, whatever was asked for.
        assert _sendfile_some(a.fileno(), file.fileno(), len(data), 10) == 0


# ---- idle timeouts (checked by Server.close_idle a few times per timeout) and the drain -------


class _Slow(_Answer):
    """Answers after ``delay`` seconds (longer than any idle timeout in these tests)."""

    def __init__(self, delay: float) -> None:
        super().__init__(200, [b"slow"])
        self.delay = delay

    async def handle(self, *args: object) -> None:
        await trio.sleep(self.delay)
        await super().handle(*args)  # type: ignore[arg-type]


IDLE_SETTINGS = ServerSettings(keepalive_timeout=7.0, header_timeout=3.0)


async def _closed_after(handler: Any, send: bytes) -> tuple[bytes, float]:
    """Serve one connection with ``handler`` under :data:`IDLE_SETTINGS`: send ``send``,
    read until the server closes; what came and when (trio time)."""
    client, server_side = trio.testing.memory_stream_pair()
    server = Server(handler, IDLE_SETTINGS, Clock(WALL_ANCHOR))
    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.close_idle)
        nursery.start_soon(server.handle_connection, server_side)
        start = trio.current_time()
        await client.send_all(send)
        while chunk := await client.receive_some(65536):
            got += chunk
        nursery.cancel_scope.cancel()
    return got, trio.current_time() - start


async def test_idle_keepalive_connection_closes_after_keepalive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got, elapsed = await _closed_after(_Answer(200, [b"z"]), GET)
    assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz"
    assert 7.0 <= elapsed <= 7.0 + IDLE_CHECK_MAX_INTERVAL


async def test_silent_connection_closes_after_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got, elapsed = await _closed_after(_Answer(200, [b"z"]), b"")
    assert got == b""
    assert 3.0 <= elapsed <= 3.0 + IDLE_CHECK_MAX_INTERVAL


async def test_response_slower_than_the_idle_timeouts_is_not_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The idle timeout applies while a request head is awaited, never while it is answered.
    got, elapsed = await _closed_after(_Slow(20.0), GET + GET)
    assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow" * 2
    assert 20.0 + 20.0 + 7.0 <= elapsed <= 20.0 + 20.0 + 7.0 + IDLE_CHECK_MAX_INTERVAL


async def test_drain_closes_idle_connections_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server_side = trio.testing.memory_stream_pair()
    server = Server(_Answer(200, [b"z"]), ServerSettings(), Clock(WALL_ANCHOR))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side)
        await client.send_all(GET)
        assert (await client.receive_some(65536)).endswith(b"\r\n\r\nz")
        await trio.sleep(1.0)  # idle, waiting for the next request
        start = trio.current_time()
        server.start_draining()
        assert await client.receive_some(65536) == b""
        assert trio.current_time() == start


# ---- request header blocks: one shared Headers per distinct block ---------------------------


class _Recorder(_Answer):
    """Answers 200 and keeps each request it saw."""

    def __init__(self) -> None:
        super().__init__(200, [b"z"])
        self.requests: list[Request] = []

    async def handle(self, *args: object) -> None:
        request = args[0]
        assert isinstance(request, Request)
        self.requests.append(request)
        await super().handle(*args)  # type: ignore[arg-type]


async def test_identical_header_blocks_share_one_headers_object() -> None:
    big = b"x-big: " + b"b" * SHARED_HEADER_BLOCK_MAX_BYTES + b"\r\n"
    other = GET.replace(b"Host: a", b"Host: b")
    huge = GET.replace(b"\r\n\r\n", b"\r\n" + big + b"\r\n")
    handler = _Recorder()
    await _writes(GET + GET + other + huge + huge, handler)
    first, same, different, huge1, huge2 = (r.headers for r in handler.requests)
    assert same is first  # what is parsed from it (Headers.memo) is parsed once
    assert different is not first
    assert list(different) == [("host", "b")]
    # Big blocks are rare and would pin memory: built per request, equal all the same.
    assert huge1 is not huge2
    assert huge1 == huge2


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([], False),
        ([("content-length", "0")], False),
        ([("content-length", "5")], True),
        ([("transfer-encoding", "chunked")], True),
    ],
)
def test_has_body(fields: list[tuple[str, str]], expected: bool) -> None:
    assert _has_body(Headers(fields)) is expected


@pytest.mark.loopback
@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="Linux socket option")
async def test_a_big_write_lifts_the_unsent_threshold_and_restores_it() -> None:
    """A large body goes out with TCP_NOTSENT_LOWAT lifted (the socket refilled as soon as it
    has room), and the connection is left with trio's value for what follows (sendfile)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server_stream = await listeners[0].accept()
    conn = _Connection(server_stream, ServerSettings())
    seen: list[int] = []
    real_setsockopt = server_stream.setsockopt

    def spy(level: int, option: int, value: int) -> None:
        if option == socket.TCP_NOTSENT_LOWAT:
            seen.append(value)
        real_setsockopt(level, option, value)

    server_stream.setsockopt = spy  # type: ignore[method-assign,assignment]
    body = b"x" * (2 * BIG_WRITE_BYTES)
    received = 0
    async with trio.open_nursery() as nursery:

        async def drain() -> None:
            nonlocal received
            while received < len(body) + 10:
                received += len(await client.receive_some(1 << 20))

        nursery.start_soon(drain)
        await conn.write(body)
        await conn.write(b"small body")  # under the threshold: left alone
    assert received == len(body) + 10
    assert seen == [BIG_WRITE_LOWAT, TRIO_NOTSENT_LOWAT]
    lowat = server_stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    assert lowat == TRIO_NOTSENT_LOWAT
    for stream in (client, server_stream, *listeners):
        await stream.aclose()


@pytest.mark.loopback
async def test_accept_loop_takes_waiting_connections_in_bursts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections queued before the loop wakes are taken a burst per wake-up, all of them,
    each as a trio stream with TCP_NODELAY; the listener stays open after the loop ends."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2 * ACCEPT_BURST + 3)]
    taken: list[tuple[int, trio.SocketStream]] = []  # (wake-up, stream)
    wakes = 0
    all_taken = trio.Event()
    real_wait_readable = trio.lowlevel.wait_readable

    async def counting_wait_readable(sock: Any) -> None:
        nonlocal wakes
        await real_wait_readable(sock)
        wakes += 1

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait_readable)

    class Handlers:
        def start_soon(self, fn: object, stream: trio.SocketStream) -> None:
            taken.append((wakes, stream))
            if len(taken) == len(clients):
                all_taken.set()

    class NoServer:
        seat = None
        handle_admitted = None

        def admit(self) -> None:
            pass

    async with trio.open_nursery() as nursery:
        handlers, server = cast("trio.Nursery", Handlers()), cast("Server", NoServer())
        nursery.start_soon(_accept_loop, listeners[0], handlers, server)
        with trio.fail_after(5):
            await all_taken.wait()
        nursery.cancel_scope.cancel()
    per_wake = [sum(1 for w, _ in taken if w == n) for n in sorted({w for w, _ in taken})]
    assert per_wake == [ACCEPT_BURST, ACCEPT_BURST, 3]
    for _, stream in taken:
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.aclose()
    late = await trio.open_tcp_stream("127.0.0.1", port)  # the listener is still open
    for stream in (late, *clients):
        await stream.aclose()
    for listener in listeners:
        await listener.aclose()
