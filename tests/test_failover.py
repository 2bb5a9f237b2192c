"""Failover chain: parsing, classification and the walker's every separator/outcome pair."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from proxychain.backoff import Backoff
from proxychain.breaker import Breaker, BreakerConfig, BreakerEvent, BreakerState, StateChange
from proxychain.errors import ConfigError, ErrorKind
from proxychain.failover import (
    Attempt,
    Chain,
    ChainError,
    ChainWalk,
    Exhausted,
    Hop,
    Refuse,
    RetryPolicy,
    Verdict,
    classify,
    parse_chain,
)

USE, NF, ERR, RETRY = Verdict.USE, Verdict.NEXT_NOTFOUND, Verdict.NEXT_ERROR, Verdict.RETRY_SAME
CONNECT, RESET, TLS = ErrorKind.CONNECT, ErrorKind.RESET, ErrorKind.TLS
TIMEOUT, PROTOCOL = ErrorKind.TIMEOUT, ErrorKind.PROTOCOL
A, B, C = "http://a", "http://b", "http://c"


class _Open:
    """Script marker: the upstream's breaker is open when the walk starts."""


OPEN = _Open()
# A fixed retry delay keeps the tables readable; the seeded default is tested separately.
FIXED_RETRY = RetryPolicy(max_retries=1, backoff=Backoff(base=0.05, cap=1.0, jitter="none"))

Outcome = int | ErrorKind
Step = tuple[str, float, Verdict]  # (upstream letter, delay_before, verdict)


def opened_breaker() -> Breaker:
    breaker = Breaker(BreakerConfig(failures=1, open_jitter="none"), random.Random(0))
    breaker.on_failure(0.0)
    return breaker


def drive(
    chain: str | Chain | Refuse,
    script: Mapping[str, list[Outcome] | _Open],
    *,
    retry: RetryPolicy = FIXED_RETRY,
    breakers: dict[str, Breaker] | None = None,
    now: float = 0.0,
    **kwargs: object,
) -> tuple[list[Step], Outcome | Exhausted]:
    """Walk ``chain`` answering each attempt from ``script``; return the trace and the end."""
    parsed = parse_chain(chain) if isinstance(chain, str) else chain
    breakers = {} if breakers is None else breakers
    outcomes: dict[str, list[Outcome]] = {}
    for url, lines in script.items():
        if isinstance(lines, list):
            outcomes[url] = list(lines)
        else:
            breakers[url] = opened_breaker()
    walk = ChainWalk(parsed, breakers, retry, random.Random(0), now, **kwargs)  # type: ignore[arg-type]
    trace: list[Step] = []
    while True:
        step = walk.next(now)
        if isinstance(step, Exhausted):
            return trace, step
        now += step.delay_before
        outcome = outcomes[step.upstream_url].pop(0)
        verdict = walk.record(step, outcome, now)
        trace.append((step.upstream_url[-1], step.delay_before, verdict))
        if verdict is USE:
            return trace, outcome


# ---- the separator x outcome matrix ------------------------------------------------------
# (chain, script, expected trace, expected end: the USEd outcome or (status_hint, reason))
MATRIX: list[tuple[str, dict[str, list[Outcome] | _Open], list[Step], object]] = [
    # "," : fall through on 404/410 only
    ("A,B", {A: [200]}, [("a", 0, USE)], 200),
    ("A,B", {A: [404], B: [200]}, [("a", 0, NF), ("b", 0, USE)], 200),
    ("A,B", {A: [410], B: [200]}, [("a", 0, NF), ("b", 0, USE)], 200),
    ("A,B", {A: [500]}, [("a", 0, ERR)], (502, "upstream http://a answered 500")),
    ("A,B", {A: [502]}, [("a", 0, ERR)], (502, "upstream http://a answered 502")),
    ("A,B", {A: [503]}, [("a", 0, ERR)], (502, "upstream http://a answered 503")),
    ("A,B", {A: [504]}, [("a", 0, ERR)], (502, "upstream http://a answered 504")),
    (
        "A,B",
        {A: [CONNECT, CONNECT]},
        [("a", 0, RETRY), ("a", 0.05, ERR)],
        (502, "upstream http://a could not be connected to"),
    ),
    (
        "A,B",
        {A: [RESET, RESET]},
        [("a", 0, RETRY), ("a", 0.05, ERR)],
        (502, "upstream http://a reset the connection before answering"),
    ),
    ("A,B", {A: [TLS]}, [("a", 0, ERR)], (502, "upstream http://a failed the TLS handshake")),
    ("A,B", {A: [TIMEOUT]}, [("a", 0, ERR)], (504, "upstream http://a timed out")),
    ("A,B", {A: [PROTOCOL]}, [("a", 0, ERR)], (502, "upstream http://a sent a malformed response")),
    ("A,B", {A: OPEN}, [], (502, "upstream http://a unavailable (circuit open)")),
    # "|" : fall through on anything but a usable answer
    ("A|B", {A: [200]}, [("a", 0, USE)], 200),
    ("A|B", {A: [404], B: [200]}, [("a", 0, NF), ("b", 0, USE)], 200),
    ("A|B", {A: [410], B: [200]}, [("a", 0, NF), ("b", 0, USE)], 200),
    ("A|B", {A: [500], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: [502], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: [503], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: [504], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    (
        "A|B",
        {A: [CONNECT, CONNECT], B: [200]},
        [("a", 0, RETRY), ("a", 0.05, ERR), ("b", 0, USE)],
        200,
    ),
    ("A|B", {A: [RESET, RESET], B: [200]}, [("a", 0, RETRY), ("a", 0.05, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: [TLS], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: [TIMEOUT], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: [PROTOCOL], B: [200]}, [("a", 0, ERR), ("b", 0, USE)], 200),
    ("A|B", {A: OPEN, B: [200]}, [("b", 0, USE)], 200),
    # a retry that succeeds stays on the same upstream, whatever the separator
    ("A,B", {A: [CONNECT, 200]}, [("a", 0, RETRY), ("a", 0.05, USE)], 200),
    ("A|B", {A: [RESET, 404], B: [200]}, [("a", 0, RETRY), ("a", 0.05, NF), ("b", 0, USE)], 200),
    # the final hop: its 404/410 goes to the client, its failures end the walk
    ("A", {A: [404]}, [("a", 0, USE)], 404),
    ("A|B", {A: [503], B: [410]}, [("a", 0, ERR), ("b", 0, USE)], 410),
    ("A,B", {A: [404], B: [404]}, [("a", 0, NF), ("b", 0, USE)], 404),
    (
        "A|B",
        {A: [404], B: [500]},
        [("a", 0, NF), ("b", 0, ERR)],
        (502, "upstream http://b answered 500"),
    ),
    (
        "A|B",
        {A: [CONNECT, CONNECT], B: [TIMEOUT]},
        [("a", 0, RETRY), ("a", 0.05, ERR), ("b", 0, ERR)],
        (504, "upstream http://b timed out"),
    ),
    (
        "A|B",
        {A: [TIMEOUT], B: [TLS]},
        [("a", 0, ERR), ("b", 0, ERR)],
        (502, "upstream http://b failed the TLS handshake"),
    ),
    (
        "A|B",
        {A: [TIMEOUT], B: OPEN},
        [("a", 0, ERR)],
        (502, "upstream http://b unavailable (circuit open)"),
    ),
    ("A|B", {A: OPEN, B: OPEN}, [], (502, "upstream http://b unavailable (circuit open)")),
    (
        "A",
        {A: [RESET, RESET]},
        [("a", 0, RETRY), ("a", 0.05, ERR)],
        (502, "upstream http://a reset the connection before answering"),
    ),
    # mixed separators: each hop's own separator decides
    ("A,B|C", {A: [404], B: [503], C: [200]}, [("a", 0, NF), ("b", 0, ERR), ("c", 0, USE)], 200),
    ("A,B|C", {A: [TIMEOUT]}, [("a", 0, ERR)], (504, "upstream http://a timed out")),
    (
        "A|B,C",
        {A: [503], B: [503]},
        [("a", 0, ERR), ("b", 0, ERR)],
        (502, "upstream http://b answered 503"),
    ),
    ("A|B,C", {A: OPEN, B: OPEN}, [], (502, "upstream http://b unavailable (circuit open)")),
    ("A|B,C", {A: [TLS], B: [404], C: [200]}, [("a", 0, ERR), ("b", 0, NF), ("c", 0, USE)], 200),
    # a trailing off refuses whoever reaches it
    ("A,off", {A: [200]}, [("a", 0, USE)], 200),
    (
        "A,off",
        {A: [404]},
        [("a", 0, NF)],
        (403, "upstream http://a answered 404; the chain ends in off"),
    ),
    ("A,off", {A: [503]}, [("a", 0, ERR)], (502, "upstream http://a answered 503")),
    ("A,off", {A: OPEN}, [], (502, "upstream http://a unavailable (circuit open)")),
    (
        "A|off",
        {A: [TIMEOUT]},
        [("a", 0, ERR)],
        (403, "upstream http://a timed out; the chain ends in off"),
    ),
    (
        "A|off",
        {A: OPEN},
        [],
        (403, "upstream http://a unavailable (circuit open); the chain ends in off"),
    ),
    ("off", {}, [], (403, 'upstreams are "off" for this route')),
]


@pytest.mark.parametrize(("chain", "script", "trace", "end"), MATRIX)
def test_matrix(
    chain: str, script: dict[str, list[Outcome] | _Open], trace: list[Step], end: object
) -> None:
    text = chain.replace("A", A).replace("B", B).replace("C", C)
    got_trace, got_end = drive(text, script)
    assert got_trace == trace
    if isinstance(end, tuple):
        assert isinstance(got_end, Exhausted)
        assert (got_end.status_hint, got_end.reason) == end
    else:
        assert got_end == end


def test_exhausted_history_lists_every_failure() -> None:
    _, end = drive(f"{A}|{B}|{C}", {A: [CONNECT, RESET], B: OPEN, C: [503]})
    assert end == Exhausted(
        status_hint=502,
        reason="upstream http://c answered 503",
        history=(
            "upstream http://a could not be connected to",
            "upstream http://a reset the connection before answering",
            "upstream http://b unavailable (circuit open)",
            "upstream http://c answered 503",
        ),
    )


def test_exhausted_is_sticky() -> None:
    walk = ChainWalk(parse_chain(A), {}, FIXED_RETRY, random.Random(0), 0.0)
    attempt = walk.next(0.0)
    assert isinstance(attempt, Attempt)
    walk.record(attempt, 503, 0.0)
    expected = Exhausted(
        status_hint=502,
        reason="upstream http://a answered 503",
        history=("upstream http://a answered 503",),
    )
    assert walk.next(1.0) == expected
    assert walk.next(99.0) == expected  # the deadline cannot rewrite a finished walk
    assert repr(walk) == "<ChainWalk done hop=0 retry=0 attempts=1>"


def test_seeded_retry_delay() -> None:
    trace, _ = drive(A, {A: [CONNECT, 200]}, retry=RetryPolicy())
    assert trace == [("a", 0, RETRY), ("a", 0.04222109257625241, USE)]


def test_attempt_numbering() -> None:
    walk = ChainWalk(parse_chain(f"{A}|{B}"), {}, FIXED_RETRY, random.Random(0), 0.0)
    seen = []
    for outcome in (CONNECT, CONNECT, 200):
        attempt = walk.next(0.0)
        assert isinstance(attempt, Attempt)
        seen.append(attempt)
        walk.record(attempt, outcome, 0.0)
    assert seen == [
        Attempt(upstream_url=A, delay_before=0.0, attempt_no=1, hop=0, retry=0),
        Attempt(upstream_url=A, delay_before=0.05, attempt_no=2, hop=0, retry=1),
        Attempt(upstream_url=B, delay_before=0.0, attempt_no=3, hop=1, retry=0),
    ]


@pytest.mark.parametrize(
    ("max_retries", "trace"),
    [
        (0, [("a", 0, ERR), ("b", 0, USE)]),
        (1, [("a", 0, RETRY), ("a", 0.05, ERR), ("b", 0, USE)]),
        (2, [("a", 0, RETRY), ("a", 0.05, RETRY), ("a", 0.1, ERR), ("b", 0, USE)]),
    ],
)
def test_retry_bound(max_retries: int, trace: list[Step]) -> None:
    policy = RetryPolicy(max_retries=max_retries, backoff=Backoff(base=0.05, cap=1, jitter="none"))
    got, end = drive(f"{A}|{B}", {A: [CONNECT] * (max_retries + 1), B: [200]}, retry=policy)
    assert (got, end) == (trace, 200)


def test_no_retry_for_non_idempotent_requests() -> None:
    trace, _ = drive(f"{A}|{B}", {A: [CONNECT], B: [200]}, idempotent=False)
    assert trace == [("a", 0, ERR), ("b", 0, USE)]


def test_no_retry_past_the_deadline() -> None:
    trace, end = drive(A, {A: [CONNECT]}, deadline=0.05)
    assert trace == [("a", 0, ERR)]
    assert isinstance(end, Exhausted)
    assert end.status_hint == 502


def test_deadline_ends_the_walk() -> None:
    walk = ChainWalk(parse_chain(f"{A}|{B}"), {}, FIXED_RETRY, random.Random(0), 0.0, deadline=5.0)
    attempt = walk.next(0.0)
    assert isinstance(attempt, Attempt)
    assert walk.record(attempt, 503, 5.0) is ERR
    assert walk.next(5.0) == Exhausted(
        status_hint=504,
        reason="request deadline exceeded",
        history=("upstream http://a answered 503",),
    )


def test_no_retry_once_the_breaker_opened() -> None:
    breakers = {A: Breaker(BreakerConfig(failures=1), random.Random(0))}
    trace, end = drive(f"{A}|{B}", {A: [CONNECT], B: [200]}, breakers=breakers)
    assert (trace, end) == ([("a", 0, ERR), ("b", 0, USE)], 200)


# outcome -> (breaker failures, successes) after one record() on a "|" hop
BREAKER_FEED = [
    (200, 0, 1),
    (304, 0, 1),
    (404, 0, 1),
    (410, 0, 1),
    (429, 0, 1),
    (500, 0, 1),
    (502, 1, 0),
    (503, 1, 0),
    (504, 1, 0),
    (CONNECT, 2, 0),  # retried once
    (RESET, 2, 0),
    (TLS, 1, 0),
    (TIMEOUT, 1, 0),
    (PROTOCOL, 1, 0),
]


@pytest.mark.parametrize(("outcome", "failures", "successes"), BREAKER_FEED)
def test_outcomes_feed_the_breaker(outcome: Outcome, failures: int, successes: int) -> None:
    breakers = {A: Breaker(BreakerConfig(), random.Random(0))}
    script: dict[str, list[Outcome] | _Open] = {A: [outcome] * 2, B: [200]}
    drive(f"{A}|{B}", script, breakers=breakers)
    stats = breakers[A].statistics()
    assert (stats.failures, stats.successes) == (failures, successes)
    assert stats.requests == failures + successes


def test_last_state_change_is_reported() -> None:
    breakers = {A: Breaker(BreakerConfig(failures=2, open_jitter="none"), random.Random(0))}
    changes = []
    for now, outcome in ((3.0, TIMEOUT), (4.0, 503)):
        walk = ChainWalk(parse_chain(f"{A}|{B}"), breakers, FIXED_RETRY, random.Random(0), now)
        attempt = walk.next(now)
        assert isinstance(attempt, Attempt)
        assert walk.record(attempt, outcome, now) is ERR
        changes.append(walk.last_state_change)
    assert changes == [
        None,
        StateChange(
            old=BreakerState.CLOSED,
            new=BreakerState.OPEN,
            event=BreakerEvent.TRIP,
            at=4.0,
            next_probe_at=5.0,
        ),
    ]


def test_half_open_trial_is_released_on_abandon() -> None:
    breaker = opened_breaker()  # probe due at 1.0
    walk = ChainWalk(parse_chain(A), {A: breaker}, FIXED_RETRY, random.Random(0), 1.0)
    attempt = walk.next(1.0)
    assert isinstance(attempt, Attempt)
    assert not breaker.allow(1.0)
    walk.abandon(attempt, 1.5)
    assert walk.next(1.5) == Exhausted(
        status_hint=502, reason="attempt to upstream http://a abandoned"
    )
    assert breaker.allow(1.5)
    assert breaker.statistics().failures == 1  # abandoning judged nothing


def test_abandon_at_the_deadline() -> None:
    walk = ChainWalk(parse_chain(A), {}, FIXED_RETRY, random.Random(0), 0.0, deadline=2.0)
    attempt = walk.next(0.0)
    assert isinstance(attempt, Attempt)
    walk.abandon(attempt, 2.0)
    assert walk.next(2.0) == Exhausted(status_hint=504, reason="request deadline exceeded")


def test_misuse_is_refused() -> None:
    walk = ChainWalk(parse_chain(A), {}, FIXED_RETRY, random.Random(0), 0.0)
    attempt = walk.next(0.0)
    assert isinstance(attempt, Attempt)
    with pytest.raises(RuntimeError, match="record"):
        walk.next(0.0)
    stranger = Attempt(upstream_url=A, delay_before=0.0, attempt_no=1, hop=0, retry=0)
    with pytest.raises(RuntimeError, match="not the pending attempt"):
        walk.record(stranger, 200, 0.0)
    with pytest.raises(RuntimeError, match="not the pending attempt"):
        walk.abandon(stranger, 0.0)
    assert repr(walk) == "<ChainWalk pending hop=0 retry=0 attempts=1>"
    assert walk.record(attempt, 200, 0.0) is USE
    assert repr(walk) == "<ChainWalk used hop=0 retry=0 attempts=1>"
    with pytest.raises(RuntimeError, match="nothing is retried"):
        walk.next(0.0)


# ---- classify ----------------------------------------------------------------------------

CLASSIFY = [
    (200, USE),
    (204, USE),
    (206, USE),
    (301, USE),
    (304, USE),
    (400, USE),
    (403, USE),
    (404, NF),
    (410, NF),
    (429, USE),
    (500, ERR),
    (501, ERR),
    (502, ERR),
    (503, ERR),
    (504, ERR),
    (599, ERR),
    (CONNECT, RETRY),
    (RESET, RETRY),
    (TLS, ERR),
    (TIMEOUT, ERR),
    (PROTOCOL, ERR),
]


@pytest.mark.parametrize(("outcome", "verdict"), CLASSIFY)
def test_classify(outcome: Outcome, verdict: Verdict) -> None:
    assert classify(outcome) is verdict


@pytest.mark.parametrize("status", [0, 99, 600])
def test_classify_rejects_non_statuses(status: int) -> None:
    with pytest.raises(ValueError, match="not an HTTP status"):
        classify(status)


# ---- parse_chain -------------------------------------------------------------------------

PARSE_OK = [
    ("https://a", Chain(hops=(Hop(url="https://a", fallthrough="notfound"),))),
    (
        "https://a,https://b|https://c",
        Chain(
            hops=(
                Hop(url="https://a", fallthrough="notfound"),
                Hop(url="https://b", fallthrough="any"),
                Hop(url="https://c", fallthrough="notfound"),
            )
        ),
    ),
    (
        " https://a/go | http://b:8080/x/ ",
        Chain(
            hops=(
                Hop(url="https://a/go", fallthrough="any"),
                Hop(url="http://b:8080/x/", fallthrough="notfound"),
            )
        ),
    ),
    ("https://a,off", Chain(hops=(Hop(url="https://a"),), ends_off=True)),
    (
        "http://[::1]:3000|off",
        Chain(hops=(Hop(url="http://[::1]:3000", fallthrough="any"),), ends_off=True),
    ),
    ("off", Refuse()),
    (" off ", Refuse()),
]


@pytest.mark.parametrize(("text", "chain"), PARSE_OK)
def test_parse_chain(text: str, chain: Chain | Refuse) -> None:
    assert parse_chain(text) == chain


PARSE_ERRORS = [
    ("", "empty upstream list"),
    ("   ", "empty upstream list"),
    ("https://a,,https://b", "empty element #2 in 'https://a,,https://b'"),
    ("https://a,", "empty element #2"),
    ("|https://a", "empty element #1"),
    ("https://a| ,https://b", "empty element #2"),
    ("direct", '"direct" .* is not supported'),
    ("https://a,direct", '"direct" .* is not supported'),
    ("off,https://a", '"off" must be the last element'),
    ("https://a|off|https://b", '"off" must be the last element'),
    ("ftp://a", "expected an http:// or https:// URL with a host, got 'ftp://a'"),
    ("https://", "expected an http:// or https:// URL with a host"),
    ("proxy.golang.org", "expected an http:// or https:// URL with a host"),
    ("https://a:port", "bad upstream URL 'https://a:port'"),
    ("https://a/x?y=1", "must have no spaces, query or fragment"),
    ("https://a/x#y", "must have no spaces, query or fragment"),
    ("https://a b", "must have no spaces, query or fragment"),
]


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS)
def test_parse_chain_errors(text: str, message: str) -> None:
    with pytest.raises(ChainError, match=message) as info:
        parse_chain(text)
    assert isinstance(info.value, ConfigError)
    assert info.value.status_hint == 500


def test_chain_needs_a_hop() -> None:
    with pytest.raises(ChainError, match="at least one upstream"):
        Chain(hops=())


def test_retry_policy_validation() -> None:
    with pytest.raises(ConfigError, match="retries: expected an integer >= 0"):
        RetryPolicy(max_retries=-1)


# ---- excluded upstreams (an integrity failure earlier in the same request) ---------------
# (chain, excluded letters, script, expected trace, expected end)
EXCLUDE: list[tuple[str, str, dict[str, list[Outcome] | _Open], list[Step], object]] = [
    ("A|B", "a", {B: [200]}, [("b", 0, USE)], 200),
    (
        "A|B",
        "b",
        {A: [503]},
        [("a", 0, ERR)],
        (502, "upstream http://b excluded (failed an integrity check)"),
    ),
    ("A|B", "ab", {}, [], (502, "upstream http://b excluded (failed an integrity check)")),
    ("A,B", "a", {}, [], (502, "upstream http://a excluded (failed an integrity check)")),
    (
        "A,B",
        "b",
        {A: [404]},
        [("a", 0, NF)],
        (502, "upstream http://b excluded (failed an integrity check)"),
    ),
    ("A", "a", {}, [], (502, "upstream http://a excluded (failed an integrity check)")),
    ("A|B,C", "a", {B: [404], C: [200]}, [("b", 0, NF), ("c", 0, USE)], 200),
    ("A|B|C", "ab", {C: [200]}, [("c", 0, USE)], 200),
    (
        "A|off",
        "a",
        {},
        [],
        (403, "upstream http://a excluded (failed an integrity check); the chain ends in off"),
    ),
    # an excluded hop with an open breaker reads as excluded
    ("A|B", "a", {A: OPEN, B: [200]}, [("b", 0, USE)], 200),
]


@pytest.mark.parametrize(("chain", "excluded", "script", "trace", "end"), EXCLUDE)
def test_exclude(
    chain: str,
    excluded: str,
    script: dict[str, list[Outcome] | _Open],
    trace: list[Step],
    end: object,
) -> None:
    text = chain.replace("A", A).replace("B", B).replace("C", C)
    exclude = frozenset(f"http://{letter}" for letter in excluded)
    got_trace, got_end = drive(text, script, exclude=exclude)
    assert got_trace == trace
    if isinstance(end, tuple):
        assert isinstance(got_end, Exhausted)
        assert (got_end.status_hint, got_end.reason) == end
    else:
        assert got_end == end


def test_excluded_hop_does_not_take_the_half_open_probe() -> None:
    breaker = opened_breaker()
    assert breaker.allow(1000.0)  # due: moves to HALF_OPEN, one probe allowed
    breaker = opened_breaker()
    walk = ChainWalk(
        parse_chain(f"{A}|{B}"),
        {A: breaker},
        FIXED_RETRY,
        random.Random(0),
        1000.0,
        exclude=frozenset({A}),
    )
    step = walk.next(1000.0)
    assert isinstance(step, Attempt)
    assert step.upstream_url == B
    assert breaker.state is BreakerState.OPEN


def test_a_walk_without_trials_is_refused_by_a_due_breaker_and_leaves_it_open() -> None:
    breaker = opened_breaker()  # probe due at 1.0
    walk = ChainWalk(
        parse_chain(f"{A}|{B}"), {A: breaker}, FIXED_RETRY, random.Random(0), 5.0, trials=False
    )
    step = walk.next(5.0)
    assert isinstance(step, Attempt)
    assert step.upstream_url == B
    alone = ChainWalk(
        parse_chain(A), {A: breaker}, FIXED_RETRY, random.Random(0), 5.0, trials=False
    )
    end = alone.next(5.0)
    assert isinstance(end, Exhausted)
    assert (end.status_hint, end.reason) == (502, "upstream http://a unavailable (circuit open)")
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow(5.0)  # the trial is still there for the health probe
    assert breaker.statistics().state is BreakerState.HALF_OPEN
