"""What the proxy reports about itself: metrics, per-route counters, recent errors.

The data plane calls :class:`Observer` at the few points where something countable happens
(a request finished, an upstream answered, a breaker changed state, a waiter joined a fill, a
background revalidation ended, a stale response was served). The observer feeds the Prometheus
metrics and keeps the small in-memory figures the admin plane's ``/admin/stats`` and status page
show (per-route hit ratio, recent errors, a hit-ratio history).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .breaker import StateChange
from .clock import Clock
from .errors import ErrorKind
from .metrics import Metrics, Outcome, Tier

__all__ = ["Observer", "RouteFigures"]

log = logging.getLogger("proxychain.events")

RECENT_ERRORS = 50  # kept for the status page
HISTORY_POINTS = 120  # hit-ratio samples kept (one per HISTORY_INTERVAL)
HISTORY_INTERVAL = 10.0  # seconds between hit-ratio samples
_HIT_OUTCOMES = frozenset({"HIT", "STALE", "REVALIDATED"})
# The exchange's free-form outcome and tier, as metric labels; "-" (nothing decided, e.g. a
# request that never reached the cache) counts as BYPASS, a tier of "-" as "none".
_OUTCOME_LABELS: dict[str, Outcome] = {
    o: o for o in ("HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "ERROR")
}
_TIER_LABELS: dict[str, Tier] = {"memory": "memory", "disk": "disk"}


@dataclass(slots=True)
class RouteFigures:
    """Counters of one route since start."""

    requests: int = 0
    hits: int = 0
    bytes_sent: int = 0
    errors: int = 0
    stale: int = 0
    coalesced: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class Observer:
    """Counts what happens in the proxy, for metrics, logs and the admin plane."""

    def __init__(self, metrics: Metrics, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self.routes: dict[str, RouteFigures] = collections.defaultdict(RouteFigures)
        self.recent_errors: collections.deque[dict[str, object]] = collections.deque(
            maxlen=RECENT_ERRORS
        )
        self.history: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=HISTORY_POINTS
        )
        self._window_requests = 0
        self._window_hits = 0
        self._window_started: float | None = None

    def request_done(
        self,
        route: str,
        method: str,
        status: int,
        outcome: str,
        tier: str,
        bytes_sent: int,
        duration: float,
        detail: str = "",
    ) -> None:
        """One client request finished (``status`` 0 when no response was started)."""
        figures = self.routes[route]
        figures.requests += 1
        figures.bytes_sent += bytes_sent
        hit = outcome in _HIT_OUTCOMES
        if hit:
            figures.hits += 1
        if status >= 500 or outcome == "ERROR":
            figures.errors += 1
            if detail:
                self.error(route, f"{status} {detail}")
        self.metrics.request_done(
            route,
            method,
            status,
            _OUTCOME_LABELS.get(outcome, "BYPASS"),
            _TIER_LABELS.get(tier, "none"),
            bytes_sent,
            duration,
        )
        self._sample(hit)

    def upstream_done(self, upstream: str, outcome: int | ErrorKind, duration: float) -> None:
        """One upstream exchange ended with a status, or failed."""
        self.metrics.upstream_done(upstream, outcome, duration)

    def upstreams_known(self, upstreams: Iterable[str]) -> None:
        """Start the breaker gauges of ``upstreams`` at closed, so a healthy upstream is a
        series from the first scrape (not only after its first state change)."""
        for upstream in upstreams:
            self.metrics.breaker_state(upstream, "closed")

    def breaker_change(self, upstream: str, change: StateChange) -> None:
        """A breaker changed state."""
        self.metrics.breaker_transition(upstream, change.old, change.new)
        self.metrics.breaker_state(upstream, change.new)
        if change.new.name == "OPEN":
            self.error("-", f"circuit opened for {upstream}")

    def coalesced(self, route: str) -> None:
        """A request joined another request's fill instead of fetching."""
        self.routes[route].coalesced += 1
        self.metrics.coalesced_waiter(route)

    def revalidation(self, route: str, result: str) -> None:
        """A background revalidation ended: ``not_modified``, ``replaced`` or ``failed``."""
        self.metrics.revalidation(route, result)

    def stale_served(self, route: str, reason: str) -> None:
        """A stale response was served: ``while_revalidate`` or ``if_error``."""
        self.routes[route].stale += 1
        self.metrics.stale_served(route, reason)

    def integrity_failure(self, route: str, detail: str) -> None:
        """A body did not match the digest its protocol promised."""
        self.metrics.integrity_failure(route)
        self.error(route, f"integrity check failed: {detail}")

    def error(self, route: str, message: str) -> None:
        """Remember an error for the status page."""
        self.recent_errors.append({"at": self.clock.wall(), "route": route, "message": message})

    def _sample(self, hit: bool) -> None:
        now = self.clock.monotonic()
        if self._window_started is None:
            self._window_started = now
        self._window_requests += 1
        self._window_hits += int(hit)
        if now - self._window_started >= HISTORY_INTERVAL:
            ratio = self._window_hits / self._window_requests
            self.history.append((self.clock.wall(), ratio))
            self._window_started = now
            self._window_requests = self._window_hits = 0
