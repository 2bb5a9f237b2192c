"""packages.py: planning buffered fills, then verifying, rewriting or learning from them."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from proxychain import goproxy, integrity, mirror, packages
from proxychain.__main__ import main as cli_main
from proxychain.configfile import parse_settings
from proxychain.digestbook import DigestBook
from proxychain.disk import DiskTier, open_disk_tier
from proxychain.entry import Entry
from proxychain.http import Headers, ResponseHead
from proxychain.integrity import IntegrityError
from proxychain.packages import FillPlan
from proxychain.settings import RouteSettings
from proxychain.store import MemoryTier, Store
from proxychain.verify import verify_cache

KEY = hashlib.sha256(b"key").hexdigest()
PYPI = RouteSettings(
    prefix="/pypi/",
    upstreams="http://127.0.0.1:9/",
    kind="pypi",
    file_hosts=("http://files.example",),
)
NPM = RouteSettings(prefix="/npm/", upstreams="http://reg.example", kind="npm")
GO = RouteSettings(prefix="/go/", upstreams="http://goproxy.example", kind="goproxy")
WHEEL = b"PK-not-really-a-wheel"
WHEEL_SHA = hashlib.sha256(WHEEL).hexdigest()
TARBALL = b"\x1f\x8b fake tarball"
TARBALL_SRI = "sha512-" + base64.b64encode(hashlib.sha512(TARBALL).digest()).decode()


def head(status: int = 200, content_type: str = "") -> ResponseHead:
    fields = [("content-type", content_type)] if content_type else []
    return ResponseHead(status=status, headers=Headers(fields))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_disk_tier(tmp_path / "cache", max_bytes=1 << 30, rescan_interval=None) as disk:
        yield Store(MemoryTier(max_bytes=1 << 20, object_max=1 << 16), disk)


async def fill(store: Store, body: bytes) -> packages.FillWriter:
    writer = await store.open_writer(KEY, "")
    await writer.write(body)
    return writer


async def stored_body(store: Store) -> bytes | None:
    found = await store.lookup(KEY)
    if not found:
        return None
    return b"".join([c async for c in store.open_body(found[0])])


def tmp_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "tmp").iterdir())


# ---- plan_fill -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "path", "status", "known", "expected"),
    [
        (PYPI, "/simple/Foo_Bar", 200, None, ("rewrite-pypi", "/pypi", None)),
        (PYPI, "/simple/", 200, None, ("rewrite-pypi", "/pypi", None)),
        (PYPI, "/simple/foo/", 404, None, None),
        (PYPI, "/packages/aa/f-1.whl", 200, None, None),
        (PYPI, "/packages/aa/f-1.whl", 200, "sha256:ab", ("verify", "", "sha256:ab")),
        (NPM, "/@s%2Fx", 200, None, ("rewrite-npm", "http://p:1/npm", None)),
        (NPM, "/x/1.0.0", 200, None, None),
        (NPM, "/x/-/x-1.0.0.tgz", 200, None, None),
        (NPM, "/x/-/x-1.0.0.tgz", 200, "sha1:00", ("verify", "", "sha1:00")),
        (
            GO,
            "/sumdb/sum.golang.org/lookup/m.example/a@v1.0.0",
            200,
            None,
            ("learn-sumdb", "", None),
        ),
        (GO, "/m.example/a/@v/v1.0.0.zip", 200, "h1:x=", ("verify", "", "h1:x=")),
        (GO, "/m.example/a/@v/v1.0.0.info", 200, "h1:x=", None),
        (GO, "/m.example/a/@v/list", 200, None, None),
    ],
)
async def test_plan_fill_table(
    route: RouteSettings,
    path: str,
    status: int,
    known: str | None,
    expected: tuple[str, str, str | None] | None,
) -> None:
    path_class = mirror.classify(route.kind, path)
    assert isinstance(path_class, mirror.PathClass)
    book = DigestBook(None)
    if known is not None:
        await book.learn(route.prefix, {path_class.key_path: known})
    plan = await packages.plan_fill(
        route,
        path_class,
        head(status, "text/html"),
        upstream="http://up.example",
        proxy_base="http://p:1/npm",
        book=book,
    )
    if expected is None:
        assert plan is None
        return
    assert plan is not None
    assert (plan.action, plan.proxy_base, plan.expected) == expected
    assert (plan.route_prefix, plan.key_path) == (route.prefix, path_class.key_path)


@pytest.mark.parametrize(
    ("route_kind", "path_kind", "expected"),
    [
        ("pypi", "simple-index", True),
        ("pypi", "project-page", True),
        ("npm", "packument", True),
        ("pypi", "file", False),
        ("npm", "tarball", False),
        ("goproxy", "list", False),
        ("http", "other", False),
    ],
)
def test_rewrites(route_kind: str, path_kind: str, expected: bool) -> None:
    assert packages.rewrites(route_kind, path_kind) is expected


# ---- verify ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "ok"),
    [
        (f"sha256:{WHEEL_SHA}", True),
        (f"sha256:{WHEEL_SHA.upper()}", True),
        (f"sha1:{hashlib.sha1(WHEEL).hexdigest()}", True),
        (f"sha256:{hashlib.sha256(b'other').hexdigest()}", False),
        ("sha384-" + base64.b64encode(hashlib.sha384(WHEEL).digest()).decode(), True),
    ],
)
async def test_verify_commits_or_drops(
    store: Store, tmp_path: Path, expected: str, ok: bool
) -> None:
    writer = await fill(store, WHEEL)
    plan = FillPlan(action="verify", route_prefix="/pypi/", key_path="/p/f.whl", expected=expected)
    book = DigestBook(None)
    result = await packages.finish_fill(
        plan, writer, Entry(key=KEY, url="/pypi/p/f.whl"), store=store, book=book, upstream="u"
    )
    if ok:
        assert isinstance(result, Entry)
        assert (result.verified, result.body_size) == (expected, len(WHEEL))
        assert await stored_body(store) == WHEEL
    else:
        assert isinstance(result, IntegrityError)
        assert (result.upstream, result.url, result.status_hint) == ("u", "/pypi/p/f.whl", 502)
        assert await stored_body(store) is None
    assert tmp_files(tmp_path) == []


async def test_short_body_is_refused_before_checking(store: Store) -> None:
    writer = await fill(store, WHEEL)
    plan = FillPlan(
        action="verify", route_prefix="/pypi/", key_path="/f.whl", expected=f"sha256:{WHEEL_SHA}"
    )
    result = await packages.finish_fill(
        plan, writer, Entry(key=KEY), store=store, book=DigestBook(None), expected_size=99
    )
    assert isinstance(result, IntegrityError)
    assert str(result) == f"body is {len(WHEEL)} bytes, upstream promised 99"
    assert await stored_body(store) is None


def test_unusable_expected_digest_is_an_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with pytest.raises(IntegrityError):
        integrity.check_file_digest("md5:00", path, "/f")


# ---- rewrites --------------------------------------------------------------------------------

INDEX = (
    b'<html><body><a href="/packages/aa/six-1.whl#sha256=' + WHEEL_SHA.encode() + b'">six</a>'
    b'<a href="http://files.example/x/six-2.whl#sha256=' + b"0" * 64 + b'">six2</a>'
    b"</body></html>"
)
REWRITTEN_INDEX = (
    b'<html><body><a href="/pypi/packages/aa/six-1.whl#sha256=' + WHEEL_SHA.encode() + b'">six</a>'
    b'<a href="/pypi/files/files.example/x/six-2.whl#sha256=' + b"0" * 64 + b'">six2</a>'
    b"</body></html>"
)


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("", lambda b: b),
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),
    ],
)
async def test_rewrite_pypi_index(store: Store, coding: str, encode: object) -> None:
    assert callable(encode)
    fields = [("content-type", "text/html"), ("etag", '"up-1"'), ("content-length", "5")]
    if coding:
        fields.append(("content-encoding", coding))
    entry = Entry(key=KEY, url="/pypi/simple/six/", headers=Headers(fields))
    writer = await fill(store, encode(INDEX))
    route_class = mirror.classify("pypi", "/simple/six/")
    assert isinstance(route_class, mirror.PathClass)
    book = DigestBook(None)
    plan = await packages.plan_fill(
        PYPI,
        route_class,
        head(200, "text/html"),
        upstream="http://127.0.0.1:9",
        proxy_base="",
        book=book,
    )
    assert plan is not None
    result = await packages.finish_fill(plan, writer, entry, store=store, book=book)
    assert isinstance(result, Entry)
    assert await stored_body(store) == REWRITTEN_INDEX
    etag = '"pc-' + hashlib.sha256(REWRITTEN_INDEX).hexdigest()[:40] + '"'
    assert list(result.headers) == [
        ("content-type", "text/html"),
        ("x-upstream-etag", '"up-1"'),
        ("content-length", str(len(REWRITTEN_INDEX))),
        ("etag", etag),
    ]
    assert book.get("/pypi/", "/packages/aa/six-1.whl") == f"sha256:{WHEEL_SHA}"
    assert book.get("/pypi/", "/files/files.example/x/six-2.whl") == "sha256:" + "0" * 64


async def test_unchanged_page_is_committed_as_is(store: Store) -> None:
    page = b'<a href="https://elsewhere.example/f.whl">f</a>'
    entry = Entry(key=KEY, headers=Headers([("etag", '"e"')]))
    writer = await fill(store, page)
    plan = FillPlan(
        action="rewrite-pypi",
        route_prefix="/pypi/",
        key_path="/simple/f/",
        upstream_base="http://127.0.0.1:9",
        proxy_base="/pypi",
        content_type="text/html",
    )
    result = await packages.finish_fill(plan, writer, entry, store=store, book=DigestBook(None))
    assert isinstance(result, Entry)
    assert result.headers == Headers([("etag", '"e"')])
    assert await stored_body(store) == page


@pytest.mark.parametrize(
    ("coding", "body", "message"),
    [
        ("br", b"x", "cannot decode Content-Encoding 'br' to rewrite"),
        ("gzip", b"not gzip", "corrupt gzip body: Not a gzipped file (b'no')"),
    ],
)
async def test_undecodable_body_is_dropped(
    store: Store, coding: str, body: bytes, message: str
) -> None:
    entry = Entry(key=KEY, headers=Headers([("content-encoding", coding)]))
    writer = await fill(store, body)
    plan = FillPlan(action="rewrite-npm", route_prefix="/npm/", key_path="/x")
    result = await packages.finish_fill(plan, writer, entry, store=store, book=DigestBook(None))
    assert isinstance(result, IntegrityError)
    assert str(result) == message
    assert await stored_body(store) is None


async def test_npm_packument_rewrite_then_tarball_verification(store: Store) -> None:
    doc = {
        "name": "x",
        "versions": {
            "1.0.0": {
                "dist": {
                    "tarball": "http://reg.example/x/-/x-1.0.0.tgz",
                    "integrity": TARBALL_SRI,
                }
            }
        },
    }
    book = DigestBook(None)
    writer = await fill(store, gzip.compress(json.dumps(doc).encode()))
    plan = FillPlan(
        action="rewrite-npm",
        route_prefix="/npm/",
        key_path="/x",
        upstream_base="http://reg.example",
        proxy_base="http://127.0.0.1:8/npm",
    )
    entry = Entry(key=KEY, headers=Headers([("content-encoding", "gzip")]))
    result = await packages.finish_fill(plan, writer, entry, store=store, book=book)
    assert isinstance(result, Entry)
    body = await stored_body(store)
    assert body is not None
    dist = json.loads(body)["versions"]["1.0.0"]["dist"]
    assert dist["tarball"] == "http://127.0.0.1:8/npm/x/-/x-1.0.0.tgz"
    assert "content-encoding" not in result.headers
    path_class = mirror.classify("npm", "/x/-/x-1.0.0.tgz")
    assert isinstance(path_class, mirror.PathClass)
    for tarball, accepted in ((TARBALL + b"tampered", False), (TARBALL, True)):
        await store.remove(KEY)
        plan2 = await packages.plan_fill(
            NPM, path_class, head(), upstream="http://reg.example", proxy_base="", book=book
        )
        assert plan2 == FillPlan(
            action="verify",
            route_prefix="/npm/",
            key_path=path_class.key_path,
            expected=TARBALL_SRI,
        )
        tar_writer = await fill(store, tarball)
        outcome = await packages.finish_fill(
            plan2, tar_writer, Entry(key=KEY), store=store, book=book
        )
        assert isinstance(outcome, Entry) is accepted


# ---- Go: sumdb lookups teach the .mod/.zip hashes --------------------------------------------

MODULE, VERSION = "example.com/Hello", "v1.0.0"
GO_MOD = b"module example.com/Hello\n"


def module_zip(extra: bytes = b"") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(f"{MODULE}@{VERSION}/go.mod", GO_MOD)
        archive.writestr(f"{MODULE}@{VERSION}/hello.go", b"package hello\n" + extra)
    return out.getvalue()


async def test_sumdb_lookup_teaches_go_hashes(store: Store) -> None:
    zip_h1 = goproxy.zip_hash(
        [
            (f"{MODULE}@{VERSION}/go.mod", GO_MOD),
            (f"{MODULE}@{VERSION}/hello.go", b"package hello\n"),
        ],
        module=MODULE,
        version=VERSION,
    )
    lookup = (
        f"123\n{MODULE} {VERSION} {zip_h1}\n{MODULE} {VERSION}/go.mod {goproxy.mod_hash(GO_MOD)}\n"
        "\ngo.sum database tree\n"
    ).encode()
    book = DigestBook(None)
    writer = await fill(store, lookup)
    plan = FillPlan(action="learn-sumdb", route_prefix="/go/", key_path="/sumdb/x/lookup/y")
    assert isinstance(
        await packages.finish_fill(plan, writer, Entry(key=KEY), store=store, book=book), Entry
    )
    assert await stored_body(store) == lookup
    escaped = "/example.com/!hello/@v/v1.0.0"
    assert book.get("/go/", escaped + ".zip") == zip_h1
    assert book.get("/go/", escaped + ".mod") == goproxy.mod_hash(GO_MOD)
    cases = [
        (".zip", module_zip(), True),
        (".zip", module_zip(b"// evil\n"), False),
        (".zip", b"not a zip", False),
        (".mod", GO_MOD, True),
        (".mod", GO_MOD + b"require evil v1.0.0\n", False),
    ]
    for suffix, body, accepted in cases:
        await store.remove(KEY)
        path_class = mirror.classify("goproxy", escaped + suffix)
        assert isinstance(path_class, mirror.PathClass)
        plan2 = await packages.plan_fill(
            GO, path_class, head(), upstream="http://g", proxy_base="", book=book
        )
        assert plan2 is not None
        result = await packages.finish_fill(
            plan2, await fill(store, body), Entry(key=KEY), store=store, book=book
        )
        assert isinstance(result, Entry) is accepted, (suffix, body[:20])


async def test_finish_fill_cancelled_leaves_no_temp_files(store: Store, tmp_path: Path) -> None:
    writer = await fill(store, WHEEL)
    plan = FillPlan(
        action="verify", route_prefix="/p/", key_path="/f.whl", expected=f"sha256:{WHEEL_SHA}"
    )
    with trio.CancelScope() as scope:
        scope.cancel()
        await packages.finish_fill(plan, writer, Entry(key=KEY), store=store, book=DigestBook(None))
    await writer.abort()  # what the proxy's cleanup does
    assert tmp_files(tmp_path) == []
    assert await stored_body(store) is None


# ---- proxychain verify -----------------------------------------------------------------------


async def _put(tier: DiskTier, name: str, url: str, body: bytes, verified: str = "") -> Entry:
    key = hashlib.sha256(name.encode()).hexdigest()
    writer = await tier.open_writer(key, "")
    await writer.write(body)
    return await writer.commit(Entry(key=key, url=url, verified=verified))


async def test_verify_cache_reports_and_drops_corrupt_entries(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    zip_body = module_zip()
    zip_h1 = goproxy.zip_hash(
        [
            (f"{MODULE}@{VERSION}/go.mod", GO_MOD),
            (f"{MODULE}@{VERSION}/hello.go", b"package hello\n"),
        ],
        module=MODULE,
        version=VERSION,
    )
    async with open_disk_tier(cache, max_bytes=1 << 30, rescan_interval=None) as tier:
        await _put(tier, "good", "/pypi/packages/a.whl", WHEEL, f"sha256:{WHEEL_SHA}")
        await _put(tier, "plain", "/x/plain", b"plain")
        go = await _put(tier, "go", "/go/example.com/!hello/@v/v1.0.0.zip", zip_body, zip_h1)
        rotten = await _put(tier, "rotten", "/x/rotten", b"12345")
        lying = await _put(tier, "lying", "/npm/x/-/x-1.tgz", b"tgz", TARBALL_SRI)
        rotten_go = await _put(
            tier, "rotten-go", "/go/example.com/!hello/@v/v1.0.0.mod", GO_MOD, zip_h1
        )
    body_path = cache / "objects" / rotten.key[:2] / rotten.key / f"_.{rotten.sha256}.body"
    body_path.write_bytes(b"54321")  # same size, other bytes: bit rot
    settings = parse_settings({"cache": {"dir": str(cache)}})
    kept = await verify_cache(settings, drop=False)
    assert (kept.scanned, kept.promised_checked, kept.ok, kept.dropped) == (6, 4, False, 0)
    assert sorted(kept.corrupt) == [
        (
            "/go/example.com/!hello/@v/v1.0.0.mod",
            f"body does not match the package digest {zip_h1}",
        ),
        ("/npm/x/-/x-1.tgz", f"body does not match the package digest {TARBALL_SRI}"),
        ("/x/rotten", "body does not match its recorded size and sha256"),
    ]
    assert kept.summary().splitlines()[0] == (
        f"verified 6 entries ({kept.bytes} bytes), 4 against a package digest: 3 corrupt, 0 dropped"
    )
    dropped = await verify_cache(settings)
    assert (dropped.scanned, dropped.dropped) == (6, 3)
    again = await verify_cache(settings)
    assert (again.scanned, again.ok) == (3, True)
    assert [e.url for e in (go, lying, rotten_go) if e.verified] == [
        go.url,
        lying.url,
        rotten_go.url,
    ]


def test_verify_command_exit_status(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n[log]\naccess_log = false\n')
    assert cli_main(["verify", "--config", str(config)]) == 0
