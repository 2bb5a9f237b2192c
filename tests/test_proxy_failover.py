"""Failover through the running proxy: chains, breakers, retries, timeouts, health checks.

Most tests run the whole proxy under ``MockClock`` (the ``autojump_clock`` fixture): upstreams
are :class:`~tests.fakes.FakeOrigin` tasks on memory streams, reached through a connector that
records every connection attempt per upstream, and the client speaks h11 to the server's
connection handler over memory streams too, so counts and virtual times are exact. Retry
delays and breaker open intervals come from ``random.Random(0)``; the tests replay the same
draws through the same sans-IO schedules to know the expected times. Chaining one proxy to
another runs on loopback with the real clock.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h11
import httpx
import pytest
import trio
import trio.testing

from proxychain import keys
from proxychain.breaker import BreakerConfig, BreakerState, BreakerStatistics
from proxychain.clock import Clock
from proxychain.disk import DiskTier
from proxychain.failover import DEFAULT_RETRY_BACKOFF
from proxychain.http import Request
from proxychain.listen import serve
from proxychain.proxy import Proxy, open_proxy
from proxychain.server import Server
from proxychain.upstream import Origin
from tests.conftest import make_settings
from tests.fakes import FakeOrigin, Reply, serve_origin

WALL_ANCHOR = 1_700_000_000.0  # pinned wall clock: Date and Age are deterministic
A, B, C = "http://a", "http://b", "http://c"
READ_SIZE = 65536
KIB = 1024
STEP = 0.25  # seconds between scripted client requests
OPEN_BASE, OPEN_CAP = 1.0, 4.0  # breaker open intervals in the breaker tests (seconds)
BREAKER = {"failures": 2, "open_base": "1s", "open_cap": "4s"}
OPEN_SCHEDULE = BreakerConfig(open_base=OPEN_BASE, open_cap=OPEN_CAP).backoff()
CLOSED, OPEN = BreakerState.CLOSED, BreakerState.OPEN
T = TypeVar("T")


def body_reply(text: bytes, *, status: int = 200, cache: str = "no-store") -> Reply:
    return Reply(status=status, headers=[("cache-control", cache)], body=text)


@dataclass
class Got:
    """What a client saw; ``complete`` is False when the connection ended mid-body."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    at: float  # virtual time the response head arrived
    ended_at: float  # virtual time the body ended (or was cut)


@dataclass
class Net:
    """Fake upstreams by host, with every connection attempt the proxy made, in order."""

    origins: dict[str, FakeOrigin]
    attempts: list[tuple[str, float]] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)  # hosts whose connect never completes
    resets: dict[str, int] = field(default_factory=dict)  # host -> connections to reset
    down: set[str] = field(default_factory=set)  # hosts that reset every connection...
    reset_delay: float = 0.0  # ...this long after it was opened (a reset of ``resets`` too)

    def count(self, host: str) -> int:
        return sum(1 for h, _ in self.attempts if h == host)

    def times(self, host: str) -> list[float]:
        return [t for h, t in self.attempts if h == host]

    async def connect(self, origin: Origin) -> trio.abc.Stream:
        self.attempts.append((origin.host, trio.current_time()))
        if origin.host in self.hang:
            await trio.sleep_forever()
        if origin.host in self.down or self.resets.get(origin.host, 0) > 0:
            # Accepted, then closed before a byte of response: a reset.
            if origin.host not in self.down:
                self.resets[origin.host] -= 1
            if self.reset_delay:
                await trio.sleep(self.reset_delay)
            client, server = trio.testing.memory_stream_pair()
            await server.aclose()
            return client
        return await self.origins[origin.host].connect(origin)


@dataclass
class Harness:
    """A proxy under test, its fake network, and a client that talks to its server."""

    proxy: Proxy
    server: Server
    net: Net
    nursery: trio.Nursery
    cache_dir: Path

    async def get(self, target: str, *headers: tuple[str, str]) -> Got:
        """One GET on a fresh client connection, read to its end (or to the cut)."""
        client, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.handle_connection, server_end)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("host", "proxy"), *headers])
        await client.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        head: h11.Response | None = None
        at = 0.0
        body = b""
        complete = False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await client.receive_some(READ_SIZE)))
                elif isinstance(event, h11.Response):
                    head, at = event, trio.current_time()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                    break
                else:
                    break
        except h11.RemoteProtocolError:
            pass  # the peer closed mid-body: a truncated transfer
        await client.aclose()
        if head is None:  # the connection closed without a response
            return Got(0, {}, body, complete, at, trio.current_time())
        fields = {n.decode().lower(): v.decode() for n, v in head.headers}
        return Got(head.status_code, fields, body, complete, at, trio.current_time())

    def stats(self, url: str) -> BreakerStatistics:
        return self.proxy.breaker_statistics()[url]


async def _run_inline(self: DiskTier, fn: Callable[..., T], *args: Any) -> T:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@asynccontextmanager
async def open_harness(
    tmp_path: Path,
    routes: list[dict[str, Any]],
    origins: dict[str, FakeOrigin],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    """Run a proxy on memory streams in front of ``origins`` (keyed by host)."""
    # File calls run inline, in zero virtual time: while a worker thread runs, every task is
    # blocked, and the autojumping clock would leap to the next deadline (a fake upstream's
    # delay, a timeout, the index rescan) in the middle of a request.
    monkeypatch.setattr(DiskTier, "_run", _run_inline)
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


def two_origins(*, a_refuses: bool = False) -> dict[str, FakeOrigin]:
    a, b = FakeOrigin(refuse=a_refuses), FakeOrigin()
    a.set("/x", body_reply(b"from a"))
    b.set("/x", body_reply(b"from b"))
    return {"a": a, "b": b}


# ---- 1. breakers: A|B with A refusing ---------------------------------------------------------


async def test_open_breaker_keeps_requests_off_a_until_probe_then_closes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins(a_refuses=True)
    r = route(f"{A}|{B}", breaker=BREAKER)
    rng = random.Random(0)
    async with open_harness(tmp_path, [r], origins, monkeypatch) as h:
        first = await h.get("/x")
        d0 = DEFAULT_RETRY_BACKOFF.delay(0, rng)
        assert (first.status, first.body, first.at) == (200, b"from b", d0)
        assert h.net.times("a") == [0.0, d0]  # the try and one same-upstream retry: tripped
        probe_at = d0 + OPEN_SCHEDULE.delay(0, rng)
        assert (h.stats(A).state, h.stats(A).next_probe_at) == (OPEN, probe_at)

        # Requests every STEP: while open, none reaches A; each due probe is one trial.
        expected_a = [0.0, d0]
        openings = 1
        recovered_at = 12.0
        closed_at = None
        i = 1
        while closed_at is None:
            now = i * STEP
            await trio.sleep_until(now)
            if now >= recovered_at:
                origins["a"].refuse = False
            due = h.stats(A).next_probe_at
            assert due is not None
            got = await h.get("/x")
            if now >= due:
                expected_a.append(now)
                if now >= recovered_at:
                    closed_at = now
                    assert got.body == b"from a"
                else:
                    openings += 1
                    assert h.stats(A).next_probe_at == now + OPEN_SCHEDULE.delay(openings - 1, rng)
            if closed_at is None:
                assert (got.status, got.body) == (200, b"from b")
            assert h.net.times("a") == expected_a
            i += 1
        assert h.stats(A).state is CLOSED
        assert closed_at - recovered_at <= OPEN_CAP + STEP
        assert (len(expected_a), openings) == (8, 6)
        assert h.stats(A).open_count == openings
        after = await h.get("/x")
        assert after.body == b"from a"
        assert origins["b"].count("/x") == i - 1  # every request but the closing trial


async def test_health_checks_open_and_close_the_breaker_without_client_requests(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins(a_refuses=True)
    for origin in origins.values():
        origin.set("/healthz", body_reply(b"ok"))
    r = route(f"{A}|{B}", breaker=BREAKER, health_path="/healthz", health_interval="1s")
    rng = random.Random(0)
    async with open_harness(tmp_path, [r], origins, monkeypatch) as h:
        o0 = OPEN_SCHEDULE.delay(0, rng)
        o1 = OPEN_SCHEDULE.delay(1, rng)
        await trio.sleep_until(2.0 + o0 - 0.001)
        # Probes at 1 s and 2 s failed and tripped it; the next waits for the probe time.
        assert h.net.times("a") == [1.0, 2.0]
        assert (h.stats(A).state, h.stats(A).next_probe_at) == (OPEN, 2.0 + o0)
        await trio.sleep_until(3.0)
        # The half-open probe at 2 + o0 failed: open again, for the second interval.
        assert h.net.times("a") == [1.0, 2.0, 2.0 + o0]
        assert (h.stats(A).state, h.stats(A).next_probe_at) == (OPEN, 2.0 + o0 + o1)
        origins["a"].refuse = False
        # The second interval (1-2 s) is not waited out: the probe comes one health interval
        # after the last, and closes the breaker.
        assert o1 >= 1.0
        await trio.sleep_until(3.0 + o0 + 0.001)
        assert h.net.times("a") == [1.0, 2.0, 2.0 + o0, 3.0 + o0]
        assert h.stats(A).state is CLOSED
        assert origins["a"].count("/healthz") == 1
        assert origins["b"].count("/healthz") == 3  # at 1, 2 and 3 s
        assert h.stats(B) == BreakerStatistics(
            state=CLOSED,
            consecutive_failures=0,
            opened_at=None,
            next_probe_at=None,
            open_count=0,
            requests=3,
            failures=0,
            successes=3,
        )
        await trio.sleep_until(3.0 + o0 + 1.001)
        assert origins["a"].count("/healthz") == 2  # closed: probed every interval again


@dataclass
class ResettingOrigin(FakeOrigin):
    """A fake origin that, while ``down``, reads each request (so :meth:`count` sees it) and
    drops the connection without an answer, like a crashed origin's port."""

    down: bool = False

    async def _answer(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: Request, reply: Reply
    ) -> bool:
        if self.down:
            return False
        return await super()._answer(conn, stream, request, reply)


async def test_with_health_checks_the_probe_takes_the_trials_and_clients_never_do(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = ResettingOrigin()
    # A new connection for every upstream request, so each one meets the dead upstream.
    close = ("connection", "close")
    origin.set("/healthz", Reply(headers=[close], body=b"ok"))
    headers = [("etag", '"v1"'), ("cache-control", "max-age=1, stale-if-error=600"), close]

    def k_reply(request: Request) -> Reply:
        fresh = request.headers.get("if-none-match") == '"v1"'
        return Reply(status=304 if fresh else 200, headers=headers, body=b"v1")

    origin.set("/k", k_reply)
    # The probe interval is longer than the first open intervals: clients are there when
    # each half-open trial falls due, and the probe only comes later.
    r = route(A, breaker=BREAKER, health_path="/healthz", health_interval="5s")
    async with open_harness(tmp_path, [r], {"a": origin}, monkeypatch) as h:
        assert (await h.get("/k")).headers["x-cache"] == "MISS"
        await trio.sleep_until(1.5)  # stale now
        origin.down = True
        # Two failed revalidations open the breaker; the stale copy answers both.
        for at in (1.5, 1.75):
            await trio.sleep_until(at)
            got = await h.get("/k")
            assert (got.status, got.body, got.headers["x-cache"]) == (200, b"v1", "STALE")
        assert h.stats(A).state is OPEN
        assert origin.count("/k") == 3  # the fill and the two revalidations
        first_due = h.stats(A).next_probe_at
        assert first_due is not None
        assert first_due < 5.0  # before the probe's next tick
        # A long outage, a client request every STEP: none of them reaches the upstream, while
        # the probe takes every half-open trial (and fails it).
        outage_end = 30.0
        while trio.current_time() + STEP < outage_end:
            await trio.sleep(STEP)
            got = await h.get("/k")
            assert (got.status, got.body, got.headers["x-cache"]) == (200, b"v1", "STALE")
            assert h.stats(A).state is OPEN
        assert origin.count("/k") == 3
        stats = h.stats(A)
        # The trip, then nine half-open probes that failed and reopened it. The first trial
        # fell due at ``first_due`` with clients asking every STEP, and waited for the probe.
        assert (stats.open_count, origin.count("/healthz")) == (10, 9)
        assert h.net.times("a")[:4] == [0.0, 1.5, 1.75, 5.0]
        assert len(h.net.times("a")) == 3 + 9  # every other connection was a probe
        origin.down = False
        due = stats.next_probe_at
        assert due is not None
        await trio.sleep_until(due - 0.001)
        assert (await h.get("/k")).headers["x-cache"] == "STALE"  # open until the probe
        await trio.sleep_until(due + 0.001)
        assert h.stats(A).state is CLOSED  # the probe at ``due`` succeeded
        assert origin.count("/k") == 3
        got = await h.get("/k")  # the next client request reaches the upstream again
        assert (got.status, got.body, got.headers["x-cache"]) == (200, b"v1", "REVALIDATED")
        assert origin.count("/k") == 4


# ---- 2. "," semantics -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_reply", "status", "body", "a_connects", "b_requests"),
    [
        pytest.param(body_reply(b"nope", status=404), 200, b"from b", 1, 1, id="404-to-b"),
        pytest.param(body_reply(b"gone", status=410), 200, b"from b", 1, 1, id="410-to-b"),
        pytest.param(body_reply(b"busy", status=503), 502, None, 1, 0, id="503-stops"),
        pytest.param(body_reply(b"oops", status=500), 502, None, 1, 0, id="500-stops"),
        pytest.param(body_reply(b"from a"), 200, b"from a", 1, 0, id="200-from-a"),
        pytest.param(None, 502, None, 2, 0, id="refused-stops-after-retry"),
    ],
)
async def test_comma_moves_on_only_after_404_or_410(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    a_reply: Reply | None,
    status: int,
    body: bytes | None,
    a_connects: int,
    b_requests: int,
) -> None:
    origins = two_origins(a_refuses=a_reply is None)
    if a_reply is not None:
        origins["a"].set("/x", a_reply)
    async with open_harness(tmp_path, [route(f"{A},{B}")], origins, monkeypatch) as h:
        got = await h.get("/x")
    assert got.status == status
    if body is not None:
        assert got.body == body
    else:
        assert got.headers["content-type"].startswith("text/plain")
    assert h.net.count("a") == a_connects
    assert (h.net.count("b"), origins["b"].count()) == (b_requests, b_requests)


@pytest.mark.parametrize(
    ("a_status", "a_failures", "a_successes"),
    [(503, 1, 0), (502, 1, 0), (504, 1, 0), (500, 0, 1), (404, 0, 1), (410, 0, 1)],
)
async def test_pipe_moves_on_after_any_error_but_only_gateway_errors_count(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    a_status: int,
    a_failures: int,
    a_successes: int,
) -> None:
    origins = two_origins()
    origins["a"].set("/x", body_reply(b"no", status=a_status))
    async with open_harness(tmp_path, [route(f"{A}|{B}")], origins, monkeypatch) as h:
        got = await h.get("/x")
        stats = h.stats(A)
    assert (got.status, got.body) == (200, b"from b")
    assert (stats.failures, stats.successes) == (a_failures, a_successes)
    assert (h.net.count("a"), origins["a"].count("/x")) == (1, 1)


async def test_comma_with_a_503_serves_the_stale_copy(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins()
    origins["a"].set("/x", body_reply(b"from a", cache="max-age=1, stale-if-error=600"))
    async with open_harness(tmp_path, [route(f"{A},{B}")], origins, monkeypatch) as h:
        first = await h.get("/x")
        await trio.sleep(10)
        origins["a"].set("/x", body_reply(b"busy", status=503))
        stale = await h.get("/x")
    assert (first.status, first.headers["x-cache"]) == (200, "MISS")
    assert (stale.status, stale.body, stale.headers["x-cache"]) == (200, b"from a", "STALE")
    assert stale.headers["age"] == "10"
    assert origins["a"].count("/x") == 2
    assert h.net.count("b") == 0


@pytest.mark.parametrize(
    ("cache", "a_connects"), [("max-age=1, stale-if-error=600", 2), ("max-age=1", 3)]
)
async def test_refused_revalidation_is_not_retried_when_a_stale_copy_can_answer(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache: str,
    a_connects: int,
) -> None:
    origins = two_origins()
    # Connection: close, so the revalidation needs a new connection (which A refuses).
    origins["a"].set(
        "/x",
        Reply(headers=[("cache-control", cache), ("connection", "close")], body=b"from a"),
    )
    async with open_harness(tmp_path, [route(A)], origins, monkeypatch) as h:
        await h.get("/x")
        await trio.sleep(10)
        origins["a"].refuse = True
        answer = await h.get("/x")
    # One connect for the fill; then one (no retry) when stale-if-error can answer, or the
    # first try plus one retry when the client would otherwise get a 502.
    assert h.net.count("a") == a_connects
    assert answer.status == (200 if "stale-if-error" in cache else 502)


# ---- 3. retries -------------------------------------------------------------------------------


async def test_connect_errors_are_retried_with_backoff_a_bounded_number_of_times(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins(a_refuses=True)
    async with open_harness(tmp_path, [route(A, retries=3)], origins, monkeypatch) as h:
        got = await h.get("/x")
    rng = random.Random(0)
    expected, t = [0.0], 0.0
    for retry in range(3):
        t += DEFAULT_RETRY_BACKOFF.delay(retry, rng)
        expected.append(t)
    assert h.net.times("a") == expected
    assert (got.status, got.at) == (502, expected[-1])
    assert b"could not be connected to" in got.body


async def test_reset_before_any_byte_is_retried_on_the_same_upstream(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins()
    async with open_harness(tmp_path, [route(f"{A},{B}")], origins, monkeypatch) as h:
        h.net.resets["a"] = 1
        got = await h.get("/x")
    d0 = DEFAULT_RETRY_BACKOFF.delay(0, random.Random(0))
    assert (got.status, got.body, got.at) == (200, b"from a", d0)
    assert h.net.times("a") == [0.0, d0]
    assert origins["a"].count("/x") == 1
    assert h.net.count("b") == 0


async def test_never_retried_after_the_head_went_downstream(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins()
    origins["a"].set("/x", Reply(body=[b"a" * 10, b"b" * 10], cut_after=15))
    async with open_harness(tmp_path, [route(f"{A}|{B}")], origins, monkeypatch) as h:
        got = await h.get("/x")
    assert (got.status, got.complete, got.body) == (200, False, b"a" * 10 + b"b" * 5)
    assert (h.net.count("a"), origins["a"].count("/x")) == (1, 1)
    assert h.net.count("b") == 0


# ---- 4. timeouts ------------------------------------------------------------------------------

TIMEOUTS = {"connect": "1s", "first_byte": "2s", "between_bytes": "1s", "deadline": "5s"}


async def test_connect_timeout_is_a_504_after_exactly_the_connect_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins()
    async with open_harness(tmp_path, [route(A, timeouts=TIMEOUTS)], origins, monkeypatch) as h:
        h.net.hang.add("a")
        got = await h.get("/x")
    assert (got.status, got.at) == (504, 1.0)
    assert h.net.times("a") == [0.0]  # a timeout is not retried


async def test_first_byte_timeout_is_a_504_after_exactly_the_first_byte_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins()
    origins["a"].set("/x", Reply(body=b"late", delay=10))
    async with open_harness(tmp_path, [route(A, timeouts=TIMEOUTS)], origins, monkeypatch) as h:
        got = await h.get("/x")
    assert (got.status, got.at) == (504, 2.0)
    assert origins["a"].count("/x") == 1


async def test_between_bytes_timeout_cuts_the_transfer(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = two_origins()
    origins["a"].set(
        "/x",
        Reply(headers=[("cache-control", "max-age=60")], body=[b"x" * 10] * 3, chunk_delay=0.5),
    )
    origins["a"].replies["/slow"] = Reply(body=[b"x" * 10] * 3, chunk_delay=3)
    async with open_harness(tmp_path, [route(A, timeouts=TIMEOUTS)], origins, monkeypatch) as h:
        fine = await h.get("/x")  # 0.5 s between chunks is within between_bytes
        slow = await h.get("/slow")
        keys_left = await h.proxy.store.lookup(keys.primary_key("GET", "/slow"))
    assert (fine.status, fine.complete, fine.body, fine.ended_at) == (200, True, b"x" * 30, 1.5)
    # The upstream's head came at once, its first byte never within between_bytes: the
    # transfer is cut one second later. (Status 0: the server holds a head back until the
    # first body byte, so this client saw the connection close without any response.)
    assert (slow.status in (0, 200), slow.complete, slow.body) == (True, False, b"")
    assert slow.ended_at == 2.5
    assert keys_left == []


async def test_route_deadline_bounds_the_whole_chain(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = {host: FakeOrigin(default=Reply(never=True)) for host in "abc"}
    async with open_harness(
        tmp_path, [route(f"{A}|{B}|{C}", timeouts=TIMEOUTS)], origins, monkeypatch
    ) as h:
        got = await h.get("/x")
    # A and B time out after first_byte each; the deadline cuts C short.
    assert (got.status, got.at) == (504, 5.0)
    assert [h.net.times(host) for host in "abc"] == [[0.0], [2.0], [4.0]]
    assert h.stats(C).consecutive_failures == 0  # cut by the deadline, not judged


# ---- 5. upstream killed mid-body --------------------------------------------------------------


async def test_upstream_killed_mid_body_aborts_the_client_and_caches_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = bytes(range(256)) * 512  # 128 KiB
    origins = two_origins()
    cache = [("cache-control", "max-age=600")]
    origins["a"].set(
        "/big",
        Reply(headers=cache, body=[whole[: 64 * KIB], whole[64 * KIB :]], cut_after=70 * KIB),
    )
    async with open_harness(tmp_path, [route(A)], origins, monkeypatch) as h:
        cut = await h.get("/big")
        stored = await h.proxy.store.lookup(keys.primary_key("GET", "/big"))
        files = sorted(p.relative_to(h.cache_dir) for p in h.cache_dir.rglob("*") if p.is_file())
        empty = {f for f in files if _size_or_none(h.cache_dir / f) == 0}
        origins["a"].set("/big", Reply(headers=cache, body=whole))
        again = await h.get("/big")
    assert (cut.status, cut.complete, cut.body) == (200, False, whole[: 70 * KIB])
    assert cut.headers["content-length"] == str(len(whole))
    assert stored == []
    # Nothing of the cut body; in tmp/ at most the next writer's temp file, made ahead (empty).
    made_ahead = [f for f in files if f.parts[0] == "tmp" and f in empty]
    assert len(made_ahead) <= 1
    leftovers = [f for f in files if f.parts[0] == "tmp" and f not in made_ahead]
    assert leftovers + [f for f in files if f.suffix in (".body", ".meta")] == []
    assert (again.status, again.complete, again.headers["x-cache"]) == (200, True, "MISS")
    assert again.body == whole
    assert origins["a"].count("/big") == 2


# ---- 6. off -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstreams", "a_connects", "reason"),
    [
        pytest.param("off", 0, b'upstreams are "off" for this route\n', id="off"),
        pytest.param(
            f"{A},off",
            1,
            b"upstream http://a answered 404; the chain ends in off\n",
            id="a-404-then-off",
        ),
    ],
)
async def test_off_refuses_with_403_and_a_reason(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstreams: str,
    a_connects: int,
    reason: bytes,
) -> None:
    origins = two_origins()
    origins["a"].set("/x", body_reply(b"nope", status=404))
    async with open_harness(tmp_path, [route(upstreams)], origins, monkeypatch) as h:
        got = await h.get("/x")
    assert (got.status, got.body) == (403, reason)
    assert h.net.count("a") == a_connects


# ---- 7. private paths -------------------------------------------------------------------------


def go_route(upstreams: str, private: list[dict[str, Any]]) -> dict[str, Any]:
    return route(upstreams, kind="goproxy", private=private)


@pytest.mark.parametrize(
    ("target", "pattern", "private"),
    [
        ("/corp.example.com/lib/@v/list", "corp.example.com/*", True),
        ("/corp.example.com/lib/@v/v1.0.0.info", "corp.example.com/*", True),
        ("/github.com/!corp/lib/@v/list", "github.com/Corp/*", True),
        ("/github.com/!corp/lib/@v/v1.0.0.mod", "github.com/Corp", True),
        ("/github.com/corp/lib/@v/list", "github.com/Corp/*", False),
        ("/github.com/other/lib/@v/list", "corp.example.com/*", False),
    ],
)
async def test_private_paths_go_only_to_their_upstreams(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    pattern: str,
    private: bool,
) -> None:
    origins = two_origins(a_refuses=True)
    origins["b"].default = body_reply(b"from b")
    rules = [{"patterns": [pattern], "upstreams": [A]}]
    async with open_harness(tmp_path, [go_route(f"{A}|{B}", rules)], origins, monkeypatch) as h:
        got = await h.get(target)
    assert h.net.count("a") == 2
    if private:
        assert got.status == 502
        assert h.net.count("b") == 0
    else:
        assert (got.status, got.body) == (200, b"from b")


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/sumdb/sum.golang.org/lookup/github.com/!corp/lib@v1.0.0", 404),
        ("/sumdb/sum.golang.org/lookup/github.com/other/lib@v1.0.0", 200),
    ],
)
async def test_sumdb_lookup_of_a_private_module_is_refused_without_contact(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    status: int,
) -> None:
    origins = two_origins()
    origins["b"].default = body_reply(b"from b")
    rules = [{"patterns": ["github.com/Corp/*"], "upstreams": [A]}]
    async with open_harness(tmp_path, [go_route(f"{B}", rules)], origins, monkeypatch) as h:
        got = await h.get(target)
    assert got.status == status
    assert h.net.count("b") == (0 if status == 404 else 1)


async def test_private_path_with_no_allowed_upstream_is_refused_without_contact(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = [{"patterns": ["corp.example.com/*"], "upstreams": [C]}]
    async with open_harness(
        tmp_path, [go_route(f"{A}|{B}", rules)], two_origins(), monkeypatch
    ) as h:
        got = await h.get("/corp.example.com/lib/@v/list")
    assert (got.status, got.body) == (
        403,
        b"this private path may not be fetched from the route's upstreams\n",
    )
    assert h.net.attempts == []


# ---- 8. loops and chained proxies -------------------------------------------------------------


async def test_via_naming_this_node_is_a_508(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, [route(A)], two_origins(), monkeypatch) as h:
        looped = await h.get("/x", ("via", "1.1 other, 1.1 test-node"))
        fine = await h.get("/x", ("via", "1.1 other"))
    assert (looped.status, looped.body) == (508, b"loop detected: Via already names test-node\n")
    assert fine.status == 200
    assert h.net.count("a") == 1


@asynccontextmanager
async def serve_node(
    tmp_path: Path, name: str, listener: trio.SocketListener, upstream: str
) -> AsyncIterator[None]:
    """A proxy named ``name`` on an already-bound loopback listener (real clock)."""
    settings = make_settings(
        tmp_path / name,
        [{**route(upstream), "timeouts": {"deadline": "0.5s"}}],
        server={"node_name": name},
    )
    shutdown = trio.Event()
    async with open_proxy(settings) as proxy, trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve,
                proxy,
                settings.server,
                clock=proxy.clock,
                shutdown=shutdown,
                listeners=[listener],
            )
        )
        yield
        shutdown.set()


async def bind() -> tuple[trio.SocketListener, str]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    return listener, f"http://127.0.0.1:{listener.socket.getsockname()[1]}"


@pytest.mark.loopback
async def test_branch_proxy_chained_to_a_regional_proxy(tmp_path: Path) -> None:
    origin = FakeOrigin()
    origin.set("/x", body_reply(b"origin", cache="max-age=600"))
    branch_l, branch_url = await bind()
    regional_l, regional_url = await bind()
    async with serve_origin(origin) as up:
        async with serve_node(tmp_path, "regional", regional_l, up):
            async with serve_node(tmp_path, "branch", branch_l, regional_url):
                async with httpx.AsyncClient(base_url=branch_url, timeout=2) as client:
                    first = await client.get("/x")
                    second = await client.get("/x")
    assert (first.status_code, first.content, first.headers["x-cache"]) == (200, b"origin", "MISS")
    assert second.headers["x-cache"] == "HIT"
    assert first.headers["via"] == "1.1 regional, 1.1 branch"
    assert origin.count("/x") == 1
    assert origin.requests[0].headers.get("via") == "1.1 branch, 1.1 regional"


@pytest.mark.loopback
async def test_proxies_chained_in_a_loop_answer_508(tmp_path: Path) -> None:
    one_l, one_url = await bind()
    two_l, two_url = await bind()
    async with serve_node(tmp_path, "one", one_l, two_url):
        async with serve_node(tmp_path, "two", two_l, one_url):
            async with httpx.AsyncClient(base_url=one_url, timeout=2) as client:
                got = await client.get("/x")
    assert got.status_code == 508
    assert b"loop" in got.content


# ---- 9. inspectable state ---------------------------------------------------------------------


async def test_breaker_statistics_and_a_log_line_per_state_change(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxychain")
    origins = two_origins(a_refuses=True)
    rng = random.Random(0)
    d0 = DEFAULT_RETRY_BACKOFF.delay(0, rng)
    o0 = OPEN_SCHEDULE.delay(0, rng)
    async with open_harness(
        tmp_path, [route(f"{A}|{B}", breaker=BREAKER)], origins, monkeypatch
    ) as h:
        await h.get("/x")
        await h.get("/x")  # skips A: open
        tripped = h.proxy.breaker_statistics()
        await trio.sleep_until(d0 + o0)
        origins["a"].refuse = False
        trial = await h.get("/x")
        closed = h.proxy.breaker_statistics()
    assert tripped == {
        A: BreakerStatistics(
            state=OPEN,
            consecutive_failures=2,
            opened_at=d0,
            next_probe_at=d0 + o0,
            open_count=1,
            requests=2,
            failures=2,
            successes=0,
        ),
        B: BreakerStatistics(
            state=CLOSED,
            consecutive_failures=0,
            opened_at=None,
            next_probe_at=None,
            open_count=0,
            requests=2,
            failures=0,
            successes=2,
        ),
    }
    assert trial.body == b"from a"
    assert closed[A] == BreakerStatistics(
        state=CLOSED,
        consecutive_failures=0,
        opened_at=d0,
        next_probe_at=d0 + o0,
        open_count=1,
        requests=3,
        failures=2,
        successes=1,
    )
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("breaker")]
    assert changes == [
        f"breaker for {A}: CLOSED -> OPEN (trip), next probe in {o0:.2f}s",
        f"breaker for {A}: OPEN -> HALF_OPEN (probe_due)",
        f"breaker for {A}: HALF_OPEN -> CLOSED (success)",
    ]


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
