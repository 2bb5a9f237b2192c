"""A fill's upstream answer, teed to its client and into the store, then committed.

The leader of a fill (``filling.py``) hands each upstream answer other than a 304 to
:meth:`Tee.stream`. A storable body is written to a temp file while each chunk also goes to
the client and is published to the fill's waiters (``coalesce.py``), who follow the file as it
grows. The temp file becomes the entry only when the whole body arrived with the promised
length; anything else aborts both the file and every client transfer. Once the client has the
whole body, the commit (last batch, fsync, rename) runs in the proxy's commits nursery, so the
client's connection moves on at once and a graceful stop still keeps what clients were sent.

Bodies a package protocol lets us check or must rewrite are buffered instead
(``package_fill.py``): served only once verified and committed; a failed check returns the
:class:`~proxychain.integrity.IntegrityError`, and the leader walks the chain again without
that upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import trio

from . import keys, package_fill, packages, policy, rewriting
from .coalesce import Fill, FillRegistry
from .connection import ClientGone
from .digestbook import DigestBook
from .entry import Entry
from .errors import ProxyChainError, UpstreamError
from .fetch import FetchResult, Route
from .forwarding import Forwarding, Lookup, serve_entry
from .integrity import IntegrityError
from .observe import Observer
from .server import Exchange
from .sink import H11Sink
from .store import Store, Stored, StoreWriter

__all__ = ["Tee"]

# The proxy's logger: fills are its work, and operators filter its records by this name.
log = logging.getLogger("proxychain.proxy")


class Tee:
    """Streams or buffers fills' upstream answers into the store and to their clients."""

    def __init__(
        self,
        *,
        store: Store,
        fills: FillRegistry,
        commits: trio.Nursery,
        observer: Observer,
        digests: DigestBook,
        forwarding: Forwarding,
    ) -> None:
        self._store = store
        self._fills = fills  # a fill committing in the background is ended here
        self._commits = commits  # owns the commits of bodies already served
        self._observer = observer
        self._digests = digests
        self._forwarding = forwarding

    async def stream(
        self,
        at: Lookup,
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
                proxy_base=rewriting.proxy_base_for(
                    route.settings.prefix,
                    host=at.request.headers.get("host"),
                    scheme=at.client.scheme,
                ),
                book=self._digests,
            )
            if plan is not None:
                return await self._buffered_fill(at, plan, result, entry, sink, exchange, fill)
        # Batched: the body's chunks go to the temp file a batch per worker-thread call (waiters
        # follow ``bytes_written``), the last batch with the commit.
        writer = (
            await self._store.open_writer(at.key, entry.variant, batched=True) if storable else None
        )
        outcome = "MISS" if storable else "BYPASS"
        client_head = self._forwarding.client_head(
            head.status, head.reason, headers.set("age", "0"), outcome
        )
        if fill is not None:
            fill.publish_head(
                client_head, entry, writer.open_reader() if writer else None, storable
            )
            if fill.lead is not None and writer is not None:
                fill.lead.announce(client_head, entry, writer.tmp_path)  # to sibling workers
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
        at: Lookup,
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
            plan, result, entry, store=self._store, book=self._digests
        )
        if isinstance(out, IntegrityError):
            self._observer.integrity_failure(
                at.route.settings.prefix, f"{out.url} from {out.upstream}: {out}"
            )
            return out
        exchange.outcome = "MISS"
        if fill is not None:
            fill.finish(out)
        if sink is not None:
            stored = await self._committed(at, out)
            await serve_entry(self._store, at, stored, 0.0, "MISS", sink, exchange)
        return None

    async def _committed(self, at: Lookup, entry: Entry) -> Stored:
        for stored in await self._store.lookup(at.key):
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
            await self._store.remove(committed.key, committed.variant)
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


async def _try(step: Awaitable[None]) -> bool:
    """Await a sink step; False when the client has gone."""
    try:
        await step
    except ClientGone:
        return False
    return True
