"""The failover chain of a route: GOPROXY-style upstream lists walked with breakers, sans-IO.

Theory of operation
-------------------

A route names an ordered chain of upstreams in the syntax of Go's ``GOPROXY``
(``go help goproxy``): ``"A,B|C"``. The separator *after* an upstream decides when the walk
may leave it for the next one:

* after ``,`` only when the upstream answered 404 or 410 ("I don't have it"). Any other
  failure stops the chain there. This is a safety rule, honoured exactly: a private upstream
  that is down must not leak the request (and the private module path in it) to a public one.
* after ``|`` on any failure as well: connect refused, reset, TLS failure, timeout, 5xx.

``off`` alone refuses every request (403); as the last element it refuses the requests that
reach it. ``direct`` (fetch from version control) is not supported and is a configuration error.

:class:`ChainWalk` is the walker, driven by one shell loop in the manner of h11's ``NEED_DATA``
loop: ``next(now)`` returns an :class:`Attempt` (which upstream, after which delay) or
:class:`Exhausted` (the status to answer with and why); the shell performs the attempt and
reports its outcome, a status code or an :class:`~proxychain.errors.ErrorKind`, to
``record(attempt, outcome, now)``, which feeds the upstream's breaker and returns a
:class:`Verdict`. On ``USE`` the shell streams that response and the walk is over: nothing is
ever retried once response bytes may have reached the client. Rules, in order:

1. A hop whose breaker refuses (:meth:`Breaker.allow`) is skipped if ``|`` follows it, and
   ends the walk with 502 "circuit open" if ``,`` follows it or nothing does. A hop in the
   walk's ``exclude`` set (the shell excludes an upstream whose body failed an integrity
   check, and walks again) is treated the same way, without asking its breaker: ``|`` still
   lets the walk move on, ``,`` still keeps the request from leaving for the next upstream.
   The breaker is not charged for it: a bad body says nothing about availability.
   A walk made with ``trials=False`` never takes a breaker's half-open trial (its requests
   are refused until the breaker is CLOSED again): on a route with active health checks the
   trial belongs to the health probe (see :mod:`proxychain.breaker`).
2. 404/410 moves to the next hop after either separator; on the final hop it is USEd (the
   client gets the 404), unless the chain ends in ``off``, which then refuses.
3. A connect error or reset (nothing reached the upstream's application, or at least nothing
   came back) on an idempotent request retries the *same* upstream up to
   ``RetryPolicy.max_retries`` times after a backoff delay, whatever the separator: staying on
   the same upstream leaks nothing. No retry once that failure opened the breaker, nor when
   the delay would pass the deadline. Then it is an error like the others. The breaker is
   asked again when the retry is due (``retry_at``; rule 1): if other requests' failures
   opened it during the backoff, the walk ends there.
4. An error (TLS, timeout, malformed response, spent retries) or a 5xx answer moves on after
   ``|`` and ends the walk after ``,`` or on the final hop. Errors, 502, 503 and 504 count
   against the breaker; 500 and every 4xx are answers and count as successes (RFC 9110 §15.6).
5. The walk's ``status_hint`` is 504 when its last failure was a timeout or the request's
   deadline passed (RFC 9110 §15.6.5), otherwise 502 (§15.6.3).

Moving to *another* upstream needs no delay: backoff protects the one that just failed.

A path the route declares private walks a chain restricted to the upstreams allowed to see it
(:mod:`proxychain.privatepaths`); a request that has been through this proxy before is refused
before any walk (:mod:`proxychain.loops`).
"""

from __future__ import annotations

import enum
import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from .backoff import Backoff, RandomSource
from .breaker import DEFAULT_FAILURE_STATUSES, Breaker, BreakerState, StateChange
from .errors import ConfigError, ErrorKind

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_RETRY_BACKOFF",
    "Attempt",
    "Chain",
    "ChainError",
    "ChainWalk",
    "Exhausted",
    "Fallthrough",
    "Hop",
    "Refuse",
    "RetryPolicy",
    "Verdict",
    "classify",
    "parse_chain",
]

Fallthrough = Literal["notfound", "any"]

# One retry absorbs the common transient (a stale keep-alive connection the upstream closed, a
# restart); more only delays the move to the next upstream.
DEFAULT_MAX_RETRIES: Final = 1
# 50 ms first ceiling, full jitter, capped at 1 s: well under any client's patience.
DEFAULT_RETRY_BACKOFF: Final = Backoff(base=0.050, factor=2.0, cap=1.0, jitter="full")

_RETRYABLE: Final = frozenset({ErrorKind.CONNECT, ErrorKind.RESET})
_ERROR_TEXT: Final = {
    ErrorKind.CONNECT: "could not be connected to",
    ErrorKind.TLS: "failed the TLS handshake",
    ErrorKind.RESET: "reset the connection before answering",
    ErrorKind.TIMEOUT: "timed out",
    ErrorKind.PROTOCOL: "sent a malformed response",
}


class ChainError(ConfigError):
    """An ``upstreams`` chain or a private-path pattern is malformed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Hop:
    """One upstream of a chain; ``fallthrough`` is the rule of the separator after it."""

    url: str
    fallthrough: Fallthrough = "notfound"


@dataclass(frozen=True, kw_only=True, slots=True)
class Refuse:
    """The chain is ``off``: refuse without contacting anyone."""

    reason: str = 'upstreams are "off" for this route'
    status_hint: int = 403


@dataclass(frozen=True, kw_only=True, slots=True)
class Chain:
    """The parsed chain: ``hops`` in order, and whether it ends in ``off``."""

    hops: tuple[Hop, ...]
    ends_off: bool = False

    def __post_init__(self) -> None:
        if not self.hops:
            raise ChainError("a chain needs at least one upstream (use Refuse for off)")


def parse_chain(text: str) -> Chain | Refuse:
    """Parse a GOPROXY-style list such as ``"https://a,https://b|https://c"``.

    Elements are stripped of surrounding whitespace.

    Raises:
        ChainError: on an empty list or element, ``direct``, ``off`` before the end, or an
            element that is not an ``http://`` or ``https://`` URL with a host.
    """
    if not text.strip():
        raise ChainError('empty upstream list; expected e.g. "https://a,https://b|https://c"')
    tokens = re.split(r"([,|])", text)
    elements = [t.strip() for t in tokens[0::2]]
    separators = tokens[1::2]
    hops: list[Hop] = []
    for i, element in enumerate(elements):
        last = i == len(elements) - 1
        if not element:
            raise ChainError(f"empty element #{i + 1} in {text!r}; check for a stray , or |")
        if element == "direct":
            raise ChainError(
                '"direct" (fetching from version control) is not supported; '
                'list upstream proxy URLs, or "off" to refuse'
            )
        if element == "off":
            if not last:
                raise ChainError(
                    f'"off" must be the last element of {text!r}; nothing after it runs'
                )
            if not hops:
                return Refuse()
            return Chain(hops=tuple(hops), ends_off=True)
        _check_url(element)
        after = separators[i] if not last else ","
        hops.append(Hop(url=element, fallthrough="any" if after == "|" else "notfound"))
    return Chain(hops=tuple(hops))


def _check_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ChainError(f"bad upstream URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ChainError(f"expected an http:// or https:// URL with a host, got {url!r}")
    if any(ch.isspace() for ch in url) or parts.fragment or parts.query:
        raise ChainError(f"upstream URL {url!r} must have no spaces, query or fragment")


class Verdict(enum.Enum):
    """What to do with one attempt's outcome."""

    USE = "use"  # send this response to the client
    NEXT_NOTFOUND = "next-notfound"  # 404/410: try the next hop, after , or |
    NEXT_ERROR = "next-error"  # failure: the next hop only after |
    RETRY_SAME = "retry-same"  # connect error or reset: the same upstream again


def classify(outcome: int | ErrorKind) -> Verdict:
    """The context-free verdict on a status code or error kind (see the module rules).

    Raises:
        ValueError: for a status outside 100-599.
    """
    if isinstance(outcome, ErrorKind):
        return Verdict.RETRY_SAME if outcome in _RETRYABLE else Verdict.NEXT_ERROR
    if not 100 <= outcome <= 599:
        raise ValueError(f"not an HTTP status: {outcome}")
    if outcome in (404, 410):
        return Verdict.NEXT_NOTFOUND
    return Verdict.NEXT_ERROR if outcome >= 500 else Verdict.USE


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How often and after what delay to retry the same upstream (rule 3)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff: Backoff = DEFAULT_RETRY_BACKOFF

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"expected an integer >= 0, got {self.max_retries}", key="retries")


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """Send the request to ``upstream_url`` after sleeping ``delay_before`` seconds.

    ``attempt_no`` counts from 1 over the whole walk; ``hop`` indexes the chain; ``retry`` is 0
    for the first try of that hop.
    """

    upstream_url: str
    delay_before: float
    attempt_no: int
    hop: int
    retry: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Exhausted:
    """The walk is over without a usable response: answer ``status_hint`` with ``reason``.

    ``history`` describes every failed attempt or skipped hop, oldest first.
    """

    status_hint: int
    reason: str
    history: tuple[str, ...] = ()


@dataclass(eq=False, kw_only=True)
class _Progress:
    hop: int = 0
    retry: int = 0
    delay: float = 0.0
    delay_from: float = 0.0  # when the retry ``delay`` was scheduled (by ``record``)
    attempts: int = 0
    pending: Attempt | None = None
    used: bool = False
    result: Exhausted | None = None
    history: list[str] = field(default_factory=list)


class ChainWalk:
    """One request's walk along a chain (see the module docstring for the rules).

    Args:
        chain: the route's chain, possibly restricted by
            :func:`~proxychain.privatepaths.restrict_chain`.
        breakers: upstream URL to its breaker; an upstream without one is always allowed.
        retry: the same-upstream retry policy.
        rng: jitter source for retry delays.
        now: when the walk starts (the shell's monotonic clock).
        deadline: absolute time after which no attempt starts (request-level deadline).
        idempotent: whether the method may be retried (rule 3 applies only then).
        exclude: upstream URLs not to contact (rule 1).
        trials: whether this walk may take a breaker's half-open trial (rule 1); False when
            the route's health probe owns the trials.
    """

    def __init__(
        self,
        chain: Chain | Refuse,
        breakers: Mapping[str, Breaker],
        retry: RetryPolicy,
        rng: RandomSource,
        now: float,
        *,
        deadline: float = math.inf,
        idempotent: bool = True,
        exclude: frozenset[str] = frozenset(),
        trials: bool = True,
    ) -> None:
        self.chain = chain
        self.started_at = now
        self.deadline = deadline
        self.last_state_change: StateChange | None = None
        self._breakers = breakers
        self._retry = retry
        self._rng = rng
        self._idempotent = idempotent
        self._exclude = exclude
        self._trials = trials
        self._p = _Progress()
        if isinstance(chain, Refuse):
            self._p.result = Exhausted(status_hint=chain.status_hint, reason=chain.reason)

    def next(self, now: float) -> Attempt | Exhausted:
        """The next step: an attempt to make, or the end of the walk.

        Raises:
            RuntimeError: if the previous attempt was not recorded, or the walk ended in USE.
        """
        p = self._p
        if p.pending is not None:
            raise RuntimeError("record() or abandon() the previous attempt first")
        if p.used:
            raise RuntimeError("the walk ended with USE; nothing is retried after that")
        if p.result is not None:
            return p.result
        if now >= self.deadline:
            return self._finish(504, "request deadline exceeded")
        assert isinstance(self.chain, Chain)
        hops = self.chain.hops
        while p.hop < len(hops):
            hop = hops[p.hop]
            breaker = self._breakers.get(hop.url)
            excluded = hop.url in self._exclude
            # An excluded hop never asks its breaker: allow() may hand out a half-open probe.
            if not excluded and (breaker is None or breaker.allow(now, trial=self._trials)):
                p.attempts += 1
                p.pending = Attempt(
                    upstream_url=hop.url,
                    delay_before=self._delay_left(now),
                    attempt_no=p.attempts,
                    hop=p.hop,
                    retry=p.retry,
                )
                return p.pending
            reason = (
                f"upstream {hop.url} excluded (failed an integrity check)"
                if excluded
                else f"upstream {hop.url} unavailable (circuit open)"
            )
            p.history.append(reason)
            if not (hop.fallthrough == "any" and self._has_next(p.hop)):
                return self._finish(502, reason)
            self._advance()
        return self._finish(403, f"{p.history[-1]}; the chain ends in off")

    def record(self, attempt: Attempt, outcome: int | ErrorKind, now: float) -> Verdict:
        """Feed the outcome of ``attempt`` (a status code or an error kind) to the walk.

        Also records it on the upstream's breaker; a resulting transition is left in
        :attr:`last_state_change` for the shell to log. Returns the verdict in context: a 404
        on the final hop is USE, a retry that the policy or the deadline forbids is NEXT_ERROR.
        After anything but USE, call :meth:`next`.

        Raises:
            RuntimeError: if ``attempt`` is not the one :meth:`next` returned last.
        """
        p = self._p
        if attempt is not p.pending:
            raise RuntimeError(f"{attempt!r} is not the pending attempt")
        p.pending = None
        verdict = classify(outcome)
        hop = self._hops[attempt.hop]
        breaker = self._breakers.get(hop.url)
        failure = isinstance(outcome, ErrorKind) or (
            breaker.is_failure_status(outcome)
            if breaker is not None
            else outcome in DEFAULT_FAILURE_STATUSES
        )
        if breaker is None:
            self.last_state_change = None
        elif failure:
            self.last_state_change = breaker.on_failure(now)
        else:
            self.last_state_change = breaker.on_success(now)
        has_next = self._has_next(attempt.hop)
        # has_next counts a trailing off, so a final 404 there moves on and is refused.
        if verdict is Verdict.USE or (verdict is Verdict.NEXT_NOTFOUND and not has_next):
            p.used = True
            return Verdict.USE
        if isinstance(outcome, ErrorKind):
            text = f"upstream {hop.url} {_ERROR_TEXT[outcome]}"
        else:
            text = f"upstream {hop.url} answered {outcome}"
        p.history.append(text)
        if verdict is Verdict.NEXT_NOTFOUND:
            self._advance()
            return verdict
        if verdict is Verdict.RETRY_SAME:
            # An opened breaker (this failure may have tripped it) forbids the retry.
            may_retry = breaker is None or breaker.state is not BreakerState.OPEN
            if may_retry and self._idempotent and attempt.retry < self._retry.max_retries:
                delay = self._retry.backoff.delay(attempt.retry, self._rng)
                if now + delay < self.deadline:
                    p.retry, p.delay, p.delay_from = attempt.retry + 1, delay, now
                    return verdict
            verdict = Verdict.NEXT_ERROR
        if hop.fallthrough == "any" and has_next:
            self._advance()
        else:
            self._finish(504 if outcome is ErrorKind.TIMEOUT else 502, text)
        return verdict

    def abandon(self, attempt: Attempt, now: float) -> None:
        """End the walk after ``attempt`` was cancelled (client gone, request deadline).

        The upstream is not judged; a half-open trial is released. :meth:`next` then returns
        :class:`Exhausted` (504 if the deadline has passed).
        """
        p = self._p
        if attempt is not p.pending:
            raise RuntimeError(f"{attempt!r} is not the pending attempt")
        p.pending = None
        breaker = self._breakers.get(attempt.upstream_url)
        if breaker is not None:
            breaker.on_abandon(now)
        if now >= self.deadline:
            self._finish(504, "request deadline exceeded")
        else:
            self._finish(502, f"attempt to upstream {attempt.upstream_url} abandoned")

    @property
    def retry_at(self) -> float | None:
        """When the retry :meth:`record` scheduled is due, or ``None`` if nothing waits.

        A shell that sleeps until then *before* calling :meth:`next` lets the breaker judge
        the retry when it is made, not when it was scheduled: failures of other requests during
        the backoff may have opened it, and the walk then ends at once (rule 1) instead of
        sending one more request to an upstream known to be down. The shell may also stop
        waiting early, when the breaker opens.
        """
        p = self._p
        if p.pending is not None or p.used or p.result is not None or p.delay <= 0:
            return None
        return p.delay_from + p.delay

    def _delay_left(self, now: float) -> float:
        """What remains of the retry delay at ``now`` (all of it when asked at once)."""
        due = self.retry_at
        if due is None or now >= due:
            return 0.0
        return self._p.delay - (now - self._p.delay_from)

    @property
    def chain_ends_off(self) -> bool:
        """Whether reaching the end of the chain refuses."""
        return isinstance(self.chain, Chain) and self.chain.ends_off

    @property
    def _hops(self) -> tuple[Hop, ...]:
        assert isinstance(self.chain, Chain)
        return self.chain.hops

    def _has_next(self, index: int) -> bool:
        return index + 1 < len(self._hops) or self.chain_ends_off

    def _advance(self) -> None:
        self._p.hop += 1
        self._p.retry, self._p.delay = 0, 0.0

    def _finish(self, status: int, reason: str) -> Exhausted:
        p = self._p
        p.result = Exhausted(status_hint=status, reason=reason, history=tuple(p.history))
        return p.result

    def __repr__(self) -> str:
        p = self._p
        state = "used" if p.used else "pending" if p.pending else "done" if p.result else "ready"
        return f"<ChainWalk {state} hop={p.hop} retry={p.retry} attempts={p.attempts}>"
