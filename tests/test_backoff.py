"""Backoff: exact delays under a seeded generator, the cap, and validation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxychain.backoff import Backoff, Jitter
from proxychain.errors import ConfigError

# random.Random(0).random() yields 0.8444218515250481, 0.7579544029403025, 0.420571580830845,
# 0.25891675029296335, 0.5112747213686085, 0.4049341374504143, 0.7837985890347726,
# 0.30331272607892745: each expected delay below is that draw scaled into its range.
DELAY_CASES: list[tuple[Jitter, list[float]]] = [
    (
        "full",  # draw * ceiling
        [
            0.8444218515250481,
            1.515908805880605,
            1.68228632332338,
            2.071334002343707,
            8.180395541897736,
            12.957892398413257,
            47.02791534208636,
            18.198763564735646,
        ],
    ),
    (
        "equal",  # ceiling/2 + draw * ceiling/2
        [
            0.9222109257625241,
            1.7579544029403025,
            2.84114316166169,
            5.035667001171854,
            12.090197770948869,
            22.47894619920663,
            53.51395767104318,
            39.09938178236782,
        ],
    ),
    ("none", [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
]


@pytest.mark.parametrize(("jitter", "expected"), DELAY_CASES)
def test_delays_are_exact_under_a_seed(jitter: Jitter, expected: list[float]) -> None:
    backoff = Backoff(base=1.0, cap=60.0, jitter=jitter)
    rng = random.Random(0)
    assert [backoff.delay(n, rng) for n in range(8)] == expected


def test_retry_schedule_is_exact() -> None:
    backoff = Backoff(base=0.05, factor=2.0, cap=1.0)
    rng = random.Random(0)
    assert [backoff.delay(n, rng) for n in range(6)] == [
        0.04222109257625241,
        0.07579544029403025,
        0.084114316166169,
        0.10356670011718534,
        0.40901977709488685,
        0.4049341374504143,  # ceiling 1.0 (the cap) from attempt 5 on
    ]


@pytest.mark.parametrize(
    ("base", "factor", "cap", "ceilings"),
    [
        (1.0, 2.0, 60.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (0.1, 3.0, 5.0, [0.1, 0.30000000000000004, 0.9, 2.7, 5.0, 5.0, 5.0, 5.0]),
        (2.0, 1.0, 10.0, [2.0] * 8),
        (0.0, 2.0, 0.0, [0.0] * 8),
    ],
)
def test_ceiling(base: float, factor: float, cap: float, ceilings: list[float]) -> None:
    backoff = Backoff(base=base, factor=factor, cap=cap)
    assert [backoff.ceiling(n) for n in range(8)] == ceilings


def test_huge_attempt_is_capped_not_overflowing() -> None:
    backoff = Backoff(base=1.0, cap=60.0, jitter="none")
    assert backoff.ceiling(100_000) == 60.0
    assert backoff.delay(100_000, random.Random(0)) == 60.0


class _NoDraws:
    def random(self) -> float:
        raise AssertionError("jitter 'none' must not draw")


def test_none_jitter_draws_nothing() -> None:
    assert Backoff(base=0.5, cap=4.0, jitter="none").delay(2, _NoDraws()) == 2.0


def test_one_draw_per_delay() -> None:
    # A second generator advanced by hand stays in step with the one the backoff uses.
    backoff = Backoff(base=1.0, cap=8.0, jitter="equal")
    used, mirror = random.Random(7), random.Random(7)
    for n in range(5):
        backoff.delay(n, used)
        mirror.random()
    assert used.random() == mirror.random()


def test_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        Backoff(base=1.0, cap=2.0).delay(-1, random.Random(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": -1.0, "cap": 1.0}, "base: expected a finite base >= 0"),
        ({"base": float("nan"), "cap": 1.0}, "base: expected a finite base >= 0"),
        ({"base": 1.0, "factor": 0.5, "cap": 2.0}, "factor: expected a finite factor >= 1"),
        ({"base": 2.0, "cap": 1.0}, r"cap: expected a finite cap >= base \(2.0s\)"),
        ({"base": 1.0, "cap": float("inf")}, "cap: expected a finite cap"),
        ({"base": 1.0, "cap": 2.0, "jitter": "half"}, "jitter: expected one of full, equal, none"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_is_frozen_value() -> None:
    a = Backoff(base=1.0, cap=2.0)
    assert a == Backoff(base=1.0, factor=2.0, cap=2.0, jitter="full")
    with pytest.raises(AttributeError):
        a.base = 3.0  # type: ignore[misc]


@given(
    base=st.floats(0, 10),
    extra=st.floats(0, 100),
    factor=st.floats(1, 4),
    attempt=st.integers(0, 200),
    seed=st.integers(0, 2**32),
)
def test_delays_stay_within_their_range(
    base: float, extra: float, factor: float, attempt: int, seed: int
) -> None:
    cap = base + extra
    ceilings = {
        j: Backoff(base=base, factor=factor, cap=cap, jitter=j).ceiling(attempt)
        for j in ("full", "equal", "none")
    }
    ceiling = ceilings["none"]
    assert ceilings["full"] == ceilings["equal"] == ceiling <= cap
    assert Backoff(base=base, factor=factor, cap=cap).ceiling(attempt + 1) >= ceiling
    full = Backoff(base=base, factor=factor, cap=cap, jitter="full")
    equal = Backoff(base=base, factor=factor, cap=cap, jitter="equal")
    assert 0.0 <= full.delay(attempt, random.Random(seed)) <= ceiling
    assert ceiling / 2 <= equal.delay(attempt, random.Random(seed)) <= ceiling
