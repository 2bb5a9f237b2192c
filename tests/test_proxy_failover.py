"""Failover through the running proxy: chains, breakers, retries, timeouts, health checks.

Most tests run the whole proxy under ``MockClock`` (the ``autojump_clock`` fixture): upstreams are
:class:`~tests.fakes.FakeOrigin` tasks on memory streams, reached through a connector that
counts every connection attempt per upstream, and clients speak h11 to the server's connection
handler over memory streams too, so the expected virtual times and counts are exact.
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator
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
from proxychain.proxy import Proxy, open_proxy
from proxychain.server import Server
from proxychain.upstream import Origin
from tests.conftest import make_settings
from tests.fakes import FakeOrigin, Reply, ok

WALL_ANCHOR = 1_700_000_000.0  # pinned wall clock: Date and Age are deterministic
A, B = "http://a", "http://b"
READ_SIZE = 65536


@dataclass
class Got:
    """What a client saw: ``complete`` is False when the body ended without its last byte."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    at: float  # virtual time the response head arrived


@dataclass
class Net:
    """Fake upstreams by host, and every connection attempt the proxy made, in order."""

    origins: dict[str, FakeOrigin]
    attempts: list[tuple[str, float]] = field(default_factory=list)

    def count(self, host: str) -> int:
        return sum(1 for h, _ in self.attempts if h == host)

    def times(self, host: str) -> list[float]:
        return [t for h, t in self.attempts if h == host]

    async def connect(self, origin: Origin) -> trio.abc.Stream:
        self.attempts.append((origin.host, trio.current_time()))
        return await self.origins[origin.host].connect(origin)


@dataclass
class Harness:
    """A proxy under test, its fake network, and a client that talks to its server."""

    proxy: Proxy
    server: Server
    net: Net
    nursery: trio.Nursery
    cache_dir: Path

    async def get(self, target: str, *headers: tuple[str, str], method: str = "GET") -> Got:
        """One request on a fresh client connection; read the response to its end."""
        client, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.handle_connection, server_end)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method=method, target=target, headers=[("host", "proxy.test"), *headers]
        )
        await client.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        head: h11.Response | None = None
        at = 0.0
        body = b""
        complete = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await client.receive_some(READ_SIZE))
                continue
            if isinstance(event, h11.Response):
                head, at = event, trio.current_time()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                complete = True
                break
            else:
                break
        await client.aclose()
        assert head is not None
        fields = {n.decode().lower(): v.decode() for n, v in head.headers}
        return Got(head.status_code, fields, body, complete, at)


@asynccontextmanager
async def open_harness(
    tmp_path: Path,
    routes: list[dict[str, Any]],
    origins: dict[str, FakeOrigin],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    """Run a proxy on memory streams in front of ``origins`` (keyed by host)."""
    # No periodic disk rescan: its sleep would be the next deadline whenever a worker thread
    # runs, and MockClock's autojump would leap to it mid-request.
    monkeypatch.setattr(
        proxy_module, "open_disk_tier", functools.partial(open_disk_tier, rescan_interval=None)
    )
    settings = make_settings(tmp_path / "cache", routes)
    net = Net(origins)
    async with trio.open_nursery() as nursery:
        for origin in origins.values():
            origin.attach(nursery)
        async with open_proxy(
            settings,
            clock=Clock(wall_anchor=WALL_ANCHOR),
            connect=net.connect,
            rng=random.Random(0),
        ) as proxy:
            server = Server(proxy, settings.server, proxy.clock)
            yield Harness(proxy, server, net, nursery, tmp_path / "cache")
        nursery.cancel_scope.cancel()


def route(upstreams: str, **extra: object) -> dict[str, Any]:
    return {"prefix": "/", "upstreams": upstreams, **extra}


async def test_smoke(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = FakeOrigin(refuse=True), FakeOrigin()
    b.set("/x", ok(b"from b", ("cache-control", "no-store")))
    async with open_harness(tmp_path, [route(f"{A}|{B}")], {"a": a, "b": b}, monkeypatch) as h:
        for _ in range(8):
            got = await h.get("/x")
            print(got.status, got.at, got.body)
        print(h.net.attempts)
        print(h.proxy.breaker_statistics())
