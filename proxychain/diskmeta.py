"""The disk tier's metadata format, and the checks that keep request data out of file names.

A stored entry's metadata is one small versioned JSON document (``<v>.meta`` beside its body,
see ``disk.py``): every field of :class:`~proxychain.entry.Entry`, headers in their order.
Decoding validates every field, so whatever a crash, another version or a stray hand left in a
metadata file surfaces as :class:`~proxychain.errors.CacheCorrupt`, never as a bad entry.
Keys, variants and digests become path components only after :func:`check_key` (or the
sha256 check) has accepted them as lower-case hex. Pure: no file or event-loop calls.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from .entry import Entry
from .errors import CacheCorrupt
from .http import Headers

__all__ = ["META_VERSION", "check_key", "decode_meta", "encode_meta"]

META_VERSION = 1

_HEX = re.compile(r"[0-9a-f]{2,128}")
_SHA = re.compile(r"[0-9a-f]{64}")
_META_FIELDS = frozenset(
    {"v", "key", "variant", "url", "status", "reason", "headers", "vary"}
    | {"request_time", "response_time", "body_size", "sha256", "verified"}
)
_T = TypeVar("_T")


def check_key(key: str, variant: str = "") -> None:
    """Reject anything but lower-case hex digests before they become paths.

    Raises:
        ValueError: ``key`` is not 2-128 lower-case hex digits, or ``variant`` is neither
            ``""`` nor such a digest.
    """
    if not isinstance(key, str) or not _HEX.fullmatch(key):
        raise ValueError(f"cache key must be lower-case hex, got {key!r}")
    if not isinstance(variant, str) or (variant and not _HEX.fullmatch(variant)):
        raise ValueError(f"variant key must be lower-case hex or empty, got {variant!r}")


def encode_meta(entry: Entry) -> bytes:
    """The versioned JSON metadata for ``entry`` (header order is kept).

    Raises:
        ValueError: the key, variant or sha256 is not a lower-case hex digest.
    """
    check_key(entry.key, entry.variant)
    if not _SHA.fullmatch(entry.sha256):
        raise ValueError(f"sha256 must be a lower-case hex digest, got {entry.sha256!r}")
    doc = {
        "v": META_VERSION,
        "key": entry.key,
        "variant": entry.variant,
        "url": entry.url,
        "status": entry.status,
        "reason": entry.reason,
        "headers": [[name, value] for name, value in entry.headers],
        "vary": dict(entry.vary),
        "request_time": entry.request_time,
        "response_time": entry.response_time,
        "body_size": entry.body_size,
        "sha256": entry.sha256,
        "verified": entry.verified,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _field(doc: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = doc[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CacheCorrupt(f"metadata field {name!r} is not {kind.__name__}")
    return value


def decode_meta(data: bytes) -> Entry:
    """Parse metadata written by :func:`encode_meta`, validating every field.

    Raises:
        CacheCorrupt: the data is not metadata of a supported version, or a field is invalid.
    """
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheCorrupt(f"metadata is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != META_VERSION:
        raise CacheCorrupt("metadata has an unsupported version")
    if set(doc) != _META_FIELDS:
        raise CacheCorrupt(f"metadata fields differ: {sorted(set(doc) ^ _META_FIELDS)}")
    key, variant = _field(doc, "key", str), _field(doc, "variant", str)
    try:
        check_key(key, variant)
    except ValueError as exc:
        raise CacheCorrupt(str(exc)) from exc
    headers, vary = _field(doc, "headers", list), _field(doc, "vary", dict)
    if not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(s, str) for s in h) for h in headers
    ):
        raise CacheCorrupt("metadata headers are not name/value pairs")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in vary.items()):
        raise CacheCorrupt("metadata vary is not a string map")
    status, body_size = _field(doc, "status", int), _field(doc, "body_size", int)
    times = (_field(doc, "request_time", float), _field(doc, "response_time", float))
    sha256 = _field(doc, "sha256", str)
    if not 100 <= status <= 999 or body_size < 0 or not all(map(math.isfinite, times)):
        raise CacheCorrupt("metadata status, size or times out of range")
    if not _SHA.fullmatch(sha256):
        raise CacheCorrupt("metadata sha256 is not a hex digest")
    return Entry(
        key=key,
        variant=variant,
        url=_field(doc, "url", str),
        status=status,
        reason=_field(doc, "reason", str),
        headers=Headers((name, value) for name, value in headers),
        vary=vary,
        request_time=times[0],
        response_time=times[1],
        body_size=body_size,
        sha256=sha256,
        verified=_field(doc, "verified", str),
    )
