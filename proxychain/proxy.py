"""The proxy: routes, the cache decision loop, pass-through, purges and the admin plane.

Theory of operation (one request, see also the README's architecture section):

1. The route is the longest configured prefix of the request path. A request whose ``Via``
   names this node already is a loop (508). Methods other than GET/HEAD pass through, their
   bodies streamed upstream, and a non-error answer invalidates what they touched
   (RFC 9111 §4.4).
2. GET/HEAD: the route's mirror kind classifies the path (immutable file or mutable metadata,
   see ``mirror.py``) and gives the path to key on; the store returns every stored variant;
   the sans-IO policy (``policy.py``) turns them into one decision, executed here
   exhaustively: ``Fresh`` serves the stored response, ``ServeStale`` serves it and may start
   one background revalidation (``revalidation.py``), ``Revalidate`` makes a conditional
   request in the foreground, ``Miss`` fills.
3. A fill is coalesced per key: the leader fetches through the route's chain and tees every
   chunk to its client and into the store, waiters follow it (``filling.py``, ``teeing.py``).
4. When the chain fails, the policy decides between a stale copy (stale-if-error, or the
   route's ``max_stale``) and an honest 502/504.

The proxy owns the fill machinery's tasks: background fills and revalidations run in its
nursery, commits of bodies already served in its commits nursery (see :func:`open_proxy`).
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import assert_never

import trio

from . import digestbook, keys, loops, mirror, package_fill, policy, rewriting
from .breaker import BreakerStatistics
from .clock import Clock
from .coalesce import FillRegistry
from .digestbook import DigestBook
from .disk import open_disk_tier
from .entry import Entry
from .errors import ProxyChainError
from .fetch import Route, build_routes, fetch_through_chain
from .filling import Filler
from .forwarding import Forwarding, Lookup, serve_entry
from .health import run_health_checks
from .http import Request, strip_hop_by_hop
from .metrics import Metrics, multiprocess_enabled
from .observe import Observer
from .purgelog import Purge, PurgeLog
from .revalidation import Revalidator
from .server import ClientInfo, Exchange
from .settings import Settings
from .siblingfill import SiblingFills
from .sink import H11Sink, send_error
from .status import build_stats, readiness, tier_figures
from .store import MemoryTier, Store, Stored
from .teeing import Tee
from .upstream import Connector
from .workerstats import SiblingStats

__all__ = ["Proxy", "open_proxy"]

log = logging.getLogger("proxychain.proxy")

# Target resolutions remembered (Proxy._resolve): a few hundred bytes each.
RESOLVED_TARGETS = 4096
# How long an invalidation waits for a commit of its key under way (a flush and an fsync).
COMMIT_WAIT_SECONDS = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Target:
    """What a route-relative GET/HEAD target resolves to (see :meth:`Proxy._resolve`)."""

    upstream_target: str
    url: str
    key: str
    path_class: mirror.PathClass
    file_host: str | None
    override: policy.Override | None


class Proxy:
    """Serves requests for a set of routes out of a store, filling it from upstream chains."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        nursery: trio.Nursery,
        clock: Clock,
        routes: list[Route],
        observer: Observer,
        digests: DigestBook | None = None,
        commits: trio.Nursery | None = None,
    ) -> None:
        self.settings = settings
        self.digests = digests if digests is not None else DigestBook(None)
        self.store = store
        self.clock = clock
        self.routes = sorted(routes, key=lambda r: len(r.settings.prefix), reverse=True)
        self.node_name = settings.server.node_name or (
            f"proxychain-{socket.gethostname()}-{settings.server.port}"
        )
        self.purge_log: PurgeLog | None = None
        # Under --workers: the siblings' figures, merged into ours for the admin plane.
        self.sibling_stats: SiblingStats | None = None
        self.listening = False  # the data plane accepts connections (readiness)
        self._fills = FillRegistry()
        self._targets: dict[tuple[Route, str], _Target] = {}  # see _resolve
        self.observer = observer
        # The fill machinery: background fills and revalidations run in ``nursery``, commits
        # of bodies already served in ``commits``; both are the proxy's (see open_proxy).
        self._forwarding = Forwarding(self.node_name)
        tee = Tee(
            store=store,
            fills=self._fills,
            commits=commits or nursery,
            observer=observer,
            digests=self.digests,
            forwarding=self._forwarding,
        )
        self._filler = Filler(
            store=store,
            fills=self._fills,
            nursery=nursery,
            clock=clock,
            observer=observer,
            forwarding=self._forwarding,
            tee=tee,
            # Sibling workers share the disk tier: one of them fetches a key, the others
            # stream its temp file (``siblingfill.py``).
            siblings=(
                SiblingFills(settings.cache.dir / "fills") if settings.server.workers > 1 else None
            ),
        )
        self._revalidator = Revalidator(
            store=store, fills=self._fills, nursery=nursery, observer=observer, filler=self._filler
        )
        for route in self.routes:
            route.observer = observer
            observer.upstreams_known(route.breakers)

    # ---- public surface -----------------------------------------------------------------------

    def match_route(self, target: str) -> Route | None:
        """The route whose prefix is the longest match for ``target``."""
        path = target.split("?", 1)[0]
        for route in self.routes:
            prefix = route.settings.prefix
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                return route
        return None

    async def purge(self, *, url: str | None = None, prefix: str | None = None) -> int:
        """Remove one URL (every variant) or every URL under a prefix, from both tiers."""
        removed = 0
        if url is not None:
            removed += await self._invalidate(keys.primary_key("GET", self._key_url(url)))
        if prefix is not None:
            self._fills.invalidate(url_prefix=prefix)
            removed += await self.store.purge_prefix(prefix)
        if self.purge_log is not None:
            await self.purge_log.append(Purge(url=url, prefix=prefix))
        return removed

    def forget(self, purge: Purge) -> None:
        """Drop a purge made by another worker from this worker's memory tier."""
        if purge.url is not None:
            key = keys.primary_key("GET", self._key_url(purge.url))
            self._fills.invalidate(key=key)
            self.store.memory.remove(key)
        if purge.prefix is not None:
            prefix = purge.prefix
            self._fills.invalidate(url_prefix=prefix)
            self.store.memory.remove_where(lambda entry: entry.url.startswith(prefix))

    async def _invalidate(self, key: str) -> int:
        """Remove ``key`` from both tiers; returns how many entries went.

        A fill of the key still arriving is marked, so that it is served but not kept; one
        whose body is being committed is waited for first (briefly: its client has it all),
        so that nothing it publishes outlives the removal.
        """
        for fill in self._fills.invalidate(key=key):
            if fill.committing_in_background:
                with trio.move_on_after(COMMIT_WAIT_SECONDS):
                    await fill.wait_end()
        return await self.store.remove(key)

    async def wait_fills_ended(self) -> None:
        """Wait until no fill is under way, commits of bodies already served included."""
        await self._fills.wait_empty()

    def breaker_statistics(self) -> dict[str, BreakerStatistics]:
        """Breaker state of every upstream of every route, by upstream URL."""
        out: dict[str, BreakerStatistics] = {}
        for route in self.routes:
            for url, breaker in route.breakers.items():
                out[url] = breaker.statistics()
        return out

    def request_done(
        self,
        request: Request,
        status: int,
        bytes_sent: int,
        duration: float,
        exchange: Exchange,
        aborted: bool,
    ) -> None:
        """Called by the server when a response is finished (or abandoned)."""
        detail = exchange.detail + (" (aborted)" if aborted else "")
        self.observer.request_done(
            exchange.route,
            request.method,
            status,
            exchange.outcome,
            exchange.tier,
            bytes_sent,
            duration,
            detail,
        )

    # ---- admin plane (proxychain.admin.AdminBackend) ------------------------------------------

    def stats(self) -> dict[str, object]:
        """Live figures for ``/admin/stats`` and the status page (the whole server's, when
        workers share the port)."""
        if self.sibling_stats is not None:
            return self.sibling_stats.merged()
        return build_stats(self)

    def ready(self) -> tuple[bool, list[str]]:
        """Readiness: disk tier writable, and every route has an upstream that is not open."""
        return readiness(self)

    def set_listening(self, up: bool) -> None:
        """Told by the server whether the data plane is accepting (for ``/readyz``)."""
        self.listening = up

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition."""
        return self.observer.metrics.render()

    # ---- request entry point ------------------------------------------------------------------

    async def handle(
        self,
        request: Request,
        body: AsyncIterator[bytes] | None,
        sink: H11Sink,
        client: ClientInfo,
        exchange: Exchange,
    ) -> None:
        """Answer one request on ``sink``."""
        route = self.match_route(request.target)
        if route is None:
            exchange.outcome = "ERROR"
            await send_error(sink, 404, f"no route for {request.path}", self.clock)
            return
        exchange.route = route.settings.prefix
        if loops.via_names_node(request.headers.get("via"), self.node_name):
            exchange.outcome = "ERROR"
            await send_error(
                sink, 508, f"loop detected: Via already names {self.node_name}", self.clock
            )
            return
        relative = "/" + request.target[len(route.settings.prefix) :]
        try:
            if request.method in ("GET", "HEAD"):
                await self._cacheable(route, request, relative, client, sink, exchange)
            else:
                upstream_request = self._forwarding.upstream_request(
                    route, request, relative, client
                )
                await self._pass_through(route, request, upstream_request, body, sink, exchange)
        except ProxyChainError as exc:
            exchange.outcome = exchange.outcome if exchange.outcome != "-" else "ERROR"
            exchange.detail = exc.reason
            log.info("%s %s: %s", request.method, request.target, exc.reason)
            if sink.started:
                await sink.abort()
            else:
                await send_error(sink, exc.status_hint, exc.reason, self.clock)

    # ---- pass-through (unsafe and other methods) ----------------------------------------------

    async def _pass_through(
        self,
        route: Route,
        request: Request,
        upstream_request: Request,
        body: AsyncIterator[bytes] | None,
        sink: H11Sink,
        exchange: Exchange,
    ) -> None:
        exchange.outcome = "BYPASS"
        async with fetch_through_chain(route, upstream_request, self.clock, body=body) as result:
            exchange.upstream = result.upstream
            head = result.response.head
            await sink.start(
                self._forwarding.client_head(
                    head.status, head.reason, strip_hop_by_hop(head.headers), "BYPASS"
                )
            )
            async for chunk in result.response.body():
                await sink.send(chunk)
            await sink.end()
        if 200 <= head.status < 400:
            # Same-origin Location / Content-Location are judged against the client's Host.
            client_view = Request(
                method=request.method,
                target=request.target,
                headers=request.headers,
                scheme=request.scheme,
                authority=request.headers.get("host") or "",
            )
            for url in policy.invalidations(client_view, head):
                await self._invalidate(keys.primary_key("GET", self._key_url(url)))

    # ---- GET / HEAD ---------------------------------------------------------------------------

    async def _cacheable(
        self,
        route: Route,
        request: Request,
        relative: str,
        client: ClientInfo,
        sink: H11Sink,
        exchange: Exchange,
    ) -> None:
        target = self._resolve(route, relative)
        at = Lookup(
            route,
            request,
            client,
            target.upstream_target,
            target.url,
            target.key,
            target.path_class,
            target.file_host,
        )
        candidates = await self.store.lookup(at.key)
        now = self.clock.wall()
        decision = policy.lookup(
            request, [c.entry for c in candidates], now, route.policy, target.override
        )
        match decision:
            case policy.Fresh(entry=entry, age=age):
                exchange.outcome = "HIT"
                stored = _stored_for(candidates, entry)
                await serve_entry(self.store, at, stored, age, "HIT", sink, exchange)
            case policy.ServeStale(entry=entry, age=age, revalidate=revalidate):
                exchange.outcome = "STALE"
                self.observer.stale_served(route.settings.prefix, "while_revalidate")
                if revalidate:
                    self._revalidator.start(at, entry)
                stored = _stored_for(candidates, entry)
                await serve_entry(self.store, at, stored, age, "STALE", sink, exchange)
            case policy.Revalidate(entry=entry, conditional_headers=conditional):
                await self._filler.fill(
                    at, sink, exchange, validate=(_stored_for(candidates, entry), conditional)
                )
            case policy.Miss():
                if request.method == "GET" and _single_range(request):
                    await self._filler.range_from_fill(at, sink, exchange)
                else:
                    await self._filler.fill(at, sink, exchange, validate=None)
            case policy.GatewayTimeout(reason=reason):
                exchange.outcome = "MISS"
                await send_error(sink, 504, reason, self.clock)
            case _:
                assert_never(decision)

    def _resolve(self, route: Route, relative: str) -> _Target:
        """Where ``relative`` (a path and query below ``route``'s prefix) is keyed and fetched.

        A pure function of its arguments, remembered for the last ``RESOLVED_TARGETS``
        targets resolved: a repeated hit skips classifying, canonicalising and hashing its URL.

        Raises:
            MalformedPath: the path is malformed for the route's protocol (404).
        """
        memo_key = (route, relative)
        target = self._targets.get(memo_key)
        if target is not None:
            return target
        path = relative.split("?", 1)[0]
        path_class = mirror.classify(route.settings.kind, path)
        if isinstance(path_class, ProxyChainError):
            raise path_class
        path_class = package_fill.keyed_path_class(route.settings.kind, path_class)
        query = relative[len(path) :]
        file_host, upstream_path = rewriting.upstream_target(route.settings, path_class.key_path)
        url = route.settings.prefix + path_class.key_path.lstrip("/") + query
        target = _Target(
            upstream_target=upstream_path + query,
            url=url,
            key=keys.primary_key("GET", url),
            path_class=path_class,
            file_host=file_host,
            override=route.override(path_class),
        )
        if len(self._targets) >= RESOLVED_TARGETS:
            del self._targets[next(iter(self._targets))]  # the oldest
        self._targets[memo_key] = target
        return target

    # ---- helpers ------------------------------------------------------------------------------

    def _key_url(self, url: str) -> str:
        """The URL an entry for client-visible ``url`` is stored under."""
        route = self.match_route(url)
        if route is None:
            return url
        relative = "/" + url[len(route.settings.prefix) :]
        path = relative.split("?", 1)[0]
        path_class = mirror.classify(route.settings.kind, path)
        if isinstance(path_class, ProxyChainError):
            return url
        return route.settings.prefix + path_class.key_path.lstrip("/") + relative[len(path) :]


def _single_range(request: Request) -> bool:
    """A ``Range`` asking for one range (several ranges of a miss are answered whole)."""
    spec = request.headers.get("range") or ""
    return spec.startswith("bytes=") and "," not in spec


def _stored_for(candidates: list[Stored], entry: Entry) -> Stored:
    for stored in candidates:
        if stored.entry is entry:
            return stored
    for stored in candidates:
        if stored.entry.variant == entry.variant:
            return stored
    raise AssertionError("policy chose an entry that is not among the candidates")


@asynccontextmanager
async def open_proxy(
    settings: Settings,
    *,
    clock: Clock | None = None,
    connect: Connector | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Proxy]:
    """Open the tiers, upstream pools and background tasks; yield a ready :class:`Proxy`.

    Args:
        settings: validated settings.
        clock: the time source (tests pin it under MockClock).
        connect: replaces opening TCP/TLS connections to upstreams (tests inject memory streams).
        rng: randomness for jitter (tests seed it).
    """
    clock = clock or Clock()
    rng = rng or random.Random()
    cache = settings.cache
    routes = build_routes(settings.routes, clock=clock, connect=connect, rng=rng)
    async with open_disk_tier(
        cache.dir,
        max_bytes=cache.disk_max,
        limiter=trio.CapacityLimiter(cache.disk_threads),
        exclusive=settings.server.workers <= 1,  # sibling workers write the tier too
        create_ahead=True,
    ) as disk:
        memory = MemoryTier(max_bytes=cache.memory_max, object_max=cache.memory_object_max)
        store = Store(memory, disk)
        metrics = Metrics(
            tier_source=partial(tier_figures, store, cache), multiprocess=multiprocess_enabled()
        )
        observer = Observer(metrics, clock)
        async with trio.open_nursery() as nursery:
            # Only the mirror kinds announce digests; plain HTTP routes need no file.
            mirrors = any(route.settings.kind != "http" for route in routes)
            digests = await digestbook.open_digest_book(cache.dir if mirrors else None)
            try:
                # Commits of bodies already served run here; leaving the block waits for them,
                # so a graceful stop keeps what its clients were sent.
                async with trio.open_nursery() as commits:
                    proxy = Proxy(
                        settings, store, nursery, clock, routes, observer, digests, commits
                    )
                    for route in proxy.routes:
                        nursery.start_soon(run_health_checks, route, clock, proxy.node_name)
                    if settings.server.workers > 1:
                        # Other workers' memory tiers learn of purges from the shared purge log.
                        proxy.purge_log = PurgeLog(cache.dir)
                        await proxy.purge_log.open()
                        nursery.start_soon(proxy.purge_log.follow, proxy.forget)
                    yield proxy
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    for route in routes:
                        await route.aclose()
