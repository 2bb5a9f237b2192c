"""Package routes through the running proxy: rewritten index pages and packuments, verified
files, the next upstream after a tampered body, file hosts, and revalidating rewritten entries.

The proxy runs on memory streams in front of several :class:`~tests.fakes.FakeOrigin`s (one per
upstream host), under a ``MockClock`` whose autojump waits for real idleness (the disk tier
works in threads), as in ``test_proxy_caching.py``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
from collections.abc import AsyncIterator
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
from proxychain.forwarding import Forwarding
from proxychain.proxy import Proxy, open_proxy
from proxychain.server import Server
from proxychain.upstream import Origin
from tests.conftest import make_settings
from tests.fakes import FakeOrigin, Reply

AUTOJUMP_THRESHOLD = 0.02  # seconds of real time (see test_proxy_caching.py)
SETTLE_CUSHION = 0.005  # seconds of real time
READ_SIZE = 65536
WALL_ANCHOR = 1_700_000_000.0
BAD, GOOD, FILES = "http://bad.test", "http://good.test", "http://files.test"
WHEEL = b"PK\x03\x04 a wheel, really"
WHEEL_SHA = hashlib.sha256(WHEEL).hexdigest()
WHEEL_NAME = "six-1.0-py3-none-any.whl"
TARBALL = b"\x1f\x8b a tarball"
TARBALL_SHA1 = hashlib.sha1(TARBALL).hexdigest()
HTML = "text/html"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


@dataclass
class Got:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def cache(self) -> str:
        return self.headers.get("x-cache", "-")


@dataclass
class World:
    proxy: Proxy
    server: Server
    origins: dict[str, FakeOrigin]  # by host
    nursery: trio.Nursery

    async def connect(self, address: Origin) -> trio.abc.Stream:
        return await self.origins[address.host].connect(address)

    async def get(self, target: str, *headers: tuple[str, str]) -> Got:
        client, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.handle_connection, server_end)
        conn = h11.Connection(h11.CLIENT)
        fields = dict([("host", "proxy.test"), *headers])
        request = h11.Request(method="GET", target=target, headers=list(fields.items()))
        await client.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        head: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await client.receive_some(READ_SIZE)))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            else:
                break
        await client.aclose()
        await self.settle()
        assert head is not None
        got = {n.decode().lower(): v.decode() for n, v in head.headers}
        return Got(head.status_code, got, b"".join(chunks))

    async def settle(self) -> None:
        limiters = (self.proxy.store.disk._limiter, trio.to_thread.current_default_thread_limiter())
        await trio.testing.wait_all_tasks_blocked(SETTLE_CUSHION)
        while any(limiter.borrowed_tokens for limiter in limiters):
            await trio.testing.wait_all_tasks_blocked(SETTLE_CUSHION)

    def integrity_failures(self) -> float:
        body, _ = self.proxy.metrics()
        for line in body.decode().splitlines():
            if line.startswith("proxychain_integrity_failures_total{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def stored(self, url: str) -> int:
        from proxychain import keys

        return len(await self.proxy.store.lookup(keys.primary_key("GET", url)))


@asynccontextmanager
async def open_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **route: Any
) -> AsyncIterator[World]:
    monkeypatch.setattr(
        proxy_module, "open_disk_tier", functools.partial(open_disk_tier, rescan_interval=None)
    )
    settings = make_settings(tmp_path / "cache", [{"retries": 0, **route}])
    origins = {host: FakeOrigin() for host in ("bad.test", "good.test", "files.test")}
    world: list[World] = []

    async def connector(address: Origin) -> trio.abc.Stream:
        return await world[0].connect(address)

    async with trio.open_nursery() as nursery:
        for origin in origins.values():
            origin.attach(nursery)
        async with open_proxy(
            settings, clock=Clock(wall_anchor=WALL_ANCHOR), connect=connector, rng=random.Random(0)
        ) as proxy:
            world.append(
                World(proxy, Server(proxy, settings.server, proxy.clock), origins, nursery)
            )
            yield world[0]
        nursery.cancel_scope.cancel()


def page(*links: str) -> Reply:
    body = "".join(f'<a href="{link}">x</a>\n' for link in links).encode()
    return Reply(headers=[("content-type", HTML), ("etag", '"page-1"')], body=body)


# ---- PyPI ------------------------------------------------------------------------------------


async def test_pypi_page_rewritten_and_file_verified(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(tmp_path, monkeypatch, prefix="/pypi/", kind="pypi", upstreams=GOOD) as w:
        good = w.origins["good.test"]
        good.set("/simple/six/", page(f"/packages/{WHEEL_NAME}#sha256={WHEEL_SHA}"))
        good.set(f"/packages/{WHEEL_NAME}", Reply(body=WHEEL))
        index = await w.get("/pypi/simple/six/")
        first = await w.get(f"/pypi/packages/{WHEEL_NAME}")
        again = await w.get(f"/pypi/packages/{WHEEL_NAME}")
        stored = await w.proxy.store.lookup(first_key(f"/pypi/packages/{WHEEL_NAME}"))
        (page_entry,) = await w.proxy.store.lookup(first_key("/pypi/simple/six/"))
        index_hit = await w.get("/pypi/simple/six/")
    assert (index.status, index.cache) == (200, "MISS")
    assert (
        index.body == f'<a href="/pypi/packages/{WHEEL_NAME}#sha256={WHEEL_SHA}">x</a>\n'.encode()
    )
    assert index.headers["content-length"] == str(len(index.body))
    assert index.headers["etag"].startswith('"pc-')
    # The upstream's ETag is kept for revalidation, and never shown to a client.
    assert page_entry.entry.headers.get("x-upstream-etag") == '"page-1"'
    assert (index_hit.cache, index_hit.body) == ("HIT", index.body)
    assert "x-upstream-etag" not in index.headers
    assert "x-upstream-etag" not in index_hit.headers
    assert (first.status, first.cache, first.body) == (200, "MISS", WHEEL)
    assert (again.cache, again.body) == ("HIT", WHEEL)
    assert [s.entry.verified for s in stored] == [f"sha256:{WHEEL_SHA}"]
    assert good.count(f"/packages/{WHEEL_NAME}") == 1


def first_key(url: str) -> str:
    from proxychain import keys

    return keys.primary_key("GET", url)


@pytest.mark.parametrize(
    ("separator", "expected"),
    [
        ("|", (200, "MISS", WHEEL)),  # the next upstream serves the real file
        (",", (502, "-", None)),  # "," never leaves the first upstream on an error
    ],
)
async def test_tampered_file_is_refused_and_never_stored(
    clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    separator: str,
    expected: tuple[int, str, bytes | None],
) -> None:
    chain = f"{BAD}{separator}{GOOD}"
    async with open_world(
        tmp_path, monkeypatch, prefix="/pypi/", kind="pypi", upstreams=chain
    ) as w:
        bad, good = w.origins["bad.test"], w.origins["good.test"]
        bad.set("/simple/six/", page(f"/packages/{WHEEL_NAME}#sha256={WHEEL_SHA}"))
        bad.set(f"/packages/{WHEEL_NAME}", Reply(body=WHEEL + b"tampered"))
        good.set(f"/packages/{WHEEL_NAME}", Reply(body=WHEEL))
        await w.get("/pypi/simple/six/")
        got = await w.get(f"/pypi/packages/{WHEEL_NAME}")
        stored = await w.stored(f"/pypi/packages/{WHEEL_NAME}")
        failures = w.integrity_failures()
        # At most the next writer's temp file, made ahead (empty), may be there.
        in_tmp = [(p, p.stat().st_size) for p in (tmp_path / "cache" / "tmp").iterdir()]
        tmp_left = sorted(p for p, size in in_tmp if size)
        made_ahead = [p for p, size in in_tmp if not size]
    status, cache, body = expected
    assert (got.status, got.cache) == (status, cache)
    if body is not None:
        assert got.body == body
    else:
        assert b"tampered" not in got.body
        assert b"excluded (failed an integrity check)" in got.body
    assert stored == (1 if body is not None else 0)
    assert failures == 1
    assert tmp_left == []
    assert len(made_ahead) <= 1
    assert bad.count(f"/packages/{WHEEL_NAME}") == 1


async def test_file_host_links_are_fetched_from_the_file_host(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(
        tmp_path,
        monkeypatch,
        prefix="/pypi/",
        kind="pypi",
        upstreams=GOOD,
        file_hosts=[FILES],
        preserve_host=True,
    ) as w:
        good, files = w.origins["good.test"], w.origins["files.test"]
        good.set("/simple/six/", page(f"{FILES}/p/{WHEEL_NAME}#sha256={WHEEL_SHA}"))
        files.set(f"/p/{WHEEL_NAME}", Reply(body=WHEEL))
        index = await w.get("/pypi/simple/six/")
        got = await w.get(f"/pypi/files/files.test/p/{WHEEL_NAME}")
    link = f"/pypi/files/files.test/p/{WHEEL_NAME}#sha256={WHEEL_SHA}"
    assert index.body == f'<a href="{link}">x</a>\n'.encode()
    assert (got.status, got.cache, got.body) == (200, "MISS", WHEEL)
    assert [r.target for r in files.requests] == [f"/p/{WHEEL_NAME}"]
    # preserve_host names the route's upstream; the file host gets its own authority.
    assert [r.headers.get("host") for r in files.requests] == ["files.test"]
    assert good.count(f"/files/files.test/p/{WHEEL_NAME}") == 0


async def test_tampered_file_from_a_file_host_is_a_502(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(
        tmp_path, monkeypatch, prefix="/pypi/", kind="pypi", upstreams=GOOD, file_hosts=[FILES]
    ) as w:
        w.origins["good.test"].set(
            "/simple/six/", page(f"{FILES}/p/{WHEEL_NAME}#sha256={WHEEL_SHA}")
        )
        w.origins["files.test"].set(f"/p/{WHEEL_NAME}", Reply(body=b"evil"))
        await w.get("/pypi/simple/six/")
        got = await w.get(f"/pypi/files/files.test/p/{WHEEL_NAME}")
        stored = await w.stored(f"/pypi/files/files.test/p/{WHEEL_NAME}")
    assert (got.status, stored, w.integrity_failures()) == (502, 0, 1)
    assert b"does not match the announced" in got.body


async def test_waiters_of_a_verified_fill_are_served_from_the_store(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(tmp_path, monkeypatch, prefix="/pypi/", kind="pypi", upstreams=GOOD) as w:
        good = w.origins["good.test"]
        good.set("/simple/six/", page(f"/packages/{WHEEL_NAME}#sha256={WHEEL_SHA}"))
        good.set(f"/packages/{WHEEL_NAME}", Reply(body=[WHEEL[:4], WHEEL[4:]], chunk_delay=1.0))
        await w.get("/pypi/simple/six/")
        results: list[Got] = []

        async def fetch() -> None:
            results.append(await w.get(f"/pypi/packages/{WHEEL_NAME}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            await trio.sleep(0.5)  # the leader is buffering
            nursery.start_soon(fetch)
    assert sorted((r.status, r.cache, r.body) for r in results) == [
        (200, "HIT", WHEEL),
        (200, "MISS", WHEEL),
    ]
    assert good.count(f"/packages/{WHEEL_NAME}") == 1


# ---- npm -------------------------------------------------------------------------------------


def packument(tarball_url: str) -> bytes:
    doc = {
        "name": "left",
        "versions": {"1.0.0": {"dist": {"tarball": tarball_url, "shasum": TARBALL_SHA1}}},
    }
    return json.dumps(doc).encode()


async def test_npm_packument_decoded_rewritten_per_host_and_tarball_verified(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(tmp_path, monkeypatch, prefix="/npm/", kind="npm", upstreams=GOOD) as w:
        good = w.origins["good.test"]
        doc = gzip.compress(packument(f"{GOOD}/left/-/left-1.0.0.tgz"))
        good.set(
            "/left",
            Reply(
                headers=[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                    ("etag", '"doc-1"'),
                ],
                body=doc,
            ),
        )
        good.set("/left/-/left-1.0.0.tgz", Reply(body=TARBALL))
        first = await w.get("/npm/left", ("accept-encoding", "br"))
        other_host = await w.get("/npm/left", ("host", "mirror.test:8080"))
        hit = await w.get("/npm/left")
        tarball = await w.get("/npm/left/-/left-1.0.0.tgz")
    tarball_at = json.loads(first.body)["versions"]["1.0.0"]["dist"]["tarball"]
    assert tarball_at == "http://proxy.test/npm/left/-/left-1.0.0.tgz"
    assert "content-encoding" not in first.headers
    assert first.headers["content-length"] == str(len(first.body))
    other_at = json.loads(other_host.body)["versions"]["1.0.0"]["dist"]["tarball"]
    assert (other_host.cache, other_at) == (
        "MISS",
        "http://mirror.test:8080/npm/left/-/left-1.0.0.tgz",
    )
    assert (hit.cache, hit.body) == ("HIT", first.body)
    assert [r.headers.get("accept-encoding") for r in good.requests if r.path == "/left"] == [
        "gzip",
        "gzip",
    ]
    assert (tarball.status, tarball.cache, tarball.body) == (200, "MISS", TARBALL)


async def test_rewritten_entry_revalidates_with_the_upstream_etag(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(tmp_path, monkeypatch, prefix="/npm/", kind="npm", upstreams=GOOD) as w:
        good = w.origins["good.test"]
        body = packument(f"{GOOD}/left/-/left-1.0.0.tgz")

        def reply(request: Any) -> Reply:
            if request.headers.get("if-none-match") == '"doc-1"':
                return Reply(status=304, headers=[("etag", '"doc-1"')])
            return Reply(
                headers=[("content-type", "application/json"), ("etag", '"doc-1"')], body=body
            )

        good.set("/left", reply)
        first = await w.get("/npm/left")
        clock.jump(120)  # past the metadata TTL: served stale, revalidated in the background
        stale = await w.get("/npm/left")
        after = await w.get("/npm/left")
        unchanged = await w.get("/npm/left", ("if-none-match", after.headers["etag"]))
        part = await w.get("/npm/left", ("range", "bytes=0-0"))
    sent = [r.headers.get("if-none-match") for r in good.requests if r.path == "/left"]
    assert sent == [None, '"doc-1"']
    assert (stale.cache, after.cache) == ("STALE", "HIT")
    assert after.body == first.body
    assert after.headers["etag"] == first.headers["etag"]
    assert after.headers["etag"].startswith('"pc-')
    assert after.headers["content-length"] == str(len(first.body))
    assert (unchanged.status, part.status) == (304, 206)
    for answer in (first, stale, after, unchanged, part):
        assert "x-upstream-etag" not in answer.headers


# ---- hot path --------------------------------------------------------------------------------


async def test_a_hit_builds_no_upstream_request(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    original = Forwarding.upstream_request

    def counting(self: Forwarding, route: Any, request: Any, relative: str, client: Any) -> Any:
        built.append(relative)
        return original(self, route, request, relative, client)

    monkeypatch.setattr(Forwarding, "upstream_request", counting)
    async with open_world(tmp_path, monkeypatch, prefix="/", upstreams=GOOD) as w:
        w.origins["good.test"].set(
            "/x", Reply(headers=[("cache-control", "max-age=60")], body=b"x")
        )
        miss = await w.get("/x")
        hit = await w.get("/x")
    assert (miss.cache, hit.cache) == ("MISS", "HIT")
    assert built == ["/x"]


async def test_range_on_a_verified_miss_is_answered_once_checked(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_world(tmp_path, monkeypatch, prefix="/pypi/", kind="pypi", upstreams=GOOD) as w:
        good = w.origins["good.test"]
        good.set("/simple/six/", page(f"/packages/{WHEEL_NAME}#sha256={WHEEL_SHA}"))
        good.set(f"/packages/{WHEEL_NAME}", Reply(body=WHEEL))
        await w.get("/pypi/simple/six/")
        part = await w.get(f"/pypi/packages/{WHEEL_NAME}", ("range", "bytes=0-3"))
    assert (part.status, part.cache, part.body) == (206, "HIT", WHEEL[:4])
    assert part.headers["content-range"] == f"bytes 0-3/{len(WHEEL)}"
