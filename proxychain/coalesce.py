"""Request coalescing: one upstream fetch per key, and waiters that read while it is written.

Theory of operation:

* The first request for a key that needs the upstream becomes the *leader*: it registers a
  :class:`Fill` and fetches. Requests for the same key that arrive while the fill is open are
  *waiters*: they do not wait for the whole body (nginx's ``proxy_cache_lock`` does, which makes
  a herd's first byte as slow as the whole fill) but follow the temp file the leader is
  writing, chunk by chunk, as it grows ("read-while-writer").
* Every state change of a fill (head known, bytes written, finished, failed) wakes the waiters
  through a fresh ``trio.Event`` (a broadcast that cannot be missed: a waiter always waits on
  the event that was current when it last looked).
* A waiter falls back to its own fetch when the leader's response is not storable, when it has
  no body file to follow, when the stored variant does not match its own request, or when the
  head does not arrive within the coalescing timeout. It never gets an error because of this
  machinery: if the fill fails before the waiter sent anything, it fetches on its own; if it
  fails after, the waiter's transfer is aborted (never a short "complete" body).
* The temp file is opened by waiters before the leader commits (renames) it; an open file
  descriptor stays valid across ``os.replace`` on POSIX, so a waiter that opened the file keeps
  reading the committed body. A waiter that arrives after the commit simply finds the entry in
  the store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from .entry import Entry
from .http import ResponseHead

__all__ = ["Fill", "FillRegistry", "FillState"]

# Read size for waiters following a fill: bytes per system call is what counts for big bodies.
FOLLOW_CHUNK = 1024 * 1024


@dataclass(slots=True)
class FillState:
    """What the leader has published so far."""

    head: ResponseHead | None = None
    entry: Entry | None = None  # the entry being written (variant, vary values)
    tmp_path: Path | None = None
    written: int = 0
    finished: bool = False
    failed: bool = False
    storable: bool = False


@dataclass(eq=False)
class Fill:
    """One in-flight upstream fetch for a key, observable by waiters."""

    key: str
    state: FillState = field(default_factory=FillState)
    waiters: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)
    _head_known: trio.Event = field(default_factory=trio.Event)

    # ---- leader side --------------------------------------------------------------------------

    def publish_head(
        self, head: ResponseHead, entry: Entry | None, tmp_path: Path | None, storable: bool
    ) -> None:
        self.state.head = head
        self.state.entry = entry
        self.state.tmp_path = tmp_path
        self.state.storable = storable
        self._head_known.set()
        self._notify()

    def publish_progress(self, written: int) -> None:
        self.state.written = written
        self._notify()

    def finish(self, entry: Entry | None) -> None:
        if entry is not None:
            self.state.entry = entry
        self.state.finished = True
        self._head_known.set()
        self._notify()

    def fail(self) -> None:
        self.state.failed = True
        self._head_known.set()
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    # ---- waiter side --------------------------------------------------------------------------

    async def wait_head(self) -> None:
        """Wait until the head is known (or the fill ended without one)."""
        await self._head_known.wait()

    async def open_follower(self) -> BinaryIO | None:
        """Open the fill's temp file for reading, or ``None`` if it is gone (committed/aborted)."""
        path = self.state.tmp_path
        if path is None or self.state.finished or self.state.failed:
            return None
        try:
            return await trio.to_thread.run_sync(open, path, "rb")
        except FileNotFoundError:
            return None

    async def follow(self, file: BinaryIO) -> AsyncIterator[bytes]:
        """Yield the body as the leader writes it; raises :class:`FillFailed` if it breaks."""
        offset = 0
        while True:
            changed = self._changed
            available = self.state.written - offset
            if available > 0:
                chunk = await trio.to_thread.run_sync(file.read, min(available, FOLLOW_CHUNK))
                if not chunk:
                    raise FillFailed("body file shorter than announced")
                offset += len(chunk)
                yield chunk
                continue
            if self.state.failed:
                raise FillFailed("the upstream fetch failed mid-body")
            if self.state.finished:
                return
            await changed.wait()


class FillFailed(Exception):
    """The fill a waiter follows broke; the waiter's transfer must be aborted."""


class FillRegistry:
    """The open fills, by key; at most one per key in this process."""

    def __init__(self) -> None:
        self._fills: dict[str, Fill] = {}

    def get(self, key: str) -> Fill | None:
        return self._fills.get(key)

    def start(self, key: str) -> Fill:
        fill = Fill(key)
        self._fills[key] = fill
        return fill

    def end(self, fill: Fill) -> None:
        if self._fills.get(fill.key) is fill:
            del self._fills[fill.key]

    def __len__(self) -> int:
        return len(self._fills)

    def keys(self) -> list[str]:
        return list(self._fills)

    def on_each(self, fn: Callable[[Fill], None]) -> None:
        for fill in list(self._fills.values()):
            fn(fill)
