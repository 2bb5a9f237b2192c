"""The proxy's state as the admin plane shows it: ``/admin/stats``, ``/readyz``, tier gauges.

The JSON shape of :func:`build_stats` is the one ``admin.py`` documents and the status page
reads; times are wall-clock seconds since the epoch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .breaker import BreakerState
from .metrics import TierFigures
from .settings import CacheSettings
from .store import Store

if TYPE_CHECKING:
    from .proxy import Proxy

__all__ = ["build_stats", "readiness", "tier_figures"]


def tier_figures(store: Store, cache: CacheSettings) -> dict[str, TierFigures]:
    """Bytes, entries and evictions of both tiers, for the tier gauges."""
    stats = store.statistics()
    return {
        "memory": TierFigures(
            bytes=stats.memory.bytes,
            entries=stats.memory.entries,
            evictions=stats.memory.evictions,
        ),
        "disk": TierFigures(
            bytes=stats.disk.bytes, entries=stats.disk.entries, evictions=stats.disk.evictions
        ),
    }


def build_stats(proxy: Proxy) -> dict[str, object]:
    """The ``/admin/stats`` document."""
    observer = proxy.observer
    clock = proxy.clock
    now_wall = clock.wall()
    now_mono = clock.monotonic()
    routes = []
    upstreams = []
    for route in proxy.routes:
        prefix = route.settings.prefix
        figures = observer.routes[prefix]
        routes.append(
            {
                "name": prefix,
                "kind": route.settings.kind,
                "requests": figures.requests,
                "hits": figures.hits,
                "hit_ratio": round(figures.hit_ratio, 4),
                "bytes_sent": figures.bytes_sent,
                "stale": figures.stale,
                "coalesced": figures.coalesced,
                "errors": figures.errors,
            }
        )
        for url, breaker in route.breakers.items():
            s = breaker.statistics()
            upstreams.append(
                {
                    "name": url,
                    "route": prefix,
                    # closed, half_open, open: the spelling of the page and the metrics.
                    "state": s.state.name.lower(),
                    "failures": s.consecutive_failures,
                    "requests": s.requests,
                    "next_probe_at": (
                        now_wall + (s.next_probe_at - now_mono)
                        if s.next_probe_at is not None and s.state is not BreakerState.CLOSED
                        else None
                    ),
                }
            )
    store = proxy.store.statistics()
    cache = proxy.settings.cache
    return {
        "generated_at": now_wall,
        "node": proxy.node_name,
        "routes": routes,
        "upstreams": upstreams,
        "tiers": [
            {
                "name": "memory",
                "bytes": store.memory.bytes,
                "entries": store.memory.entries,
                "budget": cache.memory_max,
            },
            {
                "name": "disk",
                "bytes": store.disk.bytes,
                "entries": store.disk.entries,
                "budget": cache.disk_max,
            },
        ],
        "recent_errors": list(observer.recent_errors),
        "hit_ratio_history": [list(point) for point in observer.history],
    }


def readiness(proxy: Proxy) -> tuple[bool, list[str]]:
    """Ready when the data plane is listening, the disk tier is writable and every route can
    reach an upstream.

    A route whose every breaker is open is still ready if it can serve stale copies
    (``max_stale`` or the mirror kinds' default), because that is what it is for.
    """
    reasons = []
    if not proxy.listening:
        reasons.append("the data-plane listener is not accepting connections")
    cache_dir = proxy.settings.cache.dir
    if not os.access(cache_dir, os.W_OK):
        reasons.append(f"cache directory {cache_dir} is not writable")
    now = proxy.clock.monotonic()
    for route in proxy.routes:
        if not route.breakers:
            continue
        states = [b.statistics() for b in route.breakers.values()]
        all_open = all(
            s.state is BreakerState.OPEN and (s.next_probe_at or 0) > now for s in states
        )
        serves_stale = route.settings.max_stale != 0 and (
            route.settings.max_stale is not None or route.settings.kind != "http"
        )
        if all_open and not serves_stale:
            reasons.append(f"route {route.settings.prefix}: every upstream's breaker is open")
    return not reasons, reasons
