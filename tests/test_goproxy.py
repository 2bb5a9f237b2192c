"""Tests for the GOPROXY path grammar, case encoding, private patterns and dirhash."""

from __future__ import annotations

import base64
import hashlib
import io
import string
import zipfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxychain import goproxy, mirror
from proxychain.failover import ChainError
from proxychain.goproxy import GoSumLine, ModuleRequest, SumdbRequest
from proxychain.mirror import METADATA_MAX_STALE, METADATA_SWR, METADATA_TTL, MalformedPath
from proxychain.privatepaths import match_prefix_patterns

# ---- case encoding ---------------------------------------------------------------------------

ESCAPE_CASES = [
    ("github.com/Azure/azure-sdk-for-go", "github.com/!azure/azure-sdk-for-go"),
    ("github.com/BurntSushi/toml", "github.com/!burnt!sushi/toml"),
    ("golang.org/x/text", "golang.org/x/text"),
    ("v1.0.0-RC1", "v1.0.0-!r!c1"),
    ("", ""),
    ("ABC", "!a!b!c"),
]


@pytest.mark.parametrize(("plain", "escaped"), ESCAPE_CASES)
def test_escape_and_unescape(plain: str, escaped: str) -> None:
    assert goproxy.escape(plain) == escaped
    assert goproxy.unescape(escaped) == plain


@pytest.mark.parametrize("bad", ["a!b", "caf\u00e9"])
def test_escape_rejects(bad: str) -> None:
    with pytest.raises(MalformedPath):
        goproxy.escape(bad)


@pytest.mark.parametrize("bad", ["Azure", "github.com/!", "!A", "!1x", "!!a", "caf\u00e9", "x!"])
def test_unescape_rejects(bad: str) -> None:
    with pytest.raises(MalformedPath) as info:
        goproxy.unescape(bad)
    assert info.value.status_hint == 404


_PLAIN = st.text(alphabet=string.ascii_letters + string.digits + "-._~/+", max_size=40)
_ESCAPED = st.text(alphabet=string.ascii_lowercase + string.digits + "!-./", max_size=40)


@given(_PLAIN)
def test_escape_round_trip(plain: str) -> None:
    escaped = goproxy.escape(plain)
    assert not any(ch.isupper() for ch in escaped)
    assert goproxy.unescape(escaped) == plain


@given(_ESCAPED)
def test_unescape_round_trip(escaped: str) -> None:
    try:
        plain = goproxy.unescape(escaped)
    except MalformedPath:
        # Only a "!" that is not followed by a lower-case letter is malformed here.
        assert any(
            ch == "!" and (i + 1 == len(escaped) or not escaped[i + 1].islower())
            for i, ch in enumerate(escaped)
        )
    else:
        assert goproxy.escape(plain) == escaped


# ---- validity --------------------------------------------------------------------------------

VERSION_CASES = [
    ("v1.2.3", True),
    ("v0.0.0", True),
    ("v1.2.3-pre.1", True),
    ("v1.2.3-rc.1.alpha-2", True),
    ("v2.0.0+incompatible", True),
    ("v0.0.0-20231106132719-4556ab1eacd9", True),
    ("v1.2.4-0.20191109021931-daa7c04131f5", True),
    ("v1.2", False),
    ("v1", False),
    ("1.2.3", False),
    ("v01.2.3", False),
    ("v1.2.3-01", False),
    ("v1.2.3-", False),
    ("v1.2.3+build", False),
    ("master", False),
    ("latest", False),
    ("", False),
]


@pytest.mark.parametrize(("version", "canonical"), VERSION_CASES)
def test_is_canonical_version(version: str, canonical: bool) -> None:
    assert goproxy.is_canonical_version(version) is canonical


MODULE_PATH_CASES = [
    ("golang.org/x/text", True),
    ("github.com/Azure/azure-sdk-for-go", True),
    ("example.com", True),
    ("example.com/m/v2", True),
    ("example.com/m/v10", True),
    ("gopkg.in/yaml.v2", True),
    ("gopkg.in/check.v1", True),
    ("example.com/a_b/c~d", True),
    ("example.com/m/v1", False),
    ("example.com/m/v0", False),
    ("example.com/m/v02", False),
    ("example.com/m/v2.1", False),
    ("gopkg.in/yaml", False),
    ("fmt", False),
    ("Example.com/m", False),
    ("-example.com/m", False),
    ("example.com//m", False),
    ("example.com/m/", False),
    ("example.com/.m", False),
    ("example.com/m.", False),
    ("example.com/m@v1", False),
    ("example.com/m+x", False),
    ("", False),
]


@pytest.mark.parametrize(("path", "valid"), MODULE_PATH_CASES)
def test_is_valid_module_path(path: str, valid: bool) -> None:
    assert goproxy.is_valid_module_path(path) is valid


# ---- grammar ---------------------------------------------------------------------------------

AZ = "github.com/Azure/go-autorest"
PARSE_CASES: list[tuple[str, ModuleRequest | SumdbRequest | None]] = [
    ("/golang.org/x/text/@v/list", ModuleRequest(kind="list", module="golang.org/x/text")),
    ("/golang.org/x/text/@latest", ModuleRequest(kind="latest", module="golang.org/x/text")),
    (
        "/golang.org/x/text/@v/v0.3.0.info",
        ModuleRequest(kind="info", module="golang.org/x/text", version="v0.3.0"),
    ),
    (
        "/github.com/!azure/go-autorest/@v/v1.0.0-!r!c1.mod",
        ModuleRequest(kind="mod", module=AZ, version="v1.0.0-RC1"),
    ),
    (
        "/github.com/%21azure/go-autorest/@v/v14.2.0%2Bincompatible.zip",
        ModuleRequest(kind="zip", module=AZ, version="v14.2.0+incompatible"),
    ),
    (
        "/example.com/m/@v/master.info",
        ModuleRequest(kind="info", module="example.com/m", version="master"),
    ),
    ("/sumdb/sum.golang.org/supported", SumdbRequest(name="sum.golang.org", kind="supported")),
    ("/sumdb/sum.golang.org/latest", SumdbRequest(name="sum.golang.org", kind="latest")),
    (
        "/sumdb/sum.golang.org/lookup/github.com/%21azure/go-autorest@v1.0.0",
        SumdbRequest(
            name="sum.golang.org", kind="lookup", rest="github.com/!azure/go-autorest@v1.0.0"
        ),
    ),
    (
        "/sumdb/sum.golang.org/tile/8/0/x001/234",
        SumdbRequest(name="sum.golang.org", kind="tile", rest="8/0/x001/234"),
    ),
    (
        "/sumdb/sum.golang.org/tile/8/data/000.p/255",
        SumdbRequest(name="sum.golang.org", kind="tile", rest="8/data/000.p/255"),
    ),
    ("/github.com/Azure/go-autorest/@v/list", None),  # raw upper case is not allowed
    ("/github.com/!!azure/x/@v/list", None),
    ("/example.com/m/@v/v1.0.0.tar", None),
    ("/example.com/m/@v/", None),
    ("/example.com/m/@v/.info", None),
    ("/example.com/m/@v/..info", None),
    ("/example.com/m/@v/!!.info", None),
    ("/example.com/m/@v/v1 .info", None),
    ("/example.com/m/@v/a/b.info", None),
    ("/example.com/m/@v/list/", None),
    ("/example.com/m", None),
    ("/fmt/@v/list", None),
    ("/example.com/m/v1/@latest", None),
    ("example.com/m/@v/list", None),
    ("/example.com/%ff/@v/list", None),
    ("/sumdb/sum.golang.org/lookup/example.com/m@master", None),
    ("/sumdb/sum.golang.org/lookup/example.com/m", None),
    ("/sumdb/sum.golang.org/tile/8/0/1234", None),
    ("/sumdb/sum.golang.org/tile/8/0/x01/234", None),
    ("/sumdb/sum.golang.org/tile/8/0/000.p/256", None),
    ("/sumdb/sum.golang.org/tile/8/0/000.p/0", None),
    ("/sumdb/sum.golang.org/tile/31/0/000", None),
    ("/sumdb/sum.golang.org/tile/0/0/000", None),
    ("/sumdb/Sum.golang.org/latest", None),
    ("/sumdb/sum.golang.org/other", None),
]


@pytest.mark.parametrize(("path", "expected"), PARSE_CASES)
def test_parse(path: str, expected: ModuleRequest | SumdbRequest | None) -> None:
    assert goproxy.parse(path) == expected


IMM = (True, None, None, None)
MUT = (False, METADATA_TTL, METADATA_SWR, METADATA_MAX_STALE)
CLASSIFY_CASES = [
    ("/golang.org/x/text/@v/list", "list", MUT, "/golang.org/x/text/@v/list"),
    ("/golang.org/x/text/@latest", "latest", MUT, "/golang.org/x/text/@latest"),
    ("/golang.org/x/text/@v/v0.3.0.info", "info", IMM, "/golang.org/x/text/@v/v0.3.0.info"),
    ("/golang.org/x/text/@v/v0.3.0.mod", "mod", IMM, "/golang.org/x/text/@v/v0.3.0.mod"),
    ("/golang.org/x/text/@v/v0.3.0.zip", "zip", IMM, "/golang.org/x/text/@v/v0.3.0.zip"),
    (
        "/github.com/%21azure/x/@v/v2.0.0%2bincompatible.zip",
        "zip",
        IMM,
        "/github.com/!azure/x/@v/v2.0.0+incompatible.zip",
    ),
    (
        "/example.com/m/@v/v0.0.0-20231106132719-4556ab1eacd9.zip",
        "zip",
        IMM,
        "/example.com/m/@v/v0.0.0-20231106132719-4556ab1eacd9.zip",
    ),
    ("/example.com/m/@v/master.info", "info", MUT, "/example.com/m/@v/master.info"),
    ("/example.com/m/@v/v1.2.info", "info", MUT, "/example.com/m/@v/v1.2.info"),
    ("/example.com/m/@v/!h!e!a!d.info", "info", MUT, "/example.com/m/@v/!h!e!a!d.info"),
    ("/sumdb/sum.golang.org/supported", "sumdb-supported", MUT, "/sumdb/sum.golang.org/supported"),
    ("/sumdb/sum.golang.org/latest", "sumdb-latest", MUT, "/sumdb/sum.golang.org/latest"),
    (
        "/sumdb/sum.golang.org/tile/8/1/x002/345.p/17",
        "sumdb-tile",
        IMM,
        "/sumdb/sum.golang.org/tile/8/1/x002/345.p/17",
    ),
    (
        "/sumdb/sum.golang.org/lookup/github.com/%21azure/x@v1.0.0",
        "sumdb-lookup",
        IMM,
        "/sumdb/sum.golang.org/lookup/github.com/!azure/x@v1.0.0",
    ),
]


@pytest.mark.parametrize(("path", "kind", "lifetimes", "key_path"), CLASSIFY_CASES)
def test_classify(
    path: str,
    kind: str,
    lifetimes: tuple[bool, float | None, float | None, float | None],
    key_path: str,
) -> None:
    found = mirror.classify("goproxy", path)
    assert isinstance(found, mirror.PathClass)
    assert (found.kind, found.immutable, found.ttl, found.swr, found.max_stale) == (
        kind,
        *lifetimes,
    )
    assert found.key_path == key_path
    assert found.forced_vary == ()
    assert found.expected_digest is None
    # The key path is a fixed point: classifying it again gives the same class.
    assert goproxy.classify(key_path) == found


@pytest.mark.parametrize("path", [p for p, e in PARSE_CASES if e is None])
def test_classify_malformed(path: str) -> None:
    assert goproxy.classify(path) is None
    found = mirror.classify("goproxy", path)
    assert isinstance(found, MalformedPath)
    assert found.status_hint == mirror.INVALID_PATH_STATUS == 404


def test_classify_route_metadata_policy() -> None:
    policy = mirror.MetadataPolicy(ttl=5.0, swr=10.0, max_stale=20.0)
    found = goproxy.classify("/example.com/m/@v/list", metadata=policy)
    assert found is not None
    assert (found.ttl, found.swr, found.max_stale) == (5.0, 10.0, 20.0)
    pinned = goproxy.classify("/example.com/m/@v/v1.0.0.zip", metadata=policy)
    assert pinned is not None
    assert (pinned.immutable, pinned.ttl) == (True, None)


LOOKUP_CASES = [
    ("/sumdb/sum.golang.org/lookup/github.com/!azure/x@v1.0.0", ("github.com/Azure/x", "v1.0.0")),
    (
        "/sumdb/sum.golang.org/lookup/corp.example.com/a/b@v0.1.0",
        ("corp.example.com/a/b", "v0.1.0"),
    ),
    ("/sumdb/sum.golang.org/lookup/corp.example.com/a@master", None),
    ("/sumdb/sum.golang.org/latest", None),
    ("/corp.example.com/a/@v/v1.0.0.zip", None),
]


@pytest.mark.parametrize(("path", "expected"), LOOKUP_CASES)
def test_sumdb_lookup_module(path: str, expected: tuple[str, str] | None) -> None:
    assert goproxy.sumdb_lookup_module(path) == expected


# ---- GOPRIVATE / GONOSUMDB -------------------------------------------------------------------

PATTERN_CASES = [
    (["golang.org"], "golang.org/x/text", True),
    (["golang.org/"], "golang.org/x/text", True),
    (["golang.org/x"], "golang.org/x/text", True),
    (["golang.org/x/text"], "golang.org/x/text", True),
    (["golang.org/x/text/v2"], "golang.org/x/text", False),
    (["golang.org/x/tex"], "golang.org/x/text", False),
    (["*.corp.example.com"], "git.corp.example.com/team/repo", True),
    (["*.corp.example.com"], "corp.example.com/team/repo", False),
    (["rsc.io/private"], "rsc.io/private/quux", True),
    (["rsc.io/private"], "rsc.io/privatequux", False),
    (["rsc.io/*/x"], "rsc.io/a/x/y", True),
    (["rsc.io/*/x"], "rsc.io/a", False),
    (["rsc.io/*"], "rsc.io/a/b", True),
    (["rsc.io*"], "rsc.io/a", True),
    (["*"], "anything.example/at/all", True),
    (["example.co?"], "example.com/x", True),
    (["example.com?"], "example.com/x", False),
    (["github.com/org-[ab]"], "github.com/org-a/repo", True),
    (["github.com/org-[^ab]"], "github.com/org-a/repo", False),
    (["github.com/org-[^ab]"], "github.com/org-c/repo", True),
    (["a.com/[a-c]x"], "a.com/bx/y", True),
    (["a.com/[a-c]x"], "a.com/dx/y", False),
    (["a.com/\\*"], "a.com/*", True),
    (["a.com/\\*"], "a.com/b", False),
    (["a.com/["], "a.com/b", False),  # bad pattern matches nothing
    (["a.com/[]"], "a.com/b", False),
    (["a.com/[c-a]"], "a.com/b", False),
    (["a.com/\\"], "a.com/b", False),
    (["a.com/[\\-\\]]x"], "a.com/-x", True),
    (["a.com/[\\-\\]]x"], "a.com/]x", True),
    (["a.com/[\\-\\]]x"], "a.com/ax", False),
    (["a.com/[\\"], "a.com/b", False),
    (["a.com/[a-"], "a.com/b", False),
    ([",,other.org,", "x.org,golang.org"], "golang.org/x/text", True),
    (["", ","], "golang.org/x/text", False),
    ([], "golang.org/x/text", False),
    (["Golang.org"], "golang.org/x/text", False),  # case-sensitive, as in Go
]


_MALFORMED = {"a.com/[", "a.com/[]", "a.com/\\", "a.com/[\\", "a.com/[a-"}


@pytest.mark.parametrize(("patterns", "module", "expected"), PATTERN_CASES)
def test_private_patterns_on_module_paths(patterns: list[str], module: str, expected: bool) -> None:
    """The private-path matcher (``privatepaths``) on module paths, GOPRIVATE style.

    Where Go silently ignores a malformed glob, the matcher rejects it (a config error).
    """
    if _MALFORMED & set(patterns):
        with pytest.raises(ChainError):
            match_prefix_patterns(patterns, module)
    else:
        assert match_prefix_patterns(patterns, module) is expected


# ---- go.sum and dirhash ----------------------------------------------------------------------


def _reference_hash1(files: dict[str, bytes]) -> str:
    """dirhash.Hash1 written out from its definition, independent of the module under test."""
    lines = "".join(
        "%s  %s\n" % (hashlib.sha256(files[name]).hexdigest(), name)  # noqa: UP031
        for name in sorted(files, key=lambda n: n.encode())
    )
    return "h1:" + base64.standard_b64encode(hashlib.sha256(lines.encode()).digest()).decode()


# Published go.sum lines for modules without a go.mod: the proxy synthesises "module <path>\n".
KNOWN_GO_MOD_HASHES = [
    ("golang.org/x/text", "h1:NqM8EUOU14njkJ3fqMW+pc6Ldnwhi/IjpwHt7yyuwOQ="),
    ("github.com/davecgh/go-spew", "h1:J7Y8YcW2NihsgmVo/mv3lAwl/skON4iLHjSsI+c5H38="),
    ("github.com/pmezard/go-difflib", "h1:iKH77koFhYxTK1pcRnkKkqfTogsbg7gZNVY4sRDYZ/4="),
]


@pytest.mark.parametrize(("module", "expected"), KNOWN_GO_MOD_HASHES)
def test_mod_hash_known_values(module: str, expected: str) -> None:
    go_mod = f"module {module}\n".encode()
    assert goproxy.mod_hash(go_mod) == expected
    assert _reference_hash1({"go.mod": go_mod}) == expected


def test_dirhash_matches_reference_and_ignores_order() -> None:
    files = {
        "example.com/m@v1.0.0/go.mod": b"module example.com/m\n\ngo 1.21\n",
        "example.com/m@v1.0.0/m.go": b"package m\n",
        "example.com/m@v1.0.0/LICENSE": b"MIT\n",
        "example.com/m@v1.0.0/\u00e9t\u00e9.go": b"package m\n",
        "example.com/m@v1.0.0/sub/x.go": b"",
    }
    expected = _reference_hash1(files)
    assert goproxy.dirhash_h1(files.items()) == expected
    assert goproxy.dirhash_h1(reversed(list(files.items()))) == expected
    digests = [(n, hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    assert goproxy.hash1_from_digests(digests) == expected
    assert goproxy.dirhash_h1([]) == _reference_hash1({})


def test_dirhash_rejects_newline_names() -> None:
    with pytest.raises(ValueError):
        goproxy.dirhash_h1([("a\nb", b"")])


def test_zip_hash_from_a_real_zip() -> None:
    files = {
        "example.com/m@v1.0.0/go.mod": b"module example.com/m\n",
        "example.com/m@v1.0.0/m.go": b"package m\n\nconst X = 1\n",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        entries = [(info.filename, zf.read(info)) for info in zf.infolist()]
    got = goproxy.zip_hash(entries, module="example.com/m", version="v1.0.0")
    assert got == _reference_hash1(files)
    with pytest.raises(ValueError):
        goproxy.zip_hash(entries, module="example.com/m", version="v1.0.1")


GO_SUM_CASES = [
    (
        "golang.org/x/text v0.3.0 h1:g61tztE5qeGQ89tm6NTjjM9VPIm088od1l6aSorWRWg=",
        GoSumLine(
            module="golang.org/x/text",
            version="v0.3.0",
            is_gomod=False,
            hash="h1:g61tztE5qeGQ89tm6NTjjM9VPIm088od1l6aSorWRWg=",
        ),
    ),
    (
        "golang.org/x/text v0.3.0/go.mod h1:NqM8EUOU14njkJ3fqMW+pc6Ldnwhi/IjpwHt7yyuwOQ=\n",
        GoSumLine(
            module="golang.org/x/text",
            version="v0.3.0",
            is_gomod=True,
            hash="h1:NqM8EUOU14njkJ3fqMW+pc6Ldnwhi/IjpwHt7yyuwOQ=",
        ),
    ),
    ("", None),
    ("   \n", None),
    ("golang.org/x/text v0.3.0", None),
    ("golang.org/x/text v0.3.0 sha256:abc", None),
    ("golang.org/x/text v0.3.0 h1:abc extra", None),
]


@pytest.mark.parametrize(("line", "expected"), GO_SUM_CASES)
def test_parse_go_sum_line(line: str, expected: GoSumLine | None) -> None:
    assert goproxy.parse_go_sum_line(line) == expected
