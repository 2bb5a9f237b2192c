"""A request crossing this node: where a cacheable one lands, and the marks the node adds.

A cacheable GET/HEAD resolves to a :class:`Lookup` (its route, key, stored URL and upstream
target), which the proxy answers from the store (:func:`serve_entry`) or hands to a fill
(``filling.py``). What goes upstream names this node in ``Via`` and the client in
``X-Forwarded-*`` (:meth:`Forwarding.upstream_request`), so a chain that loops back here is
caught; what comes back names it in ``Via`` too and says where the answer came from in
``X-Cache`` (:meth:`Forwarding.client_head` for an upstream's head, :func:`serve_entry` for a
stored one).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from . import mirror
from .delivery import serve_stored
from .fetch import Route
from .http import Headers, Request, ResponseHead, strip_hop_by_hop
from .server import ClientInfo, Exchange
from .sink import H11Sink
from .store import Store, Stored

__all__ = ["Forwarding", "Lookup", "serve_entry"]


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where a cacheable request lands: its route, path class, key, and the URL and target
    its entry is stored under and fetched from."""

    route: Route
    request: Request  # the client's request
    client: ClientInfo
    upstream_target: str  # origin-form target sent upstream (to the chain or the file host)
    url: str  # the client-visible URL the entry is stored under (route prefix included)
    key: str
    path_class: mirror.PathClass
    file_host: str | None = None  # a PyPI file host to fetch from instead of the chain


@dataclass(frozen=True, slots=True)
class Forwarding:
    """This node's marks on the requests it forwards and the heads it sends back."""

    node_name: str  # as it appears in Via (the proxy's ``node_name``)

    def upstream_request(
        self, route: Route, request: Request, relative: str, client: ClientInfo
    ) -> Request:
        """``request`` as sent upstream for ``relative`` (the route-relative target)."""
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

    def client_head(self, status: int, reason: str, headers: Headers, outcome: str) -> ResponseHead:
        """The head a client is sent for an upstream's answer (``headers`` already stripped
        of hop-by-hop fields)."""
        headers = headers.set("x-cache", outcome)
        via = headers.get("via")
        headers = headers.set("via", (via + ", " if via else "") + f"1.1 {self.node_name}")
        return ResponseHead(status=status, reason=reason, headers=headers)


async def serve_entry(
    store: Store,
    at: Lookup,
    stored: Stored,
    age: float,
    outcome: str,
    sink: H11Sink,
    exchange: Exchange,
) -> None:
    """Answer ``at`` from ``stored`` with ``Age`` and the ``X-Cache`` fields of ``outcome``."""
    exchange.tier = stored.tier
    store.touch(stored)
    await serve_stored(store, stored, age, at.request, sink, _cache_fields(outcome, stored.tier))


@cache
def _cache_fields(outcome: str, tier: str) -> Headers:
    """The ``X-Cache`` fields of a stored response: one shared object per outcome and tier
    (so its serialised form is remembered with it, see ``H11Sink.start_prepared``)."""
    return Headers([("x-cache", outcome), ("x-cache-tier", tier)])
