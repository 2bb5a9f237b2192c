"""Fetching through a route's upstream chain: the shell loop around ``failover.ChainWalk``.

A :class:`Route` is a configured route compiled for use: its chain, one connection pool and one
circuit breaker per upstream, and its caching knobs. :func:`fetch_through_chain` asks the walk
for the next attempt, performs it, and reports the outcome back, until an upstream's response
is used (yielded to the caller, connection held until the caller is done) or the walk is
exhausted (:class:`~proxychain.errors.AllUpstreamsFailed` raised from an ``ExceptionGroup`` of
the individual failures, as trio's ``open_tcp_stream`` does).

A PyPI route's ``file_hosts`` (where index pages link their files) get a pool each too: a
rewritten file link ``/files/<host>/...`` is fetched from that host alone, as a chain of one
hop without a breaker (its failures are not the route's upstreams' failures).
"""

from __future__ import annotations

import logging
import random
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from . import failover, goproxy, mirror, policy, privatepaths
from .breaker import Breaker, BreakerConfig, BreakerEvent, BreakerState, StateChange
from .clock import Clock
from .errors import AllUpstreamsFailed, ErrorKind, RequestRefused, UpstreamError
from .http import Request
from .observe import Observer
from .settings import RouteSettings
from .upstream import (
    Connector,
    Origin,
    Timeouts,
    UpstreamPool,
    UpstreamResponse,
    create_ssl_context,
)

__all__ = [
    "LOOP_DETECTED",
    "FetchResult",
    "Route",
    "build_routes",
    "fetch_through_chain",
    "file_host_base",
    "log_state_change",
    "probe_due_change",
]

log = logging.getLogger("proxychain.upstream")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Route kinds whose files never change: a client's no-cache does not force a refetch of them.
_IMMUTABLE_KINDS = frozenset({"goproxy", "pypi", "npm"})
# RFC 5842 §7.2: a proxy further along found itself in Via. Passed on as it is, so every node
# of a misconfigured loop answers 508 instead of turning it into a 502 of its own.
LOOP_DETECTED = 508


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The response an upstream gave, and which upstream it was."""

    upstream: str
    response: UpstreamResponse


class Route:
    """A configured route, compiled: chain, pools, breakers and caching knobs."""

    def __init__(
        self,
        settings: RouteSettings,
        *,
        clock: Clock,
        connect: Connector | None,
        rng: random.Random,
    ) -> None:
        self.settings = settings
        self.observer: Observer | None = None  # set by the proxy
        self.clock = clock
        self.rng = rng
        self.chain = failover.parse_chain(settings.upstreams)
        self.retry = failover.RetryPolicy(max_retries=settings.retries)
        self.private = tuple(
            privatepaths.PrivateRule(patterns=p.patterns, upstreams=p.upstreams)
            for p in settings.private
        )
        b = settings.breaker
        breaker_config = BreakerConfig(
            failures=b.failures,
            failure_ratio=b.failure_ratio,
            window=b.window,
            min_requests=min(b.min_requests, b.window),
            open_base=b.open_base,
            open_cap=b.open_cap,
        )
        t = settings.timeouts
        timeouts = Timeouts(
            connect=t.connect, first_byte=t.first_byte, between_bytes=t.between_bytes
        )
        ssl_context = create_ssl_context(ca_file=settings.ca_file or None)

        def pool(url: str) -> UpstreamPool:
            origin = Origin.parse(url)
            return UpstreamPool(
                origin,
                timeouts=timeouts,
                connect=connect,
                ssl_context=ssl_context if origin.scheme == "https" else None,
            )

        self.pools: dict[str, UpstreamPool] = {}
        self.breakers: dict[str, Breaker] = {}
        hops = self.chain.hops if isinstance(self.chain, failover.Chain) else ()
        for hop in hops:
            self.pools[hop.url] = pool(hop.url)
            self.breakers[hop.url] = Breaker(breaker_config, rng)
        # Keyed like pypi.map_file_path's answer: "scheme://netloc", lower case.
        self.file_pools: dict[str, UpstreamPool] = {
            base: pool(base) for base in map(file_host_base, settings.file_hosts)
        }
        self._opened: dict[str, trio.Event] = {}  # upstream -> set when its breaker next opens
        immutable_default = settings.kind in _IMMUTABLE_KINDS
        self.policy = policy.RoutePolicy(
            negative_ttl=settings.negative_ttl,
            swr_default=settings.swr or 0.0,
            max_stale=settings.max_stale or 0.0,
            ignore_client_no_cache=(
                settings.ignore_client_no_cache
                if settings.ignore_client_no_cache is not None
                else immutable_default
            ),
            default_ttl=settings.ttl,
        )

    def override(self, path_class: mirror.PathClass) -> policy.Override | None:
        """The per-path freshness override of a mirror path class (route knobs win)."""
        if path_class.kind == "other" and not path_class.immutable and path_class.ttl is None:
            return None
        return policy.Override(
            immutable=path_class.immutable,
            ttl=self.settings.ttl if self.settings.ttl is not None else path_class.ttl,
            swr=self.settings.swr if self.settings.swr is not None else path_class.swr,
            max_stale=(
                self.settings.max_stale
                if self.settings.max_stale is not None
                else path_class.max_stale
            ),
        )

    def chain_for(self, path: str) -> failover.Chain | failover.Refuse:
        """The chain for ``path``: restricted to a private rule's upstreams when one matches.

        A checksum-database lookup of a private module is refused (404) without contacting
        anyone, as ``GONOSUMDB`` keeps ``go`` from asking: the module's name must not leak to
        the public checksum database, and a private upstream has no sumdb to ask.
        """
        rule = privatepaths.match_private(self._private_subject(path), self.private)
        if rule is None:
            return self.chain
        if self.settings.kind == "goproxy" and goproxy.sumdb_lookup_module(path) is not None:
            return failover.Refuse(
                reason="checksum database lookups of private modules are not forwarded",
                status_hint=404,
            )
        return privatepaths.restrict_chain(self.chain, rule)

    def _private_subject(self, path: str) -> str:
        """What private patterns match: for goproxy, the module path in its real case.

        GOPROXY URLs case-encode module paths (``github.com/!corp`` is ``github.com/Corp``),
        and a checksum-database lookup names a module too; matching the escaped text would let
        a private module slip past a pattern written the way ``GOPRIVATE`` spells it.
        """
        if not self.private or self.settings.kind != "goproxy":
            return path
        request = goproxy.parse(path)
        if isinstance(request, goproxy.ModuleRequest):
            return "/" + request.module
        lookup = goproxy.sumdb_lookup_module(path)
        return path if lookup is None else "/" + lookup[0]

    def breaker_opened(self, upstream: str) -> trio.Event:
        """An event set the next time ``upstream``'s breaker opens."""
        event = self._opened.get(upstream)
        if event is None:
            event = self._opened[upstream] = trio.Event()
        return event

    def state_changed(self, upstream: str, change: StateChange) -> None:
        """Told of every breaker transition (:func:`log_state_change`): wakes the waits of
        :meth:`breaker_opened` when ``upstream``'s breaker opens."""
        if change.new is BreakerState.OPEN:
            event = self._opened.pop(upstream, None)
            if event is not None:
                event.set()

    async def aclose(self) -> None:
        for pool in (*self.pools.values(), *self.file_pools.values()):
            await pool.aclose()


def file_host_base(configured: str) -> str:
    """``scheme://netloc`` of a configured file host (bare hosts mean https), lower case."""
    parts = urllib.parse.urlsplit(configured if "://" in configured else f"https://{configured}")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def build_routes(
    settings: Sequence[RouteSettings],
    *,
    clock: Clock,
    connect: Connector | None,
    rng: random.Random,
) -> list[Route]:
    """Compile every configured route."""
    return [Route(s, clock=clock, connect=connect, rng=rng) for s in settings]


def probe_due_change(was: BreakerState, breaker: Breaker, now: float) -> StateChange | None:
    """The OPEN -> HALF_OPEN transition a ``Breaker.allow`` just made, if it made one.

    ``allow`` moves an open breaker to HALF_OPEN lazily and returns only a bool, so the shell
    compares states around it to log and count that transition like the others.
    """
    if was is BreakerState.OPEN and breaker.state is BreakerState.HALF_OPEN:
        return StateChange(
            old=was, new=BreakerState.HALF_OPEN, event=BreakerEvent.PROBE_DUE, at=now
        )
    return None


def log_state_change(route: Route, upstream: str, change: StateChange | None) -> None:
    """Log a breaker transition and tell the route (and its observer)."""
    if change is not None:
        route.state_changed(upstream, change)
        if route.observer is not None:
            route.observer.breaker_change(upstream, change)
        log.warning(
            "breaker for %s: %s -> %s (%s)%s",
            upstream,
            change.old.name,
            change.new.name,
            change.event.name.lower(),
            f", next probe in {change.next_probe_at - change.at:.2f}s"
            if change.next_probe_at is not None
            else "",
        )


@asynccontextmanager
async def fetch_through_chain(
    route: Route,
    request: Request,
    clock: Clock,
    *,
    body: AsyncIterable[bytes] | None = None,
    exclude: frozenset[str] = frozenset(),
    file_host: str | None = None,
    retry: failover.RetryPolicy | None = None,
) -> AsyncIterator[FetchResult]:
    """Send ``request`` along ``route``'s chain; yield the first usable response.

    Args:
        route, request, clock: what to send, where, and the time source.
        body: the request body, streamed (a request with a body is never retried).
        exclude: chain upstreams not to contact (``failover.ChainWalk``).
        file_host: a key of ``route.file_pools``: send to that file host instead of the chain.
        retry: replaces the route's same-upstream retry policy for this request.

    Raises:
        RequestRefused: the chain is ``off`` or a private path has no allowed upstream (403).
        AllUpstreamsFailed: every attempt failed or was skipped; ``status_hint`` 502 or 504.
    """
    chain: failover.Chain | failover.Refuse
    if file_host is None:
        chain, pools, breakers = route.chain_for(request.path), route.pools, route.breakers
    else:
        chain = failover.Chain(hops=(failover.Hop(url=file_host),))
        pools, breakers = route.file_pools, {}
    if isinstance(chain, failover.Refuse):
        raise RequestRefused(chain.reason, status_hint=chain.status_hint)
    now = clock.monotonic()
    tracked = _TrackedBody(body) if body is not None else None
    walk = failover.ChainWalk(
        chain,
        breakers,
        route.retry if retry is None else retry,
        route.rng,
        now,
        deadline=now + route.settings.timeouts.deadline,
        idempotent=request.method in IDEMPOTENT_METHODS and body is None,
        exclude=exclude,
        # With active health checks the probe takes the half-open trials, not clients.
        trials=not route.settings.health_path,
    )
    failures: list[Exception] = []
    last: str | None = None  # the upstream of the previous attempt
    while True:
        due = walk.retry_at
        if due is not None and last is not None:
            await _wait_for_retry(route, breakers.get(last), last, due)
        before = {url: breaker.state for url, breaker in breakers.items()}
        now = clock.monotonic()
        step = walk.next(now)
        for url, was in before.items():
            log_state_change(route, url, probe_due_change(was, breakers[url], now))
        if isinstance(step, failover.Exhausted):
            error = AllUpstreamsFailed(step.reason, status_hint=step.status_hint)
            if step.status_hint == 403:
                raise RequestRefused(step.reason, status_hint=403)
            if failures:
                raise error from ExceptionGroup(step.reason, failures)
            raise error
        if step.delay_before > 0:
            await trio.sleep(step.delay_before)
        last = step.upstream_url
        pool = pools[step.upstream_url]
        started = clock.monotonic()
        cm = pool.request(request, body=tracked)
        try:
            with trio.move_on_at(walk.deadline) as deadline_scope:
                response = await cm.__aenter__()
        except UpstreamError as exc:
            exc.upstream = exc.upstream or step.upstream_url
            failures.append(exc)
            walk.record(step, exc.kind, clock.monotonic())
            _upstream_done(route, step.upstream_url, exc.kind, clock.monotonic() - started)
            log_state_change(route, step.upstream_url, walk.last_state_change)
            log.info("upstream %s failed: %s", step.upstream_url, exc)
            if tracked is not None and tracked.started:
                # The request body is spent; no other attempt can send it again.
                raise AllUpstreamsFailed(str(exc), status_hint=exc.status_hint) from exc
            continue
        except BaseException:
            walk.abandon(step, clock.monotonic())
            raise
        if deadline_scope.cancelled_caught:
            walk.abandon(step, clock.monotonic())
            failures.append(
                UpstreamError(
                    "request deadline exceeded", upstream=step.upstream_url, status_hint=504
                )
            )
            continue
        status = response.head.status
        verdict = walk.record(step, status, clock.monotonic())
        _upstream_done(route, step.upstream_url, status, clock.monotonic() - started)
        log_state_change(route, step.upstream_url, walk.last_state_change)
        if verdict is not failover.Verdict.USE and status != LOOP_DETECTED:
            await cm.__aexit__(None, None, None)
            failures.append(UpstreamError(f"answered {status}", upstream=step.upstream_url))
            log.info("upstream %s answered %d; trying on", step.upstream_url, status)
            continue
        log.debug(
            "upstream %s answered %d in %.3fs",
            step.upstream_url,
            status,
            clock.monotonic() - started,
        )
        async with _exit_with(cm):
            yield FetchResult(step.upstream_url, response)
        return


async def _wait_for_retry(route: Route, breaker: Breaker | None, upstream: str, due: float) -> None:
    """Sleep until a retry of ``upstream`` is due, or only until its breaker opens.

    Other requests' failures during the backoff may open the breaker; the walk then refuses
    the retry (``failover`` rule 1), and the client gets its 502 when the breaker opens rather
    than a backoff later.
    """
    if breaker is not None and breaker.state is BreakerState.OPEN:
        return
    with trio.move_on_at(due):
        await route.breaker_opened(upstream).wait()


def _upstream_done(route: Route, upstream: str, outcome: int | ErrorKind, took: float) -> None:
    if route.observer is not None:
        route.observer.upstream_done(upstream, outcome, took)


@asynccontextmanager
async def _exit_with(cm: object) -> AsyncIterator[None]:
    """Run ``cm.__aexit__`` with whatever the body raised (the pool decides reuse from it)."""
    try:
        yield
    except BaseException as exc:
        if not await cm.__aexit__(type(exc), exc, exc.__traceback__):  # type: ignore[attr-defined]
            raise
    else:
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


class _TrackedBody:
    """A request body iterator that remembers whether any of it was consumed."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body
        self.started = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            self.started = True
            yield chunk
