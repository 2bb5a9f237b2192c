"""The admin plane in front of a running proxy: metrics, purge, readiness, status page, logs.

Real sockets on loopback and the real clock for I/O; cache ages and breaker intervals move with
:class:`SkipClock`, which jumps the proxy's clock ahead instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from proxychain.__main__ import main as cli_main
from proxychain.admin import ADMIN_TOKEN_ENV, DEFAULT_ADMIN_LISTEN, start_admin
from proxychain.clock import Clock
from proxychain.errors import ErrorKind
from proxychain.logs import configure_logging
from proxychain.metrics import Metrics, TierFigures
from proxychain.observe import Observer
from tests.conftest import ProxyFactory, RunningProxy
from tests.fakes import FakeOrigin, Reply, ok, serve_origin
from tests.test_admin import ARTIFACTS, CHROMIUM, PageCells, chromium

pytestmark = pytest.mark.loopback

TOKEN = "t"
ADMIN = {"listen": "127.0.0.1:0", "token": TOKEN}
BODY = b"hello world\n"
WALL_ANCHOR = 1_700_000_000.0
TTL_SECONDS = 60
# Past the route's ttl (so the entry is stale) and within its max_stale.
PAST_TTL_SECONDS = 2 * TTL_SECONDS
# Past the largest breaker open interval, so an open breaker admits a probe again.
PAST_OPEN_CAP_SECONDS = 61.0
TEST_TIMEOUT_SECONDS = 30


class SkipClock(Clock):
    """The proxy's clock, plus jumps: ``skip(s)`` ages entries and breakers without sleeping."""

    def __init__(self) -> None:
        super().__init__(wall_anchor=WALL_ANCHOR)
        self.skipped = 0.0

    def skip(self, seconds: float) -> None:
        self.skipped += seconds

    def monotonic(self) -> float:
        return super().monotonic() + self.skipped

    def wall(self) -> float:
        return super().wall() + self.skipped


def files_route(upstream: str, prefix: str = "/files/", **extra: object) -> dict[str, object]:
    """A plain HTTP route: 60 s ttl, one try per upstream, breaker opening after 2 failures."""
    return {
        "prefix": prefix,
        "upstreams": upstream,
        "ttl": f"{TTL_SECONDS}s",
        "retries": 0,
        "breaker": {"failures": 2},
        **extra,
    }


@asynccontextmanager
async def admin_for(p: RunningProxy) -> AsyncIterator[str]:
    """Start the admin plane of ``p`` on a free port; yield its base URL."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await start_admin(nursery, p.proxy, p.settings, stop)
        yield f"http://127.0.0.1:{port}"
        stop.set()


def client(base_url: str) -> httpx.AsyncClient:
    # trust_env=False: loopback only, whatever *_proxy says.
    return httpx.AsyncClient(base_url=base_url, trust_env=False)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str, *names: str) -> Samples:
    """The samples of the named families, keyed by (sample name, labels); no ``_created``."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        if family.name not in names:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def sample(
    name: str, value: float, **labels: str
) -> tuple[tuple[str, frozenset[tuple[str, str]]], float]:
    return (name, frozenset(labels.items())), value


# -- 1. /metrics after miss, hit, stale and a breaker opening ----------------------------------


async def test_metrics_after_miss_hit_stale_and_breaker_opening(
    proxy_factory: ProxyFactory,
) -> None:
    origin = FakeOrigin()
    origin.set("/a.txt", ok(BODY))
    clock = SkipClock()
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with (
            serve_origin(origin) as up,
            proxy_factory([files_route(up, max_stale="1h")], clock=clock, admin=ADMIN) as p,
            admin_for(p) as admin,
            client(p.url) as data,
            client(admin) as adm,
        ):
            outcomes = [(await data.get("/files/a.txt")).headers["x-cache"]]
            await p.settled()  # the miss's commit runs after its response
            outcomes.append((await data.get("/files/a.txt")).headers["x-cache"])
            clock.skip(PAST_TTL_SECONDS)
            origin.set("/a.txt", Reply(status=503, body=b"down\n"))
            # Revalidation fails twice (the breaker opens on the second failure), then the
            # open breaker keeps the third attempt away from the upstream: stale every time.
            for _ in range(3):
                stale = await data.get("/files/a.txt")
                assert (stale.status_code, stale.content) == (200, BODY)
                outcomes.append(stale.headers["x-cache"])
            scraped = await adm.get("/metrics")
    assert outcomes == ["MISS", "HIT", "STALE", "STALE", "STALE"]
    assert origin.count("/a.txt") == 3
    assert scraped.status_code == 200
    assert scraped.headers["content-type"] == CONTENT_TYPE_LATEST
    text = scraped.text
    route = {"route": "/files/"}
    get_2xx = {**route, "method": "GET", "status": "2xx"}
    assert scrape(text, "proxychain_requests") == dict(
        [
            sample("proxychain_requests_total", 1, **get_2xx, outcome="MISS", tier="none"),
            sample("proxychain_requests_total", 1, **get_2xx, outcome="HIT", tier="memory"),
            sample("proxychain_requests_total", 3, **get_2xx, outcome="STALE", tier="memory"),
        ]
    )
    assert scrape(text, "proxychain_sent_bytes") == dict(
        [
            sample("proxychain_sent_bytes_total", len(BODY), **route, tier="none"),
            sample("proxychain_sent_bytes_total", 4 * len(BODY), **route, tier="memory"),
        ]
    )
    assert scrape(text, "proxychain_upstream_requests") == dict(
        [
            sample("proxychain_upstream_requests_total", 1, upstream=up, result="2xx"),
            sample("proxychain_upstream_requests_total", 2, upstream=up, result="5xx"),
        ]
    )
    assert scrape(text, "proxychain_upstream_errors") == {}
    upstream_count = scrape(text, "proxychain_upstream_duration_seconds")
    assert (
        upstream_count[sample("proxychain_upstream_duration_seconds_count", 0, upstream=up)[0]] == 3
    )
    assert scrape(text, "proxychain_breaker_state") == dict(
        [sample("proxychain_breaker_state", 2, upstream=up)]
    )
    assert scrape(text, "proxychain_breaker_transitions") == dict(
        [
            sample(
                "proxychain_breaker_transitions_total",
                1,
                upstream=up,
                from_state="closed",
                to_state="open",
            )
        ]
    )
    assert scrape(text, "proxychain_stale_served") == dict(
        [sample("proxychain_stale_served_total", 3, **route, reason="if_error")]
    )
    assert scrape(text, "proxychain_coalesced_waiters", "proxychain_integrity_failures") == {}
    assert scrape(text, "proxychain_cache_entries") == dict(
        [
            sample("proxychain_cache_entries", 1, tier="disk"),
            sample("proxychain_cache_entries", 1, tier="memory"),
        ]
    )
    assert scrape(text, "proxychain_cache_evictions") == dict(
        [
            sample("proxychain_cache_evictions_total", 0, tier="disk"),
            sample("proxychain_cache_evictions_total", 0, tier="memory"),
        ]
    )
    memory_bytes = scrape(text, "proxychain_cache_bytes")[
        sample("proxychain_cache_bytes", 0, tier="memory")[0]
    ]
    assert memory_bytes >= len(BODY)


# -- 2. purge: refused without the token; with it both tiers forget the entry ------------------


async def test_purge_through_the_admin_plane(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/a.txt", ok(BODY, ("cache-control", "max-age=600")))
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with (
            serve_origin(origin) as up,
            proxy_factory([files_route(up)], admin=ADMIN) as p,
            admin_for(p) as admin,
            client(p.url) as data,
            client(admin) as adm,
        ):
            store = p.proxy.store
            first = [(await data.get("/files/a.txt")).headers["x-cache"]]
            await p.settled()  # the miss's commit runs after its response
            first.append((await data.get("/files/a.txt")).headers["x-cache"])
            before = store.statistics()
            body = {"url": "/files/a.txt"}
            no_token = await adm.post("/admin/purge", json=body)
            wrong = await adm.post(
                "/admin/purge", json=body, headers={"authorization": "Bearer nope"}
            )
            kept = (await data.get("/files/a.txt")).headers["x-cache"]
            purged = await adm.post(
                "/admin/purge", json=body, headers={"authorization": f"Bearer {TOKEN}"}
            )
            after = store.statistics()
            again = (await data.get("/files/a.txt")).headers["x-cache"]
    assert first == ["MISS", "HIT"]
    assert (before.memory.entries, before.disk.entries) == (1, 1)
    assert (no_token.status_code, no_token.json()) == (
        401,
        {"error": "missing or wrong bearer token"},
    )
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert kept == "HIT"
    assert (purged.status_code, purged.json()) == (200, {"purged": 1})
    assert (after.memory.entries, after.memory.bytes, after.disk.entries) == (0, 0, 0)
    assert again == "MISS"
    assert origin.count("/a.txt") == 2


async def test_purge_is_disabled_without_a_configured_token(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    origin = FakeOrigin()
    origin.set("/a.txt", ok(BODY, ("cache-control", "max-age=600")))
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with (
            serve_origin(origin) as up,
            proxy_factory([files_route(up)], admin={"listen": "127.0.0.1:0"}) as p,
            admin_for(p) as admin,
            client(p.url) as data,
            client(admin) as adm,
        ):
            await data.get("/files/a.txt")
            refused = await adm.post(
                "/admin/purge",
                json={"prefix": "/files/"},
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            still = (await data.get("/files/a.txt")).headers["x-cache"]
    assert (refused.status_code, refused.json()) == (
        403,
        {"error": "admin token not configured; mutating endpoints disabled"},
    )
    assert still == "HIT"


async def test_purge_command_line(
    proxy_factory: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    origin = FakeOrigin()
    for name in ("a", "b", "c"):
        origin.set(f"/{name}.txt", ok(name.encode(), ("cache-control", "max-age=600")))
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with (
            serve_origin(origin) as up,
            proxy_factory([files_route(up), files_route(up, prefix="/other/")], admin=ADMIN) as p,
            admin_for(p) as admin,
            client(p.url) as data,
        ):
            for path in ("/files/a.txt", "/files/b.txt", "/other/c.txt"):
                await data.get(path)

            async def cli(*argv: str) -> int:
                # The command runs its own trio loop, so it gets a thread of its own.
                return await trio.to_thread.run_sync(cli_main, ["purge", "--admin", admin, *argv])

            codes = [await cli("/files/a.txt")]
            outputs = [capsys.readouterr()]
            codes.append(await cli("--token", "wrong", "/files/b.txt"))
            outputs.append(capsys.readouterr())
            monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
            codes.append(await cli(f"{p.url}/files/a.txt"))
            outputs.append(capsys.readouterr())
            codes.append(await cli("/files/*"))
            outputs.append(capsys.readouterr())
            untouched = (await data.get("/other/c.txt")).headers["x-cache"]
            codes.append(await cli("--prefix", "/other/"))
            outputs.append(capsys.readouterr())
            outcomes = {
                path: (await data.get(path)).headers["x-cache"]
                for path in ("/files/a.txt", "/files/b.txt", "/other/c.txt")
            }
    assert codes == [2, 1, 0, 0, 0]
    assert untouched == "HIT"
    assert [(o.out, o.err) for o in outputs] == [
        ("", f"proxychain: purge needs --token or {ADMIN_TOKEN_ENV}\n"),
        ("", f"proxychain: purge failed: {admin}/admin/purge: 401 missing or wrong bearer token\n"),
        ("purged 1 entry\n", ""),  # /files/a.txt by absolute URL
        ("purged 1 entry\n", ""),  # /files/* finds only b.txt left
        ("purged 1 entry\n", ""),
    ]
    assert outcomes == {"/files/a.txt": "MISS", "/files/b.txt": "MISS", "/other/c.txt": "MISS"}


# -- 3. /healthz and /readyz -------------------------------------------------------------------


async def test_readyz_follows_the_breakers(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin(default=Reply(status=503, body=b"down\n"))
    clock = SkipClock()
    routes = [
        files_route("", prefix="/raw/"),
        files_route("", prefix="/files/", max_stale="1h"),
    ]
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with serve_origin(origin) as up:
            for route in routes:
                route["upstreams"] = up
            async with (
                proxy_factory(routes, clock=clock, admin=ADMIN) as p,
                admin_for(p) as admin,
                client(p.url) as data,
                client(admin) as adm,
            ):
                health = await adm.get("/healthz")
                ready_before = await adm.get("/readyz")
                statuses = [
                    (await data.get(f"{prefix}x")).status_code
                    for prefix in ("/raw/", "/raw/", "/files/", "/files/")
                ]
                ready_open = await adm.get("/readyz")
                clock.skip(PAST_OPEN_CAP_SECONDS)
                ready_probe_due = await adm.get("/readyz")
    assert (health.status_code, health.text) == (200, "ok\n")
    assert (ready_before.status_code, ready_before.json()) == (200, {"ready": True, "reasons": []})
    assert statuses == [502, 502, 502, 502]
    # Both routes' breakers are open; only /files/ can still answer from stale copies.
    assert (ready_open.status_code, ready_open.json()) == (
        503,
        {"ready": False, "reasons": ["route /raw/: every upstream's breaker is open"]},
    )
    assert ready_probe_due.status_code == 200


# -- 4. the status page in headless Chromium, with a real proxy's figures -----------------------


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_status_page_shows_live_figures(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/a.txt", ok(BODY, ("cache-control", "max-age=600")))
    with trio.fail_after(60):
        async with (
            serve_origin(origin) as up,
            proxy_factory([files_route(up)], admin=ADMIN) as p,
            admin_for(p) as admin,
            client(p.url) as data,
        ):
            for _ in range(3):
                await data.get("/files/a.txt")
            await data.get("/nowhere")  # no route: counted under "-", not shown per route
            dom = (await chromium("--dump-dom", admin + "/")).decode()
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status_page_live.png"
            shot.unlink(missing_ok=True)
            await chromium(f"--screenshot={shot}", "--window-size=1000,900", admin + "/")
            memory = p.proxy.store.statistics().memory
    page = PageCells()
    page.feed(dom)
    cells = page.cells
    assert page.attrs_by_id["status-line"]["class"] == "ok"
    assert cells["/files/", "requests"] == ("3", "3")
    assert cells["/files/", "hit_ratio"] == ("0.6667", "66.7%")
    assert cells["/files/", "bytes_sent"] == (str(3 * len(BODY)), f"{3 * len(BODY)} B")
    assert cells[up, "route"] == ("/files/", "/files/")
    assert cells[up, "state"] == ("closed", "closed")
    assert cells[up, "failures"] == ("0", "0")
    assert cells["memory", "entries"] == ("1", "1")
    assert cells["memory", "bytes"][0] == str(memory.bytes)
    assert cells["disk", "entries"] == ("1", "1")
    assert page.errors == ["none"]
    assert shot.stat().st_size > 1000


# -- 5. access log: one line per request, text and JSON ----------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo :func:`configure_logging` (it rewires the ``proxychain`` logger tree)."""
    root = logging.getLogger("proxychain")
    access = logging.getLogger("proxychain.access")
    saved = (root.handlers[:], root.level, root.propagate, access.disabled)
    yield
    root.handlers[:], root.level, root.propagate, access.disabled = saved


ACCESS_TEXT = re.compile(
    r'^\S+ \S+ INFO proxychain\.access: 127\.0\.0\.1 "GET (?P<path>\S+)" (?P<status>\d+) '
    r"(?P<bytes>\d+) (?P<duration>\d+\.\d{3})s cache=(?P<cache>\S+) tier=(?P<tier>\S+) "
    r"upstream=(?P<upstream>\S+)$"
)


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.usefixtures("restore_logging")
async def test_access_log_line_per_request(
    proxy_factory: ProxyFactory, capsys: pytest.CaptureFixture[str], log_format: str
) -> None:
    origin = FakeOrigin()
    origin.set("/a.txt", ok(BODY, ("cache-control", "max-age=600")))
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with serve_origin(origin) as up:
            async with proxy_factory(
                [files_route(up)], log={"format": log_format}, admin=ADMIN
            ) as p:
                configure_logging(p.settings.log)
                # The admin plane's own messages must come out in the same format.
                async with admin_for(p), client(p.url) as data:
                    await data.get("/files/a.txt")
                    await p.settled()  # the miss's commit runs after its response
                    await data.get("/files/a.txt")
                    await data.get("/nowhere")
    lines = capsys.readouterr().err.splitlines()
    expected = [
        ("/files/a.txt", 200, len(BODY), "MISS", "-", up),
        ("/files/a.txt", 200, len(BODY), "HIT", "memory", "-"),
        ("/nowhere", 404, len(b"no route for /nowhere\n"), "ERROR", "-", "-"),
    ]
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        admin_lines = [r["message"] for r in records if r["logger"] == "proxychain.admin"]
        assert len(admin_lines) == 1
        assert re.fullmatch(
            r"Running on http://127\.0\.0\.1:\d+ \(CTRL \+ C to quit\)", admin_lines[0]
        )
        access = [r for r in records if r["logger"] == "proxychain.access"]
        got: list[Any] = [
            (r["path"], r["status"], r["bytes"], r["cache"], r["tier"], r["upstream"])
            for r in access
        ]
        assert [r["route"] for r in access] == ["/files/", "/files/", "-"]
        assert all(r["method"] == "GET" and r["level"] == "INFO" for r in access)
        assert all(0 <= r["duration"] < TEST_TIMEOUT_SECONDS for r in access)
    else:
        matches = [ACCESS_TEXT.match(line) for line in lines if "proxychain.access" in line]
        assert all(matches), lines
        got = [
            (m["path"], int(m["status"]), int(m["bytes"]), m["cache"], m["tier"], m["upstream"])
            for m in matches
            if m is not None
        ]
    assert got == expected


# -- breaker gauges from the start ----------------------------------------------------------


async def test_breaker_gauge_of_a_healthy_upstream(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with (
            serve_origin(origin) as up,
            proxy_factory([files_route(up)], admin=ADMIN) as p,
            admin_for(p) as admin,
            client(admin) as adm,
        ):
            text = (await adm.get("/metrics")).text
    assert scrape(text, "proxychain_breaker_state") == dict(
        [sample("proxychain_breaker_state", 0, upstream=up)]
    )


def test_upstreams_known_starts_breaker_gauges_closed() -> None:
    observer = Observer(Metrics(), Clock())
    observer.upstreams_known(["http://a", "http://b"])
    text = observer.metrics.render()[0].decode()
    assert scrape(text, "proxychain_breaker_state") == dict(
        [
            sample("proxychain_breaker_state", 0, upstream="http://a"),
            sample("proxychain_breaker_state", 0, upstream="http://b"),
        ]
    )


# -- config/: the scrape example and the dashboard --------------------------------------------

CONFIG = Path(__file__).resolve().parent.parent / "config"
DASHBOARD_PANELS = {
    "Hit ratio per route",
    "Requests by cache outcome",
    "Upstream latency (p50, p95)",
    "Breaker state",
    "Cache tier usage (bytes)",
    "Stale served",
    "Coalesced waiters",
}
PROMQL_METRIC = re.compile(r"\b(proxychain_[a-z_]+)\b")


def exposed_sample_names() -> set[str]:
    """Every sample name a proxy exposes once each kind of event has happened."""
    metrics = Metrics(
        tier_source=lambda: {
            "memory": TierFigures(bytes=1, entries=1, evictions=0),
            "disk": TierFigures(bytes=1, entries=1, evictions=0),
        }
    )
    metrics.request_done("/r/", "GET", 200, "HIT", "memory", 10, 0.01)
    metrics.upstream_done("u", ErrorKind.CONNECT, 0.1)
    metrics.breaker_transition("u", "closed", "open")
    metrics.coalesced_waiter("/r/")
    metrics.revalidation("/r/", "not_modified")
    metrics.stale_served("/r/", "if_error")
    metrics.integrity_failure("/r/")
    text = metrics.render()[0].decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_grafana_dashboard_queries_exposed_metrics() -> None:
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert {panel["title"] for panel in panels} >= DASHBOARD_PANELS
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    assert all(target["refId"] for panel in panels for target in panel["targets"])
    used = {name for expr in exprs for name in PROMQL_METRIC.findall(expr)}
    assert used - exposed_sample_names() == set()
    assert len({panel["id"] for panel in panels}) == len(panels)


def test_prometheus_scrape_example_points_at_the_admin_plane() -> None:
    text = (CONFIG / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text
    assert f'- "{DEFAULT_ADMIN_LISTEN}"' in text
