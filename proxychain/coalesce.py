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
  head does not arrive within the coalescing timeout. If the fill ends before the waiter sent
  anything, the fill's outcome decides: a fill that failed because the upstream failed (the
  leader's ``UpstreamError``, kept as ``FillState.error``) gives each waiter that same error,
  which the waiter answers as it would its own (a stale copy where stale-if-error allows, an
  honest 502/504 otherwise) instead of asking a failing upstream again, so concurrent requests
  for a key make one upstream fetch even when it fails; any other failure (the leader's client
  left, the fill was cancelled) sends the waiter to fetch on its own. A fill that fails after
  the waiter started sending aborts the waiter's transfer (never a short "complete" body).
* Revalidations coalesce the same way: the leader's conditional request registers a fill;
  a 304 ends it as finished with the freshened entry, and its waiters serve that entry from
  the store; a 200 is followed like any fill.
* The newest pieces of the body are handed to waiters from memory: the leader publishes each
  piece it accepts (the same ``bytes`` object it sends its own client and gives the writer),
  and the fill keeps a bounded window of them while it has waiters. A herd that follows the
  fill closely never reads the temp file, and its first bytes do not wait for the writer's
  next batch to reach the disk. Pieces the writer has not written yet are always kept, so
  every byte is either in the window or in the file.
* A waiter behind the window reads the temp file, and waiters share those reads: a piece read
  for one waiter is kept (a bounded window of recent pieces) and handed, as the same ``bytes``
  object, to every waiter that reaches that offset, so a herd of N waiters costs one file read
  per piece instead of N.
* The leader hands the fill a read-only descriptor of its temp file, and each waiter takes a
  duplicate of it when it joins (``dup`` does no file-system I/O). An open descriptor stays
  valid across ``os.replace`` on POSIX, so a waiter keeps reading the committed body after the
  leader renames it. A waiter that arrives after the commit simply finds the entry in the
  store.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from .entry import Entry
from .errors import UpstreamError
from .http import ResponseHead

__all__ = ["CrossProcessLead", "Fill", "FillRegistry", "FillState"]

# Read size for waiters following a fill: bytes per system call is what counts for big bodies.
FOLLOW_CHUNK = 1024 * 1024
# Waiters are woken each time the body grows past a multiple of this, not on every write: a
# herd of N waiters costs N task switches per wake-up, and upstream reads are smaller.
# The price is that a waiter may trail the leader by up to this much until the fill ends;
# one wake-up per read-size piece keeps a herd's cost per waiter near one piece per wake.
FOLLOW_WAKE_STEP = FOLLOW_CHUNK  # bytes
# Recently read pieces kept for the waiters that follow: a herd moves together, so a few
# pieces cover it; a waiter further behind reads for itself.
SHARED_READ_WINDOW = 8 * FOLLOW_CHUNK  # bytes
# ... and at least this often while the body grows slowly (seconds).
FOLLOW_WAKE_INTERVAL = 0.010
# The newest body pieces kept in memory for waiters (beyond those not yet in the file): a herd
# moves together within a few read sizes of the leader; a waiter further behind reads the file.
LIVE_WINDOW = 4 * FOLLOW_CHUNK  # bytes


class CrossProcessLead(Protocol):
    """A lead on a key's fill held across worker processes (``siblingfill.HeldLead``)."""

    def announce(self, head: ResponseHead, entry: Entry, tmp_path: Path) -> None:
        """Tell the other processes where the fill's body is being written."""

    def release(self) -> None:
        """Let go of the lead (idempotent)."""


@dataclass(slots=True)
class FillState:
    """What the leader has published so far."""

    head: ResponseHead | None = None
    entry: Entry | None = None  # the entry being written (variant, vary values)
    received: int = 0  # body bytes the leader accepted: in the live window or the temp file
    written: int = 0  # body bytes in the temp file
    finished: bool = False
    failed: bool = False
    storable: bool = False
    expected: int | None = None  # the body's length, when the upstream announced it
    # The whole body arrived (some of it may still wait in the writer's batch for the commit).
    arrived: bool = False
    # The upstream failure that ended the fill before any head was published: its waiters got
    # nothing from it, and share this answer instead of asking the failing upstream again.
    error: UpstreamError | None = None


@dataclass(eq=False)
class Fill:
    """One in-flight upstream fetch for a key, observable by waiters."""

    key: str
    state: FillState = field(default_factory=FillState)
    waiters: int = 0
    # The leader's client has the whole body and the commit runs in the background: the commit
    # task, not the leader's request, ends the fill.
    committing_in_background: bool = False
    # Purged or invalidated (an unsafe method, another worker's purge) while filling: what
    # was fetched before that is served to the clients already reading it, but not kept.
    invalidated: bool = False
    # What a revalidation fill validates (the leader's ``Stored``, compared by identity), so
    # that a 304 for that very lookup, and no other, ends the fill as freshened.
    validating: object | None = None
    # Under ``--workers``: this worker's lock on leading the key's fill across processes
    # (``siblingfill.py``), released when the fill leaves the registry.
    lead: CrossProcessLead | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    _head_known: trio.Event = field(default_factory=trio.Event)
    _ended_event: trio.Event = field(default_factory=trio.Event)
    # The live window: the newest pieces as the leader accepted them, contiguous and ending at
    # ``state.received``; ``_live_offsets[i]`` is where ``_live[i]`` starts.
    _live: list[bytes] = field(default_factory=list)
    _live_offsets: list[int] = field(default_factory=list)
    _live_size: int = 0
    _pieces: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes read there
    _pieces_size: int = 0
    _reading: dict[int, trio.Event] = field(default_factory=dict)  # offset -> read under way
    _notified_at: float = -math.inf
    _shared: BinaryIO | None = None  # the temp file, read-only; waiters take duplicates

    # ---- leader side --------------------------------------------------------------------------

    def publish_head(
        self, head: ResponseHead, entry: Entry | None, reader: BinaryIO | None, storable: bool
    ) -> None:
        """The response head is known; ``reader`` (owned by the fill from now on) reads the
        temp file the body is written to, if it is kept."""
        self.state.head = head
        self.state.entry = entry
        self.state.storable = storable
        self._shared = reader
        length = head.headers.get("content-length")
        self.state.expected = int(length) if length and length.isdigit() else None
        self._head_known.set()
        self._notify()

    def publish_body(self, piece: bytes) -> None:
        """The leader accepted ``piece``, the body's next bytes (follow with
        :meth:`publish_written` once the writer took it)."""
        before = self.state.received
        received = self.state.received = before + len(piece)
        if type(piece) is not bytes:
            # h11 hands out bytearrays: one immutable copy here, instead of one per waiter
            # wherever a send needs ``bytes``.
            piece = bytes(piece)
        self._live.append(piece)
        self._live_offsets.append(before)
        self._live_size += len(piece)
        # Batch wake-ups by size, but never let a slow trickle (a slow WAN), the first bytes of
        # a herd's fill or the body's last bytes wait for a whole step.
        if (
            before == 0
            or received // FOLLOW_WAKE_STEP != before // FOLLOW_WAKE_STEP
            or received == self.state.expected
            or trio.current_time() - self._notified_at >= FOLLOW_WAKE_INTERVAL
        ):
            self._notify()

    def publish_written(self, written: int) -> None:
        """``written`` bytes of the body are in the temp file: pieces up to there may leave
        the live window (all of them while nobody follows)."""
        self.state.written = written
        keep = LIVE_WINDOW if self.waiters else 0
        drop = 0
        while (
            drop < len(self._live)
            and self._live_size > keep
            and self._live_offsets[drop] + len(self._live[drop]) <= written
        ):
            self._live_size -= len(self._live[drop])
            drop += 1
        if drop:
            del self._live[:drop], self._live_offsets[:drop]

    def publish_file_size(self, size: int) -> None:
        """The body reached ``size`` bytes in the temp file, written by another process (a
        sibling worker's fill mirrored here): there are no live pieces, waiters read the file."""
        if size > self.state.written:
            self.state.received = self.state.written = size
            self._notify()

    def body_arrived(self) -> None:
        """The leader has the whole body; only writing its last batch and the commit remain."""
        self.state.arrived = True

    def finish(self, entry: Entry | None) -> None:
        """The fill ended well: ``entry`` is committed (or freshened by a 304) in the store."""
        if entry is not None:
            self.state.entry = entry
            # The committed body is whole, including bytes the writer held back for a batch.
            self.state.written = max(self.state.written, entry.body_size)
        self.state.finished = True
        self._head_known.set()
        self._ended_event.set()
        self._notify()

    def fail(self, error: UpstreamError | None = None) -> None:
        """The fill ended without a usable answer; a no-op once it has ended.

        ``error`` is kept for the waiters only when no head was published: a failure after the
        head (a body cut short) aborts the waiters that follow it, and says nothing about
        whether a fetch of their own would fail too.
        """
        if self._ended():
            return
        if self.state.head is None:
            self.state.error = error
        self.state.failed = True
        self._head_known.set()
        self._ended_event.set()
        self._notify()

    def _notify(self) -> None:
        self._notified_at = trio.current_time()
        event, self._changed = self._changed, trio.Event()
        event.set()

    # ---- waiter side --------------------------------------------------------------------------

    async def wait_head(self) -> None:
        """Wait until the head is known (or the fill ended without one)."""
        await self._head_known.wait()

    async def wait_end(self) -> None:
        """Wait until the fill has finished or failed."""
        await self._ended_event.wait()

    def open_follower(self) -> BinaryIO | None:
        """A descriptor of the fill's temp file for one waiter (close it), or ``None`` when
        there is none (the body is not kept, or the fill ended).

        A duplicate of the one the leader handed over: ``dup`` does no file-system I/O, so a
        herd joins without a worker-thread call each, and reads use ``pread``, so the shared
        file offset does not matter.
        """
        if self._shared is None or self._ended():
            return None
        return os.fdopen(os.dup(self._shared.fileno()), "rb", buffering=0)

    def _ended(self) -> bool:
        return self.state.finished or self.state.failed

    def close_shared(self) -> None:
        """Close the descriptor waiters' files were duplicated from (they keep their own)."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

    def follow(self, file: BinaryIO) -> AsyncIterator[bytes]:
        """The body as the leader writes it; raises :class:`FillFailed` if it breaks.

        A plain iterator rather than an async generator: a waiter whose client leaves simply
        drops it, with nothing left to finalise.
        """
        return _Follower(self, file)

    def _live_piece(self, offset: int) -> bytes | None:
        """The body from ``offset`` to the end of its live piece, or None if that is no
        longer in the live window."""
        if not self._live or offset < self._live_offsets[0]:
            return None
        i = bisect.bisect_right(self._live_offsets, offset) - 1
        piece = self._live[i]
        start = self._live_offsets[i]
        # A waiter that caught up from the file may land inside a piece (a copy, once).
        return piece if offset == start else piece[offset - start :]

    async def _read_at(self, file: BinaryIO, offset: int, size: int) -> bytes:
        """The piece of the temp file at ``offset``: shared with other waiters, or read here."""
        while (pending := self._reading.get(offset)) is not None:
            await pending.wait()
        piece = self._pieces.get(offset)
        if piece is not None:
            return piece
        done = self._reading[offset] = trio.Event()
        try:
            piece = await trio.to_thread.run_sync(os.pread, file.fileno(), size, offset)
        finally:
            del self._reading[offset]
            done.set()
        if piece:
            self._pieces[offset] = piece
            self._pieces_size += len(piece)
            while self._pieces_size > SHARED_READ_WINDOW:
                oldest = min(self._pieces)
                self._pieces_size -= len(self._pieces.pop(oldest))
        return piece


class _Follower:
    """One waiter's position in a fill's body."""

    def __init__(self, fill: Fill, file: BinaryIO) -> None:
        self._fill = fill
        self._file = file
        self._offset = 0

    def __aiter__(self) -> _Follower:
        return self

    async def __anext__(self) -> bytes:
        fill = self._fill
        while True:
            changed = fill._changed
            offset = self._offset
            if offset < fill.state.received:
                chunk = fill._live_piece(offset)
                if chunk is None:
                    # Behind the live window, hence within what the file holds.
                    size = min(fill.state.written - offset, FOLLOW_CHUNK)
                    chunk = await fill._read_at(self._file, offset, size)
                    if not chunk:
                        raise FillFailed("body file shorter than announced")
                self._offset += len(chunk)
                return chunk
            if fill.state.failed:
                raise FillFailed("the upstream fetch failed mid-body")
            if fill.state.finished or offset == fill.state.expected:
                # With a known length the body is complete before the commit ends the fill.
                raise StopAsyncIteration
            await changed.wait()


class FillFailed(Exception):
    """The fill a waiter follows broke; the waiter's transfer must be aborted."""


class FillRegistry:
    """The open fills, by key; at most one per key in this process."""

    def __init__(self) -> None:
        self._fills: dict[str, Fill] = {}
        self._empty = trio.Event()  # set while no fill is open
        self._empty.set()

    def get(self, key: str) -> Fill | None:
        """The open fill of ``key`` a request may join (not one invalidated meanwhile)."""
        fill = self._fills.get(key)
        return None if fill is None or fill.invalidated else fill

    def holds(self, key: str) -> bool:
        """Whether a fill of ``key`` is open in this process, invalidated or not."""
        return key in self._fills

    async def wait_empty(self) -> None:
        """Wait until no fill is open."""
        await self._empty.wait()

    def invalidate(self, key: str | None = None, url_prefix: str | None = None) -> list[Fill]:
        """Mark the fill of ``key``, or of every URL under ``url_prefix``, as invalidated;
        returns the fills marked."""
        marked = []
        for fill in self._fills.values():
            entry = fill.state.entry
            if fill.key == key or (
                url_prefix is not None and entry is not None and entry.url.startswith(url_prefix)
            ):
                fill.invalidated = True
                marked.append(fill)
        return marked

    def start(self, key: str) -> Fill:
        fill = Fill(key)
        self._fills[key] = fill
        if self._empty.is_set():
            self._empty = trio.Event()
        return fill

    def end(self, fill: Fill) -> None:
        """Take ``fill`` out of the registry, failing it if it has not ended (nobody else
        would, and its waiters wait for its end)."""
        fill.fail()  # a no-op once it has ended
        if self._fills.get(fill.key) is fill:
            del self._fills[fill.key]
            if not self._fills:
                self._empty.set()
        fill.close_shared()
        if fill.lead is not None:
            fill.lead.release()
            fill.lead = None
