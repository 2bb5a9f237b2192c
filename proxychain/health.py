"""Active health checks: one task per upstream probing ``health_path`` on trio's clock.

A probe is a plain GET whose outcome feeds the upstream's breaker, so a recovered upstream is
noticed without risking a client's request on it. While the breaker is CLOSED the probe runs
every ``health_interval``; while it is OPEN the probe runs at the breaker's next probe time or
after ``health_interval``, whichever comes first, and takes the half-open trial itself
(``Breaker.allow(probe=True)``), so a long outage's growing open intervals do not delay the
return of a recovered upstream beyond one probe interval. On such a route the trial is the
probe's alone: client requests ask with ``trial=False`` and are refused until a probe closes
the breaker, which spares a sick upstream real requests (the probe is cheap and has no client
waiting on it).
"""

from __future__ import annotations

import logging

import trio

from .breaker import BreakerState
from .clock import Clock
from .errors import UpstreamError
from .fetch import Route, log_state_change, probe_due_change
from .http import Headers, Request
from .upstream import UpstreamPool

__all__ = ["run_health_checks"]

log = logging.getLogger("proxychain.health")


async def run_health_checks(route: Route, clock: Clock, node_name: str) -> None:
    """Probe every upstream of ``route`` forever (cancel to stop); no-op without a health path."""
    if not route.settings.health_path:
        return
    async with trio.open_nursery() as nursery:
        for url in route.pools:
            nursery.start_soon(_probe_loop, route, url, clock, node_name)


async def _probe_loop(route: Route, url: str, clock: Clock, node_name: str) -> None:
    pool = route.pools[url]
    breaker = route.breakers[url]
    interval = route.settings.health_interval
    request = Request(
        method="GET",
        target=route.settings.health_path,
        headers=Headers([("via", f"1.1 {node_name}"), ("user-agent", "proxychain-health")]),
    )
    while True:
        stats = breaker.statistics()
        now = clock.monotonic()
        if stats.state is BreakerState.OPEN and stats.next_probe_at is not None:
            await trio.sleep(max(0.0, min(interval, stats.next_probe_at - now)))
        else:
            await trio.sleep(interval)
        now = clock.monotonic()
        was = breaker.state
        if not breaker.allow(now, probe=True):  # the prober owns the half-open trial
            continue
        log_state_change(route, url, probe_due_change(was, breaker, now))
        ok = await _probe(pool, request, route.settings.timeouts.first_byte)
        now = clock.monotonic()
        change = breaker.on_success(now) if ok else breaker.on_failure(now)
        log_state_change(route, url, change)
        if not ok:
            log.info("health probe of %s%s failed", url, route.settings.health_path)


async def _probe(pool: UpstreamPool, request: Request, limit: float) -> bool:
    """One probe: success is a 2xx or 3xx answer read to the end within ``limit`` seconds."""
    with trio.move_on_after(limit):
        try:
            async with pool.request(request) as response:
                async for _ in response.body():
                    pass
                return 200 <= response.head.status < 400
        except UpstreamError:
            return False
    return False
