"""The data-plane server: trio listeners and one h11 loop per client connection.

Theory of operation:

* ``serve`` binds, reports the bound port through ``task_status.started`` and runs two
  nurseries: the accept loops, and one handler task per connection. Shutdown is a deadline
  on the handler nursery (the hypercorn pattern): when ``shutdown`` is set the listeners close,
  connections idling between requests are told to stop at once, and in-flight responses get
  ``graceful_timeout`` seconds to finish before they are cancelled.
* Each connection runs h11's ``NEED_DATA`` loop. A request head becomes a
  :class:`~proxychain.http.Request`; its body (if any) is an async iterator the proxy may
  stream upstream; the response goes out through :class:`H11Sink`. Anything that breaks the
  protocol gets h11's ``error_status_hint`` (400, 431) and the connection closes.
* A plain GET/HEAD head that arrives whole in one read is parsed by :func:`_plain_head`
  (h11's grammar, narrowed) and given to h11 only if the response goes through h11: for a
  small hit, h11's parse and a fresh h11 state per response were a fifth of the work.
* A client that goes away shows up as ``trio.BrokenResourceError`` from ``send_all``; the sink
  turns it into :class:`ClientGone` so the proxy can decide whether a cache fill continues.
* Header and keep-alive timeouts: a connection waiting for a request head notes until when it
  may wait, and one task (:meth:`Server.close_idle`) closes those past it, a few times per
  timeout. No deadline is armed per request: for a small hit that would cost about as much
  as the rest of the server's work.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import BinaryIO, NamedTuple, Protocol

import h11
import trio

from .balance import DEFER_S, Seat
from .clock import Clock
from .errors import ProxyChainError
from .http import Headers, Request, ResponseHead, format_http_date
from .settings import ServerSettings

__all__ = [
    "ClientGone",
    "ClientInfo",
    "Exchange",
    "H11Sink",
    "PreparedHead",
    "Server",
    "prepare",
    "serve",
]

log = logging.getLogger("proxychain.server")
access_log = logging.getLogger("proxychain.access")

# One write of a large body (a memory hit, a followed fill's piece): trio keeps
# TCP_NOTSENT_LOWAT at 16 KiB, so the socket reports writable only once nearly drained and a
# big body is refilled a little per scheduler round; for such a write the threshold is lifted,
# then restored (``os.sendfile`` in worker threads does best with it low: fewer, larger calls).
# Measured on 1 MiB memory hits: about 1.3x the throughput.
BIG_WRITE_BYTES = 256 * 1024
BIG_WRITE_LOWAT = 4 * 1024 * 1024
TRIO_NOTSENT_LOWAT = 2**14  # what trio.SocketStream sets
READ_SIZE = 64 * 1024  # bytes per receive_some; request heads are small, bodies stream
# How much of an unread request body we read and discard to keep a connection alive.
MAX_DRAIN_BYTES = 1024 * 1024
SERVER_NAME = "proxychain"
ACCEPT_BURST = 8  # connections accepted per wake-up of an accept loop (see _accept_loop)
# A head and a body chunk up to this size go out in one write (loopback: one syscall ~ 10 us).
COALESCE_MAX_BYTES = 64 * 1024
WORKER_FIELD = b"x-proxychain-worker"  # names the answering process under --workers N
# Request header blocks shared between requests (see _request_headers): how many distinct
# blocks, and the largest shared (bigger ones are rare and would pin memory).
SHARED_HEADER_BLOCKS = 256
SHARED_HEADER_BLOCK_MAX_BYTES = 8 * 1024
# Idle connections are closed within this much after their timeout (see Server.close_idle).
IDLE_CHECK_MAX_INTERVAL = 1.0
IDLE_CHECK_MIN_INTERVAL = 0.05


class RequestHead(NamedTuple):
    """What the server takes from a request head (h11's ``Request``, or a plain head)."""

    method: bytes
    target: bytes
    fields: tuple[tuple[bytes, bytes], ...]  # names as the client spelt them


class ClientGone(Exception):
    """The client closed or reset its connection while we were sending."""


@dataclass(slots=True)
class ClientInfo:
    """Where a request came from."""

    address: str = ""
    scheme: str = "http"


@dataclass(slots=True)
class Exchange:
    """What happened to one request: filled in by the proxy, logged by the server."""

    route: str = "-"
    outcome: str = "-"  # HIT, MISS, STALE, REVALIDATED, BYPASS, ERROR
    tier: str = "-"  # memory, disk
    upstream: str = "-"
    detail: str = ""


class H11Sink:
    """Writes one response on an h11 connection; the proxy's only way to talk to a client.

    The head of a small plain response (HTTP/1.1 request without a body or ``Connection``
    field, answered with at most ``COALESCE_MAX_BYTES`` framed by ``Content-Length``) waits
    for the body: one system call instead of two. Such heads are written without h11, which
    would only copy the fields and check what :func:`_direct_head` checks; h11 restarts on
    the bytes after the request. Any other head goes out at once, through h11.
    """

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self._plain_request = "connection" not in request.headers
        self._pending = b""  # serialised head not yet written
        self._direct_left: int | None = None  # body bytes still owed when writing directly
        self.status = 0
        self.bytes_sent = 0
        self.started = False
        self.ended = False
        self.aborted = False

    async def start_prepared(self, prepared: PreparedHead, extra: Headers) -> None:
        """Like :meth:`start` for ``prepared`` followed by the ``extra`` fields, but written
        from the pre-serialised block when the response may skip h11 (see :func:`prepare`)."""
        conn = self._conn
        block = prepared.block
        # The extra fields are often the same object response after response (see
        # delivery.py), so their serialised form is remembered with them.
        extra_lines = extra.memo(_field_lines, _field_lines)
        if (
            block is None
            or extra_lines is None
            or conn.draining
            or not self._plain_request
            or not conn.plain_exchange()
        ):
            head = prepared.head
            await self.start(
                ResponseHead(
                    status=head.status, reason=head.reason, headers=head.headers.update(extra)
                )
            )
            return
        lines = [block, extra_lines]
        if conn.worker_field is not None:
            lines.append(b"%s: %s\r\n" % conn.worker_field)
        lines.append(b"\r\n")
        self.started = True
        self.status = prepared.head.status
        self._pending = b"".join(lines)
        self._direct_left = 0 if self._head_only else prepared.length
        if self._direct_left > COALESCE_MAX_BYTES:
            pending, self._pending = self._pending, b""
            await conn.write(pending)

    async def start(self, head: ResponseHead) -> None:
        """Send the status line and header fields (held for a small body)."""
        conn = self._conn
        fields = head.headers.raw()
        if conn.draining:
            fields = [(n, v) for n, v in fields if n != b"connection"]
            fields.append((b"connection", b"close"))
        if conn.worker_field is not None:
            fields.append(conn.worker_field)
        reason = head.reason.encode("latin-1") or _reason_phrase(head.status)
        self.started = True
        self.status = head.status
        direct = None
        if self._plain_request and not conn.draining and conn.plain_exchange():
            direct = _direct_head(head.status, reason, fields)
        if direct is not None:
            self._pending, length = direct
            self._direct_left = 0 if self._head_only else length
            if self._direct_left <= COALESCE_MAX_BYTES:
                return
        else:
            event = h11.Response(status_code=head.status, headers=fields, reason=reason)
            self._pending = conn.h11_state.send(event) or b""
        # A long or streamed body: the client sees the status now, not after the first read.
        pending, self._pending = self._pending, b""
        await conn.write(pending)

    async def send(self, chunk: bytes) -> None:
        """Send a piece of the body (dropped for HEAD)."""
        if self._head_only or not chunk:
            return
        if self._direct_left is None:
            data = self._conn.h11_state.send(h11.Data(data=chunk)) or b""
        elif len(chunk) > self._direct_left:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        else:
            self._direct_left -= len(chunk)
            data = chunk
        if self._pending:
            pending, self._pending = self._pending, b""
            if len(data) <= COALESCE_MAX_BYTES:
                data = pending + data
            else:  # copying a big chunk costs more than one more system call
                await self._conn.write(pending)
        await self._conn.write(data)
        self.bytes_sent += len(chunk)

    async def send_file(self, file: BinaryIO, count: int) -> bool:
        """Send ``count`` bytes of ``file`` from its start with ``os.sendfile`` (no copy
        through Python); False, with nothing sent, when this response cannot (not framed
        directly, HEAD, or not a socket), and the caller sends the body itself.

        Raises:
            ClientGone: the client went away.
            EOFError: the file ended before ``count`` bytes (the response is cut short).
        """
        sock = getattr(self._conn.stream, "socket", None)
        if self._head_only or self._direct_left is None or count > self._direct_left:
            return False
        if not isinstance(sock, trio.socket.SocketType):
            return False
        pending, self._pending = self._pending, b""
        await self._conn.write(pending)
        offset = 0
        while offset < count:
            try:
                # In a worker thread: an entry not in the page cache is read from disk.
                sent = await trio.to_thread.run_sync(
                    _sendfile_some, sock.fileno(), file.fileno(), offset, count - offset
                )
            except OSError as exc:
                self._conn.closed = True
                raise ClientGone(str(exc)) from None
            if sent is None:
                await trio.lowlevel.wait_writable(sock)
                continue
            if sent == 0:
                raise EOFError(f"file ended after {offset} of {count} bytes")
            offset += sent
            self._direct_left -= sent
            self.bytes_sent += sent
        return True

    async def end(self) -> None:
        """Finish the response; the connection may serve another request."""
        if self._direct_left is None:
            data = self._conn.h11_state.send(h11.EndOfMessage()) or b""
        elif self._direct_left:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        else:
            data = b""
        pending, self._pending = self._pending, b""
        await self._conn.write(pending + data)
        if self._direct_left is not None:
            self._conn.restart_h11()
        self.ended = True

    async def abort(self) -> None:
        """Cut the response short: the client sees a truncated transfer, never a complete one."""
        self.aborted = True
        self._pending = b""
        await self._conn.close()


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


class Server:
    """Tracks live connections so shutdown can stop idle ones and drain busy ones, and
    enforces the idle timeouts (:meth:`close_idle`, run by ``serve``)."""

    def __init__(
        self,
        proxy: _Handler,
        settings: ServerSettings,
        clock: Clock,
        worker_id: str | None = None,
        seat: Seat | None = None,
    ) -> None:
        self.proxy = proxy
        self.settings = settings
        self.clock = clock
        # Told of every finished request (the proxy's figures), when the handler has it.
        self._request_done: Callable[..., None] | None = getattr(proxy, "request_done", None)
        self.worker_field = None if worker_id is None else (WORKER_FIELD, worker_id.encode("ascii"))
        self.draining = False
        self._connections: set[_Connection] = set()
        # Connections accepted and not yet closed, published on ``seat`` (workers sharing
        # one socket balance their accepts by it; see proxychain.balance).
        self.seat = seat
        self.open_connections = 0
        if seat is not None:
            seat.report(0)

    def start_draining(self) -> None:
        """Stop idle keep-alive connections now; busy ones close after their response."""
        self.draining = True
        for conn in self._connections:
            conn.draining = True
            if conn.idle:
                conn.stop_idle()

    async def close_idle(self) -> None:
        """Close every connection that waited for a request head longer than its timeout
        (header timeout for a first request, keep-alive timeout after), checking a few
        times per timeout; runs until cancelled."""
        interval = min(self.settings.header_timeout, self.settings.keepalive_timeout)
        interval = min(IDLE_CHECK_MAX_INTERVAL, max(IDLE_CHECK_MIN_INTERVAL, interval / 4))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for conn in self._connections:
                if conn.idle and now >= conn.idle_until:
                    conn.stop_idle()

    def admit(self) -> None:
        """Count a connection just accepted; :meth:`handle_admitted` serves it."""
        self._count_open(1)

    async def handle_admitted(self, stream: trio.abc.Stream) -> None:
        """Serve a connection counted by :meth:`admit`, and count it closed after."""
        try:
            await self.handle_connection(stream)
        finally:
            self._count_open(-1)

    def _count_open(self, change: int) -> None:
        self.open_connections += change
        if self.seat is not None:
            self.seat.report(self.open_connections)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection until it closes."""
        conn = _Connection(stream, self.settings, self.worker_field)
        conn.draining = self.draining
        self._connections.add(conn)
        client = ClientInfo(address=_peer_address(stream))
        try:
            with conn.idle_scope:
                await self._serve_requests(conn, client)
        except ClientGone:
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._connections.discard(conn)
            await conn.close()

    async def _serve_requests(self, conn: _Connection, client: ClientInfo) -> None:
        first = True
        while not conn.closed:
            if self.draining:
                return  # shutting down between requests
            timeout = self.settings.header_timeout if first else self.settings.keepalive_timeout
            first = False
            conn.idle_until = trio.current_time() + timeout
            conn.idle = True
            try:
                event = await conn.next_request()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(conn, exc)
                return
            finally:
                conn.idle = False
            if conn.stopped:
                return  # the timeout or the drain came as the head did: close, as just before
            if not isinstance(event, RequestHead):
                return  # the connection closed, or h11 paused on something else
            raw = event.fields
            block_size = sum(map(len, itertools.chain.from_iterable(raw))) + 4 * len(raw)
            if len(event.target) + block_size > self.settings.max_header_bytes:
                # h11 only bounds heads that arrive incomplete; one read can bring a whole one.
                await self._protocol_error(
                    conn, h11.RemoteProtocolError("request head too large", 431)
                )
                return
            if block_size <= SHARED_HEADER_BLOCK_MAX_BYTES:
                headers = _request_headers(raw)
            else:
                headers = Headers.from_raw(raw)
            await self._serve_one(conn, client, event, headers)
            if not await self._next_cycle(conn):
                return

    async def _serve_one(
        self, conn: _Connection, client: ClientInfo, event: RequestHead, headers: Headers
    ) -> None:
        started = self.clock.monotonic()
        request = Request(
            method=event.method.decode("ascii"),
            target=event.target.decode("latin-1"),
            headers=headers,
            scheme=client.scheme,
        )
        sink = H11Sink(conn, request)
        exchange = Exchange()
        body = None
        if headers.memo(_has_body, _has_body):
            body = _request_body(conn)
        else:
            conn.unread_empty_body = True
        try:
            await self.proxy.handle(request, body, sink, client, exchange)
        except ClientGone:
            exchange.detail = exchange.detail or "client gone"
            conn.closed = True
        except ProxyChainError as exc:
            # Errors the proxy did not answer itself (it normally does); map by status hint.
            if not sink.started:
                await send_error(sink, exc.status_hint, exc.reason, self.clock)
            else:
                await sink.abort()
            exchange.outcome = "ERROR"
            exchange.detail = exc.reason
        except Exception:
            log.exception("request handler failed: %s %s", request.method, request.target)
            exchange.outcome = "ERROR"
            if not sink.started and not conn.closed:
                await send_error(sink, 500, "internal error", self.clock)
            else:
                await sink.abort()
        finally:
            self._log_access(request, client, sink, exchange, started)

    async def _next_cycle(self, conn: _Connection) -> bool:
        """Prepare for the next request; False when the connection must close."""
        if conn.closed or self.draining:
            return False
        if conn.restarted:
            conn.restarted = False
            return True
        conn.read_empty_body()
        h = conn.h11_state
        if h.our_state is not h11.DONE:
            return False
        drained = 0
        while h.their_state is not h11.DONE and drained <= MAX_DRAIN_BYTES:
            if h.their_state is h11.MUST_CLOSE:
                return False
            with trio.move_on_after(self.settings.header_timeout):
                event = await conn.next_event()
            if not isinstance(event, h11.Data | h11.EndOfMessage):
                return False
            if isinstance(event, h11.Data):
                drained += len(event.data)
        if h.their_state is not h11.DONE:
            return False
        try:
            h.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    async def _protocol_error(self, conn: _Connection, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        log.info("bad request from client: %s (%d)", exc, status)
        if conn.h11_state.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
            return
        reason = "request header fields too large" if status == 431 else f"bad request: {exc}"
        # h11 refuses to send on a connection whose peer broke the protocol, so write the
        # error response with a fresh h11 state that knows nothing of the bad request.
        fresh = h11.Connection(h11.SERVER)
        fresh.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        fresh.next_event()
        head = error_head(status, reason, self.clock).headers.set("connection", "close")
        body = (reason + "\n").encode()
        data = fresh.send(h11.Response(status_code=status, headers=head.raw()))
        data = (data or b"") + (fresh.send(h11.Data(data=body)) or b"")
        data += fresh.send(h11.EndOfMessage()) or b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.stream.send_all(data)
        self._log_line("-", "-", "-", status, len(body), 0.0, "ERROR", "-", "-", "-", str(exc))

    def _log_access(
        self,
        request: Request,
        client: ClientInfo,
        sink: H11Sink,
        exchange: Exchange,
        started: float,
    ) -> None:
        duration = self.clock.monotonic() - started
        status = sink.status if not sink.aborted else -sink.status or 0
        self._log_line(
            client.address,
            request.method,
            request.target,
            status,
            sink.bytes_sent,
            duration,
            exchange.outcome,
            exchange.tier,
            exchange.upstream,
            exchange.route,
            exchange.detail,
        )
        if self._request_done is not None:
            self._request_done(
                request, sink.status, sink.bytes_sent, duration, exchange, sink.aborted
            )

    def _log_line(
        self,
        addr: str,
        method: str,
        target: str,
        status: int,
        nbytes: int,
        duration: float,
        outcome: str,
        tier: str,
        upstream: str,
        route: str,
        detail: str,
    ) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(
            '%s "%s %s" %d %d %.3fs cache=%s tier=%s upstream=%s%s',
            addr or "-",
            method,
            target,
            status,
            nbytes,
            duration,
            outcome,
            tier,
            upstream,
            f" ({detail})" if detail else "",
            extra={
                "client": addr,
                "method": method,
                "path": target,
                "status": status,
                "bytes": nbytes,
                "duration": round(duration, 6),
                "cache": outcome,
                "tier": tier,
                "upstream": upstream,
                "route": route,
                "detail": detail,
            },
        )


class _Handler(Protocol):
    """What the server needs from the proxy (see ``proxy.Proxy.handle``)."""

    async def handle(
        self,
        request: Request,
        body: AsyncIterator[bytes] | None,
        sink: H11Sink,
        client: ClientInfo,
        exchange: Exchange,
    ) -> None: ...


# A plain request head (see _plain_head), by h11's grammar (h11/_abnf.py) narrowed to visible
# ASCII: a request line and field lines, each without its CRLF.
_PLAIN_REQUEST_LINE = re.compile(rb"(GET|HEAD) ([\x21-\x7e]+) HTTP/1\.1")
_FIELD_LINE = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*([\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?[ \t]*"
)
# Fields that make h11 do more than parse (framing, keep-alive, 100-continue, upgrades).
_H11_FIELDS = frozenset(
    {b"connection", b"content-length", b"transfer-encoding", b"expect", b"upgrade"}
)


@functools.lru_cache(maxsize=SHARED_HEADER_BLOCKS)
def _plain_head(data: bytes) -> RequestHead | None:
    """``data`` as a plain request head, or ``None`` when h11 must parse it.

    Plain: all of ``data`` is one HTTP/1.1 GET or HEAD head with CRLF line ends, exactly
    one Host field and none of ``_H11_FIELDS``, every line as h11's grammar has it. h11
    would make the same request of it and take nothing else from it; anything else (a
    partial or pipelined head, a body, an unusual byte) goes to h11 as before.

    Remembered for the last heads seen (the caller passes only small ones): a client sends
    the same head again and again, and the answer is immutable.
    """
    if data.find(b"\r\n\r\n") != len(data) - 4:
        return None
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return None  # a bare CR or LF
    request_line, *lines = data[:-4].split(b"\r\n")
    request = _PLAIN_REQUEST_LINE.fullmatch(request_line)
    if request is None:
        return None
    fields: list[tuple[bytes, bytes]] = []
    hosts = 0
    for line in lines:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            return None
        name, value = field.groups(b"")
        lower = name.lower()
        if lower in _H11_FIELDS:
            return None
        hosts += lower == b"host"
        fields.append((name, value))
    if hosts != 1:
        return None  # h11 answers 400
    return RequestHead(request[1], request[2], tuple(fields))


@functools.lru_cache(maxsize=SHARED_HEADER_BLOCKS)
def _request_headers(raw: tuple[tuple[bytes, bytes], ...]) -> Headers:
    """One shared :class:`Headers` per distinct request header block.

    A client sends the same block on request after request, so sharing the (immutable)
    object means what is parsed from it (``Headers.memo``: the request's Cache-Control, its
    values of the fields a response varies on, whether it has a body) is parsed once, not
    per request.
    """
    return Headers.from_raw(raw)


def _has_body(headers: Headers) -> bool:
    """Whether a request head announces a body (h11 has checked its framing already)."""
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length")
    return length is not None and length.strip() != "0"


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


def _direct_head(
    status: int, reason: bytes, fields: list[tuple[bytes, bytes]]
) -> tuple[bytes, int] | None:
    """The serialised head and body length, or ``None`` when h11 must frame the response.

    Only ``Content-Length`` framing without ``Connection``/``Transfer-Encoding`` qualifies, and
    no field may carry CR, LF or NUL (no injected fields; h11 reports those as errors).
    """
    if status < 200 or status in (204, 304):
        return None
    length = None
    for name, value in fields:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name in (b"connection", b"transfer-encoding"):
            return None
    if length is None:
        return None
    head = b"".join(
        [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        + [b"%s: %s\r\n" % field for field in fields]
        + [b"\r\n"]
    )
    lines = len(fields) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        return None
    return head, length


def _set_notsent_lowat(stream: trio.abc.Stream, value: int) -> bool:
    """Set ``TCP_NOTSENT_LOWAT`` on a TCP stream; False where there is none to set."""
    if not isinstance(stream, trio.SocketStream) or not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        return False
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, value)
    except OSError:
        return False
    return True


def _sendfile_some(out_fd: int, in_fd: int, offset: int, count: int) -> int | None:
    """``os.sendfile`` until ``count`` bytes went or the socket is full: bytes sent, 0 at
    the end of the file, ``None`` when the socket took nothing."""
    sent_total = 0
    while sent_total < count:
        try:
            sent = os.sendfile(out_fd, in_fd, offset + sent_total, count - sent_total)
        except BlockingIOError:
            break
        if sent == 0:
            return sent_total
        sent_total += sent
    return sent_total or None


@dataclass(frozen=True, slots=True)
class PreparedHead:
    """A response head serialised once for many responses (a stored response's head).

    ``block`` is the status line and every field, each line ending in CRLF, without the
    blank line: the fields that change per response (``Age``, ``X-Cache``) are appended to
    it by :meth:`H11Sink.start_prepared`. ``None`` when h11 must frame the response.
    """

    head: ResponseHead  # without the per-response fields
    block: bytes | None
    length: int  # the body length its Content-Length announces


def prepare(status: int, reason: str, headers: Headers) -> PreparedHead:
    """Serialise a head whose per-response fields are added later (see :class:`PreparedHead`).

    ``headers`` must not contain the fields added later.
    """
    fields = ResponseHead(status=status, reason=reason, headers=headers)
    direct = _direct_head(status, reason.encode("latin-1") or _reason_phrase(status), headers.raw())
    if direct is None:
        return PreparedHead(fields, None, 0)
    head, length = direct
    return PreparedHead(fields, head[:-2], length)  # without the closing blank line


def _field_lines(fields: Headers) -> bytes | None:
    """``fields`` as header lines, or ``None`` when one carries CR, LF or NUL (the checks h11
    would make: no injected fields)."""
    if any(
        "\r" in n or "\n" in n or "\0" in n or "\r" in v or "\n" in v or "\0" in v
        for n, v in fields
    ):
        return None
    return b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in fields)


@functools.cache
def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _peer_address(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return ""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def error_head(status: int, reason: str, clock: Clock) -> ResponseHead:
    """The head of a proxychain-generated error response."""
    body_len = len(reason.encode()) + 1
    headers = Headers(
        [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(body_len)),
            ("cache-control", "no-store"),
            ("date", format_http_date(clock.wall())),
            ("x-proxychain-error", reason[:200].encode("ascii", "replace").decode("ascii")),
        ]
    )
    return ResponseHead(status=status, headers=headers)


async def send_error(sink: H11Sink, status: int, reason: str, clock: Clock) -> None:
    """Answer with a short text error (``reason`` plus a newline)."""
    await sink.start(error_head(status, reason, clock))
    await sink.send((reason + "\n").encode())
    await sink.end()


async def serve(
    proxy: _Handler,
    settings: ServerSettings,
    *,
    clock: Clock,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    listeners: list[trio.SocketListener] | None = None,
    worker_id: str | None = None,
    seat: Seat | None = None,
    on_listening: Callable[[bool], None] | None = None,
) -> None:
    """Run the data plane until ``shutdown`` is set, then drain.

    Args:
        proxy: the request handler (a :class:`~proxychain.proxy.Proxy`).
        settings: listener address and connection timeouts.
        clock: the proxy's clock.
        shutdown: set it to stop accepting and start the graceful drain.
        task_status: receives the bound port once listening.
        listeners: already-bound listeners (multi-process workers share one socket).
        worker_id: when set, every response names it in ``x-proxychain-worker``.
        seat: this worker's place on the board of workers sharing ``listeners``
            (:mod:`proxychain.balance`).
        on_listening: told ``True`` once accepting and ``False`` when the drain starts
            (readiness).
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    port = listeners[0].socket.getsockname()[1]
    server = Server(proxy, settings, clock, worker_id, seat)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(_accept_loop, listener, handlers, server)
            acceptors.start_soon(server.close_idle)
            if on_listening is not None:
                on_listening(True)
            task_status.started(port)
            await shutdown.wait()
            if on_listening is not None:
                on_listening(False)
            acceptors.cancel_scope.cancel()
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()
        server.start_draining()
        grace = settings.graceful_timeout
        handlers.cancel_scope.deadline = (
            trio.current_time() + grace if math.isfinite(grace) else math.inf
        )


async def _accept_loop(
    listener: trio.SocketListener, handlers: trio.Nursery, server: Server
) -> None:
    """Accept up to :data:`ACCEPT_BURST` waiting connections per wake-up.

    ``SocketListener.accept`` passes through the scheduler after each connection: while a
    herd's waiters are being fed (hundreds of tasks per pass), newcomers were let in one per
    pass, and the last of 500 waited seconds for its first byte (slowest 0.6 to 1.9 s,
    against 0.15 to 0.2 s with bursts of 8, on 2 cores; the median did not move). A burst
    is bounded so that one wake-up does not start every newcomer at once.

    A worker sharing the socket (``server.seat``) that has more open connections than a
    sibling leaves the next one to that sibling for a moment, and ends a burst once ahead.
    """
    seat = server.seat
    # A second handle on the listening socket, for plain non-blocking accepts; closing it
    # leaves the listener open.
    with socket.socket(fileno=os.dup(listener.socket.fileno())) as raw:
        raw.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(raw)
            if seat is not None and seat.ahead():
                await trio.sleep(DEFER_S)  # the sibling was woken too; then take it anyway
            for taken in range(ACCEPT_BURST):
                if taken and seat is not None and seat.ahead():
                    break
                try:
                    conn, _ = raw.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    # EMFILE and friends: back off briefly instead of spinning (as trio's
                    # serve_listeners does).
                    log.error("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    break
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                server.admit()
                handlers.start_soon(server.handle_admitted, stream)
