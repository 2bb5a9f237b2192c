"""Tables for keys.py: primary keys and Vary matching (RFC 3986 §6.2.2, RFC 9111 §4.1)."""

from __future__ import annotations

import hashlib

import pytest

from proxychain.http import Headers, ResponseHead
from proxychain.keys import (
    ABSENT,
    asked_encoding,
    matches,
    normalise_target,
    primary_key,
    variant_key,
    vary_names,
    vary_values,
)

TARGETS = [
    ("/a/b", "/a/b"),
    ("", "/"),
    ("/%7euser/%41%2f", "/~user/A%2F"),
    ("/x%2fy%3a", "/x%2Fy%3A"),
    ("/a?b=%7e&a=1", "/a?b=~&a=1"),
    ("/a?b=2&a=1", "/a?b=2&a=1"),
    ("/a#frag", "/a"),
    ("/%zz%4", "/%zz%4"),
    ("/caf%C3%A9", "/caf%C3%A9"),
]


@pytest.mark.parametrize(("url", "expected"), TARGETS)
def test_normalise_target(url: str, expected: str) -> None:
    assert normalise_target(url) == expected


def test_primary_key_is_sha256_of_get_and_target() -> None:
    assert primary_key("GET", "/a") == hashlib.sha256(b"GET /a").hexdigest()


@pytest.mark.parametrize(
    ("left", "right", "same"),
    [
        (("GET", "/a"), ("HEAD", "/a"), True),
        (("get", "/a"), ("GET", "/a"), True),
        (("GET", "/%7Ea"), ("GET", "/~a"), True),
        (("GET", "/%2f"), ("GET", "/%2F"), True),
        (("GET", "/%2F"), ("GET", "//"), False),
        (("GET", "/a?x=1&y=2"), ("GET", "/a?y=2&x=1"), False),
        (("POST", "/a"), ("GET", "/a"), False),
        (("GET", "/go/a"), ("GET", "/pypi/a"), False),
    ],
)
def test_primary_key_equivalence(left: tuple[str, str], right: tuple[str, str], same: bool) -> None:
    assert (primary_key(*left) == primary_key(*right)) is same


@pytest.mark.parametrize(
    ("vary", "forced", "expected"),
    [
        ([], (), ()),
        ([("Vary", "Accept-Encoding")], (), ("accept-encoding",)),
        ([("Vary", "B, a"), ("Vary", "A")], (), ("a", "b")),
        ([("Vary", "accept")], ("Accept", "X-Y"), ("accept", "x-y")),
        ([("Vary", "*")], (), None),
        ([("Vary", "a, *")], ("b",), None),
        ([("Vary", " , ,")], (), ()),
    ],
)
def test_vary_names(
    vary: list[tuple[str, str]], forced: tuple[str, ...], expected: tuple[str, ...] | None
) -> None:
    assert vary_names(ResponseHead(status=200, headers=Headers(vary)), forced) == expected


@pytest.mark.parametrize(
    ("fields", "names", "expected"),
    [
        ([], ["accept"], {"accept": ABSENT}),
        ([("Accept", "")], ["accept"], {"accept": ""}),
        ([("Accept", "text/html ,  text/plain")], ["Accept"], {"accept": "text/html, text/plain"}),
        ([("Accept", "a"), ("Accept", "b")], ["accept"], {"accept": "a, b"}),
        ([("Accept-Encoding", "GZIP,Br")], ["accept-encoding"], {"accept-encoding": "gzip"}),
        ([("Accept-Encoding", "br")], ["accept-encoding"], {"accept-encoding": "identity"}),
        ([], ["accept-encoding"], {"accept-encoding": ABSENT}),
        ([("Accept-Language", " EN-us ")], ["accept-language"], {"accept-language": "en-us"}),
        ([("X-Token", "AbC\t d")], ["x-token"], {"x-token": "AbC d"}),
    ],
)
def test_vary_values(
    fields: list[tuple[str, str]], names: list[str], expected: dict[str, str]
) -> None:
    assert vary_values(Headers(fields), names) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], None),
        (["gzip"], "gzip"),
        (["gzip, deflate"], "gzip"),  # pip
        (["gzip,deflate"], "gzip"),  # npm
        (["deflate, gzip, br, zstd"], "gzip"),  # curl --compressed
        (["br", "GZIP;q=0.5"], "gzip"),
        (["x-gzip"], "gzip"),
        (["*"], "gzip"),
        (["gzip;q=0"], "identity"),
        (["*, gzip;q=0"], "identity"),
        (["gzip;q=0.000, *"], "identity"),  # gzip named, so "*" does not bring it back
        (["gzip; Q=1"], "gzip"),
        (["gzip;q=bad"], "identity"),  # a malformed weight is not acceptance
        (["gzip;q=2"], "identity"),
        (["br, zstd"], "identity"),
        (["identity"], "identity"),
        ([""], "identity"),
    ],
)
def test_asked_encoding(lines: list[str], expected: str | None) -> None:
    assert asked_encoding(lines) == expected


def test_variant_key() -> None:
    assert variant_key({}) == ""
    expected = hashlib.sha256(b"a:1\nb:2").hexdigest()
    assert variant_key({"b": "2", "a": "1"}) == expected
    assert variant_key({"a": ABSENT}) != variant_key({"a": ""})


@pytest.mark.parametrize(
    ("stored", "request_fields", "forced", "expected"),
    [
        ({}, [("Accept", "x")], (), True),
        ({"accept": "x"}, [("Accept", "x")], (), True),
        ({"accept": "x"}, [("Accept", "y")], (), False),
        ({"accept": "x"}, [], (), False),
        ({"accept": ABSENT}, [], (), True),
        ({"accept": ABSENT}, [("Accept", "")], (), False),
        ({"accept-encoding": "gzip"}, [("Accept-Encoding", "GZIP ,br")], (), True),
        ({"accept-encoding": "gzip"}, [("Accept-Encoding", "gzip, deflate")], (), True),
        ({"accept-encoding": "gzip"}, [("Accept-Encoding", "deflate")], (), False),
        ({"accept-encoding": "gzip"}, [], (), False),
        # Recorded from a client's whole list (before lists were bucketed): never matched.
        ({"accept-encoding": "gzip, br"}, [("Accept-Encoding", "gzip, br")], (), False),
        ({"accept": "a, b"}, [("Accept", "a"), ("Accept", "b")], (), True),
        ({}, [("Accept", "x")], ("accept",), False),
        ({}, [], ("accept",), True),
    ],
)
def test_matches(
    stored: dict[str, str],
    request_fields: list[tuple[str, str]],
    forced: tuple[str, ...],
    expected: bool,
) -> None:
    assert matches(stored, Headers(request_fields), forced) is expected


def test_matches_remembers_values_per_set_of_names() -> None:
    # The server shares one Headers object per header block, so one object meets entries
    # that vary on different fields: each set of names gets its own remembered values.
    shared = Headers([("Accept", "x"), ("Accept-Language", "de")])
    for _ in range(2):
        assert matches({"accept": "x"}, shared)
        assert not matches({"accept-language": "fr"}, shared)
        assert matches({"accept": "x", "accept-language": "de"}, shared)
        assert matches({"accept": "x"}, shared, ("user-agent",))  # absent on both sides
        assert not matches({"accept": "x"}, shared, ("accept-language",))
