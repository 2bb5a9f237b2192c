"""An upstream outage through the running proxy (issue 7): how hard the proxy hits a dead
upstream, and how fast a request it cannot answer from the cache gets its 502.

Runs the whole proxy under ``MockClock`` with the failover tests' harness: a fake network that
records every connection attempt, with upstreams that reset each connection
(``Net.down``), after ``Net.reset_delay`` of virtual time so that concurrent requests overlap
the first one's attempt. Counts and times are exact; nothing sleeps for real.

* Concurrent requests for one key make one upstream request, and share its outcome: a 304
  freshens the entry for all of them, an upstream failure answers all of them (the stale copy
  where stale-if-error allows, otherwise the 502).
* A retry waiting out its backoff ends when the breaker opens meanwhile, with no further
  attempt: the client gets its 502 then, not a backoff later.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from proxychain.breaker import Breaker, BreakerConfig, BreakerState
from proxychain.errors import ErrorKind
from proxychain.failover import Attempt, ChainWalk, Exhausted, RetryPolicy, Verdict, parse_chain
from proxychain.http import Request
from tests.fakes import FakeOrigin, Reply
from tests.test_proxy_failover import A, Got, Harness, open_harness, route

HERD = 10  # concurrent clients
RESET_DELAY = 0.1  # seconds the dead upstream takes to reset a connection
STALE_IF_ERROR = "max-age=1, stale-if-error=600"
# A new connection for every upstream request, so each one meets the (dead) network.
CLOSE = ("connection", "close")


async def herd(h: Harness, target: str, n: int = HERD) -> list[Got]:
    """``n`` concurrent GETs of ``target``, started at the same virtual instant."""
    got: list[Got] = []

    async def one() -> None:
        got.append(await h.get(target))

    async with trio.open_nursery() as clients:
        for _ in range(n):
            clients.start_soon(one)
    return got


def origin_with(path: str, reply: Reply) -> dict[str, FakeOrigin]:
    origin = FakeOrigin()
    origin.set(path, reply)
    return {"a": origin}


# ---- 1. concurrent requests for one key make one upstream request ----------------------------


async def test_concurrent_revalidations_of_a_stale_key_with_a_dead_upstream_make_one_attempt(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = origin_with(
        "/x", Reply(headers=[("cache-control", STALE_IF_ERROR), CLOSE], body=b"v1")
    )
    async with open_harness(tmp_path, [route(A)], origins, monkeypatch) as h:
        first = await h.get("/x")
        await trio.sleep(10)  # stale now
        h.net.down.add("a")
        h.net.reset_delay = RESET_DELAY
        before = h.net.count("a")
        got = await herd(h, "/x")
        attempts = h.net.count("a") - before
    assert first.headers["x-cache"] == "MISS"
    # One conditional request (not retried: the stale copy can answer); every client, the
    # leader and its waiters alike, gets the stale copy as soon as it failed.
    assert attempts == 1
    assert {(g.status, g.body, g.headers["x-cache"], g.complete) for g in got} == {
        (200, b"v1", "STALE", True)
    }
    assert {g.at for g in got} == {10 + RESET_DELAY}


def revalidated_origin(
    conditional: list[float], cache_control: str, *, delay_304: float
) -> dict[str, FakeOrigin]:
    """An origin "a" whose ``/x`` is ``v1`` (ETag ``"v1"``, ``cache_control``); a request
    with ``If-None-Match: "v1"`` is noted in ``conditional`` (trio time) and answered 304
    (``max-age=60``) after ``delay_304`` seconds."""

    def answer(request: Request) -> Reply:
        etag = [("etag", '"v1"')]
        if request.headers.get("if-none-match") == '"v1"':
            conditional.append(trio.current_time())
            fresh = [("cache-control", "max-age=60"), *etag]
            return Reply(status=304, headers=fresh, delay=delay_304)
        return Reply(headers=[("cache-control", cache_control), *etag], body=b"v1")

    origins = origin_with("/x", Reply())
    origins["a"].set("/x", answer)
    return origins


async def test_concurrent_revalidations_answered_304_make_one_conditional_request(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conditional: list[float] = []
    origins = revalidated_origin(conditional, "max-age=1", delay_304=0.1)
    async with open_harness(tmp_path, [route(A)], origins, monkeypatch) as h:
        await h.get("/x")
        await trio.sleep(10)  # stale, no stale-while-revalidate: each request must revalidate
        got = await herd(h, "/x")
        after = await h.get("/x")
    assert conditional == [10.0]
    assert {(g.status, g.body, g.complete) for g in got} == {(200, b"v1", True)}
    # The leader's answer is the revalidation; its waiters are served the freshened entry.
    assert sorted(g.headers["x-cache"] for g in got) == ["HIT"] * (HERD - 1) + ["REVALIDATED"]
    assert {g.at for g in got} == {10.1}
    assert (after.headers["x-cache"], origins["a"].count("/x")) == ("HIT", 2)


async def test_concurrent_misses_with_a_dead_upstream_make_one_attempt_and_all_get_502(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, [route(A, retries=0)], {"a": FakeOrigin()}, monkeypatch) as h:
        h.net.down.add("a")
        h.net.reset_delay = RESET_DELAY
        got = await herd(h, "/never-cached")
    assert h.net.count("a") == 1
    assert {(g.status, g.at) for g in got} == {(502, RESET_DELAY)}
    assert {g.body for g in got} == {got[0].body}  # the leader's reason, for every waiter
    assert b"reset" in got[0].body


async def test_stale_key_whose_stored_response_forbids_stale_use_gets_the_504_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each waiter applies the policy to the leader's error itself: must-revalidate forbids
    # the stale copy, so everyone gets the 504 that the leader got, from one attempt.
    origins = origin_with(
        "/x", Reply(headers=[("cache-control", "max-age=1, must-revalidate"), CLOSE], body=b"v1")
    )
    async with open_harness(tmp_path, [route(A, retries=0)], origins, monkeypatch) as h:
        await h.get("/x")
        await trio.sleep(10)
        h.net.down.add("a")
        h.net.reset_delay = RESET_DELAY
        before = h.net.count("a")
        got = await herd(h, "/x")
        attempts = h.net.count("a") - before
    assert attempts == 1
    assert {g.status for g in got} == {504}


async def test_a_revalidation_in_the_background_is_joined_by_a_foreground_one(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conditional: list[float] = []
    origins = revalidated_origin(conditional, "max-age=1, stale-while-revalidate=60", delay_304=0.5)
    async with open_harness(tmp_path, [route(A)], origins, monkeypatch) as h:
        await h.get("/x")
        await trio.sleep(10)
        stale = await h.get("/x")  # served stale; revalidates in the background
        # A client that will not take a stale copy must revalidate: it joins the one running.
        strict = await h.get("/x", ("cache-control", "no-cache"))
    assert stale.headers["x-cache"] == "STALE"
    assert (strict.status, strict.body, strict.headers["x-cache"]) == (200, b"v1", "HIT")
    assert strict.at == 10.5
    assert conditional == [10.0]


# ---- 2. a retry's backoff ends when the breaker opens ----------------------------------------


async def test_a_retry_waiting_out_its_backoff_ends_when_the_breaker_opens(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two misses for different keys meet the dead upstream at once. The first failure
    # schedules a retry (after a backoff of up to 50 ms); the second opens the breaker.
    # The retry is not made: both clients get their 502 at once, after two attempts.
    breaker = {"failures": 2, "open_base": "1s", "open_cap": "4s"}
    async with open_harness(
        tmp_path, [route(A, breaker=breaker)], {"a": FakeOrigin()}, monkeypatch
    ) as h:
        h.net.down.add("a")
        got: list[Got] = []

        async def one(target: str) -> None:
            got.append(await h.get(target))

        async with trio.open_nursery() as clients:
            clients.start_soon(one, "/p")
            clients.start_soon(one, "/q")
        state = h.stats(A).state
    assert h.net.times("a") == [0.0, 0.0]
    assert {(g.status, g.at) for g in got} == {(502, 0.0)}
    assert state is BreakerState.OPEN
    assert sorted(b"circuit open" in g.body for g in got) == [False, True]


def test_the_walk_asks_the_breaker_when_the_retry_is_due() -> None:
    rng = random.Random(0)
    breaker = Breaker(BreakerConfig(failures=2, open_jitter="none"), rng)
    walk = ChainWalk(parse_chain(A), {A: breaker}, RetryPolicy(max_retries=1), rng, 0.0)
    first = walk.next(0.0)
    assert isinstance(first, Attempt)
    nothing_scheduled = walk.retry_at
    assert nothing_scheduled is None
    assert walk.record(first, ErrorKind.RESET, 0.0) is Verdict.RETRY_SAME
    due = walk.retry_at
    assert due is not None
    assert 0.0 < due <= 0.05
    assert walk.next(0.0) == Attempt(  # asked at once: the whole delay is still to wait
        upstream_url=A, delay_before=due, attempt_no=2, hop=0, retry=1
    )
    # Another walk, with the same schedule; another request's failure opens the breaker
    # during its backoff.
    rng = random.Random(0)
    breaker = Breaker(BreakerConfig(failures=2, open_jitter="none"), rng)
    walk = ChainWalk(parse_chain(A), {A: breaker}, RetryPolicy(max_retries=1), rng, 0.0)
    first = walk.next(0.0)
    assert isinstance(first, Attempt)
    walk.record(first, ErrorKind.RESET, 0.0)
    breaker.on_failure(0.01)
    assert breaker.state is BreakerState.OPEN
    assert walk.next(due) == Exhausted(
        status_hint=502,
        reason=f"upstream {A} unavailable (circuit open)",
        history=(
            f"upstream {A} reset the connection before answering",
            f"upstream {A} unavailable (circuit open)",
        ),
    )
    assert walk.retry_at is None
