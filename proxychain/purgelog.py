"""Purges shared between worker processes.

With ``--workers N`` every process has its own memory tier over one shared disk tier. A purge
arrives at one process (the admin plane's); it removes the entries from the disk and from its
own memory, then appends the purge to ``purge.log`` in the cache directory. Every process
follows that file and drops the purged URLs from its memory tier too, so no worker keeps
serving a purged entry for longer than one poll interval.

The file is append-only JSON lines (one ``write`` of a short line under ``O_APPEND`` is atomic
between processes on a local file system); a reader keeps its offset and reads only what is new.
A line that cannot be parsed is skipped, never fatal. Every process starts following from the
end (older purges are on disk already), so nothing ever reads what came before its start: the
supervisor empties the file before it starts its workers (:func:`clear_purge_log`), which keeps
it from growing over the life of a cache directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .appendlog import append_lines, read_new_lines

__all__ = ["PURGE_POLL_INTERVAL", "Purge", "PurgeLog", "clear_purge_log"]

log = logging.getLogger("proxychain.purge")

PURGE_POLL_INTERVAL = 1.0  # seconds a purge may take to reach the other workers' memory tiers
_FILE_NAME = "purge.log"


@dataclass(frozen=True, slots=True)
class Purge:
    """One purge: an exact URL or a URL prefix."""

    url: str | None = None
    prefix: str | None = None


class PurgeLog:
    """The shared purge file of one cache directory."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / _FILE_NAME
        self._offset = 0

    async def open(self) -> None:
        """Start following from the end: purges older than this process are on disk already."""
        self._offset = await trio.to_thread.run_sync(_size, self.path)

    async def append(self, purge: Purge) -> None:
        """Record ``purge`` for the other processes."""
        line = json.dumps({"url": purge.url, "prefix": purge.prefix}) + "\n"
        await trio.to_thread.run_sync(append_lines, self.path, line.encode())

    async def read_new(self) -> list[Purge]:
        """The purges appended since the last call."""
        data, self._offset = await trio.to_thread.run_sync(read_new_lines, self.path, self._offset)
        purges = []
        for raw in data.splitlines():
            try:
                doc = json.loads(raw)
                purges.append(Purge(url=doc.get("url"), prefix=doc.get("prefix")))
            except (ValueError, AttributeError):
                log.warning("skipping an unreadable line of %s", self.path)
        return purges

    async def follow(self, apply: Callable[[Purge], object]) -> None:
        """Apply every new purge forever (cancel to stop)."""
        while True:
            await trio.sleep(PURGE_POLL_INTERVAL)
            try:
                purges = await self.read_new()
            except OSError as exc:
                log.warning("cannot read %s: %s", self.path, exc)
                continue
            for purge in purges:
                apply(purge)


def clear_purge_log(cache_dir: Path) -> None:
    """Empty the purge log of ``cache_dir``; only while no process follows it (blocking)."""
    with contextlib.suppress(FileNotFoundError):
        (cache_dir / _FILE_NAME).unlink()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
