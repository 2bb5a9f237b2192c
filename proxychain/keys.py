"""Cache keys: which stored responses a request may be answered from.

Theory of operation
-------------------

RFC 9111 §2 keys a stored response by request method and target URI. proxychain stores only
responses to GET, and a HEAD is answered from a stored GET (RFC 9111 §4, "the request method
... allows it to be used"), so both methods map to the same *primary key*: the hex SHA-256 of
``"GET " + normalised target``. The target is normalised the way RFC 3986 §6.2.2 allows
without knowing the scheme: percent-encodings get upper-case hex (§6.2.2.1) and
percent-encoded unreserved characters are decoded (§6.2.2.2). Query order is kept: for an
origin ``?a=1&b=2`` and ``?b=2&a=1`` are different resources.

A response carrying ``Vary`` (RFC 9111 §4.1) is only reusable for requests whose named fields
match the request that produced it. The names and the normalised values of those fields are
recorded with the entry (``Entry.vary``) and hashed into a *variant key*, so one URL can hold
several variants side by side. Values are normalised as §4.1 permits: field lines are
combined, whitespace is collapsed, and tokens of case-insensitive fields are lower-cased. A
field absent from the request is recorded as :data:`ABSENT`, which differs from every real
value (including the empty string), so "absent" only matches "absent". ``Vary: *`` never
matches anything; such responses are not stored at all.

``Accept-Encoding`` is keyed by what the proxy asks the upstream for, not by the client's
exact list, as Varnish does: pip sends ``gzip, deflate``, npm ``gzip,deflate`` and Go
``gzip``, and each list would otherwise hold its own copy of the same gzip body. A fill asks
for ``gzip`` when the client takes gzip and for ``identity`` otherwise
(:func:`asked_encoding`), and records that value; a request without the field asks for
nothing and records :data:`ABSENT`.

A route may force extra fields into the key (``forced``), for upstreams that negotiate on a
field but forget to say so in ``Vary``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable

from .http import Headers, ResponseHead

__all__ = [
    "ABSENT",
    "asked_encoding",
    "matches",
    "normalise_target",
    "primary_key",
    "variant_key",
    "vary_names",
    "vary_values",
]

ABSENT = "\x00"
"""The recorded value of a Vary-named field the request did not carry (NUL cannot occur in a
field value, RFC 9110 §5.5)."""

# RFC 3986 §2.3.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_WS = re.compile(r"[ \t]+")
_COMMA = re.compile(r"[ \t]*,[ \t]*")

# Fields whose values are case-insensitive token lists (RFC 9110 §12.5.3, §12.5.4 and
# RFC 4647 language ranges); lower-casing them cannot change what the origin selects.
# Primary keys remembered (a hot key is hashed once, not on every hit): ~200 bytes each.
KEY_CACHE_SIZE = 4096
_CASE_INSENSITIVE = frozenset({"accept-encoding", "accept-charset", "accept-language"})


def _pct(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalise_target(url: str) -> str:
    """The request target with RFC 3986 §6.2.2.1 and §6.2.2.2 normalisation applied.

    A fragment (never sent by conforming clients) is dropped and an empty path becomes ``/``.
    """
    url = url.split("#", 1)[0]
    if not url.startswith("/") and "://" not in url:
        url = "/" + url
    return _PCT.sub(_pct, url)


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def primary_key(method: str, url: str) -> str:
    """The primary cache key of a request for ``url`` (path and query, route prefix included).

    ``HEAD`` and ``GET`` share a key; other methods get their own (they are never stored, but
    the key is still well defined).
    """
    method = method.upper()
    if method == "HEAD":
        method = "GET"
    material = f"{method} {normalise_target(url)}"
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def vary_names(head: ResponseHead, forced: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The lower-cased request field names ``head``'s Vary selects on, sorted, plus ``forced``.

    Returns ``None`` for ``Vary: *`` (RFC 9111 §4.1: such a response never matches).
    """
    own = head.headers.memo(vary_names, _own_vary_names) if "vary" in head.headers else ()
    if own is None:
        return None
    if not forced:
        return own
    return tuple(sorted({*own, *(name.lower() for name in forced)}))


def _own_vary_names(headers: Headers) -> tuple[str, ...] | None:
    names = {name.lower() for name in headers.get_list("vary")}
    return None if "*" in names else tuple(sorted(names))


def asked_encoding(lines: list[str]) -> str | None:
    """The ``Accept-Encoding`` a fill sends for a client whose field lines are ``lines``:
    ``gzip`` when it takes gzip (RFC 9110 §12.5.3: ``gzip``, ``x-gzip`` or ``*`` with a
    non-zero weight), else ``identity``; ``None`` without the field (nothing is asked)."""
    if not lines:
        return None
    weights: dict[str, float] = {}
    for item in ",".join(lines).split(","):
        coding, *params = item.split(";")
        weights[coding.strip().lower()] = _weight(params)
    for name in ("gzip", "x-gzip", "*"):
        if name in weights:
            return "gzip" if weights[name] > 0 else "identity"
    return "identity"


def _weight(params: list[str]) -> float:
    """An Accept-Encoding member's weight; a malformed one counts as 0 (not acceptable)."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                weight = float(value.strip())
            except ValueError:
                return 0.0
            return weight if 0.0 <= weight <= 1.0 else 0.0
    return 1.0


def _normalise_value(name: str, lines: list[str]) -> str:
    if not lines:
        return ABSENT
    if name == "accept-encoding":
        return asked_encoding(lines) or ABSENT
    value = ", ".join(line.strip() for line in lines)
    value = _COMMA.sub(", ", _WS.sub(" ", value)).strip(" ,")
    if name in _CASE_INSENSITIVE:
        value = value.lower()
    return value


def vary_values(request_headers: Headers, names: Iterable[str]) -> dict[str, str]:
    """Each named field's normalised value in ``request_headers`` (:data:`ABSENT` if missing)."""
    return {
        name.lower(): _normalise_value(name.lower(), request_headers.get_all(name))
        for name in names
    }


def variant_key(values: dict[str, str]) -> str:
    """The secondary key for recorded Vary values: ``""`` when there are none, else a digest."""
    if not values:
        return ""
    material = "\n".join(f"{name}:{values[name]}" for name in sorted(values))
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def matches(
    entry_vary: dict[str, str], request_headers: Headers, forced: Iterable[str] = ()
) -> bool:
    """Whether a request selects a stored variant whose recorded Vary values are ``entry_vary``.

    A ``forced`` name the entry did not record counts as recorded :data:`ABSENT`.
    """
    wanted = dict(entry_vary)
    for name in forced:
        wanted.setdefault(name.lower(), ABSENT)
    if not wanted:
        return True
    names = tuple(wanted)
    # Remembered with the request's fields: a client repeats its header block request after
    # request (the server shares one Headers object per block).
    return (
        request_headers.memo((matches, names), functools.partial(vary_values, names=names))
        == wanted
    )
