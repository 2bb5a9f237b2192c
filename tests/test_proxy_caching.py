"""RFC 9111 caching through the running proxy (issue 3), against a scripted fake origin.

The whole proxy runs on memory streams: the upstream is a :class:`~tests.fakes.FakeOrigin`
reached through its memory connector, and each client speaks h11 to ``Server.handle_connection``
over a memory stream pair, so ages and virtual times are exact. The clock is a ``MockClock``
whose autojump waits for 20 ms of real idleness (see :data:`AUTOJUMP_THRESHOLD`).
"""

from __future__ import annotations

import errno
import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from proxychain import proxy as proxy_module
from proxychain.clock import Clock
from proxychain.disk import open_disk_tier
from proxychain.http import Request
from proxychain.proxy import Proxy, open_proxy
from proxychain.server import Server
from proxychain.upstream import Origin
from tests.conftest import make_settings
from tests.fakes import FakeOrigin, Reply, ok

WALL_ANCHOR = 1_700_000_000.0  # pinned wall clock: Date and Age are deterministic
UPSTREAM = "http://origin.test"
READ_SIZE = 65536  # bytes per client read
# The disk tier works in worker threads; with a zero threshold MockClock would leap to the next
# deadline (a coalescing or upstream timeout) while a thread runs. 20 ms of real idleness is
# far longer than a local file call and still keeps virtual sleeps cheap.
AUTOJUMP_THRESHOLD = 0.02  # seconds of real time
# A client has the whole body (Content-Length) before the proxy commits the entry; settling
# waits until every task, worker threads included, is idle this long (real time, shorter than
# the autojump threshold so no virtual time passes).
SETTLE_CUSHION = 0.005  # seconds of real time


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """pytest-trio runs a test on the clock fixture it requests."""
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


@dataclass
class Got:
    """What a client saw; ``complete`` is False when the body ended without its last byte."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    at: float  # virtual time the head arrived

    @property
    def cache(self) -> str:
        return self.headers.get("x-cache", "-")


@dataclass
class Harness:
    """A proxy under test, its origin, and a client that talks to its server."""

    proxy: Proxy
    server: Server
    origin: FakeOrigin
    nursery: trio.Nursery
    origin_ends: list[trio.abc.Stream] = field(default_factory=list)

    async def connect(self, address: Origin) -> trio.abc.Stream:
        """The proxy's connector: memory streams to the origin, refused while it is down."""
        if self.origin.refuse:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        client, server_end = trio.testing.memory_stream_pair()
        self.origin_ends.append(server_end)
        self.nursery.start_soon(self.origin.handle, server_end)
        return client

    async def take_down(self) -> None:
        """The origin dies: open connections drop and new ones are refused."""
        self.origin.refuse = True
        for end in self.origin_ends:
            await trio.aclose_forcefully(end)

    async def get(self, target: str, *headers: tuple[str, str], method: str = "GET") -> Got:
        """One request on a fresh client connection, read to its end."""
        return await self.send(target, *headers, method=method)

    async def send(
        self, target: str, *headers: tuple[str, str], method: str = "GET", body: bytes = b""
    ) -> Got:
        client, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.handle_connection, server_end)
        conn = h11.Connection(h11.CLIENT)
        fields = [("host", "proxy.test"), *headers]
        if body or method in ("POST", "PUT"):
            fields.append(("content-length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=target, headers=fields))
        data += conn.send(h11.Data(data=body)) if body else b""
        await client.send_all(data + conn.send(h11.EndOfMessage()))
        head: h11.Response | None = None
        at = 0.0
        chunks: list[bytes] = []
        complete = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await client.receive_some(READ_SIZE)))
                continue
            if isinstance(event, h11.Response):
                head, at = event, trio.current_time()
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                complete = True
                break
            else:
                break
        await client.aclose()
        await self.settle()
        assert head is not None
        fields_in = {n.decode().lower(): v.decode() for n, v in head.headers}
        return Got(head.status_code, fields_in, b"".join(chunks), complete, at)

    async def settle(self) -> None:
        """Let the proxy finish what a response left behind (commits, revalidations)."""
        limiters = (self.proxy.store.disk._limiter, trio.to_thread.current_default_thread_limiter())
        await trio.testing.wait_all_tasks_blocked(SETTLE_CUSHION)
        # A task waiting for a worker thread counts as blocked: wait for the threads too.
        while any(limiter.borrowed_tokens for limiter in limiters):
            await trio.testing.wait_all_tasks_blocked(SETTLE_CUSHION)

    def conditionals(self, path: str) -> list[str | None]:
        """``If-None-Match`` of every request for ``path`` the origin received."""
        return [r.headers.get("if-none-match") for r in self.origin.requests if r.path == path]


@asynccontextmanager
async def open_harness(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    routes: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[Harness]:
    """Run a proxy on memory streams in front of one fake origin."""
    # No periodic disk rescan: its sleep would be a deadline MockClock could leap to.
    monkeypatch.setattr(
        proxy_module, "open_disk_tier", functools.partial(open_disk_tier, rescan_interval=None)
    )
    settings = make_settings(tmp_path / "cache", routes or [route()], **sections)
    origin = FakeOrigin()
    connect: list[Callable[[Origin], Awaitable[trio.abc.Stream]]] = []

    async def connector(address: Origin) -> trio.abc.Stream:
        return await connect[0](address)

    async with trio.open_nursery() as nursery:
        origin.attach(nursery)
        async with open_proxy(
            settings,
            clock=Clock(wall_anchor=WALL_ANCHOR),
            connect=connector,
            rng=random.Random(0),
        ) as proxy:
            harness = Harness(proxy, Server(proxy, settings.server, proxy.clock), origin, nursery)
            connect.append(harness.connect)
            yield harness
        nursery.cancel_scope.cancel()


def route(prefix: str = "/", **extra: object) -> dict[str, Any]:
    return {"prefix": prefix, "upstreams": UPSTREAM, **extra}


def validating(
    body: bytes, etag: str, *headers: tuple[str, str], on_304: tuple[tuple[str, str], ...] = ()
) -> Callable[[Request], Reply]:
    """A resource that answers 304 when ``If-None-Match`` names ``etag`` (weakly)."""

    def reply(request: Request) -> Reply:
        wanted = [t.strip().removeprefix("W/") for t in request.headers.get_list("if-none-match")]
        if etag in wanted:
            return Reply(status=304, headers=[("etag", etag), *(on_304 or headers)])
        return Reply(headers=[("etag", etag), *headers], body=body)

    return reply


# ---- 1. stale-while-revalidate (RFC 5861 §3) ----------------------------------------------------


async def test_stale_while_revalidate_answers_at_once_and_revalidates_once(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cc = ("cache-control", "max-age=10, stale-while-revalidate=60")
    async with open_harness(tmp_path, monkeypatch) as h:
        fresh = validating(b"v1", '"e1"', cc)
        h.origin.set(
            "/swr", lambda r: _delayed(fresh(r), 5.0 if r.headers.get("if-none-match") else 0)
        )
        prime = await h.get("/swr")
        clock.jump(30)
        t1 = trio.current_time()
        stale = await h.get("/swr")
        again = await h.get("/swr")
        assert trio.current_time() == t1  # neither waited for the 5 s revalidation
        await h.settle()
        assert h.conditionals("/swr") == [None, '"e1"']
        await trio.sleep(6)  # the 304 arrives at t1 + 5
        after = await h.get("/swr")
    assert (prime.status, prime.cache, prime.headers["age"]) == (200, "MISS", "0")
    assert (stale.status, stale.cache, stale.headers["age"], stale.body) == (
        200,
        "STALE",
        "30",
        b"v1",
    )
    assert (again.cache, again.headers["age"]) == ("STALE", "30")
    # RFC 9111 §4.2.3: the 5 s response delay counts into the age, plus 1 s resident.
    assert (after.cache, after.headers["age"], after.body) == ("HIT", "6", b"v1")
    assert h.conditionals("/swr") == [None, '"e1"']


def _delayed(reply: Reply, delay: float) -> Reply:
    reply.delay = delay
    return reply


async def test_route_default_swr_window_applies_when_upstream_sends_none(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = [route(stale_while_revalidate="60s")]
    async with open_harness(tmp_path, monkeypatch, routes) as h:
        h.origin.set("/meta", validating(b"m", '"m1"', ("cache-control", "max-age=10")))
        await h.get("/meta")
        clock.jump(30)
        stale = await h.get("/meta")
        await h.settle()
        conditionals = h.conditionals("/meta")
        clock.jump(40)  # 40 s after the 304: stale again, inside the window
        second = await h.get("/meta")
        await h.settle()
        clock.jump(71)  # staleness 71 - 10 = 61 s > 60 s: revalidated in the foreground
        outside = await h.get("/meta")
    assert (stale.cache, stale.headers["age"]) == ("STALE", "30")
    assert conditionals == [None, '"m1"']
    assert (second.cache, second.headers["age"]) == ("STALE", "40")
    assert outside.cache == "REVALIDATED"
    assert h.conditionals("/meta") == [None, '"m1"', '"m1"', '"m1"']


# ---- 2. stale-if-error (RFC 5861 §4) and failures with nothing stored ---------------------------


async def test_stale_if_error_window_then_502_with_one_line_reason(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/e", ok(b"kept", ("cache-control", "max-age=10, stale-if-error=100")))
        await h.get("/e")
        await h.take_down()
        clock.jump(50)
        inside = await h.get("/e")
        clock.jump(70)  # staleness 110 s > 100 s
        beyond = await h.get("/e")
        never = await h.get("/never-stored")
    assert (inside.status, inside.cache, inside.headers["age"], inside.body) == (
        200,
        "STALE",
        "50",
        b"kept",
    )
    assert beyond.status == never.status == 502
    for failed in (beyond, never):
        assert failed.body.count(b"\n") == 1
        assert failed.body.endswith(b"\n")
        assert failed.headers["x-proxychain-error"] == failed.body.decode().strip()


async def test_route_max_stale_serves_when_upstream_answers_503(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch, [route(max_stale="1h")]) as h:
        h.origin.set("/m", ok(b"meta", ("cache-control", "max-age=10")))
        await h.get("/m")
        h.origin.set("/m", Reply(status=503, body=b"down"))
        clock.jump(3600)  # staleness 3590 s
        inside = await h.get("/m")
        clock.jump(20)  # staleness 3610 s
        beyond = await h.get("/m")
    assert (inside.status, inside.cache, inside.headers["age"], inside.body) == (
        200,
        "STALE",
        "3600",
        b"meta",
    )
    # The chain treats a 503 as a failed upstream: nothing usable left, so 502 with the reason.
    assert (beyond.status, beyond.body) == (502, b"upstream http://origin.test answered 503\n")


async def test_timeout_with_nothing_stored_is_504(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = [route(timeouts={"first_byte": "2s", "deadline": "3s"}, retries=0)]
    async with open_harness(tmp_path, monkeypatch, routes) as h:
        h.origin.set("/slow", Reply(never=True))
        t0 = trio.current_time()
        got = await h.get("/slow")
    assert got.status == 504
    assert got.at - t0 == 2.0


async def test_must_revalidate_forbids_stale_if_error(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cc = ("cache-control", "max-age=10, must-revalidate, stale-if-error=100")
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/mr", ok(b"strict", cc))
        await h.get("/mr")
        await h.take_down()
        clock.jump(50)
        got = await h.get("/mr")
    # RFC 9111 §5.2.2.2: a cache that cannot revalidate must answer 504, never the stored body.
    assert (got.status, got.cache, got.body.startswith(b"strict")) == (504, "-", False)


async def test_must_revalidate_on_disconnect_is_504(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cc = ("cache-control", "max-age=10, must-revalidate")
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/mr", ok(b"strict", cc))
        await h.get("/mr")
        await h.take_down()
        clock.jump(50)
        got = await h.get("/mr")
    assert got.status == 504


# ---- 3. revalidation in the foreground (RFC 9111 §4.3) ------------------------------------------


async def test_foreground_304_freshens_and_updates_stored_headers(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set(
            "/r",
            validating(
                b"body",
                '"r1"',
                ("cache-control", "max-age=10"),
                ("x-version", "1"),
                on_304=(("x-version", "2"), ("cache-control", "max-age=100")),
            ),
        )
        await h.get("/r")
        clock.jump(20)
        revalidated = await h.get("/r")
        clock.jump(50)
        hit = await h.get("/r")
    assert (revalidated.status, revalidated.cache, revalidated.body) == (
        200,
        "REVALIDATED",
        b"body",
    )
    assert revalidated.headers["x-version"] == "2"
    assert (hit.cache, hit.headers["age"], hit.headers["x-version"]) == ("HIT", "50", "2")
    assert hit.headers["cache-control"] == "max-age=100"
    assert h.conditionals("/r") == [None, '"r1"']


async def test_foreground_200_replaces_the_entry(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/r", ok(b"old", ("cache-control", "max-age=10")))
        await h.get("/r")
        h.origin.set("/r", ok(b"new", ("cache-control", "max-age=10")))
        clock.jump(20)
        replaced = await h.get("/r")
        hit = await h.get("/r")
    assert (replaced.cache, replaced.body) == ("MISS", b"new")
    assert (hit.cache, hit.body) == ("HIT", b"new")
    assert len(h.conditionals("/r")) == 2


# ---- 4. request directives (RFC 9111 §5.2.1, §5.4) ----------------------------------------------


@pytest.mark.parametrize(
    ("age", "headers", "outcome", "upstream_requests"),
    [
        (5, [("cache-control", "no-cache")], "REVALIDATED", 2),
        (5, [("cache-control", "max-age=0")], "REVALIDATED", 2),  # pip
        (5, [("cache-control", "max-age=5")], "HIT", 1),
        (5, [("pragma", "no-cache")], "REVALIDATED", 2),
        (5, [("pragma", "no-cache"), ("cache-control", "max-stale")], "HIT", 1),
        (5, [("cache-control", "min-fresh=6")], "REVALIDATED", 2),
        (5, [("cache-control", "min-fresh=5")], "HIT", 1),
        (20, [("cache-control", "max-stale=10")], "STALE", 1),
        (20, [("cache-control", "max-stale=9")], "REVALIDATED", 2),
        (20, [("cache-control", "max-stale")], "STALE", 1),
        (5, [("cache-control", "only-if-cached")], "HIT", 1),
    ],
)
async def test_request_directives(
    clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    age: float,
    headers: list[tuple[str, str]],
    outcome: str,
    upstream_requests: int,
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/d", validating(b"d", '"d1"', ("cache-control", "max-age=10")))
        await h.get("/d")
        clock.jump(age)
        got = await h.get("/d", *headers)
    assert (got.status, got.cache, got.body) == (200, outcome, b"d")
    assert len(h.conditionals("/d")) == upstream_requests


async def test_only_if_cached_when_not_stored_is_504_without_upstream(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        got = await h.get("/absent", ("cache-control", "only-if-cached"))
    assert got.status == 504
    assert h.origin.requests == []


async def test_goproxy_zip_ignores_client_max_age_zero(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zip_path = "/example.com/m/@v/v1.0.0.zip"
    async with open_harness(tmp_path, monkeypatch, [route("/go/", kind="goproxy")]) as h:
        h.origin.set(zip_path, Reply(headers=[("content-type", "application/zip")], body=b"PK"))
        first = await h.get("/go" + zip_path)
        clock.jump(86400)
        again = await h.get("/go" + zip_path, ("cache-control", "max-age=0"))
        no_cache = await h.get("/go" + zip_path, ("cache-control", "no-cache"))
    assert (first.cache, again.cache, no_cache.cache) == ("MISS", "HIT", "HIT")
    assert again.body == no_cache.body == b"PK"
    assert h.origin.count(zip_path) == 1


# ---- 5. Vary (RFC 9111 §4.1) ---------------------------------------------------------------------


async def test_vary_variants_side_by_side(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def negotiate(request: Request) -> Reply:
        coding = request.headers.get("accept-encoding") or "identity"
        return Reply(
            headers=[("cache-control", "max-age=100"), ("vary", "Accept-Encoding")],
            body=f"body in {coding}".encode(),
        )

    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/v", negotiate)
        gz = await h.get("/v", ("accept-encoding", "gzip"))
        plain = await h.get("/v")
        gz_hit = await h.get("/v", ("accept-encoding", "gzip"))
        plain_hit = await h.get("/v")
    assert [(g.cache, g.body) for g in (gz, plain, gz_hit, plain_hit)] == [
        ("MISS", b"body in gzip"),
        ("MISS", b"body in identity"),
        ("HIT", b"body in gzip"),
        ("HIT", b"body in identity"),
    ]
    assert h.origin.count("/v") == 2


async def test_clients_taking_gzip_share_one_variant(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pip, npm, Go and curl --compressed each send their own Accept-Encoding list; all take
    # gzip, so one fill asking for gzip serves them all.
    def negotiate(request: Request) -> Reply:
        asked = request.headers.get("accept-encoding")
        return Reply(
            headers=[("cache-control", "max-age=100"), ("vary", "Accept-Encoding")],
            body=f"body for {asked}".encode(),
        )

    lists = ["gzip, deflate", "gzip,deflate", "gzip", "deflate, gzip, br, zstd"]
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/v", negotiate)
        gzipped = [await h.get("/v", ("accept-encoding", value)) for value in lists]
        other = await h.get("/v", ("accept-encoding", "br"))
        refused = await h.get("/v", ("accept-encoding", "gzip;q=0, deflate"))
        plain = await h.get("/v")
    assert [(g.cache, g.body) for g in gzipped] == [("MISS", b"body for gzip")] + [
        ("HIT", b"body for gzip")
    ] * 3
    assert [(g.cache, g.body) for g in (other, refused)] == [
        ("MISS", b"body for identity"),
        ("HIT", b"body for identity"),
    ]
    assert (plain.cache, plain.body) == ("MISS", b"body for None")
    assert [r.headers.get("accept-encoding") for r in h.origin.requests] == [
        "gzip",
        "identity",
        None,
    ]


async def test_vary_star_is_never_stored(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/star", ok(b"s", ("cache-control", "max-age=100"), ("vary", "*")))
        got = [await h.get("/star") for _ in range(3)]
    assert [(g.status, g.body) for g in got] == [(200, b"s")] * 3
    assert h.origin.count("/star") == 3
    assert await h.proxy.store.lookup(_key("/star")) == []


def _key(url: str) -> str:
    from proxychain.keys import primary_key

    return primary_key("GET", url)


# ---- 6. client conditionals answered from the cache (RFC 9111 §4.3.2) --------------------------

LAST_MODIFIED = "Tue, 14 Nov 2023 20:00:00 GMT"


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (("if-none-match", 'W/"c1"'), 304),  # weak comparison
        (("if-none-match", '"x", "c1"'), 304),
        (("if-none-match", "*"), 304),
        (("if-none-match", '"other"'), 200),
        (("if-modified-since", LAST_MODIFIED), 304),
        (("if-modified-since", "Tue, 14 Nov 2023 21:00:00 GMT"), 304),
        (("if-modified-since", "Tue, 14 Nov 2023 19:59:59 GMT"), 200),
    ],
)
async def test_client_conditionals_answered_from_cache(
    clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    header: tuple[str, str],
    status: int,
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set(
            "/c",
            Reply(
                headers=[
                    ("etag", '"c1"'),
                    ("last-modified", LAST_MODIFIED),
                    ("cache-control", "max-age=100"),
                ],
                body=b"content",
            ),
        )
        await h.get("/c")
        got = await h.get("/c", header)
    assert (got.status, got.cache) == (status, "HIT")
    assert got.body == (b"" if status == 304 else b"content")
    assert got.headers["etag"] == '"c1"'
    assert ("content-length" in got.headers) == (status == 200)
    assert h.origin.count("/c") == 1


# ---- 7. negative caching -------------------------------------------------------------------------


async def test_404_cached_for_negative_ttl_then_refetched(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/gone", Reply(status=404, body=b"nope"))
        first = await h.get("/gone")
        clock.jump(59)
        hit = await h.get("/gone")
        bypass = await h.get("/gone", ("cache-control", "no-cache"))
        clock.jump(61)
        refetched = await h.get("/gone")
    assert [(g.status, g.cache) for g in (first, hit, refetched)] == [
        (404, "MISS"),
        (404, "HIT"),
        (404, "MISS"),
    ]
    assert hit.headers["age"] == "59"
    assert bypass.status == 404
    assert bypass.cache != "HIT"
    assert h.origin.count("/gone") == 3


# ---- 8. ranges from a stored entry (RFC 9110 §14) ------------------------------------------------

RANGE_BODY = bytes(range(256)) * 4  # 1 KiB


def _parts(got: Got) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body."""
    kind, _, boundary = got.headers["content-type"].partition("; boundary=")
    assert kind == "multipart/byteranges"
    out = []
    delimiter = b"--" + boundary.encode()
    sections = got.body.split(b"\r\n" + delimiter)
    assert got.body.startswith(delimiter) or got.body.startswith(b"\r\n" + delimiter)
    assert sections[-1] == b"--\r\n"
    for section in sections[:-1]:
        if not section.strip() or section == delimiter:
            continue
        head, _, data = section.removeprefix(delimiter).partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        out.append(
            (
                fields["Content-Range"] if "Content-Range" in fields else fields["content-range"],
                data,
            )
        )
    return out


async def test_ranges_from_stored_entry(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/r.bin", ok(RANGE_BODY, ("cache-control", "max-age=100")))
        await h.get("/r.bin")
        etag = (await h.get("/r.bin", method="HEAD")).headers["etag"]
        single = await h.get("/r.bin", ("range", "bytes=2-5"))
        suffix = await h.get("/r.bin", ("range", "bytes=-4"))
        multi = await h.get("/r.bin", ("range", "bytes=0-1,1000-"))
        if_range = await h.get("/r.bin", ("range", "bytes=2-5"), ("if-range", etag))
        stale_if_range = await h.get("/r.bin", ("range", "bytes=2-5"), ("if-range", '"old"'))
        unsatisfiable = await h.get("/r.bin", ("range", "bytes=5000-"))
        head = await h.get("/r.bin", ("range", "bytes=2-5"), method="HEAD")
    assert (single.status, single.headers["content-range"], single.body) == (
        206,
        "bytes 2-5/1024",
        RANGE_BODY[2:6],
    )
    assert (suffix.status, suffix.body) == (206, RANGE_BODY[-4:])
    assert multi.status == 206
    assert _parts(multi) == [
        ("bytes 0-1/1024", RANGE_BODY[:2]),
        ("bytes 1000-1023/1024", RANGE_BODY[1000:]),
    ]
    assert (if_range.status, if_range.body) == (206, RANGE_BODY[2:6])
    assert (stale_if_range.status, stale_if_range.body) == (200, RANGE_BODY)
    assert (unsatisfiable.status, unsatisfiable.headers["content-range"]) == (416, "bytes */1024")
    # RFC 9110 §14.2: range handling is defined for GET only, so HEAD ignores Range.
    assert (head.status, head.headers["content-length"], head.body) == (200, "1024", b"")
    assert h.origin.count("/r.bin") == 1


async def test_head_from_stored_entry_has_length_and_no_body(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/h", ok(b"twelve bytes", ("cache-control", "max-age=100")))
        await h.get("/h")
        head = await h.get("/h", method="HEAD")
    assert (head.status, head.cache, head.headers["content-length"], head.body) == (
        200,
        "HIT",
        "12",
        b"",
    )


# ---- 9. invalidation by unsafe methods (RFC 9111 §4.4) -------------------------------------------


async def _invalidated_by(
    h: Harness, method: str, location: str, content_location: str
) -> tuple[Got, dict[str, str]]:
    """Cache four paths, send ``method`` to /p, and report what each path is afterwards."""
    cached = ("/p", "/loc", "/cl", "/other")
    for path in cached:
        h.origin.set(path, ok(path.encode(), ("cache-control", "max-age=100")))
        await h.get(path)
    h.origin.set(
        "/p",
        lambda r: (
            ok(b"/p", ("cache-control", "max-age=100"))
            if r.method == "GET"
            else Reply(
                status=201,
                headers=[("location", location), ("content-location", content_location)],
            )
        ),
    )
    changed = await h.send("/p", method=method, body=b"x")
    return changed, {path: (await h.get(path)).cache for path in cached}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_unsafe_success_invalidates_target_location_and_content_location(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        changed, after = await _invalidated_by(h, method, "/loc", "cl")
    assert (changed.status, changed.cache) == (201, "BYPASS")
    assert after == {"/p": "MISS", "/loc": "MISS", "/cl": "MISS", "/other": "HIT"}


async def test_absolute_same_origin_content_location_is_invalidated(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        _, after = await _invalidated_by(
            h, "POST", "http://elsewhere.test/loc", "http://proxy.test/cl"
        )
    assert after == {"/p": "MISS", "/loc": "HIT", "/cl": "MISS", "/other": "HIT"}


async def test_unsafe_error_does_not_invalidate(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/p", ok(b"p", ("cache-control", "max-age=100")))
        await h.get("/p")
        h.origin.set("/p", lambda r: Reply(status=409) if r.method == "POST" else ok(b"p"))
        refused = await h.send("/p", method="POST", body=b"x")
        after = await h.get("/p")
    assert (refused.status, after.cache) == (409, "HIT")


# ---- 10. purge ----------------------------------------------------------------------------------


async def test_a_request_after_a_purge_under_workers_fetches_anew(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under --workers a purged fill keeps its cross-process fill lock until it ends; a request
    after the purge fetches anew instead of mirroring its own process's purged fill."""
    pieces = [b"a" * 10, b"b" * 10]
    async with open_harness(tmp_path, monkeypatch, server={"workers": 2}) as h:
        h.origin.set(
            "/p", Reply(headers=[("cache-control", "max-age=100")], body=pieces, chunk_delay=1.0)
        )
        got: list[Got] = []

        async def fetch() -> None:
            got.append(await h.get("/p"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            await trio.sleep(0.5)  # the first fill is in flight
            await h.proxy.purge(url="/p")
            nursery.start_soon(fetch)
    assert [(g.status, g.cache, g.body) for g in got] == [(200, "MISS", b"".join(pieces))] * 2
    assert h.origin.count("/p") == 2


async def test_purge_url_and_prefix_from_both_tiers(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = ("/one", "/dir/a", "/dir/b", "/dirt")
    async with open_harness(tmp_path, monkeypatch, cache={"memory_object_max": "4KiB"}) as h:
        for path in paths:
            h.origin.set(path, ok(path.encode() * 2000, ("cache-control", "max-age=100")))
        h.origin.set("/one", ok(b"small", ("cache-control", "max-age=100")))
        for path in paths:
            await h.get(path)
        one_tier = (await h.get("/one")).headers["x-cache-tier"]
        removed_url = await h.proxy.purge(url="/one")
        removed_prefix = await h.proxy.purge(prefix="/dir/")
        stored = {p: await h.proxy.store.lookup(_key(p)) for p in paths}
        after = {p: (await h.get(p)).cache for p in paths}
    assert one_tier == "memory"
    assert (removed_url, removed_prefix) == (1, 2)
    assert {p: len(s) for p, s in stored.items()} == {
        "/one": 0,
        "/dir/a": 0,
        "/dir/b": 0,
        "/dirt": 1,
    }
    assert after == {"/one": "MISS", "/dir/a": "MISS", "/dir/b": "MISS", "/dirt": "HIT"}


# ---- 12. a Range request on a miss (issue item 11) -----------------------------------------------


async def test_range_on_miss_answers_206_early_and_fills_the_whole_object(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The follower reads the fill's file in worker threads; a short real-time threshold keeps
    # autojump from leaping over the origin's chunk delays while a read is in flight.
    clock.autojump_threshold = 0.25
    chunks = [bytes([i]) * 1024 for i in range(8)]
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set(
            "/big",
            Reply(headers=[("cache-control", "max-age=100")], body=chunks, chunk_delay=1.0),
        )
        t0 = trio.current_time()
        part = await h.get("/big", ("range", "bytes=1024-1027"))
        answered = trio.current_time() - t0
        await trio.sleep(10)
        whole = await h.get("/big")
    assert (part.status, part.headers.get("content-range"), part.body) == (
        206,
        "bytes 1024-1027/8192",
        b"\x01" * 4,
    )
    assert answered == 2.0  # as soon as the second chunk arrived, not after all eight
    assert (whole.cache, whole.body) == ("HIT", b"".join(chunks))
    assert h.origin.count("/big") == 1


async def test_unstored_response_is_labelled_bypass(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/ns", ok(b"n", ("cache-control", "no-store")))
        got = await h.get("/ns")
    assert (got.status, got.cache) == (200, "BYPASS")


async def test_request_joining_a_fill_whose_body_is_complete_is_a_hit(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxychain.store import StoreWriter

    release = trio.Event()
    commit = StoreWriter.commit

    async def slow_commit(self: StoreWriter, *args: Any, **kwargs: Any) -> Any:
        await release.wait()  # the fsync and rename are still running
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "commit", slow_commit)
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/f", ok(b"whole body", ("cache-control", "max-age=100")))
        first = await h.get("/f")
        second = await h.get("/f")  # the first fill has the body but has not committed
        release.set()
        await h.settle()
        third = await h.get("/f")
    assert [(g.cache, g.body) for g in (first, second, third)] == [
        ("MISS", b"whole body"),
        ("HIT", b"whole body"),
        ("HIT", b"whole body"),
    ]
    assert h.origin.count("/f") == 1


async def test_invalidation_while_the_commit_runs_keeps_nothing(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxychain.store import StoreWriter

    release = trio.Event()
    commit = StoreWriter.commit

    async def slow_commit(self: StoreWriter, *args: Any, **kwargs: Any) -> Any:
        await release.wait()  # the client has its body; the fsync and rename are running
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "commit", slow_commit)
    async with open_harness(tmp_path, monkeypatch) as h:
        versions = iter([b"v1", b"v2"])
        h.origin.set(
            "/doc",
            lambda r: (
                ok(next(versions), ("cache-control", "max-age=100"))
                if r.method == "GET"
                else Reply(status=204)
            ),
        )
        first = await h.get("/doc")
        changed = await h.send("/doc", method="PUT", body=b"v2")
        release.set()  # the commit of v1 ends after the PUT invalidated /doc
        await h.settle()
        after = await h.get("/doc")
        again = await h.get("/doc")
    assert (first.cache, first.body, changed.status) == ("MISS", b"v1", 204)
    assert [(g.cache, g.body) for g in (after, again)] == [("MISS", b"v2"), ("HIT", b"v2")]
    assert h.origin.count("/doc") == 3


# ---- 13. the hot path: one keep-alive client asking again and again ------------------------------


class _KeepAliveClient:
    """One client connection to the proxy's server, used for request after request (as a
    load generator does): what is remembered between hits must never leak into an answer."""

    def __init__(self, h: Harness, stream: trio.abc.Stream) -> None:
        self._h = h
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT)

    async def get(self, target: str, *headers: tuple[str, str], method: str = "GET") -> Got:
        conn = self._conn
        fields = [("host", "proxy.test"), *headers]
        data = conn.send(h11.Request(method=method, target=target, headers=fields))
        await self._stream.send_all(data + conn.send(h11.EndOfMessage()))
        head: h11.Response | None = None
        at = 0.0
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await self._stream.receive_some(READ_SIZE)))
            elif isinstance(event, h11.Response):
                head, at = event, trio.current_time()
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            else:
                assert isinstance(event, h11.EndOfMessage)
                break
        conn.start_next_cycle()  # fails unless the connection stays open for the next one
        await self._h.settle()
        assert head is not None
        fields_in = {n.decode().lower(): v.decode() for n, v in head.headers}
        return Got(head.status_code, fields_in, b"".join(chunks), True, at)


@asynccontextmanager
async def _keep_alive(h: Harness) -> AsyncIterator[_KeepAliveClient]:
    client, server_end = trio.testing.memory_stream_pair()
    h.nursery.start_soon(h.server.handle_connection, server_end)
    yield _KeepAliveClient(h, client)
    await client.aclose()


async def test_repeated_hits_on_one_connection_stay_exact(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plain hits between the variations: the shared header blocks, the remembered target,
    # freshness and head of the entry must not carry one request's answer into another's.
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/hot", validating(RANGE_BODY, '"h1"', ("cache-control", "max-age=100")))
        async with _keep_alive(h) as c:
            miss = await c.get("/hot")
            hit = await c.get("/hot")
            clock.jump(7)
            aged = await c.get("/hot")
            not_modified = await c.get("/hot", ("if-none-match", '"h1"'))
            after_304 = await c.get("/hot")
            head = await c.get("/hot", method="HEAD")
            part = await c.get("/hot", ("range", "bytes=2-5"))
            whole = await c.get("/hot")
            validated = await c.get("/hot", ("cache-control", "max-age=0"))
            clock.jump(3)
            freshened = await c.get("/hot")
            await h.proxy.purge(url="/hot")
            purged = await c.get("/hot")
            refilled = await c.get("/hot")
    got = [
        miss,
        hit,
        aged,
        not_modified,
        after_304,
        head,
        part,
        whole,
        validated,
        freshened,
        purged,
        refilled,
    ]
    assert [(g.status, g.cache, g.headers.get("age"), g.body) for g in got] == [
        (200, "MISS", "0", RANGE_BODY),
        (200, "HIT", "0", RANGE_BODY),
        (200, "HIT", "7", RANGE_BODY),
        (304, "HIT", "7", b""),
        (200, "HIT", "7", RANGE_BODY),
        (200, "HIT", "7", b""),
        (206, "HIT", "7", RANGE_BODY[2:6]),
        (200, "HIT", "7", RANGE_BODY),
        (200, "REVALIDATED", "0", RANGE_BODY),
        (200, "HIT", "3", RANGE_BODY),  # the age of the freshened entry, not the old one's
        (200, "MISS", "0", RANGE_BODY),
        (200, "HIT", "0", RANGE_BODY),
    ]
    assert (head.headers["content-length"], part.headers["content-range"]) == (
        "1024",
        "bytes 2-5/1024",
    )
    assert h.conditionals("/hot") == [None, '"h1"', None]
