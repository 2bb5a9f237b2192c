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
request, so in single-process mode they are plain per-process tallies
(:mod:`proxychain.tallies`), rendered at scrape time with the same samples prometheus-client's
value objects would give. Cache-tier figures are owned by the store and read through a
callback (:mod:`proxychain.tiermetrics`), so they cost nothing between scrapes.

Multi-process mode (``--workers N``, :mod:`proxychain.mergedmetrics`): every worker builds
``Metrics(multiprocess=True)``, its figures go to prometheus-client's per-process files, and
``render`` shows all workers merged. Tier figures are per worker there (each has its own memory
tier), so each worker pushes them into live gauges with :meth:`Metrics.sample_tiers` on a timer
(and on every ``render``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .errors import ErrorKind, UpstreamError
from .mergedmetrics import (
    MULTIPROC_DIR_ENV,
    mark_worker_dead,
    merged_registry,
    multiprocess_enabled,
)
from .tallies import (
    DURATION_BUCKETS_SECONDS,
    DURATION_HELP,
    REQUESTS_HELP,
    SENT_BYTES_HELP,
    RequestTallies,
)
from .tiermetrics import TierCollector, TierFigures, TierGauges, TierSource

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

# Gauge encoding of a breaker's state; ordered by how bad it is so max() over upstreams works.
BREAKER_STATE_VALUES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}

# Methods kept as label values; anything else is "OTHER" so a client cannot blow up cardinality.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# ERROR: no cache outcome, the proxy answered with an error of its own (no route, 502, ...).
Outcome = Literal["HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "ERROR"]
Tier = Literal["memory", "disk", "none"]


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


def _breaker_state_name(state: str | enum.Enum) -> str:
    name = state.name if isinstance(state, enum.Enum) else state
    key = name.lower().replace("-", "_")
    if key not in BREAKER_STATE_VALUES:
        raise ValueError(f"unknown breaker state {state!r}")
    return key


class Metrics:
    """The proxy's metrics, in a private registry.

    Args:
        tier_source: called at scrape time for the cache-tier figures; may also be set later
            with :meth:`set_tier_source` (the store is usually built after the metrics).
        multiprocess: merge all workers' figures via prometheus-client's multi-process mode
            (:mod:`proxychain.mergedmetrics`). Requires ``PROMETHEUS_MULTIPROC_DIR`` to have been
            set before ``prometheus_client`` was imported.
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
        # Labelled children of the request families, by (route, method, class, outcome, tier).
        self._request_children: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}
        self._sent_children: dict[tuple[str, str], Counter] = {}
        self._tallies: RequestTallies | None = None  # single-process mode (see _build)
        # Metric objects always live in a private registry so duplicate names are still caught;
        # what /metrics exposes is `_scrape`, which in multi-process mode reads the mmap files.
        self._registry = CollectorRegistry(auto_describe=True)
        if multiprocess:
            self._scrape = merged_registry()
        else:
            self._scrape = self._registry
            self._registry.register(TierCollector(namespace, self._tier_figures))
        self._build(namespace)

    def _build(self, ns: str) -> None:
        reg = self._registry
        if self.multiprocess:
            # The merged view is read from the value objects' files: they must be used.
            self._requests = Counter(
                f"{ns}_requests",
                REQUESTS_HELP,
                ["route", "method", "status", "outcome", "tier"],
                registry=reg,
            )
            self._bytes_sent = Counter(
                f"{ns}_sent_bytes", SENT_BYTES_HELP, ["route", "tier"], registry=reg
            )
            self._duration = Histogram(
                f"{ns}_request_duration_seconds",
                DURATION_HELP,
                ["route", "outcome"],
                buckets=DURATION_BUCKETS_SECONDS,
                registry=reg,
            )
        else:
            self._tallies = RequestTallies(ns)
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
            self._tier_gauges = TierGauges(ns, reg)

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
        if self.multiprocess:
            self._tier_gauges.sample(self._tier_figures())

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for ``GET /metrics``."""
        self.sample_tiers()
        return generate_latest(self._scrape), CONTENT_TYPE_LATEST
