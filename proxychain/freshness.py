"""Freshness and age of stored responses for a shared cache (RFC 9111 §4.2, RFC 5861).

Theory of operation
-------------------

A stored response is *fresh* while its freshness lifetime exceeds its current age
(RFC 9111 §4.2). Everything here is arithmetic on header values and the two times the shell
records per entry (``request_time``, ``response_time``); nothing reads a clock.

Freshness lifetime (§4.2.1), first match wins, for a **shared** cache:

1. ``s-maxage`` (§5.2.2.10), then ``max-age`` (§5.2.2.1);
2. ``Expires`` minus ``Date`` (``Date`` missing: the time the response was received, as
   RFC 9110 §6.6.1 has recipients record it). An invalid ``Expires`` (``0``, garbage) means
   "already expired" (§5.3);
3. otherwise a *heuristic* lifetime (§4.2.2), allowed only when the status is heuristically
   cacheable (RFC 9110 §15.1) or the response says ``public``: a fraction of the time since
   ``Last-Modified``, capped.

Invalid freshness information (``max-age=a3600``) makes the response stale, as §4.2.1
encourages; when a directive repeats, the first occurrence wins (``http.parse_cache_control``).

Current age is the full §4.2.3 computation::

    apparent_age = max(0, response_time - date_value)
    corrected_age_value = age_value + (response_time - request_time)
    corrected_initial_age = max(apparent_age, corrected_age_value)
    current_age = corrected_initial_age + (now - response_time)

An ``Age`` header that is not one non-negative integer (after de-duplicating identical
values) is ignored as invalid (§5.1).

RFC 5861 adds two windows past expiry: ``stale-while-revalidate`` (§3, from the response) and
``stale-if-error`` (§4, from the response or the request). The policy decides when they
apply; this module only reads them.
"""

from __future__ import annotations

from .entry import Entry
from .http import CacheControl, Headers, parse_cache_control, parse_http_date

__all__ = [
    "DEFAULT_HEURISTIC_CAP",
    "DEFAULT_HEURISTIC_FRACTION",
    "HEURISTICALLY_CACHEABLE",
    "age_value",
    "corrected_initial_age",
    "current_age",
    "date_value",
    "explicit_lifetime",
    "freshness_lifetime",
    "heuristic_allowed",
    "heuristic_lifetime",
    "stale_if_error",
    "stale_while_revalidate",
]

DEFAULT_HEURISTIC_FRACTION = 0.1
"""Share of (Date - Last-Modified) used as heuristic lifetime; RFC 9111 §4.2.2 suggests 10%."""

DEFAULT_HEURISTIC_CAP = 86_400.0
"""Upper bound of a heuristic lifetime in seconds (one day, the old RFC 2616 warning limit)."""

HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
"""Status codes defined as heuristically cacheable (RFC 9110 §15.1, RFC 7538 for 308)."""


def date_value(headers: Headers, response_time: float) -> float:
    """The response's ``Date`` in seconds, or ``response_time`` when missing or invalid."""
    lines = headers.get_all("date")
    parsed = parse_http_date(lines[0]) if lines else None
    return response_time if parsed is None else parsed


def age_value(headers: Headers) -> float:
    """The ``Age`` header in seconds; 0 when absent or invalid (RFC 9111 §5.1)."""
    values = set(headers.get_list("age"))
    if len(values) != 1:
        return 0.0
    (value,) = values
    return float(min(int(value), 2**31)) if value.isascii() and value.isdigit() else 0.0


def explicit_lifetime(headers: Headers, response_time: float) -> float | None:
    """The explicit freshness lifetime a shared cache uses, or ``None`` when there is none.

    Returns 0 for invalid values, which makes the response stale (RFC 9111 §4.2.1, §5.3).
    """
    cc = parse_cache_control(headers)
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = cc.seconds(name)
            return 0.0 if seconds is None else float(seconds)
    expires = headers.get_all("expires")
    if not expires:
        return None
    parsed = parse_http_date(expires[0])
    if parsed is None:
        return 0.0
    return max(0.0, parsed - date_value(headers, response_time))


def heuristic_allowed(status: int, cc: CacheControl) -> bool:
    """Whether RFC 9111 §4.2.2 lets a cache assign a heuristic lifetime to this response."""
    return status in HEURISTICALLY_CACHEABLE or "public" in cc


def heuristic_lifetime(
    headers: Headers,
    response_time: float,
    *,
    fraction: float = DEFAULT_HEURISTIC_FRACTION,
    cap: float = DEFAULT_HEURISTIC_CAP,
) -> float | None:
    """``fraction`` of the time since ``Last-Modified``, at most ``cap``; ``None`` without one."""
    lines = headers.get_all("last-modified")
    modified = parse_http_date(lines[0]) if lines else None
    if modified is None:
        return None
    elapsed = date_value(headers, response_time) - modified
    return min(cap, max(0.0, elapsed * fraction))


def freshness_lifetime(
    status: int,
    headers: Headers,
    response_time: float,
    *,
    fraction: float = DEFAULT_HEURISTIC_FRACTION,
    cap: float = DEFAULT_HEURISTIC_CAP,
) -> float:
    """The plain RFC 9111 §4.2.1 lifetime for a shared cache (no route knobs): explicit, else
    heuristic when allowed, else 0."""
    explicit = explicit_lifetime(headers, response_time)
    if explicit is not None:
        return explicit
    if not heuristic_allowed(status, parse_cache_control(headers)):
        return 0.0
    heuristic = heuristic_lifetime(headers, response_time, fraction=fraction, cap=cap)
    return 0.0 if heuristic is None else heuristic


def corrected_initial_age(entry: Entry) -> float:
    """RFC 9111 §4.2.3 ``corrected_initial_age`` of ``entry``: its age when it arrived."""
    apparent_age = max(0.0, entry.response_time - date_value(entry.headers, entry.response_time))
    response_delay = max(0.0, entry.response_time - entry.request_time)
    corrected_age_value = age_value(entry.headers) + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(entry: Entry, now: float, *, initial_age: float | None = None) -> float:
    """RFC 9111 §4.2.3 current age of ``entry`` at wall time ``now``, in seconds (never < 0).

    ``initial_age`` is :func:`corrected_initial_age` when the caller already knows it.
    """
    if initial_age is None:
        initial_age = corrected_initial_age(entry)
    resident_time = max(0.0, now - entry.response_time)
    return initial_age + resident_time


def _window(cc: CacheControl, name: str) -> float | None:
    if name not in cc:
        return None
    seconds = cc.seconds(name)
    return 0.0 if seconds is None else float(seconds)


def stale_while_revalidate(response_headers: Headers) -> float | None:
    """The response's ``stale-while-revalidate`` window (RFC 5861 §3), ``None`` when absent."""
    return _window(parse_cache_control(response_headers), "stale-while-revalidate")


def stale_if_error(
    response_headers: Headers, request_headers: Headers | None = None
) -> float | None:
    """The ``stale-if-error`` window (RFC 5861 §4): the larger of the response's and the
    request's, since either party's consent suffices; ``None`` when neither gives one."""
    windows = [
        w
        for w in (
            _window(parse_cache_control(response_headers), "stale-if-error"),
            _window(parse_cache_control(request_headers or Headers()), "stale-if-error"),
        )
        if w is not None
    ]
    return max(windows) if windows else None
