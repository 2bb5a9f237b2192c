"""The upstream HTTP/1.1 client: h11 over trio streams, one keep-alive pool per origin.

Theory of operation. :class:`UpstreamPool` owns the idle connections to one origin (scheme, host,
port). :meth:`UpstreamPool.request` checks out a connection (the most recently used idle one
that has not outlived ``idle_expiry``, else a new one), drives one request/response cycle through
an ``h11.Connection`` and hands the caller an :class:`UpstreamResponse` whose body is pulled
chunk by chunk: nothing is read from the socket until the caller asks, so a slow client slows
the upstream down (backpressure) and a body is never held whole in memory. When the caller's
block ends the connection goes back to the pool only if h11 says both sides finished the
message and keep-alive holds (RFC 9112 §9.3); anything else closes it, under a shielded,
bounded cancel scope so cancellation cannot leak a socket.

This module is the client's public surface and keeps the pool and its connections; where an
upstream lives and how a stream to it is opened is in :mod:`proxychain.origin`, and the
response being read in :mod:`proxychain.upstreamresponse`.

Timeouts run on trio's clock (virtual under ``MockClock``): ``connect`` bounds TCP plus TLS,
``first_byte`` bounds the wait for the final response head after the request was sent, and
``between_bytes`` bounds each receive of the body (and each send of the request).

Errors are translated once, here, into :mod:`proxychain.errors`, and the kind is precise
because failover keys on it:

* ``CONNECT``: the connector failed (DNS, refused, unreachable); nothing was sent.
* ``TLS``: the handshake or certificate verification failed.
* ``RESET``: the connection closed or reset before any response byte arrived. The request may
  be retried elsewhere. A *reused* connection that turns out dead this way is retried once on
  a fresh connection, transparently, when the method is idempotent (RFC 9110 §9.2.2) and there
  is no request body (RFC 9112 §9.3.1): the server may close an idle connection at any time.
* ``TIMEOUT``: one of the three timeouts above.
* ``PROTOCOL``: a malformed or oversized head, or a body cut short (fewer bytes than
  ``Content-Length``, a chunked body without its last chunk); not retryable, and the proxy
  caches nothing from it.

As in httpcore, a request whose send fails still tries to read a response: a server may answer
early (413, 401) and close while the body is still on its way.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import h11
import trio

from .errors import (
    ErrorKind,
    RequestRefused,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .http import Headers, Request, ResponseHead
from .origin import (
    DEFAULT_BETWEEN_BYTES_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FIRST_BYTE_TIMEOUT,
    Connector,
    Origin,
    Timeouts,
    create_ssl_context,
    open_upstream_stream,
)
from .upstreamresponse import READ_SIZE, UpstreamResponse, _finish_from_buffer

# The names from origin and upstreamresponse are re-exported: callers build a pool from an
# Origin and read an UpstreamResponse, and import them all from here.
__all__ = [
    "DEFAULT_BETWEEN_BYTES_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_FIRST_BYTE_TIMEOUT",
    "DEFAULT_IDLE_EXPIRY",
    "DEFAULT_MAX_HEAD_SIZE",
    "DEFAULT_MAX_IDLE",
    "IDEMPOTENT_METHODS",
    "READ_SIZE",
    "Connector",
    "Origin",
    "PoolStatistics",
    "Timeouts",
    "UpstreamPool",
    "UpstreamResponse",
    "create_ssl_context",
    "open_upstream_stream",
]

SECONDS = 1.0
KIB = 1024

# Below the usual server keep-alive timeouts (nginx 75 s, Go's net/http 90 s) so that we drop
# an idle connection before the server does, most of the time.
DEFAULT_IDLE_EXPIRY = 60 * SECONDS
DEFAULT_MAX_IDLE = 16  # connections kept idle per origin
# h11's default is 16 KiB; CDNs in front of registries send long Set-Cookie/CSP fields.
DEFAULT_MAX_HEAD_SIZE = 64 * KIB
# Closing is bounded so a peer that stops reading cannot hold a task in its shielded cleanup.
CLOSE_TIMEOUT = 1 * SECONDS

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose requests carry a body by convention: send an explicit zero length when empty.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_TIMEOUTS = Timeouts()  # frozen, so every pool may share it


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStatistics:
    """A snapshot of a pool: ``requests`` counts request heads sent (a transparent retry
    counts twice), ``reused`` those sent on a pooled connection, ``connects`` the connections
    opened."""

    idle: int
    active: int
    connects: int
    requests: int
    reused: int


class _SendBroken(Exception):
    """The transport broke while sending; internal, never escapes the pool."""


class _Connection:
    """One transport and its h11 state machine."""

    __slots__ = ("h11", "idle_since", "max_head_size", "raw_reusable", "received", "stream")

    def __init__(self, stream: trio.abc.Stream, max_head_size: int) -> None:
        self.stream = stream
        self.max_head_size = max_head_size
        self.h11 = self.new_cycle()
        self.idle_since = 0.0
        self.received = False  # any byte of the current response arrived
        # Set when a body was read off the socket (see ``UpstreamResponse``): h11 never saw
        # it, so whether the connection may be reused was decided there.
        self.raw_reusable: bool | None = None

    def new_cycle(self) -> h11.Connection:
        return h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_head_size)


class UpstreamPool:
    """Keep-alive connections to one origin, and the request/response cycle over them.

    Args:
        origin: the upstream.
        timeouts: connect, first-byte and between-bytes timeouts.
        max_idle: idle connections kept; the oldest is closed beyond this.
        idle_expiry: seconds an idle connection may wait for reuse before it is closed.
        connect: opens a stream to ``origin`` (tests inject fakes); default
            :func:`open_upstream_stream`.
        ssl_context: for https with the default connector; default
            :func:`create_ssl_context`.
        max_head_size: the largest response head accepted, in bytes.
    """

    def __init__(
        self,
        origin: Origin,
        *,
        timeouts: Timeouts = _DEFAULT_TIMEOUTS,
        max_idle: int = DEFAULT_MAX_IDLE,
        idle_expiry: float = DEFAULT_IDLE_EXPIRY,
        connect: Connector | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
    ) -> None:
        self.origin = origin
        self.timeouts = timeouts
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self.max_head_size = max_head_size
        if connect is None:
            if origin.scheme == "https" and ssl_context is None:
                ssl_context = create_ssl_context()
            connect = partial(open_upstream_stream, ssl_context=ssl_context)
        self._connect = connect
        self._idle: deque[_Connection] = deque()  # oldest first
        self._active = 0
        self._connects = 0
        self._requests = 0
        self._reused = 0
        self._closed = False

    def statistics(self) -> PoolStatistics:
        """Counts for tests, metrics and the status page."""
        return PoolStatistics(
            idle=len(self._idle),
            active=self._active,
            connects=self._connects,
            requests=self._requests,
            reused=self._reused,
        )

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.origin} idle={len(self._idle)} active={self._active}>"

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their block ends."""
        self._closed = True
        while self._idle:
            await _close(self._idle.popleft())

    @asynccontextmanager
    async def request(
        self, request: Request, *, body: AsyncIterable[bytes] | None = None
    ) -> AsyncIterator[UpstreamResponse]:
        """Send ``request`` and yield the response once its final head arrived.

        The target sent is ``origin.base_path + request.target``; ``Host`` is set to the
        origin's authority unless ``request.headers`` has one. Hop-by-hop fields must already
        be gone; ``Transfer-Encoding: chunked`` is added for a ``body`` without
        ``Content-Length``. A ``body`` with an ``aclose`` method (an async generator) is
        closed when sending ends. 1xx responses are skipped.

        Raises:
            UpstreamConnectError: kind CONNECT, TLS or RESET (see the module docstring).
            UpstreamTimeout: connect or first-byte timeout.
            UpstreamProtocolError: a malformed or oversized response head.
            RequestRefused: the request itself cannot be framed (body and Content-Length
                disagree, invalid field).
            trio.ClosedResourceError: the pool was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the upstream pool is closed")
        response = await self._exchange(request, body)
        try:
            yield response
        finally:
            response._released = True
            with trio.CancelScope(shield=True):  # each close inside is bounded
                await self._release(response._conn, drain=response._failed is None)

    # ---- internals -------------------------------------------------------------------------

    async def _exchange(
        self, request: Request, body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse:
        """Check out a connection and run the request; retry a dead pooled one once."""
        retryable = body is None and request.method.upper() in IDEMPOTENT_METHODS
        conn, reused = await self._checkout()
        try:
            head = await self._send_and_receive_head(conn, request, body)
        except UpstreamConnectError as exc:
            await self._discard(conn)
            if not (reused and retryable and exc.kind is ErrorKind.RESET):
                raise
        except BaseException:
            await self._discard(conn)
            raise
        else:
            return UpstreamResponse(self, conn, head, request.method.upper())
        conn = await self._open()
        try:
            head = await self._send_and_receive_head(conn, request, body)
        except BaseException:
            await self._discard(conn)
            raise
        return UpstreamResponse(self, conn, head, request.method.upper())

    async def _checkout(self) -> tuple[_Connection, bool]:
        now = trio.current_time()
        while self._idle and now - self._idle[0].idle_since >= self.idle_expiry:
            await _close(self._idle.popleft())
        if self._idle:
            self._active += 1
            self._reused += 1
            return self._idle.pop(), True
        return await self._open(), False

    async def _open(self) -> _Connection:
        where = str(self.origin)
        try:
            with trio.fail_after(self.timeouts.connect):
                stream = await self._connect(self.origin)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"{where}: connect timed out after {self.timeouts.connect}s", upstream=where
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(
                f"{where}: TLS failed: {exc}", upstream=where, kind=ErrorKind.TLS
            ) from exc
        except trio.BrokenResourceError as exc:
            # trio.SSLStream reports handshake failures as BrokenResourceError from SSLError.
            kind = ErrorKind.TLS if isinstance(exc.__cause__, ssl.SSLError) else ErrorKind.CONNECT
            raise UpstreamConnectError(
                f"{where}: {kind.value} failed: {exc.__cause__ or exc}", upstream=where, kind=kind
            ) from exc
        except OSError as exc:
            raise UpstreamConnectError(f"{where}: connect failed: {exc}", upstream=where) from exc
        self._connects += 1
        self._active += 1
        return _Connection(stream, self.max_head_size)

    async def _send_and_receive_head(
        self, conn: _Connection, request: Request, body: AsyncIterable[bytes] | None
    ) -> ResponseHead:
        self._requests += 1
        conn.received = False
        # If the send breaks, the peer may still have answered early; the read below decides.
        # (Errors from the caller's body iterator are not caught: they are not the upstream's.)
        with contextlib.suppress(_SendBroken):
            await self._send_request(conn, request, body)
        try:
            with trio.fail_after(self.timeouts.first_byte):
                while True:
                    event = await self._next_event(conn, None)
                    if isinstance(event, h11.Response):
                        break
                    if not isinstance(event, h11.InformationalResponse):
                        raise self._protocol_error(f"unexpected {type(event).__name__}")
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"{self.origin}: no response within {self.timeouts.first_byte}s",
                upstream=str(self.origin),
            ) from None
        # h11 enforces max_incomplete_event_size only on a head still incomplete after a
        # receive; one that arrived whole in a single read is measured here.
        if _head_size(event) > self.max_head_size:
            raise self._protocol_error(f"response head larger than {self.max_head_size} bytes")
        return ResponseHead(
            status=event.status_code,
            headers=Headers.from_raw(event.headers),
            reason=event.reason.decode("latin-1"),
        )

    async def _send_request(
        self, conn: _Connection, request: Request, body: AsyncIterable[bytes] | None
    ) -> None:
        headers = request.headers
        if "host" not in headers:
            headers = Headers([("host", self.origin.authority), *headers])
        framed = "content-length" in headers or "transfer-encoding" in headers
        if body is not None and not framed:
            headers = headers.add("transfer-encoding", "chunked")
        elif body is None and not framed and request.method.upper() in _BODY_METHODS:
            headers = headers.add("content-length", "0")
        try:
            await self._send(
                conn,
                h11.Request(
                    method=request.method,
                    target=self.origin.target(request.target),
                    headers=headers.raw(),
                ),
            )
            if body is not None:
                chunks = aiter(body)
                try:
                    async for chunk in chunks:
                        if chunk:
                            await self._send(conn, h11.Data(data=chunk))
                finally:
                    await _aclose_iterator(chunks)
            await self._send(conn, h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise RequestRefused(
                f"cannot send the request upstream: {exc}", status_hint=400
            ) from None

    async def _send(self, conn: _Connection, event: h11.Event) -> None:
        data = conn.h11.send(event)
        if not data:
            return
        try:
            with trio.fail_after(self.timeouts.between_bytes):
                await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _SendBroken from exc
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"{self.origin}: sending stalled for {self.timeouts.between_bytes}s",
                upstream=str(self.origin),
            ) from None

    async def _next_event(self, conn: _Connection, read_timeout: float | None) -> h11.Event:
        """The next h11 event, receiving as needed, with errors translated.

        ``read_timeout`` bounds each receive (the head is bounded by the caller instead).
        """
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._protocol_error(str(exc)) from None
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                # Only after EndOfMessage (we never read past it) or a protocol switch (we
                # never ask for one).
                raise self._protocol_error("unexpected data after the response")
            data = await self._receive(conn, READ_SIZE, read_timeout)
            if not data and not conn.received:
                raise self._reset_error("closed before the response")
            conn.received = True
            conn.h11.receive_data(data)

    async def _receive(self, conn: _Connection, size: int, read_timeout: float | None) -> bytes:
        """Up to ``size`` bytes from ``conn`` (``b""`` at its end), with errors translated.

        Raises:
            UpstreamTimeout: nothing arrived within ``read_timeout``.
            UpstreamConnectError: reset before any byte of the response (kind RESET).
            UpstreamProtocolError: reset mid-response.
        """
        try:
            if read_timeout is None:
                data = await conn.stream.receive_some(size)
            else:
                with trio.fail_after(read_timeout):
                    data = await conn.stream.receive_some(size)
        except trio.TooSlowError:
            where = str(self.origin)
            raise UpstreamTimeout(
                f"{where}: no data for {read_timeout}s in the body", upstream=where
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if not conn.received:
                raise self._reset_error(f"reset before the response: {exc}") from exc
            raise self._protocol_error(f"reset mid-response: {exc}") from exc
        return bytes(data)  # no copy for a socket's bytes

    def _reset_error(self, detail: str) -> UpstreamConnectError:
        where = str(self.origin)
        return UpstreamConnectError(f"{where}: {detail}", upstream=where, kind=ErrorKind.RESET)

    def _protocol_error(self, detail: str) -> UpstreamProtocolError:
        where = str(self.origin)
        return UpstreamProtocolError(f"{where}: {detail}", upstream=where)

    async def _release(self, conn: _Connection, *, drain: bool) -> None:
        """Pool the connection if the exchange finished cleanly and keep-alive holds."""
        raw_reusable, conn.raw_reusable = conn.raw_reusable, None
        state = conn.h11
        if raw_reusable is None:
            if drain and state.our_state is h11.DONE:
                _finish_from_buffer(state)
            leftover, eof = state.trailing_data
            reusable = (
                state.our_state is h11.DONE
                and state.their_state is h11.DONE
                and not leftover
                and not eof
            )
        else:
            reusable = raw_reusable  # a body read off the socket; ``state`` is a new cycle
        if self._closed or not reusable or self.max_idle <= 0:
            await self._discard(conn)
            return
        if raw_reusable is None:
            state.start_next_cycle()
        self._active -= 1
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        while len(self._idle) > self.max_idle:
            await _close(self._idle.popleft())

    async def _discard(self, conn: _Connection) -> None:
        self._active -= 1
        await _close(conn)


async def _close(conn: _Connection) -> None:
    """Close under a shield (cleanup must happen even when cancelled), bounded in time."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await conn.stream.aclose()


async def _aclose_iterator(iterator: object) -> None:
    """Finalise an async generator body now, not at garbage collection, if sending stopped."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await aclose()


def _head_size(response: h11.Response) -> int:
    """The serialised size of a response head, near enough (status line, fields, CRLFs)."""
    fields = sum(len(name) + len(value) + 4 for name, value in response.headers)
    return len(b"HTTP/1.1 200 \r\n\r\n") + len(response.reason) + fields
