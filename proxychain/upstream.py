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

import array
import contextlib
import fcntl
import ssl
import termios
import urllib.parse
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import h11
import trio

from .errors import (
    ConfigError,
    ErrorKind,
    RequestRefused,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .http import Headers, Request, ResponseHead

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

DEFAULT_CONNECT_TIMEOUT = 10 * SECONDS
DEFAULT_FIRST_BYTE_TIMEOUT = 30 * SECONDS
DEFAULT_BETWEEN_BYTES_TIMEOUT = 30 * SECONDS
# Below the usual server keep-alive timeouts (nginx 75 s, Go's net/http 90 s) so that we drop
# an idle connection before the server does, most of the time.
DEFAULT_IDLE_EXPIRY = 60 * SECONDS
DEFAULT_MAX_IDLE = 16  # connections kept idle per origin
# h11's default is 16 KiB; CDNs in front of registries send long Set-Cookie/CSP fields.
DEFAULT_MAX_HEAD_SIZE = 64 * KIB
# Bytes per receive_some: big bodies move at the rate of bytes per system call.
READ_SIZE = 256 * KIB
# Closing is bounded so a peer that stops reading cannot hold a task in its shielded cleanup.
CLOSE_TIMEOUT = 1 * SECONDS

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Methods whose requests carry a body by convention: send an explicit zero length when empty.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Per-upstream timeouts in seconds (see the module docstring for what each bounds)."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    first_byte: float = DEFAULT_FIRST_BYTE_TIMEOUT
    between_bytes: float = DEFAULT_BETWEEN_BYTES_TIMEOUT


@dataclass(frozen=True, slots=True, kw_only=True)
class Origin:
    """Where an upstream lives; ``base_path`` is prefixed to every request target."""

    scheme: str
    host: str
    port: int
    base_path: str = ""

    @classmethod
    def parse(cls, url: str) -> Origin:
        """Parse ``http[s]://host[:port][/base]``.

        Raises:
            ConfigError: not an http(s) URL with a host, or it has userinfo, query or fragment.
        """
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"invalid upstream URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"invalid upstream URL {url!r}: scheme must be http or https")
        if not parts.hostname:
            raise ConfigError(f"invalid upstream URL {url!r}: no host")
        if parts.username is not None or parts.query or parts.fragment:
            raise ConfigError(f"invalid upstream URL {url!r}: no userinfo, query or fragment")
        return cls(
            scheme=scheme,
            host=parts.hostname,
            port=_DEFAULT_PORTS[scheme] if port is None else port,
            base_path=parts.path.rstrip("/"),
        )

    @property
    def authority(self) -> str:
        """The ``Host`` field value (RFC 9110 §7.2): the port only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS.get(self.scheme) else f"{host}:{self.port}"

    def target(self, target: str) -> str:
        """The request target sent upstream for the origin-form ``target``."""
        return self.base_path.rstrip("/") + target

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}"


Connector = Callable[[Origin], Awaitable[trio.abc.Stream]]


def create_ssl_context(*, ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context (system trust store, plus ``ca_file`` when given)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_upstream_stream(
    origin: Origin, *, ssl_context: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    """Open TCP (TCP_NODELAY stays on, trio's default) and, for https, complete a TLS handshake.

    SNI and certificate verification use ``origin.host``. Exceptions are left to the caller
    (:class:`UpstreamPool` translates them).
    """
    stream: trio.abc.Stream = await trio.open_tcp_stream(origin.host, origin.port)
    if origin.scheme != "https":
        return stream
    # https_compatible: most servers close without close_notify; h11's framing catches
    # truncation of Content-Length and chunked bodies anyway.
    tls = trio.SSLStream(
        stream,
        ssl_context or create_ssl_context(),
        server_hostname=origin.host,
        https_compatible=True,
    )
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


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


class UpstreamResponse:
    """The response to one upstream request; valid inside :meth:`UpstreamPool.request` only.

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
        timeouts: Timeouts = Timeouts(),  # frozen, so sharing the default is safe
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


def _head_size(response: h11.Response) -> int:
    """The serialised size of a response head, near enough (status line, fields, CRLFs)."""
    fields = sum(len(name) + len(value) + 4 for name, value in response.headers)
    return len(b"HTTP/1.1 200 \r\n\r\n") + len(response.reason) + fields


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
