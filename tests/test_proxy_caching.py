"""RFC 9111 caching through the running proxy (issue 3), against a scripted fake origin.

The whole proxy runs on memory streams: the upstream is a :class:`~tests.fakes.FakeOrigin`
reached through its memory connector, and each client speaks h11 to ``Server.handle_connection``
over a memory stream pair, so ages and virtual times are exact. The clock is a ``MockClock``
whose autojump waits for 20 ms of real idleness (see :data:`AUTOJUMP_THRESHOLD`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
from tests.conftest import make_settings
from tests.fakes import FakeOrigin, Reply, ok

WALL_ANCHOR = 1_700_000_000.0  # pinned wall clock: Date and Age are deterministic
UPSTREAM = "http://origin.test"
READ_SIZE = 65536  # bytes per client read
# The disk tier works in worker threads; with a zero threshold MockClock would leap to the next
# deadline (a coalescing or upstream timeout) while a thread runs. 20 ms of real idleness is
# far longer than a local file call and still keeps virtual sleeps cheap.
AUTOJUMP_THRESHOLD = 0.02  # seconds of real time


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
                conn.receive_data(await client.receive_some(READ_SIZE))
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
        assert head is not None
        fields_in = {n.decode().lower(): v.decode() for n, v in head.headers}
        return Got(head.status_code, fields_in, b"".join(chunks), complete, at)

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
    async with trio.open_nursery() as nursery:
        origin.attach(nursery)
        async with open_proxy(
            settings,
            clock=Clock(wall_anchor=WALL_ANCHOR),
            connect=origin.connect,
            rng=random.Random(0),
        ) as proxy:
            yield Harness(proxy, Server(proxy, settings.server, proxy.clock), origin, nursery)
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
            return Reply(status=304, headers=[("etag", etag), *headers, *on_304])
        return Reply(headers=[("etag", etag), *headers], body=body)

    return reply


Opened = Callable[..., Any]


# ---- 1. stale-while-revalidate (RFC 5861 §3) ----------------------------------------------------


async def test_stale_while_revalidate_answers_at_once_and_revalidates_once(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cc = ("cache-control", "max-age=10, stale-while-revalidate=60")
    async with open_harness(tmp_path, monkeypatch) as h:
        fresh = validating(b"v1", '"e1"', cc)
        h.origin.set("/swr", lambda r: _delayed(fresh(r), 5.0 if r.headers.get("if-none-match") else 0))
        prime = await h.get("/swr")
        clock.jump(30)
        t1 = trio.current_time()
        stale = await h.get("/swr")
        again = await h.get("/swr")
        assert trio.current_time() == t1  # neither waited for the 5 s revalidation
        await trio.testing.wait_all_tasks_blocked()
        assert h.conditionals("/swr") == [None, '"e1"']
        await trio.sleep(6)  # the 304 arrives at t1 + 5
        after = await h.get("/swr")
    assert (prime.status, prime.cache, prime.headers["age"]) == (200, "MISS", "0")
    assert (stale.status, stale.cache, stale.headers["age"], stale.body) == (200, "STALE", "30", b"v1")
    assert (again.cache, again.headers["age"]) == ("STALE", "30")
    assert (after.cache, after.headers["age"], after.body) == ("HIT", "1", b"v1")
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
        await trio.testing.wait_all_tasks_blocked()
        conditionals = h.conditionals("/meta")
        clock.jump(40)  # 40 s after the 304: stale again, inside the window
        second = await h.get("/meta")
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(71)  # staleness 71 - 10 = 61 s > 60 s: revalidated in the foreground
        outside = await h.get("/meta")
    assert (stale.cache, stale.headers["age"]) == ("STALE", "30")
    assert conditionals == [None, '"m1"']
    assert (second.cache, second.headers["age"]) == ("STALE", "40")
    assert outside.cache == "REVALIDATED"
    assert h.conditionals("/meta") == [None, '"m1"', '"m1"', '"m1"']
