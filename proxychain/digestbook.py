"""The digest book: digests announced by package index pages, kept across restarts.

An index page (a PyPI page, an npm packument, a Go checksum-database lookup) announces the
digest of each file it links to; a later fill of that file is checked against it. The book
keeps them in memory, bounded, and appends them to a small JSON-lines file under the cache
directory, so they survive a restart and are shared by worker processes (a process that
misses a digest re-reads what the others appended). Losing a line (a crash, a compaction
racing another process's append) only means one file is stored unverified, as a plain HTTP
cache would; the client still checks its own hashes.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import trio

from .appendlog import append_lines, read_new_lines

__all__ = ["DIGEST_FILE_NAME", "DigestBook", "open_digest_book"]

DIGEST_FILE_NAME = "package-digests.jsonl"
# Digests kept in memory; beyond this the oldest learned are forgotten (a forgotten digest
# means the file is stored unverified). ~250 bytes each: about 125 MiB at the cap.
MAX_DIGESTS = 500_000
# Rewrite the digest file once it holds this many times more lines than live digests.
COMPACT_FACTOR = 2
COMPACT_MIN_LINES = 10_000


class DigestBook:
    """Digests announced for route-relative paths, per route prefix; see the module docstring.

    Build it with :func:`open_digest_book`; ``path=None`` keeps it in memory only.
    """

    def __init__(self, path: Path | None, *, max_digests: int = MAX_DIGESTS) -> None:
        self.path = path
        self.max_digests = max_digests
        self._digests: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._offset = 0  # bytes of the file already read
        self._lines = 0  # lines in the file, for compaction
        self._lock = trio.Lock()

    def __len__(self) -> int:
        return len(self._digests)

    def get(self, prefix: str, path: str) -> str | None:
        """The digest known in this process for ``path`` of the route at ``prefix``."""
        return self._digests.get((prefix, path))

    async def expected(self, prefix: str, path: str) -> str | None:
        """The digest for ``path``, re-reading what other processes appended when unknown."""
        found = self.get(prefix, path)
        if found is None and self.path is not None:
            await self.refresh()
            found = self.get(prefix, path)
        return found

    def _put(self, prefix: str, path: str, digest: str) -> bool:
        ikey = (prefix, path)
        if self._digests.get(ikey) == digest:
            self._digests.move_to_end(ikey)
            return False
        self._digests[ikey] = digest
        self._digests.move_to_end(ikey)
        while len(self._digests) > self.max_digests:
            self._digests.popitem(last=False)
        return True

    async def learn(self, prefix: str, digests: Mapping[str, str]) -> int:
        """Record ``digests`` (route-relative path -> digest); returns how many were new."""
        fresh = {p: d for p, d in digests.items() if "?" not in p and self._put(prefix, p, d)}
        if fresh and self.path is not None:
            lines = "".join(
                json.dumps({"r": prefix, "p": p, "d": d}, separators=(",", ":")) + "\n"
                for p, d in fresh.items()
            ).encode()
            async with self._lock:
                await trio.to_thread.run_sync(append_lines, self.path, lines)
                self._lines += len(fresh)
                if self._lines > max(COMPACT_MIN_LINES, COMPACT_FACTOR * len(self._digests)):
                    await self._compact()
        return len(fresh)

    async def refresh(self) -> None:
        """Read lines appended to the file since the last read (by any process)."""
        if self.path is None:
            return
        async with self._lock:
            data, self._offset = await trio.to_thread.run_sync(
                read_new_lines, self.path, self._offset
            )
            self._absorb(data)

    def _absorb(self, data: bytes) -> None:
        for line in data.splitlines():
            try:
                doc = json.loads(line)
                prefix, path, digest = doc["r"], doc["p"], doc["d"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: skip it
            if isinstance(prefix, str) and isinstance(path, str) and isinstance(digest, str):
                self._put(prefix, path, digest)
                self._lines += 1

    async def _compact(self) -> None:
        assert self.path is not None
        snapshot = b"".join(
            json.dumps({"r": r, "p": p, "d": d}, separators=(",", ":")).encode() + b"\n"
            for (r, p), d in self._digests.items()
        )
        self._offset = await trio.to_thread.run_sync(_replace_file, self.path, snapshot)
        self._lines = len(self._digests)


def _replace_file(path: Path, data: bytes) -> int:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


async def open_digest_book(cache_dir: Path | None) -> DigestBook:
    """The digest book persisted under ``cache_dir`` (loaded now), or in memory for None."""
    if cache_dir is None:
        return DigestBook(None)
    await trio.to_thread.run_sync(lambda: cache_dir.mkdir(parents=True, exist_ok=True))
    book = DigestBook(cache_dir / DIGEST_FILE_NAME)
    await book.refresh()
    return book
