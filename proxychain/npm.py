"""The npm registry read API for a caching mirror, sans-IO.

Theory of operation
-------------------

``npm`` (and yarn, pnpm) read two kinds of URL from a registry:

* **Packuments**: ``/<name>`` or, for scoped packages, ``/@scope%2fname`` (``/@scope/name``
  is accepted too). A packument lists every version and dist-tag, so it changes with every
  publish: mutable metadata. The registry serves a full document or the abbreviated
  "corgi" form (``Accept: application/vnd.npm.install-v1+json``) at the same URL, so
  ``Accept`` is always part of the cache key (``forced_vary``). ``/<name>/<version-or-tag>``
  documents are mutable metadata too (tags move; versions can be unpublished).
* **Tarballs**: ``/<name>/-/<name>-<version>.tgz`` and ``/@scope/name/-/name-<version>.tgz``.
  A published version's tarball never changes (npm forbids reusing a version), so tarballs
  are immutable.

Scoped names are percent-decoded and re-encoded canonically (``%2F`` -> ``%2f``) so the
spellings clients use share one cache entry; that canonical path is also what goes upstream.
Paths under ``/-/`` (search, ping, audit) are ``"other"``: plain HTTP caching. Other paths that
cannot name a package classify as ``None`` (404 without asking upstream).

Packuments carry absolute tarball URLs (``versions.*.dist.tarball``) pointing at the
registry. :func:`rewrite_packument` points those that belong to the route's upstream back at
the proxy, and returns each tarball's announced integrity (``dist.integrity``, an SRI string
such as ``sha512-<base64>``, else ``dist.shasum`` as ``sha1:<hex>``) keyed by the tarball's
route-relative path, for verification at fill time with :func:`verify_digest`. The caller
decodes ``Content-Encoding`` (gzip, deflate) before rewriting and recomputes
``Content-Length`` and ``ETag`` for the new body.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass

from .mirror import (
    DEFAULT_METADATA,
    MetadataPolicy,
    PathClass,
    RewriteResult,
    parse_sri,
    verify_digest,
)

__all__ = [
    "INSTALL_V1_MEDIA_TYPE",
    "classify",
    "package_path",
    "parse_sri",
    "rewrite_packument",
    "verify_digest",
]

INSTALL_V1_MEDIA_TYPE = "application/vnd.npm.install-v1+json"

# validate-npm-package-name: the name must survive encodeURIComponent unchanged, and must not
# start with "." or "_". Legacy names may contain upper-case letters.
_NAME = re.compile(r"[A-Za-z0-9\-~!*'()][A-Za-z0-9\-._~!*'()]*")
_TARBALL = re.compile(r"[A-Za-z0-9\-._~!*'()+]+\.tgz")
_VERSION_OR_TAG = re.compile(r"[A-Za-z0-9\-._~+]+")
_ACCEPT = ("accept",)


def package_path(name: str) -> str:
    """The canonical packument path for ``name`` (``@scope/x`` -> ``/@scope%2fx``)."""
    return "/" + name.replace("/", "%2f")


def _split_name(segments: list[str]) -> tuple[str, list[str]] | None:
    """``(package name, remaining segments)`` or ``None`` when no valid name leads."""
    if not segments or not segments[0]:
        return None
    if segments[0].startswith("@"):
        if len(segments) < 2:
            return None
        scope, name = segments[0][1:], segments[1]
        if not (_NAME.fullmatch(scope) and _NAME.fullmatch(name)):
            return None
        return f"@{scope}/{name}", segments[2:]
    if not _NAME.fullmatch(segments[0]):
        return None
    return segments[0], segments[1:]


def classify(path: str, *, metadata: MetadataPolicy = DEFAULT_METADATA) -> PathClass | None:
    """Classify a route-relative path of an npm route; ``None`` when it names no package."""
    if path == "/" or path.startswith("/-/"):
        return PathClass.make_other(path)
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if not decoded.startswith("/"):
        return None
    split = _split_name(decoded[1:].split("/"))
    if split is None:
        return None
    name, rest = split
    if not rest:
        key = package_path(name)
        return PathClass.make_metadata("packument", key, metadata, forced_vary=_ACCEPT)
    if len(rest) == 2 and rest[0] == "-" and _TARBALL.fullmatch(rest[1]):
        return PathClass.make_immutable("tarball", f"/{name}/-/{rest[1]}")
    if len(rest) == 1 and _VERSION_OR_TAG.fullmatch(rest[0]) and rest[0] != "-":
        return PathClass.make_metadata("version", f"{package_path(name)}/{rest[0]}", metadata)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Upstream:
    netloc: str
    base_path: str  # no trailing slash

    def route_path(self, url: str) -> str | None:
        """Route-relative path of ``url`` when it lives under this upstream (http or https)."""
        parts = urllib.parse.urlsplit(url)
        # Old packuments still say http:// for the same registry; the host decides.
        if parts.scheme.lower() not in ("http", "https") or parts.netloc.lower() != self.netloc:
            return None
        if not parts.path.startswith(self.base_path + "/"):
            return None
        return parts.path[len(self.base_path) :]


def _integrity(dist: dict[str, object]) -> str | None:
    integrity = dist.get("integrity")
    if isinstance(integrity, str) and parse_sri(integrity):
        return integrity
    shasum = dist.get("shasum")
    if isinstance(shasum, str) and re.fullmatch(r"[0-9A-Fa-f]{40}", shasum):
        return f"sha1:{shasum.lower()}"
    return None


def rewrite_packument(body: bytes, *, upstream_base: str, proxy_base: str) -> RewriteResult:
    """Point a packument's tarball URLs at the proxy and collect their integrity.

    Args:
        body: the packument JSON, full or abbreviated, already decoded from any
            ``Content-Encoding``.
        upstream_base: the route's upstream base URL (``https://registry.npmjs.org``);
            tarball URLs on its host under its path are rewritten, others are left alone.
        proxy_base: the route's public base URL (``http://127.0.0.1:8080/npm``).

    Returns:
        The new body (the same object when nothing changed, or when ``body`` is not a JSON
        object) and ``{tarball route-relative path: integrity}``.
    """
    parts = urllib.parse.urlsplit(upstream_base)
    upstream = _Upstream(netloc=parts.netloc.lower(), base_path=parts.path.rstrip("/"))
    prefix = proxy_base.rstrip("/")
    try:
        doc = json.loads(body)
    except ValueError:
        return RewriteResult(body=body, digests={})
    versions = doc.get("versions") if isinstance(doc, dict) else None
    digests: dict[str, str] = {}
    changed = False
    for version in versions.values() if isinstance(versions, dict) else ():
        dist = version.get("dist") if isinstance(version, dict) else None
        if not isinstance(dist, dict) or not isinstance(dist.get("tarball"), str):
            continue
        route = upstream.route_path(dist["tarball"])
        if route is None:
            continue
        found = classify(route)
        key = found.key_path if found is not None and found.kind == "tarball" else route
        new_url = prefix + key
        changed = changed or new_url != dist["tarball"]
        dist["tarball"] = new_url
        integrity = _integrity(dist)
        if integrity is not None:
            digests[key] = integrity
    if not changed:
        return RewriteResult(body=body, digests=digests)
    new_body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return RewriteResult(body=new_body, digests=digests)
