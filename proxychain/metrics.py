"""Prometheus metrics for the proxy, behind methods that speak the proxy's vocabulary.

Theory of operation. :class:`Metrics` owns its own ``prometheus_client.CollectorRegistry``;
nothing is registered in the library's global default registry, so several proxies (or many
tests) in one process never collide on metric names. Callers only see plain methods
(``request_done``, ``upstream_done``, ``breaker_state``, ...) taking strings and numbers; no
prometheus type leaks out, so the data plane does not depend on the exposition library.

Label values are kept low-cardinality on purpose: status codes are folded into classes
("2xx", RFC 9110 §15), unknown request methods into "OTHER", and routes and upstreams are the
configured names, never request paths.

The request families (requests, sent bytes, request duration) are updated once per client
request, so in single-process mode they are plain per-process tallies (:class:`_RequestTallies`,
a few dict and float updates instead of prometheus-client's locked value objects), rendered by
a custom collector at scrape time with the same samples those objects would give.

Cache-tier figures (bytes, entries, evictions per tier) are owned by the store, not by the
metrics: a ``tier_source`` callback returns the current numbers and is called at scrape time
by a custom collector, so the figures are exact when read and cost nothing between scrapes.

Multi-process mode (``--workers N``). prometheus-client keeps per-process values in mmap files
when the environment variable ``PROMETHEUS_MULTIPROC_DIR`` names an empty, writable directory
*before* ``prometheus_client`` is first imported (it picks its value class at import time).
The supervisor therefore sets that variable (and wipes the directory) before starting the
workers, every worker builds ``Metrics(multiprocess=True)``, and whichever process serves
``/metrics`` renders a ``MultiProcessCollector`` view that merges all workers: counters and
histograms are summed. Tier figures are per worker there (each has its own memory tier), so
each worker pushes them into gauges with :meth:`Metrics.sample_tiers` on a timer (and on every
``render``); those gauges carry a ``pid`` label (prometheus-client's "liveall" mode: sum the
memory tier over ``pid``, take the max for the shared disk tier). When a worker exits, the
supervisor calls :func:`mark_worker_dead` so its live gauges disappear.
"""

from __future__ import annotations

import bisect
import enum
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client import metrics as prom_metrics
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .errors import ConfigError, ErrorKind, UpstreamError

__all__ = [
    "BREAKER_STATE_VALUES",
    "DURATION_BUCKETS_SECONDS",
    "MULTIPROC_DIR_ENV",
    "Metrics",
    "Outcome",
    "Tier",
    "TierFigures",
    "TierSource",
    "mark_worker_dead",
    "multiprocess_enabled",
]

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# From a 1 ms memory hit to a minute-long cold .zip fill through a slow upstream.
DURATION_BUCKETS_SECONDS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_REQUESTS_HELP = "Client requests by route, method, status class, cache outcome and tier."
_SENT_BYTES_HELP = "Body bytes sent to clients."
_DURATION_HELP = "Time from request head to last body byte."

# Gauge encoding of a breaker's state; ordered by how bad it is so max() over upstreams works.
BREAKER_STATE_VALUES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}

# Methods kept as label values; anything else is "OTHER" so a client cannot blow up cardinality.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# ERROR: no cache outcome, the proxy answered with an error of its own (no route, 502, ...).
Outcome = Literal["HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "ERROR"]
Tier = Literal["memory", "disk", "none"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TierFigures:
    """The current size of one cache tier, as reported by the store."""

    bytes: int
    entries: int
    evictions: int  # cumulative since the tier was opened


TierSource = Callable[[], Mapping[str, TierFigures]]
"""Returns the current figures keyed by tier name ("memory", "disk")."""


def multiprocess_enabled() -> bool:
    """Whether prometheus-client was imported with ``PROMETHEUS_MULTIPROC_DIR`` set."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def mark_worker_dead(pid: int) -> None:
    """Drop the live gauges of an exited worker (call from the supervisor)."""
    prom_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


def _breaker_state_name(state: str | enum.Enum) -> str:
    name = state.name if isinstance(state, enum.Enum) else state
    key = name.lower().replace("-", "_")
    if key not in BREAKER_STATE_VALUES:
        raise ValueError(f"unknown breaker state {state!r}")
    return key


class _TierCollector:
    """Asks the tier source for figures at scrape time (single-process mode)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._metrics._tier_figures())

    def _families(self, figures: Mapping[str, TierFigures]) -> Iterator[Metric]:
        ns = self._metrics.namespace
        size = GaugeMetricFamily(
            f"{ns}_cache_bytes", "Bytes held by a cache tier.", labels=["tier"]
        )
        entries = GaugeMetricFamily(
            f"{ns}_cache_entries", "Entries held by a cache tier.", labels=["tier"]
        )
        evictions = CounterMetricFamily(
            f"{ns}_cache_evictions", "Entries evicted from a cache tier.", labels=["tier"]
        )
        for tier, fig in sorted(figures.items()):
            size.add_metric([tier], fig.bytes)
            entries.add_metric([tier], fig.entries)
            evictions.add_metric([tier], fig.evictions)
        yield from (size, entries, evictions)


@dataclass(slots=True)
class _Tally:
    """One labelled counter series: its value and its creation time (the ``_created`` sample)."""

    value: float = 0.0
    created: float = field(default_factory=time.time)


@dataclass(slots=True)
class _DurationTally:
    """One labelled histogram series: observations per bucket (not cumulative), their sum."""

    buckets: list[float]
    sum: float = 0.0
    created: float = field(default_factory=time.time)


class _RequestTallies:
    """The request families as plain per-process tallies, exposed at scrape time.

    Only the data plane's thread updates them (no lock). ``collect`` yields the samples
    prometheus-client's ``Counter``/``Histogram`` would (same names, labels, order and
    ``_created`` series), so the exposition does not change.
    """

    def __init__(self, ns: str) -> None:
        self._ns = ns
        self._bounds = [*DURATION_BUCKETS_SECONDS, float("inf")]
        self._bound_names = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        # Keyed like the families' labels; insertion order is the order series are exposed.
        self.requests: dict[tuple[str, str, str, str, str], _Tally] = {}
        self.sent: dict[tuple[str, str], _Tally] = {}
        self.durations: dict[tuple[str, str], _DurationTally] = {}

    def add(self, labels: tuple[str, str, str, str, str], bytes_sent: int, duration: float) -> None:
        """Count one request; ``labels`` as in ``{ns}_requests``."""
        series = self.requests.get(labels)
        if series is None:
            series = self.requests[labels] = _Tally()
        series.value += 1
        route, _, _, outcome, tier = labels
        timing = self.durations.get((route, outcome))
        if timing is None:
            timing = self.durations[route, outcome] = _DurationTally([0.0] * len(self._bounds))
        timing.sum += duration
        timing.buckets[bisect.bisect_left(self._bounds, duration)] += 1
        if bytes_sent:
            sent = self.sent.get((route, tier))
            if sent is None:  # created on first use: no zero series for tiers never sent
                sent = self.sent[route, tier] = _Tally()
            sent.value += bytes_sent

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, sent, durations = self._families()
        names = ("route", "method", "status", "outcome", "tier")
        for labels, series in list(self.requests.items()):
            _add_counter(requests, dict(zip(names, labels, strict=True)), series)
        for (route, tier), series in list(self.sent.items()):
            _add_counter(sent, {"route": route, "tier": tier}, series)
        name = durations.name
        for (route, outcome), timing in list(self.durations.items()):
            keyed = {"route": route, "outcome": outcome}
            total = 0.0
            for le, count in zip(self._bound_names, timing.buckets, strict=True):
                total += count
                durations.add_sample(f"{name}_bucket", {**keyed, "le": le}, total)
            durations.add_sample(f"{name}_count", keyed, total)
            durations.add_sample(f"{name}_sum", keyed, timing.sum)
            if _use_created():
                durations.add_sample(f"{name}_created", keyed, timing.created)
        yield from (requests, sent, durations)

    def _families(self) -> tuple[Metric, Metric, Metric]:
        ns = self._ns
        return (
            Metric(f"{ns}_requests", _REQUESTS_HELP, "counter"),
            Metric(f"{ns}_sent_bytes", _SENT_BYTES_HELP, "counter"),
            Metric(f"{ns}_request_duration_seconds", _DURATION_HELP, "histogram"),
        )


def _add_counter(family: Metric, labels: dict[str, str], series: _Tally) -> None:
    family.add_sample(f"{family.name}_total", labels, series.value)
    if _use_created():
        family.add_sample(f"{family.name}_created", labels, series.created)


def _use_created() -> bool:
    """Whether prometheus-client exposes ``_created`` series (``disable_created_metrics``)."""
    return bool(getattr(prom_metrics, "_use_created", True))


class Metrics:
    """The proxy's metrics, in a private registry.

    Args:
        tier_source: called at scrape time for the cache-tier figures; may also be set later
            with :meth:`set_tier_source` (the store is usually built after the metrics).
        multiprocess: merge all workers' figures via prometheus-client's multi-process mode
            (see the module docstring). Requires ``PROMETHEUS_MULTIPROC_DIR`` to have been set
            before ``prometheus_client`` was imported.
        namespace: prefix of every metric name.

    Raises:
        ConfigError: ``multiprocess`` is requested but the environment is not prepared for it.
    """

    def __init__(
        self,
        *,
        tier_source: TierSource | None = None,
        multiprocess: bool = False,
        namespace: str = "proxychain",
    ) -> None:
        self.namespace = namespace
        self.multiprocess = multiprocess
        self._tier_source = tier_source
        self._evictions_seen: dict[str, int] = {}
        # Labelled children of the request families, by (route, method, class, outcome, tier).
        self._request_children: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}
        self._sent_children: dict[tuple[str, str], Counter] = {}
        self._tallies: _RequestTallies | None = None  # single-process mode (see _build)
        # Metric objects always live in a private registry so duplicate names are still caught;
        # what /metrics exposes is `_scrape`, which in multi-process mode reads the mmap files.
        self._registry = CollectorRegistry(auto_describe=True)
        if multiprocess:
            path = os.environ.get(MULTIPROC_DIR_ENV, "")
            if not multiprocess_enabled() or not os.path.isdir(path):
                raise ConfigError(
                    f"set {MULTIPROC_DIR_ENV} to an empty directory before starting the workers",
                    key="workers",
                )
            self._scrape = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(self._scrape, path=path)  # type: ignore[no-untyped-call]
        else:
            self._scrape = self._registry
            self._registry.register(_TierCollector(self))
        self._build(namespace)

    def _build(self, ns: str) -> None:
        reg = self._registry
        if self.multiprocess:
            # The merged view is read from the value objects' files: they must be used.
            self._requests = Counter(
                f"{ns}_requests",
                _REQUESTS_HELP,
                ["route", "method", "status", "outcome", "tier"],
                registry=reg,
            )
            self._bytes_sent = Counter(
                f"{ns}_sent_bytes", _SENT_BYTES_HELP, ["route", "tier"], registry=reg
            )
            self._duration = Histogram(
                f"{ns}_request_duration_seconds",
                _DURATION_HELP,
                ["route", "outcome"],
                buckets=DURATION_BUCKETS_SECONDS,
                registry=reg,
            )
        else:
            self._tallies = _RequestTallies(ns)
            reg.register(self._tallies)
        self._upstream_requests = Counter(
            f"{ns}_upstream_requests",
            "Upstream exchanges by result (status class or 'error').",
            ["upstream", "result"],
            registry=reg,
        )
        self._upstream_errors = Counter(
            f"{ns}_upstream_errors",
            "Upstream failures by kind.",
            ["upstream", "kind"],
            registry=reg,
        )
        self._upstream_duration = Histogram(
            f"{ns}_upstream_duration_seconds",
            "Upstream exchange time, successful or not.",
            ["upstream"],
            buckets=DURATION_BUCKETS_SECONDS,
            registry=reg,
        )
        self._breaker_state = Gauge(
            f"{ns}_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=reg,
            multiprocess_mode="max",
        )
        self._breaker_transitions = Counter(
            f"{ns}_breaker_transitions",
            "Circuit breaker state changes.",
            ["upstream", "from_state", "to_state"],
            registry=reg,
        )
        self._coalesced = Counter(
            f"{ns}_coalesced_waiters",
            "Requests that waited on another request's fill instead of fetching.",
            ["route"],
            registry=reg,
        )
        self._revalidations = Counter(
            f"{ns}_revalidations",
            "Conditional revalidations by result.",
            ["route", "result"],
            registry=reg,
        )
        self._stale = Counter(
            f"{ns}_stale_served",
            "Stale responses served, by reason.",
            ["route", "reason"],
            registry=reg,
        )
        self._integrity = Counter(
            f"{ns}_integrity_failures",
            "Stored or fetched bodies that failed an integrity check.",
            ["route"],
            registry=reg,
        )
        if self.multiprocess:
            self._tier_bytes = Gauge(
                f"{ns}_cache_bytes",
                "Bytes held by a cache tier.",
                ["tier"],
                registry=reg,
                multiprocess_mode="liveall",
            )
            self._tier_entries = Gauge(
                f"{ns}_cache_entries",
                "Entries held by a cache tier.",
                ["tier"],
                registry=reg,
                multiprocess_mode="liveall",
            )
            self._tier_evictions = Counter(
                f"{ns}_cache_evictions",
                "Entries evicted from a cache tier.",
                ["tier"],
                registry=reg,
            )

    # -- data plane ----------------------------------------------------------------------------

    def request_done(
        self,
        route: str,
        method: str,
        status: int,
        outcome: Outcome,
        tier: Tier,
        bytes_sent: int,
        duration: float,
    ) -> None:
        """Record one finished client request.

        Args:
            route: the configured route name that served it.
            method: the request method; unusual ones are counted as "OTHER".
            status: the response status code; counted by class ("2xx", ...).
            outcome: the cache outcome.
            tier: where the body came from ("none" when it came from upstream or nowhere).
            bytes_sent: body bytes written to the client.
            duration: seconds from request head to the end of the response.
        """
        method = method if method in _KNOWN_METHODS else "OTHER"
        labels = (route, method, _status_class(status), outcome, tier)
        if self._tallies is not None:
            self._tallies.add(labels, bytes_sent, duration)
            return
        children = self._request_children.get(labels)
        if children is None:
            # ``labels()`` validates and locks on every call; the children never change.
            children = self._request_children[labels] = (
                self._requests.labels(*labels),
                self._duration.labels(route, outcome),
            )
        children[0].inc()
        children[1].observe(duration)
        if bytes_sent:
            sent = self._sent_children.get((route, tier))
            if sent is None:  # created on first use: no zero series for tiers never sent
                sent = self._sent_children[route, tier] = self._bytes_sent.labels(route, tier)
            sent.inc(bytes_sent)

    def upstream_done(
        self, upstream: str, status_or_error: int | ErrorKind | UpstreamError, duration: float
    ) -> None:
        """Record one upstream exchange: a response status, or the kind of failure."""
        if isinstance(status_or_error, int):
            result = _status_class(status_or_error)
        else:
            kind = (
                status_or_error.kind
                if isinstance(status_or_error, UpstreamError)
                else status_or_error
            )
            result = "error"
            self._upstream_errors.labels(upstream, kind.value).inc()
        self._upstream_requests.labels(upstream, result).inc()
        self._upstream_duration.labels(upstream).observe(duration)

    def breaker_state(self, upstream: str, state: str | enum.Enum) -> None:
        """Set an upstream's breaker gauge ("closed", "half-open"/"half_open", "open" or enum)."""
        self._breaker_state.labels(upstream).set(BREAKER_STATE_VALUES[_breaker_state_name(state)])

    def breaker_transition(
        self, upstream: str, from_state: str | enum.Enum, to_state: str | enum.Enum
    ) -> None:
        """Count a breaker transition and move the state gauge with it."""
        old, new = _breaker_state_name(from_state), _breaker_state_name(to_state)
        self._breaker_transitions.labels(upstream, old, new).inc()
        self._breaker_state.labels(upstream).set(BREAKER_STATE_VALUES[new])

    def coalesced_waiter(self, route: str) -> None:
        """Count a request that joined another request's in-flight fill."""
        self._coalesced.labels(route).inc()

    def revalidation(self, route: str, result: str) -> None:
        """Count a revalidation; ``result`` is e.g. "not_modified", "replaced" or "failed"."""
        self._revalidations.labels(route, result).inc()

    def stale_served(self, route: str, reason: str) -> None:
        """Count a stale response; ``reason`` is e.g. "while_revalidate" or "if_error"."""
        self._stale.labels(route, reason).inc()

    def integrity_failure(self, route: str) -> None:
        """Count a body that failed its integrity check (and so was not served)."""
        self._integrity.labels(route).inc()

    # -- tiers and exposition -------------------------------------------------------------------

    def set_tier_source(self, tier_source: TierSource | None) -> None:
        """Install (or remove) the callback that reports cache-tier figures."""
        self._tier_source = tier_source

    def _tier_figures(self) -> Mapping[str, TierFigures]:
        return {} if self._tier_source is None else self._tier_source()

    def sample_tiers(self) -> None:
        """Push this worker's tier figures into the shared gauges (multi-process mode only).

        In single-process mode the figures are read at scrape time and this does nothing.
        """
        if not self.multiprocess:
            return
        for tier, fig in self._tier_figures().items():
            self._tier_bytes.labels(tier).set(fig.bytes)
            self._tier_entries.labels(tier).set(fig.entries)
            # A counter can only grow: add what was evicted since the previous sample.
            delta = fig.evictions - self._evictions_seen.get(tier, 0)
            if delta > 0:
                self._tier_evictions.labels(tier).inc(delta)
            self._evictions_seen[tier] = max(fig.evictions, self._evictions_seen.get(tier, 0))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for ``GET /metrics``."""
        self.sample_tiers()
        return generate_latest(self._scrape), CONTENT_TYPE_LATEST
