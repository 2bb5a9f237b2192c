"""Private paths: Go's prefix-pattern matching, rule lookup, and chains restricted to a rule."""

from __future__ import annotations

import pytest

from proxychain.failover import Chain, ChainError, Exhausted, Hop, Refuse, parse_chain
from proxychain.privatepaths import (
    PrivateRule,
    match_prefix_patterns,
    match_private,
    restrict_chain,
)
from tests.test_failover import ERR, TIMEOUT, A, B, C, drive

# Go's own table for module.MatchPrefixPatterns (golang.org/x/mod/module/module_test.go).
PREFIX_PATTERNS = [
    ("", "rsc.io/quote", False),
    ("/", "rsc.io/quote", False),
    ("*/quote", "rsc.io/quote", True),
    ("*/quo", "rsc.io/quote", False),
    ("*/quo??", "rsc.io/quote", True),
    ("*/quo*", "rsc.io/quote", True),
    ("*quo*", "rsc.io/quote", False),
    ("rsc.io", "rsc.io/quote", True),
    ("*.io", "rsc.io/quote", True),
    ("rsc.io/", "rsc.io/quote", True),
    ("rsc", "rsc.io/quote", False),
    ("rsc*", "rsc.io/quote", True),
    ("rsc.io", "rsc.io/quote/v3", True),
    ("*/quote", "rsc.io/quote/v3", True),
    ("*/quote/", "rsc.io/quote/v3", True),
    ("*/quote/*", "rsc.io/quote/v3", True),
    ("*/quote/*/", "rsc.io/quote/v3", True),
    ("*/v3", "rsc.io/quote/v3", False),
    ("*/*/v3", "rsc.io/quote/v3", True),
    ("*/*/*", "rsc.io/quote/v3", True),
    ("*/*/*/", "rsc.io/quote/v3", True),
    ("*/*/*", "rsc.io/quote", False),
    ("*/*/*/", "rsc.io/quote", False),
    ("*/*/*,,", "rsc.io/quote", False),
    ("*/*/*,,*/quote", "rsc.io/quote", True),
    (",,*/quote", "rsc.io/quote", True),
    # path.Match classes and escapes
    ("rsc.[a-z]o", "rsc.io/quote", True),
    ("rsc.[^i]o", "rsc.io/quote", False),
    ("rsc.[^a-h]o", "rsc.io/quote", True),
    ("rsc.[[]o", "rsc.[o/x", True),
    ("rsc.[z-a]o", "rsc.io/quote", False),
    ("rsc.[^z-a]o", "rsc.io/quote", True),
    (r"rsc\.io", "rsc.io/quote", True),
    (r"rsc.[\]]o", "rsc.]o/x", True),
    (r"[a\-c]", "-/x", True),
    (r"[a\-c]", "b/x", False),
    (r"rsc.\*", "rsc.*/quote", True),
    (r"rsc.\*", "rsc.io/quote", False),
    ("rsc.io/quote", "RSC.io/quote", False),  # case matters, as in Go
]


@pytest.mark.parametrize(("globs", "target", "want"), PREFIX_PATTERNS)
def test_match_prefix_patterns(globs: str, target: str, want: bool) -> None:
    assert match_prefix_patterns([globs], target) is want


@pytest.mark.parametrize(
    "glob", ["[", "a[b", "[]", "[]a]", "[^]", "[-a]", "[a-]", "[a-b", "x\\", "[\\"]
)
def test_bad_globs(glob: str) -> None:
    with pytest.raises(ChainError, match="bad path pattern"):
        match_prefix_patterns([glob], "a/b")
    with pytest.raises(ChainError, match="bad path pattern"):
        PrivateRule(patterns=(glob,), upstreams=(A,))


CORP = PrivateRule(patterns=("corp.example", "*.corp.example/*"), upstreams=(A,))
TEAM = PrivateRule(patterns=("github.com/acme/secret*",), upstreams=(B, C))


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/corp.example/lib/@v/list", CORP),
        ("corp.example/@v/v1.0.0.zip", CORP),
        ("/git.corp.example/team/lib/@latest", CORP),
        ("/git.corp.example", None),  # the glob needs two elements
        ("/github.com/acme/secret-sauce/@v/list", TEAM),
        ("/github.com/acme/public/@v/list", None),
        ("/golang.org/x/mod/@v/list", None),
    ],
)
def test_match_private(path: str, rule: PrivateRule | None) -> None:
    assert match_private(path, [CORP, TEAM]) == rule


@pytest.mark.parametrize(
    ("patterns", "upstreams", "message"),
    [
        ((), (A,), "at least one pattern"),
        (("/", ","), (A,), "at least one pattern"),
        (("corp.example",), (), "at least one upstream"),
    ],
)
def test_private_rule_validation(
    patterns: tuple[str, ...], upstreams: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ChainError, match=message):
        PrivateRule(patterns=patterns, upstreams=upstreams)


@pytest.mark.parametrize(
    ("chain", "rule", "restricted"),
    [
        (f"{A},{B}|{C}", CORP, Chain(hops=(Hop(url=A),))),
        (
            f"{A},{B}|{C}",
            TEAM,
            Chain(hops=(Hop(url=B, fallthrough="any"), Hop(url=C))),
        ),
        (f"{C}|{A},off", CORP, Chain(hops=(Hop(url=A),), ends_off=True)),
        (
            f"{B}|{C}",
            CORP,
            Refuse(reason="this private path may not be fetched from the route's upstreams"),
        ),
        ("off", CORP, Refuse()),
    ],
)
def test_restrict_chain(chain: str, rule: PrivateRule, restricted: Chain | Refuse) -> None:
    assert restrict_chain(parse_chain(chain), rule) == restricted


def test_private_path_never_leaks() -> None:
    # A private path on a chain that only has public upstreams contacts nobody.
    chain = restrict_chain(parse_chain(f"{B}|{C}"), CORP)
    trace, end = drive(chain, {})
    assert trace == []
    assert end == Exhausted(
        status_hint=403, reason="this private path may not be fetched from the route's upstreams"
    )
    # And a failing private upstream does not fall through to the public one after it.
    chain = restrict_chain(parse_chain(f"{A}|{B}"), CORP)
    trace, end = drive(chain, {A: [TIMEOUT]})
    assert trace == [("a", 0, ERR)]
    assert isinstance(end, Exhausted)
    assert end.status_hint == 504
