"""The cache controller: what a shared cache may store, reuse, revalidate and invalidate.

Theory of operation
-------------------

This module turns RFC 9111 into decisions. It never performs I/O and never reads a clock:
every function takes values (a :class:`~proxychain.http.Request`, a response head, stored
:class:`~proxychain.entry.Entry` metadata, ``now`` in wall-clock seconds) and returns a frozen
decision that the shell matches exhaustively with ``typing.assert_never``::

    match policy.lookup(request, candidates, now, route=route, override=override):
        case Fresh(entry=e, age=a):            serve e with Age a
        case ServeStale(entry=e, age=a, revalidate=r): serve e; if r, revalidate in background
        case Revalidate(entry=e, conditional_headers=h): forward with h, then on_validation()
        case Miss():                           forward unconditionally; storable()?
        case GatewayTimeout():                 answer 504 (only-if-cached)
        case _: assert_never(...)

Decision order of :func:`lookup` (one place, read top to bottom):

1. Only GET and HEAD look up (RFC 9111 §4); a request carrying origin-only preconditions
   (``If-Match``, ``If-Unmodified-Since``; RFC 9111 §4.3.2) bypasses the cache.
2. Among the stored variants, those whose recorded Vary values match the request (§4.1) are
   selectable; the most recently received wins (``response_time``; §4.1 suggests ``Date``,
   but the shell's own clock cannot be skewed by the origin).
3. A response ``no-cache`` (unqualified, §5.2.2.4) or a request ``no-cache`` / ``Pragma:
   no-cache`` (§5.2.1.4, §5.4) forces validation.
4. A fresh response (§4.2) that also satisfies the request's ``max-age`` and ``min-fresh``
   (§5.2.1.1, §5.2.1.3) is served.
5. A stale response is served stale only when no directive forbids it (§4.2.4: ``no-cache``,
   ``must-revalidate``, ``proxy-revalidate`` and, for a shared cache, ``s-maxage``) and either
   the client accepts the staleness (``max-stale``, §5.2.1.2) or it falls inside the
   ``stale-while-revalidate`` window (RFC 5861 §3; route/override fallbacks apply when the
   origin gives none), the latter with a background revalidation.
6. Otherwise: revalidate, or ``504`` for ``only-if-cached`` (§5.2.1.7).

``stale-if-error`` (RFC 5861 §4) is handled by :func:`on_upstream_error`. When the origin
cannot be reached the cache counts as disconnected (§4.2.4), so a stored response may be
served within the ``stale-if-error`` window of the response or the request, the client's
``max-stale``, or the route's fallback ``max_stale`` -- but never when a directive of step 5
forbids stale use, which is a MUST of §4.2.4 that RFC 5861 does not lift: then the answer is
``504`` (§5.2.2.2). A request ``no-cache`` likewise fails rather than serving unvalidated.

Freshness lifetime (:func:`effective_lifetime`) is RFC 9111 §4.2.1 extended by route knobs:
an ``immutable`` override for a 200/203 means "fresh forever"; explicit origin freshness
always wins over anything else; for heuristically cacheable responses without it the order
is ``negative_ttl`` (404/410), ``override.ttl``, ``route.default_ttl``, then the §4.2.2
heuristic. Client ``no-cache``/``max-age``/``min-fresh`` are ignored only for immutable
content and only when the route sets ``ignore_client_no_cache`` (validation could not change
the answer, so the deviation from §5.2.1.4 is invisible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from urllib.parse import urljoin, urlsplit

from . import freshness, keys
from .entry import Entry
from .http import (
    CacheControl,
    ETag,
    Headers,
    Request,
    ResponseHead,
    format_http_date,
    parse_cache_control,
    parse_etag_list,
    parse_http_date,
    strip_hop_by_hop,
)

__all__ = [
    "DEFAULT_NEGATIVE_TTL",
    "STORED_ONLY_FIELDS",
    "UNDERSTOOD_STATUSES",
    "UPSTREAM_ETAG_FIELD",
    "Fail",
    "Fresh",
    "Freshen",
    "GatewayTimeout",
    "LookupDecision",
    "Miss",
    "Override",
    "Replace",
    "RequestDirectives",
    "Revalidate",
    "RoutePolicy",
    "ServeStale",
    "age_field",
    "answer_conditional",
    "cached_response_headers",
    "conditional_headers",
    "effective_lifetime",
    "invalidations",
    "lookup",
    "not_modified_headers",
    "on_upstream_error",
    "on_validation",
    "request_cacheability",
    "storable",
    "stored_headers",
    "why_not_storable",
]

# The upstream's own ETag of a body the proxy rewrote (whose ETag is then ours): sent upstream
# to revalidate, never to a client.
UPSTREAM_ETAG_FIELD = "x-upstream-etag"
# Fields kept with a stored response for the proxy's own use: dropped from what an upstream
# sends and from every answer to a client.
STORED_ONLY_FIELDS = (UPSTREAM_ETAG_FIELD,)

DEFAULT_NEGATIVE_TTL = 60.0
"""Seconds a 404/410 without explicit freshness stays fresh: long enough to absorb a burst of
clients asking for a missing module, short enough that a new release appears quickly."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1
_LOOKUP_METHODS = frozenset({"GET", "HEAD"})
_IMMUTABLE_STATUSES = frozenset({200, 203})  # never make a 404 "forever"
_NEGATIVE_STATUSES = frozenset({404, 410})
_STALE_FORBIDDEN = ("no-cache", "must-revalidate", "proxy-revalidate", "s-maxage")
# RFC 9111 §3.2: never taken from a 304; Content-Encoding and Content-Range describe the
# stored body bytes, which a 304 does not replace.
_NOT_UPDATED = frozenset({"content-length", "content-range", "content-encoding"})
_NOT_IN_304 = frozenset({"content-length", "content-range", "transfer-encoding"})

UNDERSTOOD_STATUSES = frozenset(
    {*range(200, 207), *range(300, 306), 307, 308, *range(400, 418), 421, 422, 426, 428, 429}
    | {431, 451, *range(500, 506), 511}
)
"""Status codes whose caching semantics this cache implements (for ``must-understand``)."""


# ---- configuration values ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutePolicy:
    """Per-route caching knobs; every duration is in seconds.

    Attributes:
        negative_ttl: lifetime of a 404/410 without explicit freshness.
        swr_default: stale-while-revalidate window when the origin gives none.
        max_stale: stale-if-error window when neither origin nor client gives one.
        ignore_client_no_cache: ignore client ``no-cache``/``max-age``/``min-fresh`` for
            immutable content.
        heuristic_fraction, heuristic_cap: the RFC 9111 §4.2.2 heuristic.
        default_ttl: lifetime for heuristically cacheable responses without explicit
            freshness, replacing the Last-Modified heuristic; ``None`` keeps the heuristic.
        forced_vary: request fields always part of the variant key.
    """

    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    swr_default: float = 0.0
    max_stale: float = 0.0
    ignore_client_no_cache: bool = False
    heuristic_fraction: float = freshness.DEFAULT_HEURISTIC_FRACTION
    heuristic_cap: float = freshness.DEFAULT_HEURISTIC_CAP
    default_ttl: float | None = None
    forced_vary: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Override:
    """A package protocol's knowledge about one path class.

    Attributes:
        immutable: a 200/203 for this path never changes: fresh forever, never revalidated.
        ttl: lifetime when the origin gives no explicit freshness.
        swr: stale-while-revalidate window when the origin gives none.
        max_stale: stale-if-error window when neither origin nor client gives one.
    """

    immutable: bool = False
    ttl: float | None = None
    swr: float | None = None
    max_stale: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestDirectives:
    """What a request asks of the cache (RFC 9111 §5.2.1, §5.4).

    ``max_stale`` is ``math.inf`` for a bare ``max-stale``. ``use_cache`` is false for methods
    other than GET/HEAD and for requests with origin-only preconditions; ``invalidates`` is
    true for unsafe methods (RFC 9111 §4.4, see :func:`invalidations`).
    """

    use_cache: bool
    invalidates: bool
    no_store: bool = False
    no_cache: bool = False
    only_if_cached: bool = False
    max_age: float | None = None
    max_stale: float | None = None
    min_fresh: float | None = None


# ---- decisions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Fresh:
    """Serve ``entry`` as is; ``age`` is its current age in seconds."""

    entry: Entry
    age: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeStale:
    """Serve the stale ``entry``; when ``revalidate``, also revalidate it in the background."""

    entry: Entry
    age: float
    revalidate: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Revalidate:
    """Forward the request with ``conditional_headers`` added, then call :func:`on_validation`."""

    entry: Entry
    age: float
    conditional_headers: Headers


@dataclass(frozen=True, slots=True, kw_only=True)
class Miss:
    """Nothing usable is stored: forward the request unconditionally."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayTimeout:
    """Answer 504 without contacting the upstream (``only-if-cached``, RFC 9111 §5.2.1.7)."""

    reason: str


LookupDecision = Fresh | ServeStale | Revalidate | Miss | GatewayTimeout


@dataclass(frozen=True, slots=True, kw_only=True)
class Freshen:
    """A 304 validated ``entry`` (already updated): store its metadata and serve it."""

    entry: Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Replace:
    """The upstream answer replaces the stored one.

    ``refetch`` is true for a 304 that matches no stored response (RFC 9111 §4.3.4): it
    carries no body, so the request must be repeated without conditionals.
    """

    reason: str
    refetch: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Fail:
    """Answer with ``status``: nothing servable without the upstream."""

    status: int
    reason: str


# ---- requests ----------------------------------------------------------------------------


def request_cacheability(request: Request) -> RequestDirectives:
    """Classify ``request`` and parse its cache directives; never raises on bad input."""
    # Remembered with the fields: a client repeats its header block request after request
    # (the server shares one Headers object per block).
    return request.headers.memo(
        (request_cacheability, request.method), partial(_directives, request.method.upper())
    )


def _directives(method: str, headers: Headers) -> RequestDirectives:
    cc = parse_cache_control(headers)
    no_cache = "no-cache" in cc
    if "cache-control" not in headers:
        no_cache = "no-cache" in (t.lower() for t in headers.get_list("pragma"))
    max_stale: float | None = None
    if "max-stale" in cc:
        raw = cc.directives["max-stale"]
        max_stale = math.inf if raw is None else _opt_float(cc.seconds("max-stale"))
    # An unreadable max-age is taken as 0: the client wants something recent.
    max_age = None if "max-age" not in cc else float(cc.seconds("max-age") or 0)
    origin_only = "if-match" in headers or "if-unmodified-since" in headers
    return RequestDirectives(
        use_cache=method in _LOOKUP_METHODS and not origin_only,
        invalidates=method not in SAFE_METHODS,
        no_store="no-store" in cc,
        no_cache=no_cache,
        only_if_cached="only-if-cached" in cc,
        max_age=max_age,
        max_stale=max_stale,
        min_fresh=_opt_float(cc.seconds("min-fresh")),
    )


def _opt_float(value: int | None) -> float | None:
    return None if value is None else float(value)


def _within(staleness: float, window: float | None) -> bool:
    return window is not None and window > 0 and staleness <= window


def _stale_forbidden(cc: CacheControl) -> bool:
    # Qualified no-cache="field" only restricts the named fields, which are never stored.
    return any(name in cc for name in _STALE_FORBIDDEN if name != "no-cache") or (
        "no-cache" in cc and cc.directives["no-cache"] is None
    )


def effective_lifetime(
    status: int,
    headers: Headers,
    response_time: float,
    *,
    route: RoutePolicy | None = None,
    override: Override | None = None,
) -> float:
    """Freshness lifetime in seconds with route knobs applied (``math.inf`` for immutable)."""
    route = route or RoutePolicy()
    if override is not None and override.immutable and status in _IMMUTABLE_STATUSES:
        return math.inf
    explicit = freshness.explicit_lifetime(headers, response_time)
    if explicit is not None:
        return explicit
    if not freshness.heuristic_allowed(status, parse_cache_control(headers)):
        return 0.0
    if status in _NEGATIVE_STATUSES:
        return route.negative_ttl
    if override is not None and override.ttl is not None:
        return override.ttl
    if route.default_ttl is not None:
        return route.default_ttl
    heuristic = freshness.heuristic_lifetime(
        headers, response_time, fraction=route.heuristic_fraction, cap=route.heuristic_cap
    )
    return 0.0 if heuristic is None else heuristic


def _selectable(entry: Entry, request: Request, route: RoutePolicy) -> bool:
    if "vary" not in entry.headers:
        if not entry.vary and not route.forced_vary:
            return True  # nothing to match: the common case, decided without building sets
        names: tuple[str, ...] | None = ()
    else:
        names = keys.vary_names(entry.head)
    if names is None:
        return False
    return keys.matches(entry.vary, request.headers, (*route.forced_vary, *names))


@dataclass(frozen=True, slots=True)
class _Freshness:
    """What :func:`lookup` derives from a stored entry and the route knobs alone: worked out
    once per entry (see :func:`_freshness`), not on every hit."""

    lifetime: float  # effective_lifetime
    initial_age: float  # freshness.corrected_initial_age
    cc: CacheControl


def _freshness(entry: Entry, route: RoutePolicy, override: Override | None) -> _Freshness:
    def compute(headers: Headers) -> _Freshness:
        lifetime = effective_lifetime(
            entry.status, headers, entry.response_time, route=route, override=override
        )
        initial_age = freshness.corrected_initial_age(entry)
        return _Freshness(lifetime, initial_age, parse_cache_control(headers))

    # Kept with the entry's fields; everything else it depends on is in the key.
    key = (_freshness, entry.status, entry.request_time, entry.response_time, route, override)
    return entry.headers.memo(key, compute)


_DEFAULT_ROUTE = RoutePolicy()


def lookup(
    request: Request,
    candidates: Sequence[Entry],
    now: float,
    route: RoutePolicy | None = None,
    override: Override | None = None,
) -> LookupDecision:
    """Decide how to answer ``request`` from the stored variants of its primary key.

    Args:
        request: the client's request.
        candidates: every stored entry for ``keys.primary_key(request.method, url)``.
        now: wall-clock seconds.
        route, override: route knobs and the path class's override.

    Returns:
        One of :data:`LookupDecision`; see the module docstring for the order.
    """
    route = route or _DEFAULT_ROUTE
    d = request_cacheability(request)
    if not d.use_cache:
        return Miss(reason="method or preconditions not answerable from cache")
    matching = [c for c in candidates if _selectable(c, request, route)]
    if not matching:
        if d.only_if_cached:
            return GatewayTimeout(reason="only-if-cached and nothing stored")
        return Miss(reason="no stored response matches")
    entry = matching[0] if len(matching) == 1 else max(matching, key=_recency)
    known = _freshness(entry, route, override)
    age = freshness.current_age(entry, now, initial_age=known.initial_age)
    lifetime = known.lifetime
    cc = known.cc
    relaxed = math.isinf(lifetime) and route.ignore_client_no_cache

    def must_validate(reason: str) -> LookupDecision:
        if d.only_if_cached:
            return GatewayTimeout(reason=f"only-if-cached but {reason}")
        return Revalidate(
            entry=entry, age=age, conditional_headers=conditional_headers(entry, matching)
        )

    if not math.isinf(lifetime) and "no-cache" in cc and cc.directives["no-cache"] is None:
        return must_validate("response no-cache")
    if d.no_cache and not relaxed:
        return must_validate("request no-cache")
    fresh = lifetime > age
    client_ok = relaxed or (
        (d.max_age is None or age <= d.max_age)
        and (d.min_fresh is None or lifetime - age >= d.min_fresh)
    )
    if fresh and client_ok:
        return Fresh(entry=entry, age=age)
    if fresh:
        return must_validate("too old for the client")
    staleness = age - lifetime
    if not _stale_forbidden(cc):
        # The client opted into staleness (§5.2.1.2); max-age/min-fresh still bind it.
        accepted = d.max_stale is not None and staleness <= d.max_stale
        if accepted and (d.max_age is None or age <= d.max_age) and d.min_fresh is None:
            return ServeStale(entry=entry, age=age, revalidate=False)
        swr = freshness.stale_while_revalidate(entry.headers)
        if swr is None and override is not None:
            swr = override.swr
        if swr is None:
            swr = route.swr_default
        if d.max_age is None and d.min_fresh is None and _within(staleness, swr):
            return ServeStale(entry=entry, age=age, revalidate=True)
    return must_validate("stale")


def conditional_headers(entry: Entry, candidates: Sequence[Entry] = ()) -> Headers:
    """Validators for revalidating ``entry`` (RFC 9111 §4.3.1, RFC 9110 §13.1).

    ``If-None-Match`` lists the ETags of ``entry`` and the other ``candidates`` (the matching
    variants); ``If-Modified-Since`` is the entry's ``Last-Modified``, else its ``Date``.
    """
    tags: list[str] = []
    for stored in (entry, *candidates):
        lines = stored.headers.get_all("etag")
        tag = ETag.parse(lines[0]) if lines else None
        if tag is not None and str(tag) not in tags:
            tags.append(str(tag))
    out = Headers()
    if tags:
        out = out.set("if-none-match", ", ".join(tags))
    for name in ("last-modified", "date"):
        lines = entry.headers.get_all(name)
        if lines and parse_http_date(lines[0]) is not None:
            return out.set("if-modified-since", lines[0].strip())
    return out


# ---- storing -----------------------------------------------------------------------------


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
        (override is not None and override.immutable and status in _IMMUTABLE_STATUSES)
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


def _unstorable_fields(headers: Headers) -> set[str]:
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
        *_unstorable_fields(head.headers), *STORED_ONLY_FIELDS
    )
    if response_time is not None and parse_http_date(out.get("date")) is None:
        out = out.set("date", format_http_date(response_time))
    return out


# ---- validation, errors, invalidation ----------------------------------------------------


def _first_etag(headers: Headers) -> ETag | None:
    lines = headers.get_all("etag")
    return ETag.parse(lines[0]) if lines else None


def _select_for_304(pool: Sequence[Entry], head: Headers) -> Entry | None:
    """RFC 9111 §4.3.4 selection of the stored response a 304 refers to."""
    tag = _first_etag(head)
    if tag is not None:
        chosen = [
            e
            for e in pool
            if (stored := _first_etag(e.headers)) is not None
            and (tag.weak_match(stored) if tag.weak else tag.strong_match(stored))
        ]
    elif (modified := parse_http_date(head.get("last-modified"))) is not None:
        chosen = [e for e in pool if parse_http_date(e.headers.get("last-modified")) == modified]
    else:
        # No validator: RFC 9111 only selects a lone stored response lacking validators too;
        # a lone response we just asked about is the only sensible referent either way.
        chosen = list(pool) if len(pool) == 1 else []
    return pool[0] if pool and pool[0] in chosen else max(chosen, key=_recency, default=None)


def _recency(entry: Entry) -> float:
    return entry.response_time


def on_validation(
    entry: Entry,
    head: ResponseHead,
    request_time: float,
    response_time: float,
    *,
    candidates: Sequence[Entry] = (),
) -> Freshen | Replace:
    """Apply the upstream's answer to a conditional request for ``entry``.

    A 304 updates the selected stored response (RFC 9111 §4.3.4): every field from the 304
    replaces the stored one except those excepted by §3.2 (Content-Length and the fields
    describing the stored body bytes), hop-by-hop ones, and fields named by a qualified
    ``no-cache``/``private``; ``Age`` and ``Date`` describe the new message, so a stale
    ``Age`` is dropped and a missing ``Date`` becomes ``response_time``. Any other status
    replaces the entry (the shell routes 500/502/503/504 to :func:`on_upstream_error`).
    """
    if head.status != 304:
        return Replace(reason=f"upstream answered {head.status}")
    pool = [entry, *(c for c in candidates if c is not entry)]
    selected = _select_for_304(pool, head.headers)
    if selected is None:
        return Replace(reason="304 matches no stored response", refetch=True)
    incoming = strip_hop_by_hop(head.headers).remove(
        *_NOT_UPDATED, *_unstorable_fields(head.headers)
    )
    updated = selected.headers.update(incoming)
    if "age" not in incoming:
        updated = updated.remove("age")
    if parse_http_date(incoming.get("date")) is None:
        updated = updated.set("date", format_http_date(response_time))
    return Freshen(
        entry=selected.replace(
            headers=updated, request_time=request_time, response_time=response_time
        )
    )


def on_upstream_error(
    entry: Entry | None,
    request: Request,
    now: float,
    route: RoutePolicy | None = None,
    override: Override | None = None,
    status_hint: int = 502,
) -> ServeStale | Fail:
    """Decide what to answer when the upstream failed (connect error, timeout, 500/502/503/504).

    See the module docstring for the stale-if-error rules. ``status_hint`` comes from the
    error (``errors.UpstreamError.status_hint``); forbidden stale use answers 504.
    """
    if entry is None:
        return Fail(status=status_hint, reason="upstream failed and nothing is stored")
    route = route or RoutePolicy()
    d = request_cacheability(request)
    age = freshness.current_age(entry, now)
    lifetime = effective_lifetime(
        entry.status, entry.headers, entry.response_time, route=route, override=override
    )
    if math.isinf(lifetime) and (route.ignore_client_no_cache or not d.no_cache):
        return ServeStale(entry=entry, age=age, revalidate=False)
    if d.no_cache:
        return Fail(status=status_hint, reason="client requires validation")
    if _stale_forbidden(parse_cache_control(entry.headers)):
        return Fail(status=504, reason="stored response must be revalidated")
    window = freshness.stale_if_error(entry.headers, request.headers)
    if window is None and override is not None:
        window = override.max_stale
    if window is None:
        window = route.max_stale
    staleness = max(0.0, age - lifetime)
    if staleness <= window or (d.max_stale is not None and staleness <= d.max_stale):
        return ServeStale(entry=entry, age=age, revalidate=False)
    return Fail(status=status_hint, reason="stored response too stale to serve on error")


def _same_origin_target(value: str | None, request: Request) -> str | None:
    if not value or any(ch.isspace() or ord(ch) < 0x20 for ch in value.strip()):
        return None
    try:
        parts = urlsplit(urljoin(request.target, value.strip()))
    except ValueError:
        return None
    if parts.scheme or parts.netloc:
        same = (
            bool(request.authority)
            and parts.netloc.lower() == request.authority.lower()
            and parts.scheme.lower() in ("", request.scheme.lower())
        )
        if not same:
            return None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return keys.normalise_target(target)


def invalidations(request: Request, head: ResponseHead) -> list[str]:
    """Targets (path and query, as :func:`keys.normalise_target` gives them) to invalidate.

    RFC 9111 §4.4: a non-error (2xx/3xx) response to an unsafe method invalidates the target
    URI and the same-origin ``Location`` / ``Content-Location`` URIs; relative references are
    resolved against the request target, absolute ones must share its authority.
    """
    if request.method.upper() in SAFE_METHODS or not 200 <= head.status < 400:
        return []
    out = [keys.normalise_target(request.target)]
    for name in ("location", "content-location"):
        lines = head.headers.get_all(name)
        target = _same_origin_target(lines[0] if lines else None, request)
        if target is not None and target not in out:
            out.append(target)
    return out


def answer_conditional(request: Request, entry: Entry) -> int | None:
    """304 when the client's own conditional matches the stored response, else ``None``.

    RFC 9111 §4.3.2 with RFC 9110 §13.2.2 precedence: ``If-None-Match`` (weak comparison;
    ``*`` matches) decides alone when present; otherwise ``If-Modified-Since`` is compared
    with the stored ``Last-Modified``, else ``Date``, else the time it was received. Only for
    GET/HEAD and stored 2xx responses (RFC 9110 §13.2.1).
    """
    if request.method.upper() not in _LOOKUP_METHODS or not 200 <= entry.status < 300:
        return None
    if "if-none-match" in request.headers:
        wanted = parse_etag_list(request.headers.get("if-none-match"))
        stored = _first_etag(entry.headers)
        if wanted is None or (stored is not None and any(t.weak_match(stored) for t in wanted)):
            return 304
        return None
    since_lines = request.headers.get_all("if-modified-since")
    since = parse_http_date(since_lines[0]) if since_lines else None
    if since is None:
        return None
    stamp = parse_http_date(entry.headers.get("last-modified"))
    if stamp is None:
        stamp = freshness.date_value(entry.headers, entry.response_time)
    return 304 if stamp <= since else None


def cached_response_headers(entry: Entry, age: float) -> Headers:
    """The stored header fields a client is sent, with ``Age`` set to whole seconds (RFC 9111
    §5.1): all but :data:`STORED_ONLY_FIELDS`."""
    return entry.headers.remove(*STORED_ONLY_FIELDS).set("age", age_field(age))


def age_field(age: float) -> str:
    """The ``Age`` value for ``age`` seconds: whole seconds, saturating at 2**31 (§5.1)."""
    return str(min(int(max(0.0, age)), 2**31))


def not_modified_headers(entry: Entry, age: float) -> Headers:
    """Header fields for a 304 generated from ``entry`` (RFC 9110 §15.4.5)."""
    return cached_response_headers(entry, age).remove(*_NOT_IN_304)
