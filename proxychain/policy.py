"""The cache controller: may a stored response answer this request, and how.

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

This module is also the controller's public surface, re-exporting the rest of it so callers
only ever write ``policy.X``: :mod:`~proxychain.directives` (route knobs, request directives,
freshness lifetime), :mod:`~proxychain.storability` (storing, §3) and
:mod:`~proxychain.validation` (validation, invalidation and served fields; §4.3, §4.4, §5.1).

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

Client ``no-cache``/``max-age``/``min-fresh`` are ignored only for immutable content (an
``immutable`` override, so an infinite :func:`effective_lifetime`) and only when the route
sets ``ignore_client_no_cache`` (validation could not change the answer, so the deviation
from §5.2.1.4 is invisible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import freshness, keys
from .directives import (
    DEFAULT_NEGATIVE_TTL,
    Override,
    RequestDirectives,
    RoutePolicy,
    effective_lifetime,
    request_cacheability,
)
from .entry import Entry
from .http import CacheControl, Headers, Request, parse_cache_control
from .storability import (
    STORED_ONLY_FIELDS,
    UNDERSTOOD_STATUSES,
    UPSTREAM_ETAG_FIELD,
    storable,
    stored_headers,
    why_not_storable,
)
from .validation import (
    Freshen,
    Replace,
    age_field,
    answer_conditional,
    cached_response_headers,
    conditional_headers,
    invalidations,
    not_modified_headers,
    on_validation,
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

_STALE_FORBIDDEN = ("no-cache", "must-revalidate", "proxy-revalidate", "s-maxage")


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
class Fail:
    """Answer with ``status``: nothing servable without the upstream."""

    status: int
    reason: str


# ---- reuse: lookup and upstream errors ---------------------------------------------------


def _within(staleness: float, window: float | None) -> bool:
    return window is not None and window > 0 and staleness <= window


def _stale_forbidden(cc: CacheControl) -> bool:
    # Qualified no-cache="field" only restricts the named fields, which are never stored.
    return any(name in cc for name in _STALE_FORBIDDEN if name != "no-cache") or (
        "no-cache" in cc and cc.directives["no-cache"] is None
    )


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


def _recency(entry: Entry) -> float:
    return entry.response_time


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
