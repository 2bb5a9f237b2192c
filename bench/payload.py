"""Deterministic response bodies and the origin's URL grammar, shared by every bench program.

A body is a window onto one fixed pseudo-random block of :data:`BLOCK_BYTES`, rotated by an
offset derived from the request path. So any body of any size (up to 1 GiB and beyond) is served
as zero-copy slices of one block held in memory, each key has different bytes (a proxy that
mixes keys up is caught), and a client can check a body chunk by chunk with ``memcmp`` speed
without keeping it: :class:`BodyCheck`.

URL grammar (origin): ``/bytes/<n>[/<tag>...][?opt=value&...]`` where ``<n>`` is the body size
in bytes and ``<tag>`` makes distinct cache keys for the same size. Options (all optional):
``max_age``, ``swr`` (RFC 5861 §3 stale-while-revalidate), ``sie`` (RFC 5861 §4
stale-if-error), ``delay`` (seconds before the response head) and ``rate`` (body bytes per
second). The query is part of every proxy's cache key, and the body depends on the path only.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

__all__ = [
    "BLOCK_BYTES",
    "BodyCheck",
    "OriginRequest",
    "body_chunks",
    "body_offset",
    "bytes_path",
    "etag_for",
    "parse_origin_target",
]

BLOCK_BYTES = 1 << 20  # 1 MiB: one send_all per MiB is what counts for big bodies
_SEED = 0x5EED
_BLOCK = random.Random(_SEED).randbytes(BLOCK_BYTES)
# Doubled so that any window of up to BLOCK_BYTES starting anywhere in the block is contiguous.
_DOUBLE = memoryview(_BLOCK + _BLOCK)


def body_offset(path: str) -> int:
    """The rotation of the block for the body at ``path`` (query excluded)."""
    return zlib.crc32(path.encode("utf-8")) % BLOCK_BYTES


def etag_for(path: str, size: int) -> str:
    """The strong ETag the origin sends for ``path`` (stable across origin restarts)."""
    return f'"{size:x}-{body_offset(path):x}"'


def body_chunks(path: str, size: int, chunk: int = BLOCK_BYTES) -> Iterator[memoryview]:
    """Yield the body for ``path`` as zero-copy slices of at most ``chunk`` bytes."""
    chunk = max(1, min(chunk, BLOCK_BYTES))
    pos = 0
    offset = body_offset(path)
    while pos < size:
        n = min(chunk, size - pos)
        start = (offset + pos) % BLOCK_BYTES
        yield _DOUBLE[start : start + n]
        pos += n


def bytes_path(size: int, tag: str = "", **opts: float | int | str) -> str:
    """Build an origin target, e.g. ``bytes_path(1024, "k1", max_age=60)``."""
    path = f"/bytes/{size}" + (f"/{tag}" if tag else "")
    return path + ("?" + urlencode(opts) if opts else "")


@dataclass(frozen=True, kw_only=True)
class OriginRequest:
    """A parsed ``/bytes/`` target."""

    path: str
    size: int
    max_age: int | None
    swr: int | None
    sie: int | None
    delay: float
    rate: float | None


def parse_origin_target(target: str) -> OriginRequest | None:
    """Parse a request target in the origin's grammar; ``None`` if it does not match."""
    path, _, query = target.partition("?")
    parts = path.split("/")
    if len(parts) < 3 or parts[1] != "bytes" or not parts[2].isdigit():
        return None
    opts = dict(parse_qsl(query))
    try:
        return OriginRequest(
            path=path,
            size=int(parts[2]),
            max_age=int(opts["max_age"]) if "max_age" in opts else None,
            swr=int(opts["swr"]) if "swr" in opts else None,
            sie=int(opts["sie"]) if "sie" in opts else None,
            delay=float(opts.get("delay", 0.0)),
            rate=float(opts["rate"]) if "rate" in opts else None,
        )
    except ValueError:
        return None


class BodyCheck:
    """Incrementally compare a received body with the expected one for ``path``."""

    __slots__ = ("_offset", "_path", "ok", "received", "size")

    def __init__(self, path: str, size: int) -> None:
        self._path = path.partition("?")[0]
        self._offset = body_offset(self._path)
        self.size = size
        self.received = 0
        self.ok = True

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Check the next piece of the body."""
        if not self.ok:
            return
        if self.received + len(data) > self.size:
            self.ok = False
            return
        if isinstance(data, bytes) and len(data) <= BLOCK_BYTES:
            # The common case, a received chunk: one copy of the expected bytes and a memcmp
            # (memoryview == memoryview would compare item by item).
            start = (self._offset + self.received) % BLOCK_BYTES
            self.ok = data == _DOUBLE[start : start + len(data)].tobytes()
            self.received += len(data)
            return
        view = memoryview(data)
        while view and self.ok:
            start = (self._offset + self.received) % BLOCK_BYTES
            n = min(len(view), BLOCK_BYTES)
            if bytes(view[:n]) != _DOUBLE[start : start + n].tobytes():
                self.ok = False
            self.received += n
            view = view[n:]

    def complete(self) -> bool:
        """True when exactly the expected bytes arrived."""
        return self.ok and self.received == self.size
