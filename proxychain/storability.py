"""Storing: whether a shared cache may store a response, and which of its fields.

Theory of operation
-------------------

:func:`why_not_storable` is RFC 9111 §3 for a **shared** cache, checked in a fixed order so
the reason logged is the first that applies: only final responses to GET are stored, and
not a 206, a 304 or one with ``Content-Range``; a request or response ``no-store``
(§5.2.1.5, §5.2.2.5) and an unqualified ``private`` (§5.2.2.7) forbid storing, and
``Vary: *`` is not stored since no request could ever select it (§4.1); ``must-understand``
(§5.2.2.3) overrides ``no-store`` only for the status codes this cache implements
(:data:`UNDERSTOOD_STATUSES`); a request with ``Authorization`` is stored only when the
response says ``public``, ``s-maxage`` or ``must-revalidate`` (§3.5). What remains must
carry explicit freshness (``max-age``, ``s-maxage``, ``Expires``), say ``public``, have a
heuristically cacheable status (RFC 9110 §15.1), or be a 200/203 of an ``immutable`` path
class.

:func:`stored_headers` then chooses the fields kept (§3.1): hop-by-hop and Connection-named
fields go, as do fields named by a qualified ``no-cache``/``private`` (§5.2.2.4, §5.2.2.7,
:func:`unstorable_fields`) and the proxy's own :data:`STORED_ONLY_FIELDS`, which an upstream
must not be able to forge.
"""

from __future__ import annotations

from . import freshness, keys
from .directives import IMMUTABLE_STATUSES, Override, RoutePolicy
from .http import (
    Headers,
    Request,
    ResponseHead,
    format_http_date,
    parse_cache_control,
    parse_http_date,
    strip_hop_by_hop,
)

__all__ = [
    "STORED_ONLY_FIELDS",
    "UNDERSTOOD_STATUSES",
    "UPSTREAM_ETAG_FIELD",
    "storable",
    "stored_headers",
    "unstorable_fields",
    "why_not_storable",
]

# The upstream's own ETag of a body the proxy rewrote (whose ETag is then ours): sent upstream
# to revalidate, never to a client.
UPSTREAM_ETAG_FIELD = "x-upstream-etag"
# Fields kept with a stored response for the proxy's own use: dropped from what an upstream
# sends and from every answer to a client.
STORED_ONLY_FIELDS = (UPSTREAM_ETAG_FIELD,)

UNDERSTOOD_STATUSES = frozenset(
    {*range(200, 207), *range(300, 306), 307, 308, *range(400, 418), 421, 422, 426, 428, 429}
    | {431, 451, *range(500, 506), 511}
)
"""Status codes whose caching semantics this cache implements (for ``must-understand``)."""


def why_not_storable(
    request: Request,
    head: ResponseHead,
    route: RoutePolicy | None = None,
    override: Override | None = None,
) -> str | None:
    """The RFC 9111 §3 reason a shared cache must not store ``head``, or ``None`` if it may."""
    del route  # every route knob only changes lifetimes, never storability
    status = head.status
    cc = parse_cache_control(head.headers)
    request_cc = parse_cache_control(request.headers)
    must_understand = "must-understand" in cc
    checks: tuple[tuple[bool, str], ...] = (
        (request.method.upper() != "GET", "only responses to GET are stored"),
        (not 200 <= status <= 599, "status is not final"),
        (status == 206, "partial content is not stored"),
        (status == 304, "304 is not a storable response"),
        ("no-store" in request_cc, "request no-store"),
        (must_understand and status not in UNDERSTOOD_STATUSES, "must-understand"),
        ("no-store" in cc and not must_understand, "response no-store"),
        ("private" in cc and cc.directives["private"] is None, "private"),
        (
            "authorization" in request.headers
            and not any(n in cc for n in ("public", "s-maxage", "must-revalidate")),
            "request has Authorization",
        ),
        (keys.vary_names(head) is None, "Vary: *"),
        ("content-range" in head.headers, "Content-Range on a complete response"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    allowed = (
        (override is not None and override.immutable and status in IMMUTABLE_STATUSES)
        or any(n in cc for n in ("max-age", "s-maxage", "public"))
        or "expires" in head.headers
        or status in freshness.HEURISTICALLY_CACHEABLE
    )
    return None if allowed else "no explicit freshness and status not heuristically cacheable"


def storable(
    request: Request,
    head: ResponseHead,
    route: RoutePolicy | None = None,
    override: Override | None = None,
) -> bool:
    """Whether a shared cache may store ``head`` as the response to ``request`` (RFC 9111 §3)."""
    return why_not_storable(request, head, route=route, override=override) is None


def unstorable_fields(headers: Headers) -> set[str]:
    """Fields named by qualified no-cache / private (RFC 9111 §5.2.2.4, §5.2.2.7)."""
    cc = parse_cache_control(headers)
    names: set[str] = set()
    for directive in ("no-cache", "private"):
        arg = cc.directives.get(directive)
        if arg:
            names.update(part.strip().lower() for part in arg.split(",") if part.strip())
    return names


def stored_headers(head: ResponseHead, *, response_time: float | None = None) -> Headers:
    """The header fields to store for ``head``.

    Drops hop-by-hop and Connection-named fields (RFC 9111 §3.1), the fields a qualified
    ``no-cache``/``private`` names, and :data:`STORED_ONLY_FIELDS` (an upstream's cannot pass
    for ours). With ``response_time``, a missing or invalid ``Date`` is replaced by that
    time, as RFC 9110 §6.6.1 asks of a caching recipient.
    """
    out = strip_hop_by_hop(head.headers).remove(
        *unstorable_fields(head.headers), *STORED_ONLY_FIELDS
    )
    if response_time is not None and parse_http_date(out.get("date")) is None:
        out = out.set("date", format_http_date(response_time))
    return out
