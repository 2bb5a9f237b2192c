"""Tables for freshness.py: RFC 9111 §4.2 lifetimes and ages, RFC 5861 windows."""

from __future__ import annotations

import pytest

from proxychain.entry import Entry
from proxychain.freshness import (
    DEFAULT_HEURISTIC_CAP,
    DEFAULT_HEURISTIC_FRACTION,
    age_value,
    current_age,
    date_value,
    explicit_lifetime,
    freshness_lifetime,
    heuristic_lifetime,
    stale_if_error,
    stale_while_revalidate,
)
from proxychain.http import Headers, format_http_date, parse_cache_control

T0 = 1_700_000_000.0


def at(offset: float) -> str:
    """An HTTP-date ``offset`` seconds from T0."""
    return format_http_date(T0 + offset)


def test_defaults() -> None:
    assert DEFAULT_HEURISTIC_FRACTION == 0.1
    assert DEFAULT_HEURISTIC_CAP == 86_400.0


EXPLICIT = [
    ([], None),
    ([("Cache-Control", "max-age=60")], 60.0),
    ([("Cache-Control", "MAX-AGE=60")], 60.0),
    ([("Cache-Control", "max-age=003600")], 3600.0),
    ([("Cache-Control", 'max-age="30"')], 30.0),
    ([("Cache-Control", "max-age=60, s-maxage=5")], 5.0),
    ([("Cache-Control", "s-maxage=0, max-age=60")], 0.0),
    ([("Cache-Control", "max-age=1800, max-age=1")], 1800.0),
    ([("Cache-Control", "max-age=1"), ("Cache-Control", "max-age=1800")], 1.0),
    ([("Cache-Control", "max-age=a3600")], 0.0),
    ([("Cache-Control", "max-age=3600.5")], 0.0),
    ([("Cache-Control", "max-age=²")], 0.0),
    ([("Cache-Control", "max-age=99999999999")], float(2**31)),
    ([("Cache-Control", 'ext="max-age=3600", max-age=1')], 1.0),
    ([("Cache-Control", "max-age=10"), ("Expires", at(3600)), ("Date", at(0))], 10.0),
    ([("Expires", at(3600)), ("Date", at(0))], 3600.0),
    ([("Expires", at(3600)), ("Date", at(600))], 3000.0),
    ([("Expires", at(-10)), ("Date", at(0))], 0.0),
    ([("Expires", "0"), ("Date", at(0))], 0.0),
    ([("Expires", "garbage")], 0.0),
    ([("Expires", at(100)), ("Expires", at(900)), ("Date", at(0))], 100.0),
    # No Date: the receipt time (response_time = T0 + 50) stands in for it.
    ([("Expires", at(3600))], 3550.0),
    ([("Expires", at(3600)), ("Date", "nonsense")], 3550.0),
]


@pytest.mark.parametrize(("fields", "expected"), EXPLICIT)
def test_explicit_lifetime(fields: list[tuple[str, str]], expected: float | None) -> None:
    assert explicit_lifetime(Headers(fields), T0 + 50) == expected


HEURISTIC = [
    # (status, fields, expected lifetime with response_time T0)
    (200, [("Last-Modified", at(-1000)), ("Date", at(0))], 100.0),
    (200, [("Last-Modified", at(-10 * 86400 * 10)), ("Date", at(0))], 86400.0),
    (200, [("Last-Modified", at(100)), ("Date", at(0))], 0.0),
    (200, [("Last-Modified", at(-1000))], 100.0),
    (200, [("Date", at(0))], 0.0),
    (200, [("Last-Modified", "bad"), ("Date", at(0))], 0.0),
    (404, [("Last-Modified", at(-1000)), ("Date", at(0))], 100.0),
    (201, [("Last-Modified", at(-1000)), ("Date", at(0))], 0.0),
    (403, [("Last-Modified", at(-1000)), ("Date", at(0))], 0.0),
    (502, [("Last-Modified", at(-1000)), ("Date", at(0))], 0.0),
    (599, [("Last-Modified", at(-1000)), ("Date", at(0))], 0.0),
    (599, [("Last-Modified", at(-1000)), ("Date", at(0)), ("Cache-Control", "public")], 100.0),
    (201, [("Last-Modified", at(-1000)), ("Cache-Control", "max-age=7")], 7.0),
]


@pytest.mark.parametrize(("status", "fields", "expected"), HEURISTIC)
def test_freshness_lifetime(status: int, fields: list[tuple[str, str]], expected: float) -> None:
    assert freshness_lifetime(status, Headers(fields), T0) == expected


def test_heuristic_knobs() -> None:
    headers = Headers([("Last-Modified", at(-1000)), ("Date", at(0))])
    assert heuristic_lifetime(headers, T0, fraction=0.5, cap=10_000) == 500.0
    assert heuristic_lifetime(headers, T0, fraction=0.5, cap=20) == 20.0
    assert heuristic_lifetime(Headers(), T0) is None


AGE_VALUES = [
    ([], 0.0),
    ([("Age", "30")], 30.0),
    ([("Age", "abc")], 0.0),
    ([("Age", "-7200")], 0.0),
    ([("Age", "7200.0")], 0.0),
    ([("Age", "7200,0")], 0.0),
    ([("Age", "0"), ("Age", "7200")], 0.0),
    ([("Age", "7200, 7200")], 7200.0),
    ([("Age", "9"), ("Age", "9")], 9.0),
    ([("Age", "99999999999")], float(2**31)),
]


@pytest.mark.parametrize(("fields", "expected"), AGE_VALUES)
def test_age_value(fields: list[tuple[str, str]], expected: float) -> None:
    assert age_value(Headers(fields)) == expected


def test_date_value() -> None:
    assert date_value(Headers([("Date", at(5))]), T0) == T0 + 5
    assert date_value(Headers([("Date", "x")]), T0) == T0
    assert date_value(Headers(), T0 + 1) == T0 + 1


CURRENT_AGE = [
    # (fields, request_time, response_time, now, expected) -- times relative to T0
    ([("Date", at(0))], 0, 0, 0, 0.0),
    ([("Date", at(0))], 0, 0, 25, 25.0),
    # apparent age: the response was generated 10 s before it arrived
    ([("Date", at(-10))], -1, 0, 5, 15.0),
    # a 12 s response delay counts even without an Age header (corrected_age_value = 12)
    ([("Date", at(-10))], -12, 0, 5, 17.0),
    # Age header corrected by the response delay (2 s), beats apparent age (0)
    ([("Date", at(0)), ("Age", "100")], -2, 0, 0, 102.0),
    # apparent age beats a smaller corrected Age
    ([("Date", at(-50)), ("Age", "10")], 0, 0, 1, 51.0),
    # a Date in the future (origin clock ahead) cannot make the age negative
    ([("Date", at(500))], 0, 0, 3, 3.0),
    # missing Date: response_time stands in
    ([], -1, 0, 4, 5.0),
    ([("Age", "bogus")], 0, 0, 7, 7.0),
    # now before response_time (clock glitch): resident time is not negative
    ([("Date", at(0))], 0, 0, -5, 0.0),
]


@pytest.mark.parametrize(("fields", "req", "resp", "now", "expected"), CURRENT_AGE)
def test_current_age(
    fields: list[tuple[str, str]], req: float, resp: float, now: float, expected: float
) -> None:
    entry = Entry(key="k", headers=Headers(fields), request_time=T0 + req, response_time=T0 + resp)
    assert current_age(entry, T0 + now) == expected


WINDOWS = [
    ([], [], None, None),
    ([("Cache-Control", "max-age=1, stale-while-revalidate=60")], [], 60.0, None),
    ([("Cache-Control", "stale-if-error=30")], [], None, 30.0),
    ([], [("Cache-Control", "stale-if-error=40")], None, 40.0),
    ([("Cache-Control", "stale-if-error=30")], [("Cache-Control", "stale-if-error=5")], None, 30.0),
    ([("Cache-Control", "stale-if-error=3")], [("Cache-Control", "stale-if-error=50")], None, 50.0),
    ([("Cache-Control", "stale-while-revalidate=x, stale-if-error")], [], 0.0, 0.0),
]


@pytest.mark.parametrize(("response", "request_fields", "swr", "sie"), WINDOWS)
def test_windows(
    response: list[tuple[str, str]],
    request_fields: list[tuple[str, str]],
    swr: float | None,
    sie: float | None,
) -> None:
    assert stale_while_revalidate(Headers(response)) == swr
    assert stale_if_error(Headers(response), Headers(request_fields)) == sie


def test_cache_control_is_parsed_once_per_header_set() -> None:
    headers = Headers([("cache-control", "max-age=5"), ("date", "Tue, 14 Nov 2023 22:13:20 GMT")])
    first = parse_cache_control(headers)
    assert parse_cache_control(headers) is first
    changed = headers.set("cache-control", "max-age=7")
    assert (first.seconds("max-age"), parse_cache_control(changed).seconds("max-age")) == (5, 7)
    assert explicit_lifetime(changed, 0.0) == 7.0
