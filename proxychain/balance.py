"""How workers that share one listening socket share its connections.

Theory of operation:

* Every worker waiting on the shared socket is woken when a connection arrives, and the
  first to call ``accept`` gets it. The first is whichever loop happens to be back in
  ``epoll_wait`` soonest, so a burst of connections (a load generator opening 8 at once, a
  build farm starting its jobs) often lands on one worker while its sibling idles: with
  ``--workers 2`` and 8 long connections, 2 of 3 runs gave one worker all 8.
* Each worker publishes how many connections it has open on a :class:`ConnectionBoard`, a
  few integers in memory mapped before the supervisor forks, so every worker reads its
  siblings' counts without a system call. Each worker writes only its own slot.
* A worker with more open connections than some sibling lets that sibling take the next
  connection: it waits :data:`DEFER_S` before accepting, and accepts anyway if the
  connection is still waiting then (the sibling may be busy in a long step; a connection
  must never wait on a sibling that does not come). A worker that is not ahead accepts at
  once, and stops a burst of accepts as soon as it is ahead.
* "Ahead" allows a lead of a sixteenth of all open connections (:data:`SLACK_DIVISOR`): none
  for a handful of connections, which then alternate exactly; whole bursts in a flood. With
  strict turns, a 500-client herd on 2 workers got its first bytes after 0.8 s (p50) instead
  of 0.15 s, because each turn costs a pass of a scheduler busy streaming bodies.

The board only steers who accepts; it decides nothing about requests, and a stale count
(a worker that died) costs at most :data:`DEFER_S` per connection until the supervisor
clears the slot.
"""

from __future__ import annotations

import mmap

__all__ = ["DEFER_S", "SLACK_DIVISOR", "ConnectionBoard", "Seat"]

DEFER_S = 0.001  # how long a worker ahead of a sibling leaves a new connection to it
# A worker counts as ahead only by more than this fraction of all open connections: exact
# turns for a handful, whole accept bursts in a flood (each turn costs the worker a pass of
# its scheduler, and in a 500-client herd strict turns let newcomers in one per pass).
SLACK_DIVISOR = 16
_SLOT_BYTES = 8


class ConnectionBoard:
    """Open-connection counts of ``workers`` workers, in anonymous shared memory.

    Make it before forking: the mapping is shared with every child (``MAP_SHARED``).
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a board needs at least one worker, not {workers}")
        self._memory = mmap.mmap(-1, _SLOT_BYTES * workers)
        self._counts = memoryview(self._memory).cast("q")  # aligned 64-bit stores: never torn

    def seat(self, index: int) -> Seat:
        """Worker ``index``'s place on the board."""
        if not 0 <= index < len(self._counts):
            raise IndexError(f"no worker {index} on a board of {len(self._counts)}")
        return Seat(self._counts, index)

    def counts(self) -> list[int]:
        """Every worker's published count, by worker index."""
        return list(self._counts)


class Seat:
    """One worker's slot: it publishes its own count and reads its siblings'."""

    __slots__ = ("_counts", "index")

    def __init__(self, counts: memoryview[int], index: int) -> None:
        self._counts = counts
        self.index = index

    def report(self, open_connections: int) -> None:
        """Publish this worker's number of open connections."""
        self._counts[self.index] = open_connections

    def ahead(self) -> bool:
        """True when this worker has more open connections than some sibling, by more than
        :data:`SLACK_DIVISOR`-th of all the workers' connections."""
        counts = self._counts
        if len(counts) < 2:
            return False
        mine = counts[self.index]
        fewest = min(count for i, count in enumerate(counts) if i != self.index)
        return mine > fewest + sum(counts) // SLACK_DIVISOR
