"""A response being read from an upstream: its head, its body pulled chunk by chunk, its framing.

:class:`~proxychain.upstream.UpstreamPool` receives the head and hands out an
:class:`UpstreamResponse`; the caller then pulls the body, and nothing is read from the socket
until it asks (backpressure: a slow client slows the upstream down). A body of known length on
a plain TCP connection is read straight off the socket, bypassing h11, so whether the
connection may be reused afterwards is decided here (RFC 9112 §9.3) rather than by h11; the
pool still does every receive, so errors are translated in one place.
"""

from __future__ import annotations

import array
import fcntl
import termios
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import h11
import trio

from .errors import UpstreamError, UpstreamProtocolError
from .http import ResponseHead

if TYPE_CHECKING:
    from .upstream import UpstreamPool, _Connection

__all__ = ["READ_SIZE", "UpstreamResponse"]

KIB = 1024

# Bytes per receive_some: big bodies move at the rate of bytes per system call.
READ_SIZE = 256 * KIB


class UpstreamResponse:
    """The response to one upstream request; valid inside
    :meth:`~proxychain.upstream.UpstreamPool.request` only.

    Attributes:
        head: status, reason and header fields as received (hop-by-hop fields included).
        content_length: the body length when known in advance (0 for HEAD, 1xx, 204 and 304),
            ``None`` for chunked or close-delimited bodies.
        complete: the body was read to its end.
    """

    def __init__(
        self, pool: UpstreamPool, conn: _Connection, head: ResponseHead, method: str
    ) -> None:
        self.head = head
        self.complete = False
        self.content_length = _content_length(head, method)
        self._pool = pool
        self._conn = conn
        self._failed: UpstreamError | None = None
        self._released = False
        # A body of known length on a plain TCP connection is read straight off the socket:
        # through h11 every byte would be copied twice more (into its buffer and out).
        self._raw_left: int | None = None
        self._raw_keep_alive = False
        if (
            self.content_length
            and isinstance(conn.stream, trio.SocketStream)
            and conn.h11.their_state is h11.SEND_BODY
        ):
            self._raw_left = self.content_length
            self._raw_keep_alive = _keep_alive(conn.h11, head)

    def body(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives (bytes-like: h11 hands out ``bytearray``).

        Each chunk must arrive within ``between_bytes``.

        Raises:
            UpstreamTimeout: a chunk took too long.
            UpstreamProtocolError: the body was malformed or cut short.
        """
        return _Body(self)

    async def _next_chunk(self) -> bytes | None:
        if self._released:
            raise trio.ClosedResourceError("the response was used outside its request block")
        if self._failed is not None:
            raise self._failed
        if self.complete:
            return None
        try:
            if self._raw_left is not None:
                return await self._next_raw_chunk(self._raw_left)
            event = await self._pool._next_event(self._conn, self._pool.timeouts.between_bytes)
        except UpstreamError as exc:
            self._failed = exc
            raise
        if isinstance(event, h11.Data):
            return event.data
        if isinstance(event, h11.EndOfMessage):
            self.complete = True
            return None
        self._failed = UpstreamProtocolError(
            f"{self._pool.origin}: unexpected {type(event).__name__} in the body",
            upstream=str(self._pool.origin),
        )
        raise self._failed

    async def _next_raw_chunk(self, left: int) -> bytes | None:
        """The next piece of a Content-Length body, read off the socket (h11 bypassed)."""
        conn, pool = self._conn, self._pool
        if left == 0:
            self.complete = True
            # Reusable if the exchange allows keep-alive and nothing follows the body.
            conn.raw_reusable = self._raw_keep_alive and _nothing_pending(conn.stream)
            conn.h11 = conn.new_cycle()
            return None
        buffered, closed = conn.h11.trailing_data  # the body's start, read with the head
        if buffered:
            conn.h11 = conn.new_cycle()  # drop h11's copy; it will not see this body
            if len(buffered) > left:
                # Bytes past the body: it is whole, but the connection cannot be trusted.
                self._raw_keep_alive = False
                buffered = buffered[:left]
            self._raw_left = left - len(buffered)
            return buffered
        if closed:
            raise pool._protocol_error("closed mid-response")
        data = await pool._receive(conn, min(left, READ_SIZE), pool.timeouts.between_bytes)
        if not data:
            raise pool._protocol_error("closed mid-response")
        self._raw_left = left - len(data)
        return data

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.head.status} complete={self.complete}>"


class _Body:
    """A plain async iterator (not a generator: nothing to finalise if dropped midway)."""

    __slots__ = ("_response",)

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


def _finish_from_buffer(state: h11.Connection) -> None:
    """Read an unread body to its end if it is already buffered, without I/O.

    A 304 or an empty body the caller did not iterate then still leaves a reusable connection.
    """
    try:
        while state.their_state is h11.SEND_BODY:
            if not isinstance(state.next_event(), h11.Data):
                return  # EndOfMessage (now DONE) or NEED_DATA (the body is not all here)
    except h11.RemoteProtocolError:
        return  # their_state is ERROR now: the connection will be closed


def _keep_alive(state: h11.Connection, head: ResponseHead) -> bool:
    """What h11 decides at the end of an exchange (RFC 9112 §9.3): HTTP/1.1, and neither
    side asked to close."""
    if state.our_state is not h11.DONE or state.their_http_version != b"1.1":
        return False
    return "close" not in (head.headers.get("connection") or "").lower()


def _nothing_pending(stream: trio.abc.Stream) -> bool:
    """No byte waiting on the socket: nothing follows the body we read. (A close that
    follows is found by the next exchange, which retries a dead pooled connection once.)"""
    assert isinstance(stream, trio.SocketStream)
    pending = array.array("i", [0])
    try:
        fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, pending)
    except OSError:
        return False
    return pending[0] == 0


def _content_length(head: ResponseHead, method: str) -> int | None:
    """The body length h11 frames (RFC 9112 §6.3), when known before reading it."""
    if method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return 0
    if "transfer-encoding" in head.headers:
        return None
    values = set(head.headers.get_list("content-length"))
    if len(values) == 1 and (value := values.pop()).isdigit():
        return int(value)
    return None
