"""The metadata of one stored response (one variant of one URL).

An :class:`Entry` is what the tiers persist beside a body and what the caching policy reasons
about. Times are wall-clock seconds since the epoch, recorded by the shell from
``Clock.wall()``: ``request_time`` when the request that produced the response was sent
upstream, ``response_time`` when its head arrived (RFC 9111 §4.2.3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .http import Headers, ResponseHead

__all__ = ["Entry"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A stored response's head and bookkeeping; the body lives in a tier beside it.

    Attributes:
        key: the primary cache key (hex digest of method and URL, see ``keys.py``).
        variant: the secondary key (hex digest of the request fields ``Vary`` names; ``""``
            when the response has no Vary).
        url: the URL as the client asked for it (route prefix included), for purge by prefix.
        status, reason, headers: the stored response head (hop-by-hop fields removed).
        vary: request field name (lower-case) to its normalised value, for every field the
            response's ``Vary`` names.
        request_time, response_time: RFC 9111 §4.2.3 times, wall-clock seconds.
        body_size: the exact length of the stored body in bytes.
        sha256: hex digest of the stored body, computed while it was written.
        verified: the digest a package protocol promised (``"sha256:<hex>"`` and the like),
            checked at fill time; ``""`` when the protocol gave none.
    """

    key: str
    variant: str = ""
    url: str = ""
    status: int = 200
    reason: str = ""
    headers: Headers = field(default_factory=Headers)
    vary: dict[str, str] = field(default_factory=dict)
    request_time: float = 0.0
    response_time: float = 0.0
    body_size: int = 0
    sha256: str = ""
    verified: str = ""

    @property
    def head(self) -> ResponseHead:
        return ResponseHead(status=self.status, headers=self.headers, reason=self.reason)

    def replace(self, **changes: object) -> Entry:
        """A copy with ``changes`` applied (entries are immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
