"""rewriting.py: where rewritten links lead, and revalidating rewritten entries."""

from __future__ import annotations

import pytest

from proxychain import mirror, rewriting
from proxychain.http import Headers, ResponseHead
from tests.test_packages import NPM, PYPI

# ---- links -----------------------------------------------------------------------------------


def test_proxy_base_and_upstream_target() -> None:
    assert rewriting.proxy_base_for("/npm/", host="h:8") == "http://h:8/npm"
    assert rewriting.proxy_base_for("/npm/", host=None) == "/npm"
    assert rewriting.upstream_target(PYPI, "/files/files.example/a/b.whl") == (
        "http://files.example",
        "/a/b.whl",
    )
    assert rewriting.upstream_target(PYPI, "/packages/a.whl") == (None, "/packages/a.whl")
    assert rewriting.upstream_target(NPM, "/files/x/y") == (None, "/files/x/y")
    # Another host's file link goes to the chain (a chained proxychain), never fetched directly.
    assert rewriting.upstream_target(PYPI, "/files/evil.example/a.whl") == (
        None,
        "/files/evil.example/a.whl",
    )
    with pytest.raises(mirror.MalformedPath):
        rewriting.upstream_target(PYPI, "/files/no-file-part")


# ---- revalidating rewritten entries ----------------------------------------------------------

OURS = '"pc-' + "0" * 40 + '"'


@pytest.mark.parametrize(
    ("stored", "conditional", "expected"),
    [
        # a plain entry: the cache's own validators
        ([("etag", '"u1"')], [("if-none-match", '"u1"')], [("if-none-match", '"u1"')]),
        # rewritten: the upstream's ETag instead of ours
        (
            [("etag", OURS), ("x-upstream-etag", '"u1"')],
            [("if-none-match", OURS), ("if-modified-since", "d")],
            [("if-none-match", '"u1"'), ("if-modified-since", "d")],
        ),
        # rewritten from an upstream without an ETag: only the date validates
        (
            [("etag", OURS)],
            [("if-none-match", OURS), ("if-modified-since", "d")],
            [("if-modified-since", "d")],
        ),
    ],
)
def test_rewritten_conditionals(
    stored: list[tuple[str, str]],
    conditional: list[tuple[str, str]],
    expected: list[tuple[str, str]],
) -> None:
    out = rewriting.rewritten_conditionals(Headers(stored), Headers(conditional))
    assert list(out) == expected


REWRITTEN = Headers([("etag", OURS), ("x-upstream-etag", '"u1"'), ("content-length", "10")])


@pytest.mark.parametrize(
    ("stored", "status", "fields", "expected"),
    [
        # the upstream's ETag maps back to ours; its length and coding are dropped
        (
            REWRITTEN,
            304,
            [("etag", '"u1"'), ("content-length", "99"), ("content-encoding", "gzip")],
            [("etag", OURS)],
        ),
        (
            REWRITTEN,
            304,
            [("cache-control", "max-age=5")],
            [("cache-control", "max-age=5"), ("etag", OURS)],
        ),
        # another ETag than the one we asked with stays: it selects nothing (RFC 9111 §4.3.4)
        (REWRITTEN, 304, [("etag", '"u2"')], [("etag", '"u2"')]),
        # not a 304, or not a rewritten entry: unchanged
        (REWRITTEN, 200, [("etag", '"u1"')], [("etag", '"u1"')]),
        (
            Headers([("etag", '"u1"')]),
            304,
            [("etag", '"u1"'), ("content-length", "3")],
            [("etag", '"u1"'), ("content-length", "3")],
        ),
    ],
)
def test_rewritten_not_modified(
    stored: Headers, status: int, fields: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    out = rewriting.rewritten_not_modified(
        stored, ResponseHead(status=status, headers=Headers(fields))
    )
    assert (out.status, list(out.headers)) == (status, expected)
