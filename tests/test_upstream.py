"""The upstream client against a scripted h11 server (memory streams, virtual time), plus
loopback tests for refused connections and real TLS."""

from __future__ import annotations

import math
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proxychain.errors import (
    ConfigError,
    ErrorKind,
    RequestRefused,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxychain.http import Headers, Request
from proxychain.upstream import (
    Origin,
    PoolStatistics,
    Timeouts,
    UpstreamPool,
    create_ssl_context,
)
from tests._h11_fake import FakeUpstream, Received, Reply, Script, serve_h11

ORIGIN = Origin(scheme="http", host="upstream.test", port=80, base_path="/base")
TIMEOUTS = Timeouts(connect=3.0, first_byte=5.0, between_bytes=2.0)


def stats(idle: int, active: int, connects: int, requests: int, reused: int) -> PoolStatistics:
    return PoolStatistics(
        idle=idle, active=active, connects=connects, requests=requests, reused=reused
    )


def always(reply: Reply) -> Script:
    return lambda _: reply


def in_order(*replies: Reply) -> Script:
    it: Iterator[Reply] = iter(replies)
    return lambda _: next(it)


def get(target: str = "/x", method: str = "GET", **headers: str) -> Request:
    return Request(method=method, target=target, headers=Headers(headers.items()))


@asynccontextmanager
async def open_fake(
    script: Script | None = None, **options: Any
) -> AsyncIterator[tuple[UpstreamPool, FakeUpstream]]:
    script = script or always(Reply(body=[b"hello"]))
    fake_options = {k: options.pop(k) for k in ("refuse", "connect_delay") if k in options}
    options.setdefault("timeouts", TIMEOUTS)
    async with trio.open_nursery() as nursery:
        fake = FakeUpstream(nursery=nursery, script=script, **fake_options)
        pool = UpstreamPool(ORIGIN, connect=fake, **options)
        try:
            yield pool, fake
        finally:
            await pool.aclose()
            nursery.cancel_scope.cancel()


async def fetch(pool: UpstreamPool, request: Request | None = None) -> tuple[int, bytes]:
    async with pool.request(request or get()) as response:
        return response.head.status, b"".join([c async for c in response.body()])


async def fetch_with_body(pool: UpstreamPool, request: Request, body: AsyncIterator[bytes]) -> int:
    async with pool.request(request, body=body) as response:
        return response.head.status


async def collect(pool: UpstreamPool, seen: list[str]) -> None:
    """Fetch, noting in ``seen`` how far it got: "head", each chunk, "end"."""
    async with pool.request(get()) as response:
        seen.append("head")
        async for chunk in response.body():
            seen.append(bytes(chunk).decode())  # noqa: PERF401 - grows as chunks arrive
        seen.append("end")


# ---- Origin ----------------------------------------------------------------------------------

ORIGIN_CASES = [
    ("https://proxy.golang.org", ("https", "proxy.golang.org", 443, ""), "proxy.golang.org"),
    ("HTTPS://Proxy.Golang.org/base/", ("https", "proxy.golang.org", 443, "/base"), None),
    ("http://h:8080/a/b", ("http", "h", 8080, "/a/b"), "h:8080"),
    ("http://h:80", ("http", "h", 80, ""), "h"),
    ("https://h:80", ("https", "h", 80, ""), "h:80"),
    ("http://[::1]:81/", ("http", "::1", 81, ""), "[::1]:81"),
]


@pytest.mark.parametrize(("url", "fields", "authority"), ORIGIN_CASES)
def test_origin_parse(url: str, fields: tuple[str, str, int, str], authority: str | None) -> None:
    origin = Origin.parse(url)
    assert (origin.scheme, origin.host, origin.port, origin.base_path) == fields
    if authority is not None:
        assert origin.authority == authority


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/",
        "http://",
        "h:80",
        "http://h:port/",
        "http://u:p@h/",
        "http://h/?q",
        "http://h/#f",
    ],
)
def test_origin_parse_rejects(url: str) -> None:
    with pytest.raises(ConfigError, match="invalid upstream URL"):
        Origin.parse(url)


def test_origin_target_and_str() -> None:
    origin = Origin.parse("https://mirror.test:8443/go/")
    assert origin.target("/m/@v/list") == "/go/m/@v/list"
    assert str(origin) == "https://mirror.test:8443/go"


# ---- the request/response cycle ----------------------------------------------------------------


async def test_get_sends_target_host_and_headers(autojump_clock: trio.testing.MockClock) -> None:
    reply = Reply(
        reason="Fine", headers=[("content-length", "5"), ("etag", '"v1"')], body=[b"hel", b"lo"]
    )
    async with open_fake(always(reply)) as (pool, fake):
        async with pool.request(get("/m/@v/list?x=1", accept="*/*")) as response:
            assert response.head.status == 200
            assert response.head.reason == "Fine"
            assert response.head.headers.get("etag") == '"v1"'
            assert response.content_length == 5
            assert pool.statistics() == stats(0, 1, 1, 1, 0)
            assert b"".join([c async for c in response.body()]) == b"hello"
            assert response.complete
        assert [(r.method, r.target, r.headers) for r in fake.received] == [
            ("GET", "/base/m/@v/list?x=1", [("host", "upstream.test"), ("accept", "*/*")])
        ]
        assert fake.origins == [ORIGIN]


async def test_host_given_by_caller_is_kept(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake() as (pool, fake):
        await fetch(pool, get(host="vhost.test"))
        assert fake.received[0].headers == [("host", "vhost.test")]


async def test_keep_alive_reuses_one_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake() as (pool, fake):
        assert await fetch(pool) == (200, b"hello")
        assert pool.statistics() == stats(1, 0, 1, 1, 0)
        assert await fetch(pool) == (200, b"hello")
        assert pool.statistics() == stats(1, 0, 1, 2, 1)
        assert fake.connections == 1
        assert [r.connection for r in fake.received] == [1, 1]


@pytest.mark.parametrize(
    ("idle_for", "connects"), [(0.0, 1), (59.0, 1), (59.999, 1), (60.0, 2), (61.0, 2)]
)
async def test_idle_expiry(
    autojump_clock: trio.testing.MockClock, idle_for: float, connects: int
) -> None:
    async with open_fake(idle_expiry=60.0) as (pool, fake):
        await fetch(pool)
        autojump_clock.jump(idle_for)
        await fetch(pool)
        assert fake.connections == connects
        assert pool.statistics() == stats(1, 0, connects, 2, 2 - connects)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.closed == connects - 1  # the expired connection was closed, not leaked


async def test_max_idle_closes_the_oldest(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake(max_idle=2) as (pool, fake):
        async with pool.request(get()) as r1, pool.request(get()) as r2, pool.request(get()) as r3:
            for response in (r1, r2, r3):
                async for _ in response.body():
                    pass
            assert pool.statistics() == stats(0, 3, 3, 3, 0)
        assert pool.statistics() == stats(2, 0, 3, 3, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.closed == 1
        await fetch(pool)
        assert fake.received[-1].connection == 1  # r1 was released last: most recently used


@pytest.mark.parametrize(
    ("reply", "read_body"),
    [
        (Reply(body=[b"hel", b"lo"], chunk_delay=1.0), False),  # body left unread
        (Reply(headers=[("connection", "close")], body=[b"hello"]), True),
        # Bytes after a complete response: the connection's framing cannot be trusted.
        (Reply(raw=b"HTTP/1.1 204 No Content\r\n\r\njunk"), True),
    ],
    ids=["unread", "connection-close", "junk-after-response"],
)
async def test_connection_not_pooled(
    autojump_clock: trio.testing.MockClock, reply: Reply, read_body: bool
) -> None:
    async with open_fake(always(reply)) as (pool, fake):
        async with pool.request(get()) as response:
            if read_body:
                async for _ in response.body():
                    pass
        assert pool.statistics() == stats(0, 0, 1, 1, 0)
        await fetch(pool)
        assert fake.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=304, headers=[("etag", '"v1"')]),
        Reply(status=200, headers=[("content-length", "0")]),
        Reply(raw=b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", close_after=True),
    ],
    ids=["304", "empty", "buffered"],
)
async def test_unread_body_already_buffered_is_reused(
    autojump_clock: trio.testing.MockClock, reply: Reply
) -> None:
    async with open_fake(in_order(reply, Reply())) as (pool, fake):
        async with pool.request(get()) as response:
            assert not response.complete
        assert pool.statistics() == stats(1, 0, 1, 1, 0)
        await fetch(pool)
        # The raw reply's server closed after it: reuse finds it dead and retries once.
        assert fake.connections == (2 if reply.raw else 1)
        assert pool.statistics().reused == 1


async def test_response_is_unusable_after_its_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake() as (pool, _):
        async with pool.request(get()) as response:
            pass
        with pytest.raises(trio.ClosedResourceError):
            await anext(response.body())


async def test_aclose_closes_idle_and_refuses_new_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake() as (pool, fake):
        await fetch(pool)
        await pool.aclose()
        assert pool.statistics() == stats(0, 0, 1, 1, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.closed == 1
        with pytest.raises(trio.ClosedResourceError):
            await fetch(pool)


# ---- response framing --------------------------------------------------------------------------


async def test_chunked_response_streams_each_chunk(autojump_clock: trio.testing.MockClock) -> None:
    reply = Reply(body=[b"a" * 10, b"b" * 20, b"c"], chunk_delay=1.5)
    async with open_fake(always(reply)) as (pool, _):
        start = trio.current_time()
        async with pool.request(get()) as response:
            assert response.head.headers.get("transfer-encoding") == "chunked"
            assert response.content_length is None
            arrivals = [(trio.current_time() - start, bytes(c)) async for c in response.body()]
            assert response.complete
        assert arrivals == [(0.0, b"a" * 10), (1.5, b"b" * 20), (3.0, b"c")]
        assert pool.statistics() == stats(1, 0, 1, 1, 0)


async def test_head_has_no_body(autojump_clock: trio.testing.MockClock) -> None:
    reply = Reply(headers=[("content-length", "100")])
    async with open_fake(always(reply)) as (pool, fake):
        async with pool.request(get(method="HEAD")) as response:
            assert response.head.headers.get("content-length") == "100"
            assert response.content_length == 0
            assert [c async for c in response.body()] == []
            assert response.complete
        await fetch(pool, get(method="HEAD"))
        assert fake.connections == 1


async def test_informational_responses_are_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reply = Reply(status=201, informational=[100, 103], body=[b"made"])
    async with open_fake(always(reply)) as (pool, _):
        assert await fetch(pool, get(method="POST")) == (201, b"made")
        assert pool.statistics() == stats(1, 0, 1, 1, 0)


# ---- request bodies ----------------------------------------------------------------------------


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.sleep(0.5)  # the body arrives over time, as from a client
        yield part


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        ({}, ("transfer-encoding", "chunked")),
        ({"content-length": "11"}, ("content-length", "11")),
    ],
)
async def test_request_body_is_streamed(
    autojump_clock: trio.testing.MockClock, headers: dict[str, str], framing: tuple[str, str]
) -> None:
    reply = Reply(status=201, headers=[("content-length", "0")])
    async with open_fake(always(reply)) as (pool, fake):
        request = get("/upload", method="PUT", **headers)
        async with pool.request(request, body=chunks(b"abc", b"", b"defgh", b"ijk")) as response:
            assert response.head.status == 201
        assert fake.received[0].body == b"abcdefghijk"
        assert framing in fake.received[0].headers
        assert pool.statistics() == stats(1, 0, 1, 1, 0)


async def test_empty_post_sends_zero_length(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake() as (pool, fake):
        await fetch(pool, get(method="POST"))
        assert ("content-length", "0") in fake.received[0].headers


async def test_early_response_while_sending_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server refuses the upload after its head and closes: sending the body breaks, and
    # the answer is read anyway (as httpcore does), instead of reporting a reset.
    async def refuse_upload(origin: Origin) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()

        async def serve() -> None:
            await server.receive_some()
            await server.send_all(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!"
            )
            await server.aclose()

        nursery.start_soon(serve)
        return client

    async with trio.open_nursery() as nursery:
        pool = UpstreamPool(ORIGIN, timeouts=TIMEOUTS, connect=refuse_upload)
        request = get("/upload", method="PUT")
        async with pool.request(request, body=chunks(b"abc", b"def")) as response:
            assert response.head.status == 413
            assert b"".join([c async for c in response.body()]) == b"big!"
        assert trio.current_time() == 0.5  # the first chunk's send found the peer gone
        assert pool.statistics() == stats(0, 0, 1, 1, 0)


async def test_request_body_error_is_the_callers(autojump_clock: trio.testing.MockClock) -> None:
    # A client that disconnects mid-upload breaks the body iterator: that error propagates as
    # is (not as an upstream failure) and the half-sent connection is closed.
    async def client_upload() -> AsyncIterator[bytes]:
        yield b"abc"
        raise trio.BrokenResourceError("client went away")

    async with open_fake() as (pool, fake):
        request = get("/upload", method="PUT")
        with pytest.raises(trio.BrokenResourceError, match="client went away"):
            await fetch_with_body(pool, request, client_upload())
        assert trio.current_time() == 0.0
        assert pool.statistics() == stats(0, 0, 1, 1, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert (fake.received, fake.closed) == ([], 1)


@pytest.mark.parametrize("parts", [(b"abc",), (b"abcdef", b"ghijkl")])
async def test_request_body_length_mismatch(
    autojump_clock: trio.testing.MockClock, parts: tuple[bytes, ...]
) -> None:
    async with open_fake() as (pool, _):
        request = get("/upload", method="POST", **{"content-length": "5"})
        with pytest.raises(RequestRefused) as info:
            async with pool.request(request, body=chunks(*parts)):
                pass
        assert info.value.status_hint == 400
        assert pool.statistics() == stats(0, 0, 1, 1, 0)


# ---- errors, with their kinds ------------------------------------------------------------------

ERROR_CASES = [
    ("drop", Reply(drop=True), "head", UpstreamConnectError, ErrorKind.RESET),
    ("garbage-head", Reply(raw=b"HTTP/1.1 abc\r\n\r\n"), "head", UpstreamProtocolError, None),
    ("half-a-head", Reply(raw=b"HTTP/1.1 200 OK\r\nContent-"), "head", UpstreamProtocolError, None),
    (
        "oversized-head",
        Reply(headers=[("x-big", "v" * 70_000)]),
        "head",
        UpstreamProtocolError,
        None,
    ),
    (
        "short-content-length",
        Reply(headers=[("content-length", "10")], body=[b"abcd"], truncate=True),
        "body",
        UpstreamProtocolError,
        None,
    ),
    (
        "chunked-without-end",
        Reply(body=[b"abcd", b"ef"], truncate=True),
        "body",
        UpstreamProtocolError,
        None,
    ),
    (
        "bad-chunk",
        Reply(raw=b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
        "body",
        UpstreamProtocolError,
        None,
    ),
]


@pytest.mark.parametrize(
    ("reply", "stage", "error", "kind"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_errors(
    autojump_clock: trio.testing.MockClock,
    reply: Reply,
    stage: str,
    error: type[UpstreamError],
    kind: ErrorKind | None,
) -> None:
    seen: list[str] = []
    async with open_fake(always(reply)) as (pool, fake):
        with pytest.raises(error) as info:
            await collect(pool, seen)
        assert seen[:1] == ([] if stage == "head" else ["head"])
        assert "end" not in seen
        assert info.value.kind is (kind or ErrorKind.PROTOCOL)
        assert info.value.upstream == "http://upstream.test/base"
        assert pool.statistics() == stats(0, 0, 1, 1, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.connections == 1


async def test_connect_refused_by_connector(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake(refuse=True) as (pool, _):
        with pytest.raises(UpstreamConnectError) as info:
            await fetch(pool)
        assert info.value.kind is ErrorKind.CONNECT
        assert info.value.status_hint == 502
        assert pool.statistics() == stats(0, 0, 0, 0, 0)


# Each row: method, request body, expected outcome of a request on a pooled connection that
# the server closed while idle. Only idempotent requests without a body are retried.
DEAD_IDLE_CASES = [
    ("GET", None, "retried"),
    ("HEAD", None, "retried"),
    ("DELETE", None, "retried"),
    ("PUT", None, "retried"),
    ("PUT", b"data", "reset"),
    ("POST", None, "reset"),
    ("POST", b"data", "reset"),
]


@pytest.mark.parametrize(("method", "body", "outcome"), DEAD_IDLE_CASES)
async def test_dead_idle_connection(
    autojump_clock: trio.testing.MockClock, method: str, body: bytes | None, outcome: str
) -> None:
    script = in_order(Reply(close_after=True), Reply(status=204))
    async with open_fake(script) as (pool, fake):
        await fetch(pool)
        assert pool.statistics() == stats(1, 0, 1, 1, 0)
        request = get(method=method)
        if outcome == "retried":
            async with pool.request(request) as response:
                assert response.head.status == 204
            assert pool.statistics() == stats(1, 0, 2, 3, 1)
            assert [r.connection for r in fake.received] == [1, 2]
        else:
            with pytest.raises(UpstreamConnectError) as info:
                async with pool.request(request, body=None if body is None else chunks(body)):
                    pass
            assert info.value.kind is ErrorKind.RESET
            assert pool.statistics() == stats(0, 0, 1, 2, 1)


async def test_fresh_connection_reset_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake(always(Reply(drop=True))) as (pool, fake):
        with pytest.raises(UpstreamConnectError) as info:
            await fetch(pool)
        assert info.value.kind is ErrorKind.RESET
        assert fake.connections == 1
        assert len(fake.received) == 1


async def test_dead_idle_retry_happens_once(autojump_clock: trio.testing.MockClock) -> None:
    script = in_order(Reply(close_after=True), Reply(drop=True))
    async with open_fake(script) as (pool, _):
        await fetch(pool)
        with pytest.raises(UpstreamConnectError) as info:
            await fetch(pool)
        assert info.value.kind is ErrorKind.RESET
        assert pool.statistics() == stats(0, 0, 2, 3, 1)


# ---- timeouts, at exact virtual times ----------------------------------------------------------


async def test_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake(connect_delay=math.inf) as (pool, _):
        start = trio.current_time()
        with pytest.raises(UpstreamTimeout) as info:
            await fetch(pool)
        assert trio.current_time() - start == 3.0
        assert info.value.kind is ErrorKind.TIMEOUT
        assert info.value.status_hint == 504
        assert pool.statistics() == stats(0, 0, 0, 0, 0)


@pytest.mark.parametrize(("delay", "expect_timeout"), [(4.5, False), (5.0, True), (math.inf, True)])
async def test_first_byte_timeout(
    autojump_clock: trio.testing.MockClock, delay: float, expect_timeout: bool
) -> None:
    async with open_fake(always(Reply(delay=delay, body=[b"ok"]))) as (pool, _):
        start = trio.current_time()
        if expect_timeout:
            with pytest.raises(UpstreamTimeout):
                await fetch(pool)
            assert trio.current_time() - start == 5.0
            assert pool.statistics() == stats(0, 0, 1, 1, 0)
        else:
            assert await fetch(pool) == (200, b"ok")
            assert trio.current_time() - start == delay


async def test_first_byte_timeout_covers_informational(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A 100 Continue does not restart the clock: the final head must arrive within first_byte.
    async def slow_after_continue(origin: Origin) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()

        async def serve() -> None:
            await server.receive_some()
            await server.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            await trio.sleep(4.0)
            await server.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            await trio.sleep_forever()

        nursery.start_soon(serve)
        return client

    async with trio.open_nursery() as nursery:
        pool = UpstreamPool(ORIGIN, timeouts=TIMEOUTS, connect=slow_after_continue)
        with pytest.raises(UpstreamTimeout):
            await fetch(pool)
        assert trio.current_time() == 5.0
        nursery.cancel_scope.cancel()


async def test_between_bytes_timeout(autojump_clock: trio.testing.MockClock) -> None:
    reply = Reply(body=[b"first", b"second"], chunk_delay=10.0, delay=1.0)
    async with open_fake(always(reply)) as (pool, _):
        start = trio.current_time()
        seen: list[str] = []
        with pytest.raises(UpstreamTimeout) as info:
            await collect(pool, seen)
        assert seen == ["head", "first"]
        assert trio.current_time() - start == 1.0 + 2.0
        assert "no data for 2.0s" in str(info.value)
        assert pool.statistics() == stats(0, 0, 1, 1, 0)


async def test_cancelled_mid_body_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reply = Reply(body=[b"a", b"b"], chunk_delay=1.9)
    async with open_fake(always(reply)) as (pool, fake):
        with trio.move_on_after(1.0) as scope:
            async with pool.request(get()) as response:
                async for _ in response.body():
                    pass
        assert scope.cancelled_caught
        assert pool.statistics() == stats(0, 0, 1, 1, 0)
        await trio.sleep(1.0)  # the server notices when it sends its next chunk
        assert fake.closed == 1


# ---- loopback: real sockets, real clock ----------------------------------------------------


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.loopback
async def test_connection_refused_on_loopback() -> None:
    pool = UpstreamPool(Origin(scheme="http", host="127.0.0.1", port=refused_port()))
    with pytest.raises(UpstreamConnectError) as info:
        await fetch(pool)
    assert info.value.kind is ErrorKind.CONNECT
    assert "127.0.0.1" in info.value.upstream


@asynccontextmanager
async def open_tls_upstream(
    tmp_path: Path,
) -> AsyncIterator[tuple[int, Path, list[Received]]]:
    trustme = pytest.importorskip("trustme", reason="trustme (a test dependency) is not installed")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    received: list[Received] = []

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # the client rejected our certificate
        await serve_h11(tls, always(Reply(body=[b"secret"])), received)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], ca_file, received
        nursery.cancel_scope.cancel()


@pytest.mark.loopback
async def test_tls_with_private_ca(tmp_path: Path) -> None:
    async with open_tls_upstream(tmp_path) as (port, ca_file, received):
        origin = Origin(scheme="https", host="127.0.0.1", port=port)
        pool = UpstreamPool(origin, ssl_context=create_ssl_context(ca_file=str(ca_file)))
        assert await fetch(pool) == (200, b"secret")
        assert await fetch(pool) == (200, b"secret")
        assert pool.statistics() == stats(1, 0, 1, 2, 1)
        assert received[0].header("host") == f"127.0.0.1:{port}"
        await pool.aclose()


@pytest.mark.loopback
async def test_tls_untrusted_certificate(tmp_path: Path) -> None:
    async with open_tls_upstream(tmp_path) as (port, _, received):
        pool = UpstreamPool(Origin(scheme="https", host="127.0.0.1", port=port))
        with pytest.raises(UpstreamConnectError) as info:
            await fetch(pool)
        assert info.value.kind is ErrorKind.TLS
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert received == []


@asynccontextmanager
async def open_raw_upstream(answers: list[bytes]) -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback origin writing ``answers`` in turn, one per request head it reads; yields
    its port and, per connection accepted, how many requests it answered."""
    answered: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        answered.append(0)
        me = len(answered) - 1
        buffer = b""
        async with stream:
            while answers:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer.split(b"\r\n\r\n", 1)[1]
                answered[me] += 1  # before sending: the client may check as soon as it has it
                await stream.send_all(answers.pop(0))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], answered
        nursery.cancel_scope.cancel()


def _answer(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body) + b"".join(extra)
    return head + b"\r\n" + body


@pytest.mark.loopback
async def test_sized_bodies_read_off_the_socket_keep_the_connection() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: many receives after the head's
    async with open_raw_upstream([_answer(big), _answer(b"small")]) as (port, answered):
        pool = UpstreamPool(Origin(scheme="http", host="127.0.0.1", port=port))
        assert await fetch(pool) == (200, big)
        assert await fetch(pool) == (200, b"small")
        assert pool.statistics() == stats(1, 0, 1, 2, 1)
        assert answered == [2]
        await pool.aclose()


@pytest.mark.loopback
@pytest.mark.parametrize(
    ("first", "connects"),
    [
        (_answer(b"body") + b"junk after the body", 2),  # bytes past Content-Length
        (_answer(b"body", b"connection: close\r\n"), 2),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\nbody", 2),
        (_answer(b"body"), 1),
    ],
)
async def test_connection_after_a_sized_body_is_reused_only_when_clean(
    first: bytes, connects: int
) -> None:
    async with open_raw_upstream([first, _answer(b"next")]) as (port, _):
        pool = UpstreamPool(Origin(scheme="http", host="127.0.0.1", port=port))
        assert await fetch(pool) == (200, b"body")
        assert await fetch(pool) == (200, b"next")
        assert pool.statistics().connects == connects
        await pool.aclose()


@pytest.mark.loopback
async def test_sized_body_cut_short_is_an_error_and_not_reused() -> None:
    async with open_raw_upstream([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"]) as (
        port,
        _,
    ):
        pool = UpstreamPool(Origin(scheme="http", host="127.0.0.1", port=port))
        with pytest.raises(UpstreamProtocolError, match="closed mid-response"):
            await fetch(pool)
        assert pool.statistics() == stats(0, 0, 1, 1, 0)
        await pool.aclose()
