"""Sending a stored response, or a fill still arriving, to a client: 200, 304 for a matching
conditional, 206 / 416 for ranges (RFC 9110 §13, §14), and HEAD.

The decisions are the policy's and ``ranges.py``'s (pure); this module only streams bytes: from
memory slices for memory hits, from the disk tier in large chunks otherwise, and from a fill's
pieces for requests that joined it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import BinaryIO

import trio

from . import policy, ranges
from .coalesce import Fill, FillFailed
from .entry import Entry
from .http import Headers, Request, ResponseHead
from .responsehead import PreparedHead, prepare
from .sink import H11Sink
from .store import Store, Stored

__all__ = ["send_followed", "serve_stored", "slice_chunks"]

_boundaries = random.Random()
# A memory body up to this size goes to the client in one piece (bytes per system call).
MEMORY_WRITE_MAX_BYTES = 4 * 1024 * 1024
# Disk bodies from this size go out by os.sendfile (no copy through Python, no read calls);
# below it a read and a write cost less than the extra worker-thread round trip.
SENDFILE_MIN_BYTES = 1024 * 1024
# Per-response field sets remembered (Age values times X-Cache outcomes and tiers).
RESPONSE_FIELDS_REMEMBERED = 1024
_WHOLE = ranges.Full()  # the answer to a request without Range


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
    size = entry.body_size
    plan: ranges.RangeDecision = _WHOLE  # what ranges.evaluate answers without a Range
    if "range" in request.headers:
        plan = ranges.evaluate(
            request.method,
            request.headers,
            size=size,
            status=entry.status,
            stored_headers=entry.headers,
        )
    send_body = request.method != "HEAD"
    if isinstance(plan, ranges.Full):
        # The common case: the stored head goes out as bytes serialised once per entry, and
        # the fields added to it are one shared object per Age value (serialised once too).
        prepared = _prepared_head(entry, extra)
        await sink.start_prepared(prepared, _response_fields(policy.age_field(age), extra))
        if send_body and size:
            if stored.body is not None and size <= MEMORY_WRITE_MAX_BYTES:
                await sink.send(stored.body)
            elif stored.body is not None or size < SENDFILE_MIN_BYTES:
                await _send_whole(store, stored, sink)
            else:
                await _send_file(store, stored, sink)
        await sink.end()
        return
    headers = policy.cached_response_headers(entry, age).update(extra)
    match plan:
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


async def _send_whole(store: Store, stored: Stored, sink: H11Sink) -> None:
    async with aclosing(store.open_body(stored)) as body:
        async for chunk in body:
            await sink.send(chunk)


async def _send_file(store: Store, stored: Stored, sink: H11Sink) -> None:
    """A disk body through ``os.sendfile`` where the sink can, else in chunks."""
    entry = stored.entry
    file = await store.disk.open_file(entry)
    try:
        sent = await sink.send_file(file, entry.body_size)
    except EOFError as exc:
        await sink.abort()
        with trio.CancelScope(shield=True):
            await store.disk.drop(entry, str(exc))
        return
    finally:
        file.close()  # read-only: no flush, nothing that blocks
    if not sent:
        await _send_whole(store, stored, sink)


async def send_followed(
    request: Request, fill: Fill, file: BinaryIO, head: ResponseHead, sink: H11Sink
) -> None:
    """Stream a fill in progress to ``sink`` (a request that joined it): whole, or the one
    byte range asked for as soon as its bytes arrive. ``file`` is the reader the fill gave
    this follower; a fill that fails mid-body cuts the response short."""
    span: ranges.ByteRange | None = None
    size_text = head.headers.get("content-length")
    if request.headers.get("range") and size_text and size_text.isdigit():
        size = int(size_text)
        plan = ranges.evaluate(
            request.method,
            request.headers,
            size=size,
            status=head.status,
            stored_headers=head.headers,
        )
        match plan:
            case ranges.Partial(ranges=(only,)):
                span = only
                head = ResponseHead(
                    status=206, headers=ranges.partial_headers(head.headers, only, size)
                )
            case ranges.Unsatisfiable():
                await sink.start(
                    ResponseHead(
                        status=416,
                        headers=head.headers.remove("content-length", "content-type").update(
                            ranges.unsatisfiable_headers(head.headers, size)
                        ),
                    )
                )
                await sink.end()
                return
            case ranges.Full() | ranges.Partial():
                pass  # several ranges of an object still filling: send it whole
    await sink.start(ResponseHead(status=head.status, reason=head.reason, headers=head.headers))
    body = fill.follow(file)
    try:
        if span is None:
            async for chunk in body:
                await sink.send(chunk)
        else:
            async with aclosing(slice_chunks(body, span.first, span.last)) as piece:
                async for chunk in piece:
                    await sink.send(chunk)
    except FillFailed:
        await sink.abort()
        return
    await sink.end()


def _prepared_head(entry: Entry, extra: Headers) -> PreparedHead:
    """The stored head for a whole-body answer, without ``Age`` and the fields of ``extra``."""

    def build(stored: Headers) -> PreparedHead:
        headers = stored.remove("age", *policy.STORED_ONLY_FIELDS, *(name for name, _ in extra))
        if _has_body(entry.status):
            headers = headers.set("content-length", str(entry.body_size))
        if entry.status == 200:
            headers = headers.set("accept-ranges", "bytes")
        return prepare(entry.status, entry.reason, headers)

    memo_key = (_prepared_head, entry.status, entry.reason, entry.body_size, extra)
    return entry.headers.memo(memo_key, build)


@functools.lru_cache(maxsize=RESPONSE_FIELDS_REMEMBERED)
def _response_fields(age: str, extra: Headers) -> Headers:
    """``Age`` followed by ``extra``: the fields a stored head gets per response."""
    return Headers([("age", age), *extra])


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
