"""Tests for npm path classes, packument rewriting, and the shared digest checks."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from proxychain import mirror, npm
from proxychain.mirror import METADATA_TTL, MalformedPath

ACCEPT = ("accept",)
CLASSIFY_CASES = [
    ("/lodash", "packument", False, "/lodash", ACCEPT),
    ("/JSONStream", "packument", False, "/JSONStream", ACCEPT),
    ("/@babel%2fcore", "packument", False, "/@babel%2fcore", ACCEPT),
    ("/@babel%2Fcore", "packument", False, "/@babel%2fcore", ACCEPT),
    ("/%40babel%2Fcore", "packument", False, "/@babel%2fcore", ACCEPT),
    ("/@babel/core", "packument", False, "/@babel%2fcore", ACCEPT),
    ("/lodash/4.17.21", "version", False, "/lodash/4.17.21", ()),
    ("/lodash/latest", "version", False, "/lodash/latest", ()),
    ("/@types%2fnode/20.1.0", "version", False, "/@types%2fnode/20.1.0", ()),
    ("/lodash/-/lodash-4.17.21.tgz", "tarball", True, "/lodash/-/lodash-4.17.21.tgz", ()),
    ("/@babel/core/-/core-7.24.0.tgz", "tarball", True, "/@babel/core/-/core-7.24.0.tgz", ()),
    ("/@babel%2fcore/-/core-7.24.0.tgz", "tarball", True, "/@babel/core/-/core-7.24.0.tgz", ()),
    ("/x/-/x-1.0.0-beta.1+build.5.tgz", "tarball", True, "/x/-/x-1.0.0-beta.1+build.5.tgz", ()),
    ("/", "other", False, "/", ()),
    ("/-/ping", "other", False, "/-/ping", ()),
    ("/-/v1/search", "other", False, "/-/v1/search", ()),
]


@pytest.mark.parametrize(("path", "kind", "immutable", "key_path", "vary"), CLASSIFY_CASES)
def test_classify(
    path: str, kind: str, immutable: bool, key_path: str, vary: tuple[str, ...]
) -> None:
    found = mirror.classify("npm", path)
    assert isinstance(found, mirror.PathClass)
    assert (found.kind, found.immutable, found.key_path, found.forced_vary) == (
        kind,
        immutable,
        key_path,
        vary,
    )
    assert found.ttl == (METADATA_TTL if kind in ("packument", "version") else None)


MALFORMED = [
    "/@babel",
    "/@/core",
    "/@babel/",
    "/.hidden",
    "/_private",
    "/lodash/",
    "/lodash/-",
    "/lodash/-/lodash-4.17.21.zip",
    "/lodash/-/rev/1-abc",
    "/lodash/a/b",
    "/@babel/core/-/",
    "/has space",
    "//lodash",
    "/%ff",
    "lodash",
]


@pytest.mark.parametrize("path", MALFORMED)
def test_classify_malformed(path: str) -> None:
    assert npm.classify(path) is None
    found = mirror.classify("npm", path)
    assert isinstance(found, MalformedPath)
    assert found.status_hint == 404


@pytest.mark.parametrize(
    ("name", "path"), [("lodash", "/lodash"), ("@babel/core", "/@babel%2fcore")]
)
def test_package_path(name: str, path: str) -> None:
    assert npm.package_path(name) == path


# ---- packument rewriting ---------------------------------------------------------------------

TGZ_A = b"tarball bytes of a 1.0.0"
TGZ_B = b"tarball bytes of a 1.1.0"
SRI_A = "sha512-" + base64.b64encode(hashlib.sha512(TGZ_A).digest()).decode()
SHA1_B = hashlib.sha1(TGZ_B).hexdigest()


def _packument(registry: str, name: str, file_stem: str) -> dict[str, object]:
    return {
        "_id": name,
        "name": name,
        "dist-tags": {"latest": "1.1.0"},
        "versions": {
            "1.0.0": {
                "name": name,
                "version": "1.0.0",
                "dist": {
                    "tarball": f"{registry}/{name}/-/{file_stem}-1.0.0.tgz",
                    "shasum": hashlib.sha1(TGZ_A).hexdigest(),
                    "integrity": SRI_A,
                },
            },
            "1.1.0": {
                "name": name,
                "version": "1.1.0",
                "description": "caf\u00e9",
                "dist": {"tarball": f"{registry}/{name}/-/{file_stem}-1.1.0.tgz", "shasum": SHA1_B},
            },
            "0.0.1": {
                "dist": {"tarball": f"https://elsewhere.example/{file_stem}-0.0.1.tgz"},
            },
            "0.0.0": {"deprecated": "no dist"},
        },
        "time": {"1.0.0": "2024-01-01T00:00:00.000Z"},
    }


REWRITE_CASES = [
    # (upstream_base, tarball registry prefix, name, file stem, expected route dir)
    ("https://registry.npmjs.org", "https://registry.npmjs.org", "demo", "demo", "/demo"),
    ("https://registry.npmjs.org/", "http://REGISTRY.npmjs.org", "demo", "demo", "/demo"),
    (
        "https://registry.npmjs.org",
        "https://registry.npmjs.org",
        "@scope/demo",
        "demo",
        "/@scope/demo",
    ),
    (
        "http://127.0.0.1:4873/npm",
        "http://127.0.0.1:4873/npm",
        "@scope/demo",
        "demo",
        "/@scope/demo",
    ),
]


@pytest.mark.parametrize(("upstream", "registry", "name", "stem", "route_dir"), REWRITE_CASES)
def test_rewrite_packument(
    upstream: str, registry: str, name: str, stem: str, route_dir: str
) -> None:
    original = _packument(registry, name, stem)
    body = json.dumps(original).encode()
    result = npm.rewrite_packument(
        body, upstream_base=upstream, proxy_base="http://127.0.0.1:8080/npm/"
    )
    doc = json.loads(result.body)
    expected = json.loads(body)
    versions = expected["versions"]
    proxy = "http://127.0.0.1:8080/npm"
    versions["1.0.0"]["dist"]["tarball"] = f"{proxy}{route_dir}/-/{stem}-1.0.0.tgz"
    versions["1.1.0"]["dist"]["tarball"] = f"{proxy}{route_dir}/-/{stem}-1.1.0.tgz"
    assert doc == expected
    assert result.digests == {
        f"{route_dir}/-/{stem}-1.0.0.tgz": SRI_A,
        f"{route_dir}/-/{stem}-1.1.0.tgz": f"sha1:{SHA1_B}",
    }
    # Every digest key is a canonical tarball path of the route.
    for path in result.digests:
        found = npm.classify(path)
        assert found is not None
        assert (found.kind, found.key_path) == ("tarball", path)


def test_rewrite_scoped_tarball_with_encoded_slash_keys_canonically() -> None:
    body = json.dumps(
        {
            "versions": {
                "1.0.0": {
                    "dist": {
                        "tarball": "https://registry.npmjs.org/@scope%2Fdemo/-/demo-1.0.0.tgz",
                        "integrity": SRI_A,
                    }
                }
            }
        }
    ).encode()
    result = npm.rewrite_packument(
        body, upstream_base="https://registry.npmjs.org", proxy_base="/npm"
    )
    doc = json.loads(result.body)
    assert doc["versions"]["1.0.0"]["dist"]["tarball"] == "/npm/@scope/demo/-/demo-1.0.0.tgz"
    assert result.digests == {"/@scope/demo/-/demo-1.0.0.tgz": SRI_A}


def test_tarball_without_usable_integrity_has_no_digest() -> None:
    body = (
        b'{"versions": {"1.0.0": {"dist": {'
        b'"tarball": "https://registry.npmjs.org/x/-/x-1.0.0.tgz", "shasum": "abc"}}}}'
    )
    result = npm.rewrite_packument(
        body, upstream_base="https://registry.npmjs.org", proxy_base="/npm"
    )
    assert json.loads(result.body)["versions"]["1.0.0"]["dist"]["tarball"] == (
        "/npm/x/-/x-1.0.0.tgz"
    )
    assert result.digests == {}


def test_abbreviated_packument() -> None:
    body = json.dumps(
        {
            "name": "demo",
            "modified": "2024-01-01T00:00:00.000Z",
            "dist-tags": {"latest": "1.0.0"},
            "versions": {
                "1.0.0": {
                    "name": "demo",
                    "version": "1.0.0",
                    "dist": {
                        "tarball": "https://registry.npmjs.org/demo/-/demo-1.0.0.tgz",
                        "integrity": "sha1-AAAA sha512-not-base64!",  # both unusable
                        "shasum": SHA1_B.upper(),
                    },
                }
            },
        },
        separators=(",", ":"),
    ).encode()
    result = npm.rewrite_packument(
        body, upstream_base="https://registry.npmjs.org", proxy_base="http://proxy.test/npm"
    )
    assert result.body == body.replace(
        b"https://registry.npmjs.org/demo", b"http://proxy.test/npm/demo"
    )
    assert result.digests == {"/demo/-/demo-1.0.0.tgz": f"sha1:{SHA1_B}"}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"versions": []}',
        b'{"versions": {"1.0.0": {"dist": {"tarball": "https://elsewhere.example/x.tgz"}}}}',
        b'{"versions": {"1.0.0": {"dist": {"tarball": "https://registry.npmjs.org.evil/x.tgz"}}}}',
        b'{"versions": {"1.0.0": "weird"}}',
        b'{"versions": {"1.0.0": {"dist": {"tarball": "ftp://registry.npmjs.org/x.tgz"}}}}',
        b'{"versions": {"1.0.0": {"dist": {"tarball": "https://registry.npmjs.org"}}}}',
        b'{"versions": {"1.0.0": {"dist": {"tarball": 7}}}}',
    ],
)
def test_packument_without_our_tarballs_is_unchanged(body: bytes) -> None:
    result = npm.rewrite_packument(
        body, upstream_base="https://registry.npmjs.org", proxy_base="/npm"
    )
    assert result.body is body
    assert result.digests == {}


# ---- SRI and digest verification -------------------------------------------------------------

DATA = b"hello, mirror"
SHA1 = hashlib.sha1(DATA).digest()
SHA256 = hashlib.sha256(DATA).digest()
SHA384 = hashlib.sha384(DATA).digest()
SHA512 = hashlib.sha512(DATA).digest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


SRI_CASES = [
    (f"sha512-{_b64(SHA512)}", [("sha512", SHA512)]),
    (f"  sha1-{_b64(SHA1)}\tsha512-{_b64(SHA512)}  ", [("sha1", SHA1), ("sha512", SHA512)]),
    (f"SHA256-{_b64(SHA256)}?opt=1", [("sha256", SHA256)]),
    (f"md5-{_b64(b'x' * 16)} sha384-{_b64(SHA384)}", [("sha384", SHA384)]),
    (f"sha512-{_b64(SHA256)}", []),  # wrong length for the algorithm
    ("sha512-!!!", []),
    ("sha512", []),
    ("", []),
]


@pytest.mark.parametrize(("value", "expected"), SRI_CASES)
def test_parse_sri(value: str, expected: list[tuple[str, bytes]]) -> None:
    assert npm.parse_sri(value) == expected


HASHES = {name: hashlib.new(name, DATA).digest() for name in mirror.DIGEST_ALGORITHMS}
OTHER = hashlib.sha512(b"other").digest()

VERIFY_CASES = [
    (f"sha256:{SHA256.hex()}", True),
    (f"sha256:{SHA256.hex().upper()}", True),
    (f"sha1:{SHA1.hex()}", True),
    (f"sha512:{SHA512.hex()}", True),
    (f"sha256:{hashlib.sha256(b'x').hexdigest()}", False),
    (f"sha512-{_b64(SHA512)}", True),
    (f"sha512-{_b64(OTHER)}", False),
    # The strongest algorithm decides: a matching sha1 cannot rescue a wrong sha512.
    (f"sha1-{_b64(SHA1)} sha512-{_b64(OTHER)}", False),
    (f"sha1-{_b64(hashlib.sha1(b'x').digest())} sha512-{_b64(SHA512)}", True),
    # Any digest of the deciding algorithm may match.
    (f"sha512-{_b64(OTHER)} sha512-{_b64(SHA512)}", True),
    # sha384 is not computed: the strongest computed algorithm decides.
    (f"sha384-{_b64(SHA384)} sha256-{_b64(SHA256)}", True),
]


@pytest.mark.parametrize(("expected", "ok"), VERIFY_CASES)
def test_verify_digest(expected: str, ok: bool) -> None:
    assert npm.verify_digest(expected, HASHES) is ok


@pytest.mark.parametrize(
    "expected",
    ["", "sha256:nothex", "sha256:abcd", "md5:" + "0" * 32, f"sha384-{_b64(SHA384)}"],
)
def test_verify_digest_rejects_unusable(expected: str) -> None:
    with pytest.raises(ValueError):
        npm.verify_digest(expected, HASHES)


# ---- the dispatcher --------------------------------------------------------------------------


def test_http_routes_have_no_override() -> None:
    found = mirror.classify("http", "/any/path.tgz")
    assert found == mirror.PathClass(
        kind="other", immutable=False, ttl=None, swr=None, max_stale=None, key_path="/any/path.tgz"
    )


def test_unknown_kind() -> None:
    with pytest.raises(ValueError):
        mirror.classify("maven", "/x")


def test_metadata_policy_and_replace() -> None:
    policy = mirror.MetadataPolicy(ttl=1.0, swr=2.0, max_stale=3.0)
    found = mirror.classify("npm", "/lodash", metadata=policy)
    assert isinstance(found, mirror.PathClass)
    assert (found.ttl, found.swr, found.max_stale) == (1.0, 2.0, 3.0)
    assert found.replace(ttl=30.0).ttl == 30.0
    assert found.ttl == 1.0
