"""The request families (requests, sent bytes, request duration) as plain per-process tallies.

These families are updated once per client request, the hottest path metrics have. In
single-process mode :class:`RequestTallies` keeps them as a few dict and float updates instead
of prometheus-client's locked value objects, and renders them at scrape time, as a custom
collector, with exactly the samples a ``Counter``/``Histogram`` would give: same names, labels,
order and ``_created`` series. Multi-process mode cannot use them (the merged view is read from
the value objects' files), so :class:`~proxychain.metrics.Metrics` builds real objects there
from the same names, help texts and buckets, defined here once.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import metrics as prom_metrics
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

__all__ = [
    "DURATION_BUCKETS_SECONDS",
    "DURATION_HELP",
    "REQUESTS_HELP",
    "SENT_BYTES_HELP",
    "RequestTallies",
]

# From a 1 ms memory hit to a minute-long cold .zip fill through a slow upstream (the upstream
# exchange histogram of :class:`~proxychain.metrics.Metrics` uses them too).
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

REQUESTS_HELP = "Client requests by route, method, status class, cache outcome and tier."
SENT_BYTES_HELP = "Body bytes sent to clients."
DURATION_HELP = "Time from request head to last body byte."


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


class RequestTallies:
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
            Metric(f"{ns}_requests", REQUESTS_HELP, "counter"),
            Metric(f"{ns}_sent_bytes", SENT_BYTES_HELP, "counter"),
            Metric(f"{ns}_request_duration_seconds", DURATION_HELP, "histogram"),
        )


def _add_counter(family: Metric, labels: dict[str, str], series: _Tally) -> None:
    family.add_sample(f"{family.name}_total", labels, series.value)
    if _use_created():
        family.add_sample(f"{family.name}_created", labels, series.created)


def _use_created() -> bool:
    """Whether prometheus-client exposes ``_created`` series (``disable_created_metrics``)."""
    return bool(getattr(prom_metrics, "_use_created", True))
