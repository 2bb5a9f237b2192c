"""Metrics: exact figures after scripted calls, read back through the text exposition."""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxychain.errors import ConfigError, ErrorKind, UpstreamTimeout
from proxychain.metrics import (
    DURATION_BUCKETS_SECONDS,
    MULTIPROC_DIR_ENV,
    Metrics,
    TierFigures,
    multiprocess_enabled,
)

Labels = frozenset[tuple[str, str]]


def scrape(exposition: bytes) -> dict[tuple[str, Labels], float]:
    """Every sample of an exposition keyed by (name, labels), minus the ``_created`` noise."""
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def only(samples: Mapping[tuple[str, Labels], float], name: str) -> dict[Labels, float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def L(**labels: str) -> Labels:
    return frozenset(labels.items())


def test_render_returns_prometheus_text() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain; version=")
    assert b"# TYPE proxychain_requests_total counter" in body


def test_request_done_counts_by_every_label() -> None:
    m = Metrics()
    m.request_done("/go/", "GET", 200, "HIT", "memory", 100, 0.002)
    m.request_done("/go/", "GET", 200, "HIT", "memory", 50, 0.004)
    m.request_done("/go/", "GET", 304, "REVALIDATED", "disk", 0, 0.3)
    m.request_done("/pypi/", "HEAD", 404, "MISS", "none", 0, 0.02)
    m.request_done("/go/", "BREW", 502, "BYPASS", "none", 7, 70.0)
    s = scrape(m.render()[0])
    assert only(s, "proxychain_requests_total") == {
        L(route="/go/", method="GET", status="2xx", outcome="HIT", tier="memory"): 2.0,
        L(route="/go/", method="GET", status="3xx", outcome="REVALIDATED", tier="disk"): 1.0,
        L(route="/pypi/", method="HEAD", status="4xx", outcome="MISS", tier="none"): 1.0,
        L(route="/go/", method="OTHER", status="5xx", outcome="BYPASS", tier="none"): 1.0,
    }
    assert only(s, "proxychain_sent_bytes_total") == {
        L(route="/go/", tier="memory"): 150.0,
        L(route="/go/", tier="none"): 7.0,
    }
    assert only(s, "proxychain_request_duration_seconds_count") == {
        L(route="/go/", outcome="HIT"): 2.0,
        L(route="/go/", outcome="REVALIDATED"): 1.0,
        L(route="/pypi/", outcome="MISS"): 1.0,
        L(route="/go/", outcome="BYPASS"): 1.0,
    }
    assert s["proxychain_request_duration_seconds_sum", L(route="/go/", outcome="HIT")] == (
        pytest.approx(0.006)
    )
    hit_buckets = {
        dict(labels)["le"]: value
        for labels, value in only(s, "proxychain_request_duration_seconds_bucket").items()
        if dict(labels)["outcome"] == "HIT"
    }
    # 0.002 and 0.004 land in le=0.0025 and le=0.005; the buckets are cumulative.
    assert hit_buckets["0.001"] == 0.0
    assert hit_buckets["0.0025"] == 1.0
    assert hit_buckets["0.005"] == 2.0
    assert hit_buckets["+Inf"] == 2.0
    assert len(hit_buckets) == len(DURATION_BUCKETS_SECONDS) + 1
    # 70 s is beyond the last finite bucket.
    bypass = only(s, "proxychain_request_duration_seconds_bucket")
    assert bypass[L(route="/go/", outcome="BYPASS", le="60.0")] == 0.0
    assert bypass[L(route="/go/", outcome="BYPASS", le="+Inf")] == 1.0


def test_request_families_expose_what_prometheus_client_objects_would() -> None:
    # The request families are plain tallies behind a custom collector (single process); the
    # text must be the library's own Counter/Histogram text, line for line and in order.
    calls = [
        ("/go/", "GET", 200, "HIT", "memory", 100, 0.002),
        ("/go/", "GET", 200, "HIT", "memory", 0, 1e-7),
        ("/pypi/", "HEAD", 404, "MISS", "none", 0, 0.02),
        ("/go/", "GET", 304, "REVALIDATED", "disk", 0, 0.3),
        ("/go/", "BREW", 502, "BYPASS", "none", 7, 70.0),
        ("/go/", "GET", 200, "HIT", "disk", 3, 0.005),  # on a bucket bound
    ]
    m = Metrics()
    reference = CollectorRegistry()
    requests = Counter(
        "proxychain_requests",
        "Client requests by route, method, status class, cache outcome and tier.",
        ["route", "method", "status", "outcome", "tier"],
        registry=reference,
    )
    sent = Counter(
        "proxychain_sent_bytes",
        "Body bytes sent to clients.",
        ["route", "tier"],
        registry=reference,
    )
    duration = Histogram(
        "proxychain_request_duration_seconds",
        "Time from request head to last body byte.",
        ["route", "outcome"],
        buckets=DURATION_BUCKETS_SECONDS,
        registry=reference,
    )
    for route, method, status, outcome, tier, nbytes, seconds in calls:
        m.request_done(route, method, status, outcome, tier, nbytes, seconds)  # type: ignore[arg-type]
        method = method if method != "BREW" else "OTHER"
        requests.labels(route, method, f"{status // 100}xx", outcome, tier).inc()
        duration.labels(route, outcome).observe(seconds)
        if nbytes:
            sent.labels(route, tier).inc(nbytes)

    def lines(exposition: bytes) -> list[str]:
        families = ("proxychain_requests", "proxychain_sent_bytes", "proxychain_request_duration")
        return [
            line.rsplit(" ", 1)[0] if "_created{" in line else line  # creation times differ
            for line in exposition.decode().splitlines()
            if any(family in line for family in families)
        ]

    expected = lines(generate_latest(reference))
    # HELP and TYPE of 3 families and their _created; 5 + 3 counter series; 4 histograms.
    assert len(expected) == 3 * 4 + 5 * 2 + 3 * 2 + 4 * (len(DURATION_BUCKETS_SECONDS) + 4)
    assert lines(m.render()[0]) == expected


def test_upstream_done_statuses_and_error_kinds() -> None:
    m = Metrics()
    m.upstream_done("golang", 200, 0.1)
    m.upstream_done("golang", 404, 0.1)
    m.upstream_done("golang", ErrorKind.CONNECT, 0.0)
    m.upstream_done("mirror", UpstreamTimeout("slow", upstream="mirror"), 2.0)
    m.upstream_done("mirror", ErrorKind.TIMEOUT, 2.0)
    s = scrape(m.render()[0])
    assert only(s, "proxychain_upstream_requests_total") == {
        L(upstream="golang", result="2xx"): 1.0,
        L(upstream="golang", result="4xx"): 1.0,
        L(upstream="golang", result="error"): 1.0,
        L(upstream="mirror", result="error"): 2.0,
    }
    assert only(s, "proxychain_upstream_errors_total") == {
        L(upstream="golang", kind="connect"): 1.0,
        L(upstream="mirror", kind="timeout"): 2.0,
    }
    assert only(s, "proxychain_upstream_duration_seconds_count") == {
        L(upstream="golang"): 3.0,
        L(upstream="mirror"): 2.0,
    }
    assert only(s, "proxychain_upstream_duration_seconds_sum") == {
        L(upstream="golang"): pytest.approx(0.2),
        L(upstream="mirror"): 4.0,
    }


class _State(enum.Enum):
    CLOSED = "c"
    HALF_OPEN = "h"
    OPEN = "o"


@pytest.mark.parametrize(
    ("state", "value"),
    [
        ("closed", 0.0),
        ("half-open", 1.0),
        ("half_open", 1.0),
        ("HALF_OPEN", 1.0),
        ("open", 2.0),
        (_State.CLOSED, 0.0),
        (_State.HALF_OPEN, 1.0),
        (_State.OPEN, 2.0),
    ],
)
def test_breaker_state_gauge(state: str | enum.Enum, value: float) -> None:
    m = Metrics()
    m.breaker_state("golang", state)
    assert only(scrape(m.render()[0]), "proxychain_breaker_state") == {L(upstream="golang"): value}


def test_breaker_state_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="ajar"):
        Metrics().breaker_state("golang", "ajar")


def test_breaker_transitions_count_and_move_the_gauge() -> None:
    m = Metrics()
    m.breaker_transition("golang", "closed", "open")
    m.breaker_transition("golang", "open", "half-open")
    m.breaker_transition("golang", _State.HALF_OPEN, _State.OPEN)
    m.breaker_transition("golang", "open", "half_open")
    s = scrape(m.render()[0])
    assert only(s, "proxychain_breaker_transitions_total") == {
        L(upstream="golang", from_state="closed", to_state="open"): 1.0,
        L(upstream="golang", from_state="open", to_state="half_open"): 2.0,
        L(upstream="golang", from_state="half_open", to_state="open"): 1.0,
    }
    assert only(s, "proxychain_breaker_state") == {L(upstream="golang"): 1.0}


def test_cache_event_counters() -> None:
    m = Metrics()
    for _ in range(3):
        m.coalesced_waiter("/go/")
    m.revalidation("/go/", "not_modified")
    m.revalidation("/go/", "not_modified")
    m.revalidation("/go/", "failed")
    m.stale_served("/go/", "while_revalidate")
    m.stale_served("/npm/", "if_error")
    m.integrity_failure("/pypi/")
    s = scrape(m.render()[0])
    assert only(s, "proxychain_coalesced_waiters_total") == {L(route="/go/"): 3.0}
    assert only(s, "proxychain_revalidations_total") == {
        L(route="/go/", result="not_modified"): 2.0,
        L(route="/go/", result="failed"): 1.0,
    }
    assert only(s, "proxychain_stale_served_total") == {
        L(route="/go/", reason="while_revalidate"): 1.0,
        L(route="/npm/", reason="if_error"): 1.0,
    }
    assert only(s, "proxychain_integrity_failures_total") == {L(route="/pypi/"): 1.0}


def test_tier_figures_are_read_at_scrape_time() -> None:
    figures = {
        "memory": TierFigures(bytes=4096, entries=3, evictions=1),
        "disk": TierFigures(bytes=1 << 30, entries=900, evictions=0),
    }
    calls: list[int] = []

    def source() -> Mapping[str, TierFigures]:
        calls.append(1)
        return dict(figures)

    m = Metrics()
    assert only(scrape(m.render()[0]), "proxychain_cache_bytes") == {}  # no source yet
    m.set_tier_source(source)
    assert calls == []  # installing the source reads nothing
    s = scrape(m.render()[0])
    assert only(s, "proxychain_cache_bytes") == {L(tier="memory"): 4096.0, L(tier="disk"): 2**30}
    assert only(s, "proxychain_cache_entries") == {L(tier="memory"): 3.0, L(tier="disk"): 900.0}
    assert only(s, "proxychain_cache_evictions_total") == {
        L(tier="memory"): 1.0,
        L(tier="disk"): 0.0,
    }
    figures["memory"] = TierFigures(bytes=10, entries=1, evictions=5)
    s = scrape(m.render()[0])
    assert s["proxychain_cache_bytes", L(tier="memory")] == 10.0
    assert s["proxychain_cache_evictions_total", L(tier="memory")] == 5.0
    assert len(calls) == 2
    m.sample_tiers()  # single-process mode: a no-op, the collector reads at scrape time
    assert len(calls) == 2


def test_instances_do_not_share_figures() -> None:
    a, b = Metrics(tier_source=dict), Metrics(namespace="other")
    a.coalesced_waiter("/go/")
    assert only(scrape(a.render()[0]), "proxychain_coalesced_waiters_total") == {L(route="/go/"): 1}
    assert only(scrape(b.render()[0]), "other_coalesced_waiters_total") == {}
    assert b"proxychain_" not in b.render()[0]


def test_multiprocess_refused_when_environment_not_prepared() -> None:
    assert not multiprocess_enabled()
    with pytest.raises(ConfigError, match=MULTIPROC_DIR_ENV):
        Metrics(multiprocess=True)


_WORKER = textwrap.dedent(
    """
    import sys
    from proxychain.metrics import Metrics, TierFigures
    m = Metrics(
        multiprocess=True,
        tier_source=lambda: {"memory": TierFigures(bytes=int(sys.argv[1]), entries=1, evictions=2)},
    )
    for _ in range(int(sys.argv[1])):
        m.request_done("/go/", "GET", 200, "HIT", "memory", 10, 0.001)
    m.upstream_done("golang", 503, 0.5)
    m.breaker_state("golang", sys.argv[2])
    m.sample_tiers()
    if len(sys.argv) > 3:
        sys.stdout.buffer.write(m.render()[0])
    """
)


def test_multiprocess_mode_merges_workers(tmp_path: Path) -> None:
    env = {**os.environ, MULTIPROC_DIR_ENV: str(tmp_path)}
    cmd = [sys.executable, "-c", _WORKER]
    subprocess.run([*cmd, "3", "open"], env=env, check=True, timeout=60)
    out = subprocess.run(
        [*cmd, "4", "closed", "render"], env=env, check=True, timeout=60, capture_output=True
    ).stdout
    s = scrape(out)
    key = L(route="/go/", method="GET", status="2xx", outcome="HIT", tier="memory")
    assert only(s, "proxychain_requests_total") == {key: 7.0}
    assert only(s, "proxychain_sent_bytes_total") == {L(route="/go/", tier="memory"): 70.0}
    assert only(s, "proxychain_upstream_requests_total") == {L(upstream="golang", result="5xx"): 2}
    # Breaker gauge: the worst state any worker saw.
    assert only(s, "proxychain_breaker_state") == {L(upstream="golang"): 2.0}
    # Tier gauges: one sample per live worker; evictions summed.
    assert sorted(only(s, "proxychain_cache_bytes").values()) == [3.0, 4.0]
    assert only(s, "proxychain_cache_evictions_total") == {L(tier="memory"): 4.0}
