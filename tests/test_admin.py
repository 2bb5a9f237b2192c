"""The admin plane: the ASGI app driven directly, then through hypercorn on loopback."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from proxychain.admin import (
    MAX_ADMIN_BODY_BYTES,
    AdminApp,
    purge_remote,
    resolve_token,
    serve_admin,
    start_admin,
)
from proxychain.configfile import default_settings
from proxychain.errors import ConfigError, ProxyChainError, RequestRefused
from proxychain.settings import AdminSettings

TOKEN = "s3cret-token"

STATS: dict[str, object] = {
    "generated_at": 1_700_000_000.0,
    "routes": [
        {"name": "/go/", "requests": 1234, "hits": 1080, "hit_ratio": 0.875, "bytes_sent": 5 << 20},
        {"name": "/pypi/", "requests": 40, "hits": 10, "hit_ratio": 0.25, "bytes_sent": 2048},
    ],
    "upstreams": [
        {
            "name": "golang-primary",
            "route": "/go/",
            "state": "open",
            "failures": 7,
            "next_probe_at": 1_700_000_030.0,
        },
        {
            "name": "golang-mirror",
            "route": "/go/",
            "state": "closed",
            "failures": 0,
            "next_probe_at": None,
        },
    ],
    "tiers": [
        {"name": "memory", "bytes": 1 << 20, "entries": 321, "budget": 4 << 20},
        {"name": "disk", "bytes": 3 << 30, "entries": 9876, "budget": 0},
    ],
    "recent_errors": [
        {"at": 1_699_999_990.0, "route": "/go/", "message": "golang-primary: connect refused"},
    ],
    "hit_ratio_history": [
        [1_699_999_940.0, 0.5],
        [1_699_999_970.0, 0.75],
        [1_700_000_000.0, 0.875],
    ],
}


@dataclass
class FakeBackend:
    """An AdminBackend with fixed figures that records purges."""

    is_ready: bool = True
    reasons: list[str] = field(default_factory=list)
    purged: list[tuple[str | None, str | None]] = field(default_factory=list)
    purge_error: Exception | None = None

    def stats(self) -> dict[str, object]:
        return STATS

    def ready(self) -> tuple[bool, list[str]]:
        return self.is_ready, self.reasons

    async def purge(self, url: str | None, prefix: str | None) -> int:
        await trio.lowlevel.checkpoint()
        if self.purge_error is not None:
            raise self.purge_error
        self.purged.append((url, prefix))
        return 3 if prefix else 1

    def metrics(self) -> tuple[bytes, str]:
        return b"proxychain_up 1\n", "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, kw_only=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: AdminApp,
    method: str,
    path: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    chunk: int = 0,
) -> Answer:
    """Drive the app with one ASGI http request; ``chunk`` > 0 splits the body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(n.lower().encode(), v.encode()) for n, v in headers],
    }
    size = chunk or max(len(body), 1)
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    inbox = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(dict(message))

    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return Answer(
        status=sent[0]["status"],
        headers={n.decode(): v.decode() for n, v in sent[0]["headers"]},
        body=sent[1]["body"],
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("Authorization", f"Bearer {token}"),)


# -- routing ----------------------------------------------------------------------------------

ROUTING_CASES = [
    # (method, path, status, content type prefix, allow)
    ("GET", "/healthz", 200, "text/plain", None),
    ("HEAD", "/healthz", 200, "text/plain", None),
    ("GET", "/metrics", 200, "text/plain; version=0.0.4", None),
    ("GET", "/admin/stats", 200, "application/json", None),
    ("GET", "/", 200, "text/html", None),
    ("GET", "/nope", 404, "application/json", None),
    ("GET", "/admin/stats/", 404, "application/json", None),
    ("POST", "/healthz", 405, "application/json", "GET, HEAD"),
    ("DELETE", "/metrics", 405, "application/json", "GET, HEAD"),
    ("GET", "/admin/purge", 405, "application/json", "POST"),
    ("HEAD", "/admin/purge", 405, "application/json", "POST"),
]


@pytest.mark.parametrize(("method", "path", "status", "ctype", "allow"), ROUTING_CASES)
async def test_routing(method: str, path: str, status: int, ctype: str, allow: str | None) -> None:
    answer = await call(AdminApp(FakeBackend(), token=TOKEN), method, path)
    assert answer.status == status
    assert answer.headers["content-type"].startswith(ctype)
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers.get("allow") == allow


async def test_bodies_of_read_only_endpoints() -> None:
    app = AdminApp(FakeBackend(), token=None)
    assert (await call(app, "GET", "/healthz")).body == b"ok\n"
    assert (await call(app, "HEAD", "/healthz")).body == b""
    assert (await call(app, "GET", "/metrics")).body == b"proxychain_up 1\n"
    assert (await call(app, "GET", "/admin/stats")).json() == STATS
    page = (await call(app, "GET", "/")).body
    assert page.startswith(b"<!doctype html>")
    assert b'fetch("admin/stats"' in page


@pytest.mark.parametrize(
    ("ready", "reasons", "status"),
    [
        (True, [], 200),
        (False, ["disk tier not writable"], 503),
        (False, ["no upstream reachable for /go/", "warming up"], 503),
    ],
)
async def test_readyz(ready: bool, reasons: list[str], status: int) -> None:
    app = AdminApp(FakeBackend(is_ready=ready, reasons=reasons), token=TOKEN)
    answer = await call(app, "GET", "/readyz")
    assert answer.status == status
    assert answer.json() == {"ready": ready, "reasons": reasons}


# -- purge and the token rules -----------------------------------------------------------------

URL_BODY = b'{"url": "/go/x/@v/list"}'

TOKEN_CASES = [
    # (configured token, request headers, status)
    (None, bearer(TOKEN), 403),
    ("", bearer(TOKEN), 403),
    (None, (), 403),
    (TOKEN, (), 401),
    (TOKEN, bearer("wrong"), 401),
    (TOKEN, bearer(TOKEN + "x"), 401),
    (TOKEN, bearer(""), 401),
    (TOKEN, (("Authorization", f"Basic {TOKEN}"),), 401),
    (TOKEN, (("Authorization", TOKEN),), 401),
    (TOKEN, bearer(TOKEN), 200),
    (TOKEN, (("Authorization", f"bearer {TOKEN}"),), 200),
]


@pytest.mark.parametrize(("configured", "headers", "status"), TOKEN_CASES)
async def test_purge_token_rules(
    configured: str | None, headers: tuple[tuple[str, str], ...], status: int
) -> None:
    backend = FakeBackend()
    answer = await call(
        AdminApp(backend, token=configured), "POST", "/admin/purge", headers=headers, body=URL_BODY
    )
    assert answer.status == status
    if status == 200:
        assert answer.json() == {"purged": 1}
        assert backend.purged == [("/go/x/@v/list", None)]
    else:
        assert backend.purged == []
        assert "error" in answer.json()
    assert (answer.headers.get("www-authenticate") == "Bearer") == (status == 401)


PURGE_BODY_CASES = [
    # (body, status, reply, purged)
    (URL_BODY, 200, {"purged": 1}, [("/go/x/@v/list", None)]),
    (b'{"prefix": "/go/"}', 200, {"purged": 3}, [(None, "/go/")]),
    # Absolute URLs name the same entries as their origin-form targets.
    (b'{"url": "http://cache:8080/go/x/@v/list"}', 200, {"purged": 1}, [("/go/x/@v/list", None)]),
    (b'{"url": "https://cache/p/a?b=1"}', 200, {"purged": 1}, [("/p/a?b=1", None)]),
    (b'{"url": "http://cache:8080"}', 200, {"purged": 1}, [("/", None)]),
    (b'{"prefix": "http://cache:8080/go/"}', 200, {"purged": 3}, [(None, "/go/")]),
    (b'{"url": "cache:8080/go/x"}', 200, {"purged": 1}, [("cache:8080/go/x", None)]),
    (b"", 400, None, []),
    (b"{not json", 400, None, []),
    (b"\xff\xfe", 400, None, []),
    (b"[]", 400, None, []),
    (b'"/go/"', 400, None, []),
    (b"{}", 400, None, []),
    (b'{"url": ""}', 400, None, []),
    (b'{"url": 3}', 400, None, []),
    (b'{"path": "/go/"}', 400, None, []),
    (b'{"url": "/a", "prefix": "/b"}', 400, None, []),
]


@pytest.mark.parametrize(("body", "status", "reply", "purged"), PURGE_BODY_CASES)
async def test_purge_bodies(
    body: bytes, status: int, reply: object, purged: list[tuple[str | None, str | None]]
) -> None:
    backend = FakeBackend()
    app = AdminApp(backend, token=TOKEN)
    answer = await call(app, "POST", "/admin/purge", headers=bearer(TOKEN), body=body, chunk=3)
    assert answer.status == status
    if reply is not None:
        assert answer.json() == reply
    assert backend.purged == purged


async def test_purge_body_too_large() -> None:
    backend = FakeBackend()
    body = b'{"url": "' + b"a" * MAX_ADMIN_BODY_BYTES + b'"}'
    app = AdminApp(backend, token=TOKEN)
    answer = await call(app, "POST", "/admin/purge", headers=bearer(TOKEN), body=body, chunk=4096)
    assert answer.status == 413
    assert backend.purged == []


async def test_purge_backend_error_uses_status_hint() -> None:
    backend = FakeBackend(purge_error=RequestRefused("purge of /sumdb/ is not allowed"))
    app = AdminApp(backend, token=TOKEN)
    body = b'{"prefix": "/sumdb/"}'
    answer = await call(app, "POST", "/admin/purge", headers=bearer(TOKEN), body=body)
    assert answer.status == 403
    assert answer.json() == {"error": "purge of /sumdb/ is not allowed"}


async def test_lifespan_and_other_scopes() -> None:
    app = AdminApp(FakeBackend(), token=None)
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Any] = []

    async def receive() -> Any:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    sent.clear()
    await app({"type": "websocket", "path": "/"}, receive, send)
    assert sent == []


# -- small pure helpers -----------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["", "9090", ":9090", "127.0.0.1:", "h:65536", "h:x"])
async def test_serve_admin_rejects_bad_listen(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"admin\.listen"):
        await serve_admin(AdminApp(FakeBackend(), token=None), listen)


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [
        ("file", {"PROXYCHAIN_ADMIN_TOKEN": "env"}, "file"),
        ("", {"PROXYCHAIN_ADMIN_TOKEN": "env"}, "env"),
        (None, {"PROXYCHAIN_ADMIN_TOKEN": "env"}, "env"),
        (None, {"PROXYCHAIN_ADMIN_TOKEN": ""}, None),
        (None, {}, None),
    ],
)
def test_resolve_token(
    configured: str | None, environ: dict[str, str], expected: str | None
) -> None:
    assert resolve_token(configured, environ) == expected


async def test_purge_remote_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await purge_remote("http://127.0.0.1:1", TOKEN)
    with pytest.raises(ValueError, match="exactly one"):
        await purge_remote("http://127.0.0.1:1", TOKEN, url="/a", prefix="/b")


# -- through hypercorn on loopback ------------------------------------------------------------


@asynccontextmanager
async def running_admin(backend: FakeBackend, token: str | None) -> AsyncIterator[str]:
    """Serve the admin app on 127.0.0.1, port 0; yield its base URL; shut down gracefully."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_admin(
                AdminApp(backend, token=token),
                "127.0.0.1:0",
                task_status=task_status,
                shutdown_trigger=stop.wait,
                graceful_timeout=0.5,
            )
        )
        assert isinstance(port, int)
        assert port > 0
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop.set()


@pytest.mark.loopback
async def test_served_by_hypercorn() -> None:
    backend = FakeBackend(is_ready=False, reasons=["warming up"])
    with trio.fail_after(10):
        async with (
            running_admin(backend, TOKEN) as base,
            httpx.AsyncClient(base_url=base, trust_env=False) as client,
        ):
            health = await client.get("/healthz")
            assert (health.status_code, health.text) == (200, "ok\n")
            ready = await client.get("/readyz")
            assert (ready.status_code, ready.json()) == (
                503,
                {"ready": False, "reasons": ["warming up"]},
            )
            assert (await client.get("/admin/stats")).json() == STATS
            assert (await client.get("/metrics")).text == "proxychain_up 1\n"
            assert (await client.get("/missing")).status_code == 404
            assert (await client.put("/admin/purge")).status_code == 405
            denied = await client.post("/admin/purge", json={"prefix": "/go/"})
            assert denied.status_code == 401
            purged = await client.post(
                "/admin/purge",
                json={"prefix": "/go/"},
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            assert (purged.status_code, purged.json()) == (200, {"purged": 3})
    assert backend.purged == [(None, "/go/")]


@pytest.mark.loopback
async def test_purge_remote_against_hypercorn() -> None:
    backend = FakeBackend()
    with trio.fail_after(10):
        async with running_admin(backend, TOKEN) as base:
            assert await purge_remote(base, TOKEN, url="/go/x/@v/list") == 1
            assert await purge_remote(base + "/", TOKEN, prefix="/go/") == 3
            with pytest.raises(ProxyChainError, match="wrong bearer token") as refused:
                await purge_remote(base, "wrong", prefix="/go/")
            assert refused.value.status_hint == 401
        async with running_admin(backend, None) as base:
            with pytest.raises(ProxyChainError, match="not configured") as disabled:
                await purge_remote(base, TOKEN, prefix="/go/")
            assert disabled.value.status_hint == 403
    assert backend.purged == [("/go/x/@v/list", None), (None, "/go/")]


@pytest.mark.loopback
async def test_start_admin_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYCHAIN_ADMIN_TOKEN", "from-env")
    settings = default_settings().replace(admin=AdminSettings(host="127.0.0.1", port=0))
    backend = FakeBackend()
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_admin(nursery, backend, settings, shutdown)
            base = f"http://127.0.0.1:{port}"
            assert await purge_remote(base, "from-env", prefix="/npm/") == 3
            shutdown.set()  # the nursery then exits once hypercorn has drained
    assert backend.purged == [(None, "/npm/")]


@pytest.mark.loopback
async def test_purge_remote_unreachable() -> None:
    # Bind a port and close it again: nothing listens there afterwards.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ProxyChainError) as failed:
        await purge_remote(f"http://127.0.0.1:{port}", TOKEN, url="/x")
    assert failed.value.status_hint == 502


# -- the status page in headless Chromium -----------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Let the page's fetch() finish before the DOM is dumped, without real waiting.
    "--virtual-time-budget=3000",
]
NO_FIGURE = "\u2013"  # the page's en dash for "not applicable"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


async def chromium(*args: str) -> bytes:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="proxychain-chromium-") as profile:
        done = await trio.run_process(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_stdout=True,
            capture_stderr=True,
        )
    return done.stdout


class PageCells(HTMLParser):
    """Collects text by (row key, data-field) and a few ids' attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.row: str | None = None
        self.field: str | None = None
        self.cells: dict[tuple[str, str], tuple[str, str]] = {}
        self.value = ""
        self.attrs_by_id: dict[str, dict[str, str | None]] = {}
        self.errors: list[str] = []
        self.in_error = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        ident = a.get("id")
        if ident:
            self.attrs_by_id[ident] = a
        for key in ("data-route", "data-upstream", "data-tier"):
            if tag == "tr" and a.get(key):
                self.row = a[key]
        if tag == "td" and a.get("data-field"):
            self.field, self.value = a["data-field"], a.get("data-value") or ""
        if tag == "li":
            self.in_error = True
            self.errors.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self.field = None
        if tag == "li":
            self.in_error = False

    def handle_data(self, data: str) -> None:
        if self.row and self.field:
            text = self.cells.get((self.row, self.field), (self.value, ""))[1]
            self.cells[self.row, self.field] = (self.value, text + data)
        if self.in_error:
            self.errors[-1] += data


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_status_page_in_headless_chromium() -> None:
    with trio.fail_after(60):
        async with running_admin(FakeBackend(), TOKEN) as base:
            dom = (await chromium("--dump-dom", base + "/")).decode()
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status_page.png"
            shot.unlink(missing_ok=True)
            await chromium(f"--screenshot={shot}", "--window-size=1000,1100", base + "/")
    parser = PageCells()
    parser.feed(dom)
    cells = parser.cells
    assert parser.attrs_by_id["status-line"]["class"] == "ok"
    # What a person reads, and the raw figure beside it.
    assert cells["/go/", "hit_ratio"] == ("0.875", "87.5%")
    assert cells["/go/", "requests"] == ("1234", "1234")
    assert cells["/go/", "bytes_sent"] == (str(5 << 20), "5.0 MiB")
    assert cells["/pypi/", "hit_ratio"] == ("0.25", "25.0%")
    assert cells["/pypi/", "bytes_sent"] == ("2048", "2.0 KiB")
    assert cells["golang-primary", "state"] == ("open", "open")
    assert cells["golang-primary", "failures"] == ("7", "7")
    assert cells["golang-primary", "next_probe_at"] == (
        "1700000030",
        "2023-11-14T22:13:50Z (in 30 s)",
    )
    assert cells["golang-mirror", "state"] == ("closed", "closed")
    assert cells["golang-mirror", "next_probe_at"] == ("", NO_FIGURE)
    assert cells["memory", "bytes"] == (str(1 << 20), "1.0 MiB")
    assert cells["memory", "used"] == ("0.25", "25.0%")
    assert cells["memory", "entries"] == ("321", "321")
    assert cells["disk", "bytes"] == (str(3 << 30), "3.0 GiB")
    assert cells["disk", "budget"] == ("0", NO_FIGURE)
    assert parser.errors == ["2023-11-14T22:13:10Z /go/ golang-primary: connect refused"]
    line = parser.attrs_by_id["hit-ratio-line"]
    assert line["data-points"] == "3"
    # Three points across the chart; ratio 0.5 → y=60, 0.75 → y=32, 0.875 → y=18.
    assert line["points"] == "4.0,60.0 240.0,32.0 476.0,18.0"
    assert shot.stat().st_size > 1000
