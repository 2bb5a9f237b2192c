"""One client connection: its stream, its h11 state, and the bytes that go both ways.

h11 sees a request only when the response needs it: a plain head (:mod:`proxychain.requesthead`)
is served without h11, and h11 restarts on the bytes after the request once a response went
out without it (see :meth:`_Connection.restart_h11`). A client that goes away shows up as
``trio.BrokenResourceError`` from ``send_all``; it becomes :class:`ClientGone` here, so the
proxy can decide whether a cache fill continues.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator

import h11
import trio

from .requesthead import SHARED_HEADER_BLOCK_MAX_BYTES, RequestHead, _plain_head
from .settings import ServerSettings

__all__ = [
    "BIG_WRITE_BYTES",
    "BIG_WRITE_LOWAT",
    "READ_SIZE",
    "TRIO_NOTSENT_LOWAT",
    "ClientGone",
]

# One write of a large body (a memory hit, a followed fill's piece): trio keeps
# TCP_NOTSENT_LOWAT at 16 KiB, so the socket reports writable only once nearly drained and a
# big body is refilled a little per scheduler round; for such a write the threshold is lifted,
# then restored (``os.sendfile`` in worker threads does best with it low: fewer, larger calls).
# Measured on 1 MiB memory hits: about 1.3x the throughput.
BIG_WRITE_BYTES = 256 * 1024
BIG_WRITE_LOWAT = 4 * 1024 * 1024
TRIO_NOTSENT_LOWAT = 2**14  # what trio.SocketStream sets
READ_SIZE = 64 * 1024  # bytes per receive_some; request heads are small, bodies stream


class ClientGone(Exception):
    """The client closed or reset its connection while we were sending."""


class _Connection:
    """One client connection: h11 state plus the stream, with protocol errors mapped."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        settings: ServerSettings,
        worker_field: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.stream = stream
        self.max_header_bytes = settings.max_header_bytes
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        self._h11_fresh = True  # h11 has been given nothing: a new request may skip it
        # A plain request head read without h11 (see next_request), given to h11 only if the
        # response needs it (see ``h11_state``); empty when there is none.
        self._unparsed_head = b""
        self.worker_field = worker_field
        self.draining = False
        self.closed = False
        self._stream_closed = False
        self.restarted = False  # a response went out without h11: the next cycle is fresh
        # The request has no body and h11 has not been asked for its EndOfMessage yet: a
        # response written without h11 never needs it (the next cycle starts afresh), so
        # that step (a few % of a small hit) is only taken when h11 frames the response.
        self.unread_empty_body = False
        # Idle timeouts (see Server.close_idle): the connection is served inside
        # ``idle_scope``, which is cancelled only while ``idle`` (waiting for a request head).
        self.idle_scope = trio.CancelScope()
        self.idle = False
        self.idle_until = math.inf  # when waiting for the head began, plus its timeout
        self.stopped = False  # told to stop while idle

    def stop_idle(self) -> None:
        """Close a connection waiting for a request head (timeout or shutdown)."""
        self.stopped = True
        self.idle_scope.cancel()

    @property
    def h11_state(self) -> h11.Connection:
        """The h11 state, once it has seen the request head (even one read without it)."""
        if self._unparsed_head:
            head, self._unparsed_head = self._unparsed_head, b""
            self._h11_fresh = False
            self._h11.receive_data(head)
            self._h11.next_event()  # the Request already served; the same one, as it is plain
        return self._h11

    def plain_exchange(self) -> bool:
        """Whether h11 has the whole HTTP/1.1 request and nothing of the response yet."""
        if self._unparsed_head:
            return True  # a plain head: HTTP/1.1, no body, and h11 has sent nothing
        h = self.h11_state
        return (
            h.their_http_version == b"1.1"
            and (h.their_state is h11.DONE or self.unread_empty_body)
            and h.our_state is h11.SEND_RESPONSE
        )

    def read_empty_body(self) -> None:
        """Let h11 take the request's empty body, if left unread (see ``unread_empty_body``)."""
        if self.unread_empty_body:
            self.unread_empty_body = False
            self.h11_state.next_event()  # EndOfMessage, without reading: h11 knows the length is 0

    def restart_h11(self) -> None:
        """Start a fresh h11 state on whatever the client sent after the request."""
        self.unread_empty_body = False  # h11 has not consumed anything after the head
        self.restarted = True
        if self._unparsed_head:
            self._unparsed_head = b""  # h11 never saw the request: it is fresh as it is
            return
        data, closed = self._h11.trailing_data
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        self._h11_fresh = not data and not closed
        if data:
            self._h11.receive_data(data)
        if closed:
            self._h11.receive_data(b"")

    async def send(self, event: h11.Event) -> None:
        await self.write(self.h11_state.send(event) or b"")

    async def write(self, data: bytes) -> None:
        """Write bytes h11 produced; a vanished client becomes :class:`ClientGone`."""
        if not data:
            return
        lifted = len(data) >= BIG_WRITE_BYTES and _set_notsent_lowat(self.stream, BIG_WRITE_LOWAT)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = True
            raise ClientGone(str(exc)) from None
        finally:
            if lifted and not self.closed:
                _set_notsent_lowat(self.stream, TRIO_NOTSENT_LOWAT)

    async def next_request(
        self,
    ) -> RequestHead | h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """The next request head, or the event h11 produced instead (``ConnectionClosed``, ...).

        A plain head (:func:`_plain_head`) that arrives whole in one read on a fresh h11
        state is parsed here and shown to h11 only when the response needs it: for a small
        hit, h11's parse and a fresh state after the response cost about a fifth of the work.
        """
        if self._h11_fresh:
            data = await self._receive()
            head = _plain_head(data) if len(data) <= SHARED_HEADER_BLOCK_MAX_BYTES else None
            if head is not None:
                self._unparsed_head = data
                return head
            self._h11_fresh = False
            self._h11.receive_data(data)
        event = await self.next_event()
        if isinstance(event, h11.Request):
            return RequestHead(event.method, event.target, tuple(event.headers.raw_items()))
        return event

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        h = self.h11_state
        self._h11_fresh = False
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self._receive())
                continue
            return event

    async def _receive(self) -> bytes:
        """The next bytes from the client; empty at its end (or when it broke off)."""
        try:
            return bytes(await self.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def close(self) -> None:
        # ``closed`` also marks a connection found broken mid-write; its socket still needs
        # closing, so track that separately.
        self.closed = True
        if not self._stream_closed:
            self._stream_closed = True
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)


async def _request_body(conn: _Connection) -> AsyncIterator[bytes]:
    """Stream the request body; sends ``100 Continue`` first if the client waits for it."""
    h = conn.h11_state
    if h.they_are_waiting_for_100_continue:
        await conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ClientGone("request body cut short")


def _set_notsent_lowat(stream: trio.abc.Stream, value: int) -> bool:
    """Set ``TCP_NOTSENT_LOWAT`` on a TCP stream; False where there is none to set."""
    if not isinstance(stream, trio.SocketStream) or not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        return False
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, value)
    except OSError:
        return False
    return True
