"""Exponential backoff with jitter, sans-IO.

Theory of operation
-------------------

Attempt ``n`` (counting from 0) has a *ceiling* ``min(cap, base * factor**n)``: the delay
grows geometrically until it reaches the cap, then stays there. Jitter spreads the delays of
many clients that failed at the same moment, so that they do not come back in lock-step (the
"thundering herd" that re-breaks a recovering upstream). The three classic shapes, in the
terms of the AWS Architecture Blog's "Exponential Backoff And Jitter" (2015):

* ``"full"``: uniform over ``[0, ceiling)``. The best spread, but a delay can be close to
  zero, so it suits short request retries, not intervals that protect an upstream.
* ``"equal"``: uniform over ``[ceiling/2, ceiling)``. Half the spread of ``"full"``, but never
  less than half the ceiling; the circuit breaker uses it for its open intervals.
* ``"none"``: exactly the ceiling, for deterministic schedules.

Randomness is a parameter, never a global: :meth:`Backoff.delay` takes an object with a
``random()`` method (a :class:`random.Random` in practice), so a seeded generator makes every
delay exact and testable. Time is not involved at all; the caller adds the delay to its ``now``.
Like urllib3's ``Retry``, a :class:`Backoff` is an immutable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from .errors import ConfigError

__all__ = ["DEFAULT_FACTOR", "Backoff", "Jitter", "RandomSource"]

Jitter = Literal["full", "equal", "none"]

# Doubling is the conventional growth rate: the number of attempts needed to reach the cap
# grows only logarithmically with the cap.
DEFAULT_FACTOR = 2.0


class RandomSource(Protocol):
    """The one method of :class:`random.Random` the resilience core needs."""

    def random(self) -> float:
        """A float uniformly distributed over ``[0, 1)``."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """An exponential backoff schedule with a cap and jitter.

    Attributes:
        base: ceiling of the first delay (attempt 0), in seconds; ``>= 0``.
        factor: growth per attempt; ``>= 1``.
        cap: largest ceiling, in seconds; ``>= base``.
        jitter: ``"full"``, ``"equal"`` or ``"none"`` (see the module docstring).

    Raises:
        ConfigError: on a negative base, a factor below 1, a cap below the base or an unknown
            jitter mode.
    """

    base: float
    factor: float = DEFAULT_FACTOR
    cap: float
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base >= 0):
            raise ConfigError(f"expected a finite base >= 0 seconds, got {self.base!r}", key="base")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ConfigError(f"expected a finite factor >= 1, got {self.factor!r}", key="factor")
        if not (math.isfinite(self.cap) and self.cap >= self.base):
            raise ConfigError(
                f"expected a finite cap >= base ({self.base}s), got {self.cap!r}", key="cap"
            )
        if self.jitter not in get_args(Jitter):
            raise ConfigError(
                f"expected one of {', '.join(get_args(Jitter))}, got {self.jitter!r}", key="jitter"
            )

    def ceiling(self, attempt: int) -> float:
        """The largest delay attempt ``attempt`` (from 0) can get: ``min(cap, base * factor**n)``.

        Raises:
            ValueError: if ``attempt`` is negative.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            raw = self.base * self.factor**attempt
        except OverflowError:  # factor**attempt beyond float range: long past the cap
            return float(self.cap)
        return float(min(self.cap, raw))

    def delay(self, attempt: int, rng: RandomSource) -> float:
        """The delay before attempt ``attempt`` (from 0), in seconds.

        Draws exactly one number from ``rng`` for ``"full"`` and ``"equal"`` jitter and none
        for ``"none"``, so a seeded generator gives a reproducible sequence.

        Raises:
            ValueError: if ``attempt`` is negative.
        """
        ceiling = self.ceiling(attempt)
        if self.jitter == "none":
            return ceiling
        if self.jitter == "equal":
            half = ceiling / 2
            return half + rng.random() * half
        return rng.random() * ceiling
