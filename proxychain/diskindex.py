"""The disk tier's index: what this process knows is on disk, in least-recently-used order.

Eviction needs an LRU order of everything on disk, and the tier must not read the disk to
know it. :class:`DiskIndex` keeps just key, variant, bytes on disk and a sequence number per
entry, and the byte total the budget is enforced over. Lookups and commits register what they
see; the background scan's findings are merged behind everything this process has used
(oldest metadata mtime first), and entries indexed before a scan that it no longer finds are
forgotten (another process removed them). Each process keeps its own recency.

Bookkeeping only, on the event loop: the tier does the file I/O.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["SCAN_MERGE_BATCH", "DiskIndex", "IndexKey"]

SCAN_MERGE_BATCH = 2048  # found entries indexed between checkpoints of the event loop

IndexKey = tuple[str, str]  # (key, variant)


class DiskIndex:
    """Bytes on disk per ``(key, variant)``, least recently used first, and their total."""

    def __init__(self) -> None:
        # (key, variant) -> (bytes on disk, sequence number of the last use); LRU first.
        self._entries: OrderedDict[IndexKey, tuple[int, int]] = OrderedDict()
        # Keys indexed with a variant other than "" (responses with Vary), and how many such
        # variants each: with ``(key, "")`` this tells "not indexed" without a set of all keys.
        self._varied: dict[str, int] = {}
        self._bytes = 0
        self._seq = 0
        self._removed_while_scanning: set[IndexKey] | None = None

    @property
    def bytes(self) -> int:
        """Bodies plus metadata of the indexed entries."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def holds_key(self, key: str) -> bool:
        """True when some variant of ``key`` is indexed."""
        return (key, "") in self._entries or key in self._varied

    def oldest(self) -> IndexKey:
        """The least recently used entry (the index must not be empty)."""
        return next(iter(self._entries))

    def put(self, ikey: IndexKey, size: int, *, recent: bool) -> None:
        """Register ``ikey`` at ``size`` bytes: as just used when ``recent``, else (found by a
        lookup or a scan) behind everything used, and only when not known already."""
        old = self._entries.get(ikey)
        if old is not None and not recent:
            return  # already known; what we know is fresher than a scan
        if old is None and ikey[1]:
            self._varied[ikey[0]] = self._varied.get(ikey[0], 0) + 1
        self._bytes += size - (old[0] if old else 0)
        self._entries[ikey] = (size, self._seq)
        self._seq += 1
        self._entries.move_to_end(ikey, last=recent)

    def drop(self, ikey: IndexKey) -> None:
        """Forget ``ikey`` (removed or evicted), so that a scan under way does not bring it
        back."""
        old = self._entries.pop(ikey, None)
        if old is not None:
            self._bytes -= old[0]
            if ikey[1]:
                left = self._varied.pop(ikey[0]) - 1
                if left:
                    self._varied[ikey[0]] = left
        if self._removed_while_scanning is not None:
            self._removed_while_scanning.add(ikey)

    def touch(self, ikey: IndexKey) -> None:
        """Move ``ikey`` to the most recently used end, if it is indexed."""
        if ikey in self._entries:
            # Its size is unchanged, and its sequence number only tells a scan what was
            # registered after it started, which a hit does not do.
            self._entries.move_to_end(ikey)

    @contextmanager
    def scanning(self) -> Iterator[int]:
        """Around a scan: yields its start mark for :meth:`merge_scan`, and remembers what is
        dropped meanwhile (a scan may have listed it before it went)."""
        start = self._seq
        self._removed_while_scanning = set()
        try:
            yield start
        finally:
            self._removed_while_scanning = None

    async def merge_scan(
        self, start: int, ikeys: list[IndexKey], sizes: array[int], mtimes: array[float]
    ) -> None:
        """Index what a scan found behind everything used meanwhile, oldest metadata first,
        and forget what was indexed before the scan and is no longer on disk."""
        removed = self._removed_while_scanning or set()
        # Newest first, each pushed to the LRU end: the oldest metadata ends up evicted first
        # (ties keep the scan's order, as a stable sort does).
        order = sorted(range(len(ikeys)), key=mtimes.__getitem__, reverse=True)
        still = self._seq  # found again: stamped as seen by this scan, its place kept
        self._seq += 1
        for n, i in enumerate(order):
            if n % SCAN_MERGE_BATCH == SCAN_MERGE_BATCH - 1:
                await trio.lowlevel.checkpoint()
            ikey = ikeys[i]
            if ikey in removed:
                continue
            old = self._entries.get(ikey)
            if old is None:
                self.put(ikey, sizes[i], recent=False)
            elif old[1] < start:
                self._entries[ikey] = (old[0], still)
        gone = [ikey for ikey, (_, seq) in self._entries.items() if seq < start]
        for ikey in gone:
            self.drop(ikey)  # another process removed it
