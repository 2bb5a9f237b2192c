"""What is asked of the cache: route configuration, path-class overrides, request directives.

Theory of operation
-------------------

Every decision of the cache controller (:mod:`proxychain.policy`) starts from three inputs,
all plain values defined here:

* :class:`RoutePolicy`, the operator's knobs for a route (lifetimes, stale windows, forced
  ``Vary`` fields);
* :class:`Override`, a package protocol's knowledge about one path class (``immutable``,
  fallback lifetimes and stale windows);
* :class:`RequestDirectives`, what the request itself asks (:func:`request_cacheability`):
  its ``Cache-Control`` directives (RFC 9111 §5.2.1), ``Pragma: no-cache`` when there is no
  ``Cache-Control`` (§5.4), whether its method may be answered from the cache (only GET and
  HEAD look up, §4; origin-only preconditions ``If-Match`` and ``If-Unmodified-Since`` bypass
  it, §4.3.2) and whether it is unsafe, so invalidates (RFC 9110 §9.2.1, RFC 9111 §4.4).

Freshness lifetime (:func:`effective_lifetime`) is RFC 9111 §4.2.1 extended by those knobs:
an ``immutable`` override for a 200/203 means "fresh forever"; explicit origin freshness
always wins over anything else; for heuristically cacheable responses without it the order
is ``negative_ttl`` (404/410), ``override.ttl``, ``route.default_ttl``, then the §4.2.2
heuristic.

Nothing here reads a clock or performs I/O; every value is frozen and hashable, so a route's
knobs can key the per-entry memo of :func:`proxychain.policy.lookup`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from . import freshness
from .http import Headers, Request, parse_cache_control

__all__ = [
    "DEFAULT_NEGATIVE_TTL",
    "IMMUTABLE_STATUSES",
    "LOOKUP_METHODS",
    "SAFE_METHODS",
    "Override",
    "RequestDirectives",
    "RoutePolicy",
    "effective_lifetime",
    "request_cacheability",
]

DEFAULT_NEGATIVE_TTL = 60.0
"""Seconds a 404/410 without explicit freshness stays fresh: long enough to absorb a burst of
clients asking for a missing module, short enough that a new release appears quickly."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1
LOOKUP_METHODS = frozenset({"GET", "HEAD"})
"""Methods a stored response may answer (RFC 9111 §4)."""
IMMUTABLE_STATUSES = frozenset({200, 203})  # never make a 404 "forever"
"""Statuses an ``immutable`` override applies to."""
_NEGATIVE_STATUSES = frozenset({404, 410})


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
    true for unsafe methods (RFC 9111 §4.4, see :func:`proxychain.policy.invalidations`).
    """

    use_cache: bool
    invalidates: bool
    no_store: bool = False
    no_cache: bool = False
    only_if_cached: bool = False
    max_age: float | None = None
    max_stale: float | None = None
    min_fresh: float | None = None


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
        use_cache=method in LOOKUP_METHODS and not origin_only,
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
    if override is not None and override.immutable and status in IMMUTABLE_STATUSES:
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
