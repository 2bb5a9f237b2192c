"""Circuit breaker: exact virtual times, the transition table, and invariants."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxychain.breaker import (
    TRANSITIONS,
    Breaker,
    BreakerConfig,
    BreakerEvent,
    BreakerState,
    BreakerStatistics,
    StateChange,
)
from proxychain.errors import ConfigError

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
# random.Random(0) draws 0.8444218515250481 then 0.7579544029403025; with equal jitter the
# k-th opening lasts c/2 + draw * c/2 with c = min(open_cap, open_base * 2**k).
FIRST_OPEN = 0.5 + 0.5 * 0.8444218515250481  # 0.9222109257625241 with the defaults
SECOND_OPEN = 1.0 + 1.0 * 0.7579544029403025  # 1.7579544029403025


def make(**kwargs: object) -> Breaker:
    return Breaker(BreakerConfig(**kwargs), random.Random(0))  # type: ignore[arg-type]


def fail(breaker: Breaker, times: int, now: float) -> list[StateChange | None]:
    changes = []
    for _ in range(times):
        assert breaker.allow(now)
        changes.append(breaker.on_failure(now))
    return changes


def test_opens_after_five_consecutive_failures() -> None:
    breaker = make()
    changes = fail(breaker, 5, now=0.0)
    assert FIRST_OPEN == 0.9222109257625241
    assert changes == [None] * 4 + [
        StateChange(old=CLOSED, new=OPEN, event=BreakerEvent.TRIP, at=0.0, next_probe_at=FIRST_OPEN)
    ]
    assert breaker.statistics() == BreakerStatistics(
        state=OPEN,
        consecutive_failures=5,
        opened_at=0.0,
        next_probe_at=0.9222109257625241,
        open_count=1,
        requests=5,
        failures=5,
        successes=0,
    )
    assert not breaker.allow(0.0)
    assert not breaker.allow(0.9222109257625240)
    assert breaker.allow(0.9222109257625241)  # the one half-open trial
    assert breaker.state is HALF_OPEN
    assert not breaker.allow(0.9222109257625241)
    assert not breaker.allow(50.0)
    assert breaker.statistics().requests == 6


def test_design_example_with_fixed_interval() -> None:
    breaker = make(failures=3, open_base=30.0, open_cap=60.0, open_jitter="none")
    fail(breaker, 3, now=0.0)
    assert breaker.statistics().next_probe_at == 30.0
    assert not breaker.allow(29.9)
    assert [breaker.allow(30.0), breaker.allow(30.0), breaker.allow(45.0)] == [True, False, False]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = make(failures=3)
    fail(breaker, 2, now=0.0)
    assert breaker.on_success(1.0) is None
    fail(breaker, 2, now=2.0)
    assert breaker.state is CLOSED
    assert breaker.statistics().consecutive_failures == 2
    assert fail(breaker, 1, now=3.0)[0] == StateChange(
        old=CLOSED, new=OPEN, event=BreakerEvent.TRIP, at=3.0, next_probe_at=3.0 + FIRST_OPEN
    )


def test_trial_success_closes() -> None:
    breaker = make()
    fail(breaker, 5, now=0.0)
    assert breaker.allow(1.0)
    assert breaker.on_success(1.25) == StateChange(
        old=HALF_OPEN, new=CLOSED, event=BreakerEvent.SUCCESS, at=1.25
    )
    assert breaker.statistics() == BreakerStatistics(
        state=CLOSED,
        consecutive_failures=0,
        opened_at=0.0,
        next_probe_at=FIRST_OPEN,
        open_count=1,
        requests=6,
        failures=5,
        successes=1,
    )
    assert all(breaker.allow(1.25) for _ in range(10))


def test_trial_failure_reopens_for_longer() -> None:
    breaker = make()
    fail(breaker, 5, now=0.0)
    assert breaker.allow(1.0)
    assert breaker.on_failure(1.0) == StateChange(
        old=HALF_OPEN,
        new=OPEN,
        event=BreakerEvent.FAILURE,
        at=1.0,
        next_probe_at=1.0 + SECOND_OPEN,
    )
    probe_at = 2.7579544029403023  # 1.0 + SECOND_OPEN
    assert not breaker.allow(math.nextafter(probe_at, 0.0))
    assert breaker.allow(probe_at)
    assert breaker.statistics().open_count == 2


def test_open_intervals_grow_to_the_cap_and_reset_on_close() -> None:
    breaker = make(failures=1, open_base=1.0, open_cap=8.0, open_jitter="none")
    now, intervals = 0.0, []
    fail(breaker, 1, now=now)
    for _ in range(6):
        probe_at = breaker.statistics().next_probe_at
        assert probe_at is not None
        intervals.append(probe_at - now)
        now = probe_at
        assert breaker.allow(now)
        breaker.on_failure(now)
    assert intervals == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert breaker.allow(now + 8.0)
    breaker.on_success(now + 8.0)
    fail(breaker, 1, now=100.0)
    assert breaker.statistics().next_probe_at == 101.0  # the streak started over


def test_equal_jitter_never_probes_at_once() -> None:
    # A draw of 0.0 is the worst case: the interval is still half the ceiling.
    class Zero:
        def random(self) -> float:
            return 0.0

    breaker = Breaker(BreakerConfig(failures=1), Zero())
    breaker.on_failure(10.0)
    assert breaker.statistics().next_probe_at == 10.5


def test_failures_zero_turns_it_off() -> None:
    breaker = make(failures=0, failure_ratio=0.1, window=2, min_requests=1)
    changes = fail(breaker, 1000, now=0.0)
    assert changes == [None] * 1000
    assert breaker.state is CLOSED
    assert breaker.statistics().open_count == 0


# (outcomes in CLOSED, "F" failure / "S" success) -> state after each one
RATIO_CASES = [
    ("SFSF", "CCCO"),  # 2 of 4 reach 0.5 once min_requests=4 outcomes are in
    ("FFF", "CCC"),  # fewer than min_requests: no judgement yet
    ("FFFS", "CCCC"),  # 3 of 4 but the 4th is a success: only failures trip
    ("SSSSF", "CCCCC"),  # the window is the last 4: 1 of 4
    ("SSSSFSF", "CCCCCCO"),  # last 4 are S F S F
]


@pytest.mark.parametrize(("outcomes", "states"), RATIO_CASES)
def test_failure_ratio(outcomes: str, states: str) -> None:
    breaker = make(failures=100, failure_ratio=0.5, window=4, min_requests=4)
    seen = ""
    for i, outcome in enumerate(outcomes):
        if outcome == "F":
            breaker.on_failure(float(i))
        else:
            breaker.on_success(float(i))
        seen += breaker.state.name[0]
    assert seen == states


def test_window_starts_afresh_after_closing() -> None:
    breaker = make(failures=100, failure_ratio=0.5, window=4, min_requests=2)
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)
    assert breaker.state is OPEN
    assert breaker.allow(5.0)
    breaker.on_success(5.0)
    breaker.on_failure(6.0)  # 1 of 1: below min_requests, old failures forgotten
    assert breaker.state is CLOSED
    breaker.on_success(7.0)  # 1 of 2 >= 0.5, but a success never trips
    assert breaker.state is CLOSED
    breaker.on_failure(8.0)  # 2 of 3
    assert breaker.state is OPEN


def test_stragglers_while_open_move_nothing() -> None:
    breaker = make()
    fail(breaker, 5, now=0.0)
    assert breaker.on_success(0.1) is None
    assert breaker.on_failure(0.2) is None
    stats = breaker.statistics()
    assert (stats.state, stats.consecutive_failures, stats.next_probe_at) == (OPEN, 5, FIRST_OPEN)
    assert (stats.successes, stats.failures) == (1, 6)


def test_abandoned_trial_is_released() -> None:
    breaker = make()
    fail(breaker, 5, now=0.0)
    assert breaker.allow(1.0)
    assert not breaker.allow(1.0)
    breaker.on_abandon(1.5)
    assert breaker.state is HALF_OPEN
    assert breaker.allow(1.5)
    assert not breaker.allow(1.5)


def test_abandon_outside_half_open_is_a_no_op() -> None:
    breaker = make()
    breaker.on_abandon(0.0)
    fail(breaker, 5, now=0.0)
    breaker.on_abandon(0.5)
    assert not breaker.allow(0.5)
    assert breaker.statistics().state is OPEN


def test_lost_trial_times_out() -> None:
    breaker = make(probe_timeout=10.0)
    fail(breaker, 5, now=0.0)
    assert breaker.allow(1.0)
    assert not breaker.allow(10.999)
    assert breaker.allow(11.0)
    assert not breaker.allow(11.0)


def test_a_caller_without_the_trial_is_let_through_only_while_closed() -> None:
    breaker = make()
    assert breaker.allow(0.0, trial=False)  # CLOSED: anyone
    fail(breaker, 5, now=0.0)
    # OPEN, before and after the probe time: refused, and the breaker stays OPEN for the prober.
    assert not breaker.allow(0.5, trial=False)
    assert not breaker.allow(FIRST_OPEN, trial=False)
    assert not breaker.allow(1000.0, trial=False)
    assert breaker.state is OPEN
    assert breaker.statistics().requests == 6  # the first allow and the five failures
    assert breaker.allow(1000.0, trial=True)  # the prober takes the trial
    assert breaker.state is HALF_OPEN
    assert not breaker.allow(1000.0, trial=False)
    assert not breaker.allow(1000.0, trial=True)  # still exactly one trial
    assert breaker.on_success(1000.25) == StateChange(
        old=HALF_OPEN, new=CLOSED, event=BreakerEvent.SUCCESS, at=1000.25
    )
    assert breaker.allow(1000.25, trial=False)
    assert breaker.statistics().requests == 8


def test_a_caller_without_the_trial_never_takes_a_lost_or_abandoned_one() -> None:
    breaker = make(probe_timeout=10.0)
    fail(breaker, 5, now=0.0)
    assert breaker.allow(1.0, trial=True)
    assert not breaker.allow(11.0, trial=False)  # lost, but only the prober may retake it
    assert breaker.allow(11.0, trial=True)
    breaker.on_abandon(12.0)
    assert not breaker.allow(12.0, trial=False)
    assert breaker.state is HALF_OPEN
    assert breaker.allow(12.0, trial=True)
    assert breaker.on_failure(12.5) == StateChange(
        old=HALF_OPEN,
        new=OPEN,
        event=BreakerEvent.FAILURE,
        at=12.5,
        next_probe_at=12.5 + SECOND_OPEN,
    )
    assert not breaker.allow(12.5 + SECOND_OPEN, trial=False)
    assert breaker.statistics().requests == 8


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, False),
        (404, False),
        (410, False),
        (429, False),
        (500, False),
        (502, True),
        (503, True),
        (504, True),
    ],
)
def test_is_failure_status(status: int, expected: bool) -> None:
    assert make().is_failure_status(status) is expected


def test_failure_statuses_are_configurable() -> None:
    breaker = make(failure_statuses=frozenset({500, 503}))
    assert [breaker.is_failure_status(s) for s in (500, 502, 503)] == [True, False, True]


def test_repr() -> None:
    breaker = make(failures=1, open_jitter="none")
    assert repr(breaker) == (
        "<Breaker closed consecutive_failures=0 opened_at=None next_probe_at=None"
        " open_count=0 requests=0 failures=0 successes=0>"
    )
    fail(breaker, 1, now=2.0)
    assert repr(breaker) == (
        "<Breaker open consecutive_failures=1 opened_at=2.0 next_probe_at=3.0"
        " open_count=1 requests=1 failures=1 successes=0>"
    )


def test_transition_table() -> None:
    assert TRANSITIONS[CLOSED][BreakerEvent.TRIP] is OPEN
    assert TRANSITIONS[OPEN][BreakerEvent.PROBE_DUE] is HALF_OPEN
    assert TRANSITIONS[HALF_OPEN] == {BreakerEvent.SUCCESS: CLOSED, BreakerEvent.FAILURE: OPEN}
    for state in BreakerState:  # every state takes both outcomes
        assert {BreakerEvent.SUCCESS, BreakerEvent.FAILURE} <= TRANSITIONS[state].keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failures": -1}, "failures: expected an integer >= 0"),
        ({"failure_ratio": 0.0}, r"failure_ratio: expected a ratio in \(0, 1\]"),
        ({"failure_ratio": 1.5}, r"failure_ratio: expected a ratio in \(0, 1\]"),
        ({"window": 0}, "window: expected an integer >= 1"),
        ({"window": 5, "min_requests": 6}, r"min_requests: expected an integer in \[1, window=5\]"),
        ({"probe_timeout": 0.0}, "probe_timeout: expected a duration > 0"),
        ({"failure_statuses": frozenset({99})}, "failure_statuses: expected HTTP statuses"),
        ({"open_base": 2.0, "open_cap": 1.0}, "cap: expected a finite cap >= base"),
        ({"open_base": -1.0}, "base: expected a finite base >= 0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


_OPS = st.lists(
    st.tuples(st.sampled_from(["allow", "success", "failure", "abandon"]), st.floats(0, 3)),
    max_size=80,
)


@given(ops=_OPS, failures=st.integers(0, 4), seed=st.integers(0, 1000))
def test_invariants(ops: list[tuple[str, float]], failures: int, seed: int) -> None:
    config = BreakerConfig(failures=failures, open_base=1.0, open_cap=4.0, probe_timeout=5.0)
    breaker = Breaker(config, random.Random(seed))
    now, granted, recorded = 0.0, 0, 0
    trial_since: float | None = None
    for op, step in ops:
        now += step
        before = breaker.statistics()
        if op == "allow":
            ok = breaker.allow(now)
            granted += ok
            if before.state is OPEN:
                assert before.next_probe_at is not None
                assert ok is (now >= before.next_probe_at)
            if ok and breaker.state is HALF_OPEN:
                # At most one trial in flight (unless the previous one timed out).
                assert trial_since is None or now >= trial_since + config.probe_timeout
                trial_since = now
            continue
        if op == "abandon":
            breaker.on_abandon(now)
            trial_since = None
            continue
        recorded += 1
        change = breaker.on_success(now) if op == "success" else breaker.on_failure(now)
        after = breaker.statistics()
        trial_since = None if after.state is not HALF_OPEN else trial_since
        if change is not None:
            assert (change.old, change.new, change.at) == (before.state, after.state, now)
            assert TRANSITIONS[change.old][change.event] is change.new
            if change.new is OPEN:
                assert change.next_probe_at == after.next_probe_at
                assert after.opened_at == now
                assert change.next_probe_at is not None
                assert now + 0.5 <= change.next_probe_at <= now + 4.0
        else:
            assert after.state is before.state
    stats = breaker.statistics()
    assert stats.requests == granted
    assert stats.failures + stats.successes == recorded
    if failures == 0:
        assert stats.open_count == 0
    if stats.state is CLOSED:
        assert failures == 0 or stats.consecutive_failures < failures


def test_a_probe_may_take_the_trial_before_the_open_interval_ends() -> None:
    breaker = Breaker(BreakerConfig(failures=1, open_jitter="none"), rng=random.Random(0))
    breaker.on_failure(10.0)
    assert breaker.statistics().next_probe_at == 11.0  # open_base
    assert not breaker.allow(10.5)  # a client: not yet
    assert not breaker.allow(10.5, trial=False)
    assert breaker.allow(10.5, probe=True)  # a health probe paces itself
    assert breaker.statistics().state is BreakerState.HALF_OPEN
    assert not breaker.allow(10.6, probe=True)  # one trial at a time, probe or not
    breaker.on_success(10.7)
    assert breaker.statistics().state is BreakerState.CLOSED
