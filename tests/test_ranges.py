"""Tables for ranges.py: RFC 9110 §14 byte ranges served from a stored response."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxychain.http import Headers, format_http_date
from proxychain.ranges import (
    MAX_RANGES,
    ByteRange,
    Full,
    Partial,
    RangeDecision,
    Unsatisfiable,
    evaluate,
    make_boundary,
    multipart_plan,
    parse_range,
    partial_headers,
    unsatisfiable_headers,
)

T0 = 1_700_000_000.0


def at(offset: float) -> str:
    return format_http_date(T0 + offset)


def r(first: int, last: int) -> ByteRange:
    return ByteRange(first=first, last=last)


RANGES: list[tuple[str, int, RangeDecision]] = [
    ("bytes=0-1", 11, Partial(ranges=(r(0, 1),))),
    ("bytes=1-", 11, Partial(ranges=(r(1, 10),))),
    ("bytes=-1", 11, Partial(ranges=(r(10, 10),))),
    ("bytes=-50", 11, Partial(ranges=(r(0, 10),))),
    ("bytes=0-", 11, Partial(ranges=(r(0, 10),))),
    ("bytes=5-100", 11, Partial(ranges=(r(5, 10),))),
    ("BYTES = 0-1", 11, Partial(ranges=(r(0, 1),))),
    ("bytes=0-1, 4-5", 11, Partial(ranges=(r(0, 1), r(4, 5)))),
    ("bytes=4-5,0-1", 11, Partial(ranges=(r(0, 1), r(4, 5)))),
    ("bytes=0-3,2-5", 11, Partial(ranges=(r(0, 5),))),
    ("bytes=0-3,4-5", 11, Partial(ranges=(r(0, 5),))),
    ("bytes=0-1,,3-4,", 11, Partial(ranges=(r(0, 1), r(3, 4)))),
    ("bytes=0-1,-2", 11, Partial(ranges=(r(0, 1), r(9, 10)))),
    ("bytes=20-30, 0-0", 11, Partial(ranges=(r(0, 0),))),
    ("bytes=11-", 11, Unsatisfiable()),
    ("bytes=11-20", 11, Unsatisfiable()),
    ("bytes=-0", 11, Unsatisfiable()),
    ("bytes=0-0", 0, Unsatisfiable()),
    ("bytes=-5", 0, Full()),
    ("bytes=5-2", 11, Full()),
    ("bytes=x-2", 11, Full()),
    ("bytes=-", 11, Full()),
    ("bytes=1", 11, Full()),
    ("bytes=", 11, Full()),
    ("bytes=²-3", 11, Full()),
    ("items=0-1", 11, Full()),
    ("0-1", 11, Full()),
    ("bytes=1-2-3", 11, Full()),
]


@pytest.mark.parametrize(("value", "size", "expected"), RANGES)
def test_evaluate(value: str, size: int, expected: RangeDecision) -> None:
    assert evaluate("GET", Headers([("Range", value)]), size=size) == expected


def test_evaluate_ignores() -> None:
    ranged = Headers([("Range", "bytes=0-1")])
    assert evaluate("HEAD", ranged, size=11) == Full()
    assert evaluate("GET", ranged, size=11, status=404) == Full()
    assert evaluate("GET", Headers(), size=11) == Full()
    two = Headers([("Range", "bytes=0-1"), ("Range", "bytes=3-4")])
    assert evaluate("GET", two, size=11) == Full()


def test_too_many_ranges_are_ignored() -> None:
    many = ",".join(f"{2 * i}-{2 * i}" for i in range(MAX_RANGES + 1))
    assert evaluate("GET", Headers([("Range", f"bytes={many}")]), size=1000) == Full()
    just = ",".join(f"{2 * i}-{2 * i}" for i in range(MAX_RANGES))
    decision = evaluate("GET", Headers([("Range", f"bytes={just}")]), size=1000)
    assert isinstance(decision, Partial)
    assert len(decision.ranges) == MAX_RANGES


STORED = Headers([("ETag", '"s"'), ("Last-Modified", at(-10)), ("Date", at(0))])

IF_RANGE: list[tuple[str, Headers, bool]] = [
    ('"s"', STORED, True),
    ('"t"', STORED, False),
    ('W/"s"', STORED, False),
    ('"s"', Headers([("ETag", 'W/"s"')]), False),
    (at(-10), STORED, True),
    (at(-11), STORED, False),
    (at(-10), Headers([("Last-Modified", at(-10)), ("Date", at(-10))]), False),
    (at(-10), Headers([("Last-Modified", at(-10))]), False),
    ("garbage", STORED, False),
    ('"s"', Headers(), False),
]


@pytest.mark.parametrize(("if_range", "stored", "honoured"), IF_RANGE)
def test_if_range(if_range: str, stored: Headers, honoured: bool) -> None:
    request = Headers([("Range", "bytes=0-1"), ("If-Range", if_range)])
    expected = Partial(ranges=(r(0, 1),)) if honoured else Full()
    assert evaluate("GET", request, size=5, stored_headers=stored) == expected


def test_parse_range() -> None:
    assert parse_range("bytes=1-2,3-,-4") == [(1, 2), (3, None), (None, 4)]
    assert parse_range(None) is None
    assert parse_range("bytes=,") is None


def test_partial_and_unsatisfiable_headers() -> None:
    stored = Headers([("Content-Type", "text/plain"), ("Content-Length", "11"), ("ETag", '"s"')])
    assert list(partial_headers(stored, r(2, 4), 11)) == [
        ("content-type", "text/plain"),
        ("content-length", "3"),
        ("etag", '"s"'),
        ("content-range", "bytes 2-4/11"),
    ]
    assert list(unsatisfiable_headers(stored, 11)) == [
        ("etag", '"s"'),
        ("content-range", "bytes */11"),
        ("content-length", "0"),
    ]


def test_multipart_plan_frames_exact_bytes() -> None:
    body = b"0123456789A"
    boundary = make_boundary(random.Random(0))
    assert boundary == make_boundary(random.Random(0))
    assert len(boundary) == 24
    plan = multipart_plan((r(0, 1), r(9, 10)), len(body), "text/plain", "B")
    rendered = b"".join(head + body[rng.first : rng.last + 1] for head, rng in plan.parts)
    rendered += plan.trailer
    assert rendered == (
        b"--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/11\r\n\r\n01"
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 9-10/11\r\n\r\n9A"
        b"\r\n--B--\r\n"
    )
    assert plan.content_length == len(rendered) == 140
    assert plan.content_type == "multipart/byteranges; boundary=B"
    stored = Headers([("Content-Type", "text/plain"), ("Content-Length", "11")])
    assert list(plan.headers(stored)) == [
        ("content-type", "multipart/byteranges; boundary=B"),
        ("content-length", "140"),
    ]
    untyped = multipart_plan((r(0, 0),), 1, None, "B")
    assert untyped.parts[0][0] == b"--B\r\nContent-Range: bytes 0-0/1\r\n\r\n"


@settings(max_examples=150, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=30),
        st.lists(st.sampled_from(["0", "1", "-", ",", " ", "bytes=", "99", "x"]), max_size=12).map(
            "".join
        ),
    ),
    if_range=st.one_of(st.none(), st.text(max_size=20)),
    size=st.integers(min_value=0, max_value=50),
)
def test_garbage_never_raises_and_ranges_are_inside(
    value: str, if_range: str | None, size: int
) -> None:
    fields = [("Range", value)] + ([("If-Range", if_range)] if if_range is not None else [])
    decision = evaluate("GET", Headers(fields), size=size, stored_headers=STORED)
    if isinstance(decision, Partial):
        previous_last = -2
        for byte_range in decision.ranges:
            assert previous_last + 1 < byte_range.first <= byte_range.last < size
            previous_last = byte_range.last
