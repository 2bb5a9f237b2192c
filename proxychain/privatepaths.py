"""Private paths of a route (``GOPRIVATE``/``GONOPROXY`` style): which upstreams may see a path.

Theory of operation
-------------------

A route may name private path patterns, each with the upstreams allowed to see paths that
match it. Before a request walks the route's chain, :func:`match_private` finds the first
:class:`PrivateRule` whose glob patterns match a prefix of the module path, with the semantics
of Go's ``module.MatchPrefixPatterns`` and ``path.Match`` (:func:`match_prefix_patterns`);
:func:`restrict_chain` then keeps only that rule's upstreams, each hop with its own separator,
and refuses (403) without contacting anyone when none is left. The walk itself
(:class:`~proxychain.failover.ChainWalk`) then needs no notion of privacy: whatever the
separators say, the restricted chain holds no upstream the rule does not name.

Patterns are checked when a rule is built: a malformed glob raises
:class:`~proxychain.failover.ChainError` at configuration time, not on some later request.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .failover import Chain, ChainError, Refuse

__all__ = [
    "PrivateRule",
    "match_prefix_patterns",
    "match_private",
    "restrict_chain",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivateRule:
    """Paths matching any of ``patterns`` may only be fetched from ``upstreams``.

    Raises:
        ChainError: on no patterns, no upstreams or a malformed glob.
    """

    patterns: tuple[str, ...]
    upstreams: tuple[str, ...]

    def __post_init__(self) -> None:
        if not any(g.strip("/") for p in self.patterns for g in p.split(",")):
            raise ChainError("a private rule needs at least one pattern")
        if not self.upstreams:
            raise ChainError("a private rule needs at least one upstream")
        for pattern in self.patterns:
            for glob in pattern.split(","):
                _compile_glob(glob.rstrip("/"))


def match_prefix_patterns(globs: Iterable[str], target: str) -> bool:
    """Go's ``module.MatchPrefixPatterns``: does any glob match a prefix of ``target``'s elements?

    A glob with N slashes is matched (with ``path.Match`` rules: ``*`` and ``?`` never match
    ``/``) against the first N+1 slash-separated elements of ``target``. Each glob may itself
    be a comma-separated list, as in ``GOPRIVATE``; a trailing ``/`` and empty globs are ignored.

    Raises:
        ChainError: on a malformed glob.
    """
    for item in globs:
        for raw in item.split(","):
            glob = raw.removesuffix("/")
            if not glob:
                continue
            elements = glob.count("/") + 1
            parts = target.split("/")
            if len(parts) < elements:
                continue
            if _compile_glob(glob).fullmatch("/".join(parts[:elements])):
                return True
    return False


def match_private(path: str, rules: Iterable[PrivateRule]) -> PrivateRule | None:
    """The first rule whose patterns match the module ``path`` (a leading ``/`` is ignored).

    ``path`` is the unescaped module path, e.g. ``corp.example/team/lib/@v/list``; matching
    a prefix of its elements makes the ``@v/...`` suffix irrelevant.
    """
    target = path.lstrip("/")
    for rule in rules:
        if match_prefix_patterns(rule.patterns, target):
            return rule
    return None


def restrict_chain(chain: Chain | Refuse, rule: PrivateRule) -> Chain | Refuse:
    """Keep only the hops ``rule`` allows, in order, each with its own separator.

    Returns :class:`Refuse` (403) when no hop is left, so the request goes nowhere.
    """
    if isinstance(chain, Refuse):
        return chain
    allowed = set(rule.upstreams)
    hops = tuple(hop for hop in chain.hops if hop.url in allowed)
    if not hops:
        return Refuse(reason="this private path may not be fetched from the route's upstreams")
    return Chain(hops=hops, ends_off=chain.ends_off)


@functools.lru_cache(maxsize=256)
def _compile_glob(glob: str) -> re.Pattern[str]:
    """Translate a Go ``path.Match`` glob to a regex; ChainError where Go says ErrBadPattern."""
    out: list[str] = []
    i, n = 0, len(glob)

    def bad(why: str) -> ChainError:
        return ChainError(f"bad path pattern {glob!r}: {why}")

    def char(j: int) -> tuple[str, int]:
        """One class character, honouring ``\\`` escapes; returns it and the next index."""
        if j >= n or glob[j] in "-]":
            raise bad("unterminated or malformed [ ] class")
        if glob[j] == "\\":
            if j + 1 >= n:
                raise bad("trailing backslash")
            return glob[j + 1], j + 2
        return glob[j], j + 1

    while i < n:
        ch = glob[i]
        if ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "\\":
            if i + 1 >= n:
                raise bad("trailing backslash")
            out.append(re.escape(glob[i + 1]))
            i += 2
        elif ch == "[":
            i += 1
            negate = i < n and glob[i] == "^"
            i += negate
            ranges: list[str] = []
            count = 0
            while True:
                if i < n and glob[i] == "]" and count:
                    i += 1
                    break
                lo, i = char(i)
                hi = lo
                if i < n and glob[i] == "-":
                    hi, i = char(i + 1)
                count += 1
                if lo <= hi:  # Go accepts an inverted range; it simply matches nothing
                    ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
            if ranges:
                out.append(f"[{'^' if negate else ''}{''.join(ranges)}]")
            else:
                out.append("." if negate else "(?!)")
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out), re.DOTALL)
