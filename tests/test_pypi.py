"""Tests for PyPI path classes, name normalisation and index link rewriting."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from proxychain import mirror, pypi
from proxychain.errors import RequestRefused
from proxychain.mirror import METADATA_TTL, MalformedPath

FILES = "https://files.pythonhosted.org"
UPSTREAM = "https://pypi.org"

NAME_CASES = [
    ("friendly-bard", "friendly-bard"),
    ("Friendly-Bard", "friendly-bard"),
    ("FRIENDLY-BARD", "friendly-bard"),
    ("friendly.bard", "friendly-bard"),
    ("friendly_bard", "friendly-bard"),
    ("friendly--bard", "friendly-bard"),
    ("FrIeNdLy-._.-bArD", "friendly-bard"),
    ("zope.interface", "zope-interface"),
]


@pytest.mark.parametrize(("name", "normal"), NAME_CASES)
def test_normalize_name(name: str, normal: str) -> None:
    assert pypi.normalize_name(name) == normal


ACCEPT = ("accept",)
CLASSIFY_CASES = [
    ("/simple/", "simple-index", False, "/simple/", ACCEPT),
    ("/simple", "simple-index", False, "/simple/", ACCEPT),
    ("/simple/requests/", "project-page", False, "/simple/requests/", ACCEPT),
    ("/simple/Zope.Interface", "project-page", False, "/simple/zope-interface/", ACCEPT),
    ("/simple/zope%2Einterface/", "project-page", False, "/simple/zope-interface/", ACCEPT),
    ("/simple/a/", "project-page", False, "/simple/a/", ACCEPT),
    (
        "/packages/ab/cd/requests-2.31.0-py3-none-any.whl",
        "file",
        True,
        "/packages/ab/cd/requests-2.31.0-py3-none-any.whl",
        (),
    ),
    (
        "/files/Files.PythonHosted.org/packages/ab/cd/x-1.0.tar.gz",
        "file",
        True,
        "/files/files.pythonhosted.org/packages/ab/cd/x-1.0.tar.gz",
        (),
    ),
    ("/+f/0ab/1cd/x-1.0.tar.gz", "file", True, "/+f/0ab/1cd/x-1.0.tar.gz", ()),
    (
        "/+f/0ab/x-1.0-py3-none-any.whl.metadata",
        "file",
        True,
        "/+f/0ab/x-1.0-py3-none-any.whl.metadata",
        (),
    ),
    ("/pypi/requests/json", "other", False, "/pypi/requests/json", ()),
    ("/", "other", False, "/", ()),
]


@pytest.mark.parametrize(("path", "kind", "immutable", "key_path", "vary"), CLASSIFY_CASES)
def test_classify(
    path: str, kind: str, immutable: bool, key_path: str, vary: tuple[str, ...]
) -> None:
    found = mirror.classify("pypi", path)
    assert isinstance(found, mirror.PathClass)
    assert (found.kind, found.immutable, found.key_path, found.forced_vary) == (
        kind,
        immutable,
        key_path,
        vary,
    )
    assert found.expected_digest is None
    expected_ttl = METADATA_TTL if kind in ("simple-index", "project-page") else None
    assert found.ttl == expected_ttl


@pytest.mark.parametrize(
    "path",
    [
        "/simple/-foo/",
        "/simple/foo-/",
        "/simple/a/b/",
        "/simple/fo o/",
        "/simple//",
        "/files/",
        "/files/host",
    ],
)
def test_classify_malformed(path: str) -> None:
    assert pypi.classify(path) is None
    assert isinstance(mirror.classify("pypi", path), MalformedPath)


MAP_CASES = [
    ("/packages/ab/x.whl", (None, "/packages/ab/x.whl")),
    (
        "/files/files.pythonhosted.org/packages/ab/x.whl",
        ("https://files.pythonhosted.org", "/packages/ab/x.whl"),
    ),
    ("/files/127.0.0.1:8081/p/x-1.0.tar.gz", ("http://127.0.0.1:8081", "/p/x-1.0.tar.gz")),
    ("/files/mirror.example/x.whl", ("https://mirror.example", "/x.whl")),
]


@pytest.mark.parametrize(("path", "expected"), MAP_CASES)
def test_map_file_path(path: str, expected: tuple[str | None, str]) -> None:
    hosts = [FILES, "http://127.0.0.1:8081", "mirror.example"]
    assert pypi.map_file_path(path, file_hosts=hosts) == expected


def test_map_file_path_refuses_unconfigured_hosts() -> None:
    with pytest.raises(RequestRefused) as info:
        pypi.map_file_path("/files/evil.example/x.whl", file_hosts=[FILES])
    assert info.value.status_hint == 404
    with pytest.raises(MalformedPath):
        pypi.map_file_path("/files/files.pythonhosted.org", file_hosts=[FILES])


# ---- HTML (PEP 503) --------------------------------------------------------------------------

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
SHA_D = "d" * 64

FH = "https://files.pythonhosted.org/packages"
WHL = "demo-1.1-py3-none-any.whl"
META = f'data-dist-info-metadata="sha256={SHA_C}" data-core-metadata="sha256={SHA_C}"'
YANKED = 'data-yanked="broken &amp; &quot;bad&quot;"'

HTML_HEAD = """<!DOCTYPE html>
<html>
  <head>
    <meta name="pypi:repository-version" content="1.1">
    <title>Links for demo</title>
  </head>
  <body>
    <h1>Links for demo</h1>
"""
HTML_TAIL = """    <a href="https://elsewhere.example/demo-0.1.tar.gz">demo-0.1.tar.gz</a><br />
    <a name="anchor-without-href">caf\u00e9</a>
  </body>
</html>
"""

HTML_PAGE = (
    HTML_HEAD
    + f'    <a href="{FH}/00/11/demo-1.0.tar.gz#sha256={SHA_A}" >demo-1.0.tar.gz</a><br />\n'
    # A start tag spread over lines, as some index generators write them.
    + f'    <a\n      href="{FH}/22/33/{WHL}#sha256={SHA_B}"\n'
    + f'      data-requires-python="&gt;=3.8"\n      {META}>{WHL}</a><br />\n'
    + f"    <A HREF='../../packages/44/55/demo-0.9.tar.gz#md5=0123' {YANKED}>"
    + "demo-0.9.tar.gz</A><br />\n"
    + f'    <a href="/packages/66/77/demo-0.8.zip?x=1&amp;y=2#sha512={SHA_D}" data-yanked>'
    + "demo-0.8.zip</a><br />\n"
    + HTML_TAIL
)

PFH = "/pypi/files/files.pythonhosted.org/packages"
HTML_EXPECTED = (
    HTML_HEAD
    + f'    <a href="{PFH}/00/11/demo-1.0.tar.gz#sha256={SHA_A}">demo-1.0.tar.gz</a><br />\n'
    + f'    <a href="{PFH}/22/33/{WHL}#sha256={SHA_B}" data-requires-python="&gt;=3.8" {META}>'
    + f"{WHL}</a><br />\n"
    + f'    <a href="/pypi/packages/44/55/demo-0.9.tar.gz#md5=0123" {YANKED}>'
    + "demo-0.9.tar.gz</A><br />\n"
    + f'    <a href="/pypi/packages/66/77/demo-0.8.zip?x=1&amp;y=2#sha512={SHA_D}" data-yanked>'
    + "demo-0.8.zip</a><br />\n"
    + HTML_TAIL
)

HTML_DIGESTS = {
    "/files/files.pythonhosted.org/packages/00/11/demo-1.0.tar.gz": f"sha256:{SHA_A}",
    "/files/files.pythonhosted.org/packages/22/33/demo-1.1-py3-none-any.whl": f"sha256:{SHA_B}",
    "/files/files.pythonhosted.org/packages/22/33/demo-1.1-py3-none-any.whl.metadata": (
        f"sha256:{SHA_C}"
    ),
    "/packages/66/77/demo-0.8.zip?x=1&y=2": f"sha512:{SHA_D}",
}


@pytest.mark.parametrize(
    "content_type",
    ["text/html", "text/html; q=1; charset=utf-8", "application/vnd.pypi.simple.v1+html"],
)
def test_rewrite_html_page(content_type: str) -> None:
    result = pypi.rewrite_index(
        HTML_PAGE.encode(),
        content_type,
        page_url_path="/simple/demo/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert result.body.decode() == HTML_EXPECTED
    assert result.digests == HTML_DIGESTS


def test_rewritten_links_map_back_to_their_origin() -> None:
    result = pypi.rewrite_index(
        HTML_PAGE.encode(),
        "text/html",
        page_url_path="/simple/demo/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    mapped = {route: pypi.map_file_path(route, file_hosts=[FILES]) for route in result.digests}
    assert mapped[next(iter(HTML_DIGESTS))] == (FILES, "/packages/00/11/demo-1.0.tar.gz")
    assert mapped["/packages/66/77/demo-0.8.zip?x=1&y=2"] == (
        None,
        "/packages/66/77/demo-0.8.zip?x=1&y=2",
    )


def test_rewrite_html_with_upstream_base_path_and_base_tag() -> None:
    page = (
        b'<html><head><base href="https://devpi.example/root/pypi/+simple/demo/"></head><body>'
        b'<a href="../../+f/0ab/demo-1.0.tar.gz#sha256=' + SHA_A.encode() + b'">d</a>'
        b'<a href="/other/demo-1.0.tar.gz">outside the base path</a>'
        b'<a href="https://devpi.example/root/pypi/+f/1cd/demo-1.1.tar.gz"/>'
        b"</body></html>"
    )
    result = pypi.rewrite_index(
        page,
        "text/html",
        page_url_path="/+simple/demo/",
        upstream_base="https://devpi.example/root/pypi/",
        file_hosts=[],
        proxy_prefix="http://127.0.0.1:8080/py",
    )
    assert result.body == (
        b'<html><head><base href="http://127.0.0.1:8080/py/+simple/demo/"></head><body>'
        b'<a href="http://127.0.0.1:8080/py/+f/0ab/demo-1.0.tar.gz#sha256='
        + SHA_A.encode()
        + b'">d</a>'
        b'<a href="https://devpi.example/other/demo-1.0.tar.gz">outside the base path</a>'
        b'<a href="http://127.0.0.1:8080/py/+f/1cd/demo-1.1.tar.gz" />'
        b"</body></html>"
    )
    assert result.digests == {"/+f/0ab/demo-1.0.tar.gz": f"sha256:{SHA_A}"}


def test_rewrite_html_latin1_page_round_trips_other_bytes() -> None:
    page = "<p>Caf\u00e9</p><a href='/packages/x.tar.gz'>x</a>".encode("latin-1")
    result = pypi.rewrite_index(
        page,
        "text/html; charset=ISO-8859-1",
        page_url_path="/simple/x/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert result.body == '<p>Caf\u00e9</p><a href="/pypi/packages/x.tar.gz">x</a>'.encode(
        "latin-1"
    )


def test_rewrite_html_root_index() -> None:
    page = b'<html><body><a href="/simple/a-b/">a-b</a><a href="c/">c</a></body></html>'
    result = pypi.rewrite_index(
        page,
        "text/html",
        page_url_path="/simple/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert result.body == (
        b'<html><body><a href="/pypi/simple/a-b/">a-b</a>'
        b'<a href="/pypi/simple/c/">c</a></body></html>'
    )
    assert result.digests == {}


def test_unchanged_page_is_the_same_object() -> None:
    page = b'<html><body><a href="https://elsewhere.example/x.tar.gz">x</a></body></html>'
    result = pypi.rewrite_index(
        page,
        "text/html",
        page_url_path="/simple/x/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert result.body is page
    assert result.digests == {}


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain", ""])
def test_other_content_types_are_not_touched(content_type: str) -> None:
    body = b'<a href="https://files.pythonhosted.org/x.whl">x</a>'
    result = pypi.rewrite_index(
        body,
        content_type,
        page_url_path="/simple/x/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert result.body is body
    assert result.digests == {}


# ---- JSON (PEP 691) --------------------------------------------------------------------------

JSON_PAGE = {
    "meta": {"api-version": "1.1", "_last-serial": 123},
    "name": "demo",
    "versions": ["0.9", "1.0"],
    "files": [
        {
            "filename": "demo-1.0-py3-none-any.whl",
            "url": f"{FILES}/packages/22/33/demo-1.0-py3-none-any.whl",
            "hashes": {"sha256": SHA_B.upper(), "md5": "0123"},
            "requires-python": ">=3.8",
            "core-metadata": {"sha256": SHA_C},
            "yanked": False,
            "size": 1234,
            "upload-time": "2024-01-01T00:00:00.000000Z",
        },
        {
            "filename": "demo-0.9.tar.gz",
            "url": "../../packages/44/55/demo-0.9.tar.gz",
            "hashes": {"sha256": SHA_A, "sha512": SHA_D + SHA_D},
            "yanked": "broken \u2014 do not use",
        },
        {
            "filename": "demo-0.1.tar.gz",
            "url": "https://elsewhere.example/demo-0.1.tar.gz",
            "hashes": {"sha256": SHA_A},
        },
        {"filename": "no-url"},
    ],
}


def test_rewrite_json_page() -> None:
    body = json.dumps(JSON_PAGE).encode()
    result = pypi.rewrite_index(
        body,
        "application/vnd.pypi.simple.v1+json",
        page_url_path="/simple/demo/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    doc = json.loads(result.body)
    expected = json.loads(body)
    expected["files"][0]["url"] = (
        "/pypi/files/files.pythonhosted.org/packages/22/33/demo-1.0-py3-none-any.whl"
    )
    expected["files"][1]["url"] = "/pypi/packages/44/55/demo-0.9.tar.gz"
    assert doc == expected
    assert "\u2014" in result.body.decode("utf-8")
    assert result.digests == {
        "/files/files.pythonhosted.org/packages/22/33/demo-1.0-py3-none-any.whl": (
            f"sha256:{SHA_B}"
        ),
        "/files/files.pythonhosted.org/packages/22/33/demo-1.0-py3-none-any.whl.metadata": (
            f"sha256:{SHA_C}"
        ),
        "/packages/44/55/demo-0.9.tar.gz": f"sha512:{SHA_D + SHA_D}",
    }


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"meta": {"api-version": "1.0"}, "projects": [{"name": "a"}]}).encode(),
    ],
)
def test_json_without_files_is_unchanged(body: bytes) -> None:
    result = pypi.rewrite_index(
        body,
        "application/vnd.pypi.simple.v1+json",
        page_url_path="/simple/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert result.body is body
    assert result.digests == {}


# ---- Location --------------------------------------------------------------------------------

LOCATION_CASES = [
    ("https://pypi.org/simple/zope-interface/", "/pypi/simple/zope-interface/"),
    ("/simple/zope-interface/", "/pypi/simple/zope-interface/"),
    ("../zope-interface/", "/pypi/simple/zope-interface/"),
    (
        "https://files.pythonhosted.org/packages/ab/x.whl",
        "/pypi/files/files.pythonhosted.org/packages/ab/x.whl",
    ),
    ("http://pypi.org/simple/x/", "http://pypi.org/simple/x/"),  # other scheme: not ours
    ("https://elsewhere.example/x", "https://elsewhere.example/x"),
]


@pytest.mark.parametrize(("location", "expected"), LOCATION_CASES)
def test_rewrite_location(location: str, expected: str) -> None:
    got = pypi.rewrite_location(
        location,
        page_url_path="/simple/Zope.Interface/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi/",
    )
    assert got == expected


ABSOLUTE_CASES = [
    "/packages/a/b.whl",
    "/packages/a/../b.whl",
    "/./x",
    "//other.example/x",
    "https://files.pythonhosted.org/x#sha256=00",
    "http://pypi.org/x",
    "../../packages/x.tar.gz",
    "x.tar.gz",
    "?q=1",
    "#frag",
    "",
]


@pytest.mark.parametrize("link", ABSOLUTE_CASES)
@pytest.mark.parametrize("page", ["https://pypi.org/simple/demo/", "https://pypi.org"])
def test_absolute_agrees_with_urljoin(page: str, link: str) -> None:
    assert pypi._absolute(page, link) == urllib.parse.urljoin(page, link)


def test_unknown_charset_falls_back_to_utf8_and_metadata_without_digest() -> None:
    page = (
        '<a href="/packages/x-1.0.whl" data-core-metadata="true">x \u00e9</a>'
        '<a href="/packages/y-1.0.whl?v=1" data-core-metadata="sha256=00">y</a>'
    ).encode()
    result = pypi.rewrite_index(
        page,
        "text/html; charset=no-such-charset",
        page_url_path="/simple/x/",
        upstream_base=UPSTREAM,
        file_hosts=[FILES],
        proxy_prefix="/pypi",
    )
    assert (
        result.body
        == (
            '<a href="/pypi/packages/x-1.0.whl" data-core-metadata="true">x \u00e9</a>'
            '<a href="/pypi/packages/y-1.0.whl?v=1" data-core-metadata="sha256=00">y</a>'
        ).encode()
    )
    assert result.digests == {}
