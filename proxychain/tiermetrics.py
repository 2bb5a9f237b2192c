"""Cache-tier figures (bytes, entries, evictions per tier) as metrics, read from the store.

The figures are owned by the store, not by the metrics: a :data:`TierSource` callback returns
the current numbers. In single-process mode :class:`TierCollector` calls it at scrape time, so
the figures are exact when read and cost nothing between scrapes. In multi-process mode the
figures are per worker (each has its own memory tier) and the merged view is read from
prometheus-client's files, so each worker pushes them into :class:`TierGauges` on a timer;
those gauges carry a ``pid`` label (prometheus-client's "liveall" mode: sum the memory tier
over ``pid``, take the max for the shared disk tier).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["TierCollector", "TierFigures", "TierGauges", "TierSource"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TierFigures:
    """The current size of one cache tier, as reported by the store."""

    bytes: int
    entries: int
    evictions: int  # cumulative since the tier was opened


TierSource = Callable[[], Mapping[str, TierFigures]]
"""Returns the current figures keyed by tier name ("memory", "disk")."""


class TierCollector:
    """Asks for the tier figures at scrape time (single-process mode).

    Args:
        namespace: prefix of the metric names.
        figures: the current figures; called on every scrape.
    """

    def __init__(self, namespace: str, figures: TierSource) -> None:
        self._namespace = namespace
        self._figures = figures

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._figures())

    def _families(self, figures: Mapping[str, TierFigures]) -> Iterator[Metric]:
        ns = self._namespace
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


class TierGauges:
    """This worker's tier figures in live gauges (multi-process mode), updated by :meth:`sample`.

    Args:
        namespace: prefix of the metric names.
        registry: where the gauges are registered.
    """

    def __init__(self, namespace: str, registry: CollectorRegistry) -> None:
        ns = namespace
        self._evictions_seen: dict[str, int] = {}
        self._bytes = Gauge(
            f"{ns}_cache_bytes",
            "Bytes held by a cache tier.",
            ["tier"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._entries = Gauge(
            f"{ns}_cache_entries",
            "Entries held by a cache tier.",
            ["tier"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._evictions = Counter(
            f"{ns}_cache_evictions",
            "Entries evicted from a cache tier.",
            ["tier"],
            registry=registry,
        )

    def sample(self, figures: Mapping[str, TierFigures]) -> None:
        """Set the gauges to ``figures`` and add the evictions since the previous sample."""
        for tier, fig in figures.items():
            self._bytes.labels(tier).set(fig.bytes)
            self._entries.labels(tier).set(fig.entries)
            # A counter can only grow: add what was evicted since the previous sample.
            delta = fig.evictions - self._evictions_seen.get(tier, 0)
            if delta > 0:
                self._evictions.labels(tier).inc(delta)
            self._evictions_seen[tier] = max(fig.evictions, self._evictions_seen.get(tier, 0))
