"""Background revalidation (RFC 5861 §3, stale-while-revalidate).

A stale entry the policy lets us serve while revalidating is served at once, and
:meth:`Revalidator.start` asks the upstream about it in a task of the proxy's nursery, not the
request's, so a client that leaves does not cancel it. One revalidation runs per stored
variant, ``MAX_BACKGROUND_REVALIDATIONS`` at once across all keys, and each registers a fill
of its key like a foreground revalidation (``filling.py``), so requests that would revalidate
the key meanwhile wait for it instead of asking too.
"""

from __future__ import annotations

import logging

import trio

from . import policy
from .coalesce import FillRegistry
from .entry import Entry
from .errors import ProxyChainError
from .filling import Filler, Refetch
from .forwarding import Lookup
from .observe import Observer
from .server import Exchange
from .store import Store

__all__ = ["MAX_BACKGROUND_REVALIDATIONS", "Revalidator"]

# The proxy's logger: revalidations are its work, and operators filter its records by this name.
log = logging.getLogger("proxychain.proxy")

# Background revalidations running at once, across all keys: a burst of stale hits after an
# outage must not turn into a burst of upstream requests.
MAX_BACKGROUND_REVALIDATIONS = 16


class Revalidator:
    """Revalidates stale entries in the background, once per variant at a time."""

    def __init__(
        self,
        *,
        store: Store,
        fills: FillRegistry,
        nursery: trio.Nursery,
        observer: Observer,
        filler: Filler,
    ) -> None:
        self._store = store
        self._fills = fills
        self._nursery = nursery  # the proxy's: a revalidation outlives the request that started it
        self._observer = observer
        self._filler = filler
        self._revalidating: set[str] = set()  # "key/variant" of revalidations under way
        self._limiter = trio.CapacityLimiter(MAX_BACKGROUND_REVALIDATIONS)

    def start(self, at: Lookup, entry: Entry) -> None:
        """Revalidate ``entry`` (stored for ``at``) unless that is under way already."""
        token = f"{at.key}/{entry.variant}"
        if token in self._revalidating:
            return
        self._revalidating.add(token)
        self._nursery.start_soon(self._revalidate, at, entry, token)

    async def _revalidate(self, at: Lookup, entry: Entry, token: str) -> None:
        try:
            async with self._limiter:
                candidates = await self._store.lookup(at.key)
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
                # the key meanwhile wait for this one (``Filler.fill``) instead of asking too.
                fill = self._fills.start(at.key)
                fill.validating = stored
                try:
                    await self._filler.fetch_and_store(
                        at, None, exchange, fill, (stored, conditional)
                    )
                finally:
                    if not fill.committing_in_background:
                        self._fills.end(fill)
                result = {"REVALIDATED": "not_modified", "STALE": "failed"}.get(
                    exchange.outcome, "replaced"
                )
                self._observer.revalidation(at.route.settings.prefix, result)
                log.info("revalidated %s in the background: %s", at.url, exchange.outcome)
        except Refetch:
            self._observer.revalidation(at.route.settings.prefix, "replaced")
        except ProxyChainError as exc:
            self._observer.revalidation(at.route.settings.prefix, "failed")
            log.warning("background revalidation of %s failed: %s", at.url, exc.reason)
        finally:
            self._revalidating.discard(token)
