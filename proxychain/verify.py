"""``proxychain verify``: re-check every disk entry against its recorded digests.

Each entry's body is re-hashed: its size and ``sha256`` (recorded when it was written) must
match, and so must the digest a package protocol promised at fill time (``Entry.verified``:
``sha256:``/``sha1:``/SRI, or a Go ``h1:`` hash). Corrupt entries are reported and, unless
``drop=False``, removed so they are fetched again. Run it beside a live proxy or a stopped one:
the disk tier is safe to share between processes.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import aclosing
from dataclasses import dataclass, field

import trio

from . import goproxy, mirror
from .disk import DiskTier, open_disk_tier
from .entry import Entry
from .errors import CacheCorrupt
from .integrity import HASH_ALGORITHMS, IntegrityError, check_file_digest
from .settings import Settings

__all__ = ["VerifyReport", "verify_cache", "verify_entry"]

log = logging.getLogger("proxychain.verify")

# Corrupt entries listed by name in the summary; the rest are counted.
MAX_LISTED = 20


@dataclass(slots=True)
class VerifyReport:
    """What a scan found: counts, and the corrupt entries with the reason."""

    scanned: int = 0
    bytes: int = 0
    promised_checked: int = 0  # entries that also carried a package digest
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (url, reason)
    dropped: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"verified {self.scanned} entries ({self.bytes} bytes), "
            f"{self.promised_checked} against a package digest: "
            f"{len(self.corrupt)} corrupt, {self.dropped} dropped"
        ]
        lines += [f"  corrupt: {url}: {reason}" for url, reason in self.corrupt[:MAX_LISTED]]
        if len(self.corrupt) > MAX_LISTED:
            lines.append(f"  ... and {len(self.corrupt) - MAX_LISTED} more")
        return "\n".join(lines)


async def verify_entry(tier: DiskTier, entry: Entry) -> str | None:
    """Why ``entry`` is corrupt, or ``None`` when its body matches every recorded digest."""
    if not await tier.verify(entry):
        return "body does not match its recorded size and sha256"
    if not entry.verified:
        return None
    try:
        if entry.verified.startswith("h1:"):
            # Go hashes need the zip's directory; module zips are bounded (500 MiB) by go.
            body = await tier.load(entry)
            key_path = _route_relative(entry.url)
            ok = await trio.to_thread.run_sync(check_file_digest, entry.verified, body, key_path)
        else:
            ok = await _stream_check(tier, entry)
    except CacheCorrupt as exc:
        return str(exc)  # changed since the first read
    except IntegrityError as exc:
        return f"package digest unusable: {exc}"
    return None if ok else f"body does not match the package digest {entry.verified}"


async def _stream_check(tier: DiskTier, entry: Entry) -> bool:
    """Hash the body as it streams (wheels and tarballs may be far larger than memory)."""
    hashes = {name: hashlib.new(name) for name in HASH_ALGORITHMS}
    async with aclosing(tier.read(entry)) as chunks:
        async for chunk in chunks:
            await trio.to_thread.run_sync(_update, hashes, chunk)
    try:
        return mirror.verify_digest(entry.verified, {n: h.digest() for n, h in hashes.items()})
    except ValueError as exc:
        raise IntegrityError(str(exc)) from exc


def _update(hashes: dict[str, hashlib._Hash], chunk: bytes) -> None:
    for h in hashes.values():
        h.update(chunk)


def _route_relative(url: str) -> str:
    """The Go path below the route prefix: ``/go/m/@v/v1.zip`` -> ``/m/@v/v1.zip``.

    Only ``h1:`` hashes need it, and their paths always contain ``/@v/``: drop leading
    segments until the rest parses (other digests ignore the path).
    """
    path = "/" + url.split("?", 1)[0].lstrip("/")
    while path.count("/") > 1 and goproxy.parse(path) is None:
        path = "/" + path.split("/", 2)[2]
    return path


async def verify_cache(settings: Settings, *, drop: bool = True) -> VerifyReport:
    """Scan the disk tier under ``settings.cache.dir``; drop corrupt entries when ``drop``."""
    report = VerifyReport()
    async with open_disk_tier(
        settings.cache.dir, max_bytes=settings.cache.disk_max, rescan_interval=None
    ) as tier:
        async for entry in tier.iter_entries():
            report.scanned += 1
            report.bytes += entry.body_size
            report.promised_checked += bool(entry.verified)
            reason = await verify_entry(tier, entry)
            if reason is None:
                continue
            report.corrupt.append((entry.url or entry.key, reason))
            log.warning("corrupt entry %s: %s", entry.url or entry.key, reason)
            if drop:
                report.dropped += await tier.remove(entry.key, entry.variant)
    return report
