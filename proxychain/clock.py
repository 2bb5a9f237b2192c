"""The proxy's one source of time.

Every timeout, breaker interval and age computation reads time through :class:`Clock`, which is
driven by trio's clock. Under ``trio.testing.MockClock`` the whole proxy, wall time included,
runs on virtual time: ``wall()`` is a fixed anchor plus the trio clock's progress.
"""

from __future__ import annotations

import time

import trio

__all__ = ["Clock"]


class Clock:
    """Monotonic time from trio, and a wall clock derived from it.

    Args:
        wall_anchor: the wall time (seconds since the epoch) that corresponds to the trio clock
            reading when the ``Clock`` is first used. Defaults to the real wall time; tests pin
            it (for example ``1_700_000_000``) so ``Date`` and ``Age`` are deterministic.
    """

    def __init__(self, wall_anchor: float | None = None) -> None:
        self._wall_anchor = wall_anchor
        self._trio_anchor: float | None = None

    def monotonic(self) -> float:
        """Seconds on trio's clock (virtual under MockClock)."""
        return trio.current_time()

    def wall(self) -> float:
        """Seconds since the epoch, advancing with trio's clock."""
        now = trio.current_time()
        if self._trio_anchor is None:
            self._trio_anchor = now
            if self._wall_anchor is None:
                self._wall_anchor = time.time()
        assert self._wall_anchor is not None
        return self._wall_anchor + (now - self._trio_anchor)
