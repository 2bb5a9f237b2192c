"""Sending a stored response to a client: 200, 304 for a matching conditional, 206 / 416 for
ranges (RFC 9110 §13, §14), and HEAD.

The decisions are the policy's and ``ranges.py``'s (pure); this module only streams bytes: from
memory slices for memory hits, from the disk tier in large chunks otherwise.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from . import policy, ranges
from .http import Headers, Request, ResponseHead
from .server import H11Sink
from .store import Store, Stored

__all__ = ["serve_stored", "slice_chunks"]

_boundaries = random.Random()


async def serve_stored(
    store: Store,
    stored: Stored,
    age: float,
    request: Request,
    sink: H11Sink,
    extra: Headers,
) -> None:
    """Answer ``request`` from ``stored`` on ``sink`` with ``Age`` and the ``extra`` fields."""
    entry = stored.entry
    if policy.answer_conditional(request, entry) == 304:
        headers = policy.not_modified_headers(entry, age).update(extra)
        await sink.start(ResponseHead(status=304, headers=headers))
        await sink.end()
        return
    headers = policy.cached_response_headers(entry, age).update(extra)
    size = entry.body_size
    plan = ranges.evaluate(
        request.method,
        request.headers,
        size=size,
        status=entry.status,
        stored_headers=entry.headers,
    )
    send_body = request.method != "HEAD"
    match plan:
        case ranges.Full():
            if _has_body(entry.status):
                headers = headers.set("content-length", str(size))
            if entry.status == 200:
                headers = headers.set("accept-ranges", "bytes")
            await sink.start(
                ResponseHead(status=entry.status, reason=entry.reason, headers=headers)
            )
            if send_body and size:
                async with aclosing(store.open_body(stored)) as body:
                    async for chunk in body:
                        await sink.send(chunk)
        case ranges.Unsatisfiable():
            await sink.start(
                ResponseHead(
                    status=416,
                    headers=_without_body_fields(headers).update(
                        ranges.unsatisfiable_headers(entry.headers, size)
                    ),
                )
            )
        case ranges.Partial(ranges=(only,)):
            await sink.start(
                ResponseHead(status=206, headers=ranges.partial_headers(headers, only, size))
            )
            if send_body:
                await _send_slice(store, stored, only, sink)
        case ranges.Partial(ranges=spans):
            framing = ranges.multipart_plan(
                spans, size, entry.headers.get("content-type"), ranges.make_boundary(_boundaries)
            )
            await sink.start(ResponseHead(status=206, headers=framing.headers(headers)))
            if send_body:
                for part_head, span in framing.parts:
                    await sink.send(part_head)
                    await _send_slice(store, stored, span, sink)
                await sink.send(framing.trailer)
    await sink.end()


def _has_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _without_body_fields(headers: Headers) -> Headers:
    return headers.remove("content-length", "content-type", "etag", "last-modified")


async def _send_slice(store: Store, stored: Stored, span: ranges.ByteRange, sink: H11Sink) -> None:
    async with aclosing(store.open_body(stored)) as body:
        async for piece in slice_chunks(body, span.first, span.last):
            await sink.send(piece)


async def slice_chunks(
    chunks: AsyncIterator[bytes], first: int, last: int
) -> AsyncGenerator[bytes, None]:
    """Bytes ``first`` to ``last`` (inclusive) of a chunk stream."""
    offset = 0
    async for chunk in chunks:
        chunk_end = offset + len(chunk)
        if chunk_end > first and offset <= last:
            yield chunk[max(0, first - offset) : min(len(chunk), last + 1 - offset)]
        offset = chunk_end
        if offset > last:
            return
