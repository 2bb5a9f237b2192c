"""Rewritten links and bodies: where links point, decoding a body, a rewritten entry's validators.

PyPI index pages and npm packuments are rewritten so that their links lead back through the
proxy (the rewriters themselves are ``pypi.rewrite_index`` and ``npm.rewrite_packument``). The
links start with the route's public base (:func:`proxy_base_for`); a PyPI file host's links
become ``/files/<host>/...`` paths, which :func:`upstream_target` maps back to the host.

A rewritten body is not the upstream's representation: it is stored decoded, with its own
``Content-Length`` and a strong ``ETag`` of ours (``"pc-`` and 40 hex digits of its sha256),
while the upstream's ETag is kept aside in ``x-upstream-etag``. Revalidating such an entry
therefore asks the upstream with the upstream's ETag, and maps a 304 back to ours.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib

from . import mirror, pypi
from .errors import RequestRefused
from .http import Headers, ResponseHead
from .integrity import IntegrityError
from .policy import UPSTREAM_ETAG_FIELD
from .settings import RouteSettings

__all__ = [
    "REWRITTEN_ETAG_PREFIX",
    "decode_content",
    "proxy_base_for",
    "rewritten_conditionals",
    "rewritten_headers",
    "rewritten_not_modified",
    "upstream_target",
]

# Response fields that describe the upstream's bytes, not a rewritten body.
_REPRESENTATION_FIELDS = ("content-encoding", "content-length", "content-md5", "digest", "etag")
# A rewritten body's strong ETag: this prefix, then 40 hex digits of its sha256.
REWRITTEN_ETAG_PREFIX = '"pc-'


def proxy_base_for(prefix: str, *, host: str | None, scheme: str = "http") -> str:
    """The public base URL of a route as a client reached it (``http://host:port/npm``).

    ``host`` is the client's ``Host`` field; without one the result is root-relative.
    """
    base = prefix.rstrip("/")
    return f"{scheme}://{host}{base}" if host else base


def upstream_target(route: RouteSettings, key_path: str) -> tuple[str | None, str]:
    """Where a route-relative path is fetched: ``(file host base URL, path)`` for PyPI's
    ``/files/<host>/...`` paths whose host is one of the route's ``file_hosts``, else
    ``(None, key_path)``: the route's own chain.

    A ``/files/`` path naming another host goes to the chain unchanged: when the upstream is
    another proxychain, it is that node's rewritten file link (a chained cache), and any other
    upstream answers 404. Only configured hosts are contacted directly (never an open relay).

    Raises:
        MalformedPath: a ``/files/`` path without host or file part.
    """
    if route.kind != "pypi":
        return None, key_path
    try:
        return pypi.map_file_path(key_path, file_hosts=route.file_hosts)
    except mirror.MalformedPath:
        raise
    except RequestRefused:
        return None, key_path


def decode_content(data: bytes, coding: str) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, identity; several in order).

    Raises:
        IntegrityError: an unknown coding, or a corrupt encoded body.
    """
    codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
    for name in reversed(codings):
        try:
            if name in ("gzip", "x-gzip"):
                data = gzip.decompress(data)
            elif name == "deflate":
                # RFC 9110 §8.4.1.2 says zlib-wrapped; some servers send raw deflate.
                try:
                    data = zlib.decompress(data)
                except zlib.error:
                    data = zlib.decompress(data, -zlib.MAX_WBITS)
            elif name != "identity":
                raise IntegrityError(f"cannot decode Content-Encoding {name!r} to rewrite")
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"corrupt {name} body: {exc}") from exc
    return data


def rewritten_headers(headers: Headers, body: bytes) -> Headers:
    """Describe ``body`` instead of the upstream's representation; keep its ETag aside."""
    upstream_etag = headers.get("etag")
    out = headers.remove(*_REPRESENTATION_FIELDS)
    if upstream_etag:
        out = out.set(UPSTREAM_ETAG_FIELD, upstream_etag)
    etag = REWRITTEN_ETAG_PREFIX + hashlib.sha256(body).hexdigest()[:40] + '"'
    return out.set("content-length", str(len(body))).set("etag", etag)


def rewritten_conditionals(stored: Headers, conditional: Headers) -> Headers:
    """The validators to send upstream for a stored entry, which may be a rewritten body.

    A rewritten body's ETag is ours; the upstream only knows its own, kept in
    ``x-upstream-etag`` (absent when the upstream sent none: then only the date validates).
    """
    if not _is_rewritten(stored):
        return conditional
    upstream_etag = stored.get(UPSTREAM_ETAG_FIELD)
    if upstream_etag:
        return conditional.set("if-none-match", upstream_etag)
    return conditional.remove("if-none-match")


def rewritten_not_modified(stored: Headers, head: ResponseHead) -> ResponseHead:
    """A 304 for a rewritten entry, in the terms of the stored body (RFC 9111 §4.3.4).

    The upstream's ETag is mapped back to ours (so the 304 selects the entry, and our ETag is
    kept), and the fields describing the upstream's bytes are dropped.
    """
    if head.status != 304 or not _is_rewritten(stored):
        return head
    headers = head.headers.remove(*_REPRESENTATION_FIELDS)
    etag, ours = head.headers.get("etag"), stored.get("etag")
    if ours and (etag is None or etag == stored.get(UPSTREAM_ETAG_FIELD)):
        headers = headers.set("etag", ours)
    elif etag is not None:
        headers = headers.set("etag", etag)  # another representation: selects nothing
    return ResponseHead(status=304, reason=head.reason, headers=headers)


def _is_rewritten(stored: Headers) -> bool:
    etag = stored.get("etag") or ""
    return stored.get(UPSTREAM_ETAG_FIELD) is not None or etag.startswith(REWRITTEN_ETAG_PREFIX)
