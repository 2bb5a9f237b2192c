"""Buffered fills: bodies checked or rewritten before any client sees a byte of them.

Most fills stream (``teeing.py``): each chunk goes to the client and into the store writer at
once. When ``packages.plan_fill`` returns a plan (a file with an announced digest, an index
page or packument whose links are rewritten, a checksum-database lookup), the proxy calls
:func:`fill_buffered` instead: the whole upstream body goes into a store writer only, then
``packages.finish_fill`` verifies and/or rewrites it and commits it, or drops it and returns
the :class:`~proxychain.integrity.IntegrityError`. The proxy then serves the committed entry
from the store, or counts the failure and walks the chain again without that upstream.

Nothing is published to the fill's waiters while the body is buffered (no head, no temp file
to follow): they wait for the end of the fill and read the store, so an unchecked byte is
never sent to anyone.
"""

from __future__ import annotations

import dataclasses

import trio

from . import digestbook, keys, mirror, packages
from .entry import Entry
from .fetch import FetchResult
from .http import Headers
from .integrity import IntegrityError
from .packages import FillPlan
from .store import Store

__all__ = ["REWRITE_ACCEPT_ENCODING", "fill_buffered", "fill_headers", "keyed_path_class"]

# What a fill of a rewritten path class accepts: the rewriter decodes gzip (and deflate), not
# brotli or zstd, so the client's own Accept-Encoding is not forwarded for those.
REWRITE_ACCEPT_ENCODING = "gzip"


def keyed_path_class(route_kind: str, path_class: mirror.PathClass) -> mirror.PathClass:
    """``path_class`` with the request fields its stored answer depends on here.

    A rewritten packument's tarball URLs are absolute, built from the client's ``Host``: a
    client that reached this node under another name must not get links to that one.
    """
    if route_kind == "npm" and path_class.kind == "packument":
        return dataclasses.replace(path_class, forced_vary=(*path_class.forced_vary, "host"))
    return path_class


def fill_headers(
    headers: Headers, route_kind: str, path_kind: str, *, file_host: str | None
) -> Headers:
    """The fields of a fill request, adjusted for rewriting and for file hosts.

    ``Accept-Encoding`` becomes the one the variant is keyed by (:func:`keys.asked_encoding`),
    so that what the upstream answers is right for every client sharing the variant.
    """
    if packages.rewrites(route_kind, path_kind):
        headers = headers.set("accept-encoding", REWRITE_ACCEPT_ENCODING)
    elif (asked := keys.asked_encoding(headers.get_all("accept-encoding"))) is not None:
        headers = headers.set("accept-encoding", asked)
    if file_host is not None:
        headers = headers.remove("host")  # preserve_host names the route's upstream
    return headers


async def fill_buffered(
    plan: FillPlan,
    result: FetchResult,
    entry: Entry,
    *,
    store: Store,
    book: digestbook.DigestBook,
) -> Entry | IntegrityError:
    """Read ``result``'s whole body into a writer for ``entry``, then finish it per ``plan``.

    Returns:
        The committed entry, or the integrity error (nothing stored).

    Raises:
        UpstreamError: the body broke off (timeout, reset); nothing is stored.
    """
    writer = await store.open_writer(entry.key, entry.variant)
    try:
        async for chunk in result.response.body():
            await writer.write(chunk)
        return await packages.finish_fill(
            plan,
            writer,
            entry,
            store=store,
            book=book,
            expected_size=result.response.content_length,
            upstream=result.upstream,
        )
    finally:
        # A no-op once committed or aborted; otherwise the temp file must not outlive us.
        with trio.CancelScope(shield=True):
            await writer.abort()
