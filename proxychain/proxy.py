"""The proxy: routes, the cache decision loop, fills and background revalidation.

Theory of operation (one request, see also the README's architecture section):

1. The route is the longest configured prefix of the request path. A request whose ``Via``
   names this node already is a loop (508). Methods other than GET/HEAD pass through, their
   bodies streamed upstream, and a non-error answer invalidates what they touched
   (RFC 9111 §4.4).
2. GET/HEAD: the route's mirror kind classifies the path (immutable file or mutable metadata,
   see ``mirror.py``) and gives the path to key on; the store returns every stored variant;
   the sans-IO policy (``policy.py``) turns them into one decision, executed here
   exhaustively: ``Fresh`` serves the stored response, ``ServeStale`` serves it and may start
   one background revalidation owned by the proxy's nursery (so a client that leaves does not
   cancel it), ``Revalidate`` makes a conditional request in the foreground, ``Miss`` fills.
3. A fill is coalesced per key (``coalesce.py``): the leader fetches through the route's chain
   (``fetch.py``) and tees every chunk to its client and into a temp file; waiters follow the
   file. The temp file becomes the entry only when the whole body arrived with the promised
   length; anything else aborts both the file and every client transfer. Bodies a package
   protocol lets us check or must rewrite are buffered instead (``package_fill.py``): served
   only once verified and committed; a failed check retries the chain without that upstream.
4. When the chain fails, the policy decides between a stale copy (stale-if-error, or the
   route's ``max_stale``) and an honest 502/504.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import assert_never

import trio

from . import failover, freshness, keys, mirror, package_fill, packages, policy
from .breaker import BreakerStatistics
from .clock import Clock
from .coalesce import Fill, FillRegistry
from .delivery import send_followed, serve_stored
from .disk import open_disk_tier
from .entry import Entry
from .errors import AllUpstreamsFailed, ProxyChainError, UpstreamError
from .fetch import FetchResult, Route, build_routes, fetch_through_chain
from .health import run_health_checks
from .http import Headers, Request, ResponseHead, strip_hop_by_hop
from .metrics import Metrics, multiprocess_enabled
from .observe import Observer
from .packages import DigestBook, IntegrityError
from .purgelog import Purge, PurgeLog
from .server import ClientGone, ClientInfo, Exchange, H11Sink, send_error
from .settings import Settings
from .status import build_stats, readiness, tier_figures
from .store import MemoryTier, Store, Stored, StoreWriter
from .upstream import Connector
from .workerstats import SiblingStats

__all__ = ["Proxy", "open_proxy"]

log = logging.getLogger("proxychain.proxy")

# Background revalidations running at once, across all keys: a burst of stale hits after an
# outage must not turn into a burst of upstream requests.
MAX_BACKGROUND_REVALIDATIONS = 16
# Target resolutions remembered (Proxy._resolve): a few hundred bytes each.
RESOLVED_TARGETS = 4096
# How long an invalidation waits for a commit of its key under way (a flush and an fsync).
COMMIT_WAIT_SECONDS = 10.0
# Fields a cache fill must not forward: the fill asks for the whole, current representation.
_CLIENT_CONDITIONALS = (
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
)


@dataclass(frozen=True, slots=True)
class _Lookup:
    """Where a cacheable request lands: its route, path class, key and stored variants."""

    route: Route
    request: Request  # the client's request
    client: ClientInfo
    upstream_target: str  # origin-form target sent upstream (to the chain or the file host)
    url: str  # the client-visible URL the entry is stored under (route prefix included)
    key: str
    path_class: mirror.PathClass
    file_host: str | None = None  # a PyPI file host to fetch from instead of the chain


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
        self._nursery = nursery
        self._commits = commits or nursery
        self.purge_log: PurgeLog | None = None
        # Under --workers: the siblings' figures, merged into ours for the admin plane.
        self.sibling_stats: SiblingStats | None = None
        self.listening = False  # the data plane accepts connections (readiness)
        self._fills = FillRegistry()
        self._revalidating: set[str] = set()
        self._targets: dict[tuple[Route, str], _Target] = {}  # see _resolve
        self._revalidation_limiter = trio.CapacityLimiter(MAX_BACKGROUND_REVALIDATIONS)
        self.observer = observer
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
        if failover.via_names_node(request.headers.get("via"), self.node_name):
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
                upstream_request = self._upstream_request(route, request, relative, client)
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
                self._client_head(
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
        at = _Lookup(
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
                await self._serve(at, _stored_for(candidates, entry), age, "HIT", sink, exchange)
            case policy.ServeStale(entry=entry, age=age, revalidate=revalidate):
                exchange.outcome = "STALE"
                self.observer.stale_served(route.settings.prefix, "while_revalidate")
                if revalidate:
                    self._start_revalidation(at, entry)
                await self._serve(at, _stored_for(candidates, entry), age, "STALE", sink, exchange)
            case policy.Revalidate(entry=entry, conditional_headers=conditional):
                await self._fill(
                    at, sink, exchange, validate=(_stored_for(candidates, entry), conditional)
                )
            case policy.Miss():
                if request.method == "GET" and _single_range(request):
                    await self._range_from_fill(at, sink, exchange)
                else:
                    await self._fill(at, sink, exchange, validate=None)
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
        file_host, upstream_path = packages.upstream_target(route.settings, path_class.key_path)
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

    async def _serve(
        self,
        at: _Lookup,
        stored: Stored,
        age: float,
        outcome: str,
        sink: H11Sink,
        exchange: Exchange,
    ) -> None:
        exchange.tier = stored.tier
        self.store.touch(stored)
        await serve_stored(
            self.store, stored, age, at.request, sink, _cache_fields(outcome, stored.tier)
        )

    # ---- fills --------------------------------------------------------------------------------

    async def _fill(
        self,
        at: _Lookup,
        sink: H11Sink,
        exchange: Exchange,
        *,
        validate: tuple[Stored, Headers] | None,
    ) -> None:
        """Fetch ``at`` from upstream (conditionally when ``validate``), coalesced per key.

        A miss or a revalidation that finds a fill or revalidation of its key in flight waits
        for it (:meth:`_follow`) instead of asking the upstream too. When that fill failed
        because the upstream did, this request answers from the same error: a revalidation as
        the policy says (the stale copy where stale-if-error allows), a miss with the 502/504.
        """
        fill = self._fills.get(at.key)
        if fill is not None:
            try:
                if await self._follow(at, fill, sink, exchange):
                    return
            except (AllUpstreamsFailed, UpstreamError) as exc:  # the leader's, shared
                if validate is None:
                    raise
                await self._upstream_failed(at, validate[0], exc, sink, exchange)
                return
        fill = self._fills.start(at.key) if self._fills.get(at.key) is None else None
        if fill is not None and validate is not None:
            fill.validating = validate[0]  # a 304 for it ends the fill (``_freshened``)
        try:
            try:
                await self._fetch_and_store(at, sink, exchange, fill, validate)
            except _Refetch:
                await self._fetch_and_store(at, sink, exchange, fill, None)
        finally:
            if fill is not None and not fill.committing_in_background:
                self._fills.end(fill)

    async def _follow(
        self,
        at: _Lookup,
        fill: Fill,
        sink: H11Sink,
        exchange: Exchange,
        *,
        coalesced: bool = True,
    ) -> bool:
        """Serve ``at`` from a fill in progress; False means "fetch on your own".

        A single byte range is answered 206 as soon as its bytes are written (RFC 9110 §14),
        without waiting for the rest of the fill. A buffered fill (``package_fill.py``)
        publishes no head until it has committed, and a revalidation answered 304 none at all:
        their waiters are served the committed (or freshened) entry from the store.

        Raises:
            UpstreamError: the fill ended, before publishing a head, because the upstream
                failed; this is a copy of the leader's error, for the caller to answer with.
        """
        fill.waiters += 1
        if coalesced:
            self.observer.coalesced(at.route.settings.prefix)
        try:
            with trio.move_on_after(at.route.settings.coalesce_timeout) as waited:
                await fill.wait_head()
            if waited.cancelled_caught:
                return False
            state = fill.state
            if state.failed and state.head is None and state.error is not None:
                raise _shared_error(state.error)
            if state.finished and state.entry is not None and not state.failed:
                # Already committed (or freshened by a 304): the store has it now.
                return await self._serve_committed(at, state.entry, sink, exchange, coalesced)
            head = state.head
            if (
                head is None
                or not state.storable
                or state.entry is None
                or not keys.matches(state.entry.vary, at.request.headers, at.path_class.forced_vary)
            ):
                return False
            file = fill.open_follower()
            if file is None:
                # No temp file to follow: the fill has ended (committed, so the store has the
                # entry, or failed). The fill's end tells which.
                with trio.move_on_after(at.route.settings.coalesce_timeout):
                    await fill.wait_end()
                if state.finished and state.entry is not None and not state.failed:
                    return await self._serve_committed(at, state.entry, sink, exchange, coalesced)
                return False
            # A body that had wholly arrived before this request came is a hit (only the commit
            # was pending); one still arriving is that fill's miss, shared.
            complete = state.arrived or (
                state.expected is not None and state.received >= state.expected
            )
            exchange.outcome = "HIT" if complete else "MISS"
            exchange.detail = "coalesced" if coalesced else ""
            headers = head.headers.set("x-cache", exchange.outcome)
            if complete:
                exchange.tier = "fill"  # the whole body, from the fill
                headers = headers.set("x-cache-tier", "fill")
            head = ResponseHead(status=head.status, reason=head.reason, headers=headers)
            try:
                await send_followed(at.request, fill, file, head, sink)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(file.close)
            return True
        finally:
            fill.waiters -= 1

    async def _serve_committed(
        self, at: _Lookup, entry: Entry, sink: H11Sink, exchange: Exchange, coalesced: bool
    ) -> bool:
        """Serve the entry a fill committed, from the store; False if it is not there (evicted,
        purged, or another variant than this request's)."""
        for stored in await self.store.lookup(at.key):
            if stored.entry.variant == entry.variant and keys.matches(
                stored.entry.vary, at.request.headers, at.path_class.forced_vary
            ):
                exchange.outcome = "HIT"
                exchange.detail = "coalesced" if coalesced else ""
                age = freshness.current_age(stored.entry, self.clock.wall())
                await self._serve(at, stored, age, "HIT", sink, exchange)
                return True
        return False

    async def _range_from_fill(self, at: _Lookup, sink: H11Sink, exchange: Exchange) -> None:
        """A Range request on a miss: fill the whole object in the background and answer the
        range from the fill as soon as those bytes arrive."""
        fill = self._fills.get(at.key)
        coalesced = fill is not None
        if fill is None:
            fill = self._fills.start(at.key)
            self._nursery.start_soon(self._background_fill, at, fill)
        if not await self._follow(at, fill, sink, exchange, coalesced=coalesced):
            await self._fill(at, sink, exchange, validate=None)

    async def _background_fill(self, at: _Lookup, fill: Fill) -> None:
        exchange = Exchange()
        try:
            await self._fetch_and_store(at, None, exchange, fill, None)
        except ProxyChainError as exc:
            log.info("background fill of %s failed: %s", at.url, exc.reason)
        finally:
            self._fills.end(fill)

    async def _fetch_and_store(
        self,
        at: _Lookup,
        sink: H11Sink | None,
        exchange: Exchange,
        fill: Fill | None,
        validate: tuple[Stored, Headers] | None,
    ) -> None:
        """Fetch ``at`` and store/serve the answer; an upstream whose body fails its integrity
        check is excluded and the chain walked again (``failover`` rule 1)."""
        route = at.route
        req = self._fill_request(at, validate)
        exclude: frozenset[str] = frozenset()
        # With a stale copy we may serve on error, a failing upstream is not retried: the
        # client gets the copy sooner and a struggling upstream is spared the extra request.
        retry = _NO_RETRY if validate is not None and self._may_serve_stale(at, validate) else None
        try:
            while True:
                request_time = self.clock.wall()
                async with fetch_through_chain(
                    route, req, self.clock, exclude=exclude, file_host=at.file_host, retry=retry
                ) as result:
                    response_time = self.clock.wall()
                    exchange.upstream = result.upstream
                    head = result.response.head
                    if validate is not None and head.status == 304:
                        head = packages.rewritten_not_modified(validate[0].entry.headers, head)
                        await self._freshened(
                            at, validate[0], head, request_time, response_time, sink, exchange
                        )
                        return
                    refused = await self._stream_response(
                        at, result, request_time, response_time, sink, exchange, fill
                    )
                if refused is None:
                    return
                if at.file_host is not None:
                    raise refused  # a file host has no alternative
                exclude |= {refused.upstream}
        except (AllUpstreamsFailed, UpstreamError) as exc:
            if fill is not None:
                # Ended before this request's own answer: waiters answer from the error now.
                fill.fail(exc)
            if (sink is not None and sink.started) or validate is None:
                raise
            await self._upstream_failed(at, validate[0], exc, sink, exchange)

    async def _upstream_failed(
        self,
        at: _Lookup,
        stored: Stored,
        exc: UpstreamError,
        sink: H11Sink | None,
        exchange: Exchange,
    ) -> None:
        """Answer a revalidation of ``stored`` whose upstream failed with ``exc`` (its own
        attempt's error, or the one its fill's leader got).

        RFC 5861 §4 / RFC 9111 §4.2.4: the policy decides between a stale copy and an error
        (504 where the stored response forbids stale use).
        """
        decision = self._on_upstream_error(at, stored, exc.status_hint)
        match decision:
            case policy.ServeStale(age=age):
                await self._serve_stale_on_error(at, (stored, age), sink, exchange)
            case policy.Fail(status=status, reason=reason):
                if status == exc.status_hint:
                    raise exc
                raise UpstreamError(
                    f"{exc.reason}; {reason}", upstream=exchange.upstream, status_hint=status
                ) from exc
            case _:
                assert_never(decision)

    def _may_serve_stale(self, at: _Lookup, validate: tuple[Stored, Headers]) -> bool:
        return isinstance(self._on_upstream_error(at, validate[0], 502), policy.ServeStale)

    def _on_upstream_error(
        self, at: _Lookup, stored: Stored, status_hint: int
    ) -> policy.ServeStale | policy.Fail:
        """The policy's answer for ``stored`` when its revalidation fails with ``status_hint``."""
        return policy.on_upstream_error(
            stored.entry,
            at.request,
            self.clock.wall(),
            at.route.policy,
            at.route.override(at.path_class),
            status_hint,
        )

    async def _serve_stale_on_error(
        self, at: _Lookup, stale: tuple[Stored, float], sink: H11Sink | None, exchange: Exchange
    ) -> None:
        self.observer.stale_served(at.route.settings.prefix, "if_error")
        exchange.outcome = "STALE"
        exchange.detail = "upstream failed; served stale"
        if sink is not None:
            await self._serve(at, stale[0], stale[1], "STALE", sink, exchange)

    async def _freshened(
        self,
        at: _Lookup,
        stored: Stored,
        head: ResponseHead,
        request_time: float,
        response_time: float,
        sink: H11Sink | None,
        exchange: Exchange,
    ) -> None:
        outcome = policy.on_validation(stored.entry, head, request_time, response_time)
        match outcome:
            case policy.Freshen(entry=entry):
                await self.store.update_meta(entry)
                self._revalidated(at, stored, entry)
                fresh = Stored(entry=entry, tier=stored.tier, body=stored.body)
                exchange.outcome = "REVALIDATED"
                if sink is not None:
                    age = freshness.current_age(entry, self.clock.wall())
                    await self._serve(at, fresh, age, "REVALIDATED", sink, exchange)
            case policy.Replace(reason=reason):
                # A 304 that matches nothing we hold (RFC 9111 §4.3.4): it has no body, so
                # drop ours and repeat the request without conditionals.
                log.info("%s: %s; refetching", at.url, reason)
                await self.store.remove(stored.entry.key, stored.entry.variant)
                raise _Refetch
            case _:
                assert_never(outcome)

    def _revalidated(self, at: _Lookup, stored: Stored, entry: Entry) -> None:
        """A 304 freshened ``stored`` into ``entry``: end the revalidation fill validating that
        very lookup, so its waiters serve the fresh entry now, not after the leader's client
        has been sent it."""
        fill = self._fills.get(at.key)
        if fill is not None and fill.validating is stored:
            fill.finish(entry)

    def _fill_request(self, at: _Lookup, validate: tuple[Stored, Headers] | None) -> Request:
        """The GET a fill sends upstream: the cache's own validators, never the client's."""
        base = self._upstream_request(at.route, at.request, at.upstream_target, at.client)
        headers = base.headers.remove(*_CLIENT_CONDITIONALS)
        if validate is not None:
            stored, conditional = validate
            headers = headers.update(
                packages.rewritten_conditionals(stored.entry.headers, conditional)
            )
        return Request(
            method="GET",
            target=at.upstream_target,
            headers=package_fill.fill_headers(
                headers, at.route.settings.kind, at.path_class.kind, file_host=at.file_host
            ),
            scheme=base.scheme,
            authority=base.authority,
        )

    async def _stream_response(
        self,
        at: _Lookup,
        result: FetchResult,
        request_time: float,
        response_time: float,
        sink: H11Sink | None,
        exchange: Exchange,
        fill: Fill | None,
    ) -> IntegrityError | None:
        """Tee the upstream body to the client and into the store; commit only when whole.

        A body that must be verified or rewritten first is buffered instead
        (:meth:`_buffered_fill`); the error it returns means "try another upstream".
        """
        route = at.route
        response, head = result.response, result.response.head
        override = route.override(at.path_class)
        names = keys.vary_names(head, at.path_class.forced_vary)
        storable = names is not None and policy.storable(at.request, head, route.policy, override)
        headers = policy.stored_headers(head, response_time=response_time)
        vary = keys.vary_values(at.request.headers, names or ())
        entry = Entry(
            key=at.key,
            variant=keys.variant_key(vary),
            url=at.url,
            status=head.status,
            reason=head.reason,
            headers=headers,
            vary=vary,
            request_time=request_time,
            response_time=response_time,
        )
        if storable:
            plan = await packages.plan_fill(
                route.settings,
                at.path_class,
                head,
                upstream=result.upstream,
                proxy_base=packages.proxy_base_for(
                    route.settings.prefix,
                    host=at.request.headers.get("host"),
                    scheme=at.client.scheme,
                ),
                book=self.digests,
            )
            if plan is not None:
                return await self._buffered_fill(at, plan, result, entry, sink, exchange, fill)
        # Batched: the body's chunks go to the temp file a batch per worker-thread call (waiters
        # follow ``bytes_written``), the last batch with the commit.
        writer = (
            await self.store.open_writer(at.key, entry.variant, batched=True) if storable else None
        )
        outcome = "MISS" if storable else "BYPASS"
        client_head = self._client_head(head.status, head.reason, headers.set("age", "0"), outcome)
        if fill is not None:
            fill.publish_head(
                client_head, entry, writer.open_reader() if writer else None, storable
            )
        exchange.outcome = outcome
        if sink is None and writer is None:
            if fill is not None:
                fill.finish(None)  # nobody to send it to and nowhere to keep it
            return None
        expected = response.content_length
        committed: Entry | None = None
        client_ok = sink is not None
        try:
            if sink is not None:
                client_ok = await _try(sink.start(client_head))
            async for chunk in response.body():
                if writer is not None:
                    if fill is not None:
                        # Waiters have the piece before the writer's batch reaches the disk.
                        fill.publish_body(chunk)
                    await writer.write(chunk)
                    if fill is not None:
                        fill.publish_written(writer.bytes_written)
                if client_ok and sink is not None:
                    client_ok = await _try(sink.send(chunk))
                if not client_ok and sink is not None and not self._keep_filling(route, fill):
                    raise ClientGone("client left; fill abandoned")
            if fill is not None:
                fill.body_arrived()
            if client_ok and sink is not None:
                await _try(sink.end())
            if writer is not None and sink is not None:
                # The client has it all: the commit (last batch, fsync, rename) runs in the
                # background, so its connection goes on to its next request at once. Requests
                # for the key meanwhile join the fill, which stays open until the commit ends.
                if fill is not None:
                    fill.committing_in_background = True
                self._commits.start_soon(self._commit_in_background, writer, entry, expected, fill)
                writer = None
            elif writer is not None:
                committed = await self._commit(writer, entry, expected, fill)
            elif fill is not None:
                fill.finish(None)
        except BaseException:
            if fill is not None:
                fill.fail()
            if writer is not None and committed is None:
                with trio.CancelScope(shield=True):
                    await writer.abort()
            if sink is not None and sink.started and not sink.ended:
                await sink.abort()
            raise
        return None

    async def _buffered_fill(
        self,
        at: _Lookup,
        plan: packages.FillPlan,
        result: FetchResult,
        entry: Entry,
        sink: H11Sink | None,
        exchange: Exchange,
        fill: Fill | None,
    ) -> IntegrityError | None:
        """Fill the whole body into the store without sending it, check/rewrite it, then
        serve the committed entry.

        Waiters see neither head nor temp file (nothing unchecked to follow): they wait for
        the fill's end and read the store. After a failed check the fill stays open for the
        leader's next upstream.
        """
        out = await package_fill.fill_buffered(
            plan, result, entry, store=self.store, book=self.digests
        )
        if isinstance(out, IntegrityError):
            self.observer.integrity_failure(
                at.route.settings.prefix, f"{out.url} from {out.upstream}: {out}"
            )
            return out
        exchange.outcome = "MISS"
        if fill is not None:
            fill.finish(out)
        if sink is not None:
            stored = await self._committed(at, out)
            await self._serve(at, stored, 0.0, "MISS", sink, exchange)
        return None

    async def _committed(self, at: _Lookup, entry: Entry) -> Stored:
        for stored in await self.store.lookup(at.key):
            if stored.entry.variant == entry.variant:
                return stored
        raise UpstreamError(f"{at.url} was evicted before it could be served")

    async def _commit(
        self, writer: StoreWriter, entry: Entry, expected: int | None, fill: Fill | None
    ) -> Entry | None:
        """Publish the fill's body in the store, unless it was invalidated meanwhile.

        The last batch is written first, so that waiters get the whole body without waiting
        for the fsync (and get it whole from an invalidated fill, which the store does not).
        """
        await writer.flush()
        if fill is not None:
            fill.publish_written(writer.bytes_written)
            if fill.invalidated:
                await writer.abort()
                fill.finish(None)
                return None
        committed = await writer.commit(entry, expected_size=expected)
        if fill is not None and fill.invalidated:  # while the commit ran
            await self.store.remove(committed.key, committed.variant)
            fill.finish(None)
            return None
        if fill is not None:
            fill.finish(committed)
        return committed

    async def _commit_in_background(
        self, writer: StoreWriter, entry: Entry, expected: int | None, fill: Fill | None
    ) -> None:
        """Commit a fill whose client was served; a failure only means it is not stored."""
        try:
            await self._commit(writer, entry, expected, fill)
        except ProxyChainError as exc:
            log.warning("%s was served but not stored: %s", entry.url, exc.reason)
        finally:
            with trio.CancelScope(shield=True):
                await writer.abort()  # no-op after a commit; cleans up after a failed one
            if fill is not None:
                self._fills.end(fill)

    def _keep_filling(self, route: Route, fill: Fill | None) -> bool:
        if fill is not None and fill.waiters > 0:
            return True
        return route.settings.finish_fill_on_disconnect

    # ---- background revalidation (RFC 5861 §3) ------------------------------------------------

    def _start_revalidation(self, at: _Lookup, entry: Entry) -> None:
        token = f"{at.key}/{entry.variant}"
        if token in self._revalidating:
            return
        self._revalidating.add(token)
        self._nursery.start_soon(self._revalidate, at, entry, token)

    async def _revalidate(self, at: _Lookup, entry: Entry, token: str) -> None:
        try:
            async with self._revalidation_limiter:
                candidates = await self.store.lookup(at.key)
                stored = next((c for c in candidates if c.entry.variant == entry.variant), None)
                if stored is None:
                    return
                if self._fills.get(at.key) is not None:
                    # A fill or revalidation of the key is under way; it does this one's work.
                    log.debug("background revalidation of %s: a fill is under way", at.url)
                    return
                conditional = policy.conditional_headers(stored.entry)
                exchange = Exchange()
                # Registered like a foreground revalidation, so requests that would revalidate
                # the key meanwhile wait for this one (``_fill``) instead of asking too.
                fill = self._fills.start(at.key)
                fill.validating = stored
                try:
                    await self._fetch_and_store(at, None, exchange, fill, (stored, conditional))
                finally:
                    if not fill.committing_in_background:
                        self._fills.end(fill)
                result = {"REVALIDATED": "not_modified", "STALE": "failed"}.get(
                    exchange.outcome, "replaced"
                )
                self.observer.revalidation(at.route.settings.prefix, result)
                log.info("revalidated %s in the background: %s", at.url, exchange.outcome)
        except _Refetch:
            self.observer.revalidation(at.route.settings.prefix, "replaced")
        except ProxyChainError as exc:
            self.observer.revalidation(at.route.settings.prefix, "failed")
            log.warning("background revalidation of %s failed: %s", at.url, exc.reason)
        finally:
            self._revalidating.discard(token)

    # ---- helpers ------------------------------------------------------------------------------

    def _upstream_request(
        self, route: Route, request: Request, relative: str, client: ClientInfo
    ) -> Request:
        headers = strip_hop_by_hop(request.headers)
        host = request.headers.get("host") or ""
        via = headers.get("via")
        headers = headers.set("via", (via + ", " if via else "") + f"1.1 {self.node_name}")
        forwarded_for = headers.get("x-forwarded-for")
        if client.address:
            headers = headers.set(
                "x-forwarded-for",
                f"{forwarded_for}, {client.address}" if forwarded_for else client.address,
            )
        headers = headers.set("x-forwarded-proto", client.scheme)
        if host:
            headers = headers.set("x-forwarded-host", host)
        if not route.settings.preserve_host:
            headers = headers.remove("host")
        return Request(
            method=request.method,
            target=relative,
            headers=headers,
            scheme=client.scheme,
            authority=host,
        )

    def _client_head(
        self, status: int, reason: str, headers: Headers, outcome: str
    ) -> ResponseHead:
        headers = headers.set("x-cache", outcome)
        via = headers.get("via")
        headers = headers.set("via", (via + ", " if via else "") + f"1.1 {self.node_name}")
        return ResponseHead(status=status, reason=reason, headers=headers)

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


_NO_RETRY = failover.RetryPolicy(max_retries=0)


class _Refetch(Exception):
    """A 304 matched nothing stored: repeat the request without conditionals."""


async def _try(step: Awaitable[None]) -> bool:
    """Await a sink step; False when the client has gone."""
    try:
        await step
    except ClientGone:
        return False
    return True


def _shared_error(error: UpstreamError) -> UpstreamError:
    """A waiter's own copy of the error its fill's leader got (one exception object is not
    raised in several tasks: each raise would rewrite its traceback)."""
    shared = UpstreamError(
        error.reason, upstream=error.upstream, status_hint=error.status_hint, kind=error.kind
    )
    shared.__cause__ = error
    return shared


@cache
def _cache_fields(outcome: str, tier: str) -> Headers:
    """The ``X-Cache`` fields of a stored response: one shared object per outcome and tier
    (so its serialised form is remembered with it, see ``H11Sink.start_prepared``)."""
    return Headers([("x-cache", outcome), ("x-cache-tier", tier)])


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
            digests = await packages.open_digest_book(cache.dir if mirrors else None)
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
