"""Tables for policy.py: RFC 9111 storing, reuse, validation and invalidation for a shared cache."""

from __future__ import annotations

import math
from typing import assert_never

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxychain.entry import Entry
from proxychain.http import Headers, Request, ResponseHead, format_http_date
from proxychain.keys import ABSENT
from proxychain.policy import (
    DEFAULT_NEGATIVE_TTL,
    Fail,
    Fresh,
    Freshen,
    GatewayTimeout,
    LookupDecision,
    Miss,
    Override,
    Replace,
    RequestDirectives,
    Revalidate,
    RoutePolicy,
    ServeStale,
    answer_conditional,
    cached_response_headers,
    conditional_headers,
    effective_lifetime,
    invalidations,
    lookup,
    not_modified_headers,
    on_upstream_error,
    on_validation,
    request_cacheability,
    storable,
    stored_headers,
    why_not_storable,
)

T0 = 1_700_000_000.0
Fields = list[tuple[str, str]]


def at(offset: float) -> str:
    return format_http_date(T0 + offset)


def entry(
    fields: Fields,
    *,
    status: int = 200,
    vary: dict[str, str] | None = None,
    request_time: float = 0.0,
    response_time: float = 0.0,
) -> Entry:
    """A stored response received at T0 + response_time, with Date = T0 unless given."""
    headers = Headers(fields)
    if "date" not in headers:
        headers = headers.add("date", at(0))
    return Entry(
        key="k",
        status=status,
        headers=headers,
        vary=vary or {},
        request_time=T0 + request_time,
        response_time=T0 + response_time,
    )


def get(fields: Fields = (), method: str = "GET", target: str = "/a") -> Request:  # type: ignore[assignment]
    return Request(method=method, target=target, headers=Headers(fields), authority="example.com")


def summary(decision: LookupDecision) -> tuple[object, ...]:
    match decision:
        case Fresh(age=age):
            return ("fresh", age)
        case ServeStale(age=age, revalidate=revalidate):
            return ("stale", age, revalidate)
        case Revalidate(conditional_headers=headers):
            return ("revalidate", list(headers))
        case Miss():
            return ("miss",)
        case GatewayTimeout():
            return ("504",)
        case _:
            assert_never(decision)


def test_defaults() -> None:
    route = RoutePolicy()
    assert DEFAULT_NEGATIVE_TTL == 60.0
    assert (route.negative_ttl, route.swr_default, route.max_stale) == (60.0, 0.0, 0.0)
    assert (route.heuristic_fraction, route.heuristic_cap, route.default_ttl) == (
        0.1,
        86400.0,
        None,
    )
    assert route.ignore_client_no_cache is False
    assert Override() == Override(immutable=False, ttl=None, swr=None, max_stale=None)


# ---- request directives ------------------------------------------------------------------

REQUESTS: list[tuple[str, Fields, RequestDirectives]] = [
    ("GET", [], RequestDirectives(use_cache=True, invalidates=False)),
    ("head", [], RequestDirectives(use_cache=True, invalidates=False)),
    ("POST", [], RequestDirectives(use_cache=False, invalidates=True)),
    ("OPTIONS", [], RequestDirectives(use_cache=False, invalidates=False)),
    ("PROPFIND", [], RequestDirectives(use_cache=False, invalidates=True)),
    ("GET", [("If-Match", '"a"')], RequestDirectives(use_cache=False, invalidates=False)),
    (
        "GET",
        [("If-Unmodified-Since", at(0))],
        RequestDirectives(use_cache=False, invalidates=False),
    ),
    (
        "GET",
        [("Cache-Control", "max-age=0")],
        RequestDirectives(use_cache=True, invalidates=False, max_age=0.0),
    ),
    (
        "GET",
        [("Cache-Control", "max-age=x")],
        RequestDirectives(use_cache=True, invalidates=False, max_age=0.0),
    ),
    (
        "GET",
        [("Cache-Control", "No-Cache")],
        RequestDirectives(use_cache=True, invalidates=False, no_cache=True),
    ),
    (
        "GET",
        [("Pragma", "no-cache")],
        RequestDirectives(use_cache=True, invalidates=False, no_cache=True),
    ),
    (
        "GET",
        [("Pragma", "no-cache"), ("Cache-Control", "max-age=5")],
        RequestDirectives(use_cache=True, invalidates=False, max_age=5.0),
    ),
    (
        "GET",
        [("Cache-Control", "max-stale")],
        RequestDirectives(use_cache=True, invalidates=False, max_stale=math.inf),
    ),
    (
        "GET",
        [("Cache-Control", "max-stale=30")],
        RequestDirectives(use_cache=True, invalidates=False, max_stale=30.0),
    ),
    (
        "GET",
        [("Cache-Control", "max-stale=bad")],
        RequestDirectives(use_cache=True, invalidates=False),
    ),
    (
        "GET",
        [("Cache-Control", "min-fresh=9, only-if-cached, no-store")],
        RequestDirectives(
            use_cache=True, invalidates=False, min_fresh=9.0, only_if_cached=True, no_store=True
        ),
    ),
]


@pytest.mark.parametrize(("method", "fields", "expected"), REQUESTS)
def test_request_cacheability(method: str, fields: Fields, expected: RequestDirectives) -> None:
    assert request_cacheability(get(fields, method)) == expected


def test_lookup_remembers_freshness_per_entry_route_and_override() -> None:
    # What lookup derives from an entry is kept with its fields: the same fields under other
    # route knobs, or received at another time, must still be judged on their own.
    stored = entry([("Last-Modified", at(-2000))])  # heuristic lifetime: 10 % of 2000 s
    later = stored.replace(request_time=T0 + 100, response_time=T0 + 100)  # same Headers
    request = get()
    assert [
        summary(lookup(request, [stored], T0 + 50)),
        summary(lookup(request, [stored], T0 + 50, RoutePolicy(default_ttl=10.0))),
        summary(lookup(request, [stored], T0 + 500, override=Override(immutable=True))),
        summary(lookup(request, [stored], T0 + 250)),
        summary(lookup(request, [later], T0 + 150)),
    ] == [
        ("fresh", 50.0),
        ("revalidate", [("if-modified-since", at(-2000))]),
        ("fresh", 500.0),
        ("revalidate", [("if-modified-since", at(-2000))]),
        ("fresh", 150.0),  # Date 100 s before it arrived (apparent age), then 50 s resident
    ]


def test_request_cacheability_is_remembered_per_method() -> None:
    # The server shares one Headers object per header block, whatever the method.
    shared = Headers([("Cache-Control", "max-age=5")])
    for _ in range(2):
        assert request_cacheability(Request(method="GET", target="/", headers=shared)).use_cache
        post = request_cacheability(Request(method="POST", target="/", headers=shared))
        assert (post.use_cache, post.invalidates, post.max_age) == (False, True, 5.0)


# ---- lookup ------------------------------------------------------------------------------

MA100 = [("Cache-Control", "max-age=100"), ("ETag", '"v1"')]
ETAG_ONLY = [("if-none-match", '"v1"'), ("if-modified-since", at(0))]

LOOKUP: list[tuple[str, Fields, Fields, float, tuple[object, ...]]] = [
    # (case, stored response fields, request fields, now - T0, expected summary)
    ("fresh", MA100, [], 10, ("fresh", 10.0)),
    ("fresh at boundary-1", MA100, [], 99, ("fresh", 99.0)),
    ("stale at lifetime", MA100, [], 100, ("revalidate", ETAG_ONLY)),
    ("request max-age=0", MA100, [("Cache-Control", "max-age=0")], 10, ("revalidate", ETAG_ONLY)),
    ("request max-age=0 at age 0", MA100, [("Cache-Control", "max-age=0")], 0, ("fresh", 0.0)),
    ("request max-age ok", MA100, [("Cache-Control", "max-age=20")], 10, ("fresh", 10.0)),
    ("request no-cache", MA100, [("Cache-Control", "no-cache")], 1, ("revalidate", ETAG_ONLY)),
    ("pragma no-cache", MA100, [("Pragma", "no-cache")], 1, ("revalidate", ETAG_ONLY)),
    ("min-fresh ok", MA100, [("Cache-Control", "min-fresh=50")], 50, ("fresh", 50.0)),
    (
        "min-fresh too little",
        MA100,
        [("Cache-Control", "min-fresh=50")],
        51,
        ("revalidate", ETAG_ONLY),
    ),
    ("max-stale bare", MA100, [("Cache-Control", "max-stale")], 5000, ("stale", 5000.0, False)),
    ("max-stale within", MA100, [("Cache-Control", "max-stale=10")], 110, ("stale", 110.0, False)),
    (
        "max-stale beyond",
        MA100,
        [("Cache-Control", "max-stale=10")],
        111,
        ("revalidate", ETAG_ONLY),
    ),
    (
        "max-stale with max-age",
        MA100,
        [("Cache-Control", "max-stale, max-age=105")],
        110,
        ("revalidate", ETAG_ONLY),
    ),
    (
        "max-stale vs must-revalidate",
        [*MA100, ("Cache-Control", "must-revalidate")],
        [("Cache-Control", "max-stale")],
        200,
        ("revalidate", ETAG_ONLY),
    ),
    (
        "max-stale vs proxy-revalidate",
        [("Cache-Control", "max-age=1, proxy-revalidate")],
        [("Cache-Control", "max-stale")],
        2,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "max-stale vs s-maxage",
        [("Cache-Control", "s-maxage=1")],
        [("Cache-Control", "max-stale")],
        2,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "response no-cache",
        [("Cache-Control", "max-age=100, no-cache"), ("ETag", '"v1"')],
        [],
        1,
        ("revalidate", ETAG_ONLY),
    ),
    (
        "response No-CaChE",
        [("Cache-Control", "max-age=100, No-CaChE")],
        [],
        1,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "qualified no-cache is reusable",
        [("Cache-Control", 'max-age=100, no-cache="set-cookie"')],
        [],
        1,
        ("fresh", 1.0),
    ),
    (
        "swr inside",
        [("Cache-Control", "max-age=10, stale-while-revalidate=60")],
        [],
        70,
        ("stale", 70.0, True),
    ),
    (
        "swr outside",
        [("Cache-Control", "max-age=10, stale-while-revalidate=60")],
        [],
        71,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "swr vs must-revalidate",
        [("Cache-Control", "max-age=10, stale-while-revalidate=60, must-revalidate")],
        [],
        20,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "swr vs request max-age",
        [("Cache-Control", "max-age=10, stale-while-revalidate=60")],
        [("Cache-Control", "max-age=15")],
        12,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    ("only-if-cached fresh", MA100, [("Cache-Control", "only-if-cached")], 1, ("fresh", 1.0)),
    ("only-if-cached stale", MA100, [("Cache-Control", "only-if-cached")], 101, ("504",)),
    (
        "only-if-cached + max-stale",
        MA100,
        [("Cache-Control", "only-if-cached, max-stale")],
        101,
        ("stale", 101.0, False),
    ),
    ("Age header counts", [*MA100, ("Age", "95")], [], 4, ("fresh", 99.0)),
    ("Age header stales", [*MA100, ("Age", "95")], [], 5, ("revalidate", ETAG_ONLY)),
    ("expires", [("Expires", at(30))], [], 29, ("fresh", 29.0)),
    (
        "expires 0",
        [("Expires", "0"), ("Last-Modified", at(-9))],
        [],
        0,
        ("revalidate", [("if-modified-since", at(-9))]),
    ),
    ("heuristic", [("Last-Modified", at(-1000))], [], 99, ("fresh", 99.0)),
    (
        "heuristic over",
        [("Last-Modified", at(-1000))],
        [],
        100,
        ("revalidate", [("if-modified-since", at(-1000))]),
    ),
    ("no validators, no freshness", [], [], 0, ("revalidate", [("if-modified-since", at(0))])),
    (
        "two etags lines",
        [("Cache-Control", "max-age=1"), ("ETag", 'W/"w"')],
        [],
        5,
        ("revalidate", [("if-none-match", 'W/"w"'), ("if-modified-since", at(0))]),
    ),
]


@pytest.mark.parametrize(
    ("stored", "request_fields", "now", "expected"),
    [case[1:] for case in LOOKUP],
    ids=[case[0] for case in LOOKUP],
)
def test_lookup(
    stored: Fields, request_fields: Fields, now: float, expected: tuple[object, ...]
) -> None:
    decision = lookup(get(request_fields), [entry(stored)], T0 + now)
    assert summary(decision) == expected


ROUTED: list[
    tuple[str, int, Fields, Fields, float, RoutePolicy, Override | None, tuple[object, ...]]
] = [
    ("negative ttl", 404, [], [], 59, RoutePolicy(), None, ("fresh", 59.0)),
    (
        "negative ttl over",
        404,
        [],
        [],
        60,
        RoutePolicy(),
        None,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "negative ttl knob",
        410,
        [],
        [],
        5,
        RoutePolicy(negative_ttl=5),
        None,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "negative explicit wins",
        404,
        [("Cache-Control", "max-age=3")],
        [],
        4,
        RoutePolicy(),
        None,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "default ttl",
        200,
        [("Last-Modified", at(-10))],
        [],
        50,
        RoutePolicy(default_ttl=60),
        None,
        ("fresh", 50.0),
    ),
    (
        "override ttl beats default",
        200,
        [],
        [],
        50,
        RoutePolicy(default_ttl=60),
        Override(ttl=40),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "override ttl not for 500",
        500,
        [],
        [],
        1,
        RoutePolicy(),
        Override(ttl=40),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "explicit beats override ttl",
        200,
        [("Cache-Control", "max-age=5")],
        [],
        6,
        RoutePolicy(),
        Override(ttl=40),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "immutable",
        200,
        [("Cache-Control", "max-age=5")],
        [],
        10**9,
        RoutePolicy(),
        Override(immutable=True),
        ("fresh", 1e9),
    ),
    (
        "immutable beats no-cache",
        200,
        [("Cache-Control", "no-cache")],
        [],
        10,
        RoutePolicy(),
        Override(immutable=True),
        ("fresh", 10.0),
    ),
    (
        "immutable but client no-cache",
        200,
        [],
        [("Cache-Control", "no-cache")],
        10,
        RoutePolicy(),
        Override(immutable=True),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "immutable ignores client no-cache",
        200,
        [],
        [("Cache-Control", "no-cache")],
        10,
        RoutePolicy(ignore_client_no_cache=True),
        Override(immutable=True),
        ("fresh", 10.0),
    ),
    (
        "immutable ignores max-age=0",
        200,
        [],
        [("Cache-Control", "max-age=0")],
        10,
        RoutePolicy(ignore_client_no_cache=True),
        Override(immutable=True),
        ("fresh", 10.0),
    ),
    (
        "ignore flag needs immutable",
        200,
        [("Cache-Control", "max-age=100")],
        [("Cache-Control", "no-cache")],
        10,
        RoutePolicy(ignore_client_no_cache=True),
        None,
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "immutable 404 is not forever",
        404,
        [],
        [],
        61,
        RoutePolicy(),
        Override(immutable=True),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "route swr",
        200,
        [("Cache-Control", "max-age=10")],
        [],
        15,
        RoutePolicy(swr_default=5),
        None,
        ("stale", 15.0, True),
    ),
    (
        "override swr beats route",
        200,
        [("Cache-Control", "max-age=10")],
        [],
        15,
        RoutePolicy(swr_default=5),
        Override(swr=4),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
    (
        "origin swr beats override",
        200,
        [("Cache-Control", "max-age=10, stale-while-revalidate=1")],
        [],
        15,
        RoutePolicy(),
        Override(swr=100),
        ("revalidate", [("if-modified-since", at(0))]),
    ),
]


@pytest.mark.parametrize(
    ("status", "stored", "request_fields", "now", "route", "override", "expected"),
    [case[1:] for case in ROUTED],
    ids=[case[0] for case in ROUTED],
)
def test_lookup_routed(
    status: int,
    stored: Fields,
    request_fields: Fields,
    now: float,
    route: RoutePolicy,
    override: Override | None,
    expected: tuple[object, ...],
) -> None:
    decision = lookup(
        get(request_fields),
        [entry(stored, status=status)],
        T0 + now,
        route=route,
        override=override,
    )
    assert summary(decision) == expected


def test_lookup_misses() -> None:
    stored = [entry(MA100)]
    assert lookup(get(method="POST"), stored, T0) == Miss(
        reason="method or preconditions not answerable from cache"
    )
    assert lookup(get([("If-Match", '"v1"')]), stored, T0) == Miss(
        reason="method or preconditions not answerable from cache"
    )
    assert lookup(get(), [], T0) == Miss(reason="no stored response matches")
    assert lookup(get([("Cache-Control", "only-if-cached")]), [], T0) == GatewayTimeout(
        reason="only-if-cached and nothing stored"
    )


def test_lookup_head_uses_stored_get() -> None:
    assert summary(lookup(get(method="HEAD"), [entry(MA100)], T0 + 3)) == ("fresh", 3.0)


def test_lookup_selects_vary_variant_most_recent() -> None:
    gzip_old = entry([*MA100, ("Vary", "Accept-Encoding")], vary={"accept-encoding": "gzip"})
    gzip_new = entry(
        [*MA100, ("Vary", "Accept-Encoding")], vary={"accept-encoding": "gzip"}, response_time=5
    )
    plain = entry([*MA100, ("Vary", "Accept-Encoding")], vary={"accept-encoding": ABSENT})
    star = entry([*MA100, ("Vary", "*")])
    candidates = [gzip_old, plain, gzip_new, star]
    chosen = lookup(get([("Accept-Encoding", "GZIP")]), candidates, T0 + 10)
    assert chosen == Fresh(entry=gzip_new, age=10.0)
    assert lookup(get(), candidates, T0 + 10) == Fresh(entry=plain, age=10.0)
    assert lookup(get([("Accept-Encoding", "br")]), candidates, T0) == Miss(
        reason="no stored response matches"
    )
    # The stored Vary header counts even if the recorded values forgot a name.
    forgot = entry([*MA100, ("Vary", "Accept")])
    assert lookup(get([("Accept", "x")]), [forgot], T0).__class__ is Miss
    assert lookup(get(), [forgot], T0) == Fresh(entry=forgot, age=0.0)
    # Route-forced fields key even without Vary.
    route = RoutePolicy(forced_vary=("accept",))
    assert lookup(get([("Accept", "x")]), [entry(MA100)], T0, route=route).__class__ is Miss


def test_conditional_headers_lists_every_matching_etag() -> None:
    one = entry([("ETag", '"a"'), ("Last-Modified", at(-5))])
    two = entry([("ETag", 'W/"b"')])
    dup = entry([("ETag", '"a"')])
    assert list(conditional_headers(one, [one, two, dup])) == [
        ("if-none-match", '"a", W/"b"'),
        ("if-modified-since", at(-5)),
    ]
    bare = Entry(key="k", headers=Headers([("ETag", "garbage")]))
    assert list(conditional_headers(bare)) == []


# ---- storing -----------------------------------------------------------------------------

STORABLE: list[tuple[str, str, Fields, int, Fields, Override | None, str | None]] = [
    # (case, method, request fields, status, response fields, override, reason or None)
    ("plain 200 max-age", "GET", [], 200, [("Cache-Control", "max-age=1")], None, None),
    ("200 without freshness (heuristic status)", "GET", [], 200, [], None, None),
    (
        "HEAD not stored",
        "HEAD",
        [],
        200,
        [("Cache-Control", "max-age=1")],
        None,
        "only responses to GET are stored",
    ),
    (
        "POST not stored",
        "POST",
        [],
        200,
        [("Cache-Control", "max-age=1")],
        None,
        "only responses to GET are stored",
    ),
    ("1xx", "GET", [], 103, [], None, "status is not final"),
    (
        "206",
        "GET",
        [("Range", "bytes=0-1")],
        206,
        [("Cache-Control", "max-age=1"), ("Content-Range", "bytes 0-1/5")],
        None,
        "partial content is not stored",
    ),
    (
        "304",
        "GET",
        [],
        304,
        [("Cache-Control", "max-age=1")],
        None,
        "304 is not a storable response",
    ),
    (
        "request no-store",
        "GET",
        [("Cache-Control", "no-store")],
        200,
        [("Cache-Control", "max-age=1")],
        None,
        "request no-store",
    ),
    (
        "response no-store",
        "GET",
        [],
        200,
        [("Cache-Control", "max-age=10000, No-Store"), ("Expires", at(10000))],
        None,
        "response no-store",
    ),
    (
        "must-understand lifts no-store",
        "GET",
        [],
        200,
        [("Cache-Control", "must-understand, no-store, max-age=9")],
        None,
        None,
    ),
    (
        "must-understand unknown status",
        "GET",
        [],
        299,
        [("Cache-Control", "must-understand, no-store, max-age=9")],
        None,
        "must-understand",
    ),
    ("private", "GET", [], 200, [("Cache-Control", "private, max-age=3600")], None, "private"),
    (
        "qualified private",
        "GET",
        [],
        200,
        [("Cache-Control", 'private="x", max-age=3600')],
        None,
        None,
    ),
    (
        "authorization",
        "GET",
        [("Authorization", "Basic x")],
        200,
        [("Cache-Control", "max-age=9")],
        None,
        "request has Authorization",
    ),
    (
        "authorization public",
        "GET",
        [("Authorization", "Basic x")],
        200,
        [("Cache-Control", "public")],
        None,
        None,
    ),
    (
        "authorization s-maxage",
        "GET",
        [("Authorization", "Basic x")],
        200,
        [("Cache-Control", "s-maxage=9")],
        None,
        None,
    ),
    (
        "authorization must-revalidate",
        "GET",
        [("Authorization", "Basic x")],
        200,
        [("Cache-Control", "must-revalidate")],
        None,
        None,
    ),
    ("vary star", "GET", [], 200, [("Cache-Control", "max-age=9"), ("Vary", "*")], None, "Vary: *"),
    (
        "content-range on 200",
        "GET",
        [],
        200,
        [("Cache-Control", "max-age=9"), ("Content-Range", "bytes 0-1/2")],
        None,
        "Content-Range on a complete response",
    ),
    (
        "201 without freshness",
        "GET",
        [],
        201,
        [],
        None,
        "no explicit freshness and status not heuristically cacheable",
    ),
    ("201 with expires", "GET", [], 201, [("Expires", "0")], None, None),
    ("201 with max-age", "GET", [], 201, [("Cache-Control", "max-age=5")], None, None),
    ("599 public", "GET", [], 599, [("Cache-Control", "public")], None, None),
    (
        "503 plain",
        "GET",
        [],
        503,
        [],
        None,
        "no explicit freshness and status not heuristically cacheable",
    ),
    ("404 negative", "GET", [], 404, [], None, None),
    ("no-cache response is storable", "GET", [], 200, [("Cache-Control", "no-cache")], None, None),
    ("immutable override", "GET", [], 203, [], Override(immutable=True), None),
    (
        "immutable respects no-store",
        "GET",
        [],
        200,
        [("Cache-Control", "no-store")],
        Override(immutable=True),
        "response no-store",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_fields", "status", "response", "override", "reason"),
    [case[1:] for case in STORABLE],
    ids=[case[0] for case in STORABLE],
)
def test_storable(
    method: str,
    request_fields: Fields,
    status: int,
    response: Fields,
    override: Override | None,
    reason: str | None,
) -> None:
    request = get(request_fields, method)
    head = ResponseHead(status=status, headers=Headers(response))
    assert why_not_storable(request, head, override=override) == reason
    assert storable(request, head, route=RoutePolicy(), override=override) is (reason is None)


STORED_HEADERS: list[tuple[Fields, Fields]] = [
    ([("Date", at(0)), ("A", "1")], [("date", at(0)), ("a", "1")]),
    (
        [("Date", at(0)), ("Connection", "a, b"), ("a", "1"), ("b", "2"), ("c", "3")],
        [("date", at(0)), ("c", "3")],
    ),
    (
        [
            ("Date", at(0)),
            ("Keep-Alive", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authenticate", "x"),
        ],
        [("date", at(0))],
    ),
    (
        [("Date", at(0)), ("Cache-Control", 'no-cache="a"'), ("a", "1"), ("b", "2")],
        [("date", at(0)), ("cache-control", 'no-cache="a"'), ("b", "2")],
    ),
    (
        [("Date", at(0)), ("Cache-Control", 'no-cache="A, b"'), ("a", "1"), ("b", "2"), ("c", "3")],
        [("date", at(0)), ("cache-control", 'no-cache="A, b"'), ("c", "3")],
    ),
    (
        [("Date", at(0)), ("Cache-Control", 'private="Set-Cookie"'), ("Set-Cookie", "s=1")],
        [("date", at(0)), ("cache-control", 'private="Set-Cookie"')],
    ),
    ([("Age", "3")], [("age", "3"), ("date", at(7))]),
    ([("Date", "garbage")], [("date", at(7))]),
    # An upstream's (another proxy's) field of ours is not taken for ours.
    (
        [("Date", at(0)), ("X-Upstream-ETag", '"u"'), ("ETag", '"e"')],
        [("date", at(0)), ("etag", '"e"')],
    ),
]


@pytest.mark.parametrize(("response", "expected"), STORED_HEADERS)
def test_stored_headers(response: Fields, expected: Fields) -> None:
    head = ResponseHead(status=200, headers=Headers(response))
    assert list(stored_headers(head, response_time=T0 + 7)) == expected


def test_stored_headers_without_time_keeps_missing_date() -> None:
    assert list(stored_headers(ResponseHead(status=200, headers=Headers([("A", "1")])))) == [
        ("a", "1")
    ]


# ---- validation --------------------------------------------------------------------------


def test_on_validation_freshens_and_updates_headers() -> None:
    stored = entry(
        [
            ("Cache-Control", "max-age=1"),
            ("ETag", '"v1"'),
            ("Content-Length", "10"),
            ("Content-Encoding", "gzip"),
            ("Age", "30"),
            ("Test-Header", "A"),
            ("Keep", "me"),
        ]
    )
    head = ResponseHead(
        status=304,
        headers=Headers(
            [
                ("Cache-Control", "max-age=3600"),
                ("ETag", '"v1"'),
                ("Date", at(100)),
                ("Content-Length", "0"),
                ("Content-Encoding", "br"),
                ("Connection", "x"),
                ("X", "hop"),
                ("Test-Header", "B"),
            ]
        ),
    )
    decision = on_validation(stored, head, request_time=T0 + 99, response_time=T0 + 100)
    assert isinstance(decision, Freshen)
    assert decision.entry.request_time == T0 + 99
    assert decision.entry.response_time == T0 + 100
    assert list(decision.entry.headers) == [
        ("content-length", "10"),
        ("content-encoding", "gzip"),
        ("keep", "me"),
        ("cache-control", "max-age=3600"),
        ("etag", '"v1"'),
        ("date", at(100)),
        ("test-header", "B"),
    ]
    fresh = lookup(get(), [decision.entry], T0 + 200)
    # the 1 s response delay counts toward the age (RFC 9111 §4.2.3)
    assert fresh == Fresh(entry=decision.entry, age=101.0)


VALIDATION: list[tuple[str, Fields, int, Fields, str]] = [
    # (case, stored fields, status, upstream fields, outcome)
    ("strong etag match", [("ETag", '"a"')], 304, [("ETag", '"a"')], "freshen"),
    ("strong etag mismatch", [("ETag", '"a"')], 304, [("ETag", '"b"')], "refetch"),
    ("strong vs stored weak", [("ETag", 'W/"a"')], 304, [("ETag", '"a"')], "refetch"),
    ("weak etag match", [("ETag", 'W/"a"')], 304, [("ETag", 'W/"a"')], "freshen"),
    (
        "last-modified match",
        [("Last-Modified", at(-10))],
        304,
        [("Last-Modified", at(-10))],
        "freshen",
    ),
    (
        "last-modified mismatch",
        [("Last-Modified", at(-10))],
        304,
        [("Last-Modified", at(-9))],
        "refetch",
    ),
    ("no validator, lone entry", [("ETag", '"a"')], 304, [], "freshen"),
    ("200 replaces", [("ETag", '"a"')], 200, [("ETag", '"a"')], "replace"),
]


@pytest.mark.parametrize(
    ("stored", "status", "response", "outcome"),
    [case[1:] for case in VALIDATION],
    ids=[case[0] for case in VALIDATION],
)
def test_on_validation_selection(
    stored: Fields, status: int, response: Fields, outcome: str
) -> None:
    head = ResponseHead(status=status, headers=Headers([("Date", at(5)), *response]))
    decision = on_validation(entry(stored), head, request_time=T0 + 4, response_time=T0 + 5)
    match decision:
        case Freshen():
            got = "freshen"
        case Replace(refetch=True):
            got = "refetch"
        case Replace():
            got = "replace"
        case _:
            assert_never(decision)
    assert got == outcome


def test_on_validation_picks_matching_candidate_and_fixes_date() -> None:
    a = entry([("ETag", '"a"')])
    b = entry([("ETag", '"b"'), ("Age", "9")], response_time=-1)
    head = ResponseHead(status=304, headers=Headers([("ETag", '"b"')]))
    decision = on_validation(a, head, request_time=T0 + 1, response_time=T0 + 2, candidates=[a, b])
    assert decision == Freshen(
        entry=b.replace(
            headers=Headers([("date", at(2)), ("etag", '"b"')]),
            request_time=T0 + 1,
            response_time=T0 + 2,
        )
    )
    bare = ResponseHead(status=304)
    assert on_validation(a, bare, request_time=0, response_time=0, candidates=[b]) == Replace(
        reason="304 matches no stored response", refetch=True
    )


# ---- upstream errors ---------------------------------------------------------------------

ERRORS: list[
    tuple[str, Fields, Fields, float, RoutePolicy, Override | None, tuple[object, ...]]
] = [
    ("no window", [("Cache-Control", "max-age=10")], [], 20, RoutePolicy(), None, ("fail", 502)),
    (
        "fresh but unacceptable",
        [("Cache-Control", "max-age=10")],
        [("Cache-Control", "max-age=0")],
        5,
        RoutePolicy(),
        None,
        ("stale", 5.0),
    ),
    (
        "response sie inside",
        [("Cache-Control", "max-age=10, stale-if-error=60")],
        [],
        70,
        RoutePolicy(),
        None,
        ("stale", 70.0),
    ),
    (
        "response sie outside",
        [("Cache-Control", "max-age=10, stale-if-error=60")],
        [],
        71,
        RoutePolicy(),
        None,
        ("fail", 502),
    ),
    (
        "request sie",
        [("Cache-Control", "max-age=10")],
        [("Cache-Control", "stale-if-error=30")],
        40,
        RoutePolicy(),
        None,
        ("stale", 40.0),
    ),
    (
        "request max-stale",
        [("Cache-Control", "max-age=10")],
        [("Cache-Control", "max-stale=30")],
        40,
        RoutePolicy(),
        None,
        ("stale", 40.0),
    ),
    (
        "route max_stale",
        [("Cache-Control", "max-age=10")],
        [],
        40,
        RoutePolicy(max_stale=30),
        None,
        ("stale", 40.0),
    ),
    (
        "override max_stale beats route",
        [("Cache-Control", "max-age=10")],
        [],
        40,
        RoutePolicy(max_stale=30),
        Override(max_stale=5),
        ("fail", 502),
    ),
    (
        "origin sie beats route",
        [("Cache-Control", "max-age=10, stale-if-error=1")],
        [],
        40,
        RoutePolicy(max_stale=30),
        None,
        ("fail", 502),
    ),
    (
        "must-revalidate",
        [("Cache-Control", "max-age=10, must-revalidate, stale-if-error=60")],
        [],
        20,
        RoutePolicy(max_stale=99),
        None,
        ("fail", 504),
    ),
    (
        "proxy-revalidate",
        [("Cache-Control", "max-age=10, proxy-revalidate")],
        [],
        20,
        RoutePolicy(max_stale=99),
        None,
        ("fail", 504),
    ),
    (
        "s-maxage",
        [("Cache-Control", "s-maxage=10")],
        [],
        20,
        RoutePolicy(max_stale=99),
        None,
        ("fail", 504),
    ),
    (
        "response no-cache",
        [("Cache-Control", "no-cache")],
        [],
        20,
        RoutePolicy(max_stale=99),
        None,
        ("fail", 504),
    ),
    (
        "client no-cache",
        [("Cache-Control", "max-age=10")],
        [("Cache-Control", "no-cache")],
        1,
        RoutePolicy(max_stale=99),
        None,
        ("fail", 502),
    ),
    (
        "immutable",
        [("Cache-Control", "must-revalidate")],
        [],
        10**6,
        RoutePolicy(),
        Override(immutable=True),
        ("stale", 1e6),
    ),
    (
        "immutable client no-cache",
        [],
        [("Cache-Control", "no-cache")],
        1,
        RoutePolicy(),
        Override(immutable=True),
        ("fail", 502),
    ),
    (
        "immutable client no-cache ignored",
        [],
        [("Cache-Control", "no-cache")],
        1,
        RoutePolicy(ignore_client_no_cache=True),
        Override(immutable=True),
        ("stale", 1.0),
    ),
]


@pytest.mark.parametrize(
    ("stored", "request_fields", "now", "route", "override", "expected"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_on_upstream_error(
    stored: Fields,
    request_fields: Fields,
    now: float,
    route: RoutePolicy,
    override: Override | None,
    expected: tuple[object, ...],
) -> None:
    stored_entry = entry(stored)
    decision = on_upstream_error(
        stored_entry, get(request_fields), T0 + now, route=route, override=override, status_hint=502
    )
    match decision:
        case ServeStale(entry=e, age=age, revalidate=False):
            assert e is stored_entry
            got: tuple[object, ...] = ("stale", age)
        case Fail(status=status):
            got = ("fail", status)
        case _:
            raise AssertionError(decision)
    assert got == expected


def test_on_upstream_error_without_entry() -> None:
    assert on_upstream_error(None, get(), T0, status_hint=504) == Fail(
        status=504, reason="upstream failed and nothing is stored"
    )


# ---- invalidation ------------------------------------------------------------------------

INVALIDATIONS: list[tuple[str, str, int, Fields, list[str]]] = [
    ("GET never", "GET", 200, [], []),
    ("POST 200", "POST", 200, [], ["/a"]),
    ("DELETE 204", "delete", 204, [], ["/a"]),
    ("unknown method", "FROB", 302, [], ["/a"]),
    ("error response", "POST", 500, [("Location", "/b")], []),
    ("404 is an error", "PUT", 404, [], []),
    ("location path", "POST", 201, [("Location", "/b?x=%7e")], ["/a", "/b?x=~"]),
    ("content-location relative", "PUT", 200, [("Content-Location", "c")], ["/a", "/c"]),
    ("same authority absolute", "POST", 303, [("Location", "http://EXAMPLE.com/d")], ["/a", "/d"]),
    ("other authority", "POST", 303, [("Location", "http://evil.example/d")], ["/a"]),
    ("other scheme", "POST", 303, [("Location", "https://example.com/d")], ["/a"]),
    (
        "both, deduplicated",
        "POST",
        200,
        [("Location", "/a"), ("Content-Location", "/e")],
        ["/a", "/e"],
    ),
    ("garbage location", "POST", 200, [("Location", "http://[::1")], ["/a"]),
    ("control chars", "POST", 200, [("Location", "/x\x01y")], ["/a"]),
]


@pytest.mark.parametrize(
    ("method", "status", "response", "expected"),
    [case[1:] for case in INVALIDATIONS],
    ids=[case[0] for case in INVALIDATIONS],
)
def test_invalidations(method: str, status: int, response: Fields, expected: list[str]) -> None:
    head = ResponseHead(status=status, headers=Headers(response))
    assert invalidations(get(method=method), head) == expected


# ---- client conditionals and served headers ----------------------------------------------

CONDITIONALS: list[tuple[str, str, int, Fields, Fields, int | None]] = [
    ("inm strong", "GET", 200, [("ETag", '"a"')], [("If-None-Match", '"a"')], 304),
    ("inm weak compare", "HEAD", 200, [("ETag", '"a"')], [("If-None-Match", 'W/"a"')], 304),
    ("inm list", "GET", 200, [("ETag", 'W/"a"')], [("If-None-Match", '"x", "a"')], 304),
    ("inm star", "GET", 200, [], [("If-None-Match", "*")], 304),
    ("inm mismatch", "GET", 200, [("ETag", '"a"')], [("If-None-Match", '"b"')], None),
    (
        "inm wins over ims",
        "GET",
        200,
        [("ETag", '"a"'), ("Last-Modified", at(-5))],
        [("If-None-Match", '"b"'), ("If-Modified-Since", at(0))],
        None,
    ),
    ("ims equal", "GET", 200, [("Last-Modified", at(-5))], [("If-Modified-Since", at(-5))], 304),
    ("ims older", "GET", 200, [("Last-Modified", at(-5))], [("If-Modified-Since", at(-6))], None),
    ("ims uses date", "GET", 200, [], [("If-Modified-Since", at(0))], 304),
    (
        "ims invalid",
        "GET",
        200,
        [("Last-Modified", at(-5))],
        [("If-Modified-Since", "yesterday")],
        None,
    ),
    ("not for 404", "GET", 404, [("ETag", '"a"')], [("If-None-Match", '"a"')], None),
    ("not for POST", "POST", 200, [("ETag", '"a"')], [("If-None-Match", '"a"')], None),
    ("no conditionals", "GET", 200, [("ETag", '"a"')], [], None),
]


@pytest.mark.parametrize(
    ("method", "status", "stored", "request_fields", "expected"),
    [case[1:] for case in CONDITIONALS],
    ids=[case[0] for case in CONDITIONALS],
)
def test_answer_conditional(
    method: str, status: int, stored: Fields, request_fields: Fields, expected: int | None
) -> None:
    assert answer_conditional(get(request_fields, method), entry(stored, status=status)) == expected


def test_cached_response_headers_sets_integer_age() -> None:
    stored = entry([("Age", "3"), ("Content-Length", "5"), ("ETag", '"a"')])
    assert list(cached_response_headers(stored, 12.9)) == [
        ("age", "12"),
        ("content-length", "5"),
        ("etag", '"a"'),
        ("date", at(0)),
    ]
    assert cached_response_headers(stored, -1).get("age") == "0"
    assert list(not_modified_headers(stored, 4)) == [
        ("age", "4"),
        ("etag", '"a"'),
        ("date", at(0)),
    ]


def test_stored_only_fields_never_reach_a_client() -> None:
    stored = entry([("ETag", '"pc-1"'), ("X-Upstream-ETag", '"u"')])
    assert stored.headers.get("x-upstream-etag") == '"u"'
    assert list(cached_response_headers(stored, 1)) == [
        ("etag", '"pc-1"'),
        ("date", at(0)),
        ("age", "1"),
    ]
    assert "x-upstream-etag" not in not_modified_headers(stored, 1)


def test_effective_lifetime_immutable_is_infinite() -> None:
    assert effective_lifetime(200, Headers(), T0, override=Override(immutable=True)) == math.inf
    assert effective_lifetime(200, Headers(), T0) == 0.0


# ---- garbage in, decisions out -----------------------------------------------------------

_NAMES = st.sampled_from(
    [
        "Cache-Control",
        "Pragma",
        "Expires",
        "Date",
        "Age",
        "Last-Modified",
        "ETag",
        "Vary",
        "Location",
        "Content-Location",
        "If-None-Match",
        "If-Modified-Since",
        "Authorization",
        "Connection",
    ]
)
_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["max-age=", "no-cache=", '"', "W/", "*", ",", "=", "-1", "²", "0"]),
)
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES), max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    request_fields=_FIELDS,
    response_fields=_FIELDS,
    status=st.integers(min_value=0, max_value=999),
    method=st.sampled_from(["GET", "HEAD", "POST", "get", ""]),
    now=st.floats(min_value=-1e6, max_value=1e6),
)
def test_garbage_never_raises(
    request_fields: Fields, response_fields: Fields, status: int, method: str, now: float
) -> None:
    request = get(request_fields, method)
    head = ResponseHead(status=status, headers=Headers(response_fields))
    stored = entry(response_fields, status=status)
    route = RoutePolicy(swr_default=5, max_stale=5)
    lookup(request, [stored], T0 + now, route=route)
    storable(request, head)
    stored_headers(head, response_time=T0)
    on_validation(stored, head, request_time=T0, response_time=T0)
    on_upstream_error(stored, request, T0 + now, route=route)
    invalidations(request, head)
    answer_conditional(request, stored)


def test_on_validation_takes_age_from_the_304() -> None:
    stored = entry([("ETag", '"a"'), ("Age", "50")])
    head = ResponseHead(status=304, headers=Headers([("ETag", '"a"'), ("Age", "7")]))
    decision = on_validation(stored, head, request_time=T0 + 3, response_time=T0 + 3)
    assert isinstance(decision, Freshen)
    assert decision.entry.headers.get_all("age") == ["7"]
