"""HTTP value types and field parsing, sans-IO.

Everything here is pure: heads are plain values, header names are lower-cased once on the
way in (RFC 9110 §5.1: field names are case-insensitive), and the list syntax of RFC 9110 §5.6.1
is split the way h11's ``get_comma_header`` does. The shell converts to and from h11's
``list[tuple[bytes, bytes]]`` at the edge with :meth:`Headers.from_raw` / :meth:`Headers.raw`.
"""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, cast

__all__ = [
    "HOP_BY_HOP",
    "CacheControl",
    "ETag",
    "Headers",
    "Request",
    "ResponseHead",
    "format_http_date",
    "parse_cache_control",
    "parse_etag_list",
    "parse_http_date",
    "strip_hop_by_hop",
]

_T = TypeVar("_T")
DATE_CACHE_SIZE = 1024  # parsed HTTP-dates remembered

# RFC 9110 §7.6.1 plus the legacy names every proxy strips (RFC 2616 §13.5.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class Headers:
    """An ordered, immutable multi-map of header fields with lower-cased names.

    Being immutable, an instance keeps what is derived from it: a name index, built on the
    first look-up, and values parsed from its fields (:meth:`memo`). A stored response's
    fields are parsed once, not on every hit.
    """

    __slots__ = ("_index", "_items", "_memo")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: tuple[tuple[str, str], ...] = tuple(
            (name.lower(), value) for name, value in items
        )
        self._index: dict[str, list[str]] | None = None
        self._memo: dict[object, object] | None = None

    @classmethod
    def from_raw(cls, raw: Iterable[tuple[bytes, bytes]]) -> Headers:
        """Build from h11's header list (names already lower-case bytes)."""
        return _from_lower([(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in raw])

    def _lines(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self._items:
                lines = index.get(name)
                if lines is None:
                    index[name] = [value]
                else:
                    lines.append(value)
            self._index = index
        return index

    def memo(self, key: object, compute: Callable[[Headers], _T]) -> _T:
        """``compute(self)``, computed once per ``key`` (a pure function of the fields)."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        try:
            return cast("_T", memo[key])
        except KeyError:
            value = memo[key] = compute(self)
            return value

    def raw(self) -> list[tuple[bytes, bytes]]:
        """The fields as h11 wants them."""
        return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self._items]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name.lower() in self._lines()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """All values of ``name`` joined with ", " (RFC 9110 §5.3), or ``default``."""
        values = self._lines().get(name.lower())
        if not values:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def get_all(self, name: str) -> list[str]:
        """Every field line named ``name``, unjoined (for Set-Cookie-like fields)."""
        return list(self._lines().get(name.lower(), ()))

    def get_list(self, name: str) -> list[str]:
        """The comma-separated list elements of ``name`` (RFC 9110 §5.6.1), stripped, no empties."""
        out: list[str] = []
        for value in self.get_all(name):
            out.extend(part.strip() for part in _split_list(value))
        return [p for p in out if p]

    def set(self, name: str, value: str) -> Headers:
        """A copy where every ``name`` field is replaced by one ``name: value`` field."""
        lname = name.lower()
        items: list[tuple[str, str]] = []
        placed = False
        for n, v in self._items:
            if n == lname:
                if not placed:
                    items.append((lname, value))
                    placed = True
            else:
                items.append((n, v))
        if not placed:
            items.append((lname, value))
        return _from_lower(items)

    def add(self, name: str, value: str) -> Headers:
        """A copy with one more field appended."""
        return _from_lower([*self._items, (name.lower(), value)])

    def remove(self, *names: str) -> Headers:
        """A copy without any of ``names``."""
        drop = {n.lower() for n in names}
        return _from_lower([(n, v) for n, v in self._items if n not in drop])

    def update(self, other: Headers) -> Headers:
        """A copy where every field name present in ``other`` takes ``other``'s values."""
        names = {n for n, _ in other}
        kept = [(n, v) for n, v in self._items if n not in names]
        return _from_lower(kept + list(other))


def _from_lower(items: list[tuple[str, str]]) -> Headers:
    new = Headers.__new__(Headers)
    new._items = tuple(items)
    new._index = None
    new._memo = None
    return new


def _split_list(value: str) -> list[str]:
    """Split on commas outside double-quoted strings (ETag lists carry quotes)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Remove hop-by-hop fields and every field the Connection header names (RFC 9110 §7.6.1)."""
    named = {token.lower() for token in headers.get_list("connection")}
    return headers.remove(*HOP_BY_HOP, *named)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A request head as the proxy sees it.

    ``target`` is the origin-form path and query (``/a/b?c``) after the route prefix is
    stripped when built for an upstream, or as received when built by the server.
    """

    method: str
    target: str
    headers: Headers = field(default_factory=Headers)
    scheme: str = "http"
    authority: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        parts = self.target.split("?", 1)
        return parts[1] if len(parts) == 2 else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHead:
    """A response's status line and header fields."""

    status: int
    headers: Headers = field(default_factory=Headers)
    reason: str = ""


# ---- HTTP-date (RFC 9110 §5.6.7) -------------------------------------------------------------


def parse_http_date(value: str | None) -> float | None:
    """Seconds since the epoch for an IMF-fixdate (or an obsolete form), or ``None`` if invalid."""
    if not value:
        return None
    return _parse_http_date(value)


# Stored responses carry the same few dates on every hit; email.utils parsing is slow.
@functools.lru_cache(maxsize=DATE_CACHE_SIZE)
def _parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None  # type: ignore[unreachable]
    if parsed.tzinfo is None:
        # RFC 9110 §5.6.7: HTTP-date is always UTC; "-0000" parses as naive.
        import datetime as _dt

        parsed = parsed.replace(tzinfo=_dt.UTC)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def format_http_date(seconds: float) -> str:
    """IMF-fixdate for ``seconds`` since the epoch."""
    return email.utils.formatdate(seconds, usegmt=True)


# ---- Entity tags (RFC 9110 §8.8.3) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ETag:
    """An entity tag: ``opaque`` includes its double quotes."""

    opaque: str
    weak: bool = False

    @classmethod
    def parse(cls, value: str) -> ETag | None:
        value = value.strip()
        weak = value.startswith(("W/", "w/"))
        if weak:
            value = value[2:]
        if len(value) < 2 or value[0] != '"' or value[-1] != '"':
            return None
        return cls(value, weak)

    def __str__(self) -> str:
        return ("W/" if self.weak else "") + self.opaque

    def strong_match(self, other: ETag) -> bool:
        """RFC 9110 §8.8.3.2 strong comparison."""
        return not self.weak and not other.weak and self.opaque == other.opaque

    def weak_match(self, other: ETag) -> bool:
        """RFC 9110 §8.8.3.2 weak comparison."""
        return self.opaque == other.opaque


def parse_etag_list(value: str | None) -> list[ETag] | None:
    """Parse an If-None-Match / If-Match value: ``None`` means ``*``; bad members are skipped."""
    if value is None:
        return []
    if value.strip() == "*":
        return None
    tags = (ETag.parse(part) for part in _split_list(value))
    return [t for t in tags if t is not None]


# ---- Cache-Control (RFC 9111 §5.2) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed Cache-Control directives: lower-cased names to unquoted argument (or ``None``)."""

    directives: dict[str, str | None] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def seconds(self, name: str) -> int | None:
        """A delta-seconds argument (RFC 9111 §1.2.2); ``None`` when absent or invalid.

        Values too large saturate at 2**31 as §1.2.2 asks.
        """
        raw = self.directives.get(name)
        if raw is None or not (raw.isascii() and raw.isdigit()):
            return None
        return min(int(raw), 2**31)

    def has_invalid(self, name: str) -> bool:
        """The directive is present but its argument is not delta-seconds."""
        return name in self.directives and self.seconds(name) is None


def parse_cache_control(headers: Headers) -> CacheControl:
    """Parse every Cache-Control field line; the first occurrence of a directive wins.

    Parsed once per :class:`Headers` instance (the result is shared: do not mutate it).
    """
    if "cache-control" not in headers:
        return _NO_DIRECTIVES
    return headers.memo(parse_cache_control, _parse_cache_control)


def _parse_cache_control(headers: Headers) -> CacheControl:
    directives: dict[str, str | None] = {}
    for part in headers.get_list("cache-control"):
        name, sep, arg = part.partition("=")
        name = name.strip().lower()
        if not name or name in directives:
            continue
        value: str | None = arg.strip() if sep else None
        if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        directives[name] = value
    return CacheControl(directives)


_NO_DIRECTIVES = CacheControl({})
