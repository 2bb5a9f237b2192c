"""Byte-range requests answered from a complete stored response (RFC 9110 §14).

Theory of operation
-------------------

The cache stores complete representations only; a ``Range`` request that hits the cache is
answered by slicing the stored body. :func:`evaluate` decides between the full response, a
206 with one or more ranges, and a 416:

* ``Range`` applies to GET only (RFC 9110 §14.2) and only to a 200 response.
* Only the ``bytes`` unit is understood; any other unit, or a syntactically invalid range set
  (``bytes=5-2``, ``bytes=x``, an empty set), makes the whole header ignored (§14.2: a server
  may ignore ``Range``; ignoring is always safe).
* ``If-Range`` (§13.1.5) must match the stored response, or the full response is sent: an
  entity tag matches only by *strong* comparison; a date matches only if it equals the
  stored ``Last-Modified`` exactly and that date is a strong validator (at least one second
  older than ``Date``, §8.8.2.2).
* Resolved against the representation's ``size``, a range is satisfiable when its first byte
  exists or when it is a non-zero suffix (§14.1.1). Without any satisfiable range the answer is
  416 with ``Content-Range: bytes */size`` (§15.5.17); a zero-length representation with a
  satisfiable suffix range is sent whole.
* Satisfiable ranges are sorted and coalesced when they overlap or touch (§14.2 allows it;
  it also defeats many-small-ranges amplification). More than :data:`MAX_RANGES` ranges after
  coalescing makes the header ignored.

For more than one range the body is ``multipart/byteranges`` (§14.6). The framing is computed
up front by :func:`multipart_plan`, so the shell knows the exact ``Content-Length`` and can
stream each part's header bytes followed by its slice of the stored body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .http import ETag, Headers, parse_http_date

if TYPE_CHECKING:  # the core never imports random at run time; callers pass an rng
    import random

__all__ = [
    "MAX_RANGES",
    "ByteRange",
    "Full",
    "MultipartPlan",
    "Partial",
    "RangeDecision",
    "Unsatisfiable",
    "evaluate",
    "make_boundary",
    "multipart_plan",
    "parse_range",
    "partial_headers",
    "unsatisfiable_headers",
]

MAX_RANGES = 64
"""Most ranges served in one multipart response; beyond that the Range header is ignored."""

_BOUNDARY_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_BOUNDARY_LENGTH = 24  # plenty of entropy; RFC 2046 §5.1.1 allows up to 70 characters


@dataclass(frozen=True, slots=True, kw_only=True)
class ByteRange:
    """An inclusive byte range ``first..last`` of a representation."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        """The ``Content-Range`` value for this range of a ``size``-byte representation."""
        return f"bytes {self.first}-{self.last}/{size}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Full:
    """Send the whole stored response (no Range, or Range ignored)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Partial:
    """Send 206 with ``ranges`` (sorted, non-overlapping, at least one)."""

    ranges: tuple[ByteRange, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsatisfiable:
    """Send 416 with :func:`unsatisfiable_headers`."""


RangeDecision = Full | Partial | Unsatisfiable

# A parsed range spec before resolution: (first, last) with last None for "first-",
# or (None, n) for the suffix "-n".
_Spec = tuple[int | None, int | None]


def _digits_or_empty(text: str) -> bool:
    return text == "" or (text.isascii() and text.isdigit())


def parse_range(value: str | None) -> list[_Spec] | None:
    """Parse a ``Range`` value into raw specs; ``None`` when it must be ignored."""
    if value is None:
        return None
    unit, sep, rest = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs: list[_Spec] = []
    for raw in rest.split(","):
        part = raw.strip(" \t")
        if not part:
            continue  # RFC 9110 §5.6.1: empty list elements are allowed and ignored
        first, dash, last = part.partition("-")
        if not dash or not _digits_or_empty(first) or not _digits_or_empty(last):
            return None
        if first == "":
            if last == "":
                return None
            specs.append((None, int(last)))
        elif last == "":
            specs.append((int(first), None))
        else:
            if int(last) < int(first):
                return None
            specs.append((int(first), int(last)))
    return specs or None


def _if_range_holds(value: str, stored: Headers) -> bool:
    value = value.strip()
    if value.startswith(('"', "W/", "w/")):
        wanted = ETag.parse(value)
        lines = stored.get_all("etag")
        have = ETag.parse(lines[0]) if lines else None
        return wanted is not None and have is not None and wanted.strong_match(have)
    when = parse_http_date(value)
    modified = parse_http_date(stored.get("last-modified"))
    date = parse_http_date(stored.get("date"))
    return (
        when is not None
        and modified is not None
        and when == modified
        and date is not None
        and date - modified >= 1
    )


def _resolve(specs: list[_Spec], size: int) -> list[ByteRange]:
    out: list[ByteRange] = []
    for first, last in specs:
        if first is None:
            assert last is not None
            if last == 0 or size == 0:
                continue
            out.append(ByteRange(first=max(0, size - last), last=size - 1))
        elif first < size:
            end = size - 1 if last is None else min(last, size - 1)
            out.append(ByteRange(first=first, last=end))
    return out


def _coalesce(ranges: list[ByteRange]) -> tuple[ByteRange, ...]:
    merged: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.first):
        if merged and r.first <= merged[-1].last + 1:
            merged[-1] = ByteRange(first=merged[-1].first, last=max(merged[-1].last, r.last))
        else:
            merged.append(r)
    return tuple(merged)


def evaluate(
    method: str,
    request_headers: Headers,
    *,
    size: int,
    status: int = 200,
    stored_headers: Headers | None = None,
) -> RangeDecision:
    """Decide how to answer a possibly ranged request from a stored response.

    Args:
        method: the request method.
        request_headers: the client's header fields (``Range``, ``If-Range``).
        size: length of the stored body in bytes.
        status: the stored response's status; ranges apply to 200 only.
        stored_headers: the stored response's fields (``ETag``, ``Last-Modified``, ``Date``)
            for ``If-Range``.

    Returns:
        :class:`Full`, :class:`Partial` or :class:`Unsatisfiable`. Never raises.
    """
    if method.upper() != "GET" or status != 200:
        return Full()
    lines = request_headers.get_all("range")
    if len(lines) != 1:
        return Full()
    specs = parse_range(lines[0])
    if specs is None:
        return Full()
    if_range = request_headers.get("if-range")
    if if_range is not None and not _if_range_holds(if_range, stored_headers or Headers()):
        return Full()
    ranges = _resolve(specs, size)
    if not ranges:
        satisfiable_empty = size == 0 and any(f is None and last for f, last in specs)
        return Full() if satisfiable_empty else Unsatisfiable()
    merged = _coalesce(ranges)
    if len(merged) > MAX_RANGES:
        return Full()
    return Partial(ranges=merged)


def partial_headers(stored_headers: Headers, byte_range: ByteRange, size: int) -> Headers:
    """Header fields of a single-range 206 built from the stored ones (RFC 9110 §15.3.7)."""
    return stored_headers.set("content-range", byte_range.content_range(size)).set(
        "content-length", str(byte_range.length)
    )


def unsatisfiable_headers(stored_headers: Headers, size: int) -> Headers:
    """Header fields of a 416 for a ``size``-byte representation (RFC 9110 §15.5.17)."""
    kept = Headers((n, v) for n, v in stored_headers if n in ("date", "etag", "last-modified"))
    return kept.set("content-range", f"bytes */{size}").set("content-length", "0")


def make_boundary(rng: random.Random) -> str:
    """A multipart boundary from ``rng`` (pass a seeded ``random.Random`` in tests)."""
    return "".join(rng.choice(_BOUNDARY_ALPHABET) for _ in range(_BOUNDARY_LENGTH))


@dataclass(frozen=True, slots=True, kw_only=True)
class MultipartPlan:
    """The framing of a ``multipart/byteranges`` body.

    Send ``parts[i][0]`` then the body slice ``parts[i][1]`` for each part, then ``trailer``;
    the total is exactly ``content_length`` bytes.
    """

    content_type: str
    parts: tuple[tuple[bytes, ByteRange], ...]
    trailer: bytes
    content_length: int

    def headers(self, stored_headers: Headers) -> Headers:
        """Header fields of the multipart 206 built from the stored ones."""
        return (
            stored_headers.remove("content-range")
            .set("content-type", self.content_type)
            .set("content-length", str(self.content_length))
        )


def multipart_plan(
    ranges: tuple[ByteRange, ...], size: int, content_type: str | None, boundary: str
) -> MultipartPlan:
    """Frame ``ranges`` of a ``size``-byte body as ``multipart/byteranges`` (RFC 9110 §14.6)."""
    parts: list[tuple[bytes, ByteRange]] = []
    total = 0
    for index, r in enumerate(ranges):
        lines = [("\r\n" if index else "") + f"--{boundary}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Range: {r.content_range(size)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        parts.append((head, r))
        total += len(head) + r.length
    trailer = f"\r\n--{boundary}--\r\n".encode("ascii")
    return MultipartPlan(
        content_type=f"multipart/byteranges; boundary={boundary}",
        parts=tuple(parts),
        trailer=trailer,
        content_length=total + len(trailer),
    )
