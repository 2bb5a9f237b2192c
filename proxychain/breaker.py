"""A per-upstream circuit breaker as a table-driven state machine, sans-IO.

Theory of operation
-------------------

The breaker stops the proxy from sending requests to an upstream that is known to be down,
so that a failing upstream costs a client nothing (it is skipped, or the chain stops at once)
instead of a connect timeout per request, and so that a recovering upstream is not flooded.

There are three states, and the transitions between them are the data in
:data:`TRANSITIONS` (in the manner of ``h11._state.EVENT_TRIGGERED_TRANSITIONS``):

* ``CLOSED``: requests flow. Every recorded outcome is a :data:`BreakerEvent.SUCCESS` or a
  :data:`BreakerEvent.FAILURE`; a failure that crosses a threshold is a :data:`BreakerEvent.TRIP`
  instead. The thresholds are decided in one place, :meth:`Breaker._trips`: ``failures``
  consecutive failures, or (when ``failure_ratio`` is set) a failure ratio at or above it over
  the last ``window`` outcomes, once at least ``min_requests`` of them were seen.
  ``failures = 0`` turns the breaker off: it never opens, whatever the ratio.
* ``OPEN``: :meth:`Breaker.allow` answers False until ``next_probe_at``. Outcomes of requests
  that were already in flight when it opened are counted in the statistics but move nothing.
* ``HALF_OPEN``: entered lazily, by the first :meth:`Breaker.allow` at or after
  ``next_probe_at`` (:data:`BreakerEvent.PROBE_DUE`) that may take the trial. Exactly one trial
  request (or health probe) is let through; everyone else is refused until its outcome is
  recorded. Success closes the breaker, failure re-opens it with the next, longer interval.

Who takes the trial. ``allow(now, trial=False)`` is a caller that must not take it: it is let
through while CLOSED only, and never moves an OPEN breaker to HALF_OPEN. The shell passes it
for client requests on a route with active health checks, so there the trial after an opening
belongs to the health probe. That spares a sick upstream real requests (each trial a client
takes is one more request sent to an upstream known to be down, and one client waiting on it),
while the probe is cheap and has no client waiting on it; the upstream returns to service when
a probe succeeds. Without health checks clients take the trial (``trial=True``, the default),
or nothing would ever close the breaker. A health probe paces itself (``health_interval``), so
``allow(now, probe=True)`` lets it take the trial while OPEN even before ``next_probe_at``: a
recovered upstream is back within a probe interval, not within an open interval that has grown
to ``open_cap`` during a long outage, and a probe costs the upstream almost nothing.

Open intervals. The k-th consecutive opening (k = 0 for the first after CLOSED) stays open for
``Backoff(base=open_base, factor=2, cap=open_cap, jitter="equal").delay(k, rng)`` seconds:
uniform over ``[c/2, c)`` with ``c = min(open_cap, open_base * 2**k)``. Equal rather than full
jitter, because full jitter over ``[0, c)`` would sometimes re-probe a dead upstream almost at
once; with the defaults the first interval is 0.5-1 s, the sixth and later 30-60 s. Breakers of
many processes or routes opened by the same outage still spread their probes over half the
interval. The schedule can be made exact with ``open_jitter="none"``.

A trial that never reports back must not wedge the breaker in HALF_OPEN: the shell calls
:meth:`Breaker.on_abandon` when a trial is cancelled (client gone, deadline hit), which frees
the slot without judging the upstream, and as a safety net a trial older than
``probe_timeout`` is presumed lost, so the next :meth:`Breaker.allow` that may take a trial
grants a fresh one.

Time is always the ``now`` argument (the shell's monotonic clock), randomness the ``rng``
passed at construction; nothing here blocks or reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from .backoff import Backoff, Jitter, RandomSource
from .errors import ConfigError

__all__ = [
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_FAILURE_STATUSES",
    "DEFAULT_MIN_REQUESTS",
    "DEFAULT_OPEN_BASE",
    "DEFAULT_OPEN_CAP",
    "DEFAULT_PROBE_TIMEOUT",
    "DEFAULT_WINDOW",
    "TRANSITIONS",
    "Breaker",
    "BreakerConfig",
    "BreakerEvent",
    "BreakerState",
    "BreakerStatistics",
    "StateChange",
]

SECONDS: Final = 1.0

# Five in a row is a pattern, not bad luck; low enough to trip within one burst of traffic.
DEFAULT_BREAKER_FAILURES: Final = 5
# Short first interval: most upstream blips (a restart, a full accept queue) last about a second.
DEFAULT_OPEN_BASE: Final = 1 * SECONDS
# A minute bounds how long a recovered upstream is ignored.
DEFAULT_OPEN_CAP: Final = 60 * SECONDS
# Ratio mode looks at the last 20 outcomes and does not judge on fewer than 10.
DEFAULT_WINDOW: Final = 20
DEFAULT_MIN_REQUESTS: Final = 10
# Bad gateway, unavailable, gateway timeout: the upstream itself is unwell. A plain 500 and
# every 4xx are answers about the resource, not about the upstream's health.
DEFAULT_FAILURE_STATUSES: Final = frozenset({502, 503, 504})
# Longer than any sensible request deadline, so a well-behaved shell always reports first;
# this only rescues a trial whose outcome was lost.
DEFAULT_PROBE_TIMEOUT: Final = 120 * SECONDS
_OPEN_FACTOR: Final = 2.0


class BreakerState(enum.Enum):
    """Where a breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class BreakerEvent(enum.Enum):
    """What happened; the key of :data:`TRANSITIONS`."""

    SUCCESS = "success"
    FAILURE = "failure"
    TRIP = "trip"  # a failure in CLOSED that crossed a threshold
    PROBE_DUE = "probe-due"  # allow() at or after next_probe_at while OPEN


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

TRANSITIONS: Final[Mapping[BreakerState, Mapping[BreakerEvent, BreakerState]]] = {
    CLOSED: {
        BreakerEvent.SUCCESS: CLOSED,
        BreakerEvent.FAILURE: CLOSED,
        BreakerEvent.TRIP: OPEN,
    },
    OPEN: {
        # Stragglers admitted before the breaker opened: counted, but they move nothing.
        BreakerEvent.SUCCESS: OPEN,
        BreakerEvent.FAILURE: OPEN,
        BreakerEvent.PROBE_DUE: HALF_OPEN,
    },
    HALF_OPEN: {
        BreakerEvent.SUCCESS: CLOSED,
        BreakerEvent.FAILURE: OPEN,
    },
}


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerConfig:
    """The knobs of one breaker (``[route.breaker]`` in the configuration).

    Attributes:
        failures: consecutive failures that open the breaker; 0 turns the breaker off.
        failure_ratio: also open when this share of the last ``window`` outcomes failed
            (``None``: ratio mode off); in ``(0, 1]``.
        window: how many recent outcomes ratio mode looks at.
        min_requests: outcomes needed in the window before ratio mode judges.
        open_base, open_cap: first and largest open-interval ceiling, in seconds.
        open_jitter: jitter of the open intervals (see the module docstring).
        probe_timeout: seconds after which an unreported half-open trial is presumed lost.
        failure_statuses: response statuses that count as failures of the upstream.

    Raises:
        ConfigError: when a value is out of range.
    """

    failures: int = DEFAULT_BREAKER_FAILURES
    failure_ratio: float | None = None
    window: int = DEFAULT_WINDOW
    min_requests: int = DEFAULT_MIN_REQUESTS
    open_base: float = DEFAULT_OPEN_BASE
    open_cap: float = DEFAULT_OPEN_CAP
    open_jitter: Jitter = "equal"
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES

    def __post_init__(self) -> None:
        if self.failures < 0:
            raise ConfigError(f"expected an integer >= 0, got {self.failures}", key="failures")
        if self.failure_ratio is not None and not 0 < self.failure_ratio <= 1:
            raise ConfigError(
                f"expected a ratio in (0, 1], got {self.failure_ratio}", key="failure_ratio"
            )
        if self.window < 1:
            raise ConfigError(f"expected an integer >= 1, got {self.window}", key="window")
        if not 1 <= self.min_requests <= self.window:
            raise ConfigError(
                f"expected an integer in [1, window={self.window}], got {self.min_requests}",
                key="min_requests",
            )
        if not (math.isfinite(self.probe_timeout) and self.probe_timeout > 0):
            raise ConfigError(
                f"expected a duration > 0, got {self.probe_timeout}", key="probe_timeout"
            )
        if any(not 100 <= s <= 599 for s in self.failure_statuses):
            raise ConfigError(
                f"expected HTTP statuses, got {sorted(self.failure_statuses)}",
                key="failure_statuses",
            )
        self.backoff()  # validates open_base, open_cap and open_jitter

    def backoff(self) -> Backoff:
        """The schedule of open intervals."""
        return Backoff(
            base=self.open_base, factor=_OPEN_FACTOR, cap=self.open_cap, jitter=self.open_jitter
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class StateChange:
    """A transition, returned for the shell to log and count.

    Attributes:
        old, new: the states before and after.
        event: what caused it.
        at: the ``now`` of the transition.
        next_probe_at: when an opened breaker lets its trial through; ``None`` unless ``new``
            is OPEN.
    """

    old: BreakerState
    new: BreakerState
    event: BreakerEvent
    at: float
    next_probe_at: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerStatistics:
    """A snapshot of a breaker, for metrics, the status page and tests.

    ``state`` is the stored state: an OPEN breaker whose ``next_probe_at`` has passed reports
    OPEN until the next :meth:`Breaker.allow` moves it to HALF_OPEN.

    Attributes:
        consecutive_failures: failures since the last success.
        opened_at, next_probe_at: of the current or last opening (``None`` before any).
        open_count: times the breaker opened, in total.
        requests: times :meth:`Breaker.allow` said yes.
        failures, successes: outcomes recorded, in total.
    """

    state: BreakerState
    consecutive_failures: int
    opened_at: float | None
    next_probe_at: float | None
    open_count: int
    requests: int
    failures: int
    successes: int


@dataclass(eq=False, kw_only=True)
class _Counters:
    consecutive_failures: int = 0
    open_streak: int = 0  # openings since the last close; picks the open interval
    opened_at: float | None = None
    next_probe_at: float | None = None
    trial_started: float | None = None  # HALF_OPEN: when the one trial was let through
    open_count: int = 0
    requests: int = 0
    failures: int = 0
    successes: int = 0
    window: deque[bool] = field(default_factory=deque)  # True for a failure


class Breaker:
    """The circuit breaker of one upstream.

    Args:
        config: thresholds and intervals.
        rng: the source of jitter for open intervals (a seeded :class:`random.Random` in tests).
    """

    def __init__(self, config: BreakerConfig, rng: RandomSource) -> None:
        self.config = config
        self._rng = rng
        self._backoff = config.backoff()
        self._state = CLOSED
        self._c = _Counters(window=deque(maxlen=config.window))

    @property
    def state(self) -> BreakerState:
        """The stored state (see :class:`BreakerStatistics` about lazy HALF_OPEN)."""
        return self._state

    def is_failure_status(self, status: int) -> bool:
        """Whether a response with ``status`` counts against the upstream."""
        return status in self.config.failure_statuses

    def allow(self, now: float, *, trial: bool = True, probe: bool = False) -> bool:
        """Whether a request (or health probe) may go to the upstream now.

        ``trial=False`` is a caller that must leave the half-open trial to someone else (a
        client request on a route whose health probe owns the trial; see the module
        docstring): it gets True only while CLOSED, and its call moves nothing.
        ``probe=True`` is a health probe: while OPEN it may take the trial before
        ``next_probe_at`` (it paces itself).

        A True in HALF_OPEN grants *the* trial: the caller must report its outcome with
        :meth:`on_success`, :meth:`on_failure` or :meth:`on_abandon`.
        """
        c = self._c
        if self._state is not CLOSED and not trial:
            return False
        if self._state is OPEN:
            assert c.next_probe_at is not None
            if now < c.next_probe_at and not probe:
                return False
            self._fire(BreakerEvent.PROBE_DUE, now)  # not reported: statistics() shows it
        if self._state is HALF_OPEN:
            if c.trial_started is not None and now < c.trial_started + self.config.probe_timeout:
                return False
            c.trial_started = now
        c.requests += 1
        return True

    def on_success(self, now: float) -> StateChange | None:
        """Record a usable answer; returns the transition, if any."""
        c = self._c
        c.successes += 1
        if self._state is OPEN:
            return None
        c.consecutive_failures = 0
        if self._state is CLOSED:
            c.window.append(False)
        return self._fire(BreakerEvent.SUCCESS, now)

    def on_failure(self, now: float) -> StateChange | None:
        """Record a failure of the upstream; returns the transition, if any."""
        c = self._c
        c.failures += 1
        if self._state is OPEN:
            return None
        c.consecutive_failures += 1
        if self._state is CLOSED:
            c.window.append(True)
            if not self._trips():
                return self._fire(BreakerEvent.FAILURE, now)
            return self._fire(BreakerEvent.TRIP, now)
        return self._fire(BreakerEvent.FAILURE, now)

    def on_abandon(self, now: float) -> None:
        """Forget a request that ended without an outcome (cancelled); frees a HALF_OPEN trial.

        ``now`` is accepted for symmetry with the other ``on_*`` methods.
        """
        if self._state is HALF_OPEN:
            self._c.trial_started = None

    def statistics(self) -> BreakerStatistics:
        """A frozen snapshot of the breaker."""
        c = self._c
        return BreakerStatistics(
            state=self._state,
            consecutive_failures=c.consecutive_failures,
            opened_at=c.opened_at,
            next_probe_at=c.next_probe_at,
            open_count=c.open_count,
            requests=c.requests,
            failures=c.failures,
            successes=c.successes,
        )

    def __repr__(self) -> str:
        c = self._c
        return (
            f"<Breaker {self._state.value} consecutive_failures={c.consecutive_failures}"
            f" opened_at={c.opened_at} next_probe_at={c.next_probe_at}"
            f" open_count={c.open_count} requests={c.requests}"
            f" failures={c.failures} successes={c.successes}>"
        )

    def _trips(self) -> bool:
        """Whether the failure just recorded in CLOSED opens the breaker: the one exception."""
        cfg, c = self.config, self._c
        if cfg.failures == 0:
            return False
        if c.consecutive_failures >= cfg.failures:
            return True
        if cfg.failure_ratio is None or len(c.window) < cfg.min_requests:
            return False
        return sum(c.window) >= cfg.failure_ratio * len(c.window)

    def _fire(self, event: BreakerEvent, now: float) -> StateChange | None:
        """Apply ``event`` through :data:`TRANSITIONS`, then the new state's entry actions."""
        old = self._state
        new = TRANSITIONS[old][event]
        if new is old:
            return None
        c = self._c
        self._state = new
        c.trial_started = None
        c.window.clear()  # a new state judges the upstream afresh
        if new is OPEN:
            c.opened_at = now
            c.next_probe_at = now + self._backoff.delay(c.open_streak, self._rng)
            c.open_streak += 1
            c.open_count += 1
        elif new is CLOSED:
            c.open_streak = 0
        next_probe_at = c.next_probe_at if new is OPEN else None
        return StateChange(old=old, new=new, event=event, at=now, next_probe_at=next_probe_at)
