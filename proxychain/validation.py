"""Validation, invalidation and the fields of answers served from the cache.

Theory of operation
-------------------

This module covers what happens around a stored response once the reuse decision
(:func:`proxychain.policy.lookup`) is made:

* Sending a validation request (RFC 9111 §4.3.1): :func:`conditional_headers` asks with
  ``If-None-Match`` for the ETags of every matching variant and ``If-Modified-Since`` for the
  entry's ``Last-Modified`` (else ``Date``).
* Handling the validation response (§4.3.3, §4.3.4): :func:`on_validation` selects the stored
  response a 304 refers to -- by the 304's ETag (weak comparison when that is weak), else its
  ``Last-Modified``, else a lone stored response; the entry asked about wins when it matches,
  else the most recently received match -- and freshens it with the 304's fields
  (:class:`Freshen`); a 304 matching nothing, or any other status, replaces it
  (:class:`Replace`).
* Invalidation (§4.4): :func:`invalidations` lists the target URI and the same-origin
  ``Location`` / ``Content-Location`` URIs of a non-error response to an unsafe method.
* Answering a client's own conditional from the cache (§4.3.2, RFC 9110 §13.2.2):
  :func:`answer_conditional`.
* The fields sent with a stored response (§5.1): :func:`cached_response_headers` with an
  integer ``Age`` (:func:`age_field`), and :func:`not_modified_headers` for a generated 304
  (RFC 9110 §15.4.5). The proxy's :data:`~proxychain.storability.STORED_ONLY_FIELDS` never
  reach a client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from . import freshness, keys
from .directives import LOOKUP_METHODS, SAFE_METHODS
from .entry import Entry
from .http import (
    ETag,
    Headers,
    Request,
    ResponseHead,
    format_http_date,
    parse_etag_list,
    parse_http_date,
    strip_hop_by_hop,
)
from .storability import STORED_ONLY_FIELDS, unstorable_fields

__all__ = [
    "Freshen",
    "Replace",
    "age_field",
    "answer_conditional",
    "cached_response_headers",
    "conditional_headers",
    "invalidations",
    "not_modified_headers",
    "on_validation",
]

# RFC 9111 §3.2: never taken from a 304; Content-Encoding and Content-Range describe the
# stored body bytes, which a 304 does not replace.
_NOT_UPDATED = frozenset({"content-length", "content-range", "content-encoding"})
_NOT_IN_304 = frozenset({"content-length", "content-range", "transfer-encoding"})


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
    replaces the entry (the shell routes 500/502/503/504 to
    :func:`proxychain.policy.on_upstream_error`).
    """
    if head.status != 304:
        return Replace(reason=f"upstream answered {head.status}")
    pool = [entry, *(c for c in candidates if c is not entry)]
    selected = _select_for_304(pool, head.headers)
    if selected is None:
        return Replace(reason="304 matches no stored response", refetch=True)
    incoming = strip_hop_by_hop(head.headers).remove(
        *_NOT_UPDATED, *unstorable_fields(head.headers)
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
    if request.method.upper() not in LOOKUP_METHODS or not 200 <= entry.status < 300:
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
    §5.1): all but :data:`~proxychain.storability.STORED_ONLY_FIELDS`."""
    return entry.headers.remove(*STORED_ONLY_FIELDS).set("age", age_field(age))


def age_field(age: float) -> str:
    """The ``Age`` value for ``age`` seconds: whole seconds, saturating at 2**31 (§5.1)."""
    return str(min(int(max(0.0, age)), 2**31))


def not_modified_headers(entry: Entry, age: float) -> Headers:
    """Header fields for a 304 generated from ``entry`` (RFC 9110 §15.4.5)."""
    return cached_response_headers(entry, age).remove(*_NOT_IN_304)
