"""Fills: one upstream fetch per key, shared by every request that needs it.

How a fill flows (the proxy calls :meth:`Filler.fill` for a miss or a foreground
revalidation, :meth:`Filler.range_from_fill` for a single-range miss):

1. A request that finds a fill of its key open follows it (``coalesce.py``): it streams the
   leader's body as it arrives, serves the entry the fill committed from the store, answers
   from the leader's upstream error, or, when none of that applies, fetches on its own.
2. Otherwise it leads a fill: the fill request (the cache's own validators, never the
   client's) walks the route's chain (``fetch.py``). A 304 freshens the stored entry (one that
   matches nothing stored drops it and asks again without conditionals); any other answer is
   teed to the client and into the store (``teeing.py``), which may ask for the chain again
   without an upstream whose body failed its integrity check.
3. When the chain fails, a revalidation answers as the policy says (the stale copy where
   stale-if-error or the route's ``max_stale`` allow, else a 502/504), a miss with the error;
   the fill's waiters get a copy of the same error and answer it the same way.

A single-range miss fills the whole object in a background task of the proxy's nursery and
answers the range from that fill as soon as its bytes arrive.
"""

from __future__ import annotations

import logging
from typing import assert_never

import trio

from . import failover, freshness, keys, package_fill, policy, rewriting
from .clock import Clock
from .coalesce import Fill, FillRegistry
from .delivery import send_followed
from .entry import Entry
from .errors import AllUpstreamsFailed, ProxyChainError, UpstreamError
from .fetch import fetch_through_chain
from .forwarding import Forwarding, Lookup, serve_entry
from .http import Headers, Request, ResponseHead
from .observe import Observer
from .server import Exchange
from .siblingfill import SiblingFills
from .sink import H11Sink
from .store import Store, Stored
from .teeing import Tee

__all__ = ["Filler", "Refetch"]

# The proxy's logger: fills are its work, and operators filter its records by this name.
log = logging.getLogger("proxychain.proxy")

# Fields a cache fill must not forward: the fill asks for the whole, current representation.
_CLIENT_CONDITIONALS = (
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
)
_NO_RETRY = failover.RetryPolicy(max_retries=0)


class Refetch(Exception):
    """A 304 matched nothing stored: repeat the request without conditionals."""


class Filler:
    """Fills the store from upstream, one fetch per key at a time (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        fills: FillRegistry,
        nursery: trio.Nursery,
        clock: Clock,
        observer: Observer,
        forwarding: Forwarding,
        tee: Tee,
        siblings: SiblingFills | None = None,
    ) -> None:
        self._store = store
        self._fills = fills
        self._nursery = nursery  # the proxy's: owns background fills (single-range misses)
        self._clock = clock
        self._observer = observer
        self._forwarding = forwarding
        self._tee = tee
        self._siblings = siblings  # under --workers: fills shared with the other workers

    async def fill(
        self,
        at: Lookup,
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
        lead = None
        # A fill of this process that a purge invalidated still holds the key's lock: the
        # request fetches anew (below) rather than mirror that fill.
        if (
            fill is None
            and validate is None
            and self._siblings is not None
            and not self._fills.holds(at.key)
        ):
            lead = self._siblings.lead(at.key)
            if lead is None:  # a sibling worker leads this key's fill: follow it from here
                fill = self._fills.start(at.key)
                self._nursery.start_soon(self._siblings.mirror, fill, self._store, self._fills)
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
        if fill is not None:
            # A lead is only taken when no fill was open, so it always lands here; it is
            # released with the fill (``FillRegistry.end``).
            fill.lead = lead
            if validate is not None:
                fill.validating = validate[0]  # a 304 for it ends the fill (``_freshened``)
        try:
            try:
                await self.fetch_and_store(at, sink, exchange, fill, validate)
            except Refetch:
                await self.fetch_and_store(at, sink, exchange, fill, None)
        finally:
            if fill is not None and not fill.committing_in_background:
                self._fills.end(fill)

    async def _follow(
        self,
        at: Lookup,
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
            self._observer.coalesced(at.route.settings.prefix)
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
        self, at: Lookup, entry: Entry, sink: H11Sink, exchange: Exchange, coalesced: bool
    ) -> bool:
        """Serve the entry a fill committed, from the store; False if it is not there (evicted,
        purged, or another variant than this request's)."""
        for stored in await self._store.lookup(at.key):
            if stored.entry.variant == entry.variant and keys.matches(
                stored.entry.vary, at.request.headers, at.path_class.forced_vary
            ):
                exchange.outcome = "HIT"
                exchange.detail = "coalesced" if coalesced else ""
                age = freshness.current_age(stored.entry, self._clock.wall())
                await serve_entry(self._store, at, stored, age, "HIT", sink, exchange)
                return True
        return False

    async def range_from_fill(self, at: Lookup, sink: H11Sink, exchange: Exchange) -> None:
        """A Range request on a miss: fill the whole object in the background and answer the
        range from the fill as soon as those bytes arrive."""
        fill = self._fills.get(at.key)
        coalesced = fill is not None
        if fill is None:
            fill = self._fills.start(at.key)
            self._nursery.start_soon(self._background_fill, at, fill)
        if not await self._follow(at, fill, sink, exchange, coalesced=coalesced):
            await self.fill(at, sink, exchange, validate=None)

    async def _background_fill(self, at: Lookup, fill: Fill) -> None:
        exchange = Exchange()
        try:
            await self.fetch_and_store(at, None, exchange, fill, None)
        except ProxyChainError as exc:
            log.info("background fill of %s failed: %s", at.url, exc.reason)
        finally:
            self._fills.end(fill)

    async def fetch_and_store(
        self,
        at: Lookup,
        sink: H11Sink | None,
        exchange: Exchange,
        fill: Fill | None,
        validate: tuple[Stored, Headers] | None,
    ) -> None:
        """Fetch ``at`` and store/serve the answer; an upstream whose body fails its integrity
        check is excluded and the chain walked again (``failover`` rule 1).

        Raises:
            Refetch: a 304 to ``validate`` matched nothing stored (the entry is dropped).
        """
        route = at.route
        req = self._fill_request(at, validate)
        exclude: frozenset[str] = frozenset()
        # With a stale copy we may serve on error, a failing upstream is not retried: the
        # client gets the copy sooner and a struggling upstream is spared the extra request.
        retry = _NO_RETRY if validate is not None and self._may_serve_stale(at, validate) else None
        try:
            while True:
                request_time = self._clock.wall()
                async with fetch_through_chain(
                    route, req, self._clock, exclude=exclude, file_host=at.file_host, retry=retry
                ) as result:
                    response_time = self._clock.wall()
                    exchange.upstream = result.upstream
                    head = result.response.head
                    if validate is not None and head.status == 304:
                        head = rewriting.rewritten_not_modified(validate[0].entry.headers, head)
                        await self._freshened(
                            at, validate[0], head, request_time, response_time, sink, exchange
                        )
                        return
                    refused = await self._tee.stream(
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
        at: Lookup,
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

    def _may_serve_stale(self, at: Lookup, validate: tuple[Stored, Headers]) -> bool:
        return isinstance(self._on_upstream_error(at, validate[0], 502), policy.ServeStale)

    def _on_upstream_error(
        self, at: Lookup, stored: Stored, status_hint: int
    ) -> policy.ServeStale | policy.Fail:
        """The policy's answer for ``stored`` when its revalidation fails with ``status_hint``."""
        return policy.on_upstream_error(
            stored.entry,
            at.request,
            self._clock.wall(),
            at.route.policy,
            at.route.override(at.path_class),
            status_hint,
        )

    async def _serve_stale_on_error(
        self, at: Lookup, stale: tuple[Stored, float], sink: H11Sink | None, exchange: Exchange
    ) -> None:
        self._observer.stale_served(at.route.settings.prefix, "if_error")
        exchange.outcome = "STALE"
        exchange.detail = "upstream failed; served stale"
        if sink is not None:
            await serve_entry(self._store, at, stale[0], stale[1], "STALE", sink, exchange)

    async def _freshened(
        self,
        at: Lookup,
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
                await self._store.update_meta(entry)
                self._revalidated(at, stored, entry)
                fresh = Stored(entry=entry, tier=stored.tier, body=stored.body)
                exchange.outcome = "REVALIDATED"
                if sink is not None:
                    age = freshness.current_age(entry, self._clock.wall())
                    await serve_entry(self._store, at, fresh, age, "REVALIDATED", sink, exchange)
            case policy.Replace(reason=reason):
                # A 304 that matches nothing we hold (RFC 9111 §4.3.4): it has no body, so
                # drop ours and repeat the request without conditionals.
                log.info("%s: %s; refetching", at.url, reason)
                await self._store.remove(stored.entry.key, stored.entry.variant)
                raise Refetch
            case _:
                assert_never(outcome)

    def _revalidated(self, at: Lookup, stored: Stored, entry: Entry) -> None:
        """A 304 freshened ``stored`` into ``entry``: end the revalidation fill validating that
        very lookup, so its waiters serve the fresh entry now, not after the leader's client
        has been sent it."""
        fill = self._fills.get(at.key)
        if fill is not None and fill.validating is stored:
            fill.finish(entry)

    def _fill_request(self, at: Lookup, validate: tuple[Stored, Headers] | None) -> Request:
        """The GET a fill sends upstream: the cache's own validators, never the client's."""
        base = self._forwarding.upstream_request(
            at.route, at.request, at.upstream_target, at.client
        )
        headers = base.headers.remove(*_CLIENT_CONDITIONALS)
        if validate is not None:
            stored, conditional = validate
            headers = headers.update(
                rewriting.rewritten_conditionals(stored.entry.headers, conditional)
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


def _shared_error(error: UpstreamError) -> UpstreamError:
    """A waiter's own copy of the error its fill's leader got (one exception object is not
    raised in several tasks: each raise would rewrite its traceback)."""
    shared = UpstreamError(
        error.reason, upstream=error.upstream, status_hint=error.status_hint, kind=error.kind
    )
    shared.__cause__ = error
    return shared
