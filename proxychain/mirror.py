"""Path classes for package-mirror routes, and digest checks shared by the mirror kinds.

Theory of operation
-------------------

A route has a ``kind``: ``"goproxy"``, ``"pypi"``, ``"npm"`` or ``"http"``. Package protocols
split their URL space in two:

* **Immutable artifacts**: a Go module zip for a canonical version, a PyPI distribution file,
  an npm tarball. Their bytes never change once published, so the cache serves them forever
  without revalidation until an operator purges them; HTTP freshness headers from upstream are
  ignored for them (RFC 9111 §4.2.1 lets a cache's configuration override them).
* **Mutable metadata**: version lists, ``@latest``, PyPI index pages, npm packuments. They get a
  short freshness lifetime (:data:`METADATA_TTL`), a stale-while-revalidate window
  (:data:`METADATA_SWR`, RFC 5861 §3) and a stale-if-error bound (:data:`METADATA_MAX_STALE`,
  RFC 5861 §4), so a dead upstream still lets builds resolve what they resolved last week.

Anything else on a mirror route, and every path of an ``"http"`` route, is ``"other"``: no
override, plain RFC 9111 rules apply.

:func:`classify` maps a route-relative path (the route prefix already stripped, starting with
``/``, no query) to a :class:`PathClass`, or returns (does not raise) a :class:`MalformedPath`
when the path is malformed for the protocol (a bad ``!`` escape, an invalid project or package
name, ...); each kind module's own ``classify`` returns ``None`` for those. The proxy answers
them with :data:`INVALID_PATH_STATUS` (404) without contacting any upstream: 404 rather than
400 because clients of these protocols treat 404 as "not here" (``go`` then tries the next
``GOPROXY`` entry) while 400 aborts them. ``PathClass.key_path`` is the canonical form of the
path: key the cache on it, and send it upstream, so equivalent spellings share one entry.

Integrity: index pages and packuments announce digests of the files they link to. The rewriters
return them as strings (``"sha256:<hex>"``, ``"sha1:<hex>"`` or an SRI list such as
``"sha512-<base64>"``); the shell hashes a body incrementally with every algorithm in
:data:`DIGEST_ALGORITHMS` and checks it with :func:`verify_digest` before committing the fill.
This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RequestRefused

__all__ = [
    "DEFAULT_METADATA",
    "DIGEST_ALGORITHMS",
    "INVALID_PATH_STATUS",
    "KINDS",
    "METADATA_MAX_STALE",
    "METADATA_SWR",
    "METADATA_TTL",
    "MalformedPath",
    "MetadataPolicy",
    "PathClass",
    "RewriteResult",
    "classify",
    "parse_sri",
    "verify_digest",
]

SECONDS = 1.0
MINUTE = 60 * SECONDS
DAY = 24 * 60 * MINUTE

# One minute keeps `go get pkg@latest` and `pip install -U` at most a minute behind a fresh
# release, while a build that resolves hundreds of packages hits the cache.
METADATA_TTL = 1 * MINUTE
# Serve stale metadata for up to a day while one background revalidation runs (RFC 5861 §3).
METADATA_SWR = 1 * DAY
# Keep answering from stale metadata for a week when every upstream fails (RFC 5861 §4).
METADATA_MAX_STALE = 7 * DAY

INVALID_PATH_STATUS = 404

KINDS = ("goproxy", "pypi", "npm", "http")

# Digests the shell must compute over every verified body (hashlib names).
DIGEST_ALGORITHMS = ("sha1", "sha256", "sha512")

# SRI algorithms we understand, weakest first (W3C SRI §3.3 picks the strongest present).
_SRI_ORDER = ("sha1", "sha256", "sha384", "sha512")
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


class MalformedPath(RequestRefused, ValueError):
    """A path or name is malformed for its protocol; answered 404 without asking upstream."""

    status_hint = INVALID_PATH_STATUS


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataPolicy:
    """Per-route lifetimes for mutable metadata (seconds); the route config may override them."""

    ttl: float = METADATA_TTL
    swr: float = METADATA_SWR
    max_stale: float = METADATA_MAX_STALE


DEFAULT_METADATA = MetadataPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class PathClass:
    """How the cache treats one request path of a mirror route.

    Attributes:
        kind: what the path is: ``"zip"``, ``"mod"``, ``"info"``, ``"list"``, ``"latest"``,
            ``"sumdb-supported"``, ``"sumdb-lookup"``, ``"sumdb-tile"``, ``"sumdb-latest"``,
            ``"simple-index"``, ``"project-page"``, ``"file"``, ``"packument"``,
            ``"version"``, ``"tarball"`` or ``"other"``.
        immutable: serve from cache forever, never revalidate (until purged).
        ttl: forced freshness lifetime in seconds for mutable metadata; ``None`` means no
            override (immutable paths, or ``"other"`` which follows the upstream's headers).
        swr: forced stale-while-revalidate window in seconds, or ``None``.
        max_stale: forced stale-if-error bound in seconds, or ``None``.
        key_path: the canonical route-relative path: the cache key and the upstream path.
        forced_vary: request fields (lower-case) that must be part of the secondary key even
            when the upstream's ``Vary`` omits them.
        expected_digest: a digest the path itself promises, or ``None``.
    """

    kind: str
    immutable: bool
    ttl: float | None
    swr: float | None
    max_stale: float | None
    key_path: str
    forced_vary: tuple[str, ...] = ()
    expected_digest: str | None = None

    @classmethod
    def make_immutable(cls, kind: str, key_path: str) -> PathClass:
        """An immutable artifact at ``key_path``."""
        return cls(kind=kind, immutable=True, ttl=None, swr=None, max_stale=None, key_path=key_path)

    @classmethod
    def make_metadata(
        cls,
        kind: str,
        key_path: str,
        policy: MetadataPolicy,
        *,
        forced_vary: tuple[str, ...] = (),
    ) -> PathClass:
        """Mutable metadata at ``key_path`` with ``policy``'s lifetimes."""
        return cls(
            kind=kind,
            immutable=False,
            ttl=policy.ttl,
            swr=policy.swr,
            max_stale=policy.max_stale,
            key_path=key_path,
            forced_vary=forced_vary,
        )

    @classmethod
    def make_other(cls, key_path: str) -> PathClass:
        """A path with no override: plain RFC 9111 caching."""
        return cls(
            kind="other", immutable=False, ttl=None, swr=None, max_stale=None, key_path=key_path
        )

    def replace(self, **changes: object) -> PathClass:
        """A copy with ``changes`` applied (for per-path rules in the route config)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class RewriteResult:
    """A rewritten metadata body and the digests it announced.

    Attributes:
        body: the new body (the original object when nothing needed rewriting). The caller
            recomputes ``Content-Length`` and ``ETag`` when it differs.
        digests: route-relative file path to expected digest, for verification at fill time.
    """

    body: bytes
    digests: dict[str, str]


def classify(
    kind: str, path: str, *, metadata: MetadataPolicy = DEFAULT_METADATA
) -> PathClass | MalformedPath:
    """Classify a route-relative ``path`` for a route of ``kind``.

    Args:
        kind: one of :data:`KINDS`.
        path: the request path with the route prefix stripped (starts with ``/``, no query).
        metadata: the route's lifetimes for mutable metadata.

    Returns:
        The path's class, or a :class:`MalformedPath` (not raised) when the path is malformed
        for the protocol: answer its ``status_hint`` (404) without contacting upstream.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS` (settings validation should have
            caught it).
    """
    # Imported here: the kind modules import PathClass from this module.
    found: PathClass | None
    if kind == "goproxy":
        from . import goproxy

        found = goproxy.classify(path, metadata=metadata)
    elif kind == "pypi":
        from . import pypi

        found = pypi.classify(path, metadata=metadata)
    elif kind == "npm":
        from . import npm

        found = npm.classify(path, metadata=metadata)
    elif kind == "http":
        found = PathClass.make_other(path)
    else:
        raise ValueError(f"unknown route kind {kind!r}")
    return found if found is not None else MalformedPath(f"malformed {kind} path {path!r}")


# ---- digests ---------------------------------------------------------------------------------


def parse_sri(value: str) -> list[tuple[str, bytes]]:
    """Parse a Subresource Integrity metadata list (W3C SRI §3.5), as npm's ``dist.integrity``.

    Returns:
        ``(algorithm, digest)`` pairs in order, for the algorithms sha1/sha256/sha384/sha512;
        unknown algorithms, options (``?...``) and malformed members are skipped as SRI says.
    """
    out: list[tuple[str, bytes]] = []
    for token in value.split():
        algo, sep, rest = token.partition("-")
        algo = algo.lower()
        if not sep or algo not in _DIGEST_SIZES:
            continue
        b64 = rest.split("?", 1)[0]
        try:
            digest = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == _DIGEST_SIZES[algo]:
            out.append((algo, digest))
    return out


def _parse_expected(expected: str) -> list[tuple[str, bytes]]:
    """``"<algo>:<hex>"`` or an SRI list, as ``(algo, digest)`` pairs; empty when unusable."""
    algo, sep, hexdigest = expected.partition(":")
    if sep:
        algo = algo.strip().lower()
        try:
            digest = bytes.fromhex(hexdigest.strip())
        except ValueError:
            return []
        if _DIGEST_SIZES.get(algo) != len(digest):
            return []
        return [(algo, digest)]
    return parse_sri(expected)


def verify_digest(expected: str, hashes: Mapping[str, bytes]) -> bool:
    """Check a body's digests against an announced one.

    Args:
        expected: ``"sha256:<hex>"`` (also sha1/sha384/sha512) or an SRI list
            (``"sha512-<base64> sha1-<base64>"``). For SRI the strongest algorithm present
            the caller computed decides, and any of its digests may match (W3C SRI §3.3.4).
        hashes: hashlib name to raw digest of the whole body, as computed by the caller for
            every algorithm in :data:`DIGEST_ALGORITHMS`.

    Returns:
        ``True`` when the body matches.

    Raises:
        ValueError: ``expected`` names no usable digest, or none that ``hashes`` has (a caller
            bug when the caller computes every algorithm in :data:`DIGEST_ALGORITHMS`).
    """
    pairs = _parse_expected(expected)
    if not pairs:
        raise ValueError(f"no usable digest in {expected!r}")
    usable = [algo for algo, _ in pairs if algo in hashes]
    if not usable:
        raise ValueError(f"none of the digests in {expected!r} was computed")
    strongest = max(usable, key=_SRI_ORDER.index)
    actual = hashes[strongest]
    return any(hmac.compare_digest(actual, d) for algo, d in pairs if algo == strongest)
